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

METHODS = ("zero_shot", "icl", "sft", "sft_icl", "ia2", "ia2_then_sft", "ia2_then_sft_icl", "ia2_plus_sft", "kd")
TRAINED = METHODS[2:]
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
    beta: tuple = arg((0.1, 0.5, 0.7, 0.9), "β grid of ia2_plus_sft, (1-β)·L_IA2 + β·L_SFT(Ŷ): like the official code, "
                      "selected jointly with the lr by mean eval accuracy (paper: Qwen 0.1 0.5 0.7 0.9, Llama 0.001 "
                      "0.01 0.05 0.5)", (lambda v: 0 <= v <= 1, "in [0, 1]"))
    eval_size: int = arg(500, "evaluation examples, never trained on (paper: 500)", AT_LEAST(1))
    pool_size: int = arg(2000, "training pool the N examples, dev set and ICL demos are drawn from (paper: 2000)",
                          AT_LEAST(1))
    epochs: int = arg(50, "maximum epochs (paper: 50)", AT_LEAST(1))
    patience: int = arg(5, "stop after this many dev checks without improvement; a check every 2 steps (paper: 5)",
                        AT_LEAST(1))
    batch_size: int = arg(4, "examples per optimizer step, min(this, N) (paper: 4, by gradient accumulation)",
                          AT_LEAST(1))
    rank: int = arg(8, "LoRA rank r (paper: 8; alpha = rank, scale 1)", AT_LEAST(1))
    targets: str = arg("qko", "LoRA target matrices of every layer, letters of q k v o (paper: qko; Table 7 also "
                       "qk, qkv)", (lambda v: len(v) == len(set(v)) > 0 and set(v) <= set("qkvo"), "letters of qkvo"))
    restore: str = arg("best", "the adapter kept: best (lowest dev loss; what the official code means to do) or last "
                       "(what it does, its restore being a no-op); IA2→SFT continues the kept IA2 adapter",
                       (lambda v: v in ("best", "last"), "best or last"))
    max_new_tokens: int = arg(None, "multi-token tasks: teacher rollout length T and generation limit (paper: 200; "
                              "400 for hmath_algebra's evaluation); single-token tasks always use T=1", AT_LEAST(1))
    seed: int = arg(0, "run r uses seed seed+r for its split, demo order, LoRA init and shuffles (paper: r)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu; bf16 base on cuda, fp32 elsewhere. "
                      "Rows per forward pass: on cuda as many as half the free GPU memory holds (estimated per "
                      "token from the model's config), 2048 tokens (rows x length) elsewhere")
    out: str = arg(None, "output folder; unset: runs/<task>-<model>-n<N>-<time>")
    list_tasks: bool = arg(False, "print the task table and exit")


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=f.default, help=f.metadata["help"])
        if f.type is tuple:
            kw.update(nargs="+", type=float if f.name in ("lr", "beta") else str)
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
    """Options [d1, d2, d3, correct] shuffled in place by the loader's one generator (official
    prepare_data.py:1294-1303): slot i shows options[order[i]]; the label is the correct one's slot."""
    options, order = [ex["distractor1"], ex["distractor2"], ex["distractor3"], ex["correct_answer"]], [0, 1, 2, 3]
    rng.shuffle(order)
    return dict(question=ex["question"], **{f"o{i}": options[j] for i, j in enumerate(order)}, label=order.index(3))


def sciq_rng():
    """The official loader's global numpy state at its first option shuffle: seeded 42, then four distinct
    slot words drawn from a list of 9 (prepare_data.py:1352-1362). It goes on through the pool, then the
    eval set, one shuffle per kept record."""
    rng, drawn = np.random.RandomState(42), set()
    while len(drawn) < 4:
        drawn.add(rng.randint(9))  # = np.random.choice(9 words)
    return rng


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
    As the official prepare_data.py does, each split is shuffled with seed 42 (datasets' .shuffle(seed=42))
    and its first --pool-size (pool) or --eval-size (eval) records are kept."""
    task, rng = TASKS[name], sciq_rng() if name == "sciq_remap" else None
    pool_split, eval_split = task["splits"]
    if path:
        recs = shuffled(examples(task, list(enumerate(read_file(path), 1)), labels, path, rng=rng))
        n_eval = len(recs) if pool_split is None else min(cfg.eval_size, len(recs) // 2)
        if pool_split and n_eval < cfg.eval_size:
            warn(f"{path} has {len(recs)} usable rows: its last {n_eval} (at most half) are the eval set, "
                 f"not --eval-size {cfg.eval_size}")
        return recs[:len(recs) - n_eval][:cfg.pool_size], recs[len(recs) - n_eval:]
    if eval_split:  # the pool's records are converted first, then the eval set's (sciq_remap: one generator)
        pool = hub_records(task, name, pool_split, labels, rng, cfg.pool_size) if pool_split else []
        return pool, hub_records(task, name, eval_split, labels, rng, cfg.eval_size)
    recs = hub_records(task, name, pool_split, labels)  # finsen, strategytf: the eval set is the last records
    pool, ev = recs[:len(recs) - cfg.eval_size], recs[len(recs) - cfg.eval_size:]
    if name == "strategytf":  # and both parts are shuffled again (prepare_data.py:1633-1634)
        pool, ev = shuffled(pool), shuffled(ev)
    return pool[:cfg.pool_size], ev


def shuffled(recs: list) -> list:
    return [recs[i] for i in np.random.default_rng(42).permutation(len(recs))]  # = datasets' .shuffle(seed=42)


def hub_records(task: dict, name: str, split: str, labels, rng=None, limit=None) -> list:
    """A split of the task's Hub dataset, shuffled, converted until `limit` examples are kept."""
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        recs = list(enumerate(datasets.load_dataset(task["hub"][0], task["hub"][1], split=split).to_list(), 1))
    except Exception as e:
        raise IA2Error(f"cannot load {task['hub'][0]} for task {name} from the Hub ({str(e).splitlines()[0]}); "
                       f"offline, pass a local copy: --data {name}=FILE")
    where = f"{task['hub'][0]} {split}"
    if name == "poems":  # filtered first, then shuffled (prepare_data.py:914-915)
        return shuffled(examples(task, recs, labels, where, hub=True))[:limit]
    return examples(task, shuffled(recs), labels, where, hub=True, rng=rng, limit=limit)


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


def examples(task: dict, recs: list, labels, where: str, hub=False, rng=None, limit=None) -> list:
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
    out = []
    for i, rec in recs:
        if len(out) == limit:
            break
        rec = task["row"](rec, rng) if hub else {f: rec.get(find(rec, f)) for f in need}  # rng: sciq's options
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
        task["row"](rec, np.random.RandomState(0))  # a throwaway generator
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
    """Run r, with one RandomState(r) as in the official create_training_datasets.py: permute the pool;
    train = the first N, dev = the next min(48, N//2), rest = the ICL-evaluation demos. The same
    generator then shuffles, for each training query i, the list of the other N-1 training indices:
    its demos, in that order (dev example j reuses query j's)."""
    rng = np.random.RandomState(seed)
    perm, n_dev = rng.permutation(len(pool)), min(48, n // 2)
    orders = []
    for i in range(n):
        orders.append([j for j in range(n) if j != i])
        rng.shuffle(orders[-1])
    pick = lambda idx: [pool[i] for i in idx]
    return pick(perm[:n]), pick(perm[n:n + n_dev]), pick(perm[n + n_dev:]), orders


def encode(tok, prompt: str) -> list:
    return tok(prompt).input_ids  # with the tokenizer's BOS, if it adds one (Llama, Gemma do; Qwen does not)


def target_ids(tok, labels, y) -> list:
    """The ground-truth SFT target: the label's one token, or the answer's tokens + EOS,
    tokenised apart from the prompt (official code)."""
    ids = tok(answer_text(labels, y), add_special_tokens=False).input_ids
    return ids if labels else ids + [tok.eos_token_id]


def training_items(tok, labels, train, dev, orders):
    """Each training query i sees the other N-1 training examples as demos, in the order orders[i];
    dev example j reuses training example j's demos (official code)."""
    shots = [x + answer_text(labels, y) for x, y in train]
    items = lambda rows: [dict(x=encode(tok, x), y=y, y_ids=target_ids(tok, labels, y),
                               icl=encode(tok, make_prompt(x, [shots[k] for k in orders[j]])))
                          for j, (x, y) in enumerate(rows)]
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
    """A frozen nn.Linear plus K adapters side by side, A (K, r, d_in) and B (K, d_out, r): batch row i
    is served by adapter `rows[i]` (set by `adapters(model, rows)`); unset, adapter 0 serves every row.
    K > 1 lets many adapters (lrs x runs) train and evaluate in one forward pass."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, K: int = 1):
        super().__init__()
        self.base, self.scale, self.enabled, self.rows = base, alpha / r, True, None
        self.A = nn.Parameter(torch.empty(K, r, base.in_features, device=base.weight.device))   # fp32
        self.B = nn.Parameter(torch.empty(K, base.out_features, r, device=base.weight.device))  # fp32
        for k in range(K):
            self.reset(k)

    def reset(self, k: int = 0):
        nn.init.kaiming_uniform_(self.A[k], a=math.sqrt(5))  # PEFT's default, used by the official code
        nn.init.zeros_(self.B[k])  # B = 0, so ΔW = BA = 0 and the model starts as the base model

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        A, B = (self.A[0], self.B[0]) if self.rows is None else (self.A[self.rows], self.B[self.rows])
        return y + (self.scale * (x.float() @ A.mT @ B.mT)).to(y.dtype)  # + (α/r)·B A x, row by row


def add_lora(model, targets=("q_proj", "k_proj", "o_proj"), r=8, alpha=8, K=1):
    """Freeze the model and wrap every targeted nn.Linear in a LoRALinear with K fresh adapters
    (a module that is already wrapped gets new ones)."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        for t in targets:
            old = getattr(module, t, None)
            if isinstance(old, (nn.Linear, LoRALinear)):
                setattr(module, t, LoRALinear(old.base if isinstance(old, LoRALinear) else old, r, alpha, K))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad) // K
    print(f"LoRA r={r} α={alpha} on {','.join(targets)}: {n:,} trainable parameters" + (f" x {K} adapters" * (K > 1)))
    return model


def lora_targets(cfg: Config) -> tuple:
    return tuple(f"{c}_proj" for c in cfg.targets)  # "qko" -> q_proj, k_proj, o_proj


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state(model, k: int = 0) -> dict:
    """A detached copy of adapter k: {module name: (A, B)}."""
    return {n: (m.A[k].detach().clone(), m.B[k].detach().clone()) for n, m in lora_modules(model).items()}


def load_lora_state(model, state: dict, k: int = 0):
    with torch.no_grad():
        for n, m in lora_modules(model).items():
            m.A[k].copy_(state[n][0]), m.B[k].copy_(state[n][1])


@contextlib.contextmanager
def adapters(model, rows):
    """Inside the block, batch row i runs through adapter rows[i] (a list of ints; None: adapter 0)."""
    mods = lora_modules(model).values()
    ids = None if rows is None else torch.as_tensor(rows, device=model.device)
    for m in mods:
        m.rows = ids
    try:
        yield model
    finally:
        for m in mods:
            m.rows = None


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


def save_adapter(model, folder: str, cfg: Config, k: int = 0):
    """Adapter k in PEFT's layout, so that peft.PeftModel.from_pretrained(base_model, folder) loads it."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for n, (A, B) in lora_state(model, k).items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = B.cpu().contiguous()
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    conf = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=cfg.model, r=cfg.rank,
                lora_alpha=cfg.rank, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                target_modules=list(lora_targets(cfg)), init_lora_weights=True, inference_mode=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(conf, f, indent=2)


def load_adapter(model, folder: str, k: int = 0):
    """The inverse of save_adapter: copy a saved adapter into adapter k of the model's LoRALinear modules."""
    from safetensors.torch import load_file
    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise IA2Error(f"no adapter at {path}")
    t = load_file(path)
    load_lora_state(model, {n: (t[f"base_model.model.{n}.lora_A.weight"], t[f"base_model.model.{n}.lora_B.weight"])
                            for n in lora_modules(model)}, k)


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


def forward(model, prompts: list, targets=None, capture=False, logits=True, slots=None):
    """Teacher-forced forward over a right-padded batch of X∘target, row i through adapter slots[i].
    Position d+t, with d = len(X)-1 the last prompt token, predicts target[t] for t = 0..T-1 (T: the
    longest target; without targets T=1 and only X is read). The last target token is never read, so
    it is not fed. Returns fp32 logits (B, T, V), or None, and with capture the self-attention outputs
    (B, L, T, D)."""
    T = max(map(len, targets)) if targets else 1
    seqs = [x + list(y[:-1]) for x, y in zip(prompts, targets)] if targets else prompts
    ids, mask = pad_right(seqs, model.config.pad_token_id or 0, model.device)
    d = torch.tensor([len(x) - 1 for x in prompts])
    at = (d[:, None] + torch.arange(T)).clamp(max=ids.shape[1] - 1).to(model.device)  # (B, T): d+t
    rows = torch.arange(len(seqs), device=model.device)[:, None]
    with adapters(model, slots), capture_activations(model) if capture else contextlib.nullcontext() as acts:
        h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return (lm_logits(model, h[rows, at]) if logits else None,
            torch.stack([a[rows, at] for a in acts], 1) if capture else None)


def token_budget(model, grad: bool) -> int:
    """Tokens (rows x padded length) per forward pass. On a GPU, as many as half its free memory holds,
    at a cost per token estimated from the config: with gradients, every layer's saved activations and
    fp32 logits (and their gradient) over the vocabulary; without, the KV cache of a rollout and one
    layer's MLP. On a CPU 2048, where larger batches are no faster."""
    if model.device.type != "cuda":
        return 2048
    c = model.config
    if grad:
        per_token = 2 * c.num_hidden_layers * (10 * c.hidden_size + 4 * c.intermediate_size) + 12 * c.vocab_size
    else:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        per_token = 4 * c.num_hidden_layers * c.num_key_value_heads * head_dim + 8 * c.intermediate_size
    return max(512, int(torch.cuda.mem_get_info(model.device)[0] / 2 / per_token))


def spans(lengths: list, budget: int) -> list:
    """Consecutive slices of rows, each as many rows as fit `budget` tokens when padded to its longest."""
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        longest = max(longest, n)
        if i > start and (i + 1 - start) * longest > budget:
            out.append(slice(start, i))
            start, longest = i, n
    return out + [slice(start, len(lengths))] if lengths else []


# -----------------------------------------------------------------------------
# 4. The teacher: the base model reading the N-1 demos, then the query (§3, §4)


@torch.no_grad()
def generate(model, prompts: list, max_new: int, eos: set, stop=None, capture=False, scores=False, slots=None):
    """Greedy decoding of a batch with a KV cache, row i through adapter slots[i]; the teacher rollout
    (§3) and the evaluation (§5). Left padding puts every prompt's last token in the last column, and
    position_ids = cumsum(mask)-1 give each row the positions it has alone (tested against batch size
    1). Each step feeds one token per row. A row ends after emitting an id in `eos` (kept, with its
    activations, as in the official rollout) or once stop(tokens) is true. Returns per row: tokens (T',), acts
    (L, T', D) in the base dtype, on the device, and logp (T', V) fp32 (the step's log-probabilities),
    on the CPU. The official rollout re-runs the whole sequence each step; a test checks that tokens
    and activations are the same."""
    B, R, dev = len(prompts), max(map(len, prompts)), model.device
    ids = torch.full((B, R), model.config.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, R - len(p):], mask[i, R - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos, cache = (mask.cumsum(1) - 1).clamp(min=0), None
    tokens, done, acts_t, logp_t = [[] for _ in range(B)], [False] * B, [], []
    for _ in range(max_new):
        with adapters(model, slots), capture_activations(model) if capture else contextlib.nullcontext() as acts:
            out = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                              use_cache=True)
        cache, logits = out.past_key_values, lm_logits(model, out.last_hidden_state[:, -1])  # (B, V)
        if capture:
            acts_t.append(torch.stack([a[:, -1] for a in acts], 1))  # (B, L, D) at this step's position
        if scores:
            logp_t.append(logits.log_softmax(-1).cpu())
        nxt = logits.argmax(-1)
        for i, y in enumerate(nxt.tolist()):
            if not done[i]:
                tokens[i].append(y)
                done[i] = y in eos or (stop is not None and stop(tokens[i]))
        if all(done):
            break
        ids, pos, mask = nxt[:, None], pos[:, -1:] + 1, torch.cat([mask, mask.new_ones(B, 1)], 1)
    return [dict(tokens=tk, acts=torch.stack([a[i] for a in acts_t[:len(tk)]], 1) if capture else None,
                 logp=torch.stack([p[i] for p in logp_t[:len(tk)]]) if scores else None)
            for i, tk in enumerate(tokens)]


def teacher(model, items: list, T: int, eos_id: int, scores=False):
    """Adds to each item Ŷ (y_icl, T' <= T tokens), A_ICL (L, T', D) at d_icl+t, and for kd the
    teacher's log-probabilities (T', V): one greedy rollout of the base model on I∘X that stops only at
    the tokenizer's EOS, with no "\n\n" stop (official get_activations). Also y_out, the official
    "ICL outputs" (the SFT targets of sft_icl and ia2_then_sft_icl), which a generate() call made: the
    same tokens, up to the first EOS id of the model's generation_config (see icl_output). Single-token
    tasks: T=1, one forward. Activations stay on the device in the base dtype, (L·T'·D) numbers per
    example; the log-probabilities go to the CPU (README, Memory)."""
    with lora_disabled(model):
        for part in spans([len(it["icl"]) + T for it in items], token_budget(model, grad=False)):
            batch = items[part]
            for it, o in zip(batch, generate(model, [it["icl"] for it in batch], T, {eos_id}, capture=True,
                                             scores=scores)):
                it.update(y_icl=o["tokens"], A_icl=o["acts"], logp_icl=o["logp"],
                          y_out=icl_output(o["tokens"], T, eos_ids(model, eos_id), eos_id))
    return items


def eos_ids(model, eos_id: int) -> set:
    """Where the official generate() calls stop (evaluation, ICL outputs): at every EOS id of the model's
    generation_config (Llama-3 Instruct and Qwen3 list several), else at the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    return set([ids] if isinstance(ids, int) else ids or []) or {eos_id}


def icl_output(tokens: list, T: int, eos: set, eos_id: int) -> list:
    """The official collect_icl_outputs from a rollout's tokens: cut after the first id in `eos` (kept); a
    cut before T tokens on another id than the tokenizer's EOS gets that EOS appended."""
    cut = next((i + 1 for i, y in enumerate(tokens) if y in eos), len(tokens))
    return tokens[:cut] + [eos_id] * (cut < T and tokens[cut - 1] != eos_id)


# -----------------------------------------------------------------------------
# 5. The losses (Eq. 2, Eq. 4, §6, Table 4), one per example, each averaged over its own positions


def ia2_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, T, D) student and teacher activations at the aligned positions, mask (B, T) the real ones.
    L_IA2 = L · mean((S - A_ICL)²) over (L, T', D): the per-layer MSE summed over layers (official
    code; Eq. 4 writes a norm). Returns (B,)."""
    se = (student.float() - teacher.float()).pow(2).mean(-1) * mask[:, None]  # (B, L, T)
    per_layer_mse = se.sum(-1) / mask.sum(-1, keepdim=True)  # (B, L)
    return per_layer_mse.sum(1)


def sft_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy (official code; Eq. 2 generates) of the target tokens (B, T),
    -100 where there is none, averaged over each example's tokens. Returns (B,)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
    return ce.sum(1) / (target != -100).sum(1)


def kd_loss(logits: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft labels (Table 4 "SFT (soft labels)"): KL(p_ICL,t ‖ p_student,t) summed over the whole
    vocabulary at each aligned position, averaged over positions. (B, T, V) logits and log-probs;
    returns (B,)."""
    logq = logits.float().log_softmax(-1)
    kl = (teacher_logp.exp() * (teacher_logp - logq)).sum(-1)  # Σ_v p log(p/q), (B, T)
    return (kl * mask).sum(1) / mask.sum(1)


def padded(xs: list, T: int) -> torch.Tensor:
    """Stack (..., T', k) tensors, zero-padded to T along their second-to-last dimension."""
    return torch.stack([F.pad(x, (0, 0, 0, T - x.shape[-2])) for x in xs])


def target_of(objective: str, item: dict) -> list:
    """What the student reads after X: the ground truth Y for sft, the ICL outputs for sft_icl, the
    teacher's rollout Ŷ otherwise (official code)."""
    return item["y_ids"] if objective == "sft" else item["y_out"] if objective == "sft_icl" else item["y_icl"]


def objective_loss(model, objective: str, batch: list, beta=0.5, slots=None) -> torch.Tensor:
    """Each example's loss (B,); example i runs through adapter slots[i]. The student reads X∘target
    and is read at d_q+t. Objectives: sft (target: ground truth Y), sft_icl (Ŷ), ia2, ia2_plus_sft =
    (1-β)·L_IA2 + β·L_SFT(Ŷ) in one forward (official code's convex form; β a number or one per
    example), kd (Ŷ's positions, the teacher's distributions)."""
    targets = [target_of(objective, it) for it in batch]
    needs_acts = objective in ("ia2", "ia2_plus_sft")
    logits, acts = forward(model, [it["x"] for it in batch], targets, capture=needs_acts,
                           logits=objective != "ia2", slots=slots)
    T, dev = max(map(len, targets)), model.device
    target = torch.tensor([y + [-100] * (T - len(y)) for y in targets], device=dev)
    if objective in ("sft", "sft_icl"):
        return sft_loss(logits, target)
    if objective == "kd":
        return kd_loss(logits, padded([it["logp_icl"] for it in batch], T).to(dev), target != -100)
    l_ia2 = ia2_loss(acts, padded([it["A_icl"] for it in batch], T).to(dev), target != -100)
    if objective == "ia2":
        return l_ia2
    beta = torch.as_tensor(beta, device=dev)
    return (1 - beta) * l_ia2 + beta * sft_loss(logits, target)


# -----------------------------------------------------------------------------
# 6. Training: Adam, constant lr, early stopping on the dev loss (§5, App. B), many adapters at once


@dataclass
class Job:
    """One adapter to train: run `run`'s training and dev items, its lr (and β for ia2_plus_sft), and
    where it starts: a fresh LoRA init (set_seed(seed + run)) or a given state (IA2→SFT's second phase
    starts from its IA2 job's result). Training fills in the rest."""
    lr: float
    run: int
    train: list
    dev: list
    beta: float = None
    start: dict = None
    best: float = math.inf  # the best dev loss so far (its adapter is restored at the end)
    bad: int = 0  # dev checks since the last new best
    steps: int = 0
    epoch: int = -1
    order: list = field(default_factory=list)  # what is left of this epoch's shuffled example indices
    rng: np.random.RandomState = None  # the epoch order: RandomState(seed + run), as when trained alone
    done: bool = False


class Adam:
    """torch.optim.Adam (no weight decay, constant lr) for K adapters stacked along dim 0 of each
    parameter: slot k has its own lr and step count, and only the slots in `live` move."""

    def __init__(self, params: list, lrs: list, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.betas, self.eps = params, betas, eps
        self.lr = torch.tensor(lrs, dtype=torch.float64, device=params[0].device)  # float64: 1 - 0.999^t cancels
        self.t = torch.zeros(len(lrs), dtype=torch.float64, device=params[0].device)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, live: list):
        (b1, b2), on = self.betas, torch.zeros_like(self.t)
        on[live] = 1
        self.t += on
        t = self.t.clamp(min=1)
        step_size, bc2_sqrt = (on * self.lr / (1 - b1 ** t)).float(), (1 - b2 ** t).sqrt().float()  # 0: stays
        for p, m, v in zip(self.params, self.m, self.v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            m.lerp_(p.grad, 1 - b1)  # m = β1·m + (1-β1)·g
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)  # v = β2·v + (1-β2)·g²
            p -= step_size.view(shape) * (m / (v.sqrt() / bc2_sqrt.view(shape) + self.eps))
            p.grad = None


def train(model, objective: str, jobs: list, cfg: Config, tag) -> list:
    """Trains every job's adapter at once, job k in slot k of each LoRALinear. Each optimizer step takes
    the next right-padded batch of min(4, N) examples of every job still training, runs them through
    one forward and backward (the per-job mean losses summed, so each job's gradient is its own), and
    steps each adapter with its own lr (Adam, no weight decay, no schedule). Per job: the dev loss every
    2 steps and at each epoch end; stop after `patience` checks without a new best, or after --epochs,
    and keep the best adapter (--restore last: the last, as the official code does). A job's init, example order,
    steps and dev losses are those of training it alone (tested). tag(job) names a job in the log."""
    add_lora(model, lora_targets(cfg), r=cfg.rank, alpha=cfg.rank, K=len(jobs))
    for k, job in enumerate(jobs):
        set_seed(cfg.seed + job.run)  # the same init for every method of a run
        for mod in lora_modules(model).values():
            mod.reset(k)
        if job.start:
            load_lora_state(model, job.start, k)
        job.rng = np.random.RandomState(cfg.seed + job.run)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, best = Adam(params, [job.lr for job in jobs]), [p.detach().clone() for p in params]  # best: per slot
    bs = min(cfg.batch_size, cfg.n_train)
    while not all(job.done for job in jobs):
        live = [k for k, job in enumerate(jobs) if not job.done]
        losses = backward(model, objective, [(k, jobs[k], next_batch(jobs[k], bs)) for k in live])
        for k, loss in zip(live, losses):
            if not math.isfinite(loss):
                raise IA2Error(f"{tag(jobs[k])}: the training loss became {loss} at step {jobs[k].steps}; "
                               "try a lower --lr")
        opt.step(live)
        check = [k for k in live if jobs[k].steps % 2 == 0 or not jobs[k].order]  # every 2 steps, epoch ends
        for k, dev in zip(check, dev_losses(model, objective, [(k, jobs[k]) for k in check])):
            if update(jobs[k], dev, losses[live.index(k)], cfg, tag):  # a new best: keep this adapter
                with torch.no_grad():
                    for b, p in zip(best, params):
                        b[k] = p[k]
    if cfg.restore == "best":
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
    return jobs


def next_batch(job: Job, bs: int) -> list:
    """The job's next min(4, N) training examples; each epoch reshuffles them with the job's own rng."""
    if not job.order:
        job.order, job.epoch = list(job.rng.permutation(len(job.train))), job.epoch + 1
    batch, job.order = job.order[:bs], job.order[bs:]
    job.steps += 1
    return [job.train[i] for i in batch]


def backward(model, objective: str, batches: list) -> list:
    """One forward and backward over the batches of several jobs, (slot, job, examples); returns each
    job's loss, the mean over its examples."""
    weight = {k: 1 / len(b) for k, _, b in batches}
    total = collections.defaultdict(float)
    for ks, betas, items in pieces(model, objective, [(k, job.beta, it) for k, job, b in batches for it in b], True):
        weighted = objective_loss(model, objective, items, betas, ks) * torch.tensor([weight[k] for k in ks],
                                                                                    device=model.device)
        weighted.sum().backward()  # Σ over jobs of each job's mean loss: job k's gradient is its own
        for k, x in zip(ks, weighted.tolist()):
            total[k] += x
    return [total[k] for k, _, _ in batches]


@torch.no_grad()
def dev_losses(model, objective: str, jobs: list) -> list:
    """The mean dev loss of each (slot, job), all dev sets in shared batches."""
    total = collections.defaultdict(float)
    for ks, betas, items in pieces(model, objective, [(k, job.beta, it) for k, job in jobs for it in job.dev], False):
        for k, x in zip(ks, objective_loss(model, objective, items, betas, ks).tolist()):
            total[k] += x
    return [total[k] / len(job.dev) for k, job in jobs]


def pieces(model, objective: str, rows: list, grad: bool):
    """(slot, β, example) rows, sorted by length so that little padding is computed, in pieces within
    the device's token budget; yields (slots, βs, examples) per piece."""
    rows = sorted(rows, key=lambda row: len(row[2]["x"]) + len(target_of(objective, row[2])))
    for part in spans([len(it["x"]) + len(target_of(objective, it)) for *_, it in rows], token_budget(model, grad)):
        yield tuple(zip(*rows[part]))


def update(job: Job, dev: float, loss: float, cfg: Config, tag) -> bool:
    """After a dev check: count checks without a new best, stop at `patience` or after --epochs.
    Returns whether this is a new best."""
    new_best = dev < job.best
    job.best, job.bad = (dev, 0) if new_best else (job.best, job.bad + 1)
    print(f"[{tag(job)}] ep {job.epoch} step {job.steps} | loss {loss:.4f} | dev {dev:.4f}{' *' * new_best}")
    if job.bad >= cfg.patience:
        job.done = True
    elif job.epoch == cfg.epochs - 1 and not job.order:
        job.done = True
        print(f"[{tag(job)}] note: stopped by the --epochs {cfg.epochs} cap, not by early stopping" +
              (" (the dev loss was still falling)" if new_best else ""))
    return new_best


# -----------------------------------------------------------------------------
# 7. Evaluation (§5). Single-token tasks: one forward, the full-vocabulary softmax at the last
#    prompt token. Multi-token tasks: greedy generation, answer parsing, exact match.


@torch.no_grad()
def predict(model, seqs: list, label_ids: list, slots=None):
    """Per prompt (prompt i through adapter slots[i]): the top-10 token ids and probabilities, and the
    probability of each label's token. Prompts are sorted by length so that batches carry little
    padding; a batch is as many as fit the device's token budget, and moves to the host once."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    parts = []
    for part in tqdm(spans([len(seqs[i]) for i in order], token_budget(model, grad=False)), desc="eval",
                     leave=False, disable=None):  # a progress bar on a terminal only
        idx = order[part]
        probs = forward(model, [seqs[i] for i in idx], slots=slots and [slots[i] for i in idx])[0][:, 0].softmax(-1)
        p, ids = probs.topk(10, dim=-1)
        parts.append(torch.cat([p, ids.float(), probs[:, label_ids]], 1).cpu())
    out = torch.cat(parts)[np.argsort(order)].numpy()  # back in the order of seqs
    return out[:, :10], out[:, 10:20].astype(int), out[:, 20:]


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
    """The final answer of a generation or of a ground-truth answer, parsed the same way (official
    utils.py where it is right; README, Deviations, lists where not). gsm8k, gsm8ks: \boxed{x},
    '#### x', 'answer is x', 'Answer: x', '$x', else the last number that is not a year (1900-2100),
    else the last number; cleaned. hmath_algebra: the last \boxed{} (whitespace removed, \dfrac as
    \frac). sciqa: the text after the last '####'."""
    if task == "sciqa":
        return text.split("####")[-1].strip()
    if task == "hmath_algebra":
        b = boxed(text)
        return None if b is None else "".join(b.split()).replace("\\dfrac", "\\frac")
    b = boxed(text)
    if b is not None and clean_number(b) is not None:
        return clean_number(b)
    for pattern in (r"####\s*(.*)", r"answer is[:\s]*(.*)", r"Answer:\s*(.*)", r"\$\s*(" + NUMBER + ")"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found and clean_number(found[-1]) is not None:
            return clean_number(found[-1])
    numbers = [clean_number(n) for n in re.findall(NUMBER, text.replace("$", ""))]
    years = [n for n in numbers if n.isdigit() and 1900 <= int(n) <= 2100]
    return ([n for n in numbers if n not in years] or numbers or [None])[-1]


def answer_of(tok, ids: list) -> str:
    """A generation's text, cut at the first "\n\n"."""
    return tok.decode(ids, skip_special_tokens=True).split("\n\n")[0]


def generate_texts(model, tok, seqs: list, max_new: int, slots=None) -> list:
    """Greedy continuations (prompt i through adapter slots[i]), stopped as the official evaluation's
    generate() stops, at any EOS id of the generation_config or at the first "\n\n", and cut there. Prompts are sorted by length so that batches carry little padding; a batch is as
    many as fit the device's token budget."""
    stop = lambda ids: "\n\n" in tok.decode(ids[-2:])  # "\n\n" may be one token or two
    texts, order = [None] * len(seqs), sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for part in tqdm(spans([len(seqs[i]) + max_new for i in order], token_budget(model, grad=False)),
                     desc="generate", leave=False, disable=None):
        idx = order[part]
        for i, o in zip(idx, generate(model, [seqs[i] for i in idx], max_new, eos_ids(model, tok.eos_token_id),
                                      stop=stop, slots=slots and [slots[i] for i in idx])):
            texts[i] = answer_of(tok, o["tokens"])
    return texts


def generation_metrics(ev: dict, texts: list, show: int = 0, tag: str = "") -> dict:
    """Exact-match accuracy of the parsed answers; prints the first `show` generations."""
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


def load_model(name: str, device, dtype, tok=None):
    from transformers import AutoModelForCausalLM
    tok = tok or load_tokenizer(name)
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


def check_tokenizer(tok, prompts: list):
    """Warn when the tokenizer reads the prompts about one character at a time (a broken conversion, e.g.
    of some GGUF tokenizers in some transformers versions): every number of the run is then meaningless."""
    chars, tokens = sum(map(len, prompts)), sum(len(encode(tok, p)) for p in prompts)
    if tokens > 0.75 * chars:
        warn(f"the tokenizer splits the prompts into {tokens} tokens for {chars} characters, about one per "
             "character: it is probably broken (results would be meaningless); check tok.tokenize(prompt)")


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
    check_tokenizer(tok, [x for x, _ in data[cfg.task][1][:20]])
    tok, model = load_model(cfg.model, device, dtype, tok)
    add_lora(model, lora_targets(cfg), r=cfg.rank, alpha=cfg.rank)
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


def evaluate(cfg: Config, E: dict, ev: dict, prompt_sets: list, slots=None, show: int = 0, tag: str = "") -> list:
    """The metrics of each set of prompts for eval task `ev` (one prompt per eval example), set j run
    through adapter slots[j] (None: the model as it is); all sets share batches."""
    seqs, n = [p for ps in prompt_sets for p in ps], len(ev["gold"])
    rows = None if slots is None else [k for k in slots for _ in range(n)]
    if ev["labels"]:
        pred = predict(E["model"], seqs, ev["label_ids"], rows)
        return [metrics([x[j * n:(j + 1) * n] for x in pred], ev["gold"], E["tok"], ev["labels"])
                for j in range(len(prompt_sets))]
    texts = generate_texts(E["model"], E["tok"], seqs, cfg.max_new_tokens or ev["task"]["gen"], rows)
    return [generation_metrics(ev, texts[j * n:(j + 1) * n], show * (j == 0), tag) for j in range(len(prompt_sets))]


OBJECTIVE = dict(sft="sft", sft_icl="sft_icl", ia2="ia2", ia2_then_sft="sft", ia2_then_sft_icl="sft_icl",
                 ia2_plus_sft="ia2_plus_sft", kd="kd")


def draw_runs(cfg: Config, E: dict) -> list:
    """Run r: N training examples, min(48, N//2) dev examples and the held-out demo pool, drawn with
    RandomState(seed + r); then the teacher once for every run's training and dev examples."""
    runs = []
    for r in range(cfg.runs):
        train_rows, dev_rows, rest, orders = few_shot_split(E["pool"], cfg.n_train, cfg.seed + r)
        tr, dv = training_items(E["tok"], E["labels"], train_rows, dev_rows, orders)
        runs.append(dict(r=r, train=tr, dev=dv, rest=rest))
    if set(cfg.methods) - {"zero_shot", "icl", "sft"}:
        T = 1 if E["labels"] else cfg.max_new_tokens or 200  # §3: T=1 single-token, G=200 multi-token
        teacher(E["model"], [it for run in runs for it in run["train"] + run["dev"]], T, E["tok"].eos_token_id,
                scores="kd" in cfg.methods)
        for run in runs:
            tr, right = run["train"], (lambda it: it["y_icl"][0] == it["y_ids"][0]) if E["labels"] else (
                lambda it: parse_answer(E["name"], answer_of(E["tok"], it["y_icl"])) == parse_answer(E["name"], it["y"]))
            T_mean = float(np.mean([len(it["y_icl"]) for it in tr + run["dev"]]))
            print(f"[run {run['r']}] teacher: {T_mean:.0f} token{'s' * (T_mean != 1)} per rollout; "
                  f"ICL answers on the {len(tr)} training examples: {sum(map(right, tr))}/{len(tr)} correct")
    return runs


def baselines(cfg: Config, E: dict, runs: list) -> list:
    """The base model without an adapter: zero-shot once, ICL once per run (N-1 held-out demos per query)."""
    rows = []
    with lora_disabled(E["model"]):
        for ev in E["evals"]:
            if "zero_shot" in cfg.methods:
                rec = evaluate(cfg, E, ev, [ev["queries"]], show=2, tag=f"zero_shot on {ev['name']}")[0]
                rows.append(dict(task=ev["name"], method="zero_shot", lr=None, run=0, **rec))
            if "icl" in cfg.methods:
                prompts = [icl_eval_prompts(E["tok"], E["labels"], run["rest"], ev["eval_set"], cfg.n_train - 1,
                                            cfg.seed + run["r"]) for run in runs]
                recs = evaluate(cfg, E, ev, prompts, show=2, tag=f"icl run 0 on {ev['name']}")
                rows += [dict(task=ev["name"], method="icl", lr=None, run=run["r"], **rec) for run, rec in zip(runs, recs)]
    return rows


def train_method(cfg: Config, E: dict, m: str, runs: list, ia2_states: dict, folder: str) -> list:
    """Every (lr, run) adapter of method m (and β, for ia2_plus_sft), trained together, then evaluated on
    every eval task together and saved; returns the result rows. ia2_then_sft(_icl) continues each IA2
    adapter of the same (lr, run)."""
    jobs = [Job(lr, run["r"], run["train"], run["dev"], beta, ia2_states.get((lr, run["r"])) if "then" in m else None)
            for lr in cfg.lr for beta in (cfg.beta if m == "ia2_plus_sft" else [None]) for run in runs]
    name = lambda job: f"{m} lr={job.lr:g}" + (f" β={job.beta:g}" if job.beta is not None else "") + f" run {job.run}"
    train(E["model"], OBJECTIVE[m], jobs, cfg, tag=name)
    if m == "ia2":
        ia2_states.update({(job.lr, job.run): lora_state(E["model"], k) for k, job in enumerate(jobs)})
    if m not in cfg.methods:
        return []  # only the IA2 phase of ia2_then_sft(_icl)
    rows = []
    for ev in E["evals"]:
        recs = evaluate(cfg, E, ev, [ev["queries"]] * len(jobs), slots=list(range(len(jobs))), show=2,
                        tag=f"{name(jobs[0])} on {ev['name']}")
        for job, rec in zip(jobs, recs):
            rows.append(dict(task=ev["name"], method=m, lr=job.lr, beta=job.beta, run=job.run, **rec,
                             dev_loss=job.best, steps=job.steps))
            print(f"[{name(job)}] {ev['name']}: acc {rec['accuracy']:.1f}" + (f" | ece {rec['ece']:.3f}" if "ece" in rec
                  else "") + f" | best dev {job.best:.4f} | {job.steps} steps")
    for k, job in enumerate(jobs):
        save_adapter(E["model"], adapter_dir(folder, m, job.lr, job.beta, job.run), cfg, k)
    return rows


def adapter_dir(folder: str, method: str, lr: float, beta, run: int) -> str:
    return os.path.join(folder, "adapters", method, f"lr{lr:g}" + (f"-beta{beta:g}" if beta is not None else ""),
                        f"run{run}")


def summarize(rows: list) -> dict:
    """Result rows of one eval task -> per method, the mean and population std (ddof=0) over runs of
    each setting, (lr, β); the setting is chosen, as in the paper, by the best mean top-1 accuracy on the
    eval set (the first of equals, as in the official code). Also the lr with the lowest mean dev loss
    (at the chosen β: dev losses of different β are different objectives). predicted: the mean % per
    answer (labels, then other tokens); one_answer_runs: runs in which every example got the same answer."""
    out = {}
    for m in METHODS:
        by = {}
        for x in rows:
            if x["method"] == m:
                by.setdefault((x["lr"], x.get("beta")), []).append({k: v for k, v in x.items() if k not in (
                    "task", "method", "lr", "beta")})
        if not by:
            continue
        keys = [k for k in METRICS if k in next(iter(by.values()))[0]]
        stat = {s: dict(mean={k: float(np.mean([x[k] for x in runs])) for k in keys},
                        std={k: float(np.std([x[k] for x in runs])) for k in keys},
                        **({} if "predicted" not in runs[0] else dict(
                            predicted=np.mean([x["predicted"] for x in runs], 0).tolist(),
                            one_answer_runs=sum(max(x["predicted"]) == 100 for x in runs)))) for s, runs in by.items()}
        best = max(by, key=lambda s: stat[s]["mean"]["accuracy"])
        out[m] = dict(stat[best], lr=best[0], beta=best[1], runs=by[best],
                      settings={setting_name(*s): stat[s] for s in by})
        if m in TRAINED:
            dev = min((s for s in by if s[1] == best[1]), key=lambda s: np.mean([x["dev_loss"] for x in by[s]]))
            out[m]["dev_selected"] = dict(lr=dev[0], mean=stat[dev]["mean"], std=stat[dev]["std"])
    return out


def setting_name(lr, beta=None) -> str:
    return "–" if lr is None else f"{lr:g}" + ("" if beta is None else f", β {beta:g}")


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
    lines = ["| method | lr (β) | accuracy | label acc. | ECE | ECE (equal width) | lr (dev-selected) | accuracy "
             "(dev-selected) |" + (f" answers {answers} (%) |" if labels else ""), "|---" * (8 + bool(labels)) + "|"]
    if maj:
        lines.append(f"| majority class (always {maj['label']!r}) | – | {maj['accuracy']:.1f} | {maj['accuracy']:.1f} "
                     "| – | – | – | – | " + "/".join("100" if lab == maj["label"] else "0" for lab in labels) + "/0 |")
    for m in (m for m in METHODS if m in results):
        r = results[m]
        dev = [f"{r['dev_selected']['lr']:g}", pm(r["dev_selected"], "accuracy")] if "dev_selected" in r else ["–", "–"]
        cells = ["", m, setting_name(r["lr"], r["beta"]), pm(r, "accuracy"), pm(r, "label_accuracy"),
                 pm(r, "ece", "{:.3f}"), pm(r, "ece_equal_width", "{:.3f}"), *dev]
        if labels:
            n = len(r["runs"])
            cells.append("/".join(f"{p:.0f}" for p in r["predicted"]) + (
                f" **one answer in {r['one_answer_runs']}/{n} run{'s' * (n > 1)}**" if r["one_answer_runs"] else ""))
        lines.append(" | ".join(cells + [""]).strip())
    note = ("top-1 accuracy and label accuracy in %, ECE as a fraction" if labels else
            "accuracy: exact match of the parsed answer, in %")
    return "\n".join(lines) + (f"\n\n{note}; mean ± std over runs. lr: selected on the eval set by mean accuracy, "
                               "as the paper does (with β for ia2_plus_sft); lr (dev-selected): lowest mean dev "
                               "loss." + (
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
    per_run = len(cfg.lr) * sum(len(cfg.beta) if m == "ia2_plus_sft" else 1 for m in trained)
    evals = ", ".join(f"{len(ev['eval_set'])} {ev['name']}" for ev in E["evals"])
    betas = f" (ia2_plus_sft: x {plural(len(cfg.beta), 'β')})" if "ia2_plus_sft" in trained else ""
    return (f"plan: {plural(len(trained), 'trained method')} x {plural(len(cfg.lr), 'lr')}{betas} x "
            f"{plural(cfg.runs, 'run')} = {plural(cfg.runs * per_run, 'adapter')} (at "
            f"most {cfg.epochs} epochs each; a method's adapters train together), evaluated on {evals} eval examples, "
            "as are zero-shot (once) and ICL (once per run)")


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def run_experiment(cfg: Config) -> list:
    """Every method x lr x run; returns the result rows (eval task, method, lr, run, metrics)."""
    t0 = time.time()
    out = cfg.out or os.path.join("runs", f"{cfg.task}-{os.path.basename(cfg.model.rstrip('/'))}-n{cfg.n_train}"
                                          f"-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out):
        raise IA2Error(f"output folder {out} exists; choose another --out")
    E, tmp, rows, timing = setup(cfg), out + ".partial", [], dict(load=time.time() - t0)
    shutil.rmtree(tmp, ignore_errors=True)
    print(plan(cfg, E))
    try:
        tick = time.time()
        runs = draw_runs(cfg, E)
        rows += baselines(cfg, E, runs)
        timing["teacher and baselines"] = time.time() - tick
        methods, ia2_states = [m for m in TRAINED if m in cfg.methods], {}
        if "ia2" not in methods and {"ia2_then_sft", "ia2_then_sft_icl"} & set(methods):
            methods.insert(methods.index(next(m for m in methods if "then" in m)), "ia2")  # not reported
        for i, m in enumerate(methods):
            tick = time.time()
            rows += train_method(cfg, E, m, runs, ia2_states, tmp)
            timing[f"method {m}"] = time.time() - tick
            if i == 0 and len(methods) > 1:
                print(f"estimate: {m}'s {plural(len(cfg.lr) * cfg.runs, 'adapter')} took {duration(timing[f'method {m}'])}"
                      f" (training and evaluation); the other methods should take about "
                      f"{duration(timing[f'method {m}'] * (len(methods) - 1))} more here (early stopping varies)")
    except KeyboardInterrupt:
        write_outputs(cfg, E, tmp, rows, dict(timing, total=time.time() - t0), interrupted=True)
        print(f"ia2.py: interrupted; the adapters and results finished so far are in {tmp}/", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # an error: no half-written output
        raise
    timing["total"] = time.time() - t0
    results = write_outputs(cfg, E, tmp, rows, timing)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(tmp, out)
    print("\n" + tables(cfg, results, E) + f"\n\nwritten to {out}/ in {timing['total']:.0f} s")
    return rows


def write_outputs(cfg: Config, E: dict, folder: str, rows: list, timing: dict, interrupted=False) -> dict:
    """config.json; results.json with `methods` (the --task eval set, if evaluated) and `ood` (the
    others); results.md. Returns the per-task summaries."""
    import transformers
    model, results = E["model"], {ev["name"]: summarize([x for x in rows if x["task"] == ev["name"]])
                                  for ev in E["evals"]}
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
                f"{' (interrupted: the methods finished so far)' if interrupted else ''}\n\n"
                f"{tables(cfg, results, E)}\n")
    return results


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
