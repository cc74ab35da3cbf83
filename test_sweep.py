"""Tests for sweep.py: a grid file expanded into ia2.py commands, run here and as a job array on a real
one-node Slurm cluster (slurm-local.sh), merged into the paper's tables.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q test_sweep.py

The Slurm test needs root and the distribution's slurm-wlm and munge packages; where they are missing it is
skipped with the reason, unless IA2_TEST_SLURM=1 (set by .ci/run), which makes the skip a failure.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import ia2
import sweep
from test_ia2 import our_line, tiny  # noqa: F401 (a fixture: the tiny random model and its data)

HERE = os.path.dirname(os.path.abspath(__file__))


def write_grid(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def run_sweep(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "sweep.py"), *args], capture_output=True, text=True,
                          env=env, timeout=900)


GRID = """
name = "tiny"
[flags]
model = "{model}"
data = "{data}"
methods = ["zero_shot", "icl", "sft", "ia2", "ia2_then_sft"]
runs = 2
eval_size = 10
lr = [1e-5, 1e-3]
epochs = 3

[[grid]]
task = "sst2"
n_train = 2
adapter = "lora"
epochs = {epochs}
patience = {epochs}

[[grid]]
task = "sst2"
n_train = [3, 4]
adapter = "ia3"
"""


def test_a_grid_is_one_ia2_command_per_cell(tmp_path, monkeypatch):
    """Every combination of a group's values is a cell; [flags] go to every cell, [eval_tasks] by --task, a
    list of lists is one list-valued flag; the cell's folder is <sweep>/<name>. Written out by hand."""
    monkeypatch.setenv("ASSETS", "/data/assets")
    grid = sweep.read_grid(write_grid(tmp_path / "g.toml", """
name = "two-groups"
[flags]
model = "$ASSETS/gemma-3-270m"
runs = 2
[[grid]]
task = ["sst2", "agnews"]
adapter = ["lora", "ia3"]
[[grid]]
task = "gsm8k"
n_train = [2, 8]
beta = [[0.001, 0.5]]
[eval_tasks]
sst2 = ["sst2", "poems"]
gsm8k = ["gsm8k", "gsm8ks"]
"""))
    monkeypatch.setattr(sweep, "check", lambda *a: None)  # (no model folder here)
    got = sweep.cells(grid, "/s")
    base = ["--model", "/data/assets/gemma-3-270m", "--runs", "2"]
    assert got == [
        ("sst2-n4-lora-gemma-3-270m", base + ["--task", "sst2", "--adapter", "lora", "--eval-tasks", "sst2", "poems",
                                              "--out", "/s/sst2-n4-lora-gemma-3-270m"]),
        ("sst2-n4-ia3-gemma-3-270m", base + ["--task", "sst2", "--adapter", "ia3", "--eval-tasks", "sst2", "poems",
                                             "--out", "/s/sst2-n4-ia3-gemma-3-270m"]),
        ("agnews-n4-lora-gemma-3-270m", base + ["--task", "agnews", "--adapter", "lora", "--out",
                                                "/s/agnews-n4-lora-gemma-3-270m"]),
        ("agnews-n4-ia3-gemma-3-270m", base + ["--task", "agnews", "--adapter", "ia3", "--out",
                                               "/s/agnews-n4-ia3-gemma-3-270m"]),
        ("gsm8k-n2-lora-gemma-3-270m", base + ["--task", "gsm8k", "--n-train", "2", "--beta", "0.001", "0.5",
                                               "--eval-tasks", "gsm8k", "gsm8ks", "--out", "/s/gsm8k-n2-lora-gemma-3-270m"]),
        ("gsm8k-n8-lora-gemma-3-270m", base + ["--task", "gsm8k", "--n-train", "8", "--beta", "0.001", "0.5",
                                               "--eval-tasks", "gsm8k", "gsm8ks", "--out", "/s/gsm8k-n8-lora-gemma-3-270m"]),
    ]


def test_the_readme_s_python_runs(tiny, capsys):  # noqa: F811
    """The README's block "IA2 for one adapter, from Python", on the tiny model and its data, as written."""
    text = open(os.path.join(HERE, "README.md")).read()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(block, dict(MODEL=tiny["model"], DATA=tiny["data"], __name__="readme"))
    assert "'accuracy':" in capsys.readouterr().out  # the metrics it prints


def test_the_grids_that_ship_expand_into_valid_commands(monkeypatch):
    """Every grids/*.toml: each cell's command passes ia2.py's checks (model folders aside: not here)."""
    monkeypatch.setattr(ia2, "check_model", lambda name: None)
    sizes = {}
    for name in sorted(os.listdir(os.path.join(HERE, "grids"))):
        sizes[name] = len(sweep.cells(sweep.read_grid(os.path.join(HERE, "grids", name)), "/s"))
    assert sizes == {"laptop.toml": 3, "paper-llama3.2.toml": 12, "paper-qwen3.toml": 20}


@pytest.mark.parametrize("group, message", [
    ('task = "sst2"\nlearning_rate = 0.1', "cell sst2-n4-lora-model: unrecognized arguments: --learning-rate 0.1"),
    ('task = ["sst2", "nope"]', "cell nope-n4-lora-model: --task nope: must be a task with training data"),
    ('task = "gsm8k"\nlabels = [["a", "b"]]', "cell gsm8k-n4-lora-model: --eval-tasks, --labels: gsm8k is a "
                                             "multi-token task"),
    ('task = "sst2"\nmodel = "/no/such/model"', "cell sst2-n4-lora-model: --model /no/such/model: no such folder"),
    ('task = "sst2"\nout = "x"', "a grid does not set out"),
])
def test_bad_grid_input_is_one_line_naming_the_cell_before_anything_runs(tiny, tmp_path, group, message):  # noqa: F811
    grid = write_grid(tmp_path / "bad.toml", f'name = "bad"\n[flags]\nmodel = "{tiny["model"]}"\n[[grid]]\n{group}\n')
    p = run_sweep(grid, "--out", str(tmp_path / "bad-sweep"), "--slurm")
    line = our_line(p.stderr)
    assert p.returncode == 2 and line.startswith(f"sweep.py: error: {message}"), line  # (the tiny model's folder: model)
    assert not (tmp_path / "bad-sweep").exists()  # nothing written, nothing submitted


def test_a_local_sweep_runs_every_cell_once_and_its_tables_show_what_is_missing(tiny, tmp_path):  # noqa: F811
    grid = write_grid(tmp_path / "tiny.toml", GRID.format(model=tiny["model"], data=tiny["data"], epochs=3))
    out = tmp_path / "here"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = run_sweep(grid, "--out", str(out), env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("] running") == 3 and p.stdout.count("] finished") == 3
    tables = (out / "tables.md").read_text()
    for name in ("sst2-n2-lora-model", "sst2-n4-ia3-model"):
        res = json.loads((out / name / "results.json").read_text())["summary"]["sst2"]["ia2_then_sft"]
        assert f"{res['mean']['accuracy']:.1f} ± {res['std']['accuracy']:.1f} / {res['mean']['ece']:.2f}" in tables
    assert "## model, lora, N=2: single-token tasks" in tables and "| IA2→SFT |" in tables and "Not finished" not in tables
    p = run_sweep(grid, "--out", str(out), env=env)  # every cell finished: nothing runs again
    assert p.returncode == 0 and "3 cells, 3 finished, 0 to run" in p.stdout and "running" not in p.stdout
    shutil.rmtree(out / "sst2-n4-ia3-model")
    p = run_sweep(grid, "--out", str(out), "--tables")  # a cell not finished: missing, never a number
    assert p.returncode == 0, p.stderr
    tables = (out / "tables.md").read_text()
    assert "| IA2→SFT | missing |" in tables and "Not finished (1): sst2-n4-ia3-model." in tables
    rows = (out / "tables.csv").read_text().splitlines()
    assert rows[0].startswith("cell,model,adapter,n,task,eval,method,missing,acc") and any(
        r.startswith("sst2-n4-ia3-model,model,ia3,4,sst2,sst2,ia2_then_sft,True,,") for r in rows)
    assert "\\begin{tabular}" in (out / "tables.tex").read_text()
    assert (out / "accuracy_vs_n.png").read_bytes()[:4] == b"\x89PNG"  # N = 2 and 4


def test_the_tables_from_results_written_by_hand(tmp_path):
    """Two cells at N = 2 and 4, a source and an OOD task: Table 1's cells, the OOD table and Table 5's gaps
    from numbers chosen here."""
    def results(n, acc):
        summary = {e: {m: dict(mean=dict(accuracy=a, ece=0.25), std=dict(accuracy=1.0), lr=1e-3, beta=None)
                       for m, a in acc.items()} for e in ("sst2", "poems")}
        return dict(summary=summary, majority={"sst2": dict(label="1", accuracy=60.0), "poems": None})
    cells = []
    for n, acc in ((2, dict(icl=70.0, sft=60.0, ia2=65.0, ia2_then_sft=75.0)), (4, dict(icl=72.0, sft=70.0, ia2_then_sft=71.0))):
        name = f"sst2-n{n}"
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results(n, acc)))
        cells.append((name, ["--model", "m", "--n-train", str(n), "--eval-tasks", "sst2", "poems", "--out", "x"]))
    text = sweep.write_tables(cells, str(tmp_path))
    assert "## m, lora, N=2: single-token tasks\n\n| method | sst2 |\n|---|---|\n| majority class | 60.0 |\n" in text
    assert "| IA2→SFT | 75.0 ± 1.0 / 0.25 |" in text and "| method | sst2→poems |" in text
    assert "| 2 | 70.0 | 60.0 | 65.0 | 75.0 | +5.0 | +15.0 |\n| 4 | 72.0 | 70.0 |  | 71.0 | -1.0 | +1.0 |" in text


def slurm_up():
    """Why a one-node Slurm cannot run here, or None."""
    missing = [x for x in ("sbatch", "slurmctld", "slurmd", "munged") if not shutil.which(x) and
               not os.path.exists(f"/usr/sbin/{x}")]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurm-local.sh starts munged and the Slurm daemons, which needs root"
    return None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster on this machine (slurm-local.sh): the environment that reaches it."""
    why = slurm_up()
    if why:
        if os.environ.get("IA2_TEST_SLURM") == "1":
            pytest.fail(f"IA2_TEST_SLURM=1, but: {why}")
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", os.path.join(HERE, "slurm-local.sh"), "start", str(folder)], check=True, timeout=120)
    yield dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"), OMP_NUM_THREADS="1")
    subprocess.run(["bash", os.path.join(HERE, "slurm-local.sh"), "stop", str(folder)], timeout=60)


def wait(what, until, timeout=600, every=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = until()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}")


def test_a_slurm_job_array_with_a_requeued_cell_gives_the_local_sweep_s_tables(tiny, slurm, tmp_path):  # noqa: F811
    """sweep.py --slurm submits the 3 cells as one job array; cell 0 gets SIGTERM mid-training (scancel
    --signal=TERM, as a time limit or a preemption sends it), keeps what finished, requeues itself and
    resumes; the merged tables equal those of the same grid run here cell after cell (CPU, same seeds:
    identical numbers); a second sweep.py --slurm submits nothing."""
    grid = write_grid(tmp_path / "tiny.toml", GRID.format(model=tiny["model"], data=tiny["data"], epochs=300))
    here, there = tmp_path / "here", tmp_path / "slurm"
    assert run_sweep(grid, "--out", str(here), env=slurm).returncode == 0
    p = run_sweep(grid, "--out", str(there), "--slurm", env=slurm)
    assert p.returncode == 0, p.stderr
    job = re.search(r"Submitted batch job (\d+)", p.stdout).group(1)
    log = there / "logs" / "cell-0.log"
    wait("cell 0 to train", lambda: log.exists() and "| dev" in log.read_text(), every=0.02)  # 300 epochs to go
    def squeue():
        p = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T %r"], capture_output=True, text=True, env=slurm)
        return p.stdout if p.returncode == 0 else "(squeue failed)"
    print(f"$ squeue -j {job}  (cell 0 training)\n{squeue()}")
    wait("scancel to signal cell 0", lambda: subprocess.run(["scancel", "--signal=TERM", f"{job}_0"], env=slurm,
                                                           capture_output=True).returncode == 0, timeout=30, every=0.5)
    wait("cell 0 to be requeued", lambda: re.search(rf"{job}_0 PENDING", squeue()), timeout=120)
    print(f"$ squeue -j {job}  (cell 0 requeued)\n{squeue()}")

    # a requeued task waits (BeginTime) until the credential of its first start has expired (10 s here)
    wait("cell 0 to start again", lambda: "restart 1" in log.read_text(), timeout=300, every=1)
    wait("the array to finish", lambda: squeue().strip() == "", every=1)
    text = log.read_text()
    print(f"$ cat {log}\n{text}")
    assert "ia2.py: stopped by SIGTERM; the adapters and results finished so far are in" in text
    assert re.search(r"restart 1\n", text) and "resuming" in text  # the requeued task resumed the .partial
    assert run_sweep(grid, "--out", str(there), "--tables", env=slurm).returncode == 0
    assert (there / "tables.md").read_text() == (here / "tables.md").read_text()
    assert (there / "tables.csv").read_text().replace(str(there), "") == (here / "tables.csv").read_text().replace(
        str(here), "")
    p = run_sweep(grid, "--out", str(there), "--slurm", env=slurm)
    assert p.returncode == 0 and "3 cells, 3 finished, 0 to run" in p.stdout and "Submitted" not in p.stdout
