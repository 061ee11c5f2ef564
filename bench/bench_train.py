"""Benchmark of train.py: training throughput on cpu-small, and a short MuonClip / Muon / AdamW run
at equal steps. Prints tables and writes a plot; asserts nothing (the numbers belong in the README
beside this command).

    python bench/bench_train.py                      # about 5 minutes on 2 shared CPU cores
    python bench/bench_train.py --skip-compare       # throughput only, under a minute
    python bench/bench_train.py --threads 1 2        # also measure 2 threads (see below)

Throughput: one Trainer per optimizer on the default corpus, timed step by step in alternating
rounds (the machine is shared, so the three see the same background load), reporting the median and
the best step. A step is forward + backward + optimizer step (Muon/AdamW, routing-bias update,
QK-Clip). The optimizer's share of the step is Moonlight's measure of Muon's cost (arXiv 2502.16982
§2.3: optimizer step time / whole step time), median optimizer step over median whole step; the line
under each table compares Muon's with the 15 % target at cpu-small. Why --threads 1 by default: on a
2-core machine shared with other jobs, a second OpenMP thread often waits for a core and stalls
every op (measured: a tiny-model step 3.3 s with 2 threads vs 0.06 s with 1). On an idle laptop more
threads are faster; measure both.

Comparison: the same model, data, seed and schedule trained with AdamW (at its own best lr, 2e-3),
Muon and MuonClip (both at train.py's default 4e-3), then `python train.py plot` of the three logs.
tau is lowered (default 5) because the max logits of a 5M-parameter model trained for a few hundred
steps stay far below K2's tau = 100: a lower tau is the only way to watch the clip act at this scale
(the growth QK-Clip exists for appears in large models trained long; Kimi K2 §2.1).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# scripts named bench_* shadow no project module; import the project's modules from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train


def throughput(optimizers: list[str], threads: int, batch: int, seq: int, rounds: int) -> None:
    trainers, times, opt_times = {}, {}, {}
    for name in optimizers:
        args, given = train.parse_args(["--optimizer", name, "--threads", str(threads),
                                        "--batch-size", str(batch), "--seq-len", str(seq),
                                        "--steps", "100000", "--out", f"runs/bench/{name}",
                                        "--eval-every", "100000", "--save-every", "100000"])
        t = train.Trainer(args, given)
        step = t.opt.step

        def timed_step(step=step, name=name):  # the optimizer's share of a training step
            t0 = time.perf_counter()
            step()
            opt_times[name].append(time.perf_counter() - t0)
        t.opt.step = timed_step
        trainers[name], times[name], opt_times[name] = t, [], []
        t._t_step = time.perf_counter()
        t.train_step()  # warm-up: first-call allocations
        opt_times[name].clear()
    for _ in range(rounds):
        for name, t in trainers.items():
            t._t_step = t0 = time.perf_counter()
            t.train_step()
            times[name].append(time.perf_counter() - t0)
    tokens = batch * seq
    print(f"\ntraining throughput, cpu-small, batch {batch} x seq {seq} = {tokens} tokens/step, "
          f"{threads} thread(s), {rounds} steps each:")
    print(f"{'optimizer':>10} | {'median tok/s':>12} | {'best tok/s':>10} | {'median s/step':>13} "
          f"| {'optimizer s':>11} | optimizer share")
    shares = {}
    for name in optimizers:
        med, best = statistics.median(times[name]), min(times[name])
        opt = statistics.median(opt_times[name])
        shares[name] = opt / med
        print(f"{name:>10} | {tokens / med:>12,.0f} | {tokens / best:>10,.0f} | {med:>13.3f} | "
              f"{opt:>11.3f} | {shares[name]:.1%}")
    for name in ("muon", "muonclip"):
        if name in shares:
            print(f"{name} share of the step {shares[name]:.1%} (Moonlight §2.3's measure; target "
                  f"<= 15%): {'met' if shares[name] <= 0.15 else 'MISSED'}")


def compare(steps: int, batch: int, seq: int, lr: float, adamw_lr: float, tau: float, threads: int,
            out: Path) -> None:
    # AdamW at its own best lr of the sweep in train.DEFAULT_LR's comment; Muon and MuonClip share
    # theirs
    runs = {"adamw": ["--lr", str(adamw_lr)], "muon": ["--lr", str(lr)],
            "muonclip": ["--lr", str(lr), "--qk-clip-tau", str(tau)]}
    logs = []
    for name, extra in runs.items():
        t0 = time.perf_counter()
        every = str(max(steps // 4, 1))
        code = train.main(["--optimizer", name, "--steps", str(steps), "--batch-size", str(batch),
                           "--seq-len", str(seq), "--threads", str(threads), "--out",
                           str(out / name), "--log-every", every, "--eval-every", every,
                           "--save-every", str(steps), *extra])
        if code:
            raise SystemExit(f"error: the {name} run of train.py failed (exit {code})")
        print(f"{name}: {time.perf_counter() - t0:.0f} s")
        logs.append(out / name / "log.jsonl")
    print(f"\n{steps} steps each, batch {batch} x seq {seq}, peak lr {lr:g} (AdamW {adamw_lr:g}), "
          "same seed and data:")
    print(f"{'optimizer':>10} | {'train loss (last 10)':>20} | {'val loss':>8} | "
          f"{'peak max logit':>14} | {'final max logit':>15} | clipped head-steps")
    for log in logs:
        config, recs = train.read_log(log)
        name = config["args"]["optimizer"]
        last = statistics.mean(r["loss"] for r in recs[-10:])
        logits = [max(r["max_logit"]) for r in recs]
        clipped = sum(r["clipped_heads"] for r in recs)
        print(f"{name:>10} | {last:>20.4f} | {recs[-1]['val_loss']:>8.4f} | {max(logits):>14.2f} | "
              f"{logits[-1]:>15.2f} | {clipped}")
    try:
        train.plot_logs(logs, out / "compare.png")
    except ImportError:
        print("matplotlib is not installed: pip install matplotlib, then python train.py plot "
              f"{' '.join(map(str, logs))} --out {out / 'compare.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description="train.py throughput and a MuonClip / Muon / AdamW "
                                            "comparison")
    # --- throughput
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts to measure")
    p.add_argument("--shapes", nargs="+", default=["8x128", "8x256", "4x512"],
                   help="BATCHxSEQ shapes (8x128: train.py's default; 8x256 / 4x512: the demo "
                        "recipe's pretraining and SFT)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per optimizer and shape")
    # --- comparison
    p.add_argument("--skip-compare", action="store_true", help="only measure throughput")
    p.add_argument("--compare-steps", type=int, default=120,
                   help="steps per optimizer in the comparison")
    p.add_argument("--compare-lr", type=float, default=train.DEFAULT_LR,
                   help="peak lr of the Muon and MuonClip runs")
    p.add_argument("--adamw-lr", type=float, default=2e-3,
                   help="peak lr of the AdamW run (its best in the sweep)")
    p.add_argument("--tau", type=float, default=5.0,
                   help="QK-Clip tau of the muonclip run (K2: 100; see docstring)")
    p.add_argument("--out", default="runs/bench_compare",
                   help="folder for the comparison's runs and compare.png")
    a = p.parse_args()
    for shape in a.shapes:
        b, _, s = shape.partition("x")
        if not (b.isdigit() and s.isdigit() and int(b) > 0 and int(s) > 0):
            p.error(f"--shapes wants BATCHxSEQ such as 8x128, got {shape!r}")
    for threads in a.threads:
        for shape in a.shapes:
            b, s = map(int, shape.split("x"))
            throughput(["adamw", "muon", "muonclip"], threads, b, s, a.rounds)
    if not a.skip_compare:
        compare(a.compare_steps, 8, 128, a.compare_lr, a.adamw_lr, a.tau, a.threads[0], Path(a.out))


if __name__ == "__main__":
    main()
