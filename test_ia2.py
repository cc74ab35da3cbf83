"""Tests for ia2.py: known answers and independent references, on a tiny random Qwen3 built here.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q test_ia2.py
"""
import csv
import json
import os
import subprocess
import sys

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
    corpus = [f"Text:{t}\nLabel:{y}\n\n" for t, y in rows] + [" ".join(WORDS)] * 5 + ["negative positive"] * 5
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
    tok, m = ia2.load_model(tiny["model"], torch.device("cpu"), torch.float32)
    return tok, m


def items(tok, n=4, seed=0):
    """Training items as the pipeline builds them, with teacher fields filled by hand."""
    rng = np.random.RandomState(seed)
    out = []
    for y in rng.randint(0, 2, n):
        x = ia2.encode(tok, ia2.make_prompt("Text:{text}\nLabel:", sentence(rng, y)))
        out.append(dict(x=x, y=int(y), icl=x, y_icl=int(rng.randint(5, 50)), A_icl=torch.randn(2, 32)))
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
    with ia2.lora_disabled(torch.nn.Sequential(lora)):
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
    ia2.train(m, "sft", items(tok), items(tok, 2, 1), [10, 11], ia2.Config(n_train=4, epochs=2), 1e-2, 0, "t")
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if not p.requires_grad)
    assert any(mod.B.abs().sum() > 0 for mod in ia2.lora_modules(m).values())


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
    torch.testing.assert_close(logits[0], out.logits[0, -1])  # final-logit soft-capping included
    torch.testing.assert_close(last[0], torch.stack([x[0, -1] for x in acts]))


def test_forward_matches_full_logits_and_padding_changes_nothing(model):
    tok, m = model
    seqs = [it["x"] for it in items(tok)]
    assert len({len(s) for s in seqs}) > 1  # different lengths, so the batch is padded
    logits, acts = ia2.forward(m, seqs, capture=True)
    for i, s in enumerate(seqs):
        with ia2.capture_activations(m) as ref:
            full = m(torch.tensor([s])).logits[0, -1]
        torch.testing.assert_close(logits[i], full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(acts[i], torch.stack([r[0, -1] for r in ref]), atol=1e-5, rtol=1e-5)


def test_t1_alignment_ignores_the_appended_answer_token(model):
    """The official student reads X∘Ŷ and aligns at d_q; causal attention makes that equal to reading X."""
    tok, m = model
    x = ia2.encode(tok, "Text:a great story\nLabel:")
    _, a = ia2.forward(m, [x], capture=True)
    with ia2.capture_activations(m) as acts:
        m(torch.tensor([x + [7]]))
    torch.testing.assert_close(a[0], torch.stack([t[0, len(x) - 1] for t in acts]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective", ["sft", "sft_icl", "ia2", "ia2_plus_sft"])
def test_padded_batch_equals_one_at_a_time(model, objective):
    tok, m = model
    ia2.add_lora(m)
    for mod in ia2.lora_modules(m).values():
        torch.nn.init.normal_(mod.B, std=0.1)
    batch = items(tok)

    def loss_and_grads(examples):
        m.zero_grad()
        loss = ia2.objective_loss(m, objective, examples, [10, 11], 0.5)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad]

    loss, grads = loss_and_grads(batch)
    singles = [loss_and_grads([it]) for it in batch]  # the official code: one example per forward
    torch.testing.assert_close(loss, sum(s[0] for s in singles) / 4, atol=1e-5, rtol=1e-5)
    for g, *gs in zip(grads, *[s[1] for s in singles]):
        torch.testing.assert_close(g, sum(gs) / 4, atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# losses, training, metrics


def test_ia2_loss_known_answers():
    x = torch.randn(3, 5, 7)
    assert ia2.ia2_loss(x, x).item() == 0
    # L · mean of squares: (B=3, L=5, D=7) of ones against zeros -> 5
    assert ia2.ia2_loss(torch.ones(3, 5, 7), torch.zeros(3, 5, 7)).item() == pytest.approx(5.0)
    # equals the per-layer MSE summed over layers
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    per_layer = sum(((s[:, l] - t[:, l]) ** 2).mean() for l in range(4))
    torch.testing.assert_close(ia2.ia2_loss(s, t), per_layer)


def test_best_dev_checkpoint_is_restored(model, capsys):
    tok, m = model
    ia2.add_lora(m)
    tr, dv = items(tok), items(tok, 2, 1)
    cfg = ia2.Config(n_train=4, epochs=30, patience=3)
    best, steps = ia2.train(m, "sft", tr, dv, [10, 11], cfg, 3e-1, 0, "t")  # a high lr overshoots
    devs = [float(line.split("dev ")[1].split()[0]) for line in capsys.readouterr().out.splitlines() if "| dev" in line]
    assert len(devs) == 3 + devs.index(min(devs)) + 1  # stopped `patience` checks after the best
    assert devs[-1] > min(devs) and best == pytest.approx(min(devs), abs=1e-4)
    # the adapter left in the model is the best one, not the last one
    assert ia2.dev_loss(m, "sft", dv, [10, 11], cfg) == pytest.approx(best, abs=1e-6)


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


# -----------------------------------------------------------------------------
# the few-shot protocol


def test_hub_task_loader_reads_its_columns(monkeypatch):
    """--task sst2 without --data: stanfordnlp/sst2, train -> pool, validation -> eval (faked locally)."""
    import datasets
    fake = {"train": 30, "validation": 12}
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"idx": list(range(fake[split])), "label": [i % 2 for i in range(fake[split])],
                                           "sentence": [f"{split} sentence {i} " for i in range(fake[split])]})
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    pool, ev = ia2.load_data(ia2.Config(eval_size=10, pool_size=25), ia2.TASKS["sst2"], 2)
    assert calls == [("stanfordnlp/sst2", "train"), ("stanfordnlp/sst2", "validation")]
    assert len(pool) == 25 and len(ev) == 10
    assert all(t.startswith("train") for t, _ in pool) and all(t.startswith("validation") for t, _ in ev)
    assert all(int(t.split()[2]) % 2 == y for t, y in pool + ev)  # text and label stay paired through the shuffle


def test_few_shot_protocol(model):
    tok, _ = model
    pool = [(f"the film number {i}", i % 2) for i in range(40)]
    tr, dv, rest = ia2.few_shot_split(pool, 8, seed=3)
    assert (len(tr), len(dv), len(rest)) == (8, 4, 28)
    assert not {t for t, _ in tr} & {t for t, _ in dv + rest} and not {t for t, _ in dv} & {t for t, _ in rest}
    assert ia2.few_shot_split(pool, 8, seed=3) == (tr, dv, rest)  # RandomState(r): the same draw every time
    task = ia2.TASKS["sst2"]
    tr_items, dv_items = ia2.training_items(tok, task, ["0", "1"], tr, dv, seed=3)
    for it, (t, y) in zip(tr_items, tr):
        prompt = tok.decode(it["icl"])
        assert prompt.count("Label:") == 8 and prompt.endswith(f"Text:{t}\nLabel:")  # N-1 demos + query
        assert f"Text:{t}\nLabel:{y}" not in prompt  # never its own answer
    assert [tok.decode(d["icl"]).rsplit("\n\n", 1)[0] for d in dv_items] == \
        [tok.decode(t["icl"]).rsplit("\n\n", 1)[0] for t in tr_items[:4]]  # dev j reuses train j's demos
    icl = ia2.icl_eval_prompts(tok, task, ["0", "1"], rest, [("the plot", 0)], 7, seed=3)
    demos = tok.decode(icl[0]).split("\n\n")[:-1]
    assert len(demos) == 7 and all(d.split("\n")[0][5:] in {t for t, _ in rest} for d in demos)


# -----------------------------------------------------------------------------
# the command line


def cli(tiny, *args, out="out"):
    cmd = [sys.executable, os.path.join(HERE, "ia2.py"), "--model", tiny["model"], "--data", tiny["data"],
           "--out", str(tiny["root"] / out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tiny["root"], timeout=600)


def test_cli_end_to_end_and_reproducible(tiny):
    args = ["--n-train", "4", "--runs", "2", "--eval-size", "20", "--epochs", "3", "--lr", "1e-3", "1e-2"]
    p = cli(tiny, *args)
    assert p.returncode == 0, p.stderr
    out = tiny["root"] / "out"
    res = json.loads((out / "results.json").read_text())["methods"]
    assert set(res) == set(ia2.METHODS)
    for m in ia2.TRAINED:
        assert len(res[m]["by_lr"]) == 2 and set(res[m]["mean"]) == set(ia2.METRICS)
        assert res[m]["lr"] in (1e-3, 1e-2) and len(res[m]["by_lr"]["0.001"]["runs"]) == 2
        assert (out / "adapters" / m / "lr0.01" / "run1" / "adapter_model.safetensors").exists()
    assert "| ia2_then_sft |" in (out / "results.md").read_text() and "| ia2_then_sft |" in p.stdout
    assert json.loads((out / "config.json").read_text())["config"]["n_train"] == 4
    p2 = cli(tiny, *args, out="out2")  # the same command twice gives the same numbers on CPU
    assert json.loads((tiny["root"] / "out2" / "results.json").read_text())["methods"] == res


def test_saved_adapter_loads_in_peft(tiny):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    p = cli(tiny, "--n-train", "4", "--runs", "1", "--eval-size", "10", "--epochs", "2", "--lr", "1e-2",
            "--methods", "sft", out="peft")
    assert p.returncode == 0, p.stderr
    folder = str(tiny["root"] / "peft" / "adapters" / "sft" / "lr0.01" / "run0")
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), folder)
    tok, ours = ia2.load_model(tiny["model"], torch.device("cpu"), torch.float32)
    ia2.add_lora(ours)
    w = load_file(folder + "/adapter_model.safetensors")
    ia2.load_lora_state(ours, {n: (w[f"base_model.model.{n}.lora_A.weight"], w[f"base_model.model.{n}.lora_B.weight"])
                               for n in ia2.lora_modules(ours)})
    assert any(t.abs().sum() > 0 for k, t in w.items() if "lora_B" in k)
    ids = torch.tensor([ia2.encode(tok, "Text:the film was good\nLabel:")])
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task"),
    (["--methods", "sft", "magic"], "unknown method"),
    (["--model", "/no/such/model"], "cannot load model"),
    (["--data", "/no/such.csv"], "data file not found"),
    (["--data", "BADCOLS"], "needs columns 'text' and 'label'"),
    (["--data", "BADLABEL"], "labels must be integers in 0..1"),
    (["--labels", "0", "zqxv"], "label 'zqxv' is"),
    (["--n-train", "60"], "needs 149 pool examples"),
    (["--device", "cuda"], "no CUDA"),
])
def test_bad_input_one_line_and_nothing_written(tiny, capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "BADCOLS" in args or "BADLABEL" in args:
        bad = tiny["root"] / f"{args[1]}.csv"
        bad.write_text("sentence,y\nhello,1\n" if "BADCOLS" in args else "text,label\nhello,1\nbye,pos\n")
        args = ["--data", str(bad)]
    out = tiny["root"] / "bad-out"
    with pytest.raises(SystemExit) as e:
        ia2.main(["--model", tiny["model"], "--data", tiny["data"], "--out", str(out), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tiny["root"] / "bad-out.partial").exists()


def test_bad_input_from_the_shell_prints_no_traceback(tiny):
    p = cli(tiny, "--labels", "0", "zqxv", out="never")
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_nan_loss_stops_with_a_message_and_writes_nothing(tiny, capsys, monkeypatch):
    monkeypatch.setattr(ia2, "objective_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    out = tiny["root"] / "nan-out"
    with pytest.raises(SystemExit) as e:
        ia2.main(["--model", tiny["model"], "--data", tiny["data"], "--out", str(out), "--eval-size", "10",
                  "--runs", "1", "--lr", "1e-3", "--methods", "zero_shot", "sft"])
    assert e.value.code == 2 and "nan" in capsys.readouterr().err
    assert not out.exists() and not (tiny["root"] / "nan-out.partial").exists()


def test_cli_flags_parse():
    cfg = ia2.parse_args(["--lr", "1e-3", "--labels", " negative", " positive", "--n-train", "8"])
    assert cfg.lr == [1e-3] and cfg.labels == [" negative", " positive"] and cfg.n_train == 8
    assert ia2.parse_args([]).lr == (1e-4, 3e-4, 1e-3)  # the paper's grid by default


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
        for mod in ia2.lora_modules(m).values():
            mod.B.normal_()  # a non-trivial adapter: still the same model on both sides
    acts = ev.activations(m, seqs, bs=2)
    assert acts.shape == (5, 2, 32)
    assert torch.allclose(ev.asim(acts, ev.activations(m, seqs, bs=5)), torch.ones(5, 2), atol=1e-5)
    with ia2.lora_disabled(m):
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


def test_reliability_bins_are_the_ece_bins():
    import eval as ev
    rng = np.random.RandomState(0)
    conf, correct = rng.rand(500), (rng.rand(500) < 0.7).astype(float)
    bins = ev.reliability(conf, correct)
    assert [b[4] for b in bins] == [33] * 14 + [38]
    assert all(lo <= mean <= hi for lo, mean, hi, _, _ in bins)
    assert sum(n / 500 * abs(acc - mean) for _, mean, _, acc, n in bins) == pytest.approx(ia2.ece(conf, correct))


def test_eval_end_to_end_report_figures_and_sweep(tiny):
    pytest.importorskip("matplotlib")
    folders = []
    for n in (2, 4):
        p = cli(tiny, "--n-train", str(n), "--runs", "2", "--eval-size", "12", "--epochs", "2", "--lr", "1e-3",
                out=f"ev-n{n}")
        assert p.returncode == 0, p.stderr
        folders.append(str(tiny["root"] / f"ev-n{n}"))
    cmd = [sys.executable, os.path.join(HERE, "eval.py"), *folders, "--out", str(tiny["root"] / "sweep"),
           "--asim-examples", "5"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tiny["root"], timeout=600)
    assert p.returncode == 0, p.stderr
    for f in folders:
        a = json.loads(open(os.path.join(f, "analysis.json")).read())
        assert a["max_abs_diff_vs_results_json"] < 1e-6  # saved adapters reload to the same predictions
        assert set(a["methods"]) == set(ia2.METHODS) and a["asim_examples"] == 5
        assert len(a["methods"]["ia2"]["runs"]) == 2 and len(a["methods"]["ia2"]["runs"][0]["asim_layers"]) == 2
        assert a["overlap"]["sft"]["sft"] == pytest.approx(1.0)
        assert "| ia2_then_sft |" in open(os.path.join(f, "report.md")).read()
        for png in ("asim.png", "reliability.png"):
            assert open(os.path.join(f, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "N=2 | N=4" in (tiny["root"] / "sweep" / "sweep.md").read_text()
    assert (tiny["root"] / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    p = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), str(tiny["root"] / "nothing")],
                       capture_output=True, text=True, cwd=tiny["root"])
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not a finished ia2.py run folder" in p.stderr
