"""Step timings for the README: one IA2 step vs one SFT step on the same batch, and one right-padded
batch vs the official code's one-example-at-a-time gradient accumulation.

    python bench.py --model <folder> --data rotten_tomatoes.csv [--n-train 8] [--repeats 10]

A step is forward + backward + Adam on a batch of min(4, N) training queries; the teacher's
activations are computed once beforehand, as in ia2.py, and timed separately.
"""
import argparse
import time

import torch

import ia2


def timed(fn, repeats):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--n-train", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    cfg = ia2.Config(model=a.model, data=a.data, n_train=a.n_train, eval_size=200, device="cpu")
    device, dtype = ia2.pick_device(cfg.device)
    tok, model = ia2.load_model(cfg.model, device, dtype)
    task, labels = ia2.TASKS["sst2"], ["0", "1"]
    label_ids = ia2.label_tokens(tok, labels)
    pool, _ = ia2.load_data(cfg, task, 2)
    train_rows, dev_rows, _ = ia2.few_shot_split(pool, cfg.n_train, 0)
    tr, _ = ia2.training_items(tok, task, labels, train_rows, dev_rows, 0)
    ia2.add_lora(model)
    t_teacher = timed(lambda: ia2.teacher(model, tr, bs=4), 1)
    batch = tr[:min(4, cfg.n_train)]
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-4)

    def step(objective, examples_per_forward):
        opt.zero_grad()
        for i in range(0, len(batch), examples_per_forward):
            part = batch[i:i + examples_per_forward]
            (ia2.objective_loss(model, objective, part, label_ids, 0.5) * len(part) / len(batch)).backward()
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
