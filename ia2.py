"""IA2: ICL Activation Alignment, then supervised fine-tuning, in one file.

IA2 distils in-context learning (ICL) into LoRA weights: the model *without*
demonstrations is trained to reproduce the self-attention outputs the same model
produces *with* N-1 demonstrations, and is then fine-tuned as usual (SFT).
  Mishra, Khashabi, Liu. "IA2: Alignment with ICL Activations Improves Supervised
  Fine-Tuning." ICLR 2026, arXiv:2509.22621.

The steps, in the order of the paper and of this file:
  1. prompts and the few-shot protocol (§5, App. A) ... make_prompt, few_shot_split
  2. LoRA, written out (§5) ........................... LoRALinear, add_lora
  3. capture the self-attention outputs (§2) ......... capture_activations
  4. the teacher: base model reading N-1 demos (§4) ... teacher
  5. the losses: IA2 (Eq. 4), SFT (Eq. 2), IA2+SFT .... ia2_loss, sft_loss, objective_loss
  6. training: one loop, early stopping on dev loss ... train
  7. evaluation: accuracy and ECE (§5) ............... predict, metrics, ece, ece_equal_width
  8. the experiment: methods x lrs x runs ............ run_experiment, main

Symbols:
  X      the query prompt, e.g. "Text:a gripping film\nLabel:"
  Y      its ground-truth label string, e.g. "1"
  I      the other N-1 training examples, used as demonstrations
  Ŷ      the base model's own answer with demos (the ICL answer)
  A_ICL  teacher activations, (L, D) per example: one position (T=1)
  L, D   number of decoder layers, hidden size
  T      response tokens aligned; T=1 for single-token tasks
  r, α   LoRA rank and scale numerator (8, 8: scale α/r = 1)
  β      weight of the SFT term in IA2+SFT

Quick start (digits as labels, the paper's lr grid, 5 runs):
  python ia2.py --model Qwen/Qwen3-0.6B --task sst2
prints a table of accuracy and ECE (mean ± std over runs) per method and writes
config.json, results.json, results.md and the adapters to a run folder.

But (deviations from the official code, details in README.md):
  - the best dev checkpoint is really restored (the official code keeps the last);
  - torch is seeded; one right-padded batch of min(4, N) replaces gradient accumulation;
  - losses and LoRA are fp32 over a bf16 (CUDA) or fp32 (CPU) base model;
  - single-token tasks only (T=1); labels must be one token each.
"""
import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm  # installed with transformers and datasets

METHODS = ("zero_shot", "icl", "sft", "sft_icl", "ia2", "ia2_then_sft", "ia2_plus_sft")
TRAINED = ("sft", "sft_icl", "ia2", "ia2_then_sft", "ia2_plus_sft")
METRICS = ("accuracy", "label_accuracy", "ece", "ece_equal_width")


class IA2Error(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


# -----------------------------------------------------------------------------
# Configuration: one dataclass, the command line is generated from it


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = arg("Qwen/Qwen3-0.6B", "Hub id or local folder of a causal LM (paper: Qwen3-4B-Base, Llama-3.2-1B)")
    task: str = arg("sst2", "task whose template and labels are used; known: " + "sst2")
    data: str = arg(None, "local .csv/.jsonl/.parquet with columns text,label (label = index into the label "
                    "strings) used instead of the Hub; shuffled with seed 42, the last --eval-size rows are the eval set")
    labels: tuple = arg(None, "label strings instead of the task's (sst2: 0 1). Each must be one token. A leading "
                       "space is part of the string: quote it, --labels ' negative' ' positive'")
    n_train: int = arg(4, "N, labelled examples per run; each query sees the other N-1 as demos (paper: 4 Qwen, 8 Llama)")
    runs: int = arg(5, "runs r = 0..runs-1, each a different draw of the N examples (paper: 5)")
    lr: tuple = arg((1e-4, 3e-4, 1e-3), "learning rate, or a grid to select from (paper: 1e-4 3e-4 1e-3)")
    methods: tuple = arg(METHODS, "methods to run, any of: " + " ".join(METHODS))
    beta: float = arg(0.5, "β in (1-β)·L_IA2 + β·L_SFT for ia2_plus_sft (paper grids: Qwen 0.1-0.9, Llama 0.001-0.5)")
    eval_size: int = arg(500, "evaluation examples, never trained on (paper: 500)")
    pool_size: int = arg(2000, "training pool the N examples, dev set and ICL demos are drawn from (paper: 2000)")
    epochs: int = arg(50, "maximum epochs (paper: 50)")
    patience: int = arg(5, "stop after this many dev checks without improvement; a check every 2 steps (paper: 5)")
    batch_size: int = arg(4, "examples per optimizer step, min(this, N) (paper: 4, by gradient accumulation)")
    rank: int = arg(8, "LoRA rank r on q_proj, k_proj, o_proj (paper: 8; alpha = rank, scale 1)")
    seed: int = arg(0, "run r uses seed seed+r for its split, demo order, LoRA init and shuffles (paper: r)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu; bf16 base on cuda, fp32 elsewhere")
    out: str = arg(None, "output folder; unset: runs/<task>-<model>-n<N>-<time>")


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

# Templates and label strings of the official code: no space after the colon.
TASKS = {
    "sst2": dict(hub="stanfordnlp/sst2", pool_split="train", eval_split="validation", text="sentence",
                 template="Text:{text}\nLabel:", labels=["0", "1"]),  # 0 negative, 1 positive
}


def make_prompt(template: str, query: str, demos=()) -> str:
    """Demos are 'question+answer', joined by a blank line; one more precedes the query."""
    return "".join(d + "\n\n" for d in demos) + template.format(text=query)


def load_data(cfg: Config, task: dict, n_labels: int):
    """Returns (pool, eval_set), lists of (text, label_index)."""
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if cfg.data:
        kinds = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
        kind = kinds.get(os.path.splitext(cfg.data)[1].lower())
        if not os.path.isfile(cfg.data):
            raise IA2Error(f"data file not found: {cfg.data}")
        if kind is None:
            raise IA2Error(f"--data must end in .csv, .jsonl or .parquet, got {cfg.data}")
        try:
            ds = datasets.load_dataset(kind, data_files=cfg.data, split="train").shuffle(seed=42)
        except Exception as e:
            raise IA2Error(f"cannot read {cfg.data}: {str(e).splitlines()[0]}")
        if "text" not in ds.column_names or "label" not in ds.column_names:
            raise IA2Error(f"{cfg.data} needs columns 'text' and 'label', found {ds.column_names}")
        text, n_eval = "text", min(cfg.eval_size, len(ds) // 2)
        ev, pool = ds.select(range(len(ds) - n_eval, len(ds))), ds.select(range(len(ds) - n_eval))
    else:
        try:
            pool = datasets.load_dataset(task["hub"], split=task["pool_split"]).shuffle(seed=42)
            ev = datasets.load_dataset(task["hub"], split=task["eval_split"]).shuffle(seed=42)
        except Exception as e:
            raise IA2Error(f"cannot load {task['hub']} from the Hub ({str(e).splitlines()[0]}); "
                           "use --data FILE for a local copy")
        text, ev = task["text"], ev.select(range(min(cfg.eval_size, len(ev))))
    pool = pool.select(range(min(cfg.pool_size, len(pool))))
    return _rows(pool, text, n_labels), _rows(ev, text, n_labels)


def _rows(ds, text: str, n_labels: int):
    rows = list(zip(ds[text], ds["label"]))
    for t, y in rows:
        if not (isinstance(t, str) and isinstance(y, int) and 0 <= y < n_labels):
            raise IA2Error(f"bad row (text={str(t)[:40]!r}, label={y!r}): labels must be integers in "
                           f"0..{n_labels - 1}, one per label string, and text a string")
    return rows


def few_shot_split(pool: list, n: int, seed: int):
    """Run r: permute the pool with RandomState(r); train = first N, dev = next min(48, N//2), rest = demos."""
    perm = np.random.RandomState(seed).permutation(len(pool))
    n_dev = min(48, n // 2)
    pick = lambda idx: [pool[i] for i in idx]
    return pick(perm[:n]), pick(perm[n:n + n_dev]), pick(perm[n + n_dev:])


def encode(tok, prompt: str) -> list:
    return tok(prompt).input_ids  # with the tokenizer's BOS, if it adds one (Llama, Gemma do; Qwen does not)


def training_items(tok, task, labels, train, dev, seed):
    """Each training query sees the other N-1 examples as demos, in a random order of its own;
    dev example j reuses training example j's demos (official code)."""
    rng = np.random.RandomState(seed)
    shots = [make_prompt(task["template"], t) + labels[y] for t, y in train]
    demo_sets = []
    for i in range(len(train)):
        others = [shots[j] for j in range(len(train)) if j != i]
        demo_sets.append([others[k] for k in rng.permutation(len(others))])
    items = lambda rows: [dict(x=encode(tok, make_prompt(task["template"], t)), y=y,
                               icl=encode(tok, make_prompt(task["template"], t, demo_sets[j])))
                          for j, (t, y) in enumerate(rows)]
    return items(train), items(dev)


def icl_eval_prompts(tok, task, labels, demos_pool, eval_set, k, seed):
    """ICL evaluation: k = N-1 demos per query drawn from the held-out rest of the pool."""
    rng = np.random.RandomState(seed)
    out = []
    for t, _ in eval_set:
        demos = [make_prompt(task["template"], demos_pool[i][0]) + labels[demos_pool[i][1]]
                 for i in rng.choice(len(demos_pool), k, replace=False)]
        out.append(encode(tok, make_prompt(task["template"], t, demos)))
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
    change them, and each prompt's last token keeps its index d = len(prompt) - 1."""
    R = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), R), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), R), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    last = torch.tensor([len(s) - 1 for s in seqs])
    return ids.to(device), mask.to(device), last.to(device)


def forward(model, seqs: list, capture=False):
    """One forward over a batch of token lists. Returns the fp32 logits at each last prompt token
    (B, V) and, with capture, the self-attention outputs there (B, L, D)."""
    ids, mask, last = pad_right(seqs, model.config.pad_token_id or 0, model.device)
    rows = torch.arange(len(seqs), device=model.device)
    with capture_activations(model) if capture else contextlib.nullcontext() as acts:
        h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.lm_head(h[rows, last]).float()  # the LM head only where it is read: V is large
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits, torch.stack([a[rows, last] for a in acts], 1) if capture else None


# -----------------------------------------------------------------------------
# 4. The teacher: the base model reading the N-1 demos, then the query (§4)


@torch.no_grad()
def teacher(model, items: list, bs: int):
    """Adds to each item A_ICL (L, D) at d_icl and Ŷ, the teacher's greedy answer. With T=1 one
    forward gives both; the activations stay in the base dtype."""
    with lora_disabled(model):
        for i in range(0, len(items), bs):
            batch = items[i:i + bs]
            logits, acts = forward(model, [it["icl"] for it in batch], capture=True)
            for it, a, y in zip(batch, acts, logits.argmax(-1).tolist()):
                it["A_icl"], it["y_icl"] = a, y
    return items


# -----------------------------------------------------------------------------
# 5. The losses (Eq. 2, Eq. 4, §6)


def ia2_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, L, D) student and teacher activations at the aligned position.
    L_IA2 = L · mean((S - A_ICL)²): the per-layer MSE summed over layers (official code;
    Eq. 4 writes a norm). With one position per example, the batch mean is the mean of
    the per-example losses."""
    return student.shape[1] * (student.float() - teacher.float()).pow(2).mean()


def sft_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy of the target token at the last prompt token (Eq. 2, T=1)."""
    return F.cross_entropy(logits.float(), target)


def objective_loss(model, objective: str, batch: list, label_ids: list, beta: float):
    """The student reads only the query X. Objectives: sft (ground truth Y), sft_icl (targets Ŷ),
    ia2, ia2_plus_sft = (1-β)·L_IA2 + β·L_SFT(Ŷ) in one forward (official code's convex form)."""
    needs_acts = objective in ("ia2", "ia2_plus_sft")
    logits, acts = forward(model, [it["x"] for it in batch], capture=needs_acts)
    dev = logits.device
    y = torch.tensor([label_ids[it["y"]] for it in batch], device=dev)
    if objective == "sft":
        return sft_loss(logits, y)
    y_icl = torch.tensor([it["y_icl"] for it in batch], device=dev)
    if objective == "sft_icl":
        return sft_loss(logits, y_icl)
    l_ia2 = ia2_loss(acts, torch.stack([it["A_icl"] for it in batch]).to(dev))
    if objective == "ia2":
        return l_ia2
    return (1 - beta) * l_ia2 + beta * sft_loss(logits, y_icl)


# -----------------------------------------------------------------------------
# 6. Training: Adam, constant lr, early stopping on the dev loss (§5, App. B)


@torch.no_grad()
def dev_loss(model, objective, dev, label_ids, cfg):
    bs = min(cfg.batch_size, cfg.n_train)
    batches = [dev[i:i + bs] for i in range(0, len(dev), bs)]
    return sum(objective_loss(model, objective, b, label_ids, cfg.beta).item() * len(b) for b in batches) / len(dev)


def train(model, objective: str, train_set: list, dev: list, label_ids: list, cfg: Config, lr: float,
          seed: int, tag: str):
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
            loss = objective_loss(model, objective, [train_set[j] for j in order[i:i + bs]], label_ids, cfg.beta)
            if not torch.isfinite(loss):
                raise IA2Error(f"{tag}: the training loss became {loss.item()} at step {step}; try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 2 and i + bs < len(order):
                continue  # check every 2 steps, and at each epoch's end
            d = dev_loss(model, objective, dev, label_ids, cfg)
            if d < best:
                best, best_state, bad = d, lora_state(model), 0
            else:
                bad += 1
            print(f"[{tag}] ep {epoch} step {step} | loss {loss.item():.4f} | dev {d:.4f}{' *' if bad == 0 else ''}")
            if bad >= cfg.patience:
                break
        if bad >= cfg.patience:
            break
    load_lora_state(model, best_state)
    return best, step


# -----------------------------------------------------------------------------
# 7. Evaluation: one forward, the full-vocabulary softmax at the last prompt token (§5)


@torch.no_grad()
def predict(model, seqs: list, label_ids: list, bs: int = 32):
    """Per example: the top-10 token ids and probabilities, and the probability of each label's token.
    Prompts are sorted by length so that batches carry little padding."""
    top_p, top_id, label_p = [None] * len(seqs), [None] * len(seqs), [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for k in tqdm(range(0, len(order), bs), desc="eval", leave=False, disable=None):  # bar on a terminal only
        idx = order[k:k + bs]
        probs = forward(model, [seqs[i] for i in idx])[0].softmax(-1)
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
    ECE: the paper's (top-1 renormalised over the top 10, equal mass) and the equal-width one."""
    top_p, top_id, label_p = pred
    correct = top1_correct(top_id, gold, tok, labels)
    return dict(accuracy=100 * correct.mean(),
                label_accuracy=100 * (label_p[np.arange(len(gold)), gold] >= label_p.max(-1)).mean(),
                ece=ece(top_p[:, 0] / top_p.sum(-1), correct),
                ece_equal_width=ece_equal_width(top_p[:, 0], correct))


def top1_correct(top_id: np.ndarray, gold: np.ndarray, tok, labels: list) -> np.ndarray:
    words = [tok.decode([int(i)]).strip() for i in top_id[:, 0]]
    return np.array([w == labels[g].strip() for w, g in zip(words, gold)], dtype=float)


# -----------------------------------------------------------------------------
# 8. The experiment: every method x lr x run, then the paper's lr selection (§5)


def load_model(name: str, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        where = "local folder" if os.path.isdir(name) else "not a local folder, and the Hub"
        raise IA2Error(f"cannot load model {name!r} ({where} said: {str(e).splitlines()[0]})")
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
    """Everything that can fail on the user's input fails here, before anything is written."""
    if cfg.task not in TASKS:
        raise IA2Error(f"unknown task {cfg.task!r}; known: {', '.join(TASKS)}")
    if set(cfg.methods) - set(METHODS):
        raise IA2Error(f"unknown method(s) {sorted(set(cfg.methods) - set(METHODS))}; known: {' '.join(METHODS)}")
    if cfg.n_train < 2 or cfg.runs < 1 or cfg.eval_size < 1:
        raise IA2Error("need --n-train >= 2 (one training example plus its demos), --runs >= 1, --eval-size >= 1")
    if min(cfg.lr) <= 0 or not 0 <= cfg.beta <= 1:
        raise IA2Error("need --lr > 0 and 0 <= --beta <= 1")
    task = TASKS[cfg.task]
    labels = cfg.labels or task["labels"]
    device, dtype = pick_device(cfg.device)
    tok, model = load_model(cfg.model, device, dtype)
    label_ids = label_tokens(tok, labels)
    pool, eval_set = load_data(cfg, task, len(labels))
    need = cfg.n_train + min(48, cfg.n_train // 2) + cfg.n_train - 1
    if len(pool) < need:
        raise IA2Error(f"N={cfg.n_train} needs {need} pool examples (N train, min(48, N//2) dev, N-1 ICL "
                       f"demos), the data has {len(pool)}")
    add_lora(model, r=cfg.rank, alpha=cfg.rank)
    queries = [encode(tok, make_prompt(task["template"], t)) for t, _ in eval_set]
    return dict(task=task, labels=labels, tok=tok, model=model, label_ids=label_ids, pool=pool,
                eval_set=eval_set, queries=queries, gold=np.array([y for _, y in eval_set]))


def one_run(cfg: Config, E: dict, r: int, records: dict, timing: dict, tmp: str):
    """Run r: draw N examples, compute the teacher once, then train and evaluate every method."""
    model, s, tick = E["model"], cfg.seed + r, time.time()
    train_rows, dev_rows, rest = few_shot_split(E["pool"], cfg.n_train, s)
    tr, dv = training_items(E["tok"], E["task"], E["labels"], train_rows, dev_rows, s)
    if set(cfg.methods) & {"sft_icl", "ia2", "ia2_then_sft", "ia2_plus_sft"}:
        teacher(model, tr + dv, bs=cfg.batch_size)
        timing["teacher"] += time.time() - tick
        print(f"[run {r}] teacher ICL answers on the {len(tr)} training examples: "
              f"{sum(it['y_icl'] == E['label_ids'][it['y']] for it in tr)}/{len(tr)} correct")
    evaluate = lambda seqs: metrics(predict(model, seqs, E["label_ids"]), E["gold"], E["tok"], E["labels"])
    if "icl" in cfg.methods:
        tick = time.time()
        prompts = icl_eval_prompts(E["tok"], E["task"], E["labels"], rest, E["eval_set"], cfg.n_train - 1, s)
        with lora_disabled(model):
            records["icl"].setdefault(None, []).append(dict(run=r, **evaluate(prompts)))
        timing["eval/icl"] += time.time() - tick
    for lr in cfg.lr:
        ia2_state = None
        for m in [m for m in TRAINED if m in cfg.methods]:
            tick, tag = time.time(), f"{m} lr={lr:g} run {r}"
            set_seed(s)
            for mod in lora_modules(model).values():
                mod.reset()
            if m == "ia2_then_sft":  # continue the IA2 adapter of the same (lr, run) with SFT
                if ia2_state is None:
                    train(model, "ia2", tr, dv, E["label_ids"], cfg, lr, s, tag + " (ia2 phase)")
                else:
                    load_lora_state(model, ia2_state)
            best, steps = train(model, "sft" if m == "ia2_then_sft" else m, tr, dv, E["label_ids"], cfg, lr, s, tag)
            if m == "ia2":
                ia2_state = lora_state(model)
            timing[f"train/{m}"] += time.time() - tick
            tick = time.time()
            rec = dict(run=r, **evaluate(E["queries"]), dev_loss=best, steps=steps)
            records[m].setdefault(lr, []).append(rec)
            timing[f"eval/{m}"] += time.time() - tick
            print(f"[{tag}] acc {rec['accuracy']:.1f} | ece {rec['ece']:.3f} | best dev {best:.4f} | {steps} steps")
            save_adapter(model, os.path.join(tmp, "adapters", m, f"lr{lr:g}", f"run{r}"), cfg)


def summarize(records: dict) -> dict:
    """Mean and population std (ddof=0) over runs for each lr; the lr is chosen, as in the paper, by
    the best mean top-1 accuracy on the eval set. The lr with the lowest mean dev loss is reported too."""
    out = {}
    for m, by_lr in records.items():
        rows = {lr: dict(runs=runs, mean={k: float(np.mean([x[k] for x in runs])) for k in METRICS},
                         std={k: float(np.std([x[k] for x in runs])) for k in METRICS}) for lr, runs in by_lr.items()}
        if m not in TRAINED:
            out[m] = dict(lr=None, **rows[None])
            continue
        lr_eval = max(rows, key=lambda lr: rows[lr]["mean"]["accuracy"])
        lr_dev = min(rows, key=lambda lr: np.mean([x["dev_loss"] for x in by_lr[lr]]))
        out[m] = dict(lr=lr_eval, mean=rows[lr_eval]["mean"], std=rows[lr_eval]["std"], lr_dev_selected=lr_dev,
                      dev_selected=dict(mean=rows[lr_dev]["mean"], std=rows[lr_dev]["std"]),
                      by_lr={f"{lr:g}": row for lr, row in rows.items()})
    return out


def table(results: dict) -> str:
    pm = lambda r, k, scale="{:.1f}": f"{scale.format(r['mean'][k])} ± {scale.format(r['std'][k])}"
    lines = ["| method | lr | accuracy | label acc. | ECE | ECE (equal width) | lr (dev-selected) | accuracy "
             "(dev-selected) |", "|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        if m not in results:
            continue
        r = results[m]
        dev = ([f"{r['lr_dev_selected']:g}", pm(r["dev_selected"], "accuracy")] if r["lr"] is not None
               else ["–", "–"])
        lines.append(" | ".join(["", m, "–" if r["lr"] is None else f"{r['lr']:g}", pm(r, "accuracy"),
                                 pm(r, "label_accuracy"), pm(r, "ece", "{:.3f}"), pm(r, "ece_equal_width", "{:.3f}"),
                                 *dev, ""]).strip())
    return "\n".join(lines) + ("\n\naccuracy and label accuracy in %, ECE as a fraction; mean ± std over runs. "
                               "lr: selected on the eval set by mean accuracy, as the paper does; "
                               "lr (dev-selected): lowest mean dev loss.")


def run_experiment(cfg: Config) -> dict:
    t0 = time.time()
    out = cfg.out or os.path.join("runs", f"{cfg.task}-{os.path.basename(cfg.model.rstrip('/'))}-n{cfg.n_train}"
                                          f"-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out):
        raise IA2Error(f"output folder {out} exists; choose another --out")
    E, tmp = setup(cfg), out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    records = {m: {} for m in cfg.methods}
    timing = collections.defaultdict(float, load=time.time() - t0)  # seconds per phase, summed over runs
    try:
        if "zero_shot" in cfg.methods:
            tick = time.time()
            with lora_disabled(E["model"]):
                records["zero_shot"][None] = [dict(run=0, **metrics(predict(E["model"], E["queries"], E["label_ids"]),
                                                                   E["gold"], E["tok"], E["labels"]))]
            timing["eval/zero_shot"] = time.time() - tick
        for r in range(cfg.runs):
            one_run(cfg, E, r, records, timing, tmp)
        results = summarize(records)
        timing["total"] = time.time() - t0
        write_outputs(cfg, E, tmp, results, timing)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written output
        raise
    print("\n" + table(results) + f"\n\nwritten to {out}/ in {timing['total']:.0f} s")
    return results


def write_outputs(cfg: Config, E: dict, folder: str, results: dict, timing: dict):
    import transformers
    model = E["model"]
    meta = dict(config=dataclasses.asdict(cfg), labels=E["labels"], label_token_ids=E["label_ids"],
                template=E["task"]["template"], model_class=type(model).__name__,
                layers=model.config.num_hidden_layers, device=str(model.device), dtype=str(model.dtype),
                pool_size=len(E["pool"]), eval_size=len(E["eval_set"]),
                versions=dict(torch=torch.__version__, transformers=transformers.__version__))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(dict(methods=results, timing_s=timing, selection="lr selected on the eval set by mean "
                       "top-1 accuracy (paper); dev_selected: lowest mean dev loss"), f, indent=2)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(f"# {cfg.task}, {cfg.model}, N={cfg.n_train}, {cfg.runs} runs\n\n{table(results)}\n")


def main(argv=None):
    cfg = parse_args(argv)
    try:
        run_experiment(cfg)
    except IA2Error as e:
        print(f"ia2.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
