"""Tests for ia2.py: known answers and independent references, on a tiny random Qwen3 built here.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q test_ia2.py
"""
import collections
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import ia2  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = "good bad great awful fine dull film movie plot story acting a the was is very not".split()


# -----------------------------------------------------------------------------
# fixtures: a 2-layer Qwen3 with a BPE tokenizer trained on a few sentences, and a CSV


def sentence(rng, label):
    w = rng.choice(["good", "great", "fine"] if label else ["bad", "awful", "dull"])
    return f"the {rng.choice(['film', 'movie', 'plot', 'story'])} was {'very ' * rng.randint(0, 3)}{w}"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.RandomState(0)
    rows = [(sentence(rng, y), y) for y in rng.randint(0, 2, 120)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [f"Text:{t}\nLabel:{y}\n\n" for t, y in rows] + [" ".join(WORDS)] * 5 + [" negative positive"] * 40  # one token each
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(root / "model")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    Qwen3ForCausalLM(config).save_pretrained(root / "model")
    with open(root / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label")] + rows)
    return dict(model=str(root / "model"), data=str(root / "data.csv"), root=root)


@pytest.fixture
def model(tiny):
    tok = ia2.load_tokenizer(tiny["model"])
    return tok, ia2.load_model(tiny["model"], tok, torch.device("cpu"), torch.float32)


def items(tok, n=4, seed=0):
    """Training items as the pipeline builds them, with teacher fields filled by hand."""
    rng = np.random.RandomState(seed)
    out = []
    for y in rng.randint(0, 2, n):
        x = ia2.encode(tok, f"Text:{sentence(rng, y)}\nLabel:")
        y_icl = [int(rng.randint(5, 50))]
        out.append(dict(x=x, y=int(y), y_ids=[10 + int(y)], icl=x, y_icl=y_icl, y_out=y_icl, y_kd=y_icl,
                        A_icl=torch.randn(2, 1, 32), logp_icl=torch.randn(1, len(tok)).log_softmax(-1)))
    return out


def multi_items(tok, n=4, seed=0):
    """Multi-token training items: targets of different lengths, teacher fields of matching length."""
    rng, out = np.random.RandomState(seed), []
    for k in range(n):
        x = ia2.encode(tok, f"Question:{sentence(rng, k % 2)}?\nAnswer:")
        y_ids, y_icl = list(rng.randint(2, 250, 2 + k)), list(rng.randint(2, 250, 5 - k))
        out.append(dict(x=x, y="", y_ids=[int(t) for t in y_ids] + [1], icl=x, y_icl=[int(t) for t in y_icl],
                        y_out=[int(t) for t in y_icl][:3 - k % 2] + [1], y_kd=[int(t) for t in y_icl],
                        A_icl=torch.randn(2, len(y_icl), 32),
                        logp_icl=torch.randn(len(y_icl), len(tok)).log_softmax(-1)))
    return out


# -----------------------------------------------------------------------------
# LoRA


def test_lora_is_identity_at_init_and_equals_merged_weight():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    lora = ia2.LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 16)
    assert torch.equal(lora(x), base(x))  # B = 0
    torch.nn.init.normal_(lora.B)
    merged = base.weight + (8 / 4) * lora.B @ lora.A  # W0 + (α/r)·B·A
    torch.testing.assert_close(lora(x), torch.nn.functional.linear(x, merged, base.bias))
    with ia2.without_adapters(torch.nn.Sequential(lora)):
        assert torch.equal(lora(x), base(x))


def test_add_lora_keeps_outputs_and_trains_only_lora(model):
    tok, m = model
    ids = torch.tensor([ia2.encode(tok, "Text:the film was good\nLabel:")])
    before = m(ids).logits
    ia2.add_lora(m, r=8, alpha=8)
    torch.testing.assert_close(m(ids).logits, before)
    trainable = {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.endswith((".A", ".B")) for n in trainable)
    # per layer: q 32->32, k 32->16, o 32->32, each r·(d_in + d_out)
    assert sum(trainable.values()) == 2 * 8 * ((32 + 32) + (32 + 16) + (32 + 32))
    frozen = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    ia2.fit(m, "sft", items(tok), items(tok, 2, 1), 1e-2, epochs=2)
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if not p.requires_grad)
    assert any(mod.B.abs().sum() > 0 for mod in ia2.adapter_modules(m).values())


def test_lora_rows_each_use_their_own_adapter():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    lora = ia2.LoRASlots(base, r=4, alpha=8, K=3)
    assert lora.A.shape == (3, 4, 16) and lora.B.shape == (3, 24, 4)
    for k in range(3):
        lora.reset(k)
    torch.nn.init.normal_(lora.B)
    assert not torch.equal(lora.A[0], lora.A[1])  # each adapter has its own init
    x = torch.randn(4, 5, 16)
    lora.rows = torch.tensor([2, 0, 2, 1])
    y = lora(x)
    for i, k in enumerate([2, 0, 2, 1]):  # row i: W0 + (α/r)·B_k·A_k
        merged = base.weight + 2 * lora.B[k] @ lora.A[k]
        torch.testing.assert_close(y[i], torch.nn.functional.linear(x[i], merged, base.bias))
    lora.rows = None  # unset: adapter 0 for every row
    torch.testing.assert_close(lora(x), torch.nn.functional.linear(x, base.weight + 2 * lora.B[0] @ lora.A[0], base.bias))


def test_ia3_is_the_base_model_at_init_and_equals_its_merged_weight():
    """h = W0 (l ⊙ x) = (W0 · diag(l)) x, the weight PEFT's merge makes; l = 1 at init leaves W0."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    ia3 = ia2.IA3Linear(base)
    x = torch.randn(3, 16)
    assert torch.equal(ia3(x), base(x)) and ia3.l.shape == (1, 16)  # PEFT's shape
    torch.nn.init.normal_(ia3.l)
    merged = base.weight * ia3.l  # W0 · diag(l): column j scaled by l_j
    torch.testing.assert_close(ia3(x), torch.nn.functional.linear(x, merged, base.bias))
    with ia2.without_adapters(torch.nn.Sequential(ia3)):
        assert torch.equal(ia3(x), base(x))


def test_ia3_rows_each_use_their_own_vector():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    ia3 = ia2.IA3Slots(base, K=3)
    assert ia3.l.shape == (3, 1, 16)
    torch.nn.init.normal_(ia3.l)
    x = torch.randn(4, 5, 16)
    ia3.rows = torch.tensor([2, 0, 2, 1])
    y = ia3(x)
    for i, k in enumerate([2, 0, 2, 1]):
        torch.testing.assert_close(y[i], torch.nn.functional.linear(x[i], base.weight * ia3.l[k], base.bias))
    ia3.rows = None  # unset: vector 0 for every row
    torch.testing.assert_close(ia3(x), torch.nn.functional.linear(x, base.weight * ia3.l[0], base.bias))


def test_add_ia3_trains_only_one_vector_per_target(model):
    tok, m = model
    ids = torch.tensor([ia2.encode(tok, "Text:the film was good\nLabel:")])
    before = m(ids).logits
    ia2.add_ia3(m)
    torch.testing.assert_close(m(ids).logits, before)
    trainable = {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.endswith(".l") for n in trainable) and sum(trainable.values()) == 2 * (32 + 32 + 32)  # d_in of q, k, o


def test_adam_per_slot_equals_torch_adam():
    """Three adapters stacked in one tensor, each with its own lr, stepping only while live, equal
    torch.optim.Adam run on each alone."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4, 5))
    lrs, live_at = [1e-2, 3e-3, 1e-1], [[0, 1], [0, 1], [0, 1, 2], [1, 2], [1, 2], [2]]
    opt = ia2.Adam([p], lrs)
    refs = [torch.nn.Parameter(p[k].detach().clone()) for k in range(3)]
    ref_opts = [torch.optim.Adam([r], lr=lr) for r, lr in zip(refs, lrs)]
    for live in live_at:
        g = torch.randn(3, 4, 5)
        p.grad = g * torch.isin(torch.arange(3), torch.tensor(live))[:, None, None]  # no rows, no gradient
        opt.step(live)
        for k in live:
            refs[k].grad = g[k].clone()
            ref_opts[k].step()
    for k in range(3):
        torch.testing.assert_close(p[k].detach(), refs[k].detach(), atol=1e-7, rtol=1e-6)


def test_adam_and_the_best_copy_put_no_float64_on_the_device():
    """MPS has no float64: every tensor Adam and the best-adapter copy make on the parameters' device is float32
    (or bool). Checked on the meta device, where each op's outputs are recorded."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.update(x.dtype for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor) and x.is_meta)
            return out
    params = [torch.nn.Parameter(torch.empty(3, 4, 5, device="meta")), torch.nn.Parameter(torch.empty(3, 6, device="meta"))]
    opt, best = ia2.Adam(params, [1e-3, 1e-2, 1e-1]), [p.detach().clone() for p in params]
    with Record():
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step([0, 2])
        ia2.copy_slots(best, params, np.array([True, False, True]))
    assert seen and seen <= {torch.float32, torch.bool}, seen


def saved_bytes(m, items, objective) -> int:
    """What autograd keeps for the backward of one forward (parameters excluded: they are in memory anyway)."""
    params, seen = {p.untyped_storage().data_ptr() for p in m.parameters()}, {}

    def pack(x):
        if x.untyped_storage().data_ptr() not in params:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), ia2.routed(m, list(range(len(items)))):
        ia2.objective_loss(m, objective, items, 0.5)
    return sum(seen.values())


@pytest.mark.parametrize("arch, dtype", [("qwen3-0.6b", torch.bfloat16), ("qwen3-0.6b", torch.float32),
                                         ("llama", torch.bfloat16), ("qwen2", torch.bfloat16), ("gemma3", torch.bfloat16)])
def test_the_token_budget_costs_what_autograd_keeps(arch, dtype):
    """bytes_per_token(grad=True) against the saved-tensor bytes of a forward with 3 LoRA adapters, 3 rows of 64
    tokens: within ±30 % (Qwen3-0.6B's widths, one layer; the other families at small widths, two layers)."""
    import transformers
    if arch == "qwen3-0.6b":
        conf = transformers.Qwen3Config(vocab_size=256, hidden_size=1024, intermediate_size=3072, num_hidden_layers=1,
                                        num_attention_heads=16, num_key_value_heads=8, head_dim=128)
        m = transformers.Qwen3ForCausalLM(conf)
    else:  # (Gemma: full attention in both layers; torch < 2.5 builds a sliding-window mask with torch.func,
        conf_cls, model_cls, extra = ARCHS[arch]  # which cannot run under saved-tensor hooks)
        extra = dict(layer_types=["full_attention"] * 2) if arch == "gemma3" else {}
        conf = getattr(transformers, conf_cls)(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=64, **extra)
        m = getattr(transformers, model_cls)(conf)
    m = m.to(dtype)
    m.config.pad_token_id = 0
    ia2.add_adapters(m, ia2.Config(), K=3)
    torch.manual_seed(0)
    items = [dict(x=torch.randint(3, 256, (64,)).tolist(), y_icl=[5], A_icl=torch.randn(conf.num_hidden_layers, 1,
                                                                                      conf.hidden_size).to(dtype))
             for _ in range(3)]
    ratio = saved_bytes(m, items, "ia2") / (3 * 64 * ia2.bytes_per_token(m, grad=True))
    assert 0.7 < ratio < 1.3, ratio


def test_the_gpu_budget_counts_cached_memory_as_free(monkeypatch):
    """Half of free + reserved-but-unallocated memory, less the LM head's fp32 copy, at bytes_per_token: the same
    budget before and after the allocator caches 6 GB (mem_get_info alone would fall by 6 GB)."""
    import types
    head = torch.nn.Linear(8, 1000, bias=False)
    m = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, lm_head=head, config=types.SimpleNamespace(
        num_hidden_layers=2, hidden_size=8, num_attention_heads=2, head_dim=4, num_key_value_heads=1,
        intermediate_size=16, vocab_size=1000))
    per_token = 2 * (16.3 * 8 + 12.6 * 8 + 8.3 * 4 + 6.0 * 16)  # SAVED[2] times the widths, 2 layers
    for free, reserved, allocated in ((20e9, 1e9, 1e9), (14e9, 7e9, 1e9)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 24e9))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: allocated)
        assert ia2.token_budget(m, grad=True) == int((20e9 - 4 * 8000) / 2 / per_token)


# -----------------------------------------------------------------------------
# activation capture and the batched forward


def test_hooks_equal_manual_computation_and_are_removed(model):
    tok, m = model
    ids = torch.tensor([ia2.encode(tok, "Text:the plot was dull\nLabel:")])
    with ia2.capture_activations(m) as acts:
        hs = m(ids, output_hidden_states=True).hidden_states
    n_hooks = [len(layer.self_attn._forward_hooks) for layer in m.model.layers]  # transformers adds its own
    assert len(acts) == 2 and acts[0].shape == (1, ids.shape[1], 32)
    # residual stream by hand: h_{l+1} = h_l + a_l + MLP(norm(h_l + a_l)), with a_l the captured output
    layer, a = m.model.layers[0], acts[0]
    mid = hs[0] + a
    torch.testing.assert_close(hs[1], mid + layer.mlp(layer.post_attention_layernorm(mid)))
    with pytest.raises(RuntimeError):
        with ia2.capture_activations(m):
            assert [len(layer.self_attn._forward_hooks) for layer in m.model.layers] == [n + 1 for n in n_hooks]
            raise RuntimeError("boom")
    assert [len(layer.self_attn._forward_hooks) for layer in m.model.layers] == n_hooks


ARCHS = {  # tiny random configs of the model families ia2.py must support
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(sliding_window=4, final_logit_softcapping=3.0)),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_and_forward_on_other_families(arch):
    import transformers
    conf_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, conf_cls)(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, **extra)
    m = getattr(transformers, model_cls)(config).eval()
    ids = torch.randint(0, 64, (1, 9))
    with ia2.capture_activations(m) as acts:
        out = m(ids, output_hidden_states=True)
    h, a, layer = out.hidden_states[0], acts[0], m.model.layers[0]
    if arch == "gemma3":  # Gemma normalises the attention output before the residual add
        mid = h + layer.post_attention_layernorm(a)
        ref = mid + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(mid)))
    else:
        mid = h + a
        ref = mid + layer.mlp(layer.post_attention_layernorm(mid))
    torch.testing.assert_close(out.hidden_states[1], ref)
    logits, last = ia2.forward(m, [ids[0].tolist(), ids[0, :5].tolist()], capture=True)
    torch.testing.assert_close(logits[0, 0], out.logits[0, -1])  # final-logit soft-capping included
    torch.testing.assert_close(last[0, :, 0], torch.stack([x[0, -1] for x in acts]))
    # the cached, left-padded rollout (Gemma: past its sliding window of 4) equals the uncached one
    prompts = [ids[0].tolist(), ids[0, :3].tolist()]
    for p, o in zip(prompts, ia2.generate(m, prompts, 6, set(), capture=True, scores=True)):
        toks, a, logp = uncached_rollout(m, p, 6, eos=-1)
        assert o["tokens"] == toks
        torch.testing.assert_close(o["acts"], a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(o["logp"], logp, atol=1e-5, rtol=1e-4)


def test_forward_matches_full_logits_and_padding_changes_nothing(model):
    tok, m = model
    seqs = [it["x"] for it in items(tok)]
    assert len({len(s) for s in seqs}) > 1  # different lengths, so the batch is padded
    logits, acts = ia2.forward(m, seqs, capture=True)
    for i, s in enumerate(seqs):
        with ia2.capture_activations(m) as ref:
            full = m(torch.tensor([s])).logits[0, -1]
        torch.testing.assert_close(logits[i, 0], full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(acts[i, :, 0], torch.stack([r[0, -1] for r in ref]), atol=1e-5, rtol=1e-5)


def test_t1_alignment_ignores_the_appended_answer_token(model):
    """The official student reads X∘Ŷ and aligns at d_q, the last prompt token; causal attention makes that equal
    to reading X alone, whatever Ŷ is. Through ia2's own path: the IA2 loss of a teacher equal to the base
    model's activations at d_q (computed here with plain hooks on X alone) is 0 for every Ŷ."""
    tok, m = model
    x = ia2.encode(tok, "Text:a great story\nLabel:")
    acts = []
    hooks = [layer.self_attn.register_forward_hook(lambda mod, a, out: acts.append(out[0][0, -1].detach()))
             for layer in m.model.layers]
    try:
        m(torch.tensor([x]))
    finally:
        for h in hooks:
            h.remove()
    a_icl = torch.stack(acts)[:, None]  # (L, T'=1, D) at d_q
    for y_hat in ([7], [12], [tok.eos_token_id]):
        item = dict(x=x, y_icl=y_hat, A_icl=a_icl)
        assert ia2.objective_loss(m, "ia2", [item]).item() < 1e-10
    shifted = dict(x=x[:-1], y_icl=[x[-1]], A_icl=a_icl)  # aligned one position early: not the same activations
    assert ia2.objective_loss(m, "ia2", [shifted]).item() > 1e-6  # (the tiny model's activations are ~1e-2)


@pytest.mark.parametrize("kind", ["single", "multi"])
@pytest.mark.parametrize("objective", ["sft", "sft_icl", "ia2", "ia2_plus_sft", "kd"])
def test_padded_batch_equals_one_at_a_time(model, objective, kind):
    """Right-padded batches, per-example averaging: the official one example per forward, exactly."""
    tok, m = model
    ia2.add_lora(m)
    for mod in ia2.adapter_modules(m).values():
        torch.nn.init.normal_(mod.B, std=0.1)
    batch = items(tok) if kind == "single" else multi_items(tok)

    def loss_and_grads(examples):
        m.zero_grad()
        loss = ia2.objective_loss(m, objective, examples, 0.5).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad]

    loss, grads = loss_and_grads(batch)
    singles = [loss_and_grads([it]) for it in batch]  # the official code: one example per forward
    torch.testing.assert_close(loss, sum(s[0] for s in singles) / 4, atol=1e-5, rtol=1e-5)
    for g, *gs in zip(grads, *[s[1] for s in singles]):
        torch.testing.assert_close(g, sum(gs) / 4, atol=1e-5, rtol=1e-4)


def test_multi_token_forward_reads_d_plus_t(model):
    """The student reads X∘target; position d+t (d = last prompt token) gives target[t]'s logits and activations."""
    tok, m = model
    xs = [ia2.encode(tok, "Text:the film\nLabel:"), ia2.encode(tok, "Text:a very good story was\nLabel:")]
    ys = [[5, 6, 7, 8], [9, 10]]
    logits, acts = ia2.forward(m, xs, ys, capture=True)
    assert logits.shape == (2, 4, len(tok)) and acts.shape == (2, 2, 4, 32)
    for b, (x, y) in enumerate(zip(xs, ys)):
        with ia2.capture_activations(m) as ref:
            full = m(torch.tensor([x + y])).logits[0]
        for t in range(len(y)):
            torch.testing.assert_close(logits[b, t], full[len(x) - 1 + t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(acts[b, :, t], torch.stack([r[0, len(x) - 1 + t] for r in ref]),
                                       atol=1e-5, rtol=1e-5)
    fed = []  # the last target token is never read, so it is not fed: X∘y[:-1], right-padded
    hook = m.model.register_forward_pre_hook(lambda mod, args, kw: fed.append(kw["input_ids"]), with_kwargs=True)
    try:
        ia2.forward(m, xs, ys)
    finally:
        hook.remove()
    assert fed[0].shape == (2, max(len(x) + len(y) - 1 for x, y in zip(xs, ys)))
    assert fed[0][0, :len(xs[0]) + 3].tolist() == xs[0] + ys[0][:3]


def uncached_rollout(m, ids, T, eos):
    """The official teacher (spec §3): re-run the whole sequence at every step, keep the last position."""
    ids, toks, acts, logps = list(ids), [], [], []
    for _ in range(T):
        with ia2.capture_activations(m) as a:
            logits = m(torch.tensor([ids])).logits[0, -1]
        acts.append(torch.stack([x[0, -1] for x in a]))  # (L, D)
        logps.append(logits.log_softmax(-1))
        toks.append(int(logits.argmax()))
        if toks[-1] == eos:
            break  # this step's activations are kept
        ids.append(toks[-1])
    return toks, torch.stack(acts, 1), torch.stack(logps)


def test_kv_cached_teacher_equals_full_reforward(model):
    """Tokens, activations (L, T', D) and log-probs of the cached, batched, left-padded rollout equal the
    official uncached one-example re-forward, with and without an early EOS (fp32)."""
    tok, m = model
    ia2.add_lora(m)  # the teacher must run the base model: a non-zero adapter must not matter
    for mod in ia2.adapter_modules(m).values():
        torch.nn.init.normal_(mod.B)
    prompts = [ia2.encode(tok, p) for p in ("Text:the film was good\nLabel:1\n\nText:the plot\nLabel:",
                                            "Text:bad\nLabel:", "Text:a story was very very dull\nLabel:0\n\nText:x")]
    with ia2.without_adapters(m):
        refs = [uncached_rollout(m, p, 12, eos=-1) for p in prompts]
    k = next(k for k in range(2, 12) if refs[0][0][k] not in refs[0][0][:k])  # a token first emitted at step k
    eos = refs[0][0][k]
    with ia2.without_adapters(m):
        refs_eos = [uncached_rollout(m, p, 12, eos=eos) for p in prompts]
    assert len(refs_eos[0][0]) == k + 1
    m.generation_config.eos_token_id = None  # generate() too stops at eos_id only (other EOS ids: the kd test)
    for eos_id, expected in ((-1, refs), (eos, refs_eos)):
        its = ia2.teacher(m, [dict(icl=p) for p in prompts], 12, eos_id, kd=True)
        for it, (toks, acts, logp) in zip(its, expected):
            assert it["y_icl"] == toks and it["A_icl"].shape == (2, len(toks), 32)
            torch.testing.assert_close(it["A_icl"], acts, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(it["logp_icl"], logp, atol=1e-5, rtol=1e-4)


def test_kd_targets_stop_where_the_official_generate_stops(model):
    """The official kd (tokl) trains on collect_icl_distributions: a generate() rollout that stops at every EOS
    id of the generation_config (Qwen3 and Llama-3 Instruct list two or three), its step kept, no EOS
    appended. Ŷ of ia2 goes on to the tokenizer's EOS (get_activations). Expected lengths: the official rule
    applied to the uncached reference rollout."""
    tok, m = model
    prompts = [ia2.encode(tok, p) for p in ("Text:the film was good\nLabel:1\n\nText:the plot\nLabel:",
                                            "Text:a story was very very dull\nLabel:0\n\nText:x")]
    refs = [uncached_rollout(m, p, 12, eos=-1) for p in prompts]
    second = next(y for y in refs[0][0][3:] if y not in refs[0][0][:3])  # first emitted at step >= 3
    m.generation_config.eos_token_id = [1, second]
    its = ia2.teacher(m, [dict(icl=p) for p in prompts], 12, eos_id=-1, kd=True)
    for it, (toks, _, logp) in zip(its, refs):
        n = next((i + 1 for i, y in enumerate(toks) if y in (1, second)), len(toks))  # generate() stops here
        assert it["y_icl"] == toks and it["y_kd"] == toks[:n] and it["logp_icl"].shape[0] == n
        torch.testing.assert_close(it["logp_icl"], logp[:n], atol=1e-5, rtol=1e-4)
        assert ia2.target_of("kd", it) == toks[:n] and ia2.target_of("ia2", it) == toks
    assert len(its[0]["y_kd"]) < len(its[0]["y_icl"])  # the second EOS cut the first rollout short


def test_generation_is_unchanged_when_attention_gives_nan_to_rows_with_no_key(model, monkeypatch):
    """A left pad's query attends to no key: some GPU kernels return NaN there (README), which 0·NaN would carry
    into the real rows. Here attention is wrapped to do that; tokens, activations and log-probs stay as they were."""
    tok, m = model
    prompts = [ia2.encode(tok, f"Text:{'very ' * k}good film\nLabel:") for k in (0, 2, 5)]  # left-padded
    ref = ia2.generate(m, prompts, 6, set(), capture=True, scores=True)
    sdpa, nan_rows, R = torch.nn.functional.scaled_dot_product_attention, [], max(map(len, prompts))
    pad = torch.tensor([[i < R - len(p) for i in range(R)] for p in prompts])  # the left pads' query rows

    def nan_where_no_key(q, k, v, **kwargs):  # (transformers >= 5 passes such rows as they are; 4.56 unmasks
        out = sdpa(q, k, v, **kwargs)         # them itself: either way, here they come back NaN)
        if q.shape[2] != R:
            return out  # a decoding step: one real query per row
        nan_rows.append(int(pad.sum()))
        return out.masked_fill(pad[:, None, :, None], float("nan"))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", nan_where_no_key)
    got = ia2.generate(m, prompts, 6, set(), capture=True, scores=True)
    assert sum(nan_rows) == 2 * sum(R - len(p) for p in prompts) > 0  # every pad of the prefill, in both layers
    for a, b in zip(ref, got):
        assert a["tokens"] == b["tokens"]
        torch.testing.assert_close(a["acts"], b["acts"])
        torch.testing.assert_close(a["logp"], b["logp"])


def test_the_lm_head_runs_in_fp32_on_a_bf16_model(tiny):
    tok = ia2.load_tokenizer(tiny["model"])
    m = ia2.load_model(tiny["model"], tok, torch.device("cpu"), torch.bfloat16)
    h = (100 * torch.randn(3, 32)).to(torch.bfloat16)  # logits of about 10, as a real model's
    exact = h.double() @ m.lm_head.weight.double().T
    torch.testing.assert_close(ia2.lm_logits(m, h).double(), exact, atol=1e-4, rtol=1e-6)  # the fp32 product
    assert (m.lm_head(h).double() - exact).abs().max() > 1e-2  # what a bf16 head gives


def test_batched_generation_equals_batch_size_one(model):
    tok, m = model
    prompts = [ia2.encode(tok, f"Text:{'very ' * k}good film\nLabel:") for k in range(5)]
    seen = []  # RoPE is shift-invariant, so wrong position ids would go unnoticed in the outputs: check them
    hook = m.model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["position_ids"].clone()),
                                             with_kwargs=True)
    try:
        batched = ia2.generate(m, prompts, 10, set(), capture=True)
    finally:
        hook.remove()
    R = max(map(len, prompts))
    for i, p in enumerate(prompts):  # each row at the positions it has alone: 0..len-1, then len, len+1, ...
        assert seen[0][i, R - len(p):].tolist() == list(range(len(p)))
        assert [int(s[i, 0]) for s in seen[1:]] == list(range(len(p), len(p) + len(seen) - 1))
    for p, b in zip(prompts, batched):
        alone = ia2.generate(m, [p], 10, set(), capture=True)[0]
        assert b["tokens"] == alone["tokens"]
        torch.testing.assert_close(b["acts"], alone["acts"], atol=1e-5, rtol=1e-4)
    stop_tok = batched[0]["tokens"][3]  # stop(tokens) ends a row right after the token that makes it true
    stopped = ia2.generate(m, prompts, 10, set(), stop=lambda prev, y: y == stop_tok)
    for s, b in zip(stopped, batched):
        assert s["tokens"] == b["tokens"][:b["tokens"].index(stop_tok) + 1 if stop_tok in b["tokens"] else 10]
    texts = ia2.generate_answers(m, tok, prompts, 10)
    assert texts == [ia2.generate_answers(m, tok, [p], 10)[0] for p in prompts]
    assert texts[0] == tok.decode(batched[0]["tokens"], skip_special_tokens=True).split("\n\n")[0]


@pytest.mark.parametrize("task, text, expected", [
    ("gsm8k", "Janet has 16 - 3 = <<16-3=13>>13 eggs.\nShe makes 13 * 2 = $<<13*2=26>>26.\n#### 26", "26"),
    ("gsm8k", "so she pays $1,234.50 in total. The answer is $1,234.50.", "1234.5"),
    ("gsm8k", "The answer is 72.", "72"),
    ("gsm8k", "It is \\boxed{42} apples, #### 7", "42"),
    ("gsm8k", "\\boxed{x} so #### 7", "7"),  # a non-numeric box falls through
    ("gsm8k", "Answer: 3 apples", "3"),
    ("gsm8k", "#### -5", "-5"),
    ("gsm8k", "#### 72.0", "72"),
    ("gsm8k", "#### .0", "0"),  # a number is written as its value, as the official float(x) compare reads it:
    ("gsm8k", "#### -0.0", "0"),  # zero whatever its sign, no trailing zeros, no leading ones
    ("gsm8k", "#### 007.50", "7.5"),
    ("gsm8k", "#### 1,000", "1000"),
    ("gsm8k", "#### -.5", "-0.5"),  # (the official pattern has no sign and reads "5" here: README, Deviations)
    ("gsm8k", "#### 12345678901234567891", "12345678901234567891"),  # exact, where float would round
    ("gsm8ks", "5 apples and eats 2, leaving 3", "3"),  # no marker: the last number
    ("gsm8k", "#### ", None),
    ("gsm8k", "no numbers at all", None),
    ("hmath_algebra", "so $x=\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("hmath_algebra", "\\boxed{2}, no: \\boxed{ 3 + x^{2} }", "3+x^{2}"),
    ("hmath_algebra", "cut off: \\boxed{\\frac{1}{2}", None),
    ("hmath_algebra", "x = 5", None),
    ("sciqa", "Cells make energy.\n#### mitochondria", "mitochondria"),
    ("sciqa", "a #### b #### c ", "c"),
    ("sciqa", "no marker ", "no marker"),
])
def test_answer_parsing(task, text, expected):
    assert ia2.parse_answer(task, text) == expected


@pytest.mark.parametrize("task, generation, gold, match", [
    # where ia2.py takes the official utils.py decision (README, Deviations 17: checked once by running the
    # official parse_answer_gsm8k / parse_answer_boxed on these strings; each expected match here is by hand)
    ("gsm8k", "She had 5 apples in 2020", "#### 5", True),  # a trailing year is not the answer
    ("gsm8k", "Total cost $30 for 2 hours", "#### 30", True),  # a $ amount before the last number
    ("gsm8k", "He paid $1,200 in 2019.", "#### 1200", True),
    ("hmath_algebra", "$\\boxed{\\frac{1}{2}}$", "$\\boxed{\\dfrac{1}{2}}$", True),  # \dfrac is \frac
    ("hmath_algebra", "$\\boxed{\\dfrac{1}{2}}$", "$\\boxed{\\frac{1}{2}}$", True),
    # where ia2.py deliberately decides otherwise, because the official decision is wrong (the official one
    # is the opposite of `match` in every row below)
    ("gsm8k", "It costs 3 dollars each and the discount is 0.25", "#### 0.25", True),  # units outrank
    ("gsm8k", "#### 5", "#### -5", False),  # the official drops signs
    ("gsm8k", "Answer: 10 apples. Then the answer is 12", "#### 12", True),  # "Answer:" outranks
    ("gsm8k", "The answer for 3 days is 21", "#### 21", True),  # "answer " catches 3
    ("gsm8k", "0.75 of the cake", "#### 0.75", True),  # numbers in (0, 1) skipped: the whole text
    ("gsm8k", "The total is 2,000", "#### 2000", True),  # only a "year": the whole text
    ("gsm8k", "\\boxed{x} so\n#### 7", "#### 7", True),  # a box without a number ends the search
    ("gsm8k", "Result: 8 weeks, 56 days", "#### 56", True),
    ("hmath_algebra", "\\boxed{3} or \\boxed{4}", "$\\boxed{4}$", True),  # from the first box to the
    ("hmath_algebra", "$\\boxed{5}$ and $x^{2}$", "$\\boxed{5}$", True),  # line's last "}"
    ("hmath_algebra", "\\boxed{5}\\boxed{6}", "\\boxed{6}", True),
    ("hmath_algebra", "\\boxed{2}", "$x=\\boxed{2}$\nand $y=\\boxed{3}$", False),  # first vs last box
])
def test_exact_match_decisions(task, generation, gold, match):
    pred, ref = ia2.parse_answer(task, generation), ia2.parse_answer(task, gold)
    assert (pred is not None and pred == ref) == match


@pytest.mark.parametrize("tokens, T, expected", [  # the official collect_icl_outputs, run (tokenizer EOS 2;
    ([5, 6, 2], 5, [5, 6, 2]), ([5, 6, 7], 3, [5, 6, 7]),  # 9: an EOS of the generation_config only)
    ([5, 6, 9, 4, 2], 5, [5, 6, 9, 2]), ([2], 5, [2])])
def test_icl_outputs_stop_at_every_generation_eos(tokens, T, expected):
    assert ia2.icl_output(tokens, T, {2, 9}, 2) == expected


def test_generation_stops_at_every_eos_of_the_generation_config(model):
    tok, m = model
    prompts = [ia2.encode(tok, f"Text:{'very ' * k}good film\nLabel:") for k in range(3)]
    every = set(range(len(tok)))
    assert [o["tokens"] for o in ia2.generate(m, prompts, 8, every)] == [
        o["tokens"][:1] for o in ia2.generate(m, prompts, 8, set())]  # every id an EOS: one token each
    free = [o["tokens"] for o in ia2.generate(m, prompts, 8, set())]
    m.generation_config.eos_token_id = [1, free[0][2]]  # a second EOS, as Llama-3 Instruct and Qwen3 have
    texts = ia2.generate_answers(m, tok, prompts[:1], 8)
    assert texts == [tok.decode(free[0][:3], skip_special_tokens=True).split("\n\n")[0]]


# -----------------------------------------------------------------------------
# losses, training, metrics


def test_ia2_loss_known_answers():
    x, ones = torch.randn(3, 5, 2, 7), torch.ones(3, 2)
    assert ia2.ia2_loss(x, x, ones).tolist() == [0, 0, 0]  # one loss per example
    # L · mean of squares: (B=3, L=5, T=2, D=7) of ones against zeros -> 5
    assert ia2.ia2_loss(torch.ones(3, 5, 2, 7), torch.zeros(3, 5, 2, 7), ones).tolist() == pytest.approx([5.0] * 3)
    # the per-layer MSE summed over layers, over each example's own positions, then the batch mean
    s, t = torch.randn(2, 4, 3, 6), torch.randn(2, 4, 3, 6)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])  # example 1 has T'=1; its positions 1, 2 are padding
    per_example = [sum(((s[b, l, :n] - t[b, l, :n]) ** 2).mean() for l in range(4)) for b, n in ((0, 3), (1, 1))]
    torch.testing.assert_close(ia2.ia2_loss(s, t, mask), torch.stack(per_example))
    t[1, :, 1:] += 100  # what sits at padded positions does not count
    torch.testing.assert_close(ia2.ia2_loss(s, t, mask), torch.stack(per_example))


def test_sft_and_kd_losses_known_answers():
    logits = torch.randn(2, 3, 5)
    target = torch.tensor([[1, 2, 3], [4, -100, -100]])
    ce = lambda b, t: -logits[b, t].log_softmax(-1)[target[b, t]]
    # per example: the mean over its own tokens (a flat token mean over the batch would give 3/4 weight to example 0)
    torch.testing.assert_close(ia2.sft_loss(logits, target), torch.stack([(ce(0, 0) + ce(0, 1) + ce(0, 2)) / 3, ce(1, 0)]))
    p = torch.tensor([[[0.5, 0.5, 0.0]]]).clamp(min=1e-30)  # teacher; zero-probability tokens add nothing
    q = torch.tensor([[[0.25, 0.25, 0.5]]])
    kl = 0.5 * math.log(0.5 / 0.25) * 2  # Σ_v p log(p/q) = log 2
    assert ia2.kd_loss(q.log(), p.log(), torch.ones(1, 1)).item() == pytest.approx(kl, rel=1e-5)
    logp = torch.randn(2, 3, 5).log_softmax(-1)
    assert ia2.kd_loss(logp, logp, torch.ones(2, 3)).abs().max().item() < 1e-6  # KL(p ‖ p) = 0
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    kl_bt = (logp.exp() * (logp - logits.log_softmax(-1))).sum(-1)  # independent: per-position KL
    torch.testing.assert_close(ia2.kd_loss(logits, logp, mask), torch.stack([kl_bt[0].mean(), kl_bt[1, 0]]))


def dev_log(text: str) -> dict:
    """tag -> the dev losses of its log lines, in order."""
    out = {}
    for line in text.splitlines():
        if "| dev" in line:
            out.setdefault(line[1:line.index("]")], []).append(float(line.split("dev ")[1].split()[0]))
    return out


@pytest.mark.parametrize("adapter, budget, restore", [("lora", None, "best"), ("ia3", 1, "last")])
def test_every_adapter_the_engine_trains_equals_the_reference_fit(tiny, capsys, monkeypatch, adapter, budget, restore):
    """The command line's path (Part II: a method's whole grid in one model, K adapters per forward pass; with
    budget=1 every piece of a batch is one example) against Part I, one adapter at a time: for every trained
    method, lr, β and run, the saved adapter, the best dev loss, the steps and the dev losses of the log equal
    those of a fresh adapter trained by fit (IA2→SFT: by ia2_then_sft, from its own IA2 phase) on the same
    run's items, to fp32 round-off: batches of other shapes round otherwise, and Adam, which divides each
    gradient by its own size, magnifies that where a gradient is near 0, to ~1e-3 of the update over 15
    steps. Jobs of each method stop at different steps (early stopping or the epoch cap)."""
    if budget:
        monkeypatch.setattr(ia2, "token_budget", lambda model, grad: budget)
    lrs = ("1e-2", "5e-2") if adapter == "lora" else ("2e-1", "5e-1")  # (IA)³'s grid is 10-100x LoRA's
    args = ["--methods", *ia2.TRAINED, "--n-train", "5", "--runs", "2", "--lr", *lrs, "--beta", "0.3", "0.8",
            "--epochs", "6", "--patience", "2", "--batch-size", "2", "--eval-size", "6", "--seed", "3",
            "--adapter", adapter, "--restore", restore]
    p = in_process(tiny, capsys, *args, out=f"reference-{adapter}")
    assert p.returncode == 0, p.stderr
    folder, logs = tiny["root"] / f"reference-{adapter}", dev_log(p.stdout)
    rows = {(x["method"], x["lr"], x["beta"], x["run"]): x for x in json.loads((folder / "results.json").read_text())["rows"]}
    cfg = ia2.Config(model=tiny["model"], n_train=5, adapter=adapter, seed=3, eval_size=6)
    tok = ia2.load_tokenizer(tiny["model"])
    m = ia2.load_model(tiny["model"], tok, torch.device("cpu"), torch.float32)
    pool = ia2.load_task(cfg, "sst2", ["0", "1"], tiny["data"])[0]
    fit = dict(epochs=6, patience=2, batch_size=2, restore=restore)
    worst, steps = 0.0, collections.defaultdict(set)
    for r in range(2):
        train, dev, _, orders = ia2.few_shot_split(pool, 5, 3 + r)
        tr, dv = ia2.training_items(tok, ["0", "1"], train, dev, orders)
        ia2.teacher(m, tr + dv, 1, tok.eos_token_id, kd=True)
        for method, lr, beta in [(x, float(lr), b) for x in ia2.TRAINED for lr in lrs
                                 for b in ((0.3, 0.8) if x == "ia2_plus_sft" else (None,))]:
            ia2.set_seed(3 + r)
            ia2.add_adapters(m, cfg)  # a fresh adapter, as every method of run r starts
            init = ia2.adapter_state(m)
            if method.startswith("ia2_then"):  # IA2, then SFT on the ground truth or on the ICL outputs
                sft = dict(ia2_then_sft="sft", ia2_then_sft_icl="sft_icl")[method]
                devs = ia2.ia2_then_sft(m, tr, dv, lr, sft=sft, seed=3 + r, **fit)
                logged = logs[ia2.job_name("ia2", ia2.Job(lr, r, [], []))]  # the engine's IA2 phase, then SFT
            else:  # each of these methods is named after its objective
                devs = ia2.fit(m, method, tr, dv, lr, beta=beta, seed=3 + r, **fit)
                logged = []
            capsys.readouterr()
            logged = logged + logs[ia2.job_name(method, ia2.Job(lr, r, [], [], beta))]
            row, saved = rows[method, lr, beta, r], ia2.read_adapter(ia2.adapter_dir(str(folder), method, lr, beta, r))
            assert logged == pytest.approx(devs, rel=1e-3, abs=1.01e-4)  # the log prints 4 decimals
            phase = devs[len(devs) - len(logs[ia2.job_name(method, ia2.Job(lr, r, [], [], beta))]):]
            assert row["dev_loss"] == pytest.approx(min(phase), rel=5e-3)
            ours = ia2.adapter_state(m)
            assert saved.keys() == ours.keys()
            for n, t in ours.items():  # the difference, relative to the update training made
                err = float((saved[n] - t).norm() / (t - init[n]).norm())
                assert err < 5e-3, (method, lr, beta, r, n, err)
                worst = max(worst, err)
            steps[method].add(len(devs))
    assert all(len(s) > 1 for s in steps.values()), steps  # the jobs of each method stopped at different steps
    print(f"largest difference, engine against reference ({adapter}): {worst:.1e} of the update")


def test_many_adapters_evaluated_at_once_equal_one_at_a_time(model):
    """predict_all and generate_all, 3 adapters in shared batches, against Part I's predict and
    generate_answers with each adapter alone."""
    tok, m = model
    ia2.add_adapters(m, ia2.Config(), K=3)
    torch.manual_seed(0)
    for mod in ia2.adapter_modules(m).values():
        torch.nn.init.normal_(mod.B, std=0.3)
    states = [ia2.slot_state(m, k) for k in range(3)]
    queries = [it["x"] for it in items(tok, 5)]
    together = ia2.predict_all(m, queries * 3, [5, 6], slots=[k for k in range(3) for _ in queries])
    texts = ia2.generate_all(m, tok, queries * 3, 6, slots=[k for k in range(3) for _ in queries])
    ia2.add_lora(m)
    for k, state in enumerate(states):
        ia2.load_adapter_state(m, state)
        alone = ia2.predict(m, queries, [5, 6])
        for x, y in zip(together, alone):
            np.testing.assert_allclose(x[k * 5:(k + 1) * 5], y, atol=1e-6)
        assert texts[k * 5:(k + 1) * 5] == ia2.generate_answers(m, tok, queries, 6)


def test_best_dev_checkpoint_is_restored(model, capsys):
    tok, m = model
    ia2.add_lora(m)
    tr, dv = items(tok), items(tok, 2, 1)

    def dev_ce():  # the dev loss of the adapter left in the model, by hand: mean CE of y at the last prompt token
        with torch.no_grad():
            return float(np.mean([-m(torch.tensor([it["x"]])).logits[0, -1].log_softmax(-1)[it["y_ids"][0]].item()
                                  for it in dv]))
    ia2.set_seed(0)
    ia2.add_lora(m)
    devs = ia2.fit(m, "sft", tr, dv, 3e-1, epochs=30, patience=3)  # a high lr overshoots
    assert len(devs) == 3 + devs.index(min(devs)) + 1  # stopped `patience` checks after the best
    assert devs[-1] > min(devs) + 1e-3
    assert dev_ce() == pytest.approx(min(devs), abs=1e-5)  # the adapter left is the best one, not the last one
    ia2.set_seed(0)
    ia2.add_lora(m)
    last = ia2.fit(m, "sft", tr, dv, 3e-1, epochs=30, patience=3, restore="last")
    assert last == devs  # the same training; restore="last" keeps its last adapter, as the official code does
    assert dev_ce() == pytest.approx(last[-1], abs=1e-5)


def test_dev_checks_every_2_steps_and_at_each_epoch_end(model, capsys):
    """The paper's early-stopping rule: a dev check every 2 steps and at each epoch's end. N=10 in batches of 4
    gives epochs of 3 steps (4 + 4 + 2 examples): checks after steps 2, 3, 4, 6, 8, 9 in 3 epochs."""
    tok, m = model
    ia2.add_lora(m)
    ia2.fit(m, "sft", items(tok, 10), items(tok, 2, 1), 1e-4, epochs=3, patience=99)
    steps = [int(line.split("step ")[1].split()[0]) for line in capsys.readouterr().out.splitlines() if "| dev" in line]
    assert steps == [s for s in range(1, 10) if s % 2 == 0 or s % 3 == 0]


def test_ece_known_answers():
    ones = np.ones(10)
    assert ia2.ece(ones, ones) == 0 and ia2.ece_equal_width(ones, ones) == 0
    assert ia2.ece(ones, 0 * ones) == pytest.approx(1) and ia2.ece_equal_width(ones, 0 * ones) == pytest.approx(1)
    # two equal-mass bins by hand: sorted (.6,0) (.7,1) | (.8,0) (.9,1) -> .5·|.5-.65| + .5·|.5-.85| = .25
    conf, correct = np.array([.9, .6, .8, .7]), np.array([1., 0, 0, 1])
    assert ia2.ece(conf, correct, n_bins=2) == pytest.approx(0.25)
    # equal width, 15 bins: {.95,.95} -> .5·|.5-.95|; {.55} -> .25·|1-.55|; {.3} -> .25·|0-.3|
    conf, correct = np.array([.95, .95, .55, .3]), np.array([1., 0, 1, 0])
    assert ia2.ece_equal_width(conf, correct) == pytest.approx(0.225 + 0.1125 + 0.075)
    sizes = [len(b) for b in ia2.equal_mass_bins(np.random.rand(500))]
    assert sizes == [33] * 14 + [38]
    # the remainder goes to the most confident bin: n=5 in 2 bins: (.1,0) (.2,0) | (.3,1) (.4,1) (.5,0)
    # -> 2/5·|0-.15| + 3/5·|2/3-.4| = .06 + .16 (sorted the other way it would be .02 + .08)
    conf, correct = np.array([.3, .5, .1, .4, .2]), np.array([1., 0, 0, 1, 0])
    assert ia2.ece(conf, correct, n_bins=2) == pytest.approx(0.22)


def test_metrics_top1_label_accuracy_and_renormalised_confidence(model):
    tok, _ = model
    zero, one, other = (tok("0", add_special_tokens=False).input_ids[0], tok("1", add_special_tokens=False).input_ids[0],
                        tok("film", add_special_tokens=False).input_ids[0])
    top_p = np.array([[.6, .2] + [.0] * 8, [.5, .3] + [.0] * 8, [.4, .4] + [.0] * 8])
    top_id = np.array([[one, zero] + [2] * 8, [other, zero] + [2] * 8, [zero, one] + [2] * 8])
    label_p = np.array([[.2, .6], [.3, .1], [.4, .4]])
    r = ia2.metrics((top_p, top_id, label_p), np.array([1, 0, 1]), tok, ["0", "1"])
    assert r["accuracy"] == pytest.approx(100 / 3)  # "film" is never right, "0" is wrong for label 1
    assert r["label_accuracy"] == pytest.approx(100)  # a tie counts as right (p_true >= p_other)
    conf = np.array([.6 / .8, .5 / .8, .4 / .8])  # top-1 renormalised over the top 10
    assert r["ece"] == pytest.approx(ia2.ece(conf, np.array([1., 0, 0])))
    # equal width takes the raw top-1 probability: .6, .5, .4 fall in three bins -> (.4 + .5 + .4) / 3
    assert r["ece_equal_width"] == pytest.approx(1.3 / 3)  # (renormalised: (.25 + .625 + .5) / 3)
    assert r["predicted"] == pytest.approx([100 / 3, 100 / 3, 100 / 3])  # "0", "1", another token


def test_top1_matches_labels_with_or_without_their_leading_space(model):
    """Correct iff decode(argmax).strip() == the label string, stripped (spec §7): a " positive" token is the
    label "positive", and a " positive" label (--labels ' negative' ' positive') is matched by it too."""
    tok, _ = model
    ids = {w: tok(w, add_special_tokens=False).input_ids for w in (" positive", " negative", " film")}
    assert all(len(v) == 1 for v in ids.values())
    top_id = np.array([[ids[w][0]] * 10 for w in (" positive", " negative", " film")])
    for labels in (["negative", "positive"], [" negative", " positive"]):
        assert ia2.top1_label(top_id, tok, labels).tolist() == [1, 0, 2]


# -----------------------------------------------------------------------------
# the few-shot protocol


BBC_TOPICS = ["tech", "business", "sport", "entertainment", "politics"]
HUB_FAKES = {  # per task: a Hub record i of `split` with the Hub dataset's columns, and what ia2 must make of it
    "sst2": (lambda s, i: dict(idx=i, sentence=f"{s} {i} ", label=i % 2), lambda i: i % 2),
    "finsen": (lambda s, i: dict(sentence=f"{s} {i}", label=i % 3), lambda i: None if i % 3 == 1 else (i % 3) // 2),
    "poems": (lambda s, i: dict(id=i, verse_text=f"{s} {i}", label=i % 4), lambda i: i % 4 if i % 4 < 2 else None),
    "strategytf": (lambda s, i: dict(qid=str(i), term="t", description="d", question=f"{s} {i}?", answer=bool(i % 2),
                                     facts=["f"], decomposition=["q"]), lambda i: i % 2),
    "agnews": (lambda s, i: dict(text=f"{s} {i}", label=i % 4), lambda i: i % 4),
    "bbcnews": (lambda s, i: dict(text=f"{s} {i} " + "word " * 80 * (i % 2), label=i % 5,
                                  label_text=BBC_TOPICS[i % 5]), lambda i: [3, 2, 1, 0, 0][i % 5]),
    "sciq_remap": (lambda s, i: dict(question=f"{s} {i}", distractor1=f"w{i}a", distractor2=f"w{i}b", distractor3=f"w{i}c",
                                     correct_answer=f"right{i}", support="because"), None),
    "qasc_remap": (lambda s, i: dict(id=str(i), question=f"{s} {i}", choices=dict(text=[f"c{i}{k}" for k in range(8)],
               label=list("ABCDEFGH")), answerKey="ABCDEFGH"[i % 8], fact1="", fact2="", combinedfact="",
               formatted_question=""), lambda i: i % 8),
    "gsm8k": (lambda s, i: dict(question=f"{s} {i}", answer=f"2+{i}=<<2+{i}={i + 2}>>{i + 2}\n#### {i + 2}"),
              lambda i: f"2+{i}=<<2+{i}={i + 2}>>{i + 2}\n#### {i + 2}"),
    "gsm8ks": (lambda s, i: dict(id=i, instance=0, question=f"{s} {i}", answer=f"so\n#### {i}", original_id=i,
                                 original_question="", original_answer="", canary=""), lambda i: f"so\n#### {i}"),
    "hmath_algebra": (lambda s, i: dict(problem=f"{s} {i}", level="Level 1", type="Algebra",
                                        solution=f"x=\\boxed{{\\frac{{{i}}}{{2}}}}"),
                      lambda i: f"x=\\boxed{{\\frac{{{i}}}{{2}}}}"),
    "sciqa": (lambda s, i: dict(question=f"{s} {i}", distractor1="a", distractor2="b", distractor3="c",
                                correct_answer=f"ans{i}", support=f"support {i}"), lambda i: f"support {i}\n#### ans{i}"),
}


@pytest.mark.parametrize("name", list(ia2.TASKS))
def test_hub_task_loaders_read_their_columns(monkeypatch, name):
    """Each task without --data: its Hub id, config and splits, read from a fake local dataset with the
    Hub dataset's columns; the template, label mapping, filtering and splitting of the paper's App. A."""
    import re
    import datasets
    make, expect = HUB_FAKES[name]
    task, calls = ia2.TASKS[name], []

    def load_dataset(hub, name=None, split=None, revision=None, data_dir=None):
        calls.append((hub, name, split, revision, data_dir))
        return datasets.Dataset.from_list([make(split, i) for i in range(40)])
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    pool, ev = ia2.load_task(ia2.Config(eval_size=10, pool_size=15), name, task["labels"])
    pool_split, eval_split = task["splits"]
    # the two loading-script datasets from the Hub's parquet conversion (datasets >= 4.0 runs no script)
    where = {"finsen": (None, "refs/convert/parquet", "sentences_50agree"),
             "strategytf": (None, "refs/convert/parquet", "strategyQA")}.get(name, (task["hub"][1], None, None))
    assert calls == [(task["hub"][0], where[0], s, *where[1:]) for s in (pool_split, eval_split) if s]
    assert len(ev) == 10 and len(pool) == (0 if pool_split is None else 15)
    seen = set()
    for rows, split in ((pool, pool_split), (ev, eval_split or pool_split)):
        for x, y in rows:
            i = int(re.search(rf"{split} (\d+)", x).group(1))
            seen.add((split, i))
            assert x.startswith(task["template"].split("{")[0] + f"{split} {i}")  # the template, filled in
            if name == "sciq_remap":  # the correct answer sits in the slot of the label word
                assert f"[{ia2.CHOICE_WORDS[y]}]right{i}\n" in x and x.endswith("\n\nAnswer:")
            else:
                assert y == expect(i) and expect(i) is not None
            if name == "qasc_remap":
                assert f"[{ia2.CHOICE_WORDS[y]}]c{i}{y}\n" in x and "[Monday]c" in x
            if name == "bbcnews" and i % 2:  # 400+ characters, cut to <= 256 at a word boundary
                assert 250 < len(x) - len("Text:\nLabel:") <= 256 and x.endswith(" word\nLabel:")
    assert len(seen) == len(pool) + len(ev)  # no record both in the pool and in the eval set
    if name == "sst2":  # the official datasets .shuffle(seed=42), then the first records
        ref = load_dataset("x", split="train").shuffle(seed=42)["sentence"][:15]
        assert [x for x, _ in pool] == [f"Text:{t}\nLabel:" for t in ref]


def test_a_hub_loader_that_fails_says_what_failed_and_what_to_pass(monkeypatch):
    import datasets
    def refuse(*a, **k):  # what datasets >= 4.0 says of a loading script
        raise RuntimeError("Dataset scripts are no longer supported, but found financial_phrasebank.py\nmore")
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(ia2.IA2Error) as e:
        ia2.load_task(ia2.Config(), "finsen", ["0", "1"])
    assert str(e.value) == ("cannot load takala/financial_phrasebank for task finsen from the Hub: Dataset scripts "
                            "are no longer supported, but found financial_phrasebank.py; pass a local copy instead: "
                            "--data finsen=FILE")


def test_loaders_order_their_records_as_the_official_ones(monkeypatch):
    """Known answers from the official prepare_data.py run on the same fake splits: sciq_remap's option order
    (one generator through the 2000 kept pool records, then the eval set), strategytf's second shuffle after
    the split, poems filtered before it is shuffled."""
    import datasets
    fake = {("allenai/sciq", "train"): [dict(question=f"q{i}", distractor1="d1", distractor2="d2", distractor3="d3",
                                              correct_answer="C", support="") for i in range(2100)],
            ("allenai/sciq", "validation"): [dict(question=f"v{i}", distractor1="d1", distractor2="d2",
                                                   distractor3="d3", correct_answer="C", support="") for i in range(600)],
            ("wics/strategy-qa", "test"): [dict(question=f"sq{i}", answer=bool(i % 2)) for i in range(40)],
            ("google-research-datasets/poem_sentiment", "train"): [dict(verse_text=f"p{i}", label=i % 4)
                                                                   for i in range(40)]}
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda hub, split=None, **where: datasets.Dataset.from_list(fake[hub, split]))
    pool, ev = ia2.load_task(ia2.Config(eval_size=500, pool_size=2000), "sciq_remap", ia2.CHOICE_WORDS[:4])
    slots = lambda x: " ".join(re.findall(r"\]([^\n]*)\n", x))
    assert [slots(x) for x, _ in pool[:5]] == ["C d1 d2 d3", "d2 d1 C d3", "d3 d2 d1 C", "d1 d2 d3 C", "C d3 d2 d1"]
    words = lambda rows: [ia2.CHOICE_WORDS[y] for _, y in rows]
    assert words(pool[:10]) == ["apple", "banana", "Saturday", "Saturday", "apple", "Saturday", "apple", "Saturday",
                                "banana", "banana"]
    assert [slots(x) for x, _ in ev[:3]] == ["d2 C d3 d1", "d2 C d1 d3", "d2 C d1 d3"]
    assert words(ev[:10]) == ["Friday", "Friday", "Friday", "Saturday", "Friday", "banana", "apple", "apple", "banana",
                              "Saturday"]
    ids = lambda rows: [int(re.search(r"(\d+)\n", x).group(1)) for x, _ in rows]
    pool, ev = ia2.load_task(ia2.Config(eval_size=10), "strategytf", ["0", "1"])
    assert ids(pool) == [15, 31, 5, 22, 36, 23, 37, 11, 19, 21, 6, 29, 28, 16, 26, 18, 32, 27, 30, 9, 35, 20, 10, 0,
                         39, 4, 3, 7, 24, 25] and ids(ev) == [2, 33, 17, 1, 14, 12, 38, 8, 34, 13]
    _, ev = ia2.load_task(ia2.Config(eval_size=500), "poems", ["0", "1"])
    assert ids(ev) == [29, 17, 28, 13, 24, 20, 12, 37, 5, 0, 32, 9, 21, 36, 4, 8, 33, 1, 25, 16]


def test_training_prompts_put_the_demos_in_the_order_of_the_split(model):
    """Query i's ICL prompt is the other N-1 training examples in the order orders[i] (not sorted), each
    "X+answer", then a blank line each, then X_i; dev example j reuses query j's demos. Built here by hand."""
    tok, _ = model
    pool = [(f"Text:the film number {i}\nLabel:", i % 2) for i in range(30)]
    train, dev, _, orders = ia2.few_shot_split(pool, 6, seed=2)
    assert any(o != sorted(o) for o in orders)
    tr_items, dv_items = ia2.training_items(tok, ["0", "1"], train, dev, orders)
    shot = lambda k: train[k][0] + str(train[k][1])
    for i, it in enumerate(tr_items):
        assert tok.decode(it["icl"]) == "".join(shot(k) + "\n\n" for k in orders[i]) + train[i][0]
    for j, it in enumerate(dv_items):
        assert tok.decode(it["icl"]) == "".join(shot(k) + "\n\n" for k in orders[j]) + dev[j][0]


@pytest.mark.parametrize("pool_size, n, r, train, dev, orders", [  # the official create_training_datasets.py, run
    (30, 4, 0, [2, 28, 13, 10], [26, 24], [[2, 3, 1], [3, 2, 0], [0, 3, 1], [0, 1, 2]]),
    (30, 8, 0, [2, 28, 13, 10, 26, 24, 27, 11], [17, 22, 5, 16],
     [[5, 6, 2, 7, 4, 3, 1], [5, 2, 0, 3, 7, 4, 6], [6, 5, 3, 4, 0, 7, 1], [1, 5, 0, 6, 2, 7, 4],
      [2, 6, 3, 1, 5, 7, 0], [2, 6, 7, 3, 1, 4, 0], [4, 5, 3, 1, 0, 7, 2], [5, 0, 4, 2, 3, 6, 1]]),
    (2000, 4, 1, [674, 1699, 1282, 1315], [1210, 1636], [[2, 1, 3], [2, 0, 3], [0, 1, 3], [2, 1, 0]]),
])
def test_split_and_demo_order_are_the_official_ones(pool_size, n, r, train, dev, orders):
    """The official code keeps one RandomState(r): it permutes the pool, then shuffles each query's list of
    the other N-1 training indices. The expected values come from running its lines 75-179."""
    pool = [(f"x{i}", i) for i in range(pool_size)]
    tr, dv, _, got = ia2.few_shot_split(pool, n, r)
    assert [i for _, i in tr] == train and [i for _, i in dv] == dev and got == orders


OFFICIAL_PROMPTS = dict(  # the official code's draws (create_training_datasets.py, evaluate_batch_optimized.py)
    # for the pool below, N = 4, run 1: the pool permuted by RandomState(1) gives train charlie, juliet, golf, echo,
    # dev alpha, delta, rest bravo, hotel, india, foxtrot; the same generator then orders each query's N-1 demos
    train=["Text:echo\nLabel:0\n\nText:juliet\nLabel:1\n\nText:golf\nLabel:0\n\nText:charlie\nLabel:",
           "Text:charlie\nLabel:0\n\nText:golf\nLabel:0\n\nText:echo\nLabel:0\n\nText:juliet\nLabel:",
           "Text:juliet\nLabel:1\n\nText:charlie\nLabel:0\n\nText:echo\nLabel:0\n\nText:golf\nLabel:",
           "Text:charlie\nLabel:0\n\nText:juliet\nLabel:1\n\nText:golf\nLabel:0\n\nText:echo\nLabel:"],
    dev=["Text:echo\nLabel:0\n\nText:juliet\nLabel:1\n\nText:golf\nLabel:0\n\nText:alpha\nLabel:",  # train 0's
         "Text:charlie\nLabel:0\n\nText:golf\nLabel:0\n\nText:echo\nLabel:0\n\nText:delta\nLabel:"],  # train 1's
    # ICL evaluation: a fresh RandomState(1) draws N-1 of the rest for each eval query, in the drawn order
    icl=["Text:foxtrot\nLabel:1\n\nText:india\nLabel:0\n\nText:bravo\nLabel:1\n\nText:kilo\nLabel:",
         "Text:bravo\nLabel:1\n\nText:india\nLabel:0\n\nText:hotel\nLabel:1\n\nText:lima\nLabel:"])
OFFICIAL_POOL = [(f"Text:{w}\nLabel:", i % 2) for i, w in enumerate(
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split())]


def test_a_run_s_prompts_are_the_official_ones_written_out(tiny, monkeypatch, tmp_path):
    """Run 1's training, dev and ICL-evaluation prompts, as the experiment builds them (draw_runs; run_method
    for icl), against the prompts written out above from the official code's rule: which demos, how many,
    in which order."""
    cfg = ia2.Config(model=tiny["model"], data=(tiny["data"],), n_train=4, runs=2, methods=("icl",), eval_size=2)
    S = ia2.setup(cfg)
    S = S._replace(task=S.task._replace(pool=OFFICIAL_POOL))
    evals = [S.evals[0]._replace(eval_set=[("Text:kilo\nLabel:", 0), ("Text:lima\nLabel:", 1)])]
    S = S._replace(evals=evals)
    runs = ia2.draw_runs(S)
    assert [S.tok.decode(it["icl"]) for it in runs[1]["train"]] == OFFICIAL_PROMPTS["train"]
    assert [S.tok.decode(it["icl"]) for it in runs[1]["dev"]] == OFFICIAL_PROMPTS["dev"]
    assert [S.tok.decode(it["x"]) for it in runs[1]["train"]] == [p.rsplit("\n\n", 1)[1] for p in OFFICIAL_PROMPTS["train"]]
    seen = []
    monkeypatch.setattr(ia2, "evaluate", lambda S, ev, sets, *a, **k: seen.append(sets) or [(dict(accuracy=0.0), [])] * len(sets))
    ia2.run_method(S, "icl", runs, str(tmp_path), [])
    assert [S.tok.decode(p) for p in seen[0][1]] == OFFICIAL_PROMPTS["icl"]  # run 1's set


def test_few_shot_protocol(model):
    tok, _ = model
    pool = [(f"the film number {i}", i % 2) for i in range(40)]
    tr, dv, rest, orders = ia2.few_shot_split(pool, 8, seed=3)
    assert (len(tr), len(dv), len(rest)) == (8, 4, 28)
    assert not {t for t, _ in tr} & {t for t, _ in dv + rest} and not {t for t, _ in dv} & {t for t, _ in rest}
    assert ia2.few_shot_split(pool, 8, seed=3) == (tr, dv, rest, orders)  # RandomState(r): the same draw every time
    tr_items, dv_items = ia2.training_items(tok, ["0", "1"], [(f"Text:{t}\nLabel:", y) for t, y in tr],
                                            [(f"Text:{t}\nLabel:", y) for t, y in dv], orders)
    for it, (t, y) in zip(tr_items, tr):
        prompt = tok.decode(it["icl"])
        assert prompt.count("Label:") == 8 and prompt.endswith(f"Text:{t}\nLabel:")  # N-1 demos + query
        assert f"Text:{t}\nLabel:{y}" not in prompt  # never its own answer
        assert it["y_ids"] == tok(str(y), add_special_tokens=False).input_ids  # one token, no EOS
    assert [tok.decode(d["icl"]).rsplit("\n\n", 1)[0] for d in dv_items] == \
        [tok.decode(t["icl"]).rsplit("\n\n", 1)[0] for t in tr_items[:4]]  # dev j reuses train j's demos
    rest = [(f"Text:{t}\nLabel:", y) for t, y in rest]
    icl = ia2.icl_eval_prompts(tok, ["0", "1"], rest, [("Text:the plot\nLabel:", 0)], 7, seed=3)
    demos = tok.decode(icl[0]).split("\n\n")[:-1]
    assert len(demos) == 7 and all(d.rsplit("\n", 1)[0] + "\nLabel:" in {x for x, _ in rest} for d in demos)


# -----------------------------------------------------------------------------
# the command line


def in_process(tiny, capsys, *args, out="out"):
    """ia2.main in this process, as cli() runs it but with no interpreter to start: exit code, stdout, stderr."""
    try:
        ia2.main(["--model", tiny["model"], "--data", tiny["data"], "--out", str(tiny["root"] / out), *args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([], code, captured.out, captured.err)


def cli(tiny, *args, out="out"):
    cmd = [sys.executable, os.path.join(HERE, "ia2.py"), "--model", tiny["model"], "--data", tiny["data"],
           "--out", str(tiny["root"] / out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tiny["root"], timeout=600)


def library_lines(stderr: str) -> list:
    """What a run's stderr holds besides ia2.py's own lines: a library's warning, a progress bar."""
    return [line for line in stderr.splitlines() if not line.startswith(("ia2.py:", "eval.py:", "sweep.py:"))]


def our_line(stderr: str) -> str:
    """The one line of ours (ia2.py: / eval.py:) on a failed run's stderr, which holds no traceback. A line a
    library adds is not what these tests are about (that a normal run prints none: the two test_cli_* runs)."""
    assert "Traceback" not in stderr, stderr
    ours = [line for line in stderr.splitlines() if line.startswith(("ia2.py:", "eval.py:", "sweep.py:"))]
    assert len(ours) == 1, stderr
    return ours[0]


def test_cli_end_to_end_and_reproducible(tiny, capsys):
    args = ["--n-train", "4", "--runs", "2", "--eval-size", "12", "--epochs", "2", "--lr", "1e-3", "1e-2"]
    p = cli(tiny, *args)
    assert p.returncode == 0 and library_lines(p.stderr) == [], p.stderr  # a normal run: no library warning
    out = tiny["root"] / "out"
    res = json.loads((out / "results.json").read_text())["summary"]["sst2"]
    assert set(res) == set(ia2.METHODS) - {"kd"}  # kd only when named
    for m in ia2.TRAINED[:-1]:
        assert len(res[m]["settings"]) == 2 * (1 + 3 * (m == "ia2_plus_sft")) and set(res[m]["mean"]) == set(ia2.METRICS)
        assert res[m]["lr"] in (1e-3, 1e-2) and len(res[m]["runs"]) == 2 and "0.001" in str(res[m]["settings"])
        beta = 0.7 if m == "ia2_plus_sft" else None  # the default β grid: 0.1 0.5 0.7 0.9
        assert os.path.exists(os.path.join(ia2.adapter_dir(str(out), m, 1e-2, beta, 1), "adapter_model.safetensors"))
    assert "| ia2_then_sft |" in (out / "results.md").read_text() and "| ia2_then_sft |" in p.stdout
    assert json.loads((out / "config.json").read_text())["config"]["n_train"] == 4
    check_answers(out, "sst2", 12)
    p2 = in_process(tiny, capsys, *args, out="out2")  # the same command again gives the same numbers on CPU
    assert p2.returncode == 0, p2.stderr
    assert json.loads((tiny["root"] / "out2" / "results.json").read_text())["summary"]["sst2"] == res


def check_answers(folder, task: str, n: int):
    """answers.jsonl holds every example of every row; the lines of a row give back its accuracy (and on a
    single-token task its ECE, from the saved confidences), and `selected` marks the setting the tables show;
    eval_examples.jsonl has each eval example once (task has n)."""
    res = json.loads((folder / "results.json").read_text())
    examples = [json.loads(line) for line in (folder / "eval_examples.jsonl").read_text().splitlines()]
    assert [e["index"] for e in examples if e["task"] == task] == list(range(n))
    size = collections.Counter(e["task"] for e in examples)
    lines = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
    by_row = collections.defaultdict(list)
    for a in lines:
        by_row[a["task"], a["method"], a["lr"], a["beta"], a["run"]].append(a)
    assert len(lines) == sum(size[x["task"]] for x in res["rows"]) and len(by_row) == len(res["rows"])
    for x in res["rows"]:
        answers = by_row[x["task"], x["method"], x["lr"], x["beta"], x["run"]]
        assert [a["index"] for a in answers] == list(range(size[x["task"]]))
        assert 100 * np.mean([a["correct"] for a in answers]) == pytest.approx(x["accuracy"])
        if "ece" in x:
            conf, right = np.array([a["confidence"] for a in answers]), np.array([a["correct"] for a in answers])
            assert ia2.ece(conf, right.astype(float)) == pytest.approx(x["ece"], abs=1e-5)  # confidences: 6 digits
        selected = res["summary"][x["task"]][x["method"]]
        assert all(a["selected"] == (x["lr"] == selected["lr"] and x["beta"] == selected["beta"]) for a in answers)
    return lines


def test_multi_token_accuracy_is_exact_match_of_the_parsed_answers(monkeypatch):
    """evaluate() on a generation task, with the generations given: accuracy = the share of examples whose parsed
    generation equals the parsed gold answer (None never matches), per set of prompts. By hand: 2/4 and 1/4."""
    gold = np.array(["so 2+3=5\n#### 5", "#### 8", "#### 1", "x\n#### 3"], dtype=object)
    texts = ["it is 5", "#### 7", "no number here", "The answer is 3.",  # set 0: right, wrong, none, right
             "#### 5", "#### 5", "#### 5", "#### 5"]  # set 1: only the first is right
    monkeypatch.setattr(ia2, "generate_all", lambda model, tok, seqs, max_new, slots=None: texts[:len(seqs)])
    ev = ia2.Task("gsm8k", ia2.TASKS["gsm8k"], None, None, [], [("q", g) for g in gold], [[1]] * 4, gold)
    S = ia2.Setup(ia2.Config(task="gsm8k"), None, None, ev, [ev])
    (x0, answers0), (x1, answers1) = ia2.evaluate(S, ev, [[[1]] * 4, [[1]] * 4])
    assert x0 == dict(accuracy=50.0) and x1 == dict(accuracy=25.0)
    assert answers0[2] == dict(index=2, gold="1", text="no number here", answer=None, correct=False)
    assert [a["correct"] for a in answers1] == [True, False, False, False] and answers1[3]["index"] == 3


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_cli_multi_token_and_ood(tiny):
    """GSM8K-like local files: every method, T=6 rollouts, generation evaluation on gsm8k and OOD on gsm8ks."""
    rng = np.random.RandomState(0)
    qa = lambda a, b: dict(question=f"the film {a} plus {b}?", answer=f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}")
    gsm = write_jsonl(tiny["root"] / "gsm.jsonl", [qa(*rng.randint(1, 9, 2)) for _ in range(24)])
    gsms = write_jsonl(tiny["root"] / "gsms.jsonl", [qa(*rng.randint(10, 20, 2)) for _ in range(6)])
    p = subprocess.run([sys.executable, os.path.join(HERE, "ia2.py"), "--model", tiny["model"], "--task", "gsm8k",
                        "--data", gsm, f"gsm8ks={gsms}", "--eval-tasks", "gsm8k", "gsm8ks", "--n-train", "2",
                        "--runs", "1", "--eval-size", "4", "--epochs", "1", "--lr", "1e-3", "--max-new-tokens", "6",
                        "--methods", *ia2.METHODS,
                        "--out", str(tiny["root"] / "gsm-out")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and library_lines(p.stderr) == [], p.stderr  # every method: no library warning
    res = json.loads((tiny["root"] / "gsm-out" / "results.json").read_text())
    for r in (res["summary"]["gsm8k"], res["summary"]["gsm8ks"]):
        assert set(r) == set(ia2.METHODS)
        assert all(set(r[m]["mean"]) == {"accuracy"} for m in r)  # no ECE for generation tasks
    assert "teacher: 6 tokens per rollout" in p.stdout  # no EOS from a random model: T' = T
    assert "zero_shot on gsm8ks] example 1:" in p.stdout and "(gold '" in p.stdout
    assert "## gsm8k -> gsm8ks (OOD, ICL demos from gsm8k)" in p.stdout
    answers = check_answers(tiny["root"] / "gsm-out", "gsm8k", 4)
    assert set(answers[0]) == {"task", "method", "lr", "beta", "run", "index", "gold", "text", "answer", "correct",
                               "selected"}
    examples = {(e["task"], e["index"]): e for e in map(json.loads, (tiny["root"] / "gsm-out" / "eval_examples.jsonl")
                                                         .read_text().splitlines())}
    for a in answers:  # the gold of the example at that index, and the generation, both parsed
        assert a["gold"] == ia2.parse_answer(a["task"], examples[a["task"], a["index"]]["gold"])
        assert a["answer"] == ia2.parse_answer(a["task"], a["text"])
    p = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), str(tiny["root"] / "gsm-out")],
                       capture_output=True, text=True)  # a multi-token run: the comparison over runs alone
    assert p.returncode == 0, p.stderr
    report = (tiny["root"] / "gsm-out" / "report.md").read_text()
    assert "| gsm8k | icl | 1 |" in report and "| gsm8ks | sft | 1 |" in report and "gap wrt SFT" in report
    assert "| gsm8k | – |" in report  # no majority class for a generation task


def test_cli_single_token_ood(tiny, monkeypatch, capsys):
    """The OOD protocol (§5): the ICL baseline puts N-1 demos of the source task (its held-out pool, its labels)
    before each query of the OOD task; the adapters read the OOD queries alone."""
    fin = tiny["root"] / "finsen.csv"
    fin.write_text("text,label\n" + "".join(f"the plot was {'good' if i % 2 else 'bad'} {i},{i % 2}\n" for i in range(12)))
    seen, evaluate = [], ia2.evaluate
    def spy(S, ev, prompt_sets, *a, **k):
        seen.append((ev, [[S.tok.decode(p) for p in ps] for ps in prompt_sets], k.get("tag", a[2] if len(a) > 2 else "")))
        return evaluate(S, ev, prompt_sets, *a, **k)
    monkeypatch.setattr(ia2, "evaluate", spy)
    ia2.main(["--model", tiny["model"], "--data", tiny["data"], f"finsen={fin}", "--eval-tasks", "sst2", "finsen",
              "--n-train", "4", "--runs", "2", "--eval-size", "10", "--epochs", "1", "--lr", "1e-3",
              "--methods", "zero_shot", "icl", "ia2", "kd", "--out", str(tiny["root"] / "ood")])
    capsys.readouterr()
    with open(tiny["data"]) as f:
        source = {f"Text:{row['text']}\nLabel:{row['label']}" for row in csv.DictReader(f)}
    icl = [(ev, sets) for ev, sets, tag in seen if tag.startswith("icl") and ev.name == "finsen"]
    assert len(icl) == 1 and len(icl[0][1]) == 2  # one prompt set per run
    ev, sets = icl[0]
    for prompts in sets:
        for prompt, (x, _) in zip(prompts, ev.eval_set):
            *demos, query = prompt.split("\n\n")
            assert query == x and "Text:the plot was" in x  # the OOD query
            assert len(demos) == 3 and all(d in source for d in demos)  # N-1 demos of the source task
    assert sets[0] != sets[1]  # each run draws its own demos
    trained = [sets for e, sets, tag in seen if tag.startswith("ia2") and e.name == "finsen"]
    assert trained and all(p == x for sets in trained for ps in sets for p, (x, _) in zip(ps, ev.eval_set))
    res = json.loads((tiny["root"] / "ood" / "results.json").read_text())
    assert set(res["summary"]) == {"sst2", "finsen"} and set(res["summary"]["finsen"]) == {"zero_shot", "icl", "ia2", "kd"}
    assert set(res["summary"]["finsen"]["kd"]["mean"]) == set(ia2.METRICS)
    assert json.loads((tiny["root"] / "ood" / "config.json").read_text())["eval_size"] == {"sst2": 10, "finsen": 6}


def test_labels_with_a_leading_space_run_end_to_end(tiny, capsys):
    """--labels ' negative' ' positive' (README): one token each with the space; SFT's top-1 accuracy recomputed
    here from its saved adapter in peft: argmax token, decoded and stripped, equals the stripped label."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    out = tiny["root"] / "spaced"
    ia2.main(["--model", tiny["model"], "--data", tiny["data"], "--labels", " negative", " positive", "--runs", "1",
              "--eval-size", "10", "--epochs", "5", "--lr", "1e-2", "--methods", "sft", "--out", str(out)])
    capsys.readouterr()
    tok, meta = ia2.load_tokenizer(tiny["model"]), json.loads((out / "config.json").read_text())
    assert meta["label_token_ids"] == [tok(s, add_special_tokens=False).input_ids[0] for s in (" negative", " positive")]
    _, eval_set = ia2.load_task(ia2.Config(eval_size=10), "sst2", [" negative", " positive"], tiny["data"])
    sft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]),
                                         ia2.adapter_dir(str(out), "sft", 1e-2, None, 0)).eval()
    with torch.no_grad():
        top = [tok.decode([int(sft(torch.tensor([ia2.encode(tok, x)])).logits[0, -1].argmax())]) for x, _ in eval_set]
    assert {" negative", " positive"} & set(top)  # the adapter answers with the spaced label tokens
    expected = 100 * np.mean([t.strip() == ["negative", "positive"][y] for t, (_, y) in zip(top, eval_set)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [x["accuracy"] for x in rows] == [pytest.approx(expected)] and expected > 0


@pytest.mark.parametrize("task, adapter", [("sst2", "lora"), ("gsm8k", "ia3")])
def test_cli_every_method_on_a_bf16_base_model(tiny, capsys, task, adapter):
    """--dtype bfloat16 on the CPU takes the paths a GPU takes: a bf16 base model under fp32 adapters, logits and
    losses, for every method, single- and multi-token, with either adapter."""
    data = ["--data", tiny["data"]]
    if task == "gsm8k":
        rng = np.random.RandomState(1)
        qa = lambda a, b: dict(question=f"the film {a} plus {b}?", answer=f"{a}+{b}={a + b}\n#### {a + b}")
        data = ["--task", "gsm8k", "--max-new-tokens", "5",
                "--data", write_jsonl(tiny["root"] / "bf16.jsonl", [qa(*rng.randint(1, 9, 2)) for _ in range(16)])]
    p = in_process(tiny, capsys, *data, "--adapter", adapter, "--dtype", "bfloat16", "--device", "cpu", "--n-train", "2", "--runs",
            "1", "--eval-size", "4", "--epochs", "1", "--lr", "1e-2", "--beta", "0.5", "--methods", *ia2.METHODS,
            out=f"bf16-{task}-{adapter}")
    assert p.returncode == 0 and library_lines(p.stderr) == [], p.stderr
    folder = tiny["root"] / f"bf16-{task}-{adapter}"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "torch.bfloat16"
    rows = json.loads((folder / "results.json").read_text())["rows"]
    assert {x["method"] for x in rows} == set(ia2.METHODS)
    assert all(math.isfinite(v) for x in rows for k, v in x.items() if k in ia2.METRICS + ("dev_loss",))


def test_bench_check_runs_the_protocol_and_reports_it(tiny):
    """The GPU session's first command (bench.py --check), here on the tiny model and a small protocol."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--check", "--model", tiny["model"], "--data",
                        tiny["data"], "--runs", "1", "--eval-size", "6", "--epochs", "1"], capture_output=True, text=True,
                       cwd=tiny["root"], timeout=600)
    assert p.returncode == 0, p.stderr
    assert "1 run, 29 result rows" in p.stdout and "phases (s): load " in p.stdout and "token budget per forward: 2048" in p.stdout
    assert "every metric and dev loss finite: True" in p.stdout


def test_list_tasks():
    p = subprocess.run([sys.executable, os.path.join(HERE, "ia2.py"), "--list-tasks"], capture_output=True, text=True)
    assert p.returncode == 0 and all(f"| {t} |" in p.stdout for t in ia2.TASKS) and len(ia2.TASKS) == 12


def test_saved_adapter_loads_in_peft(tiny, capsys):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    p = in_process(tiny, capsys, "--n-train", "4", "--runs", "1", "--eval-size", "10", "--epochs", "2", "--lr", "1e-2",
            "--methods", "sft", "--targets", "qkv", out="peft")  # the paper's Table 7 ablation
    assert p.returncode == 0, p.stderr
    folder = str(tiny["root"] / "peft" / "adapters" / "sft" / "lr0.01" / "run0")
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), folder)
    tok = ia2.load_tokenizer(tiny["model"])
    ours = ia2.load_model(tiny["model"], tok, torch.device("cpu"), torch.float32)
    ia2.add_lora(ours, ("q_proj", "k_proj", "v_proj"))
    w = load_file(folder + "/adapter_model.safetensors")
    assert {k.split(".")[-3] for k in w} == {"q_proj", "k_proj", "v_proj"}
    ia2.load_adapter_state(ours, {f"{n}.{p}": w[f"base_model.model.{n}.lora_{p}.weight"]
                                  for n in ia2.adapter_modules(ours) for p in "AB"})
    assert any(t.abs().sum() > 0 for k, t in w.items() if "lora_B" in k)
    ids = torch.tensor([ia2.encode(tok, "Text:the film was good\nLabel:")])
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "--task nope: must be a task with training data"),
    (["--methods", "sft", "magic"], "--methods magic: must be zero_shot, icl, sft, sft_icl,"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such folder"),
    (["--eval-size", "0"], "--eval-size 0: must be >= 1"),
    (["--lr", "-0.001"], "--lr -0.001: must be > 0"),
    (["--lr", "-1e-3"], "argument --lr: expected at least one argument (--help lists the flags)"),  # "-1e-3": a flag?
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag (--help lists the flags)"),
    (["--out", "AFILE"], "a file of that name exists; choose another"),
    (["--data", "/no/such.csv"], "--data /no/such.csv: no such file"),
    (["--data", "BADCOLS"], "BADCOLS.csv needs columns 'text', 'label', found 'sentence', 'y'"),
    (["--data", "BADLABEL"], "row 2: label 'pos' is neither a label string"),
    (["--labels", "0", "zqxv"], "label 'zqxv' is"),
    (["--n-train", "60"], "needs 149 pool examples"),
    (["--device", "cuda"], "no CUDA"),
    (["--task", "gsm8k", "--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--task", "poems"], "--task poems: must be a task with training data"),
    (["--eval-tasks", "sst2", "nope"], "--eval-tasks nope: must be a task of --list-tasks"),
    (["--eval-tasks", "gsm8k"], "sst2 is a single-token task, so must the eval tasks be"),
    (["--task", "gsm8k", "--labels", "a", "b"], "--labels is for single-token tasks"),
    (["--data", "agnews=x.csv"], "agnews is neither --task nor one of --eval-tasks"),
    (["--task", "gsm8k", "--data", "BADANSWER"], "bad.jsonl, row 1: 'answer' must be text, got 5"),
])
def test_bad_input_one_line_and_nothing_written(tiny, capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "BADCOLS" in args or "BADLABEL" in args:
        bad = tiny["root"] / f"{args[1]}.csv"
        bad.write_text("sentence,y\nhello,1\n" if "BADCOLS" in args else "text,label\nhello,1\nbye,pos\n")
        args = ["--data", str(bad)]
    if "BADANSWER" in args:
        args[-1] = write_jsonl(tiny["root"] / "bad.jsonl", [dict(question="q", answer=5)] * 4)
    if "AFILE" in args:
        (tiny["root"] / "afile").write_text("not a run")
        args = ["--out", str(tiny["root"] / "afile")]
    out = tiny["root"] / "bad-out"
    with pytest.raises(SystemExit) as e:
        ia2.main(["--model", tiny["model"], "--data", tiny["data"], "--eval-size", "20", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tiny["root"] / "bad-out.partial").exists()


def test_bad_input_from_the_shell_prints_no_traceback(tiny):
    p = cli(tiny, "--labels", "0", "zqxv", "--eval-size", "20", out="never")
    assert p.returncode == 2 and "label 'zqxv' is" in our_line(p.stderr)


def test_nan_loss_stops_with_a_message_and_writes_nothing(tiny, capsys, monkeypatch):
    monkeypatch.setattr(ia2, "objective_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    out = tiny["root"] / "nan-out"
    with pytest.raises(SystemExit) as e:
        ia2.main(["--model", tiny["model"], "--data", tiny["data"], "--out", str(out), "--eval-size", "10",
                  "--runs", "1", "--lr", "1e-3", "--methods", "zero_shot", "sft"])
    assert e.value.code == 2 and "nan" in capsys.readouterr().err
    assert not out.exists() and not (tiny["root"] / "nan-out.partial").exists()


def write_rows(path, header, rows, sep=","):
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter=sep).writerows([header] + rows)
    return str(path)


def test_everyday_files_are_read_like_the_canonical_one(tiny):
    """Label strings or indices, the Hub's column names (sst2: sentence), review/sentiment, .tsv, .json,
    .parquet: all give the same examples as a text,label csv of indices."""
    import pyarrow
    import pyarrow.parquet
    root, labels = tiny["root"], ["negative", "positive"]
    rows = [(f"the film was {'good' if i % 3 else 'dull'} {i}", i % 3 and 1 or 0) for i in range(40)]
    cfg = ia2.Config(eval_size=10)
    want = ia2.load_task(cfg, "sst2", labels, write_rows(root / "canon.csv", ["text", "label"], rows))
    assert len(want[1]) == 10 and want[1][0][0].startswith("Text:the film was")
    files = [write_rows(root / "words.csv", ["text", "label"], [(t, labels[y]) for t, y in rows]),
             write_rows(root / "spaced.csv", ["text", "label"], [(t, " " + labels[y]) for t, y in rows]),
             write_rows(root / "hub.csv", ["idx", "sentence", "label"], [(i, t, y) for i, (t, y) in enumerate(rows)]),
             write_rows(root / "imdb.tsv", ["review", "sentiment"], [(t, labels[y]) for t, y in rows], sep="\t"),
             write_jsonl(root / "rows.jsonl", [dict(text=t, label=y) for t, y in rows])]
    (root / "rows.json").write_text(json.dumps([dict(text=t, label=labels[y]) for t, y in rows]))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([dict(text=t, label=y) for t, y in rows]),
                                root / "rows.parquet")
    (root / "bom.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8-sig")
    (root / "bom.jsonl").write_text("".join(json.dumps(dict(text=t, label=y)) + "\n" for t, y in rows),
                                    encoding="utf-8-sig")  # a byte-order mark before the first column's name
    files.append(write_jsonl(root / "strings.jsonl", [dict(text=t, label=str(y)) for t, y in rows]))  # "1": index 1
    for path in files + [str(root / x) for x in ("rows.json", "rows.parquet", "bom.csv", "bom.jsonl")]:
        assert ia2.load_task(cfg, "sst2", labels, path) == want, path
    cyrillic = ["отрицательный", "положительный"]  # labels in another script, matched as they are written
    (root / "cyrillic.jsonl").write_text("".join(json.dumps(dict(text=t, label=cyrillic[y]), ensure_ascii=False)
                                                 + "\n" for t, y in rows), encoding="utf-8")
    (root / "cyrillic.csv").write_text("text,label\n" + "".join(f"{t},{cyrillic[y]}\n" for t, y in rows),
                                       encoding="utf-8")
    for path in (root / "cyrillic.jsonl", root / "cyrillic.csv"):
        assert ia2.load_task(cfg, "sst2", cyrillic, str(path)) == want
    # the Hub's own column names (FinS: sentence); its label values are not converted: a label 2 is named
    fin = write_rows(root / "fin.csv", ["sentence", "label"], [(f"profit {i}", i % 2) for i in range(30)])
    pool, ev = ia2.load_task(cfg, "finsen", ["0", "1"], fin)
    assert len(pool + ev) == 30 and all(int(x.split()[1].split("\n")[0]) % 2 == y for x, y in pool + ev)
    hub = write_rows(root / "hub-fin.csv", ["sentence", "label"], [(f"profit {i}", i % 3) for i in range(30)])
    with pytest.raises(ia2.IA2Error, match="row 3: label '2' is neither a label string"):
        ia2.load_task(cfg, "finsen", ["0", "1"], hub)


@pytest.mark.parametrize("body, message", [
    ("text,label\ngood film,1\nbad film,\ngreat,0\n", "row 2: label '' is neither a label string ('0' '1') nor an "
                                                      "index 0..1 (the cell is empty)"),
    ("text,label\ngood film,1\n,0\ngreat,0\n", "row 2: 'text' must be text, got ''"),
    ("text,label\ngood film,1\nbad film\n", "row 2: label None is neither"),  # a short row: a missing cell
    ("text,label\ngood film,1\nbad film,2\n", "row 2: label '2' is neither"),
    ("text;label\ngood film;1\n", "needs columns 'text', 'label', found 'text;label'"),
])
def test_bad_rows_are_named(tiny, body, message):
    path = tiny["root"] / "bad-rows.csv"
    path.write_text(body)
    with pytest.raises(ia2.IA2Error, match=re.escape(message)):
        ia2.load_task(ia2.Config(eval_size=2), "sst2", ["0", "1"], str(path))


def test_a_one_class_file_and_a_short_eval_set_are_warned_about(tiny, capsys):
    path = write_rows(tiny["root"] / "one-class.csv", ["text", "label"], [(f"good {i}", 1) for i in range(12)])
    pool, ev = ia2.load_task(ia2.Config(eval_size=100), "sst2", ["0", "1"], path)
    err = capsys.readouterr().err
    assert "every example has label '1'" in err and "its last 6 (at most half) are the eval set, not --eval-size 100" in err
    assert len(ev) == 6 and all(isinstance(y, int) for _, y in pool + ev)


def test_each_eval_task_selects_its_own_setting(model, tmp_path):
    """§5 per table: each eval task's (lr) is the best mean accuracy over runs on that task's rows, computed here
    by hand: sst2 -> 1e-3 (80 > 70), finsen -> 1e-4 (60 > 50)."""
    tok, m = model
    acc = {("sst2", 1e-3): (80, 80), ("sst2", 1e-4): (70, 70), ("finsen", 1e-3): (50, 50), ("finsen", 1e-4): (55, 65)}
    rows = [dict(task=task, method="sft", lr=lr, beta=None, run=r, accuracy=a, dev_loss=1.0)
            for (task, lr), accs in acc.items() for r, a in enumerate(accs)]
    task = lambda name: ia2.Task(name, ia2.TASKS[name], ["0", "1"], [5, 6], [], [], [], np.array([0, 1, 1]))
    S = ia2.Setup(ia2.Config(), tok, m, task("sst2"), [task("sst2"), task("finsen")])
    for x in rows:  # each row's answers, one line an example, as run_method records them
        ia2.record(str(tmp_path), [], x, [dict(index=i, correct=True) for i in range(3)])
    ia2.write_outputs(S, str(tmp_path), rows, {})
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["sst2"]["sft"]["lr"] == 1e-3 and summary["finsen"]["sft"]["lr"] == 1e-4
    assert summary["finsen"]["sft"]["mean"]["accuracy"] == 60
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 * len(rows)  # answers.jsonl marks the lines of each task's selected setting
    assert {(a["task"], a["lr"]) for a in answers if a["selected"]} == {("sst2", 1e-3), ("finsen", 1e-4)}


def test_tables_show_the_majority_class_and_what_each_method_answers(tiny):
    row = lambda m, lr, r, p: dict(task="sst2", method=m, lr=lr, beta=None, run=r, accuracy=p[1], label_accuracy=p[1], ece=0.1,
                                   ece_equal_width=0.1, predicted=p, dev_loss=1.0)
    rows = [row("icl", None, 0, [40.0, 55.0, 5.0]), row("icl", None, 1, [30.0, 70.0, 0.0]),
            row("ia2", 1e-3, 0, [0.0, 100.0, 0.0]), row("ia2", 1e-3, 1, [10.0, 90.0, 0.0]),
            row("ia2", 1e-4, 0, [0, 0, 100.0]), row("ia2", 1e-4, 1, [0, 0, 100.0])]
    assert ia2.majority(["0", "1"], np.array([1, 1, 0, 1])) == dict(label="1", accuracy=75.0)
    ev = ia2.Task("sst2", ia2.TASKS["sst2"], ["0", "1"], None, [], [], [], np.array([1, 1, 0, 1]))
    text = ia2.table(ia2.summarize(rows), ev)
    assert "| majority class (always '1') | – | 75.0 | 75.0 |" in text and "answers 0/1/other (%)" in text
    assert "| icl | – | 62.5 ± 7.5 |" in text and "| 35/62/2 |" in text  # mean shares over runs
    assert "| 5/95/0 **one answer in 1/2 runs** |" in text  # ia2 at its selected lr, 1e-3


def test_lr_and_beta_are_selected_jointly_as_the_official_code_does():
    """plot_unified.py:865-877, run on these runs: the (lr, β) with the best mean accuracy, the first on a tie."""
    def rows(settings):
        return [dict(task="sst2", method="ia2_plus_sft", lr=lr, beta=b, run=r, accuracy=a, dev_loss=1.0)
                for (lr, b), accs in settings.items() for r, a in enumerate(accs)]
    runs = {(1e-4, .1): [80, 90], (3e-4, .5): [85, 85], (1e-3, .1): [70, 99], (1e-3, .5): [84, 86.5]}
    best = ia2.summarize(rows(runs))["ia2_plus_sft"]
    assert (best["lr"], best["beta"]) == (1e-3, .5) and best["mean"]["accuracy"] == 85.25 and best["std"]["accuracy"] == 1.25
    assert not best["tie"]
    best = ia2.summarize(rows({**runs, (1e-3, .5): [84, 86]}))["ia2_plus_sft"]  # three settings tie at 85
    assert (best["lr"], best["beta"]) == (1e-4, .1) and best["tie"]


def test_a_method_that_learned_nothing_at_the_step_cap_says_what_to_raise(tiny, capsys):
    """One epoch of N=4 in batches of 4 is one optimizer step: the tiny model still gives one answer (another
    token than a label) to every example, at every lr (a tie). The note names the cap and what to raise; a
    method with a run of two answers, or an adapter stopped early, gets none."""
    p = in_process(tiny, capsys, "--n-train", "4", "--runs", "2", "--eval-size", "10", "--epochs", "1", "--lr", "1e-5",
                   "2e-5", "--methods", "zero_shot", "sft", out="one-step")
    assert p.returncode == 0, p.stderr
    note = ("**Note** sft: every run gave one answer to every example, and every adapter stopped at the --epochs 1 "
            "cap, 1 optimizer step (N=4 in batches of 4): raise --epochs (the paper: 50).")
    assert note in p.stdout and note in (tiny["root"] / "one-step" / "results.md").read_text()
    assert "| sft | 1e-05 (a tie) |" in p.stdout
    cfg = ia2.Config(n_train=4, epochs=1)
    summary = lambda one, capped: {"sst2": {"sft": dict(runs=[{}, {}], one_answer_runs=one, capped_runs=capped)}}
    assert len(ia2.capped_notes(summary(2, 2), cfg)) == 1
    assert ia2.capped_notes(summary(1, 2), cfg) == [] and ia2.capped_notes(summary(2, 1), cfg) == []
    assert ia2.capped_notes(summary(2, 2), ia2.Config(n_train=4, epochs=50)) == []  # the paper's cap: not the cause


def test_a_tokenizer_that_reads_one_character_at_a_time_is_warned_about(model, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tk.train_from_iterator(["Text:good\nLabel:1"], trainers.BpeTrainer(vocab_size=len(alphabet) + 1,
                                                                       initial_alphabet=alphabet))  # no merges
    prompts = ["Text:the film was very good\nLabel:", "Text:a dull plot\nLabel:"]
    ia2.check_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tk), prompts)
    assert "about one character per token" in capsys.readouterr().err
    ia2.check_tokenizer(model[0], prompts)  # a working BPE: silent
    assert capsys.readouterr().err == ""


def test_plan_estimate_epochs_cap_and_flag_messages(tiny, capsys):
    p = in_process(tiny, capsys, "--n-train", "4", "--runs", "2", "--eval-size", "10", "--epochs", "1", "--lr", "1e-3",
            "--methods", "zero_shot", "sft", "ia2", out="plan")
    assert p.returncode == 0, p.stderr
    assert ("plan: 4 adapters (sft, ia2 x 1 lr x 2 runs), LoRA r=8 α=8 on q_proj,k_proj,o_proj, 2,816 trainable "
            "parameters each; each at most 1 epochs of 1 step (N=4, batch size 4): 1 optimizer steps, fewer if "
            "early stopping ends it; a method's adapters train together. Evaluated on 10 sst2 examples, like "
            "zero_shot") in p.stdout
    assert p.stdout.index("plan:") < p.stdout.index("[sft lr=0.001 run 0] ep 0")
    assert p.stdout.count("estimate: sft took") == 1
    assert "[sft lr=0.001 run 0] note: stopped by the --epochs 1 cap, not by early stopping" in p.stdout
    md = (tiny["root"] / "plan" / "results.md").read_text()
    assert md.startswith("# sst2, ") and ", 2 runs\n" in md and "majority class (always" in md
    assert "multi-token" not in md and "top-1 accuracy and label accuracy in %" in md
    for args, message in ((["--n-train", "1"], "--n-train 1: must be >= 2"), (["--lr", "1e-3", "0"], "--lr 0.0: must be > 0"),
                          (["--beta", "0.5", "2"], "--beta 2.0: must be in [0, 1]"), (["--runs", "0"], "--runs 0: must be >= 1"),
                          (["--targets", "qx"], "--targets qx: must be letters of qkvo"),
                          (["--restore", "first"], "--restore first: must be best or last")):
        with pytest.raises(SystemExit) as e:  # in-process: the shell's path is tested once, below
            ia2.main(["--model", tiny["model"], "--data", tiny["data"], *args])
        assert e.value.code == 2 and our_line(capsys.readouterr().err) == f"ia2.py: error: {message}"


def test_data_errors_come_before_the_model_loads(tiny):
    bad = write_rows(tiny["root"] / "early.csv", ["text", "label"], [("good", 1), ("bad", 7)])
    p = subprocess.run([sys.executable, os.path.join(HERE, "ia2.py"), "--model", "nobody/no-model", "--data", bad,
                        "--out", str(tiny["root"] / "never")], capture_output=True, text=True)  # (offline: no Hub)
    assert p.returncode == 2 and "row 2: label '7' is neither" in our_line(p.stderr) and "model" not in p.stderr


def test_offline_fails_fast_with_what_to_pass_instead(tiny):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: an unreachable Hub
    run = lambda env, *args: subprocess.run([sys.executable, os.path.join(HERE, "ia2.py"), *args, "--eval-size", "20",
                                             "--out", str(tiny["root"] / "never")], capture_output=True, text=True,
                                            env=env, timeout=60)
    p = run(env, "--model", "nobody/no-such-model")  # (timeout=60: minutes of retries would fail it)
    line = our_line(p.stderr)
    assert p.returncode == 2, p.stderr
    assert "Hub cannot be reached: pass --model FOLDER (a copy: nobody/no-such-model is no folder here)" in line
    assert "--data FILE" in line and "HF_HUB_OFFLINE=1" in line
    p = run(env, "--model", tiny["model"], "--data", f"sst2={tiny['data']}", "--eval-tasks", "sst2", "poems")
    assert p.returncode == 2 and f"pass --data sst2={tiny['data']} poems=FILE," in our_line(p.stderr)
    p = run(dict(env, HF_HUB_OFFLINE="1"), "--model", "nobody/no-such-model", "--data", tiny["data"])
    line = our_line(p.stderr)
    assert p.returncode == 2, p.stderr
    assert line.startswith("ia2.py: error: --model nobody/no-such-model: no folder of that name here, and the "
                           "Hugging Face cache (HF_HUB_OFFLINE is set) gives no tokenizer of that id: ")


def test_a_model_that_does_not_load_says_why_in_one_line(tiny, capsys):
    """The four ways: a path that is not there, a folder without a model (what it lacks), a Hub id that cannot
    be had (offline here; unreachable: the test above), and a model that cannot be read (the library's reason).
    Each before the data is trained on, exit 2, nothing written."""
    import shutil
    broken = tiny["root"] / "broken-model"
    shutil.copytree(tiny["model"], broken, dirs_exist_ok=True)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    half = tiny["root"] / "half-model"
    half.mkdir(exist_ok=True)
    (half / "config.json").write_text("{}")
    for model, message in ((str(tiny["root"] / "no-such-folder"), "no such folder"),
                           (str(half), "the folder holds no model: no weights (*.safetensors or *.bin), no "
                                       "tokenizer (tokenizer.json, tokenizer.model or vocab.json)"),
                           ("nobody/nothing", "no folder of that name here, and the Hugging Face cache "
                                              "(HF_HUB_OFFLINE is set) gives no tokenizer of that id: "),
                           (str(broken), "cannot read its model: ")):
        p = in_process(tiny, capsys, "--model", model, "--eval-size", "20", out="never")  # (overrides --model)
        assert p.returncode == 2 and our_line(p.stderr).startswith(f"ia2.py: error: --model {model}: {message}")
        assert not (tiny["root"] / "never.partial").exists()


def test_the_hub_probe_waits_3_seconds_and_nothing_else_runs(tiny, monkeypatch):
    """Fast in seconds, not by the clock of a busy machine: the one look at the Hub has a 3 s timeout, and its
    failure stops the run before a library call could start its own minutes of retries."""
    import urllib.request
    asked = []
    def unreachable(request, timeout):
        asked.append(timeout)
        raise OSError("no route to host")
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(ia2, "load_tokenizer", lambda name: pytest.fail("the model was asked for"))
    with pytest.raises(ia2.IA2Error, match="Hub cannot be reached"):
        ia2.setup(ia2.Config(model="nobody/no-such-model", data=tiny["data"]))
    assert asked == [3]


# ia2.main in a subprocess whose k-th saved adapter sends the process a real signal: an event, not a clock, decides
# where the signal lands
SIGNAL_AFTER_SAVE = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored
sys.path.insert(0, {here!r})
import ia2
save, saved = ia2.save_adapter, []
def save_then_signal(*args, **kwargs):
    save(*args, **kwargs)
    saved.append(1)
    if len(saved) == {k}:
        os.kill(os.getpid(), signal.{name})
ia2.save_adapter = save_then_signal
ia2.main(sys.argv[1:])
"""


def signalled_run(tiny, out, name, k, *args):
    code = SIGNAL_AFTER_SAVE.format(here=HERE, name=name, k=k)
    return subprocess.run([sys.executable, "-c", code, "--model", tiny["model"], "--data", tiny["data"], "--out",
                           str(out), "--n-train", "4", "--runs", "2", "--eval-size", "10", "--lr", "1e-3",
                           "--epochs", "2", *args],
                          capture_output=True, text=True, timeout=600)


def test_ctrl_c_keeps_finished_adapters_and_results_in_partial(tiny):
    out = tiny["root"] / "signal-SIGINT"
    p = signalled_run(tiny, out, "SIGINT", 1, "--methods", "sft", "ia2")
    assert p.returncode == 130, p.stderr
    assert our_line(p.stderr) == (f"ia2.py: interrupted; the adapters and results finished so far are in "
                                  f"{out}.partial/, and the same command resumes it")
    partial = tiny["root"] / "signal-SIGINT.partial"
    assert not out.exists() and os.listdir(partial / "adapters" / "sft" / "lr0.001") == ["run0"]
    res = json.loads((partial / "results.json").read_text())
    assert res["interrupted"] and [x["run"] for x in res["rows"]] == [0, 1]  # sft's rows, ia2 never began
    assert "(interrupted" in (partial / "results.md").read_text()


def test_the_same_command_resumes_an_interrupted_run_and_ends_as_an_uninterrupted_one(tiny, capsys):
    """Stopped after the 2nd saved adapter (ia2's 2: finished), the same command trains only ia2_then_sft, from
    the saved IA2 adapters, and its results equal those of a run never interrupted."""
    args = ("--methods", "zero_shot", "ia2", "ia2_then_sft", "--epochs", "2")
    whole = in_process(tiny, capsys, "--n-train", "4", "--runs", "2", "--eval-size", "10", "--lr", "1e-3", *args,
                       out="whole")
    assert whole.returncode == 0, whole.stderr
    out = tiny["root"] / "resumed"
    p = signalled_run(tiny, out, "SIGTERM", 2, *args)  # as a scheduler stops a job: handled as Ctrl-C
    assert p.returncode == 143 and our_line(p.stderr) == (
        f"ia2.py: stopped by SIGTERM; the adapters and results finished so far are in {out}.partial/, and the same "
        "command resumes it")
    with pytest.raises(SystemExit) as e:  # another command (another --lr): refused before anything loads
        ia2.main(["--model", tiny["model"], "--data", tiny["data"], "--out", str(out), "--n-train", "4", "--runs",
                  "2", "--eval-size", "10", "--lr", "1e-2", *args])
    assert e.value.code == 2 and our_line(capsys.readouterr().err) == (
        f"ia2.py: error: {out}.partial/ holds an interrupted run of another command (it differs in --lr): run that "
        "command to resume it, or move the folder away")
    assert (tiny["root"] / "resumed.partial" / "results.json").exists()  # refused, not deleted
    p = in_process(tiny, capsys, "--n-train", "4", "--runs", "2", "--eval-size", "10", "--lr", "1e-3", *args,
                   out="resumed")
    assert p.returncode == 0, p.stderr
    assert f"resuming {out}.partial/: zero_shot, ia2 finished there" in p.stdout
    assert "[ia2 lr=" not in p.stdout and "[ia2_then_sft lr=0.001 run 1]" in p.stdout
    def rows(folder):
        res = json.loads((tiny["root"] / folder / "results.json").read_text())
        return sorted((x["method"], x["run"], x["accuracy"], x["ece"], x.get("dev_loss"), x.get("steps"))
                      for x in res["rows"])
    assert rows("resumed") == rows("whole") and len(rows("whole")) == 5


SECOND_SIGNAL = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {here!r})
import ia2
save, write = ia2.save_adapter, ia2.write_outputs
def save_then_signal(*args, **kwargs):
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C, after the first saved adapter
def write_then_signal(*args, **kwargs):
    if kwargs.get("interrupted"):
        os.kill(os.getpid(), signal.SIGINT)  # a second one while the .partial is being written
    return write(*args, **kwargs)
ia2.save_adapter, ia2.write_outputs = save_then_signal, write_then_signal
ia2.main(sys.argv[1:])
"""


def test_a_second_ctrl_c_while_the_partial_is_written_changes_nothing(tiny):
    out = tiny["root"] / "twice-ctrl-c"
    p = subprocess.run([sys.executable, "-c", SECOND_SIGNAL.format(here=HERE), "--model", tiny["model"], "--data",
                        tiny["data"], "--out", str(out), "--runs", "2", "--eval-size", "10", "--lr", "1e-3", "--epochs",
                        "2", "--methods", "sft"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 130 and our_line(p.stderr).startswith("ia2.py: interrupted; the adapters and results")
    res = json.loads((tiny["root"] / "twice-ctrl-c.partial" / "results.json").read_text())  # whole, readable
    assert res["interrupted"] and [x["run"] for x in res["rows"]] == [0, 1]


def test_two_interruptions_then_a_finish_equal_an_uninterrupted_run(tiny, capsys):
    """Stopped after sft's 2 adapters (Ctrl-C), then, resumed, after ia2_then_sft's first (SIGTERM): the third
    session finishes, and its rows and answers are those of a run never interrupted; its times add up the
    sessions'."""
    args = ("--methods", "zero_shot", "sft", "ia2_then_sft", "--epochs", "2")
    common = ("--n-train", "4", "--runs", "2", "--eval-size", "10", "--lr", "1e-3")
    whole = in_process(tiny, capsys, *common, *args, out="whole2")
    assert whole.returncode == 0, whole.stderr
    out = tiny["root"] / "twice"
    assert signalled_run(tiny, out, "SIGINT", 2, *args).returncode == 130
    p = signalled_run(tiny, out, "SIGTERM", 1, *args)
    assert p.returncode == 143 and "resuming" in p.stdout and "zero_shot, sft finished there" in p.stdout
    partial = json.loads((tiny["root"] / "twice.partial" / "results.json").read_text())
    assert {x["method"] for x in partial["rows"]} == {"zero_shot", "sft", "ia2_then_sft"}  # its 1st row kept
    p = in_process(tiny, capsys, *common, *args, out="twice")
    assert p.returncode == 0 and "plan: 4 adapters (ia2, ia2_then_sft x 1 lr x 2 runs)" in p.stdout, p.stdout
    def rows(folder):
        res = json.loads((tiny["root"] / folder / "results.json").read_text())
        return res, sorted((x["method"], x["run"], x["accuracy"], x["ece"], x.get("dev_loss")) for x in res["rows"])
    assert rows("twice")[1] == rows("whole2")[1] and len(rows("whole2")[1]) == 5
    assert rows("twice")[0]["timing_s"]["total"] > partial["timing_s"]["total"] > 0  # the sessions' times added
    answers = lambda folder: sorted((tiny["root"] / folder / "answers.jsonl").read_text().splitlines())
    assert answers("twice") == answers("whole2") and len(answers("whole2")) == 5 * 10


def test_without_out_a_run_resumes_the_interrupted_run_of_the_same_command(tiny, monkeypatch):
    monkeypatch.chdir(tiny["root"])
    cfg = ia2.parse_args(["--model", tiny["model"], "--data", tiny["data"], "--runs", "2"])
    name = "runs/sst2-model-n4-20260101-000000"
    os.makedirs(name + ".partial")
    with open(name + ".partial/config.json", "w") as f:
        json.dump(dict(config=ia2.as_json(ia2.dataclasses.asdict(cfg))), f)
    assert ia2.default_out(cfg) == name
    other = ia2.parse_args(["--model", tiny["model"], "--data", tiny["data"], "--runs", "3"])
    assert ia2.default_out(other).startswith("runs/sst2-model-n4-") and ia2.default_out(other) != name


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="watches the child's memory map in /proc")
@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_while_the_libraries_load_gives_one_line(tiny, name, code):
    """From the first import on: Ctrl-C or SIGTERM sent while the child imports torch (its library just mapped)
    ends the command with one line and exit 130 or 143, and writes nothing."""
    out = tiny["root"] / f"import-{name}"
    child = subprocess.Popen([sys.executable, os.path.join(HERE, "ia2.py"), "--model", tiny["model"], "--data",
                              tiny["data"], "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 60
    while time.time() < deadline and "libtorch" not in open(f"/proc/{child.pid}/maps").read():
        time.sleep(0.002)
    child.send_signal(getattr(signal, name))
    _, err = child.communicate(timeout=120)
    assert child.returncode == code, err
    assert re.fullmatch(r"ia2.py: (stopped|interrupted|stopped by SIGTERM) before the run began; nothing was "
                        r"written", our_line(err))
    assert not os.path.exists(f"{out}.partial") and not out.exists()


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt, 130), (ia2.Terminated, 143)])
def test_a_signal_while_the_model_loads_gives_one_line(tiny, capsys, monkeypatch, stop, code):
    def load_model(*args):
        raise stop()  # what Ctrl-C (SIGINT) or SIGTERM raise under ia2.main's handlers
    monkeypatch.setattr(ia2, "load_model", load_model)
    p = in_process(tiny, capsys, "--eval-size", "20", out="loading")
    assert p.returncode == code and our_line(p.stderr) == (
        f"ia2.py: {'interrupted' if code == 130 else 'stopped by SIGTERM'} before the run began; nothing was written")
    assert not (tiny["root"] / "loading.partial").exists()


def test_ctrl_c_while_adapters_are_saved_keeps_the_method_s_results(tiny, monkeypatch):
    # the signal above lands at a moment the clock picks; here it lands between two adapters' saves, every time
    saved, save = [], ia2.save_adapter
    def save_then_interrupt(*a, **k):
        save(*a, **k)
        saved.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(ia2, "save_adapter", save_then_interrupt)
    out = tiny["root"] / "sigint-save"
    with pytest.raises(SystemExit) as e:
        ia2.main(["--model", tiny["model"], "--data", tiny["data"], "--out", str(out), "--n-train", "4",
                  "--runs", "2", "--eval-size", "10", "--lr", "1e-3", "--epochs", "2", "--methods", "sft"])
    assert e.value.code == 130 and saved == [1]
    res = json.loads((tiny["root"] / "sigint-save.partial" / "results.json").read_text())
    assert [x["run"] for x in res["rows"] if x["method"] == "sft"] == [0, 1]


def test_cli_flags_parse(capsys):
    cfg = ia2.parse_args(["--lr", "1e-3", "--labels", " negative", " positive", "--n-train", "8"])
    assert cfg.lr == [1e-3] and cfg.labels == [" negative", " positive"] and cfg.n_train == 8
    assert ia2.parse_args([]).lr == (1e-4, 3e-4, 1e-3)  # the paper's grid by default
    assert ia2.parse_args(["--list-tasks"]).list_tasks and not ia2.parse_args([]).list_tasks
    with pytest.raises(SystemExit):
        ia2.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--no-list-tasks" not in text and "('" not in text and "None" not in text  # no Python in the help
    assert "(default: 0.1 0.5 0.7 0.9)" in text and "unset: the paper's 200" in text and "examples:\n" in text


def test_the_base_model_alone_plans_no_adapter(tiny, capsys):
    p = in_process(tiny, capsys, "--eval-size", "10", "--methods", "zero_shot", "icl", out="base-only")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("plan: zero_shot and icl; evaluated on 10 sst2 examples\n")
    assert "adapter" not in p.stdout and "LoRA" not in p.stdout


# -----------------------------------------------------------------------------
# eval.py: asim, subspace overlap, reliability bins, the report


def test_asim_known_answers_and_a_model_with_itself(model):
    import eval as ev
    a = torch.tensor([[[1.0, 0.0], [2.0, 2.0]]])  # (L=1, R=2, D=2)
    b = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]])
    assert torch.allclose(ev.asim(a, b), torch.tensor([[2 ** -0.5, -1.0]]))
    assert torch.allclose(ev.asim(a, 3 * a), torch.ones(1, 2))  # scale does not matter, only direction
    tok, m = model
    ia2.add_lora(m)
    seqs = [it["x"] for it in items(tok, 5)]
    with torch.no_grad():
        for mod in ia2.adapter_modules(m).values():
            mod.B.normal_()  # a non-trivial adapter: still the same model on both sides
    acts = ev.activations(m, seqs, bs=2)
    assert acts.shape == (5, 2, 32)
    assert torch.allclose(ev.asim(acts, ev.activations(m, seqs, bs=5)), torch.ones(5, 2), atol=1e-5)
    with ia2.without_adapters(m):
        assert ev.asim(acts, ev.activations(m, seqs)).mean() < 0.999  # and the base model is another one


def test_subspace_overlap_identical_orthogonal_and_against_full_svd():
    import eval as ev
    torch.manual_seed(0)
    A, B = torch.randn(4, 20), torch.randn(30, 4)
    U = ev.lora_basis(A, B)
    U_full = torch.linalg.svd((B @ A).double())[0][:, :4]  # the definition: SVD of ΔW itself
    assert torch.allclose(U @ U.T, U_full @ U_full.T, atol=1e-8)  # the same subspace
    assert ev.overlap(U, U) == pytest.approx(1.0)
    assert ev.overlap(U, ev.lora_basis(torch.randn(4, 20), B @ torch.randn(4, 4))) == pytest.approx(1.0)  # same span
    B1, B2 = torch.zeros(30, 4), torch.zeros(30, 4)
    B1[:4], B2[4:8] = torch.randn(4, 4), torch.randn(4, 4)  # columns in orthogonal coordinate blocks
    assert ev.overlap(ev.lora_basis(A, B1), ev.lora_basis(A, B2)) == pytest.approx(0.0, abs=1e-12)
    half = torch.cat([B1[:, :2], B2[:, :2]], 1)  # shares 2 of 4 directions with B1
    assert ev.overlap(ev.lora_basis(A, B1), ev.lora_basis(A, half)) == pytest.approx(0.5)


def test_sign_flip_p_and_the_paired_comparison():
    import eval as ev
    assert ev.sign_flip_p([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)  # only all + and all - reach a mean of 3
    assert ev.sign_flip_p([2, 1]) == pytest.approx(0.5)  # means 1.5, 0.5, -0.5, -1.5: two reach 1.5
    assert ev.sign_flip_p([1, -1]) == 1.0 and ev.sign_flip_p([3, -1, -1]) == pytest.approx(1.0)
    run = lambda r, acc, ece: dict(run=r, accuracy=acc, ece=ece)
    method = lambda runs: dict(mean=dict(accuracy=float(np.mean([x["accuracy"] for x in runs]))), runs=runs)
    res = dict(summary=dict(sst2=dict(
        icl=method([run(0, 60, .1), run(1, 62, .1)]), sft=method([run(1, 50, .3), run(0, 55, .2)]),
        ia2_then_sft=method([run(0, 70, .1), run(1, 71, .2)]))), majority=dict(sst2=dict(label="1", accuracy=67.0)))
    text = ev.comparison(res)
    assert "| sst2 | 67.0 | 61.0 | 52.5 | – | 70.5 | +9.5 | +18.0 |" in text  # Table 5: means and gaps
    assert "| sst2 | sft | 2 | +18.0 | 0.500 | -0.100 | 0.500 |" in text  # run 0: +15, -.1; run 1: +21, -.1
    assert "| sst2 | icl | 2 | +9.5 | 0.500 | +0.050 | 1.000 |" in text  # ECE: 0 and +.1, every flip ties


def test_reliability_bins_are_the_ece_bins():
    import eval as ev
    rng = np.random.RandomState(0)
    conf, correct = rng.rand(500), (rng.rand(500) < 0.7).astype(float)
    bins = ev.reliability(conf, correct)
    assert [b[4] for b in bins] == [33] * 14 + [38]
    assert all(lo <= mean <= hi for lo, mean, hi, _, _ in bins)
    assert sum(n / 500 * abs(acc - mean) for _, mean, _, acc, n in bins) == pytest.approx(ia2.ece(conf, correct))


def test_eval_end_to_end_report_figures_and_sweep(tiny, capsys):
    pytest.importorskip("matplotlib")
    folders = []
    for n, runs in ((2, "1"), (4, "2")):
        p = in_process(tiny, capsys, "--n-train", str(n), "--runs", runs, "--eval-size", "12", "--epochs", "3", "--lr", "3e-2",
                "--methods", "zero_shot", "icl", "sft", "ia2", "ia2_then_sft", out=f"ev-n{n}")  # a high lr, so
        assert p.returncode == 0, p.stderr  # that the methods differ
        folders.append(str(tiny["root"] / f"ev-n{n}"))
    import eval as ev
    ev.main([*folders, "--out", str(tiny["root"] / "sweep"), "--asim-examples", "5"])
    capsys.readouterr()
    for f in folders:
        a = json.loads(open(os.path.join(f, "analysis.json")).read())
        assert a["max_abs_diff_vs_results_json"] < 1e-6  # saved adapters reload to the same predictions
        assert set(a["methods"]) == {"zero_shot", "icl", "sft", "ia2", "ia2_then_sft"} and a["asim_examples"] == 5
        assert len(a["methods"]["ia2"]["runs"]) == a["runs"] and len(a["methods"]["ia2"]["runs"][0]["asim_layers"]) == 2
        assert "| ia2_then_sft |" in open(os.path.join(f, "report.md")).read()
        for png in ("asim.png", "reliability.png"):
            assert open(os.path.join(f, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    check_analysis_independently(tiny, folders[1])
    assert "N=2 | N=4" in (tiny["root"] / "sweep" / "sweep.md").read_text()
    assert (tiny["root"] / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    p = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), str(tiny["root"] / "nothing")],
                       capture_output=True, text=True, cwd=tiny["root"])
    assert p.returncode == 2 and "not a finished ia2.py run folder" in our_line(p.stderr)
    check_disagreements(folders[1])
    ev.main([folders[1], "--asim-examples", "5"])  # the same results.json: its analysis is reused
    assert "reusing" in capsys.readouterr().out
    results = os.path.join(folders[1], "results.json")
    with open(results) as f:
        res = json.load(f)
    res["summary"]["sst2"].pop("ia2")  # results.json changed since the analysis: measured again
    with open(results, "w") as f:
        json.dump(res, f)
    ev.main([folders[1], "--asim-examples", "5"])
    assert "reusing" not in capsys.readouterr().out
    assert "ia2" not in json.loads(open(os.path.join(folders[1], "analysis.json")).read())["methods"]


def check_disagreements(folder):
    """report.md's counts of the examples IA2→SFT and SFT answer differently, against answers.jsonl counted
    here, and its first example of each kind."""
    answers = [json.loads(line) for line in open(os.path.join(folder, "answers.jsonl"))]
    right = {(a["method"], a["run"], a["index"]): a["correct"] for a in answers if a["selected"]}
    pairs = [(right["ia2_then_sft", r, i], c) for (m, r, i), c in right.items() if m == "sft"]
    counts = [sum(p == want for p in pairs) for want in ((True, True), (True, False), (False, True), (False, False))]
    report = open(os.path.join(folder, "report.md")).read()
    assert f"| sst2 | {len(pairs)} | " + " | ".join(map(str, counts)) + " |" in report
    assert counts[1] + counts[2] > 0  # the two methods do disagree here (a high lr)
    only = next(i for (m, r, i), c in right.items() if m == "sft" and r == 0 and right["ia2_then_sft", 0, i] and not c)
    assert f"| sst2 | {only}: Text:" in report


def test_eval_refuses_an_interrupted_run(tiny):
    out = tiny["root"] / "to-interrupt"
    assert signalled_run(tiny, out, "SIGINT", 1, "--methods", "sft").returncode == 130
    for folder in (f"{out}.partial", f"{out}.partial/"):
        p = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), folder], capture_output=True, text=True)
        assert p.returncode == 2 and our_line(p.stderr) == (
            f"eval.py: error: {folder} is an interrupted run: the same ia2.py command finishes it, then analyse the "
            "finished folder")
    assert not os.path.exists(f"{out}.partial/analysis.json") and not os.path.exists(f"{out}.partial/report.md")


def test_every_method_and_eval_py_on_an_ia3_run(tiny, capsys):
    """--adapter ia3: every method trains (ia2_then_sft continuing its IA2 job's vectors), the lr grid defaults to
    the paper's (IA)³ grid, and eval.py measures the run as a LoRA one (reloaded adapters reproduce results.json)
    but reports that the subspace overlap, LoRA's measure, is not computed."""
    p = in_process(tiny, capsys, "--adapter", "ia3", "--n-train", "4", "--runs", "1", "--eval-size", "12", "--epochs", "2",
            "--methods", *ia2.METHODS, out="ia3-run")
    assert p.returncode == 0, p.stderr
    folder = tiny["root"] / "ia3-run"
    assert "ia2_plus_sft x 4 β), (IA)³ on q_proj,k_proj,o_proj, 192 trainable parameters each;" in p.stdout
    assert p.stdout.startswith("plan: 30 adapters")
    res = json.loads((folder / "results.json").read_text())
    assert {x["method"] for x in res["rows"]} == set(ia2.METHODS)
    assert {x["lr"] for x in res["rows"] if x["lr"]} == {1e-1, 1e-2, 1e-3}
    import eval as ev
    ev.main([str(folder), "--asim-examples", "4"])
    capsys.readouterr()
    a = json.loads((folder / "analysis.json").read_text())
    assert a["max_abs_diff_vs_results_json"] < 1e-6 and a["overlap"] is None
    assert all(0 < x["asim"] <= 1 for m in ("sft", "ia2") for x in a["methods"][m]["runs"])
    report = (folder / "report.md").read_text()
    assert "Not computed: an (IA)³ adapter is one vector per matrix" in report and (folder / "reliability.png").exists()
    check_ia3_adapter_in_peft(tiny, ia2.adapter_dir(str(folder), "ia2_then_sft", 1e-1, None, 0))


def check_ia3_adapter_in_peft(tiny, folder):
    """PEFT's (IA)³ layout (ia3_l of shape (1, d_in), every target a feed-forward module): PEFT loads the adapter
    and gives the logits ia2's own IA3Linear gives."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    config = json.loads(open(folder + "/adapter_config.json").read())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == config["target_modules"]
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), folder)
    tok = ia2.load_tokenizer(tiny["model"])
    ours = ia2.load_model(tiny["model"], tok, torch.device("cpu"), torch.float32)
    ia2.add_ia3(ours)
    ia2.load_adapter_state(ours, ia2.read_adapter(folder))
    assert any((mod.l - 1).abs().max() > 1e-3 for mod in ia2.adapter_modules(ours).values())  # it trained
    ids = torch.tensor([ia2.encode(tok, "Text:the film was good\nLabel:")])
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def last_token_acts(layers, model, prompts) -> torch.Tensor:
    """(n, L, D): each layer's self_attn output at the last token, by plain hooks, one prompt at a time."""
    out = []
    for ids in prompts:
        acts = []
        hooks = [layer.self_attn.register_forward_hook(lambda mod, a, o: acts.append(o[0][0, -1])) for layer in layers]
        try:
            with torch.no_grad():
                model(torch.tensor([ids]))
        finally:
            for h in hooks:
                h.remove()
        out.append(torch.stack(acts))
    return torch.stack(out)


def check_analysis_independently(tiny, folder):
    """eval.py's asim, overlap and comparison cells against numbers computed here another way: the adapters
    loaded by peft, activations by plain hooks, the ICL teacher (run r's N-1 held-out demos) rebuilt from the
    config, ΔW's subspace by a full SVD, the means and gaps from results.json's rows."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    a = json.loads(open(os.path.join(folder, "analysis.json")).read())
    res = json.loads(open(os.path.join(folder, "results.json")).read())
    cfg = ia2.Config(**json.loads(open(os.path.join(folder, "config.json")).read())["config"])
    tok, labels, k = ia2.load_tokenizer(cfg.model), ["0", "1"], a["asim_examples"]
    pool, eval_set = ia2.load_task(cfg, "sst2", labels, cfg.data[0])
    base = AutoModelForCausalLM.from_pretrained(cfg.model).eval()
    queries = [ia2.encode(tok, x) for x, _ in eval_set[:k]]
    for r in range(cfg.runs):  # asim: each run's adapter without demos against the base model with its demos
        rest = ia2.few_shot_split(pool, cfg.n_train, cfg.seed + r)[2]
        teacher = last_token_acts(base.model.layers, base, ia2.icl_eval_prompts(tok, labels, rest, eval_set[:k],
                                                                                cfg.n_train - 1, cfg.seed + r))
        for m in ("sft", "ia2"):
            folder_m = ia2.adapter_dir(folder, m, 3e-2, None, r)
            student = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model), folder_m).eval()
            s = last_token_acts(student.base_model.model.model.layers, student, queries)
            sim = torch.nn.functional.cosine_similarity(s, teacher, dim=-1).mean().item()
            assert a["methods"][m]["runs"][r]["asim"] == pytest.approx(sim, abs=1e-5), (m, r)

    def basis(w, n):  # the top-r left singular vectors of the full ΔW = B·A
        return torch.linalg.svd(w[n + ".lora_B.weight"].double() @ w[n + ".lora_A.weight"].double())[0][:, :cfg.rank]
    per_run = []
    for r in range(cfg.runs):
        w1, w2 = (load_file(ia2.adapter_dir(folder, m, 3e-2, None, r) + "/adapter_model.safetensors") for m in ("sft", "ia2"))
        names = [n[:-len(".lora_A.weight")] for n in w1 if n.endswith(".lora_A.weight")]
        per_run.append(np.mean([(basis(w1, n).T @ basis(w2, n)).pow(2).sum().item() / cfg.rank for n in names]))
    assert a["overlap"]["sft"]["ia2"] == pytest.approx(np.mean(per_run), abs=1e-6)
    mean = {m: np.mean([x["accuracy"] for x in res["rows"] if x["method"] == m and x["task"] == "sst2"])
            for m in ("icl", "sft", "ia2", "ia2_then_sft")}  # one lr: the selected one
    assert len(set(mean.values())) > 1  # else the gaps below would hold whatever their sign
    gold = [y for _, y in eval_set]
    majority = 100 * max(gold.count(0), gold.count(1)) / len(gold)
    line = (f"| sst2 | {majority:.1f} | {mean['icl']:.1f} | {mean['sft']:.1f} | {mean['ia2']:.1f} | "
            f"{mean['ia2_then_sft']:.1f} | {mean['ia2_then_sft'] - mean['icl']:+.1f} | "
            f"{mean['ia2_then_sft'] - mean['sft']:+.1f} |")
    assert line in open(os.path.join(folder, "report.md")).read()


# -----------------------------------------------------------------------------
# tutorial.ipynb runs top to bottom on the tiny model


def test_tutorial_setup_cell_fetches_ia2_where_it_is_missing(tmp_path):
    """On a notebook server without the repository (Colab's T4), the first code cell clones IA2_REPO (here this
    repository, by path), installs requirements.txt (satisfied here: nothing to download) and makes ia2 importable."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(os.path.join(HERE, "tutorial.ipynb"), as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code")
    p = subprocess.run([sys.executable, "-c", cell + "\nimport ia2\nprint(ia2.__file__)"], capture_output=True,
                       text=True, cwd=tmp_path, env=dict(os.environ, IA2_REPO=HERE, PYTHONPATH=""), timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(tmp_path / "ia2-repo" / "ia2.py")
    p = subprocess.run([sys.executable, "-c", cell], capture_output=True, text=True, cwd=tmp_path / "ia2-repo" / "..",
                       env={k: v for k, v in os.environ.items() if k != "IA2_REPO"}, timeout=60)
    assert p.returncode == 1 and "set IA2_REPO to the project's git URL" in p.stderr  # (ia2-repo is not on the path)


def test_tutorial_notebook_runs_top_to_bottom(tiny, monkeypatch):
    nbformat, nbclient = pytest.importorskip("nbformat"), pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    for k, v in dict(IA2_MODEL=tiny["model"], IA2_DATA=tiny["data"], IA2_EVAL_SIZE="20", IA2_EPOCHS="2").items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(os.path.join(HERE, "tutorial.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "ia2_then_sft" in text and "notebook ran in" in text  # reached the last step
    assert sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", [])) >= 5  # every picture was drawn
