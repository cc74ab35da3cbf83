"""IA2: ICL Activation Alignment, then supervised fine-tuning, in one file.

IA2 distils in-context learning (ICL) into LoRA weights: the model *without*
demonstrations is trained to reproduce the self-attention outputs the same model
produces *with* N-1 demonstrations, and is then fine-tuned as usual (SFT).
  Mishra, Khashabi, Liu. "IA2: Alignment with ICL Activations Improves Supervised
  Fine-Tuning." ICLR 2026, arXiv:2509.22621.

The steps, in the order of the paper and of this file:
  1. the 12 tasks, prompts, the few-shot protocol (§5, App. A) ... TASKS, load_task, few_shot_split
  2. LoRA, written out (§5) ........................... LoRALinear, add_lora
  3. capture the self-attention outputs (§2) ......... capture_activations, forward (positions d+t)
  4. the teacher: base model reading N-1 demos (§3-4) . generate (KV cache), teacher
  5. the losses: IA2 (Eq. 4), SFT (Eq. 2), KD ........ ia2_loss, sft_loss, kd_loss, objective_loss
  6. training: one loop, early stopping on dev loss ... train
  7. evaluation: accuracy and ECE; generation (§5) ... predict, metrics, ece, parse_answer, generation_metrics
  8. the experiment: methods x lrs x runs x tasks .... run_experiment, main

Symbols:
  X      the query prompt, e.g. "Text:a gripping film\nLabel:"
  Y      its ground truth: a label string ("1") or an answer text (+EOS as a target)
  I      the other N-1 training examples, used as demonstrations
  Ŷ      the base model's own greedy answer with demos (the ICL answer), T' <= T tokens
  A_ICL  teacher activations at d_icl+t, (L, T', D) per example
  L, D   number of decoder layers, hidden size
  T      response tokens aligned: 1 for single-token tasks, 200 for multi-token tasks
  r, α   LoRA rank and scale numerator (8, 8: scale α/r = 1)
  β      weight of the SFT term in IA2+SFT

Quick start (digits as labels, the paper's lr grid, 5 runs):
  python ia2.py --model Qwen/Qwen3-0.6B --task sst2
  python ia2.py --model Qwen/Qwen3-0.6B --task sst2 --eval-tasks sst2 finsen poems
  python ia2.py --model Qwen/Qwen3-0.6B --task gsm8k
  python ia2.py --list-tasks
prints a table of accuracy and ECE (mean ± std over runs) per eval task and method and writes
config.json, results.json, results.md and the adapters to a run folder.

But (deviations from the official code, details in README.md):
  - the best dev checkpoint is really restored (the official code keeps the last);
  - torch is seeded; one right-padded batch of min(4, N) replaces gradient accumulation;
  - losses and LoRA are fp32 over a bf16 (CUDA) or fp32 (CPU) base model;
  - the teacher rollout uses a KV cache and gives Ŷ, A_ICL and the KD distributions at once
    (tested equal to the official full re-forward); labels of single-token tasks must be one token.
"""
import argparse
import collections
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import re
import shutil
import string
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm  # installed with transformers and datasets

METHODS = ("zero_shot", "icl", "sft", "sft_icl", "ia2", "ia2_then_sft", "ia2_plus_sft", "kd")
TRAINED = ("sft", "sft_icl", "ia2", "ia2_then_sft", "ia2_plus_sft", "kd")
METRICS = ("accuracy", "label_accuracy", "ece", "ece_equal_width")  # multi-token tasks: accuracy only


class IA2Error(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


# -----------------------------------------------------------------------------
# Configuration: one dataclass, the command line is generated from it


def arg(default, help, ok=None):
    """A Config field: its default, its --help text and, optionally, (test, what it must be) for its value."""
    return field(default=default, metadata=dict(help=help, ok=ok))


AT_LEAST = lambda n: (lambda v: v >= n, f">= {n}")


@dataclass
class Config:
    model: str = arg("Qwen/Qwen3-0.6B", "Hub id or local folder of a causal LM (paper: Qwen3-4B-Base, Llama-3.2-1B)")
    task: str = arg("sst2", "task trained on (--list-tasks prints all 12)")
    eval_tasks: tuple = arg(None, "tasks evaluated on, e.g. sst2 finsen poems; ICL demos always come from --task "
                            "(paper's OOD protocol); unset: --task")
    data: tuple = arg(None, "local copies instead of the Hub: FILE (for --task) or TASK=FILE ...; .csv, .tsv, .jsonl, "
                      ".json or .parquet with the template's fields (e.g. text) or the Hub dataset's own columns "
                      "(e.g. sentence), and label (a label string or its index) or answer (text); shuffled with "
                      "seed 42, the last --eval-size rows (at most half) are the eval set")
    labels: tuple = arg(None, "label strings instead of the task's (sst2: 0 1). Each must be one token. A leading "
                       "space is part of the string: quote it, --labels ' negative' ' positive'")
    n_train: int = arg(4, "N, labelled examples per run; each query sees the other N-1 as demos (paper: 4 Qwen, 8 Llama)",
                        AT_LEAST(2))
    runs: int = arg(5, "runs r = 0..runs-1, each a different draw of the N examples (paper: 5)", AT_LEAST(1))
    lr: tuple = arg((1e-4, 3e-4, 1e-3), "learning rate, or a grid to select from (paper: 1e-4 3e-4 1e-3)",
                     (lambda v: v > 0, "> 0"))
    methods: tuple = arg(METHODS[:-1], "methods to run, any of: " + " ".join(METHODS) + " (kd, the paper's "
                         "Table 4 soft-label baseline, only when named)")
    beta: float = arg(0.5, "β in (1-β)·L_IA2 + β·L_SFT for ia2_plus_sft (paper grids: Qwen 0.1-0.9, Llama 0.001-0.5)",
                       (lambda v: 0 <= v <= 1, "in [0, 1]"))
    eval_size: int = arg(500, "evaluation examples, never trained on (paper: 500)", AT_LEAST(1))
    pool_size: int = arg(2000, "training pool the N examples, dev set and ICL demos are drawn from (paper: 2000)",
                          AT_LEAST(1))
    epochs: int = arg(50, "maximum epochs (paper: 50)", AT_LEAST(1))
    patience: int = arg(5, "stop after this many dev checks without improvement; a check every 2 steps (paper: 5)",
                        AT_LEAST(1))
    batch_size: int = arg(4, "examples per optimizer step, min(this, N) (paper: 4, by gradient accumulation)",
                          AT_LEAST(1))
    rank: int = arg(8, "LoRA rank r on q_proj, k_proj, o_proj (paper: 8; alpha = rank, scale 1)", AT_LEAST(1))
    max_new_tokens: int = arg(None, "multi-token tasks: teacher rollout length T and generation limit (paper: 200; "
                              "400 for hmath_algebra's evaluation); single-token tasks always use T=1", AT_LEAST(1))
    seed: int = arg(0, "run r uses seed seed+r for its split, demo order, LoRA init and shuffles (paper: r)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu; bf16 base on cuda, fp32 elsewhere")
    out: str = arg(None, "output folder; unset: runs/<task>-<model>-n<N>-<time>")
    list_tasks: bool = arg(False, "print the task table and exit")


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=f.default, help=f.metadata["help"])
        if f.type is tuple:
            kw.update(nargs="+", type=float if f.name == "lr" else str)
        elif f.type is bool:
            kw.update(action=argparse.BooleanOptionalAction)
        else:
            kw.update(type=f.type)
        p.add_argument(flag, **kw)
    return Config(**vars(p.parse_args(argv)))


def check_flags(cfg: Config):
    """Each flag against the condition written beside it in Config; the message names the flag and value."""
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, (tuple, list)) else [value]:
            if f.metadata["ok"] and v is not None and not f.metadata["ok"][0](v):
                raise IA2Error(f"--{f.name.replace('_', '-')} {v}: must be {f.metadata['ok'][1]}")


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise IA2Error("--device cuda was asked for but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise IA2Error("--device mps was asked for but torch sees no MPS device")
    if name not in ("cuda", "mps", "cpu"):
        raise IA2Error(f"unknown device {name!r}; use auto, cuda, mps or cpu")
    return torch.device(name), torch.bfloat16 if name == "cuda" else torch.float32


# -----------------------------------------------------------------------------
# 1. Prompts and the few-shot protocol (§5 "Data Setup", App. A)

# The twelve tasks (App. A; the official prepare_data.py): its templates and label strings, no space after the
# colon. `row` turns one Hub record into the template's fields plus `label` (an index into `labels`,
# single-token tasks) or `answer` (the target text, multi-token tasks); None drops the record.
# splits: (pool, eval); pool None = evaluation only (OOD); eval None = the last --eval-size records
# of the shuffled pool split. gen: max_new_tokens of the generation evaluation (§5).
SLOTS = ["apple", "Friday", "banana", "Saturday", "Thursday", "Sunday", "Wednesday", "Monday"]  # App. A, seed 42
TEXT, QA = "Text:{text}\nLabel:", "Question:{question}\nAnswer:"
CHOICES = lambda n: ("Question:{question}\nChoices:\n" + "".join(f"[{SLOTS[i]}]{{o{i}}}\n" for i in range(n))
                     + "\nAnswer:")
BBC = {"tech": 3, "business": 2, "sport": 1}  # entertainment, politics -> 0


def cut(text: str, n: int = 256) -> str:
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0]  # at a word boundary


def sciq_row(ex, rng):
    options = [ex["correct_answer"], ex["distractor1"], ex["distractor2"], ex["distractor3"]]
    order = list(rng.permutation(4))  # slot i shows options[order[i]]; the correct one is options[0]
    return dict(question=ex["question"], **{f"o{i}": options[j] for i, j in enumerate(order)}, label=order.index(0))


TASKS = {
    "sst2": dict(paper="SST2", hub=("stanfordnlp/sst2", None), splits=("train", "validation"), template=TEXT,
                 labels=["0", "1"], row=lambda ex, rng: dict(text=ex["sentence"], label=ex["label"])),
    "finsen": dict(paper="FinS", hub=("takala/financial_phrasebank", "sentences_50agree"), splits=("train", None),
                   template=TEXT, labels=["0", "1"],  # {0 negative, 2 positive} -> {0, 1}; neutral dropped
                   row=lambda ex, rng: None if ex["label"] == 1 else dict(text=ex["sentence"], label=ex["label"] // 2)),
    "poems": dict(paper="PoemS", hub=("google-research-datasets/poem_sentiment", None), splits=(None, "train"),
                  template=TEXT, labels=["0", "1"],  # negative, positive; no_impact and mixed dropped: 288 left
                  row=lambda ex, rng: dict(text=ex["verse_text"], label=ex["label"]) if ex["label"] < 2 else None),
    "strategytf": dict(paper="STF", hub=("wics/strategy-qa", None), splits=("test", None), template=QA,
                       labels=["0", "1"], row=lambda ex, rng: dict(question=ex["question"], label=int(ex["answer"]))),
    "agnews": dict(paper="AGN", hub=("fancyzhx/ag_news", None), splits=("train", "test"), template=TEXT,
                   labels=["0", "1", "2", "3"],  # World, Sports, Business, Sci/Tech
                   row=lambda ex, rng: dict(text=ex["text"], label=ex["label"])),
    "bbcnews": dict(paper="BBCN", hub=("SetFit/bbc-news", None), splits=(None, "test"), template=TEXT,
                    labels=["0", "1", "2", "3"],  # AG News' label of each BBC topic
                    row=lambda ex, rng: dict(text=cut(ex["text"]), label=BBC.get(ex["label_text"], 0))),
    "sciq_remap": dict(paper="SciQr", hub=("allenai/sciq", None), splits=("train", "validation"),
                       template=CHOICES(4), labels=SLOTS[:4], row=sciq_row),
    "qasc_remap": dict(paper="QASCr", hub=("allenai/qasc", None), splits=(None, "validation"), template=CHOICES(8),
                       labels=SLOTS, row=lambda ex, rng: dict(
                           question=ex["question"], **{f"o{i}": t for i, t in enumerate(ex["choices"]["text"])},
                           label=ex["choices"]["label"].index(ex["answerKey"]))),
    "gsm8k": dict(paper="GSM8K", hub=("openai/gsm8k", "main"), splits=("train", "test"), template=QA, labels=None,
                  gen=200, row=lambda ex, rng: dict(question=ex["question"], answer=ex["answer"])),
    "gsm8ks": dict(paper="GSM8Ks", hub=("apple/GSM-Symbolic", "main"), splits=(None, "test"), template=QA,
                   labels=None, gen=200, row=lambda ex, rng: dict(question=ex["question"], answer=ex["answer"])),
    "hmath_algebra": dict(paper="HMathA", hub=("EleutherAI/hendrycks_math", "algebra"), splits=("train", "test"),
                          template=QA, labels=None, gen=400,
                          row=lambda ex, rng: dict(question=ex["problem"], answer=ex["solution"])),
    "sciqa": dict(paper="SciQ", hub=("allenai/sciq", None), splits=("train", "validation"), template=QA, labels=None,
                  gen=200, row=lambda ex, rng: dict(question=ex["question"],
                                                    answer=f"{ex['support']}\n#### {ex['correct_answer']}")),
}


def task_table() -> str:
    """--list-tasks: the table above, one line per task."""
    lines = ["| task | paper | kind | Hub id (config) | pool -> eval split | template | labels |", "|---" * 7 + "|"]
    for name, t in TASKS.items():
        hub = t["hub"][0] + (f" ({t['hub'][1]})" if t["hub"][1] else "")
        pool, ev = t["splits"]
        splits = f"{ev}, eval only" if pool is None else f"{pool} -> {ev or 'last 500 of ' + pool}"
        kind = "single-token" if t["labels"] else f"multi-token, {t['gen']} new tokens"
        labels = " ".join(t["labels"]) if t["labels"] else "answer text + EOS"
        lines.append(f"| {name} | {t['paper']} | {kind} | {hub} | {splits} | {t['template']!r} | {labels} |")
    return "\n".join(lines)


def make_prompt(x: str, demos=()) -> str:
    """Demos are 'question+answer', joined by a blank line; one more precedes the query X."""
    return "".join(d + "\n\n" for d in demos) + x


def answer_text(labels, y) -> str:
    return labels[y] if labels else y  # single-token: the label string; multi-token: the answer itself


def load_task(cfg: Config, name: str, labels, path=None):
    """Returns (pool, eval_set), lists of (X, y): the filled template and the label index or answer text.
    Each split is shuffled with seed 42 (the official code's datasets .shuffle(seed=42)) before the
    first --pool-size (pool) and --eval-size (eval) records are kept."""
    task = TASKS[name]
    pool_split, eval_split = task["splits"]
    if path:
        recs = [x for _, x in shuffled(examples(task, list(enumerate(read_file(path), 1)), labels, path))]
        n_eval = len(recs) if pool_split is None else min(cfg.eval_size, len(recs) // 2)
        if pool_split and n_eval < cfg.eval_size:
            warn(f"{path} has {len(recs)} usable rows: its last {n_eval} (at most half) are the eval set, "
                 f"not --eval-size {cfg.eval_size}")
        pool, ev = recs[:len(recs) - n_eval], recs[len(recs) - n_eval:]
    else:
        pool = hub_records(task, name, pool_split, labels) if pool_split else []
        ev = hub_records(task, name, eval_split, labels) if eval_split else pool[len(pool) - cfg.eval_size:]
        pool = pool if eval_split else pool[:len(pool) - cfg.eval_size]
    return pool[:cfg.pool_size], ev[:cfg.eval_size]


def shuffled(recs: list) -> list:
    """(row number, record) pairs in datasets' .shuffle(seed=42) order."""
    return [(i + 1, recs[i]) for i in np.random.default_rng(42).permutation(len(recs))]


def hub_records(task: dict, name: str, split: str, labels) -> list:
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(task["hub"][0], task["hub"][1], split=split)
    except Exception as e:
        raise IA2Error(f"cannot load {task['hub'][0]} for task {name} from the Hub ({str(e).splitlines()[0]}); "
                       f"offline, pass a local copy: --data {name}=FILE")
    return examples(task, shuffled(ds.to_list()), labels, f"{task['hub'][0]} {split}", hub=True)


def read_file(path: str) -> list:
    """The records of a .csv, .tsv, .jsonl (or .json) or .parquet file, as dicts."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".tsv", ".jsonl", ".json", ".parquet"):
        raise IA2Error(f"--data {path}: use a .csv, .tsv, .jsonl, .json or .parquet file")
    if not os.path.isfile(path):
        raise IA2Error(f"data file not found: {path}")
    try:
        if ext == ".parquet":
            import pyarrow.parquet  # installed with datasets
            recs = pyarrow.parquet.read_table(path).to_pylist()
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:
                if ext in (".csv", ".tsv"):
                    recs = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
                    for r in recs:  # as in the Hub's files, a label of digits is a number
                        if (r.get("label") or "").strip().isdigit():
                            r["label"] = int(r["label"])
                else:
                    text = f.read()
                    recs = json.loads(text) if text.lstrip().startswith("[") else [
                        json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, csv.Error) as e:  # ValueError: JSON, Unicode and Arrow errors
        raise IA2Error(f"cannot read {path}: {str(e).splitlines()[0]}")
    if not recs or not all(isinstance(r, dict) for r in recs):
        raise IA2Error(f"{path}: no records (a header row and one row per example, or one JSON object per line)")
    return recs


ALIASES = {"text": ("sentence", "review"), "label": ("sentiment",)}  # everyday names of the same columns


def examples(task: dict, recs: list, labels, where: str, hub=False) -> list:
    """(row number, record) pairs -> (X, y) pairs. A record holds either the Hub dataset's own columns,
    converted by the task's `row` (dropping what the task drops), or the template's fields plus label or
    answer (ALIASES allowed). Empty cells and unknown labels stop the run, naming the row."""
    if not recs:
        return []
    need = [f for _, f, _, _ in string.Formatter().parse(task["template"]) if f] + ["label" if labels else "answer"]
    find = lambda rec, f: next((c for c in (f,) + ALIASES.get(f, ()) if c in rec), f)
    first = recs[0][1]
    hub = hub or hub_format(task, first)
    if not hub and not all(find(first, f) in first for f in need):
        raise IA2Error(f"{where} needs columns {', '.join(map(repr, need[:-1]))} and {need[-1]!r} (or those of "
                       f"{task['hub'][0]}), found {', '.join(map(repr, first))}")
    rng, out = np.random.RandomState(42), []  # rng: sciq_remap's option order
    for i, rec in recs:
        rec = task["row"](rec, rng) if hub else {f: rec.get(find(rec, f)) for f in need}
        if rec is None:
            continue  # a record the task drops (e.g. FinS neutral)
        for f in need[:-1]:
            if not isinstance(rec[f], str) or not rec[f].strip():
                raise IA2Error(f"{where}, row {i}: {f!r} is empty or missing ({rec[f]!r})")
        y = label_index(rec["label"], labels, f"{where}, row {i}") if labels else rec["answer"]
        if not labels and (not isinstance(y, str) or not y.strip()):
            raise IA2Error(f"{where}, row {i}: the answer must be text, got {y!r}")
        out.append((task["template"].format(**rec), y))
    if labels and len({y for _, y in out}) == 1:
        warn(f"{where}: every example has label {labels[out[0][1]]!r}; accuracy cannot tell a method from "
             "always answering it")
    return out


def hub_format(task: dict, rec: dict) -> bool:
    try:
        task["row"](rec, np.random.RandomState(0))
        return True
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def label_index(v, labels: list, where: str) -> int:
    """A label cell: one of the label strings (surrounding spaces ignored) or its index 0..n-1."""
    s = str(v).strip()
    for i, label in enumerate(labels):
        if s == label.strip():
            return i
    if isinstance(v, (bool, float)) and float(v).is_integer():
        s = str(int(v))  # True, 1.0 -> "1"
    if s.isdigit() and int(s) < len(labels):
        return int(s)
    raise IA2Error(f"{where}: label {v!r} is neither a label string ({' '.join(map(repr, labels))}) nor an index "
                   f"0..{len(labels) - 1}" + (" (the cell is empty)" if not s or s in ("None", "nan") else ""))


def warn(message: str):
    print(f"ia2.py: warning: {message}", file=sys.stderr)


def few_shot_split(pool: list, n: int, seed: int):
    """Run r: permute the pool with RandomState(r); train = first N, dev = next min(48, N//2), rest = demos."""
    perm = np.random.RandomState(seed).permutation(len(pool))
    n_dev = min(48, n // 2)
    pick = lambda idx: [pool[i] for i in idx]
    return pick(perm[:n]), pick(perm[n:n + n_dev]), pick(perm[n + n_dev:])


def encode(tok, prompt: str) -> list:
    return tok(prompt).input_ids  # with the tokenizer's BOS, if it adds one (Llama, Gemma do; Qwen does not)


def target_ids(tok, labels, y) -> list:
    """The ground-truth SFT target: the label's one token, or the answer's tokens + EOS,
    tokenised apart from the prompt (official code)."""
    ids = tok(answer_text(labels, y), add_special_tokens=False).input_ids
    return ids if labels else ids + [tok.eos_token_id]


def training_items(tok, labels, train, dev, seed):
    """Each training query sees the other N-1 examples as demos, in a random order of its own;
    dev example j reuses training example j's demos (official code)."""
    rng = np.random.RandomState(seed)
    shots = [x + answer_text(labels, y) for x, y in train]
    demo_sets = []
    for i in range(len(train)):
        others = [shots[j] for j in range(len(train)) if j != i]
        demo_sets.append([others[k] for k in rng.permutation(len(others))])
    items = lambda rows: [dict(x=encode(tok, x), y=y, y_ids=target_ids(tok, labels, y),
                               icl=encode(tok, make_prompt(x, demo_sets[j]))) for j, (x, y) in enumerate(rows)]
    return items(train), items(dev)


def icl_eval_prompts(tok, labels, demos_pool, eval_set, k, seed):
    """ICL evaluation: k = N-1 demos per query drawn from the held-out rest of the pool. For an OOD
    task the pool and `labels` are the source task's, the queries the OOD task's (§5)."""
    rng = np.random.RandomState(seed)
    out = []
    for x, _ in eval_set:
        demos = [demos_pool[i][0] + answer_text(labels, demos_pool[i][1])
                 for i in rng.choice(len(demos_pool), k, replace=False)]
        out.append(encode(tok, make_prompt(x, demos)))
    return out


# -----------------------------------------------------------------------------
# 2. LoRA, by hand: h = W0 x + (α/r) B A x, with W0 frozen (§5: r=8, α=8 on q, k, o)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / r, True
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))   # fp32
        self.B = nn.Parameter(torch.empty(base.out_features, r, device=base.weight.device))  # fp32
        self.reset()

    def reset(self):
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # PEFT's default, used by the official code
        nn.init.zeros_(self.B)  # B = 0, so ΔW = BA = 0 and the model starts as the base model

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (self.scale * (x.float() @ self.A.T @ self.B.T)).to(y.dtype)


def add_lora(model, targets=("q_proj", "k_proj", "o_proj"), r=8, alpha=8):
    """Freeze the model and wrap every targeted nn.Linear in a LoRALinear."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        for t in targets:
            if isinstance(getattr(module, t, None), nn.Linear):
                setattr(module, t, LoRALinear(getattr(module, t), r, alpha))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA r={r} α={alpha} on {','.join(targets)}: {n:,} trainable parameters")
    return model


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state(model) -> dict:
    """A detached copy of the adapter: {module name: (A, B)}."""
    return {n: (m.A.detach().clone(), m.B.detach().clone()) for n, m in lora_modules(model).items()}


def load_lora_state(model, state: dict):
    with torch.no_grad():
        for n, m in lora_modules(model).items():
            m.A.copy_(state[n][0]), m.B.copy_(state[n][1])


@contextlib.contextmanager
def lora_disabled(model):
    """Run the base model: the teacher, zero-shot and ICL."""
    mods = lora_modules(model).values()
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def save_adapter(model, folder: str, cfg: Config):
    """PEFT layout, so that peft.PeftModel.from_pretrained(base_model, folder) loads it."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for n, m in lora_modules(model).items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = m.A.detach().cpu().contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = m.B.detach().cpu().contiguous()
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    conf = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=cfg.model, r=cfg.rank,
                lora_alpha=cfg.rank, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                target_modules=["q_proj", "k_proj", "o_proj"], init_lora_weights=True, inference_mode=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(conf, f, indent=2)


def load_adapter(model, folder: str):
    """The inverse of save_adapter: copy a saved adapter into the model's LoRALinear modules."""
    from safetensors.torch import load_file
    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise IA2Error(f"no adapter at {path}")
    t = load_file(path)
    load_lora_state(model, {n: (t[f"base_model.model.{n}.lora_A.weight"], t[f"base_model.model.{n}.lora_B.weight"])
                            for n in lora_modules(model)})


# -----------------------------------------------------------------------------
# 3. Activation capture: the self-attention output of every decoder layer (§2)


def decoder_layers(model):
    layers = model.model.layers
    assert len(layers) == model.config.num_hidden_layers, "unexpected decoder layout"
    return layers


@contextlib.contextmanager
def capture_activations(model):
    """Inside the block, each forward appends one (B, R, D) tensor per layer: the output of
    layers[l].self_attn, i.e. o_proj's output before the residual add (not hidden_states)."""
    acts = []
    keep = lambda module, args, out: acts.append(out[0] if isinstance(out, tuple) else out)
    handles = [layer.self_attn.register_forward_hook(keep) for layer in decoder_layers(model)]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


def pad_right(seqs: list, pad_id: int, device):
    """Right padding: under causal attention the pads come after every real token, so they never
    change them, and every position keeps its index."""
    R = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), R), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), R), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids.to(device), mask.to(device)


def lm_logits(model, h: torch.Tensor) -> torch.Tensor:
    """fp32 logits from final hidden states; the LM head runs only where it is read (V is large)."""
    logits = model.lm_head(h).float()
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma
    return cap * torch.tanh(logits / cap) if cap else logits


def forward(model, prompts: list, targets=None, capture=False, logits=True):
    """Teacher-forced forward over a right-padded batch of X∘target. Position d+t, with d = len(X)-1
    the last prompt token, predicts target[t] for t = 0..T-1 (T: the longest target; without
    targets T=1 and only X is read). The last target token is never read, so it is not fed.
    Returns fp32 logits (B, T, V), or None, and with capture the self-attention outputs (B, L, T, D)."""
    T = max(map(len, targets)) if targets else 1
    seqs = [x + list(y[:-1]) for x, y in zip(prompts, targets)] if targets else prompts
    ids, mask = pad_right(seqs, model.config.pad_token_id or 0, model.device)
    d = torch.tensor([len(x) - 1 for x in prompts])
    at = (d[:, None] + torch.arange(T)).clamp(max=ids.shape[1] - 1).to(model.device)  # (B, T): d+t
    rows = torch.arange(len(seqs), device=model.device)[:, None]
    with capture_activations(model) if capture else contextlib.nullcontext() as acts:
        h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return (lm_logits(model, h[rows, at]) if logits else None,
            torch.stack([a[rows, at] for a in acts], 1) if capture else None)


# -----------------------------------------------------------------------------
# 4. The teacher: the base model reading the N-1 demos, then the query (§3, §4)


@torch.no_grad()
def generate(model, prompts: list, max_new: int, eos_id: int, stop=None, capture=False, scores=False):
    """Greedy decoding of a batch with a KV cache; the teacher rollout (§3) and the evaluation (§5).
    Left padding puts every prompt's last token in the last column, and position_ids = cumsum(mask)-1
    give each row the positions it has alone (tested against batch size 1). Each step feeds one token
    per row. A row ends after emitting EOS (kept, with its activations, as in the official rollout)
    or once stop(tokens) is true. Returns per row: tokens (T',), acts (L, T', D) in the base dtype and
    logp (T', V) fp32 (the step's log-probabilities), both on the CPU. The official rollout re-runs
    the whole sequence each step; a test checks that tokens and activations are the same."""
    B, R, dev = len(prompts), max(map(len, prompts)), model.device
    ids = torch.full((B, R), model.config.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, R - len(p):], mask[i, R - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos, cache = (mask.cumsum(1) - 1).clamp(min=0), None
    tokens, done, acts_t, logp_t = [[] for _ in range(B)], [False] * B, [], []
    for _ in range(max_new):
        with capture_activations(model) if capture else contextlib.nullcontext() as acts:
            out = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                              use_cache=True)
        cache, logits = out.past_key_values, lm_logits(model, out.last_hidden_state[:, -1])  # (B, V)
        if capture:
            acts_t.append(torch.stack([a[:, -1] for a in acts], 1).cpu())  # (B, L, D) at this step's position
        if scores:
            logp_t.append(logits.log_softmax(-1).cpu())
        nxt = logits.argmax(-1)
        for i, y in enumerate(nxt.tolist()):
            if not done[i]:
                tokens[i].append(y)
                done[i] = y == eos_id or (stop is not None and stop(tokens[i]))
        if all(done):
            break
        ids, pos, mask = nxt[:, None], pos[:, -1:] + 1, torch.cat([mask, mask.new_ones(B, 1)], 1)
    return [dict(tokens=tk, acts=torch.stack([a[i] for a in acts_t[:len(tk)]], 1) if capture else None,
                 logp=torch.stack([p[i] for p in logp_t[:len(tk)]]) if scores else None)
            for i, tk in enumerate(tokens)]


def teacher(model, items: list, T: int, eos_id: int, scores=False, bs: int = 4):
    """Adds to each item Ŷ (y_icl, T' <= T tokens), A_ICL (L, T', D) at d_icl+t, and for kd the
    teacher's log-probabilities (T', V): one greedy rollout of the base model on I∘X, with no "\n\n"
    stop (official code). Single-token tasks: T=1, one forward. Activations stay in the base dtype
    on the CPU: (L·T'·D) numbers per example (README, Memory)."""
    with lora_disabled(model):
        for i in range(0, len(items), bs):
            batch = items[i:i + bs]
            for it, o in zip(batch, generate(model, [it["icl"] for it in batch], T, eos_id, capture=True,
                                             scores=scores)):
                it.update(y_icl=o["tokens"], A_icl=o["acts"], logp_icl=o["logp"])
    return items


# -----------------------------------------------------------------------------
# 5. The losses (Eq. 2, Eq. 4, §6, Table 4), each averaged within an example, then over the batch


def ia2_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, T, D) student and teacher activations at the aligned positions, mask (B, T) the real ones.
    L_IA2 = L · mean((S - A_ICL)²) over (L, T', D): the per-layer MSE summed over layers (official
    code; Eq. 4 writes a norm)."""
    se = (student.float() - teacher.float()).pow(2).mean(-1) * mask[:, None]  # (B, L, T)
    per_layer_mse = se.sum(-1) / mask.sum(-1, keepdim=True)  # (B, L)
    return per_layer_mse.sum(1).mean()


def sft_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy (official code; Eq. 2 generates) of the target tokens (B, T),
    -100 where there is none, averaged over each example's tokens."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
    return (ce.sum(1) / (target != -100).sum(1)).mean()


def kd_loss(logits: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft labels (Table 4 "SFT (soft labels)"): KL(p_ICL,t ‖ p_student,t) summed over the whole
    vocabulary at each aligned position, averaged over positions. (B, T, V) logits and log-probs."""
    logq = logits.float().log_softmax(-1)
    kl = (teacher_logp.exp() * (teacher_logp - logq)).sum(-1)  # Σ_v p log(p/q), (B, T)
    return ((kl * mask).sum(1) / mask.sum(1)).mean()


def padded(xs: list, T: int) -> torch.Tensor:
    """Stack (..., T', k) tensors, zero-padded to T along their second-to-last dimension."""
    return torch.stack([F.pad(x, (0, 0, 0, T - x.shape[-2])) for x in xs])


def objective_loss(model, objective: str, batch: list, beta: float):
    """The student reads X∘target and is read at d_q+t. Objectives: sft (target: ground truth Y),
    sft_icl (Ŷ), ia2, ia2_plus_sft = (1-β)·L_IA2 + β·L_SFT(Ŷ) in one forward (official code's
    convex form), kd (Ŷ's positions, the teacher's distributions)."""
    targets = [it["y_ids"] if objective == "sft" else it["y_icl"] for it in batch]
    needs_acts = objective in ("ia2", "ia2_plus_sft")
    logits, acts = forward(model, [it["x"] for it in batch], targets, capture=needs_acts, logits=objective != "ia2")
    T, dev = max(map(len, targets)), model.device
    target = torch.tensor([y + [-100] * (T - len(y)) for y in targets], device=dev)
    if objective in ("sft", "sft_icl"):
        return sft_loss(logits, target)
    if objective == "kd":
        return kd_loss(logits, padded([it["logp_icl"] for it in batch], T).to(dev), target != -100)
    l_ia2 = ia2_loss(acts, padded([it["A_icl"] for it in batch], T).to(dev), target != -100)
    if objective == "ia2":
        return l_ia2
    return (1 - beta) * l_ia2 + beta * sft_loss(logits, target)


# -----------------------------------------------------------------------------
# 6. Training: Adam, constant lr, early stopping on the dev loss (§5, App. B)


@torch.no_grad()
def dev_loss(model, objective, dev, cfg):
    bs = min(cfg.batch_size, cfg.n_train)
    batches = [dev[i:i + bs] for i in range(0, len(dev), bs)]
    return sum(objective_loss(model, objective, b, cfg.beta).item() * len(b) for b in batches) / len(dev)


def train(model, objective: str, train_set: list, dev: list, cfg: Config, lr: float, seed: int, tag: str):
    """Adam (no weight decay, no schedule) on the LoRA parameters; one right-padded batch of
    min(4, N) examples per step; dev loss every 2 steps and at each epoch end; stop after
    `patience` checks without a new best, and restore the best adapter (the official code
    does not, see README). Returns the best dev loss and the steps taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)  # a fresh optimizer per phase, also for IA2 -> SFT
    rng, bs = np.random.RandomState(seed), min(cfg.batch_size, cfg.n_train)
    best, best_state, bad, step = math.inf, lora_state(model), 0, 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(train_set))
        for i in range(0, len(order), bs):
            loss = objective_loss(model, objective, [train_set[j] for j in order[i:i + bs]], cfg.beta)
            if not torch.isfinite(loss):
                raise IA2Error(f"{tag}: the training loss became {loss.item()} at step {step}; try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 2 and i + bs < len(order):
                continue  # check every 2 steps, and at each epoch's end
            d = dev_loss(model, objective, dev, cfg)
            if d < best:
                best, best_state, bad = d, lora_state(model), 0
            else:
                bad += 1
            print(f"[{tag}] ep {epoch} step {step} | loss {loss.item():.4f} | dev {d:.4f}{' *' if bad == 0 else ''}")
            if bad >= cfg.patience:
                break
        if bad >= cfg.patience:
            break
    if bad < cfg.patience:
        print(f"[{tag}] note: stopped by the --epochs {cfg.epochs} cap, not by early stopping" +
              (" (the dev loss was still falling)" if bad == 0 else ""))
    load_lora_state(model, best_state)
    return best, step


# -----------------------------------------------------------------------------
# 7. Evaluation (§5). Single-token tasks: one forward, the full-vocabulary softmax at the last
#    prompt token. Multi-token tasks: greedy generation, answer parsing, exact match.


@torch.no_grad()
def predict(model, seqs: list, label_ids: list, bs: int = 32):
    """Per example: the top-10 token ids and probabilities, and the probability of each label's token.
    Prompts are sorted by length so that batches carry little padding."""
    top_p, top_id, label_p = [None] * len(seqs), [None] * len(seqs), [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for k in tqdm(range(0, len(order), bs), desc="eval", leave=False, disable=None):  # bar on a terminal only
        idx = order[k:k + bs]
        probs = forward(model, [seqs[i] for i in idx])[0][:, 0].softmax(-1)
        p, ids = probs.topk(10, dim=-1)
        for j, i in enumerate(idx):
            top_p[i], top_id[i], label_p[i] = p[j].cpu(), ids[j].cpu(), probs[j, label_ids].cpu()
    return torch.stack(top_p).numpy(), torch.stack(top_id).numpy(), torch.stack(label_p).numpy()


def equal_mass_bins(conf: np.ndarray, n_bins: int = 15) -> list:
    """Indices of each bin: sort by confidence (stable), cut into n_bins bins of floor(n/n_bins)
    examples, the last taking the remainder (n=500: 14 x 33 + 38)."""
    n, order = len(conf), np.argsort(conf, kind="stable")
    size = max(n // n_bins, 1)
    starts = list(range(0, size * min(n_bins, n), size)) + [n]
    return [order[a:b] for a, b in zip(starts[:-1], starts[1:])]


def ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """The paper's ECE over equal-mass bins: Σ_b |b|/n · |acc_b - conf_b|."""
    return float(sum(len(b) / len(conf) * abs(correct[b].mean() - conf[b].mean())
                     for b in equal_mass_bins(conf, n_bins)))


def ece_equal_width(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """The common ECE (Naeini et al. 2015; Guo et al. 2017): bins ((m-1)/M, m/M], empty bins add 0."""
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for m in range(n_bins):
        sel = bins == m
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def metrics(pred, gold: np.ndarray, tok, labels: list) -> dict:
    """Top-1 accuracy: the argmax token over the whole vocabulary, decoded and stripped, equals the
    label string. Label accuracy: the true label's token is the most probable label token.
    ECE: the paper's (top-1 renormalised over the top 10, equal mass) and the equal-width one.
    predicted: % of examples whose top-1 token is each label, then % with any other token."""
    top_p, top_id, label_p = pred
    answer = top1_label(top_id, tok, labels)
    correct = (answer == gold).astype(float)
    return dict(accuracy=100 * correct.mean(),
                label_accuracy=100 * (label_p[np.arange(len(gold)), gold] >= label_p.max(-1)).mean(),
                ece=ece(top_p[:, 0] / top_p.sum(-1), correct),
                ece_equal_width=ece_equal_width(top_p[:, 0], correct),
                predicted=(100 * np.bincount(answer, minlength=len(labels) + 1) / len(gold)).tolist())


def top1_label(top_id: np.ndarray, tok, labels: list) -> np.ndarray:
    """Which label the top-1 token is (decoded, stripped), per example; len(labels) for any other token."""
    words = [tok.decode([int(i)]).strip() for i in top_id[:, 0]]
    index = {label.strip(): i for i, label in enumerate(labels)}
    return np.array([index.get(w, len(labels)) for w in words])


def boxed(text: str):
    """The content of the last \boxed{...}, nested braces included; None without one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: the generation was cut off


NUMBER = r"-?[\d,]*\.?\d+"


def clean_number(s: str):
    """'$1,234.50' -> '1234.5', '72.0' -> '72', '5.' -> '5'; None if there is no number."""
    found = re.findall(NUMBER, s.replace("$", ""))
    if not found:
        return None
    n = found[0].replace(",", "")
    return n.rstrip("0").rstrip(".") if "." in n else n


def parse_answer(task: str, text: str):
    """The final answer of a generation or of a ground-truth answer, parsed the same way.
    gsm8k, gsm8ks: \boxed{x}, '#### x', 'answer is x', 'Answer: x', else the last number; cleaned.
    hmath_algebra: the last \boxed{} (spaces removed). sciqa: the text after the last '####'."""
    if task == "sciqa":
        return text.split("####")[-1].strip()
    if task == "hmath_algebra":
        b = boxed(text)
        return None if b is None else "".join(b.split())
    b = boxed(text)
    if b is not None and clean_number(b) is not None:
        return clean_number(b)
    for pattern in (r"####\s*(.*)", r"answer is[:\s]*(.*)", r"Answer:\s*(.*)"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found and clean_number(found[-1]) is not None:
            return clean_number(found[-1])
    numbers = re.findall(NUMBER, text.replace("$", ""))
    return clean_number(numbers[-1]) if numbers else None


def answer_of(tok, ids: list) -> str:
    """A generation's text, cut at the first "\n\n"."""
    return tok.decode(ids, skip_special_tokens=True).split("\n\n")[0]


def generate_texts(model, tok, seqs: list, max_new: int, bs: int = 16) -> list:
    """Greedy continuations, stopped at EOS or at the first "\n\n" and cut there. Prompts are
    sorted by length so that batches carry little padding."""
    stop = lambda ids: "\n\n" in tok.decode(ids[-2:])  # "\n\n" may be one token or two
    texts, order = [None] * len(seqs), sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for k in tqdm(range(0, len(order), bs), desc="generate", leave=False, disable=None):
        idx = order[k:k + bs]
        for i, o in zip(idx, generate(model, [seqs[i] for i in idx], max_new, tok.eos_token_id, stop=stop)):
            texts[i] = answer_of(tok, o["tokens"])
    return texts


def generation_metrics(model, tok, ev: dict, seqs: list, max_new: int, show: int = 0, tag: str = "") -> dict:
    """Exact-match accuracy of the parsed answers; prints the first `show` generations."""
    texts = generate_texts(model, tok, seqs, max_new)
    pred = [parse_answer(ev["name"], t) for t in texts]
    gold = [parse_answer(ev["name"], y) for _, y in ev["eval_set"]]
    for i in range(min(show, len(texts))):
        print(f"[{tag}] example {i}: ...{texts[i][-160:]!r} -> {pred[i]!r} (gold {gold[i]!r})")
    return dict(accuracy=100 * float(np.mean([p is not None and p == g for p, g in zip(pred, gold)])))


# -----------------------------------------------------------------------------
# 8. The experiment: every method x lr x run, then the paper's lr selection (§5)


def hub_reachable() -> bool:
    """A 3-second look at the Hub, so that an offline machine fails at once instead of after minutes of retries."""
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
                                                      method="HEAD"), timeout=3)
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:  # no route, no name, refused, timed out
        return False
    return True


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "local folder" if os.path.isdir(name) else "not a local folder, and the Hub"
        raise IA2Error(f"cannot load model {name!r} ({where} said: {str(e).splitlines()[0]})"
                       + ("" if os.path.isdir(name) else "; offline, pass a local copy: --model FOLDER"))


def load_model(name: str, device, dtype):
    from transformers import AutoModelForCausalLM
    tok = load_tokenizer(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        raise IA2Error(f"cannot load model {name!r}: {str(e).splitlines()[0]}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    return tok, model


def label_tokens(tok, labels: list) -> list:
    """The token id of each label string, read at the last prompt token. Single-token tasks need
    exactly one token per label: the SFT target and top-1 accuracy both assume it."""
    ids = []
    for s in labels:
        t = tok(s, add_special_tokens=False).input_ids
        if len(t) != 1:
            raise IA2Error(f"label {s!r} is {len(t)} tokens for this tokenizer ({t}); single-token tasks need "
                           "one token per label: choose other --labels")
        ids += t
    if len(set(ids)) != len(ids):
        raise IA2Error(f"labels {labels} do not map to distinct tokens ({ids})")
    return ids


def setup(cfg: Config) -> dict:
    """Everything that can fail on the user's input fails here, before anything is written, and every
    check on the flags and the data comes before the model loads. Returns the source task's view
    (its pool, labels, eval set) and, in E["evals"], one per evaluated task."""
    check_flags(cfg)
    names = list(dict.fromkeys(cfg.eval_tasks or [cfg.task]))
    for name in [cfg.task] + names:
        if name not in TASKS:
            raise IA2Error(f"unknown task {name!r}; known: {', '.join(TASKS)} (--list-tasks)")
    if TASKS[cfg.task]["splits"][0] is None:
        raise IA2Error(f"{cfg.task} is an evaluation-only task (the paper trains on another task and evaluates "
                       f"on it OOD), e.g. --task {PAIRED.get(cfg.task, 'sst2')} --eval-tasks {cfg.task}")
    multi = TASKS[cfg.task]["labels"] is None
    if any((TASKS[n]["labels"] is None) != multi for n in names):
        raise IA2Error("--eval-tasks must be all single-token or all multi-token, like --task " + cfg.task)
    if cfg.labels and multi:
        raise IA2Error("--labels is for single-token tasks; multi-token tasks answer with text")
    if set(cfg.methods) - set(METHODS):
        raise IA2Error(f"unknown method(s) {sorted(set(cfg.methods) - set(METHODS))}; known: {' '.join(METHODS)}")
    tasks, files = list(dict.fromkeys([cfg.task] + names)), {}  # --data FILE or TASK=FILE ...
    for d in [cfg.data] if isinstance(cfg.data, str) else cfg.data or ():  # a str in run folders before issue 5
        name, path = d.split("=", 1) if d.split("=", 1)[0] in TASKS else (cfg.task, d)
        if name not in tasks:
            raise IA2Error(f"--data {d}: {name} is neither --task nor one of --eval-tasks")
        files[name] = path
    check_hub(cfg, tasks, files)
    labels = {n: task_labels(cfg, n) for n in tasks}
    data = {n: load_task(cfg, n, labels[n], files.get(n)) for n in tasks}
    need = cfg.n_train + min(48, cfg.n_train // 2) + cfg.n_train - 1
    if len(data[cfg.task][0]) < need:
        raise IA2Error(f"--n-train {cfg.n_train} needs {need} pool examples (N train, min(48, N//2) dev, N-1 ICL "
                       f"demos), the data has {len(data[cfg.task][0])}")
    device, dtype = pick_device(cfg.device)
    tok = load_tokenizer(cfg.model)
    if multi and tok.eos_token_id is None:
        raise IA2Error(f"{cfg.model}'s tokenizer has no EOS token; multi-token targets end with one")
    label_ids = {n: label_tokens(tok, labels[n]) if labels[n] else None for n in tasks}
    tok, model = load_model(cfg.model, device, dtype)
    add_lora(model, r=cfg.rank, alpha=cfg.rank)
    views = {n: dict(name=n, task=TASKS[n], labels=labels[n], label_ids=label_ids[n], pool=data[n][0],
                     eval_set=data[n][1], queries=[encode(tok, x) for x, _ in data[n][1]],
                     gold=np.array([y for _, y in data[n][1]], dtype=int if labels[n] else object)) for n in tasks}
    return dict(tok=tok, model=model, **views[cfg.task], evals=[views[n] for n in names])


PAIRED = {"poems": "sst2", "bbcnews": "agnews", "qasc_remap": "sciq_remap", "gsm8ks": "gsm8k"}  # OOD pairings (§5)


def task_labels(cfg: Config, name: str):
    """The task's label strings, or --labels in their place; None for multi-token tasks."""
    labels = TASKS[name]["labels"]
    if labels and cfg.labels and len(cfg.labels) != len(labels):
        raise IA2Error(f"--labels {' '.join(cfg.labels)}: task {name} has {len(labels)} labels, not {len(cfg.labels)}")
    return list(cfg.labels) if labels and cfg.labels else labels


def check_hub(cfg: Config, tasks: list, files: dict):
    """Offline, fail in seconds with what to pass instead, if the model or some task's data needs the Hub."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "no", "")
    missing = [n for n in tasks if n not in files]
    if offline or not (missing or not os.path.isdir(cfg.model)) or hub_reachable():
        return
    data = "FILE" if tasks == [cfg.task] else " ".join(f"{n}={files.get(n, 'FILE')}" for n in tasks)
    need = ([] if os.path.isdir(cfg.model) else ["--model FOLDER (a local copy of the model)"]) + \
        ([f"--data {data}"] if missing else [])
    raise IA2Error(f"the Hugging Face Hub cannot be reached: pass {' and '.join(need)}, or set HF_HUB_OFFLINE=1 "
                   "HF_DATASETS_OFFLINE=1 to use what your Hub cache already holds")


def evaluate(cfg: Config, E: dict, ev: dict, seqs: list, show: int = 0, tag: str = "") -> dict:
    """Prompts `seqs` of eval task `ev` through the model as it is (base or adapter)."""
    if ev["labels"]:
        return metrics(predict(E["model"], seqs, ev["label_ids"]), ev["gold"], E["tok"], ev["labels"])
    return generation_metrics(E["model"], E["tok"], ev, seqs, cfg.max_new_tokens or ev["task"]["gen"], show, tag)


def one_run(cfg: Config, E: dict, r: int, records: dict, timing: dict, tmp: str):
    """Run r: draw N examples, compute the teacher once, then train every method and evaluate it
    on every eval task."""
    model, tok, s, tick = E["model"], E["tok"], cfg.seed + r, time.time()
    train_rows, dev_rows, rest = few_shot_split(E["pool"], cfg.n_train, s)
    tr, dv = training_items(tok, E["labels"], train_rows, dev_rows, s)
    if set(cfg.methods) & {"sft_icl", "ia2", "ia2_then_sft", "ia2_plus_sft", "kd"}:
        T = 1 if E["labels"] else cfg.max_new_tokens or 200  # §3: T=1 single-token, G=200 multi-token
        teacher(model, tr + dv, T, tok.eos_token_id, scores="kd" in cfg.methods, bs=cfg.batch_size)
        timing["teacher"] += time.time() - tick
        if E["labels"]:
            ok = sum(it["y_icl"][0] == it["y_ids"][0] for it in tr)
        else:
            ok = sum(parse_answer(E["name"], answer_of(tok, it["y_icl"])) == parse_answer(E["name"], it["y"])
                     for it in tr)
        T_mean = float(np.mean([len(it["y_icl"]) for it in tr + dv]))
        print(f"[run {r}] teacher: {T_mean:.0f} token{'s' * (T_mean != 1)} per rollout; "
              f"ICL answers on the {len(tr)} training examples: {ok}/{len(tr)} correct")
    for ev in E["evals"] if "icl" in cfg.methods else []:
        tick = time.time()
        prompts = icl_eval_prompts(tok, E["labels"], rest, ev["eval_set"], cfg.n_train - 1, s)
        with lora_disabled(model):
            rec = evaluate(cfg, E, ev, prompts, show=2 * (r == 0), tag=f"icl run {r} on {ev['name']}")
        records[ev["name"]]["icl"].setdefault(None, []).append(dict(run=r, **rec))
        timing[f"eval/{ev['name']}/icl"] += time.time() - tick
    for lr in cfg.lr:
        ia2_state = None
        for m in [m for m in TRAINED if m in cfg.methods]:
            tick, tag = time.time(), f"{m} lr={lr:g} run {r}"
            set_seed(s)
            for mod in lora_modules(model).values():
                mod.reset()
            if m == "ia2_then_sft":  # continue the IA2 adapter of the same (lr, run) with SFT
                if ia2_state is None:
                    train(model, "ia2", tr, dv, cfg, lr, s, tag + " (ia2 phase)")
                else:
                    load_lora_state(model, ia2_state)
            best, steps = train(model, "sft" if m == "ia2_then_sft" else m, tr, dv, cfg, lr, s, tag)
            if m == "ia2":
                ia2_state = lora_state(model)
            timing[f"train/{m}"] += time.time() - tick
            for ev in E["evals"]:
                tick = time.time()
                rec = dict(run=r, **evaluate(cfg, E, ev, ev["queries"], show=2 * (r == 0 and lr == cfg.lr[0]),
                                             tag=f"{tag} on {ev['name']}"), dev_loss=best, steps=steps)
                records[ev["name"]][m].setdefault(lr, []).append(rec)
                timing[f"eval/{ev['name']}/{m}"] += time.time() - tick
                print(f"[{tag}] {ev['name']}: acc {rec['accuracy']:.1f}" +
                      (f" | ece {rec['ece']:.3f}" if "ece" in rec else "") + f" | best dev {best:.4f} | {steps} steps")
            save_adapter(model, os.path.join(tmp, "adapters", m, f"lr{lr:g}", f"run{r}"), cfg)
            if r == 0 and lr == cfg.lr[0] and m == next(m for m in TRAINED if m in cfg.methods):
                print(estimate(cfg, timing))


def estimate(cfg: Config, timing: dict) -> str:
    """After the first adapter: its cost times the adapters to come, plus the per-run costs (teacher, ICL)."""
    trained = [m for m in TRAINED if m in cfg.methods]
    adapter = sum(v for k, v in timing.items() if k.startswith(("train/", "eval/")) and not k.endswith(
        ("/icl", "/zero_shot")))
    per_run = timing["teacher"] + sum(v for k, v in timing.items() if k.endswith("/icl"))
    left = adapter * (cfg.runs * len(cfg.lr) * len(trained) - 1) + per_run * (cfg.runs - 1)
    return (f"estimate: the first adapter took {adapter:.0f} s (training and evaluation); the rest should take about "
            f"{f'{left:.0f} s' if left < 120 else f'{left / 60:.0f} min'} more here (early stopping makes adapters differ)")


def summarize(records: dict) -> dict:
    """Mean and population std (ddof=0) over runs for each lr; the lr is chosen, as in the paper, by
    the best mean top-1 accuracy on the eval set. The lr with the lowest mean dev loss is reported too.
    predicted: the mean % per answer (labels, then other tokens); one_answer_runs: runs in which every
    example got the same answer."""
    out = {}
    for m, by_lr in ((m, by_lr) for m, by_lr in records.items() if by_lr):
        keys = [k for k in METRICS if k in next(iter(by_lr.values()))[0]]
        stats = lambda runs: dict(runs=runs, mean={k: float(np.mean([x[k] for x in runs])) for k in keys},
                                  std={k: float(np.std([x[k] for x in runs])) for k in keys},
                                  **({} if "predicted" not in runs[0] else dict(
                                      predicted=np.mean([x["predicted"] for x in runs], 0).tolist(),
                                      one_answer_runs=sum(max(x["predicted"]) == 100 for x in runs))))
        rows = {lr: stats(runs) for lr, runs in by_lr.items()}
        if m not in TRAINED:
            out[m] = dict(lr=None, **rows[None])
            continue
        lr_eval = max(rows, key=lambda lr: rows[lr]["mean"]["accuracy"])
        lr_dev = min(rows, key=lambda lr: np.mean([x["dev_loss"] for x in by_lr[lr]]))
        out[m] = dict(rows[lr_eval], lr=lr_eval, lr_dev_selected=lr_dev,
                      dev_selected=dict(mean=rows[lr_dev]["mean"], std=rows[lr_dev]["std"]),
                      by_lr={f"{lr:g}": row for lr, row in rows.items()})
        del out[m]["runs"]
    return out


def majority(labels: list, gold: np.ndarray) -> dict:
    """The accuracy of always answering the eval set's most frequent label: the bar a method must clear."""
    counts = np.bincount(gold, minlength=len(labels))
    return dict(label=labels[counts.argmax()], accuracy=float(100 * counts.max() / len(gold)))


def table(results: dict, labels, maj=None) -> str:
    """One eval task's table; single-token tasks also get the majority-class row and what each method
    answers (a method giving one answer to every example in some run is marked)."""
    pm = lambda r, k, scale="{:.1f}": (f"{scale.format(r['mean'][k])} ± {scale.format(r['std'][k])}"
                                       if k in r["mean"] else "–")
    answers = "/".join(labels + ["other"]) if labels else None
    lines = ["| method | lr | accuracy | label acc. | ECE | ECE (equal width) | lr (dev-selected) | accuracy "
             "(dev-selected) |" + (f" answers {answers} (%) |" if labels else ""), "|---" * (8 + bool(labels)) + "|"]
    if maj:
        lines.append(f"| majority class (always {maj['label']!r}) | – | {maj['accuracy']:.1f} | {maj['accuracy']:.1f} "
                     "| – | – | – | – | " + "/".join("100" if lab == maj["label"] else "0" for lab in labels) + "/0 |")
    for m in (m for m in METHODS if m in results):
        r = results[m]
        dev = ([f"{r['lr_dev_selected']:g}", pm(r["dev_selected"], "accuracy")] if r["lr"] is not None
               else ["–", "–"])
        cells = ["", m, "–" if r["lr"] is None else f"{r['lr']:g}", pm(r, "accuracy"), pm(r, "label_accuracy"),
                 pm(r, "ece", "{:.3f}"), pm(r, "ece_equal_width", "{:.3f}"), *dev]
        if labels:
            runs = len(r["by_lr"][f"{r['lr']:g}"]["runs"]) if r["lr"] is not None else len(r["runs"])
            cells.append("/".join(f"{p:.0f}" for p in r["predicted"]) + (
                f" **one answer in {r['one_answer_runs']}/{runs} run{'s' * (runs > 1)}**" if r["one_answer_runs"]
                else ""))
        lines.append(" | ".join(cells + [""]).strip())
    note = ("top-1 accuracy and label accuracy in %, ECE as a fraction" if labels else
            "accuracy: exact match of the parsed answer, in %")
    return "\n".join(lines) + (f"\n\n{note}; mean ± std over runs. lr: selected on the eval set by mean accuracy, "
                               "as the paper does; lr (dev-selected): lowest mean dev loss." + (
                                   " answers: how often the top-1 token is each label or another token, mean over "
                                   "runs." if labels else ""))


def tables(cfg: Config, results: dict, E: dict) -> str:
    return "\n\n".join(f"## {cfg.task} -> {ev['name']}"
                        f"{'' if ev['name'] == cfg.task else ' (OOD, ICL demos from ' + cfg.task + ')'}\n\n"
                        f"{table(results[ev['name']], ev['labels'], ev['labels'] and majority(ev['labels'], ev['gold']))}"
                        for ev in E["evals"])


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def plan(cfg: Config, E: dict) -> str:
    trained = [m for m in TRAINED if m in cfg.methods]
    n = cfg.runs * len(cfg.lr) * len(trained)
    evals = ", ".join(f"{len(ev['eval_set'])} {ev['name']}" for ev in E["evals"])
    return (f"plan: {plural(cfg.runs, 'run')} x {plural(len(cfg.lr), 'lr')} x {plural(len(trained), 'trained method')}"
            f" = {plural(n, 'adapter')} (at most {cfg.epochs} epochs each), evaluated on {evals} eval examples, "
            f"as are zero-shot (once) and ICL (once per run)")


def run_experiment(cfg: Config) -> dict:
    t0 = time.time()
    out = cfg.out or os.path.join("runs", f"{cfg.task}-{os.path.basename(cfg.model.rstrip('/'))}-n{cfg.n_train}"
                                          f"-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out):
        raise IA2Error(f"output folder {out} exists; choose another --out")
    E, tmp = setup(cfg), out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    records = {ev["name"]: {m: {} for m in cfg.methods} for ev in E["evals"]}  # eval task -> method -> lr
    timing = collections.defaultdict(float, load=time.time() - t0)  # seconds per phase, summed over runs
    print(plan(cfg, E))
    try:
        for ev in E["evals"] if "zero_shot" in cfg.methods else []:
            tick = time.time()
            with lora_disabled(E["model"]):
                rec = evaluate(cfg, E, ev, ev["queries"], show=2, tag=f"zero_shot on {ev['name']}")
            records[ev["name"]]["zero_shot"][None] = [dict(run=0, **rec)]
            timing[f"eval/{ev['name']}/zero_shot"] = time.time() - tick
        for r in range(cfg.runs):
            one_run(cfg, E, r, records, timing, tmp)
    except KeyboardInterrupt:
        timing["total"] = time.time() - t0
        write_outputs(cfg, E, tmp, {n: summarize(rec) for n, rec in records.items()}, timing, interrupted=True)
        print(f"ia2.py: interrupted; the adapters and results finished so far are in {tmp}/", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # an error: no half-written output
        raise
    results = {name: summarize(rec) for name, rec in records.items()}
    timing["total"] = time.time() - t0
    write_outputs(cfg, E, tmp, results, timing)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(tmp, out)
    print("\n" + tables(cfg, results, E) + f"\n\nwritten to {out}/ in {timing['total']:.0f} s")
    return results


def write_outputs(cfg: Config, E: dict, folder: str, results: dict, timing: dict, interrupted=False):
    """config.json; results.json with `methods` (the --task eval set, if evaluated) and `ood` (the others)."""
    import transformers
    model = E["model"]
    meta = dict(config=dataclasses.asdict(cfg), labels=E["labels"], label_token_ids=E["label_ids"],
                template=E["task"]["template"], model_class=type(model).__name__,
                layers=model.config.num_hidden_layers, device=str(model.device), dtype=str(model.dtype),
                pool_size=len(E["pool"]), eval_size={ev["name"]: len(ev["eval_set"]) for ev in E["evals"]},
                versions=dict(torch=torch.__version__, transformers=transformers.__version__))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(dict(**({"methods": results[cfg.task]} if cfg.task in results else {}),
                       ood={n: r for n, r in results.items() if n != cfg.task}, timing_s=timing,
                       majority={ev["name"]: majority(ev["labels"], ev["gold"]) for ev in E["evals"] if ev["labels"]},
                       selection="lr selected on each eval set by mean accuracy (paper); dev_selected: lowest "
                                 "mean dev loss", **({"interrupted": True} if interrupted else {})), f, indent=2)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(f"# {cfg.task}, {cfg.model}, N={cfg.n_train}, {plural(cfg.runs, 'run')}"
                f"{' (interrupted: the runs finished so far)' if interrupted else ''}\n\n{tables(cfg, results, E)}\n")


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.list_tasks:
        print(task_table())
        return
    try:
        run_experiment(cfg)
    except IA2Error as e:
        print(f"ia2.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
