"""The paper's analyses of a run folder written by ia2.py.

    python eval.py runs/sst2                  # report.md, asim.png, reliability.png in runs/sst2/
    python eval.py runs/n2 runs/n4 runs/n8    # each folder as above, then sweep.md and sweep.png

For every run and method (at the lr ia2.py selected) it reloads the base model and the saved
adapter, and measures, following the paper:
  - accuracy, label accuracy and both ECEs on the eval set, re-evaluated, checked against results.json;
  - asim (§2, Fig. 2): token-wise cosine similarity between the self-attention outputs of the adapted
    model reading the query alone and of the base model reading the query after N-1 demos, per
    layer, on the first 100 eval examples;
  - reliability diagrams (§5) over the equal-mass bins of the paper's ECE;
  - the LoRA subspace overlap between methods (§5.2, Fig. 4; LoRA runs only: an (IA)³ adapter has no subspace);
  - IA2→SFT against SFT and ICL on every eval task: Table 5's gaps and Table 8's paired comparison over
    runs, with an exact sign-flip p-value (this part alone for multi-token runs).
Several folders (e.g. the same model and task at N = 2, 4, 8, 16) also give accuracy, ECE and asim
against N.

One SST-2 eval item (validation row 0, label 1 = positive) and what the models read, N=4:
  zero-shot and every adapter:  "Text:it 's a charming and often affecting journey . \nLabel:"
  ICL (the teacher, and the ICL baseline): N-1 = 3 held-out demos first, each "Text:...\nLabel:0\n\n",
  then the same query. The answer position is the last prompt token (after "Label:").
Reference, the paper's SST2 row (Qwen3-4B-Base, N=4, accuracy % / ECE): ICL 85.4/.13, SFT 65.2/.22,
IA2 only 82.7/.28, IA2→SFT 90.4/.06; mean asim with ICL: SFT 0.52, IA2→SFT 0.67, IA2 only 0.80.
The numbers of each folder are kept in its analysis.json; a later call reuses them (delete the file to
recompute). Figures need matplotlib (requirements-dev.txt); ia2.py does not.
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import ia2

# The paper's SST2 numbers: accuracy % / ECE, Qwen3-4B-Base at N=4, Llama-3.2-1B at N=8
# (Tables 1, 9, 12, 13), and the mean asim with ICL of Fig. 2.
PAPER_SST2 = {
    "icl": ("85.4 (0.4) / .13", "77.0 (2.2) / .10"),
    "sft": ("65.2 (10.7) / .22", "53.5 (5.0) / .34"),
    "sft_icl": ("62.3 (12.6) / .34", "52.3 (4.3) / .38"),
    "ia2": ("82.7 (6.4) / .28", "64.9 (15.3) / .30"),
    "ia2_then_sft": ("90.4 (2.3) / .06", "90.4 (1.3) / .09"),
    "ia2_plus_sft": ("76.8 (14.3) / .27", "66.9 (18.4) / .28"),
}
PAPER_ASIM = {"sft": (0.52, 0.61, 0.50), "ia2": (0.80, 0.91, 0.88), "ia2_then_sft": (0.67, 0.83, 0.70)}
METRICS = ia2.METRICS + ("asim",)
COLORS = {m: f"C{i}" for i, m in enumerate(ia2.METHODS)}  # one colour per method in every figure


# -----------------------------------------------------------------------------
# the measures: asim, subspace overlap, reliability bins


def asim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Token-wise cosine similarity of two (..., D) activation tensors, e.g. (L, R, D) -> (L, R)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


@torch.no_grad()
def activations(model, seqs: list, bs: int = 16) -> torch.Tensor:
    """Self-attention outputs of every layer at each prompt's last token: (n, L, D), fp32 on the CPU.
    With T=1 the answer position of the paper is this one, for the student and for the ICL teacher."""
    return torch.cat([ia2.forward(model, seqs[i:i + bs], capture=True)[1][:, :, 0].float().cpu()
                      for i in range(0, len(seqs), bs)])


def lora_basis(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The top-r left singular vectors of ΔW = (α/r)·B·A (d_out, r). ΔW = B·Aᵀᵀ; with Aᵀ = Q·R (thin
    QR), ΔW = (B·Rᵀ)·Qᵀ and Q has orthonormal columns, so the left singular vectors of ΔW are
    those of the small (d_out, r) matrix B·Rᵀ; the scale α/r does not change them."""
    _, R = torch.linalg.qr(A.double().T)
    U, _, _ = torch.linalg.svd(B.double() @ R.T, full_matrices=False)
    return U


def overlap(U1: torch.Tensor, U2: torch.Tensor) -> float:
    """(1/r)·‖U1ᵀU2‖_F²: 1 for the same subspace, 0 for orthogonal ones (§5.2)."""
    return float((U1.T @ U2).pow(2).sum() / U1.shape[1])


def adapter_overlap(folder1: str, folder2: str) -> float:
    """Mean overlap over the adapted matrices (q, k, o of every layer) of two saved adapters."""
    from safetensors.torch import load_file
    t1, t2 = (load_file(os.path.join(f, "adapter_model.safetensors")) for f in (folder1, folder2))
    names = [k[:-len(".lora_A.weight")] for k in t1 if k.endswith(".lora_A.weight")]
    basis = lambda t, n: lora_basis(t[n + ".lora_A.weight"], t[n + ".lora_B.weight"])
    return float(np.mean([overlap(basis(t1, n), basis(t2, n)) for n in names]))


def reliability(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> list:
    """Per equal-mass bin of the paper's ECE: (lowest, mean, highest confidence, accuracy, count)."""
    return [(float(conf[b].min()), float(conf[b].mean()), float(conf[b].max()), float(correct[b].mean()), len(b))
            for b in ia2.equal_mass_bins(conf, n_bins)]


def reliability_panel(ax, conf: np.ndarray, correct: np.ndarray, color: str, title: str):
    """One reliability diagram: each of the paper's equal-mass ECE bins as a point at its mean confidence and
    its accuracy (on the diagonal: calibrated), over the share of examples at each confidence (grey)."""
    bins = reliability(conf, correct)
    ax.hist(conf, bins=np.linspace(0, 1, 21), weights=np.full(len(conf), 1 / len(conf)), color="lightgrey",
            label="share of examples")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="calibrated")
    ax.plot([b[1] for b in bins], [b[3] for b in bins], "o", color=color, ms=4, clip_on=False,
            label="an equal-mass bin: mean confidence, accuracy")
    size, last = bins[0][4], bins[-1][4]
    sizes = f"{len(bins)} bins of {size}" if last == size else f"{len(bins) - 1} bins of {size}, 1 of {last}"
    note = "\nno top-1 answer is right: every bin at 0" if not correct.any() else ""
    ax.text(0.02, 0.97, f"n={len(conf)}: {sizes}{note}", va="top", fontsize=7, transform=ax.transAxes)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 over the top 10)", ylabel="accuracy in the bin")
    ax.set_title(title, fontsize=8)
    ax.xaxis.label.set_fontsize(7)
    ax.yaxis.label.set_fontsize(7)


# -----------------------------------------------------------------------------
# one run folder: re-evaluate every method, measure asim and overlap


def load_folder(folder: str):
    """config.json and results.json of a finished run; `analysable`: a single-token run evaluated on its
    own --task, the kind whose activations, calibration and adapters eval.py measures."""
    if folder.rstrip("/").endswith(".partial"):
        raise ia2.IA2Error(f"{folder} is an interrupted run: the same ia2.py command finishes it, then analyse "
                           "the finished folder")
    for f in ("config.json", "results.json"):
        if not os.path.isfile(os.path.join(folder, f)):
            raise ia2.IA2Error(f"{folder} is not a finished ia2.py run folder (no {f})")
    meta, results = ia2.read_json(os.path.join(folder, "config.json")), ia2.read_json(os.path.join(folder,
                                                                                                   "results.json"))
    if "summary" not in results or results.get("interrupted"):
        raise ia2.IA2Error(f"{folder}: not a finished run of this ia2.py (results.json is "
                           f"{'interrupted' if results.get('interrupted') else 'older'}); run its command again")
    return meta, results, meta["labels"] is not None and meta["config"]["task"] in results["summary"]


def adapter_folder(folder: str, results: dict, method: str, run: int) -> str:
    return ia2.adapter_dir(folder, method, results[method]["lr"], results[method].get("beta"), run)


# -----------------------------------------------------------------------------
# IA2→SFT against SFT and ICL, run by run (the paper's Table 8) and the gaps of Table 5


def sign_flip_p(diffs) -> float:
    """Exact two-sided paired test: the share of the 2^R ways to flip the signs of the R per-run differences
    whose mean is at least as far from 0 as the observed one. No assumption on their distribution; with
    R runs the smallest possible p is 2 / 2^R (0.0625 for 5 runs)."""
    d = np.asarray(diffs, dtype=float)
    signs = np.array(list(itertools.product((1, -1), repeat=len(d))))
    return float(np.mean(np.abs((signs * d).mean(1)) >= abs(d.mean()) - 1e-12))


def comparison(results: dict) -> str:
    """For each eval task: Table 5's columns (means; gap = IA2→SFT minus ICL, minus SFT) and Table 8's
    paired differences over the runs, each method at the setting ia2.py selected."""
    tables, majority = results["summary"], results.get("majority") or {}
    lines = ["## IA2→SFT against ICL and SFT, run by run (Tables 5 and 8)\n",
             "| eval task | majority class | ICL | SFT | IA2 only | IA2→SFT | gap wrt ICL | gap wrt SFT |",
             "|---|---|---|---|---|---|---|---|"]
    mean = lambda r, m: f"{r[m]['mean']['accuracy']:.1f}" if m in r else "–"
    paired = []
    for task, r in tables.items():
        gap = lambda m: f"{r['ia2_then_sft']['mean']['accuracy'] - r[m]['mean']['accuracy']:+.1f}" if (
            "ia2_then_sft" in r and m in r) else "–"
        maj = f"{majority[task]['accuracy']:.1f}" if majority.get(task) else "–"
        lines.append(f"| {task} | {maj} | {mean(r, 'icl')} | {mean(r, 'sft')} | {mean(r, 'ia2')} | "
                     f"{mean(r, 'ia2_then_sft')} | {gap('icl')} | {gap('sft')} |")
        for other in ("sft", "icl") if "ia2_then_sft" in r else ():
            if other in r:
                paired.append((task, other, r["ia2_then_sft"]["runs"], r[other]["runs"]))
    lines += ["", "| eval task | IA2→SFT minus | runs | accuracy (points) | p | ECE | p |", "|---|---|---|---|---|---|---|"]
    for task, other, a, b in paired:
        by_run = {x["run"]: x for x in b}
        pairs = [(x, by_run[x["run"]]) for x in a if x["run"] in by_run]
        cells = []
        for key in ("accuracy", "ece"):
            d = [x[key] - y[key] for x, y in pairs] if key in pairs[0][0] else None
            cells += [f"{np.mean(d):+.{1 if key == 'accuracy' else 3}f}", f"{sign_flip_p(d):.3f}"] if d else ["–", "–"]
        lines.append(f"| {task} | {other} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nMeans in %, at each method's selected setting; majority class: always answering "
                               "the eval set's most frequent label (single-token tasks). Paired: run r against run r (the "
                               "same N examples; ICL run r draws its own demos), the mean difference and the exact "
                               "sign-flip p (two-sided; its floor is 2/2^runs).\n")


def disagreements(folder: str, shown: int = 3) -> str:
    """From answers.jsonl: per eval task, the examples that IA2→SFT and SFT (each at its selected setting)
    answer differently, run by run: how many each gets right that the other gets wrong, and the first few."""
    path = os.path.join(folder, "answers.jsonl")
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        answers = [a for a in map(json.loads, f) if a["selected"] and a["method"] in ("sft", "ia2_then_sft")]
    with open(os.path.join(folder, "eval_examples.jsonl")) as f:
        text = {(e["task"], e["index"]): e["text"] for e in map(json.loads, f)}
    by = {(a["task"], a["method"], a["run"], a["index"]): a for a in answers}
    pairs = [(by[t, "ia2_then_sft", r, i], a) for (t, m, r, i), a in by.items() if m == "sft"
             and (t, "ia2_then_sft", r, i) in by]
    if not pairs:
        return ""
    lines = ["\n## Where IA2→SFT and SFT disagree (answers.jsonl)\n",
             "| eval task | examples x runs | both right | only IA2→SFT right | only SFT right | both wrong |",
             "|---|---|---|---|---|---|"]
    for task in dict.fromkeys(a["task"] for a, _ in pairs):
        ours = [(a["correct"], b["correct"]) for a, b in pairs if a["task"] == task]
        cells = [sum(x == want for x in ours) for want in ((1, 1), (1, 0), (0, 1), (0, 0))]
        lines.append(f"| {task} | {len(ours)} | " + " | ".join(map(str, cells)) + " |")
    said = lambda a: f"{a['top1']!r} ({a['p_top1']:.2f})" if "top1" in a else repr(a["answer"])
    lines += ["", f"The first {shown} of each kind (run 0):\n", "| eval task | example | gold | IA2→SFT | SFT |",
              "|---|---|---|---|---|"]
    for right in (True, False):
        first = [(a, b) for a, b in pairs if a["run"] == 0 and a["correct"] == right and b["correct"] != right]
        for a, b in first[:shown]:
            query = text[a["task"], a["index"]].replace("\n", " ").replace("|", "/")
            query = query if len(query) <= 90 else query[:87] + "..."
            lines.append(f"| {a['task']} | {a['index']}: {query} | {a['gold']!r} | {said(a)} | {said(b)} |")
    return "\n".join(lines) + ("\n\nEach method's answer at its selected setting; single-token tasks: the top-1 token "
                               "and its probability.\n")


def analyse(folder: str, device: str, n_asim: int) -> dict:
    """Everything measured on one run folder, as a JSON-able dict (saved as analysis.json)."""
    meta, all_results, _ = load_folder(folder)
    results = all_results["summary"][meta["config"]["task"]]
    cfg = ia2.Config(**{**meta["config"], "device": device})
    S = ia2.setup(cfg)
    model, tok, T, k = ia2.add_adapters(S.model, cfg), S.tok, S.task, min(n_asim, len(S.task.queries))
    evaluate = lambda seqs: ia2.predict_all(model, seqs, T.label_ids)
    out = dict(model=cfg.model, task=cfg.task, data=cfg.data, labels=T.labels, n_train=cfg.n_train,
               runs=cfg.runs, layers=model.config.num_hidden_layers, asim_examples=k,
               gold=T.gold[:3].tolist(), majority=ia2.majority(T.labels, T.gold), methods={})

    def record(method, run, pred, acts=None, teach=None):
        entry = out["methods"].setdefault(method, dict(lr=results[method]["lr"], beta=results[method].get("beta"),
                                                       runs=[], conf=[], max_p=[],
                                                       correct=[]))
        correct = ia2.top1_label(pred[1], tok, T.labels) == T.gold
        row = dict(run=run, **ia2.metrics(pred, T.gold, tok, T.labels))
        if acts is not None:
            layer_sim = asim(acts, teach).mean(0)  # (L,): mean over examples (one token each)
            row.update(asim=float(layer_sim.mean()), asim_layers=layer_sim.tolist())
        entry["runs"].append(row)
        if run == 0:  # the first eval examples, as a reader would check them by eye
            top = [tok.decode([int(t)]) for t in pred[1][:3, 0]]
            entry["examples"] = [dict(top1=t, label_p=p.tolist()) for t, p in zip(top, pred[2][:3])]
        entry["conf"] += (pred[0][:, 0] / pred[0].sum(-1)).tolist()
        entry["max_p"] += pred[0][:, 0].tolist()
        entry["correct"] += correct.tolist()

    name = os.path.basename(folder.rstrip("/"))
    print(f"[{name}] {cfg.model} loaded; the base model on {len(T.queries)} eval examples", flush=True)
    with ia2.without_adapters(model):
        zero_pred = evaluate(T.queries) if "zero_shot" in results else None
        zero_acts = activations(model, T.queries[:k])
    if zero_pred is not None:
        record("zero_shot", 0, zero_pred)
    trained = [m for m in ia2.TRAINED if m in results]
    for r in range(cfg.runs):
        s = cfg.seed + r
        _, _, rest, _ = ia2.few_shot_split(T.pool, cfg.n_train, s)
        icl = ia2.icl_eval_prompts(tok, T.labels, rest, T.eval_set, cfg.n_train - 1, s)
        print(f"[{name} run {r}] ICL (the base model with N-1 demos), then the adapters of {', '.join(trained)}",
              flush=True)
        with ia2.without_adapters(model):
            teach = activations(model, icl[:k])  # the teacher: the base model with N-1 demos
            if "icl" in results:
                record("icl", r, evaluate(icl))
        out.setdefault("zero_shot_asim_runs", []).append(asim(zero_acts, teach).mean(0).tolist())
        for m in trained:
            ia2.load_adapter_state(model, ia2.read_adapter(adapter_folder(folder, results, m, r)))
            record(m, r, evaluate(T.queries), activations(model, T.queries[:k]), teach)
            print(f"[{name} run {r}] {m}: acc {out['methods'][m]['runs'][-1]['accuracy']:.1f}"
                  f" asim {out['methods'][m]['runs'][-1]['asim']:.3f}", flush=True)
    out["adapter"], out["overlap"] = cfg.adapter, None  # (IA)³ has no low-rank subspace to compare: LoRA only
    if cfg.adapter == "lora":
        out["overlap"] = {a: {b: float(np.mean([adapter_overlap(adapter_folder(folder, results, a, r),
                                                                adapter_folder(folder, results, b, r))
                                                for r in range(cfg.runs)])) for b in trained} for a in trained}
    out["max_abs_diff_vs_results_json"] = max(
        abs(np.mean([x[key] for x in e["runs"]]) - results[m]["mean"][key])
        for m, e in out["methods"].items() for key in ("accuracy", "ece"))
    return out


def summary(entry: dict) -> dict:
    """Mean and population std over runs of each metric."""
    keys = [key for key in METRICS if key in entry["runs"][0]]
    return {key: (float(np.mean([x[key] for x in entry["runs"]])), float(np.std([x[key] for x in entry["runs"]])))
            for key in keys}


# -----------------------------------------------------------------------------
# figures


def plot_asim(a: dict, path: str):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    x = np.arange(1, a["layers"] + 1)
    zero = np.array(a["zero_shot_asim_runs"])
    ax.plot(x, zero.mean(0), "--", color="grey", label=f"zero-shot base (mean {zero.mean():.2f})")
    for m, e in methods(a):
        if "asim" not in e["runs"][0]:
            continue
        y = np.array([row["asim_layers"] for row in e["runs"]])
        ax.plot(x, y.mean(0), marker=".", color=COLORS[m], label=f"{m} (mean {y.mean():.2f})")
        ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=COLORS[m], alpha=0.15)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="decoder layer", ylabel="cosine similarity with ICL activations",
           title=f"asim per layer: {title(a)}\n{a['asim_examples']} eval examples, mean ± std over {plural(a['runs'], 'run')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(a: dict, path: str):
    import matplotlib.pyplot as plt
    pairs = methods(a)
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    for ax, (m, e) in zip(axes.flat, pairs):
        conf, correct = np.array(e["conf"]), np.array(e["correct"])
        runs = f"{len(e['runs'])} run{'s' * (len(e['runs']) > 1)}"
        reliability_panel(ax, conf, correct, COLORS[m], f"{m}\nECE {ia2.ece(conf, correct):.3f} (equal mass) · "
                          f"{ia2.ece_equal_width(np.array(e['max_p']), correct):.3f} (equal width), {runs} pooled")
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
    fig.suptitle(f"Reliability: {title(a)}; the paper's ECE bins of the pooled runs", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(analyses: list, path: str):
    import matplotlib.pyplot as plt
    ns = [a["n_train"] for a in analyses]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for m in ia2.METHODS:
        if not all(m in a["methods"] for a in analyses):
            continue
        stats = [summary(a["methods"][m]) for a in analyses]
        for ax, key in zip(axes, ("accuracy", "ece", "asim")):
            if key in stats[0]:
                ax.errorbar(ns, [s[key][0] for s in stats], [s[key][1] for s in stats], marker="o", capsize=3,
                            color=COLORS[m], label=m)
    for ax, label in zip(axes, ("top-1 accuracy (%)", "ECE (equal mass, top-10 renormalised)",
                                "asim with ICL (cosine, mean over layers)")):
        ax.set(xscale="log", xlabel="N, labelled examples", ylabel=label)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title(analyses[0], with_n=False)}: mean ± std over runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def methods(a: dict) -> list:
    """(name, entry) pairs in ia2.METHODS order."""
    return [(m, a["methods"][m]) for m in ia2.METHODS if m in a["methods"]]


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def title(a: dict, with_n=True) -> str:
    t = f"{os.path.basename(a['model'].rstrip('/'))}, {a['task']}{' (local data)' if a['data'] else ''}"
    return t + (f", N={a['n_train']}" if with_n else "")


# -----------------------------------------------------------------------------
# report.md


def pm(v, fmt="{:.1f}"):
    return f"{fmt.format(v[0])} ± {fmt.format(v[1])}"


def report(a: dict) -> str:
    lines = [f"# Analysis: {title(a)}, {plural(a['runs'], 'run')}\n",
             "Re-evaluated from the saved adapters (lr as selected by ia2.py); largest difference from "
             f"results.json in mean accuracy or ECE: {a['max_abs_diff_vs_results_json']:.2g}.\n",
             "| method | lr | accuracy | label acc. | ECE | ECE (equal width) | asim | answers "
             f"{'/'.join(a['labels'] + ['other'])} (%) |", "|---" * 8 + "|"]
    maj = a["majority"]
    lines.append(f"| majority class (always {maj['label']!r}) | – | {maj['accuracy']:.1f} | {maj['accuracy']:.1f} | – | "
                 "– | – | " + "/".join("100" if x == maj["label"] else "0" for x in a["labels"]) + "/0 |")
    for m, e in methods(a):
        s, lr = summary(e), ia2.setting_name(e["lr"], e.get("beta"))
        shares = [x["predicted"] for x in e["runs"]]
        one = sum(max(p) == 100 for p in shares)
        lines.append(f"| {m} | {lr} | {pm(s['accuracy'])} | "
                     f"{pm(s['label_accuracy'])} | {pm(s['ece'], '{:.3f}')} | {pm(s['ece_equal_width'], '{:.3f}')} | "
                     f"{pm(s['asim'], '{:.3f}') if 'asim' in s else '–'} | "
                     + "/".join(f"{p:.0f}" for p in np.mean(shares, 0))
                     + (f" **one answer in {one}/{len(shares)} run{'s' * (len(shares) > 1)}**" if one else "") + " |")
    zero = np.array(a["zero_shot_asim_runs"]).mean(1)
    lines += [f"| zero-shot base, asim only | – | | | | | {zero.mean():.3f} ± {zero.std():.3f} |", "",
              "The first eval examples, run 0: top-1 token and p(" + ", ".join(a["labels"]) + ")\n",
              "| method | " + " | ".join(f"example {i} (gold {a['labels'][g]})" for i, g in enumerate(a["gold"])) +
              " |", "|---" * (len(a["gold"]) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(f"{x['top1']!r} " + "/".join(f"{p:.2f}" for p in x["label_p"])
                                         for x in e["examples"]) + " |" for m, e in methods(a)]
    lines += ["",
              "Accuracy in %, ECE as a fraction, mean ± std (ddof=0) over runs. answers: how often the top-1 token "
              "is each label or another token, mean over runs. asim: cosine similarity between "
              f"the self-attention outputs with and without ICL demos, on the first {a['asim_examples']} eval "
              "examples, mean over layers. The ICL base model is the reference (asim 1); the zero-shot base "
              "model, no adapter and no demos, is the starting point.\n",
              "![asim per layer](asim.png)\n", "![reliability diagrams](reliability.png)\n"]
    if a["task"] == "sst2":
        lines += ["## Beside the paper (SST2 rows: Tables 1, 9, 12 and 13, Fig. 2)\n",
                  "The paper's models and data differ from these: Qwen3-4B-Base at N=4 and Llama-3.2-1B at N=8, "
                  f"real SST-2, 500 eval examples, 5 runs. Here: {title(a)}, {plural(a['runs'], 'run')}. Compare orderings and "
                  "gaps, not values.\n",
                  "| method | here: acc / ECE | paper Qwen3-4B N=4 | paper Llama-1B N=8 | here: asim | "
                  "paper asim (Qwen-4B, Llama-3B, Llama-1B) |", "|---|---|---|---|---|---|"]
        for m, e in methods(a):
            if m not in PAPER_SST2:
                continue
            s = summary(e)
            here = f"{pm(s['accuracy'])} / {s['ece'][0]:.2f}"
            paper_asim = ", ".join(f"{v:.2f}" for v in PAPER_ASIM[m]) if m in PAPER_ASIM else "–"
            lines.append(f"| {m} | {here} | {PAPER_SST2[m][0]} | {PAPER_SST2[m][1]} | "
                         f"{pm(s['asim'], '{:.2f}') if 'asim' in s else '–'} | {paper_asim} |")
        lines.append("")
    if not a.get("overlap"):
        return "\n".join(lines + ["## LoRA subspace overlap (§5.2)\n", "Not computed: an (IA)³ adapter is one vector per "
                                   "matrix, with no low-rank subspace to compare; the overlap is LoRA's measure.\n"])
    names = list(a["overlap"])
    lines += ["## LoRA subspace overlap (§5.2)\n",
              "(1/r)·‖U1ᵀU2‖_F² of the top-r left singular vectors of ΔW = (α/r)·B·A, mean over the adapted "
              "matrices, then over runs (the same run's adapters). 1: the same subspace; 0: orthogonal. Paper "
              "(Fig. 4): IA2 only vs IA2→SFT mean 0.39; SFT vs either, median 0.06.\n",
              "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {x} | " + " | ".join(f"{a['overlap'][x][y]:.3f}" for y in names) + " |" for x in names]
    return "\n".join(lines) + "\n"


def sweep_report(analyses: list) -> str:
    lines = [f"# {title(analyses[0], with_n=False)}: methods against N\n", "![sweep](sweep.png)\n",
             "| method | " + " | ".join(f"N={a['n_train']}" for a in analyses) + " |",
             "|---" * (len(analyses) + 1) + "|",
             "| majority class | " + " | ".join(f"{a['majority']['accuracy']:.1f}" for a in analyses) + " |"]
    for m in ia2.METHODS:
        if all(m in a["methods"] for a in analyses):
            cells = []
            for a in analyses:
                s = summary(a["methods"][m])
                cells.append(f"{pm(s['accuracy'])} / {s['ece'][0]:.2f}" + (f" / {s['asim'][0]:.2f}" if "asim" in s else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\ntop-1 accuracy in % ± std over runs / ECE (paper's) / asim (mean over runs), "
                               "each N at the lr ia2.py selected.\n")


# -----------------------------------------------------------------------------


def digest(path: str) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write(path: str, text: str):
    with open(path, "w") as f:
        f.write(text)


def run(folders: list, out: str, device: str, n_asim: int):
    loaded = {folder: load_folder(folder) for folder in folders}  # fail on a bad folder before any work
    if any(ok for _, _, ok in loaded.values()):
        try:
            import matplotlib
            matplotlib.use("Agg")
        except ImportError:
            raise ia2.IA2Error("eval.py draws figures with matplotlib: pip install -r requirements-dev.txt")
    analyses = []
    for folder, (meta, results, ok) in loaded.items():
        compare = comparison(results) + disagreements(folder)
        if not ok:  # a multi-token (or only OOD-evaluated) run: the comparison alone
            write(os.path.join(folder, "report.md"), f"# Analysis: {folder}\n\n{compare}")
            print(compare + f"(written to {folder}/report.md; activations, calibration and adapter overlap are "
                  "measured for single-token runs evaluated on their own task)\n")
            continue
        path, results_hash = os.path.join(folder, "analysis.json"), digest(os.path.join(folder, "results.json"))
        a = ia2.read_json(path) if os.path.isfile(path) else {}
        if a.get("results_sha256") == results_hash:
            print(f"{folder}: reusing {path}, made from this results.json (delete it to measure again)")
        else:  # none yet, or made from other results
            a = dict(analyse(folder, device, n_asim), results_sha256=results_hash)
            write(path, json.dumps(a))
        plot_asim(a, os.path.join(folder, "asim.png"))
        plot_reliability(a, os.path.join(folder, "reliability.png"))
        write(os.path.join(folder, "report.md"), report(a) + "\n" + compare)
        print(report(a) + "\n" + compare + f"(written to {folder}/report.md)\n")
        analyses.append(a)
    if len(analyses) > 1:
        keys = {(a["model"], a["task"], json.dumps(a["data"]), tuple(a["labels"])) for a in analyses}
        if len(keys) > 1:
            raise ia2.IA2Error("a sweep needs folders of the same model, task, data and labels; got " + str(keys))
        analyses.sort(key=lambda a: a["n_train"])
        os.makedirs(out, exist_ok=True)
        plot_sweep(analyses, os.path.join(out, "sweep.png"))
        write(os.path.join(out, "sweep.md"), sweep_report(analyses))
        print(f"{out}/sweep.md\n" + sweep_report(analyses))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folders", nargs="+", help="run folders written by ia2.py")
    p.add_argument("--out", help="where sweep.md and sweep.png go (several folders); default: <parent>/sweep")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--asim-examples", type=int, default=100, help="first eval examples used for asim (paper: 100)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.folders[0].rstrip("/"))), "sweep")
    try:
        run(args.folders, out, args.device, args.asim_examples)
    except ia2.IA2Error as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
