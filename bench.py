"""Timings for the README, on a CPU or a GPU (clocks are read after torch.cuda.synchronize()).

    python bench.py --make-proxy FOLDER                  # the speed proxy below: FOLDER/deep, FOLDER/proxy_words.csv
    python bench.py --make-qwen3-shape TOKENIZER FOLDER  # Qwen3-0.6B's shape, random weights, bf16
    python bench.py --check --model FOLDER --data FILE   # a GPU session's first command: see check()
    python bench.py --count-ops [--ia2 OLD/ia2.py] -- IA2_ARGS ...  # aten ops of one whole ia2.py command
    python bench.py --reference FOLDER --assets A [--ia2 OLD/ia2.py]  # the three reference commands
    python bench.py --same FOLDER1 FOLDER2                # ... give the same results.json numbers?

--ia2 PATH times or counts another version's ia2.py (e.g. a `git worktree` of an older commit) with this bench.py.

    python bench.py --model <folder> --data rotten_tomatoes.csv [--device cuda] [--jobs 15] [--repeats 5]
    python bench.py --model <folder> --data rotten_tomatoes.csv --rollout [--demos 3] [--prompts 2]

Default: what ia2.py does over and over, for 1 adapter and for --jobs adapters trained together (the
default grid: 3 lrs x 5 runs = 15): one training step (forward, backward and Adam on min(4, N)
examples per adapter), one dev check, and the evaluation of every adapter on --queries eval queries;
plus the teacher's forward over every run's training and dev examples. ms per call, mean of --repeats.

--rollout: the teacher's multi-token rollout at T = 32, 64, 128, 200, ia2.py's KV-cached generate()
against the official full re-forward of the whole sequence at every step, on the same ICL prompts
(--demos demonstrations + a query) one at a time, with EOS ignored so that every rollout has exactly
T tokens. Checks that both give the same tokens and activations.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ia2


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside the block: on a GPU each is (at least) one kernel launch."""
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        CountOps.n += 1
        return func(*args, **(kwargs or {}))


def count_ops(argv: list):
    """The aten ops of one whole ia2.py command."""
    CountOps.n = 0
    with CountOps():
        ia2.main(argv)
    print(f"\n{CountOps.n:,} aten ops in the whole command ({ia2.__file__})")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    """Mean seconds per call, after one warm-up call whose aten ops are counted: (seconds, ops)."""
    CountOps.n = 0
    with CountOps():
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats, CountOps.n


@torch.no_grad()
def rollout_uncached(model, ids, T):
    """The official teacher: forward ids[:d+t+1] at every step t, keep the last position."""
    ids, toks, acts = list(ids), [], []
    for _ in range(T):
        with ia2.capture_activations(model) as a:
            logits = model(torch.tensor([ids], device=model.device)).logits[0, -1]
        acts.append(torch.stack([x[0, -1] for x in a]))
        toks.append(int(logits.argmax()))
        ids.append(toks[-1])
    return toks, torch.stack(acts, 1)


def timed_steps(fn, model):
    """Runs fn() and returns its result and the seconds elapsed at the end of each model.model forward
    (one per rollout step). The first T steps of a T=200 rollout are the T-step rollout, so one run
    gives the time for every T."""
    stamps, t0 = [], time.perf_counter()

    def stamp(*_):
        sync(model.device)
        stamps.append(time.perf_counter() - t0)
    hook = model.model.register_forward_hook(stamp)
    try:
        return fn(), stamps
    finally:
        hook.remove()


def rollout_speed(model, tok, pool, labels, n_demos, n_prompts, Ts=(32, 64, 128, 200)):
    """pool: (filled prompt X, label index) pairs; each ICL prompt is n_demos demos, then a query."""
    prompts = [ia2.encode(tok, ia2.make_prompt(pool[i][0], [x + labels[y] for x, y in pool[i + 1:i + 1 + n_demos]]))
               for i in range(0, 50 * n_prompts, 50)]
    print(f"\n{n_prompts} ICL prompts of {n_demos} demos + a query, {[len(p) for p in prompts]} tokens; "
          f"{model.device}, {model.dtype}; seconds per rollout of T tokens, mean over the prompts\n")
    cached, full = [], []
    for p in prompts:
        cached.append(timed_steps(lambda: ia2.generate(model, [p], max(Ts), set(), capture=True)[0], model))
        full.append(timed_steps(lambda: rollout_uncached(model, p, max(Ts)), model))
    same = all(c["tokens"] == f[0] for (c, _), (f, _) in zip(cached, full))
    diff = max(float((c["acts"].float() - f[1].float()).abs().max()) for (c, _), (f, _) in zip(cached, full))
    print("| T | KV-cached (ia2.generate) | full re-forward (official) | speed-up |\n|---|---|---|---|")
    for T in Ts:
        a = np.mean([s[T - 1] for _, s in cached])
        b = np.mean([s[T - 1] for _, s in full])
        print(f"| {T} | {a:.2f} | {b:.2f} | {b / a:.1f}x |")
    print(f"\nsame {max(Ts)} tokens: {same}; largest |difference| of the activations (L, T, D): {diff:.1e}")


def grid_speed(S, K, queries, repeats):
    """1 adapter vs K adapters at once: a training step, a dev check, evaluating every adapter."""
    cfg, model, device = S.cfg, S.model, S.model.device
    runs = ia2.draw_runs(S)  # every run's split and the teacher (T=1) on its training and dev examples
    items = [it for run in runs for it in run["train"] + run["dev"]]
    rows = [("teacher forward, all runs' training and dev examples",
             timed(lambda: ia2.teacher_all(model, items, 1, S.tok.eos_token_id), repeats, device))]
    bs = min(cfg.batch_size, cfg.n_train)
    for k in (1, K):
        jobs = [ia2.Job(cfg.lr[0], runs[j % len(runs)]["r"], runs[j % len(runs)]["train"], runs[j % len(runs)]["dev"],
                        batches=ia2.shuffled_batches(cfg.n_train, bs, 10 ** 6, j)) for j in range(k)]
        ia2.add_adapters(model, cfg, K=k)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = ia2.Adam(params, [cfg.lr[0]] * k)
        for objective in ("sft", "ia2"):
            def step():
                ia2.backward(model, objective, [(j, jobs[j], ia2.next_batch(jobs[j])) for j in range(k)])
                opt.step(list(range(k)))
            rows.append((f"{objective} step, {k} adapter(s) x {bs} examples", timed(step, repeats, device)))
            rows.append((f"{objective} dev check, {k} adapter(s) x {len(jobs[0].dev)} examples",
                         timed(lambda: ia2.dev_losses(model, objective, list(enumerate(jobs))), repeats, device)))
        slots = [j for j in range(k) for _ in queries]
        rows.append((f"evaluate {k} adapter(s) x {len(queries)} queries",
                     timed(lambda: ia2.predict_all(model, queries * k, S.task.label_ids, slots), max(1, repeats // 5),
                           device)))
    return rows


PHRASES = (["a charming and affecting journey", "wonderful acting", "a smart script", "the best film of the year",
            "funny and warm", "beautifully made"],
           ["a dull lifeless mess", "the plot makes no sense", "boring from start to finish", "a waste of a fine cast",
            "clumsy and tedious", "flat jokes"])  # negative, positive: label 0 for PHRASES[1], 1 for PHRASES[0]


def make_proxy(folder: str, n_rows: int = 3000):
    """The speed proxy: a random Qwen3 with Qwen3-0.6B's depth (28 layers) but 64-wide layers and a 400-token
    byte-level BPE tokenizer, so that its CPU time is the framework's per-operation cost (the regime of a small
    model on a GPU); and n_rows sst2-format sentences made of its words (1-4 phrases of one sentiment)."""
    import csv
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    rng = np.random.RandomState(0)
    rows = []
    for _ in range(n_rows):
        y = int(rng.randint(2))
        rows.append((", ".join(rng.choice(PHRASES[1 - y], rng.randint(1, 5))), y))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    corpus = [f"Text:{t}\nLabel:{y}\n\n" for t, y in rows[:500]] + ["Question:", "Answer:", "#### 42"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>")
    model_dir = os.path.join(folder, "deep")
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=28,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen3ForCausalLM(config).save_pretrained(model_dir)
    with open(os.path.join(folder, "proxy_words.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("text", "label")] + rows)
    print(f"{model_dir}: Qwen3, 28 layers x 64 wide, vocab {len(tok)}; {folder}/proxy_words.csv: {n_rows} rows")


def arithmetic(path: str, n: int = 400):
    """A gsm8k-format file (question, worked answer ending '#### n') of two-step sums, for the reference runs."""
    import json
    rng, names, things = np.random.RandomState(0), ["Ann", "Bo", "Cy", "Dee"], ["pens", "cups", "cards", "shells"]
    with open(path, "w") as f:
        for _ in range(n):
            who, what, (a, b, c) = rng.choice(names), rng.choice(things), rng.randint(2, 50, 3)
            question = f"{who} has {a} {what}, finds {b} more and then {c} more. How many {what} now?"
            answer = f"{a} + {b} = {a + b}. {a + b} + {c} = {a + b + c}.\n#### {a + b + c}"
            f.write(json.dumps(dict(question=question, answer=answer)) + "\n")


def reference(folder: str, assets: str):
    """The three reference commands, every method, on the CPU with seed 0: sst2 on SmolLM2-135M with the Rotten
    Tomatoes file (LoRA), a gsm8k-format file on SmolLM2-135M ((IA)³), and the speed proxy (LoRA on q, k, v,
    o). Two versions of ia2.py that compute the same give the same numbers (--same)."""
    os.makedirs(folder, exist_ok=True)
    arithmetic(os.path.join(folder, "arith.jsonl"))
    make_proxy(folder)
    smol, methods = os.path.join(assets, "smollm2-135m"), ["--methods", *ia2.METHODS, "--device", "cpu"]
    commands = dict(
        sst2=["--model", smol, "--data", os.path.join(assets, "rotten_tomatoes.csv"), "--labels", "negative",
              "positive", "--runs", "2", "--lr", "1e-4", "1e-3", "--beta", "0.3", "0.7", "--eval-size", "32",
              "--epochs", "3"],
        gsm8k=["--model", smol, "--task", "gsm8k", "--data", os.path.join(folder, "arith.jsonl"), "--adapter",
               "ia3", "--runs", "2", "--lr", "1e-2", "1e-1", "--beta", "0.5", "--eval-size", "8", "--epochs", "2",
               "--max-new-tokens", "32"],
        proxy=["--model", os.path.join(folder, "deep"), "--data", os.path.join(folder, "proxy_words.csv"),
               "--targets", "qkvo", "--runs", "3", "--eval-size", "60", "--epochs", "8"])
    for name, args in commands.items():
        ia2.main(args + methods + ["--out", os.path.join(folder, name)])


def same(a: str, b: str):
    """Every number of every results.json row of the reference commands, in folder a against folder b."""
    import json
    differ = False
    for name in ("sst2", "gsm8k", "proxy"):
        rows = []
        for folder in (a, b):
            with open(os.path.join(folder, name, "results.json")) as f:
                rows.append({(x["task"], x["method"], x["lr"], x["beta"], x["run"]): x for x in json.load(f)["rows"]})
        assert rows[0].keys() == rows[1].keys(), f"{name}: other rows"
        diff = max(abs(x[k] - rows[1][key][k]) for key, x in rows[0].items() for k in x
                   if isinstance(x[k], (int, float)) and not isinstance(x[k], bool))
        others = [key for key, x in rows[0].items() if x.get("predicted") != rows[1][key].get("predicted")]
        print(f"{name}: {len(rows[0])} rows, largest difference {diff:g}" + f", {len(others)} rows answer otherwise" * bool(others))
        differ |= diff > 0 or bool(others)
    sys.exit(1 if differ else 0)


def make_qwen3_shape(tokenizer: str, folder: str):
    """A random-weight model with Qwen/Qwen3-0.6B's configuration (28 layers, hidden 1024, 16/8 heads of 128, MLP
    3072, a tied 151,936-row embedding), bf16: its step times, rollouts and memory are the real model's. Any local
    tokenizer will do (e.g. SmolLM2's from offline-assets.sh): its ids fall inside the embedding."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    print(f"{folder}: Qwen3-0.6B's shape, random weights, bf16")


def check(a):
    """The default sst2 protocol (or --runs, --eval-size, --epochs) end to end with ia2.run_experiment, then: the
    wall time of each phase, the peak memory against the token budget's plan, and that every number is finite."""
    import json
    import math
    import tempfile
    cfg = ia2.Config(model=a.model, data=(a.data,), device=a.device, runs=a.runs, eval_size=a.eval_size,
                     epochs=a.epochs, out=os.path.join(tempfile.mkdtemp(), "check"))
    S = ia2.setup(cfg)
    dev, gb = S.model.device, lambda b: f"{b / 2 ** 30:.1f} GB"
    head = f"{S.model.dtype}, " + (torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type}, "
                                   f"{torch.get_num_threads()} threads")
    plan = {grad: ia2.token_budget(S.model, grad) for grad in (True, False)}
    planned = {grad: plan[grad] * ia2.bytes_per_token(S.model, grad) for grad in (True, False)}
    del S
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    ia2.run_experiment(cfg)
    sync(dev)
    wall = time.perf_counter() - t
    res = ia2.read_json(os.path.join(cfg.out, "results.json"))
    finite = all(math.isfinite(v) for x in res["rows"] for k, v in x.items() if k in ia2.METRICS + ("dev_loss",))
    print(f"\n== check: {a.model}, {head}; {cfg.runs} run{'s' * (cfg.runs > 1)}, {len(res['rows'])} result rows, "
          f"{wall:.0f} s in all")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["timing_s"].items()))
    print(f"token budget per forward: {plan[True]} tokens with gradients ({gb(planned[True])} planned), {plan[False]} "
          f"without ({gb(planned[False])})")
    if dev.type == "cuda":
        print(f"peak memory allocated: {gb(torch.cuda.max_memory_allocated(dev))} of "
              f"{gb(torch.cuda.get_device_properties(dev).total_memory)}")
    print(f"every metric and dev loss finite: {finite}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--make-proxy", metavar="FOLDER", help="write the speed proxy: FOLDER/deep and FOLDER/proxy_words.csv")
    p.add_argument("--make-qwen3-shape", nargs=2, metavar=("TOKENIZER", "FOLDER"), help="write Qwen3-0.6B's shape")
    p.add_argument("--check", action="store_true", help="the default sst2 protocol end to end: time, memory, finite")
    p.add_argument("--count-ops", action="store_true", help="count the aten ops of the ia2.py command given "
                   "after --")
    p.add_argument("--ia2", metavar="PATH", help="time, count or run this ia2.py instead of the one beside bench.py")
    p.add_argument("--reference", metavar="FOLDER", help="run the three reference commands into FOLDER (--assets)")
    p.add_argument("--assets", default=os.path.expanduser("~/.cache/ia2-assets"), help="offline-assets.sh's folder")
    p.add_argument("--same", nargs=2, metavar=("FOLDER1", "FOLDER2"), help="compare two --reference folders")
    p.add_argument("--runs", type=int, default=5, help="--check: runs (default: the protocol's 5)")
    p.add_argument("--epochs", type=int, default=50, help="--check: maximum epochs (default: the protocol's 50)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--n-train", type=int, default=4)
    p.add_argument("--jobs", type=int, default=15, help="adapters trained together (3 lrs x 5 runs by default)")
    p.add_argument("--queries", type=int, default=200, help="eval queries per adapter")
    p.add_argument("--eval-size", type=int, default=500, help="--check: eval examples (default: the protocol's 500)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rollout", action="store_true", help="time the teacher rollout instead")
    p.add_argument("--demos", type=int, default=3, help="--rollout: demos per ICL prompt (N-1; paper N=4)")
    p.add_argument("--prompts", type=int, default=2, help="--rollout: prompts timed")
    argv = sys.argv[1:]
    ia2_args = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[:len(argv) - len(ia2_args) - bool(ia2_args)])
    if a.ia2:  # another version of ia2.py, under the same name
        import importlib.util
        global ia2
        spec = importlib.util.spec_from_file_location("ia2", a.ia2)
        ia2 = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ia2)
    if a.count_ops:
        return count_ops(ia2_args)
    if a.reference:
        return reference(a.reference, a.assets)
    if a.same:
        return same(*a.same)
    if a.make_proxy:
        return make_proxy(a.make_proxy)
    if a.make_qwen3_shape:
        return make_qwen3_shape(*a.make_qwen3_shape)
    if a.check:
        return check(a)
    cfg = ia2.Config(model=a.model, data=(a.data,), n_train=a.n_train, runs=5, eval_size=a.queries, device=a.device)
    S = ia2.setup(cfg)
    if a.rollout:
        return rollout_speed(S.model, S.tok, S.task.pool, S.task.labels, a.demos, a.prompts)
    rows = grid_speed(S, a.jobs, S.task.queries, a.repeats)
    name = torch.cuda.get_device_name() if S.model.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{a.model}, {name}, {S.model.dtype}, N={cfg.n_train}, mean of {a.repeats}\n")
    print("| what | ms | aten ops |\n|---|---|---|")
    for what, (t, ops) in rows:
        print(f"| {what} | {1000 * t:.0f} | {ops:,} |")


if __name__ == "__main__":
    main()
