import json, sys  # python summary.py METRIC RUN_FOLDER...: mean ± std over runs (and ECE after "/" for accuracy)
metric, runs = sys.argv[1], {f.rstrip("/").split("/")[-1]: json.load(open(f + "/results.json"))["methods"] for f in sys.argv[2:]}
print("| method | " + " | ".join(runs) + " |\n" + "|---" * (len(runs) + 1) + "|")
for m in ["zero_shot", "icl", "sft", "sft_icl", "ia2", "ia2_then_sft", "ia2_plus_sft"]:
    cell = lambda r: "–" if r is None else f"{r['mean'][metric]:.1f} ± {r['std'][metric]:.1f}" + (
        f" / {r['mean']['ece']:.2f}" if metric == "accuracy" else "")
    print(f"| {m} | " + " | ".join(cell(r.get(m)) for r in runs.values()) + " |")
