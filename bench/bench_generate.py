"""Benchmark decoding: the latent KV cache vs recomputing the whole sequence, and absorbed vs naive
MLA decode.

For each context length (the prompt), times --new-tokens greedy steps three ways on the same
model and prompt:
* cache + absorbed : the default decode (generate.generate_tokens): one token per step against
                     the latent cache, W^UK folded into the query, attention directly over the
                     cached 576-number latents (K2);
* cache + naive    : the same cache, but every step up-projects all cached latents to per-head
                     keys and values;
* recompute        : no cache; every step runs the whole sequence again (use_cache=False, the
                     plain twin).
Prints new tokens/s and the speed-ups. Timings alternate between the three and the median of
--repeats is kept.

    python bench/bench_generate.py                    # the shipped demo model (demo/)
    # random weights:
    python bench/bench_generate.py --preset gpu-small --contexts 64 256 --new-tokens 4 --repeats 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# scripts named bench_* shadow no project module; import the project's modules from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model as M
from generate import DEMO_DIR, generate_tokens


@torch.inference_mode()
def decode(model: M.Transformer, prompt: torch.Tensor, new_tokens: int, how: str) -> float:
    """Seconds for new_tokens greedy steps after the prompt (the prefill is excluded for the cached
    variants)."""
    if how == "recompute":
        t = time.perf_counter()
        for _ in generate_tokens(model, prompt, new_tokens, temperature=0, use_cache=False):
            pass
        return time.perf_counter() - t
    impl = "absorb" if how == "cache+absorbed" else "naive"
    cache = model.new_cache(1, prompt.shape[1] + new_tokens)
    nxt = model(prompt, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model(nxt, cache, attn_impl=impl)[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=str(DEMO_DIR),
                   help="checkpoint directory (ignored with --preset)")
    p.add_argument("--preset", default="",
                   help="use a random-weight preset instead of --ckpt (e.g. gpu-small)")
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024],
                   help="prompt lengths")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is steadiest on a shared 2-core machine)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.preset:
        model, name = M.Transformer(M.load_args(a.preset)).eval(), f"{a.preset} (random weights)"
    else:
        model, name = M.Transformer.from_pretrained(a.ckpt, dtype=torch.float32).eval(), a.ckpt
    print(f"model {name}, fp32, {a.threads} thread(s), {a.new_tokens} new tokens per measurement, "
          f"torch {torch.__version__}")
    hows = ("cache+absorbed", "cache+naive", "recompute")
    print(f"{'context':>8}" + "".join(f"{h + ' tok/s':>22}" for h in hows)
          + f"{'cache/recompute':>17}" + f"{'absorbed/naive':>16}")
    for ctx in a.contexts:
        prompt = torch.randint(0, model.args.vocab_size, (1, ctx))
        decode(model, prompt, 2, "cache+absorbed")  # warm-up
        times = {h: [] for h in hows}
        for _ in range(a.repeats):
            for h in hows:
                times[h].append(decode(model, prompt, a.new_tokens, h))
        rate = {h: a.new_tokens / statistics.median(times[h]) for h in hows}
        print(f"{ctx:>8}" + "".join(f"{rate[h]:>22.1f}" for h in hows)
              + f"{rate['cache+absorbed'] / rate['recompute']:>16.1f}x"
              + f"{rate['cache+absorbed'] / rate['cache+naive']:>15.2f}x")


if __name__ == "__main__":
    main()
