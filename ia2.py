"""IA2: ICL Activation Alignment, then supervised fine-tuning, in one file.

IA2 distils in-context learning (ICL) into adapter weights: the model *without* demonstrations is trained to
reproduce the self-attention outputs that the same model produces *with* N-1 demonstrations, then fine-tuned
as usual (SFT). Mishra, Khashabi, Liu. "IA2: Alignment with ICL Activations Improves Supervised Fine-Tuning."
ICLR 2026, arXiv:2509.22621.

Part I is IA2 for one adapter, in the order of the paper; a reader who stops at its end has read the method:
  1. the prompts and the few-shot split of a run (§5, App. A) .......... make_prompt, few_shot_split
  2. the adapters by hand: LoRA, (IA)³ (§5; Tables 6, 16-20) ........... LoRALinear, IA3Linear, add_lora
  3. the self-attention outputs of every layer (§2) ..................... capture_activations, forward
  4. the losses: IA2 (Eq. 4), SFT (Eq. 2), IA2+SFT (§6), KD (Table 4) ... ia2_loss, sft_loss, objective_loss
  5. the teacher: the base model reading the N-1 demos (§3, §4) ........ generate, teacher
  6. training, and IA2→SFT (§4, §5) ..................................... fit, ia2_then_sft
  7. evaluation: top-1 accuracy, ECE, generated answers (§5) ............ predict, metrics, ece
Part II runs the paper's protocol fast: a method's whole grid of (lr, run, β) adapters trains as one model
with K adapters per forward pass, on Part I's forward, teacher, losses and metrics (a test checks each of its
adapters against Part I's `fit`); then the 12 tasks, the experiment, its tables and the command line.

Symbols: X the query prompt ("Text:a gripping film\nLabel:"); Y its ground truth; I the other N-1 training
examples (the demos); Ŷ the base model's greedy answer with demos, T' <= T tokens; A_ICL (L, T', D) its
self-attention outputs at d_icl+t; d_q, d_icl the last prompt token of X and of I∘X; L, D layers and hidden
size; T = 1 (single-token tasks) or 200; r, α the LoRA rank and scale numerator (8, 8); l the (IA)³ vector;
β the weight of the SFT term in IA2+SFT.

    python ia2.py --model Qwen/Qwen3-0.6B --task sst2      # the paper's protocol: accuracy and ECE per method
    python ia2.py --model Qwen/Qwen3-0.6B --task sst2 --eval-tasks sst2 finsen poems --adapter ia3
    python ia2.py --model Qwen/Qwen3-0.6B --task gsm8k

One adapter from Python (tutorial.ipynb), with train and dev items from training_items():
    add_lora(model); teacher(model, train + dev, 1, tok.eos_token_id); ia2_then_sft(model, train, dev, 1e-3)

But (README.md, Deviations): the best dev checkpoint is really restored (restore="last" keeps the last, as the
official code does); torch is seeded; padded batches replace gradient accumulation; adapters, logits and
losses are fp32; one KV-cached rollout gives Ŷ, A_ICL and the KD targets.
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the libraries load: one line, no traceback (then: main)
    def stop_at_once(signum, frame):
        print("ia2.py: stopped before the run began; nothing was written", file=sys.stderr)
        sys.exit(128 + signum)  # 130 for Ctrl-C (SIGINT), 143 for SIGTERM
    signal.signal(signal.SIGINT, stop_at_once)
    signal.signal(signal.SIGTERM, stop_at_once)

import contextlib
import functools
import inspect
import math
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class IA2Error(Exception):
    """A problem with the input or the run, said in one line (the command line exits with code 2)."""


# -----------------------------------------------------------------------------
# 1. The prompts and the few-shot split of one run (§5 "Data Setup", App. A; create_training_datasets.py)


def make_prompt(x: str, demos=()) -> str:
    """I∘X: demos are 'question+answer', joined by a blank line; one more precedes the query X."""
    return "".join(d + "\n\n" for d in demos) + x


def encode(tok, prompt: str) -> list:
    return tok(prompt).input_ids  # with the tokenizer's BOS, if it adds one (Llama, Gemma do; Qwen does not)


def answer_text(labels, y) -> str:
    return labels[y] if labels else y  # single-token tasks: the label string; multi-token: the answer itself


def few_shot_split(pool: list, n: int, seed: int):
    """Run r, with one RandomState(r) as in the official code: permute the pool; train = the first N, dev =
    the next min(48, N//2), rest = the ICL-evaluation demos. The same generator then shuffles, for each
    training query i, the other N-1 training indices: its demos, in that order."""
    rng = np.random.RandomState(seed)
    perm, n_dev, orders = rng.permutation(len(pool)), min(48, n // 2), []
    for i in range(n):
        orders.append([j for j in range(n) if j != i])
        rng.shuffle(orders[-1])
    train, dev, rest = ([pool[i] for i in idx] for idx in (perm[:n], perm[n:n + n_dev], perm[n + n_dev:]))
    return train, dev, rest, orders


def training_items(tok, labels, train: list, dev: list, orders: list):
    """(X, y) pairs -> items: x = X's ids, icl = I∘X's, y_ids = the answer's, tokenised apart from the prompt
    (+ EOS for an answer text). Query i's demos are the other training examples in the order orders[i]; dev
    example j reuses query j's (official code)."""
    shots = [x + answer_text(labels, y) for x, y in train]

    def item(j, x, y):
        y_ids = tok(answer_text(labels, y), add_special_tokens=False).input_ids
        demos = [shots[k] for k in orders[j]]
        return dict(x=encode(tok, x), y=y, y_ids=y_ids + [tok.eos_token_id] * (not labels),
                    icl=encode(tok, make_prompt(x, demos)))
    return [item(j, x, y) for j, (x, y) in enumerate(train)], [item(j, x, y) for j, (x, y) in enumerate(dev)]


def icl_eval_prompts(tok, labels, demos_pool: list, eval_set: list, k: int, seed: int) -> list:
    """ICL evaluation: k = N-1 demos per query drawn from the held-out rest of the pool with RandomState(r).
    For an OOD task the pool and `labels` are the source task's, the queries the OOD task's (§5)."""
    rng, prompts = np.random.RandomState(seed), []
    for x, _ in eval_set:
        drawn = rng.choice(len(demos_pool), k, replace=False)
        demos = [demos_pool[i][0] + answer_text(labels, demos_pool[i][1]) for i in drawn]
        prompts.append(encode(tok, make_prompt(x, demos)))
    return prompts


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# 2. The adapters, by hand (§5; Tables 6, 16-20): W0 frozen, the adapter fp32 whatever the base model's dtype.
#    LoRA, h = W0 x + (α/r)·B A x (r = α = 8, on q, k, o); (IA)³, h = W0 (l ⊙ x)


class LoRALinear(nn.Module):
    """A frozen nn.Linear W0 plus a low-rank update B A. A starts Kaiming-uniform and B zero, so ΔW = BA = 0:
    the model starts as the base model."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 8):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / r, True
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.B = nn.Parameter(torch.empty(base.out_features, r, device=base.weight.device))
        self.init(self.A, self.B)

    @staticmethod
    def init(A, B):
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # PEFT's default, used by the official code
        nn.init.zeros_(B)

    def weights(self):
        return self.A, self.B  # (the many-adapters engine gives each batch row its own A, B here)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        A, B = self.weights()
        return y + (self.scale * (x.float() @ A.mT @ B.mT)).to(y.dtype)  # + (α/r)·B A x


class IA3Linear(nn.Module):
    """A frozen nn.Linear W0 whose input is scaled by a learned vector l (1, d_in), l = 1 at the start: (IA)³
    (Liu et al. 2022) as the official code configures PEFT, every target a "feed-forward" module."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base, self.enabled = base, True
        self.l = nn.Parameter(torch.empty(1, base.in_features, device=base.weight.device))
        self.init(self.l)

    @staticmethod
    def init(l):
        nn.init.ones_(l)

    def weights(self):
        return self.l,

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        l, = self.weights()
        return self.base((x.float() * l).to(x.dtype))  # W0 (l ⊙ x)


ADAPTERS = (LoRALinear, IA3Linear)
QKO = ("q_proj", "k_proj", "o_proj")  # the paper's targets in every layer (Table 7: qko, qkv, qk)


def add_lora(model, targets=QKO, r: int = 8, alpha: float = 8):
    """Freezes the model and wraps each target of every layer in a fresh LoRALinear (of an adapter already
    there: its base). The init draws from torch's generator, module by module: set_seed first to repeat it."""
    return wrap(model, targets, lambda base: LoRALinear(base, r, alpha))


def add_ia3(model, targets=QKO):
    return wrap(model, targets, IA3Linear)


def wrap(model, targets, adapter):
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, (nn.Linear, *ADAPTERS)):
                setattr(module, name, adapter(getattr(child, "base", child)))
    return model


def adapter_modules(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, ADAPTERS)}


@contextlib.contextmanager
def without_adapters(model):
    """Inside the block the model is the base model: the teacher, zero-shot, ICL."""
    mods = list(adapter_modules(model).values())
    old = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(mods, old):
            m.enabled = enabled


def adapter_state(model) -> dict:
    """A copy of the adapter: {parameter name: tensor}; the rest of the model is frozen."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model, state: dict):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


# -----------------------------------------------------------------------------
# 3. The self-attention output of every decoder layer (§2), read where the answer is


@contextlib.contextmanager
def capture_activations(model):
    """Inside the block, each forward appends one (B, R, D) tensor per layer: the output of
    layers[l].self_attn, i.e. o_proj's output before the residual add (not hidden_states)."""
    layers, acts = model.model.layers, []
    assert len(layers) == model.config.num_hidden_layers, "unexpected decoder layout"

    def keep(mod, args, out):
        acts.append(out[0] if isinstance(out, tuple) else out)
    handles = [layer.self_attn.register_forward_hook(keep) for layer in layers]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


def lm_logits(model, h: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states, the LM head in fp32 (in bf16 a logit of 20 would be rounded by up to
    0.06), and only where they are read (V is large)."""
    head = model.lm_head
    logits = F.linear(h.float(), head.weight.float(), None if head.bias is None else head.bias.float())
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma
    return cap * torch.tanh(logits / cap) if cap else logits


def forward(model, prompts: list, targets=None, capture=False, logits=True):
    """Teacher-forced forward of X∘target, right-padded (under causal attention the pads come after every
    real token: they change nothing, every position keeps its index). Position d+t, d = len(X)-1 the last
    prompt token, predicts target[t], t < T (the longest target; none: T=1). The last target token is never
    read, so not fed. Returns fp32 logits (B, T, V) and, with capture, the self-attention outputs
    (B, L, T, D)."""
    T = max(map(len, targets)) if targets else 1
    seqs = [x + list(y[:-1]) for x, y in zip(prompts, targets)] if targets else prompts
    R, dev = max(map(len, seqs)), model.device
    ids = torch.tensor([s + [model.config.pad_token_id or 0] * (R - len(s)) for s in seqs], device=dev)
    mask = torch.tensor([[1] * len(s) + [0] * (R - len(s)) for s in seqs], device=dev)
    d = torch.tensor([len(x) - 1 for x in prompts])[:, None]  # the last prompt token
    at = (d + torch.arange(T)).clamp(max=R - 1).to(dev)  # d+t
    rows = torch.arange(len(seqs), device=dev)[:, None]
    with capture_activations(model) if capture else contextlib.nullcontext() as acts:
        h = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return (lm_logits(model, h[rows, at]) if logits else None,
            torch.stack([a[rows, at] for a in acts], 1) if capture else None)


# -----------------------------------------------------------------------------
# 4. The losses (Eq. 2, Eq. 4, §6, Table 4): one per example, averaged over its own positions


def ia2_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, T, D) student and teacher activations at the aligned positions, mask (B, T) the real ones.
    L_IA2 = L · mean((S - A_ICL)²) over (L, T', D): the per-layer MSE summed over layers (official code;
    Eq. 4 writes a norm). Returns (B,)."""
    se = (student.float() - teacher.float()).pow(2).mean(-1) * mask[:, None]  # (B, L, T)
    return (se.sum(-1) / mask.sum(-1, keepdim=True)).sum(1)  # per-layer MSE (B, L), summed over layers


def sft_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy (official code; Eq. 2 generates) of the target tokens (B, T), -100 where
    there is none, averaged over each example's tokens. Returns (B,)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
    return ce.sum(1) / (target != -100).sum(1)


def kd_loss(logits: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft labels (Table 4): KL(p_ICL,t ‖ p_student,t) over the whole vocabulary at each aligned position,
    averaged over positions. (B, T, V) logits and log-probs; returns (B,)."""
    logq = logits.float().log_softmax(-1)
    kl = (teacher_logp.exp() * (teacher_logp - logq)).sum(-1)  # Σ_v p log(p/q), (B, T)
    return (kl * mask).sum(1) / mask.sum(1)


def padded(xs: list, T: int) -> torch.Tensor:
    """Stack (..., T', k) tensors, zero-padded to T along their second-to-last dimension."""
    return torch.stack([F.pad(x, (0, 0, 0, T - x.shape[-2])) for x in xs])


def target_of(objective: str, item: dict) -> list:
    """What the student reads after X (official code): the ground truth Y for sft, the ICL outputs for
    sft_icl, the rollout cut as generate() stops for kd, the teacher's rollout Ŷ otherwise."""
    return item[dict(sft="y_ids", sft_icl="y_out", kd="y_kd").get(objective, "y_icl")]


def objective_loss(model, objective: str, batch: list, beta=0.5) -> torch.Tensor:
    """Each example's loss (B,); the student reads X∘target and is read at d_q+t. sft, sft_icl:
    cross-entropy; ia2; ia2_plus_sft = (1-β)·L_IA2 + β·L_SFT(Ŷ) in one forward (the official code's convex
    form; β a number or one per example); kd."""
    targets, capture = [target_of(objective, it) for it in batch], objective in ("ia2", "ia2_plus_sft")
    logits, acts = forward(model, [it["x"] for it in batch], targets, capture, logits=objective != "ia2")
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
# 5. The teacher: the base model reading the N-1 demos, then the query (§3, §4)


@contextlib.contextmanager
def pads_zeroed(model, pad: torch.Tensor):
    """Inside the block, every layer's self-attention output is 0 at the positions that pad (B, R) marks. A
    left pad's query has no key to attend to: CPU kernels return 0 there, some GPU kernels NaN, which 0·NaN
    then carries into every real row of the next layer. With this, every backend gives the CPU's numbers."""
    def zero(mod, args, out):
        if isinstance(out, tuple):
            return (out[0].masked_fill(pad[..., None], 0), *out[1:])
        return out.masked_fill(pad[..., None], 0)
    handles = [layer.self_attn.register_forward_hook(zero) for layer in model.model.layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def generate(model, prompts: list, max_new: int, eos: set, stop=None, capture=False, scores=False):
    """Greedy decoding with a KV cache: the teacher rollout (§3), the evaluation (§5). Left padding puts every
    prompt's last token in the last column; position_ids = cumsum(mask)-1 give each row the positions it has
    alone (tested). A row ends after an id in `eos` (kept, with its activations, as in the official rollout)
    or once stop(previous token or None, token) is true (tensors (B,): no host sync). Per row: tokens (T',),
    acts (L, T', D) in the base dtype and logp (T', V) fp32, on the device. A test checks them against the
    official re-forward of the whole sequence."""
    B, R, dev, pad = len(prompts), max(map(len, prompts)), model.device, model.config.pad_token_id or 0
    ids = torch.tensor([[pad] * (R - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (R - len(p)) + [1] * (len(p) + max_new) for p in prompts], device=dev)  # ahead
    pos, cache = (mask[:, :R].cumsum(1) - 1).clamp(min=0), kv_cache(model)
    eos = torch.tensor(sorted(eos), device=dev)
    tokens, acts_t, logp_t, finite = [], [], [], torch.ones((), dtype=torch.bool, device=dev)
    done, length = torch.zeros(B, dtype=torch.bool, device=dev), torch.full((B,), max_new, device=dev)
    with capture_activations(model) if capture else contextlib.nullcontext() as acts:
        with pads_zeroed(model, mask[:, :R] == 0):  # the prompts, at once; then one token per step
            h = model.model(input_ids=ids, attention_mask=mask[:, :R], position_ids=pos, use_cache=True,
                            **cache).last_hidden_state
        for t in range(max_new):
            logits = lm_logits(model, h[:, -1])  # (B, V); the cache grew in place
            y, finite = logits.argmax(-1), finite & torch.isfinite(logits).all()
            ends = torch.isin(y, eos)
            if stop:
                ends |= stop(tokens[-1] if tokens else None, y)
            tokens.append(y)
            if capture:
                acts_t.append(torch.stack([a[:, -1] for a in acts], 1))  # (B, L, D) at this step's position
                acts.clear()
            if scores:
                logp_t.append(logits.log_softmax(-1))
            length, done = torch.where(ends & ~done, t + 1, length), done | ends
            if t == max_new - 1 or t % 8 == 7 and bool(done.all()):  # a host sync every 8 steps, not each
                break
            pos = pos[:, -1:] + 1
            h = model.model(input_ids=y[:, None], attention_mask=mask[:, :R + t + 1], position_ids=pos,
                            use_cache=True, **cache).last_hidden_state
    if not finite:
        raise IA2Error(f"the model's logits became nan or inf while generating ({model.dtype} on {dev.type})"
                       + try_fp32(model))
    tokens, n = torch.stack(tokens, 1).tolist(), length.tolist()
    acts_t = torch.stack(acts_t, 2) if capture else None  # (B, L, T, D)
    logp_t = torch.stack(logp_t, 1) if scores else None  # (B, T, V)
    return [dict(tokens=tokens[i][:n[i]], acts=acts_t[i, :, :n[i]] if capture else None,
                 logp=logp_t[i, :n[i]] if scores else None) for i in range(B)]


def try_fp32(model) -> str:
    """What an error about nan or inf suggests: a dtype with the range of fp32, unless it is fp32 already."""
    return "" if model.dtype == torch.float32 else "; try float32 (--dtype float32)"


def kv_cache(model) -> dict:
    """An empty KV cache, as the keyword the model's forward takes: `cache` from transformers 5.24 on (which
    deprecates `past_key_values`, gone in 5.40), `past_key_values` before."""
    from transformers import DynamicCache
    name = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    return {name: DynamicCache(config=model.config)}


def teacher(model, items: list, T: int, eos_id: int, kd=False) -> list:
    """Adds to each item Ŷ (y_icl) and A_ICL (L, T', D) at d_icl+t: one greedy rollout of the base model on
    I∘X, stopped only at the tokenizer's EOS, with no "\\n\\n" stop (official get_activations; T=1 for
    single-token tasks: one forward). Where the official code calls generate() instead, which stops at every
    EOS of the generation_config, the rollout is cut there: y_out, the "ICL outputs" (targets of sft_icl and
    ia2_then_sft_icl), and, with kd, y_kd with its log-probabilities logp_icl (T', V)."""
    eos = eos_ids(model, eos_id)
    with without_adapters(model):
        outs = generate(model, [it["icl"] for it in items], T, {eos_id}, capture=True, scores=kd)
    for it, o in zip(items, outs):
        if not torch.isfinite(o["acts"]).all():
            raise IA2Error(f"the teacher's activations (A_ICL) are nan or inf ({model.dtype} on "
                           f"{model.device.type})" + try_fp32(model))
        it.update(y_icl=o["tokens"], A_icl=o["acts"], y_out=icl_output(o["tokens"], T, eos, eos_id))
        if kd:  # the official collect_icl_distributions: no EOS appended
            n = generate_length(o["tokens"], eos)
            it.update(y_kd=o["tokens"][:n], logp_icl=o["logp"][:n])
    return items


def eos_ids(model, eos_id: int) -> set:
    """Where the official generate() calls stop (evaluation, ICL outputs, KD distributions): at every EOS id
    of the model's generation_config (Llama-3 Instruct and Qwen3 list several), else at the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    return set([ids] if isinstance(ids, int) else ids or []) or {eos_id}


def generate_length(tokens: list, eos: set) -> int:
    """How much of a rollout a generate() that stops at the ids in `eos` keeps: up to the first one, kept."""
    return next((i + 1 for i, y in enumerate(tokens) if y in eos), len(tokens))


def icl_output(tokens: list, T: int, eos: set, eos_id: int) -> list:
    """The official collect_icl_outputs from a rollout: cut as generate() stops; a cut before T tokens on an
    id other than the tokenizer's EOS gets that EOS appended."""
    cut = generate_length(tokens, eos)
    return tokens[:cut] + [eos_id] * (cut < T and tokens[cut - 1] != eos_id)


# -----------------------------------------------------------------------------
# 6. Training (§5, App. B): Adam at a constant lr, early stopping on the dev loss; IA2→SFT (§4)


def shuffled_batches(n: int, batch_size: int, epochs: int, seed: int):
    """Yields (epoch, example indices, whether the epoch ends with it): each epoch reshuffles the n examples
    with one RandomState(seed) and cuts them into batches of batch_size, the last one maybe smaller."""
    rng = np.random.RandomState(seed)
    for epoch in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield epoch, order[start:start + batch_size], start + batch_size >= n


def fit(model, objective: str, train: list, dev: list, lr: float, beta=None, seed=0, epochs=50, patience=5,
        batch_size=4, restore="best", tag="fit") -> list:
    """Trains the model's adapter on `objective`: Adam (default betas, no weight decay) at a constant lr, on
    batches of batch_size examples (the official code accumulates one example at a time to min(4, N): the
    same step), reshuffled each epoch. The dev loss every 2 steps and at each epoch's end; stop after
    `patience` checks without a new best, or after `epochs`; then restore the best adapter (restore="last":
    keep the last, which is what the official code does). Prints each dev check; returns the dev losses."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    best, bad, devs, kept = math.inf, 0, [], adapter_state(model)
    batches = shuffled_batches(len(train), batch_size, epochs, seed)
    for step, (epoch, batch, epoch_end) in enumerate(batches, 1):
        loss = objective_loss(model, objective, [train[i] for i in batch], beta).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 2 and not epoch_end:
            continue  # a dev check every 2 steps and at each epoch's end
        with torch.no_grad():
            devs.append(objective_loss(model, objective, dev, beta).mean().item())
        if devs[-1] < best:
            best, bad, kept = devs[-1], 0, adapter_state(model)
        else:
            bad += 1
        mark = " *" * (bad == 0)  # a new best
        print(f"[{tag}] ep {epoch} step {step} | loss {loss.item():.4f} | dev {devs[-1]:.4f}{mark}")
        if bad == patience:
            break
    if restore == "best":
        load_adapter_state(model, kept)
    return devs


def ia2_then_sft(model, train: list, dev: list, lr: float, sft="sft", **kw) -> list:
    """IA2→SFT, the paper's pipeline (§4): align the adapter with the ICL activations (L_IA2), then train the
    same adapter further, from where IA2 left it, on the ground truth (L_SFT; sft="sft_icl": on the ICL
    outputs), with a fresh Adam, the same lr and the same stopping rule. The items need the teacher's A_ICL
    (teacher()). Returns both phases' dev losses."""
    return fit(model, "ia2", train, dev, lr, **kw) + fit(model, sft, train, dev, lr, **kw)


# -----------------------------------------------------------------------------
# 7. Evaluation (§5). Single-token tasks: the full-vocabulary softmax at the last prompt token, top-1 accuracy
#    and ECE. Multi-token tasks: greedy generation stopped at "\n\n"; the task parses the answer (section 10).


@torch.no_grad()
def predict(model, prompts: list, label_ids: list):
    """Per prompt, read at its last token: the top-10 token probabilities and ids, and each label token's
    probability (numpy arrays, one move to the host)."""
    probs = forward(model, prompts)[0][:, 0].softmax(-1)
    p, ids = probs.topk(10, dim=-1)
    out = torch.cat([p, ids.float(), probs[:, label_ids]], 1).cpu().numpy()
    return out[:, :10], out[:, 10:20].astype(int), out[:, 20:]


def metrics(pred, gold: np.ndarray, tok, labels: list) -> dict:
    """Top-1 accuracy: the argmax token over the whole vocabulary, decoded and stripped, is the label string.
    Label accuracy: the true label's token is the most probable label token. ECE: the paper's (top-1
    renormalised over the top 10, equal mass) and the equal-width one. predicted: % of examples whose top-1
    token is each label, then any other token."""
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
    index = {label.strip(): i for i, label in enumerate(labels)}
    return np.array([index.get(tok.decode([int(i)]).strip(), len(labels)) for i in top_id[:, 0]])


def equal_mass_bins(conf: np.ndarray, n_bins: int = 15) -> list:
    """Indices of each bin: sort by confidence (stable), cut into n_bins bins of floor(n/n_bins) examples, the
    last taking the remainder (n=500: 14 x 33 + 38)."""
    n, order = len(conf), np.argsort(conf, kind="stable")
    size = max(n // n_bins, 1)
    starts = list(range(0, size * min(n_bins, n), size)) + [n]
    return [order[a:b] for a, b in zip(starts[:-1], starts[1:])]


def ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """The paper's ECE over equal-mass bins: Σ_b |b|/n · |acc_b - conf_b|."""
    bins = equal_mass_bins(conf, n_bins)
    return float(sum(len(b) / len(conf) * abs(correct[b].mean() - conf[b].mean()) for b in bins))


def ece_equal_width(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """The common ECE (Naeini et al. 2015; Guo et al. 2017): bins ((m-1)/M, m/M], empty bins add 0."""
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    return float(sum((bins == m).mean() * abs(correct[bins == m].mean() - conf[bins == m].mean())
                     for m in range(n_bins) if (bins == m).any()))


@functools.lru_cache(maxsize=4)
def newline_tokens(tok, V: int, device) -> tuple:
    """(V,) masks of the token ids whose text holds "\\n\\n", ends with "\\n" and starts with "\\n": the
    evaluation's "\\n\\n" stop, one token or two, tested on the device without decoding every step."""
    texts = tok.batch_decode([[i] for i in range(len(tok))]) + [""] * (V - len(tok))
    has = torch.tensor(["\n\n" in x for x in texts], device=device)
    ends = torch.tensor([x.endswith("\n") for x in texts], device=device)
    starts = torch.tensor([x.startswith("\n") for x in texts], device=device)
    return has, ends, starts


def generate_answers(model, tok, prompts: list, max_new: int) -> list:
    """Greedy continuations, stopped as the official evaluation's generate() stops, at every EOS of the
    generation_config or at the first "\\n\\n", and cut there."""
    has, ends, starts = newline_tokens(tok, model.config.vocab_size, model.device)

    def stop(prev, y):  # "\n\n" in decode([prev, y]), the official stop on the text
        return has[y] if prev is None else has[y] | ends[prev] & starts[y]
    outs = generate(model, prompts, max_new, eos_ids(model, tok.eos_token_id), stop=stop)
    return [answer_of(tok, o["tokens"]) for o in outs]


def answer_of(tok, ids: list) -> str:
    return tok.decode(ids, skip_special_tokens=True).split("\n\n")[0]  # a generation's text, cut at "\n\n"


# =============================================================================
# Part II: the paper's protocol, fast, and the experiment around the method. A method's whole grid of
# (lr, run, β) adapters trains as one model with K adapters side by side (8, 9), on Part I's forward, teacher,
# losses and metrics; then the 12 tasks (10) and the experiment, its tables and the command line (11).
# =============================================================================
import argparse
import collections
import csv
import dataclasses
import decimal
import glob
import itertools
import json
import os
import re
import shutil
import string
import time
from dataclasses import dataclass, field

from tqdm import tqdm  # installed with transformers and datasets


# -----------------------------------------------------------------------------
# 8. Many adapters in one model. A method's grid (3 lrs x 5 runs = 15 jobs; 60 with the β grid) trains as one
#    model with K adapters side by side: slot k of every adapter tensor is job k's. One batch holds the rows
#    of every job, each row routed through its job's slot, so that one forward and backward serves all the
#    jobs, each gradient landing in its own slot. `batches` sorts the rows by length and cuts them into
#    pieces that fit the memory; Part I's code never sees a slot.


class Slots:
    """Mixed into an adapter module of Part I: K adapters in one module, each parameter (K, ...) with slot k
    adapter k. Batch row i goes through slot rows[i] (set by `routed`; None: slot 0 for every row)."""
    rows = None

    def stack(self, K: int):  # each parameter p becomes (K, *p.shape): K copies of it
        for n, p in list(self.named_parameters(recurse=False)):
            setattr(self, n, nn.Parameter(p.detach().repeat(K, *[1] * p.dim())))

    def reset(self, k: int):
        """Slot k, a fresh adapter: the same draws from torch's generator as Part I's module makes."""
        self.init(*(p[k] for p in self.parameters(recurse=False)))

    def weights(self):
        return [p[0] if self.rows is None else p[self.rows] for p in self.parameters(recurse=False)]


class LoRASlots(Slots, LoRALinear):
    """K LoRA adapters: A (K, r, d_in), B (K, d_out, r); row i's update is (α/r)·B[rows[i]] A[rows[i]] x."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, K: int):
        LoRALinear.__init__(self, base, r, alpha)
        self.stack(K)


class IA3Slots(Slots, IA3Linear):
    """K (IA)³ vectors: l (K, 1, d_in); row i's input is scaled by l[rows[i]]."""

    def __init__(self, base: nn.Linear, K: int):
        IA3Linear.__init__(self, base)
        self.stack(K)


def adapter_targets(cfg) -> tuple:
    return tuple(f"{c}_proj" for c in cfg.targets)  # "qko" -> q_proj, k_proj, o_proj


def add_adapters(model, cfg, K=None):
    """Fresh adapters of --adapter's kind on --targets: Part I's modules, or (K) K adapters side by side."""
    def adapter(base):
        if cfg.adapter == "ia3":
            return IA3Linear(base) if K is None else IA3Slots(base, K)
        return LoRALinear(base, cfg.rank, cfg.rank) if K is None else LoRASlots(base, cfg.rank, cfg.rank, K)
    return wrap(model, adapter_targets(cfg), adapter)  # α = r


def slot_state(model, k: int) -> dict:
    """A copy of adapter k, as Part I's adapter_state gives one adapter: {parameter name: tensor}."""
    return {n: p[k].detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_slot(model, state: dict, k: int):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n][k].copy_(t)


@contextlib.contextmanager
def routed(model, rows):
    """Inside the block, batch row i goes through slot rows[i] of every adapter (None: slot 0 for all)."""
    mods = [m for m in adapter_modules(model).values() if isinstance(m, Slots)]
    for m in mods:
        m.rows = None if rows is None else torch.as_tensor(rows, device=model.device)
    try:
        yield
    finally:
        for m in mods:
            m.rows = None


# Bytes that autograd keeps per token and layer, per unit of the widths D (hidden), Dq (heads x head_dim), Dkv
# (kv heads x head_dim) and D_mlp, for a base model of 2-byte (bf16, fp16) or 4-byte floats with K LoRA
# adapters: fitted to saved-tensor measurements of Qwen3 (exact there; Llama, Qwen2, Gemma 3 within ±30 %:
# tested).
SAVED = {2: (16.3, 12.6, 8.3, 6.0), 4: (12.3, 12.6, 12.3, 12.0)}


def bytes_per_token(model, grad: bool) -> float:
    """The memory one token of a forward pass takes: with gradients, what every layer saves for the backward
    (SAVED); without, a rollout's KV cache and one layer's activations."""
    c, b = model.config, model.dtype.itemsize
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    widths = (c.hidden_size, c.num_attention_heads * hd, c.num_key_value_heads * hd, c.intermediate_size)
    if grad:
        return c.num_hidden_layers * sum(k * w for k, w in zip(SAVED[min(b, 4)], widths))
    return 2 * b * c.num_hidden_layers * widths[2] + 4 * b * (widths[0] + widths[3])


def token_budget(model, grad: bool) -> int:
    """Tokens (rows x padded length) per forward pass. On a GPU, as many as half of its free and reusable
    (cached) memory holds, less the fp32 copy of the LM head that lm_logits makes. On a CPU or a Mac 2048: on
    a CPU larger batches are not faster."""
    if model.device.type != "cuda":
        return 2048
    dev = model.device
    free = torch.cuda.mem_get_info(dev)[0]
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # cached by torch, reusable
    return max(512, int((free - 4 * model.lm_head.weight.numel()) / 2 / bytes_per_token(model, grad)))


def read_tokens(model, grad: bool, per_read: int) -> float:
    """What a position whose logits are computed costs, in tokens of the budget: per_read·V bytes (with
    gradients 12: fp32 logits, their log-softmax and its gradient; kd 24, with the teacher's
    log-probabilities; without 8). 0 on a CPU, whose budget counts tokens alone."""
    if model.device.type != "cuda":
        return 0.0
    return per_read * model.config.vocab_size / bytes_per_token(model, grad)


def spans(lengths: list, budget: int) -> list:
    """Consecutive slices of rows, each as many rows as fit `budget` tokens when padded to its longest."""
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        longest = max(longest, n)
        if i > start and (i + 1 - start) * longest > budget:
            out.append(slice(start, i))
            start, longest = i, n
    return out + [slice(start, len(lengths))] if lengths else []


def batches(model, rows: list, length, grad: bool, sort=True):
    """rows: (slot, item) pairs, slot the adapter the item goes through (None: the model as it is). Sorted by
    length(item), so that little padding is computed (sort=False keeps their order), and cut into pieces of at
    most token_budget tokens when padded; yields (indices into rows, items) per piece, while the model routes
    the piece's row i through its slot."""
    order = sorted(range(len(rows)), key=lambda i: length(rows[i][1])) if sort else list(range(len(rows)))
    for part in spans([length(rows[i][1]) for i in order], token_budget(model, grad)):
        idx = order[part]
        slots = [rows[i][0] for i in idx]
        with routed(model, None if slots[0] is None else slots):
            yield idx, [rows[i][1] for i in idx]


# -----------------------------------------------------------------------------
# 9. The engine: Part I's fit for every job of a method at once, and Part I's teacher, predict and
#    generate_answers over every piece of the grid


@dataclass
class Job:
    """One adapter of a method's grid: run `run`'s training and dev items, its lr (β for ia2_plus_sft), and
    where it starts: a fresh init (set_seed(seed + run)) or a given state (IA2→SFT: its IA2 job's adapter).
    The other fields are the state of fit's loop, one per job."""
    lr: float
    run: int
    train: list
    dev: list
    beta: float = None
    start: dict = None
    best: float = math.inf  # the best dev loss so far
    bad: int = 0  # dev checks since the last new best
    steps: int = 0
    epoch: int = 0
    epoch_end: bool = False  # the last step ended an epoch
    batches: object = None  # shuffled_batches(), with the job's own RandomState(seed + run)
    done: bool = False
    capped: bool = False  # stopped by the --epochs cap, not by early stopping


def train_grid(model, objective: str, jobs: list, cfg, tag) -> list:
    """Part I's fit (with cfg's epochs, patience, batch_size, restore) for every job at once, job k in slot k
    of each adapter: each step takes the next batch of every job still training into one forward and
    backward (the jobs' mean losses summed: each job's gradient is its own) and an Adam step at each job's
    lr. Each job's init, batches, dev checks and stop are those of fit on it alone (tested to fp32
    round-off); the best adapter of each slot is restored. tag(job) names a job in the log."""
    add_adapters(model, cfg, K=len(jobs))
    for k, job in enumerate(jobs):
        set_seed(cfg.seed + job.run)  # the same init for every method of a run, as fit after add_lora
        for mod in adapter_modules(model).values():
            mod.reset(k)
        if job.start:
            load_slot(model, job.start, k)
        job.batches = shuffled_batches(len(job.train), cfg.batch_size, cfg.epochs, cfg.seed + job.run)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, best = Adam(params, [job.lr for job in jobs]), [p.detach().clone() for p in params]  # best: per slot
    while not all(job.done for job in jobs):
        live = [k for k, job in enumerate(jobs) if not job.done]
        losses = backward(model, objective, [(k, jobs[k], next_batch(jobs[k])) for k in live])
        for k, loss in zip(live, losses):
            finite_or_stop(loss, "training", jobs[k], model, tag)
        opt.step(live)
        check = [k for k in live if jobs[k].steps % 2 == 0 or jobs[k].epoch_end]  # every 2 steps, epoch ends
        new_best = np.zeros(len(jobs), bool)
        for k, dev in zip(check, dev_losses(model, objective, [(k, jobs[k]) for k in check])):
            finite_or_stop(dev, "dev", jobs[k], model, tag)
            new_best[k] = update(jobs[k], dev, losses[live.index(k)], cfg, tag)
        if new_best.any():
            copy_slots(best, params, new_best)  # keep the adapters at their new best
    if cfg.restore == "best":
        copy_slots(params, best, np.ones(len(jobs), bool))
    return jobs


def next_batch(job: Job) -> list:
    job.epoch, idx, job.epoch_end = next(job.batches)
    job.steps += 1
    return [job.train[i] for i in idx]


def update(job: Job, dev: float, loss: float, cfg, tag) -> bool:
    """fit's bookkeeping after a dev check: count checks without a new best, stop at `patience` or at the
    end of the last epoch. Returns whether this is a new best."""
    new_best = dev < job.best
    job.best, job.bad = (dev, 0) if new_best else (job.best, job.bad + 1)
    print(f"[{tag(job)}] ep {job.epoch} step {job.steps} | loss {loss:.4f} | dev {dev:.4f}{' *' * new_best}")
    job.done = job.bad >= cfg.patience or (job.epoch == cfg.epochs - 1 and job.epoch_end)
    job.capped = job.done and job.bad < cfg.patience
    if job.capped:
        print(f"[{tag(job)}] note: stopped by the --epochs {cfg.epochs} cap, not by early stopping" +
              " (the dev loss was still falling)" * new_best)
    return new_best


class Adam:
    """torch.optim.Adam (no weight decay) for K adapters stacked along dim 0 of each parameter: slot k has its
    own lr and step count, and only the slots in `live` move (tested against torch.optim.Adam). Each line is
    one foreach op over every parameter tensor; the bias corrections are float64 on the host (MPS has no
    float64)."""

    def __init__(self, params: list, lrs: list, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.betas, self.eps = params, betas, eps
        self.lr, self.t = np.array(lrs, dtype=np.float64), np.zeros(len(lrs))  # float64: 1 - 0.999^t cancels
        self.m, self.v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, live: list):
        (b1, b2), on = self.betas, np.isin(np.arange(len(self.t)), live)
        self.t += on
        t = np.maximum(self.t, 1)
        step_size, bc2_sqrt = self.per_slot(on * self.lr / (1 - b1 ** t)), self.per_slot(np.sqrt(1 - b2 ** t))
        grads = [p.grad for p in self.params]
        torch._foreach_lerp_(self.m, grads, 1 - b1)  # m = β1·m + (1-β1)·g
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)  # v = β2·v + (1-β2)·g²
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, self.eps)  # sqrt(v / (1-β2^t)) + ε
        update = torch._foreach_div(self.m, denom)
        torch._foreach_mul_(update, step_size)  # lr / (1-β1^t) · m / (...); 0 for the slots not live
        torch._foreach_sub_(self.params, update)
        for p in self.params:
            p.grad = None

    def per_slot(self, x: np.ndarray) -> list:
        """One fp32 value per slot, shaped to scale each parameter's slots: (K, 1, ...)."""
        x = torch.tensor(x, dtype=torch.float32).to(self.params[0].device)
        return [x.view(-1, *[1] * (p.dim() - 1)) for p in self.params]


def copy_slots(to: list, source: list, slots: np.ndarray):
    """to[k] = source[k] for each parameter tensor and every slot k marked: one op per tensor."""
    mark = torch.tensor(slots, device=to[0].device)
    with torch.no_grad():
        for a, b in zip(to, source):
            torch.where(mark.view(-1, *[1] * (a.dim() - 1)), b, a, out=a)


def finite_or_stop(loss: float, what: str, job: Job, model, tag):
    """A nan or inf loss stops the run, saying whether the model's forward pass or the training went wrong."""
    if math.isfinite(loss):
        return
    if job.steps == 1:
        why = f", before any update: the model's forward pass is not finite ({model.dtype}){try_fp32(model)}"
    else:
        why = " (it was finite before): the adapter diverged; try a lower --lr"
    raise IA2Error(f"{tag(job)}: the {what} loss is {loss} at step {job.steps}{why}")


def backward(model, objective: str, work: list) -> list:
    """One forward and backward over the examples of several jobs, (slot, job, examples); returns each job's
    loss, the mean over its examples."""
    weight, total = {k: 1 / len(b) for k, _, b in work}, collections.defaultdict(float)
    for ks, loss in piece_losses(model, objective, work, grad=True):
        weighted = loss * torch.tensor([weight[k] for k in ks], device=model.device)
        weighted.sum().backward()  # Σ over jobs of each job's mean loss: job k's gradient is its own
        for k, x in zip(ks, weighted.tolist()):
            total[k] += x
    return [total[k] for k, _, _ in work]


@torch.no_grad()
def dev_losses(model, objective: str, jobs: list) -> list:
    """The mean dev loss of each (slot, job), all dev sets in shared batches."""
    total = collections.defaultdict(float)
    for ks, loss in piece_losses(model, objective, [(k, job, job.dev) for k, job in jobs], grad=False):
        for k, x in zip(ks, loss.tolist()):
            total[k] += x
    return [total[k] / len(job.dev) for k, job in jobs]


def piece_losses(model, objective: str, work: list, grad: bool):
    """The examples of several jobs, (slot, job, examples), in shared batches: yields each piece's slots and
    its examples' losses (B,), each at its job's β."""
    beta, rows = {k: job.beta for k, job, _ in work}, [(k, it) for k, _, b in work for it in b]
    for idx, items in batches(model, rows, cost(model, objective, grad), grad):
        ks = [rows[i][0] for i in idx]
        yield ks, objective_loss(model, objective, items, [beta[k] for k in ks])


def cost(model, objective: str, grad: bool):
    """An example's size in tokens of the budget: X∘target, plus its logit positions (read_tokens)."""
    read = read_tokens(model, grad, {"ia2": 0, "kd": 24}.get(objective, 12 if grad else 8))
    return lambda it: len(it["x"]) + len(target_of(objective, it)) * (1 + read)


def teacher_all(model, items: list, T: int, eos_id: int, kd=False) -> list:
    """Part I's teacher on every run's items, in pieces that fit the memory. On a GPU, kd's log-probabilities
    (T' x V floats an item) go to pinned host memory when they would take more than a quarter of the free
    memory."""
    host = kd and model.device.type == "cuda" and (
        4 * len(items) * T * model.config.vocab_size > torch.cuda.mem_get_info(model.device)[0] / 4)
    read = read_tokens(model, False, 8)
    for _, part in batches(model, [(None, it) for it in items], lambda it: len(it["icl"]) + T + read,
                           grad=False, sort=False):
        teacher(model, part, T, eos_id, kd)
        for it in part if host else []:
            it["logp_icl"] = it["logp_icl"].cpu().pin_memory()
    return items


def predict_all(model, seqs: list, label_ids: list, slots=None):
    """Part I's predict on every prompt, prompt i through adapter slots[i] (None: the model as it is), in
    shared batches sorted by length; the arrays in the order of seqs."""
    rows, order, parts = list(zip(slots or [None] * len(seqs), seqs)), [], []
    read = read_tokens(model, False, 8)
    pieces = batches(model, rows, lambda s: len(s) + read, grad=False)
    for idx, piece in tqdm(pieces, desc="eval", leave=False, disable=None):  # a progress bar on a terminal
        order += idx
        parts.append(predict(model, piece, label_ids))
    back = np.argsort(order)
    return tuple(np.concatenate(x)[back] for x in zip(*parts))


def generate_all(model, tok, seqs: list, max_new: int, slots=None) -> list:
    """Part I's generate_answers on every prompt, prompt i through adapter slots[i], in shared batches."""
    read, rows, texts = read_tokens(model, False, 8), list(zip(slots or [None] * len(seqs), seqs)), {}
    pieces = batches(model, rows, lambda s: len(s) + max_new + read, grad=False)
    for idx, piece in tqdm(pieces, desc="generate", leave=False, disable=None):
        texts.update(zip(idx, generate_answers(model, tok, piece, max_new)))
    return [texts[i] for i in range(len(seqs))]


# -----------------------------------------------------------------------------
# 10. The 12 tasks (§5, App. A): their data, templates and labels, and the answers of multi-token tasks


# The official prepare_data.py's templates (no space after the colons) and label strings. splits: (pool,
# eval); no pool: evaluation only (OOD); no eval split: the eval set is the last --eval-size records. A Hub
# record gives the template's fields and the label (an index into `labels`) or the answer from its columns,
# found as a local file's are (ALIASES); a task whose records need more has a `row`, None to drop a record.
# App. A: the word before each option of a multiple-choice question, and its label
CHOICE_WORDS = ["apple", "Friday", "banana", "Saturday", "Thursday", "Sunday", "Wednesday", "Monday"]
TEXT, QA = "Text:{text}\nLabel:", "Question:{question}\nAnswer:"
BBC = {"tech": 3, "business": 2, "sport": 1}  # AG News' label of each BBC topic; entertainment, politics: 0


def choices(n: int) -> str:
    """The template of an n-option question, each option after its slot word (App. A; seed 42 in the code)."""
    options = "".join(f"[{CHOICE_WORDS[i]}]{{o{i}}}\n" for i in range(n))
    return "Question:{question}\nChoices:\n" + options + "\nAnswer:"


def finsen_row(ex, rng):  # {0 negative, 2 positive} -> {0, 1}; neutral (1) dropped
    return None if ex["label"] == 1 else dict(text=ex["sentence"], label=ex["label"] // 2)


def poems_row(ex, rng):  # negative, positive; no_impact and mixed dropped: 288 records left
    return dict(text=ex["verse_text"], label=ex["label"]) if ex["label"] < 2 else None


def bbcnews_row(ex, rng):  # 256 characters, cut at a word boundary
    text = ex["text"] if len(ex["text"]) <= 256 else ex["text"][:256].rsplit(" ", 1)[0]
    return dict(text=text, label=BBC.get(ex["label_text"], 0))


def sciq_row(ex, rng):
    """Options [d1, d2, d3, correct] shuffled by the loader's one generator (official
    prepare_data.py:1294-1303): slot i shows options[order[i]]; the label is the correct one's slot."""
    options = [ex["distractor1"], ex["distractor2"], ex["distractor3"], ex["correct_answer"]]
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    return dict(question=ex["question"], **{f"o{i}": options[j] for i, j in enumerate(order)},
                label=order.index(3))


def sciq_rng():
    """The official loader's numpy state at its first option shuffle: seeded 42, then four distinct slot words
    drawn from a list of 9 (prepare_data.py:1352-1362); it goes on through the pool, then the eval set."""
    rng, drawn = np.random.RandomState(42), set()
    while len(drawn) < 4:
        drawn.add(rng.randint(9))  # = np.random.choice(9 words)
    return rng


def qasc_row(ex, rng):
    options = {f"o{i}": text for i, text in enumerate(ex["choices"]["text"])}
    return dict(question=ex["question"], **options, label=ex["choices"]["label"].index(ex["answerKey"]))


def sciqa_row(ex, rng):
    return dict(question=ex["question"], answer=f"{ex['support']}\n#### {ex['correct_answer']}")


TASKS = {
    "sst2": dict(paper="SST2", hub=("stanfordnlp/sst2", None), splits=("train", "validation"), template=TEXT,
                 labels=["0", "1"]),
    "finsen": dict(paper="FinS", hub=("takala/financial_phrasebank", "sentences_50agree"),
                   splits=("train", None), template=TEXT, labels=["0", "1"], row=finsen_row),
    "poems": dict(paper="PoemS", hub=("google-research-datasets/poem_sentiment", None),
                  splits=(None, "train"), template=TEXT, labels=["0", "1"], row=poems_row),
    "strategytf": dict(paper="STF", hub=("wics/strategy-qa", None), splits=("test", None), template=QA,
                       labels=["0", "1"]),  # answer False, True
    "agnews": dict(paper="AGN", hub=("fancyzhx/ag_news", None), splits=("train", "test"), template=TEXT,
                   labels=["0", "1", "2", "3"]),  # World, Sports, Business, Sci/Tech
    "bbcnews": dict(paper="BBCN", hub=("SetFit/bbc-news", None), splits=(None, "test"), template=TEXT,
                    labels=["0", "1", "2", "3"], row=bbcnews_row),
    "sciq_remap": dict(paper="SciQr", hub=("allenai/sciq", None), splits=("train", "validation"),
                       template=choices(4), labels=CHOICE_WORDS[:4], row=sciq_row),
    "qasc_remap": dict(paper="QASCr", hub=("allenai/qasc", None), splits=(None, "validation"),
                       template=choices(8), labels=CHOICE_WORDS, row=qasc_row),
    "gsm8k": dict(paper="GSM8K", hub=("openai/gsm8k", "main"), splits=("train", "test"), template=QA,
                  labels=None, gen=200),
    "gsm8ks": dict(paper="GSM8Ks", hub=("apple/GSM-Symbolic", "main"), splits=(None, "test"), template=QA,
                   labels=None, gen=200),
    "hmath_algebra": dict(paper="HMathA", hub=("EleutherAI/hendrycks_math", "algebra"),
                          splits=("train", "test"), template=QA, labels=None, gen=400),
    "sciqa": dict(paper="SciQ", hub=("allenai/sciq", None), splits=("train", "validation"), template=QA,
                  labels=None, gen=200, row=sciqa_row),
}


# Two of these datasets are still loading scripts, which datasets >= 4.0 no longer runs: they are read from
# the Hub's own parquet conversion of the same records (branch refs/convert/parquet, one folder per config;
# README).
PARQUET = {"takala/financial_phrasebank": "sentences_50agree", "wics/strategy-qa": "strategyQA"}


ALIASES = {"text": ("sentence", "verse_text", "review"), "label": ("sentiment", "answer"),
           "question": ("problem",), "answer": ("solution",)}  # the Hub's and other names of the columns


def task_table() -> str:
    """--list-tasks."""
    lines = ["| task | paper | Hub id (config) | pool -> eval split | template | labels |", "|---" * 6 + "|"]
    for n, t in TASKS.items():
        splits = f"{t['splits'][0] or 'none (eval only)'} -> {t['splits'][1] or 'its last records'}"
        hub, labels = " ".join(filter(None, t["hub"])), " ".join(t["labels"] or ["answer + EOS"])
        lines.append(f"| {n} | {t['paper']} | {hub} | {splits} | {t['template']!r} | {labels} |")
    return "\n".join(lines)


def load_task(cfg, name: str, labels, path=None):
    """(pool, eval set), lists of (X, y): the filled template and a label index or an answer. As the official
    prepare_data.py does, each split is shuffled with seed 42 and its first --pool-size or --eval-size records
    kept; a local file is shuffled the same way, its last rows the eval set."""
    task, rng = TASKS[name], sciq_rng() if name == "sciq_remap" else None
    pool_split, eval_split = task["splits"]
    if path:
        recs = shuffled(examples(task, list(enumerate(read_file(path), 1)), labels, path))
        n_eval = len(recs) if pool_split is None else min(cfg.eval_size, len(recs) // 2)
        if pool_split and n_eval < cfg.eval_size:
            warn(f"{path} has {len(recs)} usable rows: its last {n_eval} (at most half) are the eval set, "
                 f"not --eval-size {cfg.eval_size}")
        return recs[:len(recs) - n_eval][:cfg.pool_size], recs[len(recs) - n_eval:]
    if eval_split:  # the pool's records first, then the eval set's (sciq_remap: one generator)
        pool = hub_records(task, name, pool_split, labels, rng, cfg.pool_size) if pool_split else []
        return pool, hub_records(task, name, eval_split, labels, rng, cfg.eval_size)
    recs = hub_records(task, name, pool_split, labels)  # finsen, strategytf: the eval set is the last records
    pool, ev = recs[:len(recs) - cfg.eval_size], recs[len(recs) - cfg.eval_size:]
    if name == "strategytf":  # and both parts are shuffled again (prepare_data.py:1633-1634)
        pool, ev = shuffled(pool), shuffled(ev)
    return pool[:cfg.pool_size], ev


def shuffled(recs: list) -> list:
    return [recs[i] for i in np.random.default_rng(42).permutation(len(recs))]  # = .shuffle(seed=42)


def hub_records(task: dict, name: str, split: str, labels, rng=None, limit=None) -> list:
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    repo, config = task["hub"]
    where = dict(name=config)
    if repo in PARQUET:
        where = dict(revision="refs/convert/parquet", data_dir=PARQUET[repo])
    try:
        recs = list(enumerate(datasets.load_dataset(repo, split=split, **where).to_list(), 1))
    except Exception as e:
        raise IA2Error(f"cannot load {repo} for task {name} from the Hub: {str(e).strip().splitlines()[0]}; "
                       f"pass a local copy instead: --data {name}=FILE")
    if name == "poems":  # filtered first, then shuffled (prepare_data.py:914-915)
        return shuffled(examples(task, recs, labels, split, task["row"]))[:limit]
    return examples(task, shuffled(recs), labels, split, task.get("row"), rng, limit)


def read_file(path: str) -> list:
    """The records (dicts) of a .csv, .tsv, .jsonl, .json or .parquet file."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".tsv", ".jsonl", ".json", ".parquet"):
        raise IA2Error(f"--data {path}: use a .csv, .tsv, .jsonl, .json or .parquet file")
    if not os.path.isfile(path):
        raise IA2Error(f"--data {path}: no such file")
    try:
        if ext == ".parquet":
            import pyarrow.parquet  # installed with datasets
            return pyarrow.parquet.read_table(path).to_pylist()
        with open(path, newline="", encoding="utf-8-sig") as f:
            if ext in (".csv", ".tsv"):
                return list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
            text = f.read()
        if text.lstrip().startswith("["):
            return json.loads(text)  # .json: a list of objects
        return [json.loads(line) for line in text.splitlines() if line.strip()]  # .jsonl: an object a line
    except (OSError, ValueError, csv.Error) as e:  # ValueError: JSON, Unicode and Arrow errors
        raise IA2Error(f"cannot read {path}: {str(e).splitlines()[0]}")


def examples(task: dict, recs: list, labels, where: str, row=None, rng=None, limit=None) -> list:
    """(row number, record) -> (X, y), until `limit` are kept. A record holds the template's fields and label
    (or answer), under their names or ALIASES, or goes through the task's `row`. An empty cell or an unknown
    label stops the run, naming the row."""
    need = [f for _, f, _, _ in string.Formatter().parse(task["template"]) if f]
    need.append("label" if labels else "answer")
    if not recs or not all(isinstance(r, dict) for _, r in recs):
        raise IA2Error(f"{where}: no records (a header and one row per example, or one JSON object per line)")
    if row is None and not all(column(recs[0][1], f) in recs[0][1] for f in need):
        raise IA2Error(f"{where} needs columns {', '.join(map(repr, need))}, found "
                       f"{', '.join(map(repr, recs[0][1]))}")
    out = []
    for i, rec in recs:
        if len(out) == limit:
            break
        rec = row(rec, rng) if row else {f: rec.get(column(rec, f)) for f in need}  # rng: sciq_remap's
        if rec is None:
            continue  # a record the task drops (FinS neutral, PoemS mixed)
        for f in need[:-1] + ([] if labels else ["answer"]):
            if not isinstance(rec[f], str) or not rec[f].strip():
                raise IA2Error(f"{where}, row {i}: {f!r} must be text, got {rec[f]!r}")
        y = label_index(rec["label"], labels, f"{where}, row {i}") if labels else rec["answer"]
        out.append((task["template"].format(**rec), y))
    if labels and len({y for _, y in out}) == 1:
        warn(f"{where}: every example has label {labels[out[0][1]]!r}; accuracy cannot tell a method from "
             "always answering it")
    return out


def column(rec: dict, field: str) -> str:
    """The record's column for a field of the template: the field's name, else one of its ALIASES."""
    return next((c for c in (field,) + ALIASES.get(field, ()) if c in rec), field)


def label_index(v, labels: list, where: str) -> int:
    """A label cell: one of the label strings (surrounding spaces ignored) or its index 0..n-1."""
    names = [label.strip() for label in labels]
    s = str(v).strip()
    if isinstance(v, (bool, float)) and float(v).is_integer():
        s = str(int(v))  # True, 1.0 -> "1"
    if s in names:
        return names.index(s)
    if s.isdigit() and int(s) < len(labels):
        return int(s)
    empty = " (the cell is empty)" if s in ("", "None", "nan") else ""
    raise IA2Error(f"{where}: label {v!r} is neither a label string ({' '.join(map(repr, labels))}) nor an "
                   f"index 0..{len(labels) - 1}{empty}")


def boxed(text: str):
    """The content of the last \\boxed{...}, nested braces included; None without one, or unbalanced (cut
    off)."""
    start = text.rfind("\\boxed{")
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text) if start >= 0 else 0):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


NUMBER = r"-?[\d,]*\.?\d+"


def clean_number(s: str):
    """The first number of s, written as its value: '$1,234.50' -> '1234.5', '72.0' -> '72', '.0' and '-0.0'
    -> '0', '007' -> '7' (the official parser compares float(x) so written); None if there is none. Unlike the
    official parser, a minus sign is kept and '.5' is 0.5 (its pattern reads 5 in both)."""
    found = re.findall(NUMBER, s.replace("$", ""))
    if not found:
        return None
    value = decimal.Decimal(found[0].replace(",", ""))  # exact, where float would round long numbers
    return "0" if value == 0 else format(value.normalize(), "f")


def parse_answer(task: str, text: str):
    """The final answer of a generation or a ground truth, parsed alike (the official utils.py's decisions
    where they are right; README, Deviations). gsm8k, gsm8ks: \\boxed{x}, '#### x', 'answer is x', 'Answer:
    x', '$x', else the last number that is not a year (1900-2100), else the last number; cleaned.
    hmath_algebra: the last \\boxed{} (whitespace removed, \\dfrac as \\frac). sciqa: the text after the last
    '####'."""
    if task == "sciqa":
        return text.split("####")[-1].strip()
    b = boxed(text)
    if task == "hmath_algebra":
        return None if b is None else "".join(b.split()).replace("\\dfrac", "\\frac")
    if b is not None and clean_number(b) is not None:
        return clean_number(b)
    for pattern in (r"####\s*(.*)", r"answer is[:\s]*(.*)", r"Answer:\s*(.*)", r"\$\s*(" + NUMBER + ")"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found and clean_number(found[-1]) is not None:
            return clean_number(found[-1])
    numbers = [clean_number(n) for n in re.findall(NUMBER, text.replace("$", ""))]
    years = [n for n in numbers if n.isdigit() and 1900 <= int(n) <= 2100]
    return ([n for n in numbers if n not in years] or numbers or [None])[-1]


# -----------------------------------------------------------------------------
# 11. The experiment: every method x lr (x β) x run, the paper's selection of the lr (§5), the command line


METHODS = ("zero_shot", "icl", "sft", "sft_icl", "ia2", "ia2_then_sft", "ia2_then_sft_icl", "ia2_plus_sft",
           "kd")
TRAINED = METHODS[2:]
OBJECTIVE = dict(sft="sft", sft_icl="sft_icl", ia2="ia2", ia2_then_sft="sft", ia2_then_sft_icl="sft_icl",
                 ia2_plus_sft="ia2_plus_sft", kd="kd")  # ia2_then_sft(_icl): SFT continuing the ia2 adapter
METRICS = ("accuracy", "label_accuracy", "ece", "ece_equal_width")  # multi-token tasks: accuracy only


def warn(message: str):
    print(f"ia2.py: warning: {message}", file=sys.stderr)


def arg(default, help, ok=None):
    """A Config field: its default, its --help and, optionally, (test, what it must be) for its value."""
    return field(default=default, metadata=dict(help=help, ok=ok))


def at_least(n):
    return lambda v: v >= n, f">= {n}"


def one_of(*values):
    return lambda v: v in values, ", ".join(values[:-1]) + " or " + values[-1]


@dataclass
class Config:
    model: str = arg("Qwen/Qwen3-0.6B", "Hub id or folder of a causal LM (paper: Qwen3-4B-Base, Llama-3.2)")
    task: str = arg("sst2", "the task trained on (--list-tasks)", (
        lambda v: v in TASKS and TASKS[v]["splits"][0], "a task with training data (--list-tasks)"))
    eval_tasks: tuple = arg(None, "tasks evaluated on, e.g. sst2 finsen poems (ICL demos from --task: the "
                            "OOD protocol); unset: --task", (lambda v: v in TASKS, "a task of --list-tasks"))
    data: tuple = arg(None, "local data, FILE (for --task) or TASK=FILE ...: .csv, .tsv, .jsonl, .json or "
                      ".parquet with the template's fields and label (a label or its index) or answer")
    labels: tuple = arg(None, "label strings instead of the task's (sst2: 0 1), one token each; a leading "
                        "space counts: --labels ' negative' ' positive'")
    n_train: int = arg(4, "N, labelled examples per run (paper: 4 Qwen, 8 Llama)", at_least(2))
    runs: int = arg(5, "runs r = 0..runs-1, each a different draw of the N examples (paper: 5)", at_least(1))
    adapter: str = arg("lora", "lora, or ia3: (IA)³, a learned scale of each target's input (Tables 6, 16)",
                       one_of("lora", "ia3"))
    lr: tuple = arg(None, "lr grid; unset: the adapter's grid in the paper (lora 1e-4 3e-4 1e-3, ia3 1e-1 "
                    "1e-2 1e-3)", (lambda v: v > 0, "> 0"))
    beta: tuple = arg((0.1, 0.5, 0.7, 0.9), "β grid of ia2_plus_sft, (1-β)·L_IA2 + β·L_SFT(Ŷ) (paper: Qwen "
                      "0.1 0.5 0.7 0.9, Llama 0.001 0.01 0.05 0.5)", (lambda v: 0 <= v <= 1, "in [0, 1]"))
    methods: tuple = arg(METHODS[:-1], f"any of {' '.join(METHODS)} (kd only when named)", one_of(*METHODS))
    eval_size: int = arg(500, "evaluation examples, never trained on (paper: 500)", at_least(1))
    pool_size: int = arg(2000, "pool of the N examples, the dev set and the demos (paper: 2000)", at_least(1))
    epochs: int = arg(50, "maximum epochs (paper: 50)", at_least(1))
    patience: int = arg(5, "stop after this many dev checks without a new best (paper: 5)", at_least(1))
    batch_size: int = arg(4, "examples per step (an epoch of N examples: ceil(N / this) steps; paper: 4)",
                          at_least(1))
    rank: int = arg(8, "LoRA's rank r; α = r (paper: 8)", at_least(1))
    targets: str = arg("qko", "the adapter on these of each layer: q k v o (paper: qko; Table 7: qk, qkv)",
                       (lambda v: len(v) == len(set(v)) > 0 and set(v) <= set("qkvo"), "letters of qkvo"))
    restore: str = arg("best", "adapter kept: best (lowest dev loss: what the official code means to do) or "
                       "last (what it does)", one_of("best", "last"))
    max_new_tokens: int = arg(None, "multi-token tasks: the rollout length T and the generation limit; "
                              "unset: the paper's 200 (hmath_algebra's evaluation: 400)", at_least(1))
    seed: int = arg(0, "run r seeds its split, demo order, init and shuffles with seed + r (paper: r)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu",
                      one_of("auto", "cuda", "mps", "cpu"))
    dtype: str = arg("auto", "the base model's dtype: auto (bfloat16 on a GPU that has it natively, else "
                     "float32), bfloat16, float16, float32", one_of("auto", "bfloat16", "float16", "float32"))
    out: str = arg(None, "output folder; unset: runs/<task>-<model>-n<N>-<time>")
    list_tasks: bool = arg(False, "print the task table and exit")

    def __post_init__(self):
        if self.lr is None:
            self.lr = LR_GRIDS.get(self.adapter, ())


LR_GRIDS = dict(lora=(1e-4, 3e-4, 1e-3), ia3=(1e-1, 1e-2, 1e-3))  # each adapter's paper grid (§5, App. B)


EXAMPLES = """examples:
  python ia2.py --model Qwen/Qwen3-0.6B --task sst2                   # the paper's protocol on SST-2
  python ia2.py --model Qwen/Qwen3-0.6B --task sst2 --eval-tasks sst2 finsen poems --adapter ia3
  python ia2.py --model FOLDER --task sst2 --data FILE.csv --labels negative positive --runs 2 --lr 1e-3
  python ia2.py --list-tasks"""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every error of ia2.py (argparse's prints the usage first)
        raise IA2Error(f"{message} (--help lists the flags)")


def parse_args(argv=None) -> Config:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type is tuple:
            kw = dict(nargs="+", type=float if f.name in ("lr", "beta") else str)
        elif f.type is bool:
            kw = dict(action="store_true")
        else:
            kw = dict(type=f.type)
        default = " ".join(map(str, f.default)) if f.type is tuple and f.default else f.default
        shown = "" if default in (None, False) else f" (default: {default})"
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"] + shown,
                       **kw)
    cfg = Config(**vars(p.parse_args(argv)))
    for f in dataclasses.fields(Config):  # each value against the condition written beside its field
        value = getattr(cfg, f.name)
        for v in value if f.type is tuple and value else [value]:
            if f.metadata["ok"] and v is not None and not f.metadata["ok"][0](v):
                raise IA2Error(f"--{f.name.replace('_', '-')} {v}: must be {f.metadata['ok'][1]}")
    return cfg


def pick_device(name: str, dtype: str = "auto"):
    """The device and the base model's dtype. auto: bf16 on a GPU with native bf16 (compute capability >= 8:
    A100, H100, RTX 30xx on); fp32 on older GPUs (T4, V100: bf16 is emulated there, slowly, and fp16's range
    overflows in some models' activations), on a Mac and on a CPU."""
    available = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    if name == "auto":
        name = next(d for d, ok in available.items() if ok)
    if not available[name]:
        raise IA2Error(f"--device {name}: torch sees no {name.upper()} device")
    if dtype == "auto":
        native_bf16 = name == "cuda" and torch.cuda.get_device_capability()[0] >= 8
        dtype = "bfloat16" if native_bf16 else "float32"
    return torch.device(name), getattr(torch, dtype)


Task = collections.namedtuple("Task", "name spec labels label_ids pool eval_set queries gold")  # in a run
Setup = collections.namedtuple("Setup", "cfg tok model task evals")  # what the run shares; task: --task's


def check_tasks(cfg: Config) -> tuple:
    """The run's eval tasks, all its tasks and their local files, once --task, --eval-tasks, --labels and
    --data agree (also sweep.py's check of a cell)."""
    names, multi = list(dict.fromkeys(cfg.eval_tasks or [cfg.task])), TASKS[cfg.task]["labels"] is None
    tasks, files = list(dict.fromkeys([cfg.task] + names)), {}
    if any((TASKS[n]["labels"] is None) != multi for n in names) or cfg.labels and multi:
        kind = "multi" if multi else "single"
        raise IA2Error(f"--eval-tasks, --labels: {cfg.task} is a {kind}-token task, so must the eval tasks "
                       "be, and --labels is for single-token tasks")
    for d in [cfg.data] if isinstance(cfg.data, str) else cfg.data or ():  # FILE or TASK=FILE
        name, path = d.split("=", 1) if d.split("=", 1)[0] in TASKS else (cfg.task, d)
        if name not in tasks:
            raise IA2Error(f"--data {d}: {name} is neither --task nor one of --eval-tasks")
        files[name] = path
    return names, tasks, files


def setup(cfg: Config) -> Setup:
    """Everything that can fail on the user's input fails here, before anything is written; the checks of the
    flags and the data come before the model loads."""
    names, tasks, files = check_tasks(cfg)
    multi = TASKS[cfg.task]["labels"] is None
    check_model(cfg.model)
    check_hub(cfg, tasks, files)
    labels = {n: list(cfg.labels) if cfg.labels else TASKS[n]["labels"] for n in tasks}
    if any(len(labels[n] or []) != len(TASKS[n]["labels"] or []) for n in tasks):
        raise IA2Error(f"--labels {' '.join(cfg.labels)}: a task of this run has another number of labels")
    data = {n: load_task(cfg, n, labels[n], files.get(n)) for n in tasks}
    need = 2 * cfg.n_train + min(48, cfg.n_train // 2) - 1
    if len(data[cfg.task][0]) < need:
        raise IA2Error(f"--n-train {cfg.n_train} needs {need} pool examples (N train, min(48, N//2) dev, N-1 "
                       f"demos), the data has {len(data[cfg.task][0])}")
    device, dtype = pick_device(cfg.device, cfg.dtype)
    tok = load_tokenizer(cfg.model)
    label_ids = {n: label_tokens(tok, labels[n]) for n in tasks if labels[n]}
    if multi and tok.eos_token_id is None:
        raise IA2Error(f"{cfg.model}'s tokenizer has no EOS token; multi-token targets end with one")
    check_tokenizer(tok, [x for x, _ in data[cfg.task][1][:20]])
    model = load_model(cfg.model, tok, device, dtype)
    view = {}
    for n, (pool, eval_set) in data.items():
        gold = np.array([y for _, y in eval_set], dtype=int if labels[n] else object)
        view[n] = Task(n, TASKS[n], labels[n], label_ids.get(n), pool, eval_set,
                       [encode(tok, x) for x, _ in eval_set], gold)
    return Setup(cfg, tok, model, view[cfg.task], [view[n] for n in names])


def check_model(name: str):
    """--model is a folder with a model in it, or a Hub id (tried when the model loads): one line for a path
    that is not there and for a folder that lacks a model, saying what it lacks."""
    if os.path.isfile(name):
        raise IA2Error(f"--model {name}: a file; a model is a folder (config, weights, tokenizer) or Hub id")
    path_like = name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name
    if path_like and not os.path.isdir(name):
        raise IA2Error(f"--model {name}: no such folder")
    if not os.path.isdir(name):
        return  # "org/name" or "name": a Hub id, or a folder that is not here (said if it fails to load)
    files = set(os.listdir(name))
    weights = any(f.endswith((".safetensors", ".bin")) for f in files)
    tokenizer = files & {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model"}
    needs = (("config.json", "config.json" in files), ("weights (*.safetensors or *.bin)", weights),
             ("tokenizer (tokenizer.json, tokenizer.model or vocab.json)", tokenizer))
    missing = [what for what, found in needs if not found]
    if missing:
        raise IA2Error(f"--model {name}: the folder holds no model: no {', no '.join(missing)}")


def check_hub(cfg: Config, tasks: list, files: dict):
    """Offline, fail in seconds, saying what to pass instead, if the model or a task's data needs the Hub."""
    import urllib.request
    missing = [n for n in tasks if n not in files]
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", ""):
        return  # the libraries then use the Hub cache, and fail at once without it
    if not missing and os.path.isdir(cfg.model):
        return
    hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:  # a 3-second look at the Hub, instead of minutes of retries
        urllib.request.urlopen(urllib.request.Request(hub, method="HEAD"), timeout=3)
    except urllib.error.HTTPError:
        return  # it answered
    except OSError:  # no route, no name, refused, timed out
        need = [] if os.path.isdir(cfg.model) else [f"--model FOLDER (a copy: {cfg.model} is no folder here)"]
        if missing:  # one task: --data FILE; several: --data TASK=FILE for each
            files = "FILE" if tasks == [cfg.task] else " ".join(f"{n}={files.get(n, 'FILE')}" for n in tasks)
            need.append("--data " + files)
        raise IA2Error(f"the Hugging Face Hub cannot be reached: pass {' and '.join(need)}, or set "
                       "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 to use what your Hub cache already holds")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # the library's reason, whatever its kind
        raise IA2Error(cannot_load(name, "tokenizer", e))


def load_model(name: str, tok, device, dtype):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    except Exception as e:
        raise IA2Error(cannot_load(name, "model", e))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    return model


def cannot_load(name: str, what: str, e: Exception) -> str:
    """Why --model did not load: a folder whose model cannot be read, or a Hub id (offline: not in the Hugging
    Face cache); the library's reason, its first line."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if os.path.isdir(name):
        return f"--model {name}: cannot read its {what}: {reason}"
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "")
    where = "the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face Hub"
    return f"--model {name}: no folder of that name here, and {where} gives no {what} of that id: {reason}"


def label_tokens(tok, labels: list) -> list:
    """Each label string's token id; the SFT target and top-1 accuracy need exactly one token per label."""
    ids = [tok(s, add_special_tokens=False).input_ids for s in labels]
    for s, t in zip(labels, ids):
        if len(t) != 1:
            raise IA2Error(f"label {s!r} is {len(t)} tokens for this tokenizer ({t}); single-token tasks "
                           "need one token per label: choose other --labels")
    if len({t[0] for t in ids}) < len(ids):
        raise IA2Error(f"labels {labels} do not map to distinct tokens ({ids})")
    return [t[0] for t in ids]


def check_tokenizer(tok, prompts: list):
    """Warn when the tokenizer reads about one character per token (a broken conversion, e.g. of some GGUF
    tokenizers in some transformers versions): every result would be meaningless."""
    if sum(len(encode(tok, p)) for p in prompts) > 0.75 * sum(map(len, prompts)):
        warn("the tokenizer reads the prompts about one character per token: it is probably broken, and "
             "every result would be meaningless; check tok.tokenize(prompt)")


def evaluate(S: Setup, ev: Task, prompt_sets: list, slots=None, show=0, tag="") -> list:
    """Each set of prompts (one per eval example of task ev), set j through adapter slots[j] (None: the model
    as it is), all sets in shared batches: per set, its metrics and each example's answer. Generations:
    prints the first `show` of set 0."""
    seqs, n = [p for ps in prompt_sets for p in ps], len(ev.gold)
    rows = None if slots is None else [k for k in slots for _ in range(n)]
    if ev.labels:
        pred = predict_all(S.model, seqs, ev.label_ids, rows)
        sets = [[x[j * n:(j + 1) * n] for x in pred] for j in range(len(prompt_sets))]
        return [(metrics(p, ev.gold, S.tok, ev.labels), label_answers(p, ev, S.tok)) for p in sets]
    texts = generate_all(S.model, S.tok, seqs, S.cfg.max_new_tokens or ev.spec["gen"], rows)
    pred, gold = [parse_answer(ev.name, t) for t in texts], [parse_answer(ev.name, y) for y in ev.gold]
    for i in range(show):
        print(f"[{tag}] example {i}: ...{texts[i][-160:]!r} -> {pred[i]!r} (gold {gold[i]!r})")
    answers = []
    for i, (t, p) in enumerate(zip(texts, pred)):
        g = gold[i % n]
        answers.append(dict(index=i % n, gold=g, text=t, answer=p, correct=p is not None and p == g))
    return [(dict(accuracy=100 * float(np.mean([a["correct"] for a in answers[j * n:(j + 1) * n]]))),
             answers[j * n:(j + 1) * n]) for j in range(len(prompt_sets))]


def label_answers(pred, ev: Task, tok) -> list:
    """Each example's answer on a single-token task: the top-1 token, its probability and the confidence of
    the paper's ECE (renormalised over the top 10), each label's probability, and whether it is right."""
    top_p, top_id, label_p = pred
    right = top1_label(top_id, tok, ev.labels) == ev.gold
    six = lambda x: round(float(x), 6)  # six digits: enough, and a smaller file
    return [dict(index=i, gold=ev.labels[g], top1=tok.decode([int(top_id[i, 0])]), p_top1=six(top_p[i, 0]),
                 confidence=six(top_p[i, 0] / top_p[i].sum()), correct=bool(right[i]),
                 label_p={s: six(p) for s, p in zip(ev.labels, label_p[i])}) for i, g in enumerate(ev.gold)]


def record(folder: str, rows: list, row: dict, answers: list):
    """A result row, kept in rows, and its examples' answers, added to answers.jsonl (Ctrl-C keeps both)."""
    rows.append(row)
    keys = {k: row[k] for k in ("task", "method", "lr", "beta", "run")}
    with open(os.path.join(folder, "answers.jsonl"), "a") as f:
        f.writelines(json.dumps(dict(keys, **a), ensure_ascii=False) + "\n" for a in answers)


def draw_runs(S: Setup) -> list:
    """Run r: N training and min(48, N//2) dev examples and the held-out demo pool, drawn with
    RandomState(seed + r); then the teacher, once, for every run's training and dev examples."""
    runs = []
    for r in range(S.cfg.runs):
        train, dev, rest, orders = few_shot_split(S.task.pool, S.cfg.n_train, S.cfg.seed + r)
        train, dev = training_items(S.tok, S.task.labels, train, dev, orders)
        runs.append(dict(r=r, train=train, dev=dev, rest=rest))
    if set(S.cfg.methods) - {"zero_shot", "icl", "sft"}:
        T = 1 if S.task.labels else S.cfg.max_new_tokens or 200  # §3: T=1 single-token, G=200 multi-token
        teacher_all(S.model, [it for run in runs for it in run["train"] + run["dev"]], T, S.tok.eos_token_id,
                    kd="kd" in S.cfg.methods)
        for run in runs:
            T_mean = float(np.mean([len(it["y_icl"]) for it in run["train"] + run["dev"]]))
            right = sum(teacher_is_right(S, it) for it in run["train"])
            print(f"[run {run['r']}] teacher: {T_mean:.0f} token{'s' * (T_mean != 1)} per rollout; ICL "
                  f"answers on the training examples: {right}/{len(run['train'])} correct")
    return runs


def teacher_is_right(S: Setup, it: dict) -> bool:
    """Whether the teacher's answer Ŷ is the ground truth: the label's token, or the same parsed answer."""
    if S.task.labels:
        return it["y_icl"][0] == it["y_ids"][0]
    return parse_answer(S.task.name, answer_of(S.tok, it["y_icl"])) == parse_answer(S.task.name, it["y"])


def run_method(S: Setup, m: str, runs: list, folder: str, rows: list, start=None) -> dict:
    """Appends m's rows to rows as each finishes (Ctrl-C keeps them). zero_shot: the base model, once; icl:
    with N-1 held-out demos per query, once per run; a trained method: every (lr, β, run) adapter trained at
    once, then evaluated at once on every eval task and saved; ia2_then_sft(_icl) continues the IA2 adapter of
    its (lr, run) in start. Returns the adapters, {(lr, β, run): state}."""
    cfg = S.cfg
    if m in ("zero_shot", "icl"):
        with without_adapters(S.model):
            for ev in S.evals:
                sets = [ev.queries] if m == "zero_shot" else [
                    icl_eval_prompts(S.tok, S.task.labels, run["rest"], ev.eval_set, cfg.n_train - 1,
                                     cfg.seed + run["r"]) for run in runs]
                tag = f"{m}{' run 0' * (m == 'icl')} on {ev.name}"
                for r, (x, answers) in enumerate(evaluate(S, ev, sets, show=2, tag=tag)):
                    row = dict(task=ev.name, method=m, lr=None, beta=None, run=r, **x)
                    record(folder, rows, row, answers)
        return {}
    jobs = []
    for lr in cfg.lr:
        for beta in cfg.beta if m == "ia2_plus_sft" else [None]:
            for run in runs:
                at = start[lr, None, run["r"]] if start else None  # IA2→SFT: its IA2 adapter
                jobs.append(Job(lr, run["r"], run["train"], run["dev"], beta, at))
    tag = functools.partial(job_name, m)
    train_grid(S.model, OBJECTIVE[m], jobs, cfg, tag)
    states = {(job.lr, job.beta, job.run): slot_state(S.model, k) for k, job in enumerate(jobs)}
    if m not in cfg.methods:
        return states  # only the IA2 phase of ia2_then_sft(_icl)
    for ev in S.evals:
        sets, slots = [ev.queries] * len(jobs), list(range(len(jobs)))
        for job, (x, answers) in zip(jobs, evaluate(S, ev, sets, slots, 2, f"{tag(jobs[0])} on {ev.name}")):
            record(folder, rows, dict(task=ev.name, method=m, lr=job.lr, beta=job.beta, run=job.run, **x,
                                      dev_loss=job.best, steps=job.steps, capped=job.capped), answers)
            ece = f" | ece {x['ece']:.3f}" if "ece" in x else ""
            print(f"[{tag(job)}] {ev.name}: acc {x['accuracy']:.1f}{ece} | best dev {job.best:.4f} | "
                  f"{job.steps} steps")
    for (lr, beta, run), state in states.items():
        save_adapter(state, adapter_dir(folder, m, lr, beta, run), cfg)
    return states


def job_name(m: str, job: Job) -> str:
    beta = "" if job.beta is None else f" β={job.beta:g}"
    return f"{m} lr={job.lr:g}{beta} run {job.run}"


def adapter_dir(folder: str, method: str, lr: float, beta, run: int) -> str:
    setting = f"lr{lr:g}" + ("" if beta is None else f"-beta{beta:g}")
    return os.path.join(folder, "adapters", method, setting, f"run{run}")


PEFT = dict(A="lora_A.weight", B="lora_B.weight", l="ia3_l")  # each parameter's name in PEFT's saved layout


def save_adapter(state: dict, folder: str, cfg: Config):
    """An adapter (adapter_state, slot_state) in PEFT's layout: peft.PeftModel.from_pretrained(base_model,
    folder) loads it (tested)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for n, t in state.items():
        module, p = n.rsplit(".", 1)
        tensors[f"base_model.model.{module}.{PEFT[p]}"] = t.cpu().contiguous()
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = list(adapter_targets(cfg))
    config = dict(task_type="CAUSAL_LM", base_model_name_or_path=cfg.model, inference_mode=True)
    if cfg.adapter == "ia3":
        config.update(peft_type="IA3", target_modules=targets, feedforward_modules=targets,
                      fan_in_fan_out=False, init_ia3_weights=True)
    else:
        config.update(peft_type="LORA", r=cfg.rank, lora_alpha=cfg.rank, lora_dropout=0.0, bias="none",
                      target_modules=targets, init_lora_weights=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def read_adapter(folder: str) -> dict:
    """A saved adapter, as adapter_state gives it: load_adapter_state(model, read_adapter(folder))."""
    from safetensors.torch import load_file
    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise IA2Error(f"no adapter at {path}")
    ours, out = {key: p for p, key in PEFT.items()}, {}  # "lora_A.weight" -> "A"
    for key, t in load_file(path).items():
        name = key[len("base_model.model."):]
        suffix = next(x for x in ours if name.endswith("." + x))
        out[name[:-len(suffix)] + ours[suffix]] = t
    return out


def summarize(rows: list) -> dict:
    """One eval task's rows -> per method, the mean and population std (ddof=0) over runs at the setting (lr,
    β) with the best mean top-1 accuracy on the eval set, as the paper selects (the first of equals, as the
    official code); the runs there; and the lr of the lowest mean dev loss at that β, with its results."""
    out = {}
    for m in METHODS:
        by = collections.defaultdict(list)  # (lr, β) -> the runs' rows
        for x in (x for x in rows if x["method"] == m):
            by[x["lr"], x["beta"]].append({k: v for k, v in x.items() if k not in ("task", "method", "lr",
                                                                                    "beta")})
        if not by:
            continue
        stat = {s: stats(runs) for s, runs in by.items()}
        best = max(by, key=lambda s: stat[s]["mean"]["accuracy"])
        tie = sum(stat[s]["mean"]["accuracy"] == stat[best]["mean"]["accuracy"] for s in by) > 1
        dev_loss = {s: np.mean([x.get("dev_loss", 0) for x in by[s]]) for s in by if s[1] == best[1]}
        dev = min(dev_loss, key=dev_loss.get)
        dev_selected = dict(stat[dev], lr=dev[0])
        out[m] = dict(stat[best], lr=best[0], beta=best[1], tie=tie, runs=by[best], dev_selected=dev_selected,
                      settings={setting_name(*s): stat[s] for s in by})
    return out


def stats(runs: list) -> dict:
    """Mean and population std over runs of each metric; the mean share of each answer (predicted), the runs
    in which one answer was given to every example, and those whose adapter stopped at the --epochs cap."""
    keys = [k for k in METRICS if k in runs[0]]
    return dict(mean={k: float(np.mean([x[k] for x in runs])) for k in keys},
                std={k: float(np.std([x[k] for x in runs])) for k in keys},
                predicted=np.mean([x.get("predicted", [0]) for x in runs], 0).tolist(),
                one_answer_runs=sum(max(x.get("predicted", [0])) == 100 for x in runs),
                capped_runs=sum(x.get("capped", False) for x in runs))


def setting_name(lr, beta=None) -> str:
    if lr is None:
        return "–"
    return f"{lr:g}" + ("" if beta is None else f", β {beta:g}")


def majority(labels: list, gold: np.ndarray) -> dict:
    """Always answering the eval set's most frequent label: the accuracy a method must beat."""
    counts = np.bincount(gold.astype(int), minlength=len(labels))
    return dict(label=labels[counts.argmax()], accuracy=float(100 * counts.max() / len(gold)))


def table(results: dict, ev: Task) -> str:
    """One eval task's table: each method's metrics at its selected setting, the dev-selected lr and its
    accuracy; for a single-token task also the majority-class row and what each method answers (a method that
    gives one answer to every example in some run is marked)."""
    head = ["method", "lr (β)", "accuracy", "lr (dev-selected)", "accuracy (dev-selected)"]
    rows, single = [], ev.labels is not None
    if single:
        head[3:3] = ["label acc.", "ECE", "ECE (equal width)"]
        head.append(f"answers {'/'.join(ev.labels + ['other'])} (%)")
        maj = majority(ev.labels, ev.gold)
        always = "/".join("100" if x == maj["label"] else "0" for x in ev.labels)
        rows.append([f"majority class (always {maj['label']!r})", "–", f"{maj['accuracy']:.1f}",
                     f"{maj['accuracy']:.1f}", "–", "–", "–", "–", f"{always}/0"])
    for m, r in results.items():
        dev = ["–", "–"]
        if m in TRAINED:
            dev = [setting_name(r["dev_selected"]["lr"]), mean_std(r["dev_selected"], "accuracy")]
        tie = " (a tie)" * r["tie"]  # the first of the equals, as the official code takes it
        row = [m, setting_name(r["lr"], r["beta"]) + tie, mean_std(r, "accuracy")] + dev
        if single:
            row[3:3] = [mean_std(r, "label_accuracy"), mean_std(r, "ece", "{:.3f}"),
                        mean_std(r, "ece_equal_width", "{:.3f}")]
            n, answers = len(r["runs"]), "/".join(f"{p:.0f}" for p in r["predicted"])
            if r["one_answer_runs"]:
                answers += f" **one answer in {r['one_answer_runs']}/{n} run{'s' * (n > 1)}**"
            row.append(answers)
        rows.append(row)
    what = ("top-1 accuracy and label accuracy in %, ECE as a fraction" if single else
            "accuracy: exact match of the parsed answer, in %")
    lines = ["| " + " | ".join(x) + " |" for x in [head] + rows]
    lines.insert(1, "|---" * len(head) + "|")
    note = (f"{what}; mean ± std over runs. lr (β): selected on the eval set by mean accuracy, as the paper "
            "does; dev-selected: the lowest mean dev loss.")
    if single:
        note += " answers: how often the top-1 token is each label or another one."
    return "\n".join(lines) + "\n\n" + note


def capped_notes(summary: dict, cfg: Config) -> list:
    """A line for each method that gave one answer to every example in every run while every one of its
    adapters stopped at an --epochs cap below the paper's 50: it may have had too few steps to learn."""
    notes, steps = [], cfg.epochs * math.ceil(cfg.n_train / cfg.batch_size)
    for m, r in summary.get(cfg.task, {}).items():
        n = len(r["runs"])
        if m in TRAINED and r["one_answer_runs"] == n and r["capped_runs"] == n and cfg.epochs < 50:
            notes.append(f"{m}: every run gave one answer to every example, and every adapter stopped at the "
                         f"--epochs {cfg.epochs} cap, {steps} optimizer step{'s' * (steps > 1)} "
                         f"(N={cfg.n_train} in batches of {min(cfg.batch_size, cfg.n_train)}): "
                         "raise --epochs (the paper: 50)")
    return notes


def mean_std(r: dict, k: str, f="{:.1f}") -> str:
    return f"{f.format(r['mean'][k])} ± {f.format(r['std'][k])}" if k in r["mean"] else "–"


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a cluster's scheduler sends it at a time limit or a preemption: handled as Ctrl-C."""


def terminate(signum, frame):
    raise Terminated()


def run_experiment(cfg: Config) -> list:
    """Every method x lr (x β) x run; writes <out>.partial, renamed to --out when done. Interrupted (Ctrl-C,
    SIGTERM), the .partial keeps what finished, and the same command resumes it. Returns the rows."""
    t0 = time.time()
    out = cfg.out or default_out(cfg)
    if os.path.exists(out):
        raise IA2Error(f"--out {out}: a {'folder' if os.path.isdir(out) else 'file'} of that name exists; "
                       "choose another")
    tmp = out + ".partial"
    rows, finished, spent = resumable(cfg, tmp)  # an interrupted run of this command: what it finished
    S, timing = setup(cfg), dict(load=time.time() - t0)
    methods = [m for m in METHODS if m in cfg.methods]
    if "ia2" not in methods and {"ia2_then_sft", "ia2_then_sft_icl"} & set(methods):
        methods.insert(methods.index(next(m for m in methods if "then" in m)), "ia2")  # their first phase
    print_plan(S, methods, finished, tmp)
    write_config(S, tmp)
    write_examples(S, tmp)

    def times():  # seconds per phase, over every session of the run
        now = dict(timing, total=time.time() - t0)
        return {k: spent.get(k, 0) + now.get(k, 0) for k in {**spent, **now}}
    try:
        run_methods(S, methods, finished, tmp, rows, timing)
    except KeyboardInterrupt as e:
        for s in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the saving short
            signal.signal(s, signal.SIG_IGN)
        write_outputs(S, tmp, rows, times(), interrupted=True)
        what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"ia2.py: {what}; the adapters and results finished so far are in {tmp}/, and the same command "
              "resumes it", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except BaseException:
        if not finished:  # an error: no half-written output (a resumed run keeps what it had)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = write_outputs(S, tmp, rows, times())
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(tmp, out)
    session = f" ({time.time() - t0:.0f} s in this session)" if spent else ""
    print(f"\n{report}\nwritten to {out}/ in {times()['total']:.0f} s{session}")
    return rows


def print_plan(S: Setup, methods: list, finished: list, folder: str):
    """What the run trains and evaluates (resumed: what is left), and the most optimizer steps an adapter can
    take."""
    cfg, todo = S.cfg, [m for m in methods if m not in finished]
    if finished:
        print(f"resuming {folder}/: {', '.join(finished)} finished there (their rows, answers and adapters "
              "are kept, not redone)")
    trained, base = [m for m in todo if m in TRAINED], " and ".join(m for m in todo if m not in TRAINED)
    evals = ", ".join(f"{len(ev.gold)} {ev.name}" for ev in S.evals)
    if not trained:
        return print(f"plan: {base or 'nothing left'}; evaluated on {evals} examples")
    n = cfg.runs * len(cfg.lr) * sum(len(cfg.beta) if m == "ia2_plus_sft" else 1 for m in trained)
    betas = f", ia2_plus_sft x {len(cfg.beta)} β" * ("ia2_plus_sft" in trained)
    runs, per_epoch = f"{cfg.runs} run{'s' * (cfg.runs > 1)}", math.ceil(cfg.n_train / cfg.batch_size)
    steps, bs = f"{per_epoch} step{'s' * (per_epoch > 1)}", min(cfg.batch_size, cfg.n_train)
    print(f"plan: {n} adapters ({', '.join(trained)} x {len(cfg.lr)} lr x {runs}{betas}), "
          f"{adapter_kind(S, cfg)}; each at most {cfg.epochs} epochs of {steps} (N={cfg.n_train}, batch size "
          f"{bs}): {cfg.epochs * per_epoch} optimizer steps, fewer if early stopping ends it; a method's "
          f"adapters train together. Evaluated on {evals} examples" + f", like {base}" * bool(base))


def adapter_kind(S: Setup, cfg: Config) -> str:
    """'LoRA r=8 α=8 on q_proj,k_proj,o_proj, 2,816 trainable parameters each' (or (IA)³'s)."""
    targets = [m for name, m in S.model.named_modules() if name.rsplit(".", 1)[-1] in adapter_targets(cfg)]
    if cfg.adapter == "ia3":
        kind, size = "(IA)³", sum(m.in_features for m in targets)
    else:
        kind, size = f"LoRA r={cfg.rank} α={cfg.rank}", sum(cfg.rank * (m.in_features + m.out_features)
                                                         for m in targets)
    return f"{kind} on {','.join(adapter_targets(cfg))}, {size:,} trainable parameters each"


def run_methods(S: Setup, methods: list, finished: list, folder: str, rows: list, timing: dict):
    """The teacher, then each method not finished yet; after the first trained one, an estimate of the rest"""
    tick, ia2_states = time.time(), {}
    runs = draw_runs(S)
    timing["teacher"] = time.time() - tick
    first = next((m for m in methods if m in TRAINED and m not in finished), None)
    for m in methods:
        if m in finished:
            if m == "ia2":  # the start of ia2_then_sft(_icl): the saved IA2 adapters
                for lr, run in itertools.product(S.cfg.lr, runs):
                    ia2_states[lr, None, run["r"]] = read_adapter(adapter_dir(folder, m, lr, None, run["r"]))
            continue
        tick = time.time()
        states = run_method(S, m, runs, folder, rows, start=ia2_states if m.startswith("ia2_then") else None)
        if m == "ia2":
            ia2_states = states
        timing[m] = time.time() - tick
        left = timing[m] * sum(x in TRAINED and x not in finished for x in methods[methods.index(m) + 1:])
        if m == first and left:  # after the first trained method: its time times the methods to come
            more = f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min"
            print(f"estimate: {m} took {timing[m]:.0f} s; the other trained methods should take about {more} "
                  "more here (early stopping varies)")


def default_out(cfg: Config) -> str:
    """runs/<task>-<model>-n<N>-<time>, or the newest interrupted run of this same command, to resume it."""
    name = f"{cfg.task}-{os.path.basename(cfg.model.rstrip('/'))}-n{cfg.n_train}-"
    same = [f for f in sorted(glob.glob(os.path.join("runs", glob.escape(name) + "*.partial")))
            if saved_config(f) == as_json(dataclasses.asdict(cfg))]
    if same:
        return same[-1][:-len(".partial")]
    return os.path.join("runs", name + time.strftime("%Y%m%d-%H%M%S"))


def as_json(x):
    return json.loads(json.dumps(x))  # tuples as lists, as config.json holds them


def saved_config(folder: str):
    path = os.path.join(folder, "config.json")
    return read_json(path)["config"] if os.path.isfile(path) else None


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def resumable(cfg: Config, tmp: str) -> tuple:
    """The rows of an interrupted run in tmp, the methods it finished (every row and every adapter there) and
    the seconds it spent; ([], [], {}) if there is none. A .partial of another command is refused, and left as
    it is; in one of this command, the answers of the methods not finished are dropped."""
    if not os.path.exists(tmp):
        return [], [], {}
    cfg_dict, saved = as_json(dataclasses.asdict(cfg)), saved_config(tmp)
    if saved != cfg_dict:
        differ = sorted(k for k in cfg_dict if saved is None or saved.get(k) != cfg_dict[k])
        flags = ", ".join("--" + k.replace("_", "-") for k in differ)
        raise IA2Error(f"{tmp}/ holds an interrupted run of another command (it differs in {flags}): run "
                       "that command to resume it, or move the folder away")
    path = os.path.join(tmp, "results.json")
    results = read_json(path) if os.path.isfile(path) else dict(rows=[], timing_s={})
    n_tasks, grid = len(dict.fromkeys(cfg.eval_tasks or [cfg.task])), len(cfg.lr) * cfg.runs
    expected = dict(zero_shot=1, icl=cfg.runs, ia2_plus_sft=grid * len(cfg.beta))

    def saved_adapters(m):
        betas = cfg.beta if m == "ia2_plus_sft" else [None]
        return all(os.path.isfile(os.path.join(adapter_dir(tmp, m, lr, b, r), "adapter_model.safetensors"))
                   for lr, b, r in itertools.product(cfg.lr, betas, range(cfg.runs)))
    rows = results["rows"]
    finished = [m for m in METHODS if m in cfg.methods
                and sum(x["method"] == m for x in rows) == n_tasks * expected.get(m, grid)
                and (m not in TRAINED or saved_adapters(m))]
    path = os.path.join(tmp, "answers.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["method"] in finished]
        with open(path, "w") as f:
            f.writelines(kept)
    return [x for x in rows if x["method"] in finished], finished, results["timing_s"]


def write_config(S: Setup, folder: str):
    """config.json: every setting (what a resumed run must match), the labels, template, device, dtype,
    versions."""
    import transformers
    meta = dict(config=dataclasses.asdict(S.cfg), labels=S.task.labels, label_token_ids=S.task.label_ids,
                template=S.task.spec["template"], model_class=type(S.model).__name__,
                device=str(S.model.device), dtype=str(S.model.dtype), pool_size=len(S.task.pool),
                eval_size={ev.name: len(ev.gold) for ev in S.evals},
                versions=dict(torch=torch.__version__, transformers=transformers.__version__))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(meta, f, indent=1)


def write_outputs(S: Setup, folder: str, rows: list, timing: dict, interrupted=False) -> str:
    """config.json, results.json (the rows; per eval task each method's summary and the majority-class rate),
    results.md (the tables, also returned)."""
    summary = {ev.name: summarize([x for x in rows if x["task"] == ev.name]) for ev in S.evals}
    report = ""
    for ev in S.evals:
        ood = "" if ev.name == S.cfg.task else f" (OOD, ICL demos from {S.cfg.task})"
        report += f"## {S.cfg.task} -> {ev.name}{ood}\n\n{table(summary[ev.name], ev)}\n\n"
    report += "".join(f"**Note** {line}.\n\n" for line in capped_notes(summary, S.cfg))
    write_config(S, folder)
    if not interrupted:
        mark_selected(folder, summary)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(dict(summary=summary, rows=rows, timing_s=timing, interrupted=interrupted,
                       majority={ev.name: majority(ev.labels, ev.gold) if ev.labels else None
                                 for ev in S.evals},
                       selection="each method's (lr, β) by its best mean accuracy on the eval set (the "
                                 "paper's); dev_selected: the lowest mean dev loss"), f, indent=1)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(f"# {S.cfg.task}, {S.cfg.model}, N={S.cfg.n_train}, {S.cfg.runs} run{'s' * (S.cfg.runs > 1)}"
                f"{' (interrupted: the methods finished so far)' * interrupted}\n\n{report}")
    return report


def mark_selected(folder: str, summary: dict):
    """answers.jsonl: each line gets selected, true for the setting the tables report (the eval-selected lr,
    β), false for the other settings of the grid."""
    path, chosen = os.path.join(folder, "answers.jsonl"), set()
    if not os.path.isfile(path):
        return
    for task, methods in summary.items():
        chosen |= {(task, m, r["lr"], r["beta"]) for m, r in methods.items()}
    with open(path) as f:
        answers = [json.loads(line) for line in f]
    with open(path, "w") as f:
        for a in answers:
            a["selected"] = (a["task"], a["method"], a["lr"], a["beta"]) in chosen
            f.write(json.dumps(a, ensure_ascii=False) + "\n")


def write_examples(S: Setup, folder: str):
    """eval_examples.jsonl: the task, index, prompt text and gold answer of every eval example, as the
    lines of answers.jsonl name them (task, index)."""
    with open(os.path.join(folder, "eval_examples.jsonl"), "w") as f:
        for ev in S.evals:
            for i, (x, y) in enumerate(ev.eval_set):
                gold = answer_text(ev.labels, y)
                f.write(json.dumps(dict(task=ev.name, index=i, text=x, gold=gold), ensure_ascii=False) + "\n")


def main(argv=None):
    """The command line: every failure one line on stderr, exit 2; Ctrl-C exit 130, SIGTERM 143."""
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt,
    sigterm = signal.signal(signal.SIGTERM, terminate)  # SIGTERM Terminated, a KeyboardInterrupt
    try:
        cfg = parse_args(argv)
        if cfg.list_tasks:
            return print(task_table())
        run_experiment(cfg)
    except IA2Error as e:
        print(f"ia2.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # before the run began: run_experiment says what was kept after that
        what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"ia2.py: {what} before the run began; nothing was written", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    finally:
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGTERM, sigterm)


if __name__ == "__main__":
    main()
