"""The paper's tables from one sweep: a grid of ia2.py runs, one command per cell, run here or on Slurm.

    python sweep.py grids/laptop.toml                  # every unfinished cell here, one by one; the tables
    python sweep.py grids/paper-qwen3.toml --gpus 4    # four cells at once, one per GPU
    python sweep.py grids/paper-qwen3.toml --slurm -- --partition=gpu --time=8:00:00   # a Slurm job array
    python sweep.py grids/paper-qwen3.toml --tables    # the tables of the cells finished so far

A grid file (TOML) names the sweep, the flags of every cell ([flags]) and one or more groups of cells
([[grid]]: each key a list of values, every combination a cell; a list-valued flag of ia2.py is a list of
lists there); [eval_tasks] gives each --task the tasks it is evaluated on (the paper's OOD pairs). Each cell
is one `ia2.py` command with its own run folder, <sweep>/<cell>, so that a cell that stopped (Ctrl-C, a
time limit, a preemption) resumes from its .partial folder when the same command runs again, and a
finished cell (its results.json there) is never run again: rerunning the sweep runs only what is missing.
On Slurm each cell is one task of a job array (`sbatch --array`), run with srun and `--signal=TERM@...`
before its time limit; a cell that SIGTERM stopped requeues itself (`scontrol requeue`), and Slurm
requeues a preempted one (`--requeue`). The tables (tables.md, tables.csv, tables.tex, accuracy_vs_n.png)
show a cell that has not finished as missing, never as a number.
"""
import argparse
import collections
import csv
import itertools
import json
import os
import shlex
import subprocess
import sys
import threading

import ia2

HERE = os.path.dirname(os.path.abspath(__file__))
SHOWN = ("icl", "sft", "sft_icl", "ia2", "ia2_then_sft", "ia2_then_sft_icl", "ia2_plus_sft", "kd")
PAPER = dict(zero_shot="zero-shot", icl="ICL", sft="SFT", sft_icl="SFT (ICL resp.)", ia2="IA2 only",
             ia2_then_sft="IA2→SFT", ia2_then_sft_icl="IA2→SFT (ICL resp.)", ia2_plus_sft="IA2+SFT", kd="KD")


# -----------------------------------------------------------------------------
# the grid: a file -> one ia2.py command per cell


def read_grid(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the same parser, as the package tomli
        try:
            import tomli as tomllib
        except ImportError:
            raise ia2.IA2Error("sweep.py reads its grid with tomllib (Python 3.11); on 3.10, pip install "
                               "tomli")
    if not os.path.isfile(path):
        raise ia2.IA2Error(f"{path}: no such grid file")
    try:
        with open(path, "rb") as f:
            grid = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ia2.IA2Error(f"{path}: {e}")
    unknown = sorted(set(grid) - {"name", "out", "flags", "grid", "eval_tasks", "slurm"})
    if unknown:
        raise ia2.IA2Error(f"{path}: unknown key {unknown[0]!r} (name, out, flags, grid, eval_tasks, slurm)")
    if not grid.get("grid"):
        raise ia2.IA2Error(f"{path}: no [[grid]] of cells")
    return grid


def cells(grid: dict, folder: str) -> list:
    """(name, ia2.py arguments) of every cell, in the order of the file; each checked as ia2.py checks its
    flags, the first refused one named in one line, before anything runs."""
    out, seen = [], set()
    for group in grid["grid"]:
        axes = {k: v if isinstance(v, list) else [v] for k, v in group.items()}
        for values in itertools.product(*axes.values()):
            flags = {**grid.get("flags", {}), **dict(zip(axes, values))}
            if "task" in flags and "eval_tasks" not in flags and flags["task"] in grid.get("eval_tasks", {}):
                flags["eval_tasks"] = grid["eval_tasks"][flags["task"]]
            name = cell_name(flags, [k for k in axes if len(axes[k]) > 1])
            if name in seen:
                raise ia2.IA2Error(f"two cells are named {name}: give them another axis value")
            seen.add(name)
            args = arguments(flags) + ["--out", os.path.join(folder, name)]
            check(name, flags, args)
            out.append((name, args))
    return out


def cell_name(flags: dict, axes: list) -> str:
    """sst2-n4-lora-Qwen3-4B-Base, and the value of any other axis of the group that varies."""
    cfg = ia2.Config()
    parts = [flags.get("task", cfg.task), f"n{flags.get('n_train', cfg.n_train)}", flags.get("adapter",
             cfg.adapter), os.path.basename(str(flags.get("model", cfg.model)).rstrip("/"))]
    for k in axes:
        if k not in ("task", "n_train", "adapter", "model"):
            parts.append(k + "_".join(map(str, flags[k])) if isinstance(flags[k], list) else f"{k}{flags[k]}")
    return "-".join(map(str, parts))


def arguments(flags: dict) -> list:
    """The ia2.py arguments of a cell's flags; ~ and $VARIABLES in their values expanded."""
    args = []
    for k, v in flags.items():
        if k == "out":
            raise ia2.IA2Error("a grid does not set out: each cell's folder is <sweep>/<cell>")
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        elif v is not False:
            values = v if isinstance(v, list) else [v]
            args += [flag] + [os.path.expanduser(os.path.expandvars(str(x))) for x in values]
    return args


def check(name: str, flags: dict, args: list):
    """What ia2.py would refuse before it loads anything: its flags, and the tasks they name together."""
    try:
        cfg = ia2.parse_args(args)
        ia2.check_tasks(cfg)
        ia2.check_model(cfg.model)
    except ia2.IA2Error as e:
        raise ia2.IA2Error(f"cell {name}: {e}")


def finished(folder: str, name: str) -> bool:
    return os.path.isfile(os.path.join(folder, name, "results.json"))


# -----------------------------------------------------------------------------
# running the cells: here (one after another, or one per GPU), or as a Slurm job array


def run_here(todo: list, folder: str, gpus: int) -> list:
    """Runs the cells, one at a time or one per GPU (CUDA_VISIBLE_DEVICES); each cell's output goes to
    <sweep>/logs/<cell>.log. Returns the cells that failed."""
    queue, failed, lock = collections.deque(todo), [], threading.Lock()

    def worker(gpu):
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {}))
        while True:
            with lock:
                if not queue:
                    return
                name, args = queue.popleft()
                print(f"[{name}] running" + f" on GPU {gpu}" * (gpu is not None), flush=True)
            with open(os.path.join(folder, "logs", f"{name}.log"), "a") as log:
                code = subprocess.run([sys.executable, os.path.join(HERE, "ia2.py"), *args], stdout=log,
                                      stderr=subprocess.STDOUT, env=env).returncode
            with lock:
                print(f"[{name}] " + ("finished" if code == 0 else f"failed (exit {code}): logs/{name}.log"),
                      flush=True)
                if code:
                    failed.append(name)
    gpu_ids = range(gpus) if gpus else [None]
    threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in gpu_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


JOB = """#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --output={folder}/logs/cell-%a.log
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=TERM@{grace}
# One cell of the sweep per array task: line SLURM_ARRAY_TASK_ID + 1 of commands.txt, run by srun so that
# Slurm's signals (the time limit's, scancel's) reach ia2.py. SIGTERM stops ia2.py, which keeps what finished
# in <cell>.partial (exit 143); the task then requeues itself, and the same command resumes the cell.
line=$((SLURM_ARRAY_TASK_ID + 1))
out=$(sed -n "${{line}}p" {folder}/outs.txt)
if [ -f "$out/results.json" ]; then
    echo "$out: finished already"
    exit 0
fi
echo "== $out, array task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID," \
     "restart ${{SLURM_RESTART_COUNT:-0}}"
trap 'echo "(the batch shell got SIGTERM too; it waits for the cell)"' TERM  # and requeues it below
eval "srun $(sed -n "${{line}}p" {folder}/commands.txt)"
code=$?
if [ "$code" -eq 143 ]; then
    for attempt in 1 2 3 4 5; do  # Slurm may answer "try again later" while the step ends
        scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}" && break
        sleep 3
    done
fi
exit "$code"
"""


def submit(all_cells: list, todo: list, folder: str, grid: dict, extra: list) -> str:
    """Writes commands.txt, outs.txt and slurm.sh, and hands the unfinished cells to sbatch as one job
    array. Returns sbatch's answer."""
    with open(os.path.join(folder, "commands.txt"), "w") as f:
        for _, args in all_cells:
            f.write(shlex.join([sys.executable, os.path.join(HERE, "ia2.py"), *args]) + "\n")
    with open(os.path.join(folder, "outs.txt"), "w") as f:
        f.writelines(os.path.join(folder, name) + "\n" for name, _ in all_cells)
    slurm = grid.get("slurm", {})
    script = os.path.join(folder, "slurm.sh")
    with open(script, "w") as f:
        f.write(JOB.format(job=f"ia2-{grid.get('name', 'sweep')}", folder=folder,
                           grace=slurm.get("signal_before", 300)))
    index = {name: i for i, (name, _) in enumerate(all_cells)}
    array = ",".join(str(index[name]) for name, _ in todo)
    cmd = ["sbatch", f"--array={array}", *slurm.get("options", []), *extra, script]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise ia2.IA2Error(f"sbatch refused the job: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return p.stdout.strip()


# -----------------------------------------------------------------------------
# the tables: every finished cell's results.json, missing cells shown as missing


def collect(all_cells: list, folder: str) -> list:
    """One record per (cell, eval task, method): the cell's model, adapter, N, task, and the mean and std of
    accuracy and ECE at the setting ia2.py selected; a cell not finished gives records marked missing."""
    records = []
    for name, args in all_cells:
        cfg = ia2.parse_args(args)
        model = os.path.basename(cfg.model.rstrip("/"))
        key = dict(cell=name, model=model, adapter=cfg.adapter, n=cfg.n_train, task=cfg.task)
        evals = list(dict.fromkeys(cfg.eval_tasks or [cfg.task]))
        if not finished(folder, name):
            records += [dict(key, eval=e, method=m, missing=True) for e in evals
                        for m in ("majority",) + SHOWN]
            continue
        res = ia2.read_json(os.path.join(folder, name, "results.json"))
        for e in evals:
            majority = (res.get("majority") or {}).get(e)
            if majority:
                records.append(dict(key, eval=e, method="majority", missing=False, acc=majority["accuracy"]))
            for m, r in res["summary"][e].items():
                records.append(dict(key, eval=e, method=m, missing=False, acc=r["mean"]["accuracy"],
                                    acc_std=r["std"]["accuracy"], ece=r["mean"].get("ece"),
                                    ece_std=r["std"].get("ece"), lr=r["lr"], beta=r["beta"]))
    return records


def cell_text(r: dict, with_ece=True) -> str:
    if r is None:
        return ""
    if r["missing"]:
        return "missing"
    text = f"{r['acc']:.1f}" + (f" ± {r['acc_std']:.1f}" if "acc_std" in r else "")
    return text + (f" / {r['ece']:.2f}" if with_ece and r.get("ece") is not None else "")


def kind(r: dict) -> str:
    """Which table a record belongs in: a task evaluated on itself (single- or multi-token), or OOD."""
    if r["eval"] != r["task"]:
        return "OOD (ICL demos from the source task)"
    return "single-token tasks" if ia2.TASKS[r["task"]]["labels"] else "multi-token tasks, accuracy"


def tables(records: list) -> list:
    """(title, header, rows) of each table: per model, adapter and N, Table 1's shape (single-token tasks on
    themselves), the multi-token table and the OOD table, methods as rows; then Table 5's gaps against N."""
    out, groups = [], collections.defaultdict(list)
    for r in records:
        groups[r["model"], r["adapter"], r["n"], kind(r)].append(r)
    order = ["single-token tasks", "multi-token tasks, accuracy", "OOD (ICL demos from the source task)"]
    for (model, adapter, n, what), rs in sorted(groups.items(), key=lambda g: order.index(g[0][3])):
        cols = list(dict.fromkeys((r["task"], r["eval"]) for r in rs))
        find = {(r["task"], r["eval"], r["method"]): r for r in rs}
        ood = what.startswith("OOD")
        header = ["method"] + [f"{t}→{e}" if ood else e for t, e in cols]
        rows = []
        for m in ("majority", "zero_shot") + SHOWN:
            cells_ = [cell_text(find.get((t, e, m)), with_ece=not what.startswith("multi")) for t, e in cols]
            if any(cells_):
                rows.append([PAPER.get(m, "majority class")] + cells_)
        out.append((f"{model}, {adapter}, N={n}: {what}", header, rows))
    gaps = collections.defaultdict(dict)  # Table 5: IA2→SFT against ICL and SFT, in-domain, at each N
    for r in records:
        if r["eval"] == r["task"] and not r["missing"]:
            gaps[r["model"], r["adapter"], r["task"]].setdefault(r["n"], {})[r["method"]] = r["acc"]
    for (model, adapter, task), per_n in gaps.items():
        rows = []
        for n, acc in sorted(per_n.items()):
            means = [f"{acc[m]:.1f}" if m in acc else "" for m in ("icl", "sft", "ia2", "ia2_then_sft")]
            gap = [f"{acc['ia2_then_sft'] - acc[m]:+.1f}" if "ia2_then_sft" in acc and m in acc else ""
                   for m in ("icl", "sft")]
            rows.append([str(n)] + means + gap)
        header = ["N", "ICL", "SFT", "IA2 only", "IA2→SFT", "gap wrt ICL", "gap wrt SFT"]
        out.append((f"{model}, {adapter}, {task}: accuracy against N (Table 5's gaps)", header, rows))
    return out


def markdown(tabs: list, records: list) -> str:
    text = ""
    for title, header, rows in tabs:
        text += f"## {title}\n\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|\n"
        text += "".join("| " + " | ".join(row) + " |\n" for row in rows) + "\n"
    missing = sorted({r["cell"] for r in records if r["missing"]})
    note = ("Accuracy % (mean ± population std over runs) / the paper's ECE, each method at the setting "
            "ia2.py selected on the eval set; majority class: always answering the eval set's most frequent "
            "label.")
    return text + note + (f"\n\nNot finished ({len(missing)}): {', '.join(missing)}.\n" if missing else "\n")


def latex(tabs: list) -> str:
    esc = lambda s: s.replace("±", "$\\pm$").replace("→", "$\\to$").replace("_", "\\_").replace("%", "\\%")
    text = ""
    for title, header, rows in tabs:
        text += f"% {title}\n\\begin{{tabular}}{{l{'c' * (len(header) - 1)}}}\n\\toprule\n"
        text += " & ".join(map(esc, header)) + " \\\\\n\\midrule\n"
        text += "".join(" & ".join(map(esc, row)) + " \\\\\n" for row in rows)
        text += "\\bottomrule\n\\end{tabular}\n\n"
    return text


def figure(records: list, path: str) -> bool:
    """Accuracy and ECE against N per model, adapter and task (in-domain), one line per method; False if no
    group has two values of N."""
    groups = collections.defaultdict(list)
    for r in records:
        if r["eval"] == r["task"] and not r["missing"] and r["method"] in SHOWN:
            groups[r["model"], r["adapter"], r["task"]].append(r)
    groups = {k: v for k, v in groups.items() if len({r["n"] for r in v}) > 1}
    if not groups:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import eval as ev
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.4 * len(groups)), squeeze=False)
    for (ax_acc, ax_ece), ((model, adapter, task), rs) in zip(axes, groups.items()):
        for m in SHOWN:
            pts = sorted((r["n"], r) for r in rs if r["method"] == m)
            if pts:
                ns = [n for n, _ in pts]
                ax_acc.errorbar(ns, [r["acc"] for _, r in pts], [r["acc_std"] for _, r in pts], marker="o",
                                capsize=3, color=ev.COLORS[m], label=PAPER[m])
                if pts[0][1].get("ece") is not None:
                    ax_ece.plot(ns, [r["ece"] for _, r in pts], "o-", color=ev.COLORS[m], label=PAPER[m])
        for ax, label in ((ax_acc, "accuracy (%)"), (ax_ece, "ECE (the paper's)")):
            ax.set(xscale="log", xlabel="N, labelled examples", ylabel=label,
                   title=f"{model}, {adapter}, {task}")
            ax.set_xticks(sorted({r["n"] for r in rs}), [str(n) for n in sorted({r["n"] for r in rs})])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_tables(all_cells: list, folder: str) -> str:
    records = collect(all_cells, folder)
    tabs = tables(records)
    with open(os.path.join(folder, "tables.md"), "w") as f:
        f.write(markdown(tabs, records))
    with open(os.path.join(folder, "tables.tex"), "w") as f:
        f.write(latex(tabs))
    keys = ["cell", "model", "adapter", "n", "task", "eval", "method", "missing", "acc", "acc_std", "ece",
            "ece_std", "lr", "beta"]
    with open(os.path.join(folder, "tables.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(records)
    drawn = figure(records, os.path.join(folder, "accuracy_vs_n.png"))
    return markdown(tabs, records) + (f"\n(and {folder}/accuracy_vs_n.png)\n" if drawn else "")


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="a grid file (TOML): grids/laptop.toml, grids/paper-qwen3.toml, ...")
    p.add_argument("--out", help="the sweep's folder; unset: the grid's out, else sweeps/<its name>")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--slurm", action="store_true", help="submit the unfinished cells as a Slurm job array "
                     "(options for sbatch after --)")
    how.add_argument("--gpus", type=int, default=0, help="run this many cells at once here, one per GPU")
    how.add_argument("--tables", action="store_true", help="only the tables of the cells finished so far")
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    a = p.parse_args(own)
    try:
        grid = read_grid(a.grid)
        folder = a.out or grid.get("out") or os.path.join("sweeps", grid.get("name", "sweep"))
        folder = os.path.abspath(os.path.expanduser(folder))
        all_cells = cells(grid, folder)
        todo = [(name, args) for name, args in all_cells if not finished(folder, name)]
        os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
        if a.tables:
            return print(write_tables(all_cells, folder))
        print(f"{folder}: {len(all_cells)} cells, {len(all_cells) - len(todo)} finished, {len(todo)} to run")
        if not todo:
            return print(write_tables(all_cells, folder))
        if a.slurm:
            answer = submit(all_cells, todo, folder, grid, extra)
            return print(f"{answer} ({len(todo)} array tasks); when they have finished: python sweep.py "
                         f"{a.grid} --tables")
        failed = run_here(todo, folder, a.gpus)
        print(write_tables(all_cells, folder))
        if failed:
            raise ia2.IA2Error(f"{len(failed)} cells failed: {', '.join(failed)} (logs: {folder}/logs/)")
    except ia2.IA2Error as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("sweep.py: interrupted; the cells that finished are kept, and the same command runs the rest "
              "(a stopped cell resumes from its .partial folder)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
