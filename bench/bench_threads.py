"""Benchmark `python generate.py` beside a busy process: torch's old default thread count vs the
automatic one.

torch starts with one thread per core. Every parallel CPU operator waits for its whole team of
threads, so when another process holds a core, the thread that lost it stalls each operator until
the scheduler runs it again, while its teammates spin-wait (generate.set_threads explains it). This
script runs the real command line, `python generate.py --raw --prompt ... --max-new-tokens N`, as a
fresh process for each measurement, with 0 or more `python -c "while True: pass"` loops running
beside it, three ways:
* old default    : --threads <the cores of this process's affinity>, what torch does unless told
                   otherwise;
* new default    : no --threads (generate.set_threads: the cores no other process is busy on at
                   start);
* --threads 1    : the hand fix the README used to suggest.
Prints the decode tokens/s that generate.py reports (median of --repeats, the runs interleaved) and
the ratio of the new default to the old one. Bounded: every run has a timeout and the busy loops
are killed at the end.

    # 0 and 1 busy loops, 3 repeats: about a minute on 2 cores
    python bench/bench_threads.py
    python bench/bench_threads.py --busy 0 1 2 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root
PROMPT = "import os\nimport sys\n\n\ndef main():\n"


def generate(threads: int | None, new_tokens: int, timeout: float) -> tuple[float, int]:
    """(decode tokens/s, threads used) of one `python generate.py` run; threads None = its automatic
    default."""
    cmd = [sys.executable, "generate.py", "--raw", "--prompt", PROMPT, "--max-new-tokens",
           str(new_tokens)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 0.0, threads or 0  # slower than the timeout allows: counts as 0 tokens/s
    if r.returncode != 0:
        raise SystemExit(f"error: generate.py failed:\n{r.stderr}")
    speed = float(re.search(r"\(([\d.]+) tokens/s\)", r.stdout).group(1))
    used = int(re.search(r"(\d+) CPU thread\(s\)", r.stdout).group(1))
    return speed, used


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1],
                   help="numbers of busy loops to run beside it")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell (the median is shown)")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="tokens each run generates (greedy, the demo model)")
    p.add_argument("--timeout", type=float, default=60, help="seconds one generate.py run may take")
    a = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os,
                "sched_getaffinity") else os.cpu_count() or 1
    print(f"{cores} cores in this process's affinity; generate.py, demo model, {a.new_tokens} "
          f"greedy tokens, median of {a.repeats}; load average before: {os.getloadavg()[0]:.2f}")
    ways = {"old default": cores, "new default": None, "--threads 1": 1}
    print(f"| busy loops | old default ({cores} threads) | new default (threads picked) | "
          "--threads 1 | new / old |")
    print("|---|---|---|---|---|")
    for busy in a.busy:
        loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(0.5)  # let the loops start
            runs: dict[str, list[tuple[float, int]]] = {w: [] for w in ways}
            # interleaved, so that a change in the machine's load hits every way alike
            for _ in range(a.repeats):
                for way, threads in ways.items():
                    runs[way].append(generate(threads, a.new_tokens, a.timeout))
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
        speed = {w: statistics.median(s for s, _ in r) for w, r in runs.items()}
        picked = sorted({n for _, n in runs["new default"]})
        print(f"| {busy} | {speed['old default']:.1f} tok/s | {speed['new default']:.1f} "
              f"({'/'.join(map(str, picked))}) | {speed['--threads 1']:.1f} | "
              f"{speed['new default'] / max(speed['old default'], 1e-9):.1f}x |", flush=True)


if __name__ == "__main__":
    main()
