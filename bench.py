"""Timings for the README.

    python bench.py --model <folder> --data rotten_tomatoes.csv [--n-train 8] [--repeats 10]
    python bench.py --model <folder> --data rotten_tomatoes.csv --rollout [--demos 3] [--prompts 2]

Default: one IA2 step vs one SFT step on the same batch, and one right-padded batch vs the official
code's one-example-at-a-time gradient accumulation. A step is forward + backward + Adam on a batch of
min(4, N) training queries; the teacher's activations are computed once beforehand, as in ia2.py,
and timed separately.

--rollout: the teacher's multi-token rollout at T = 32, 64, 128, 200, ia2.py's KV-cached generate()
against the official full re-forward of the whole sequence at every step, on the same ICL prompts
(--demos demonstrations + a query) one at a time, with EOS ignored so that every rollout has exactly
T tokens. Checks that both give the same tokens and activations.
"""
import argparse
import time

import numpy as np
import torch

import ia2


def timed(fn, repeats):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


@torch.no_grad()
def rollout_uncached(model, ids, T):
    """The official teacher: forward ids[:d+t+1] at every step t, keep the last position."""
    ids, toks, acts = list(ids), [], []
    for _ in range(T):
        with ia2.capture_activations(model) as a:
            logits = model(torch.tensor([ids], device=model.device)).logits[0, -1]
        acts.append(torch.stack([x[0, -1] for x in a]).cpu())
        toks.append(int(logits.argmax()))
        ids.append(toks[-1])
    return toks, torch.stack(acts, 1)


def timed_steps(fn):
    """Runs fn() and returns its result and the seconds elapsed at the end of each model.model forward
    (one per rollout step). The first T steps of a T=200 rollout are the T-step rollout, so one run
    gives the time for every T."""
    stamps, t0 = [], time.perf_counter()
    hook = fn.model.model.register_forward_hook(lambda *_: stamps.append(time.perf_counter() - t0))
    try:
        return fn(), stamps
    finally:
        hook.remove()


def rollout_speed(model, tok, pool, labels, n_demos, n_prompts, Ts=(32, 64, 128, 200)):
    """pool: (filled prompt X, label index) pairs; each ICL prompt is n_demos demos, then a query."""
    prompts = [ia2.encode(tok, ia2.make_prompt(pool[i][0], [x + labels[y] for x, y in pool[i + 1:i + 1 + n_demos]]))
               for i in range(0, 50 * n_prompts, 50)]
    print(f"\n{n_prompts} ICL prompts of {n_demos} demos + a query, {[len(p) for p in prompts]} tokens; "
          f"{torch.get_num_threads()} CPU threads, fp32; seconds per rollout of T tokens, mean over the prompts\n")
    cached, full = [], []
    for p in prompts:
        run_cached = lambda: ia2.generate(model, [p], max(Ts), eos_id=-1, capture=True)[0]
        run_full = lambda: rollout_uncached(model, p, max(Ts))
        run_cached.model = run_full.model = model
        cached.append(timed_steps(run_cached))
        full.append(timed_steps(run_full))
    same = all(c["tokens"] == f[0] for (c, _), (f, _) in zip(cached, full))
    diff = max(float((c["acts"] - f[1]).abs().max()) for (c, _), (f, _) in zip(cached, full))
    print("| T | KV-cached (ia2.generate) | full re-forward (official) | speed-up |\n|---|---|---|---|")
    for T in Ts:
        a = np.mean([s[T - 1] for _, s in cached])
        b = np.mean([s[T - 1] for _, s in full])
        print(f"| {T} | {a:.1f} | {b:.1f} | {b / a:.1f}x |")
    print(f"\nsame {max(Ts)} tokens: {same}; largest |difference| of the activations (L, T, D): {diff:.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--n-train", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rollout", action="store_true", help="time the teacher rollout instead of training steps")
    p.add_argument("--demos", type=int, default=3, help="--rollout: demos per ICL prompt (N-1; paper N=4)")
    p.add_argument("--prompts", type=int, default=2, help="--rollout: prompts timed")
    a = p.parse_args()
    cfg = ia2.Config(model=a.model, data=a.data, n_train=a.n_train, eval_size=200, device="cpu")
    device, dtype = ia2.pick_device(cfg.device)
    tok, model = ia2.load_model(cfg.model, device, dtype)
    labels = ["0", "1"]
    pool, _ = ia2.load_task(cfg, "sst2", labels, cfg.data)
    if a.rollout:
        return rollout_speed(model, tok, pool, labels, a.demos, a.prompts)
    train_rows, dev_rows, _ = ia2.few_shot_split(pool, cfg.n_train, 0)
    tr, _ = ia2.training_items(tok, labels, train_rows, dev_rows, 0)
    ia2.add_lora(model)
    t_teacher = timed(lambda: ia2.teacher(model, tr, 1, tok.eos_token_id, bs=4), 1)
    batch = tr[:min(4, cfg.n_train)]
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-4)

    def step(objective, examples_per_forward):
        opt.zero_grad()
        for i in range(0, len(batch), examples_per_forward):
            part = batch[i:i + examples_per_forward]
            (ia2.objective_loss(model, objective, part, 0.5) * len(part) / len(batch)).backward()
        opt.step()

    rows = [("teacher, all N training queries (once per run)", t_teacher)]
    for objective in ("sft", "ia2", "ia2_plus_sft"):
        rows.append((f"{objective} step, padded batch of {len(batch)}", timed(lambda: step(objective, len(batch)), a.repeats)))
        rows.append((f"{objective} step, {len(batch)} x one example (official)", timed(lambda: step(objective, 1), a.repeats)))
    print(f"\n{a.model}, N={cfg.n_train}, {torch.get_num_threads()} CPU threads, fp32, mean of {a.repeats}\n")
    print("| what | ms |\n|---|---|")
    for name, t in rows:
        print(f"| {name} | {1000 * t:.0f} |")


if __name__ == "__main__":
    main()
