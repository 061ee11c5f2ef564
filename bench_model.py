"""Benchmark the model core against Hugging Face transformers' DeepseekV3 with the identical config and weights.

Measures, side by side in one run (ratios > 1 mean this reference is faster):
* training step: forward + backward tokens/s at batch x seq (default 8 x 256);
* cached greedy decode: new tokens/s for 256 tokens after a 256-token prompt (ours: absorbed MLA against the latent
  cache; transformers: its DynamicCache of per-head keys/values, `generate(do_sample=False)`).
Timings alternate between the two implementations and report the median of --repeats runs.

    python bench_model.py                      # cpu-small preset, fp32, this CPU
    python bench_model.py --preset tiny --batch 4 --seq 128 --new-tokens 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import model as M
from generate import add_threads_argument, set_threads


def hf_twin(ours: M.Transformer, tmpdir: str):
    """transformers' DeepseekV3ForCausalLM loaded from our own checkpoint (so the weights are identical)."""
    from transformers import DeepseekV3ForCausalLM

    ours.save_pretrained(tmpdir)
    return DeepseekV3ForCausalLM.from_pretrained(tmpdir, dtype=ours.lm_head.weight.dtype)


def train_step_ours(model, ids):
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()


def train_step_hf(model, ids):
    logits = model(ids[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()


@torch.inference_mode()
def decode_ours(model, prompt, new_tokens):
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new_tokens)
    logits = model(prompt, cache, last_only=True)
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits = model(nxt, cache)


@torch.inference_mode()
def decode_hf(model, prompt, new_tokens):
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def timed(fn, *a) -> float:
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-small", help="model preset (random weights)")
    p.add_argument("--batch", type=int, default=8, help="training batch size")
    p.add_argument("--seq", type=int, default=256, help="training sequence length")
    p.add_argument("--prompt", type=int, default=256, help="decode: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="decode: new tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    add_threads_argument(p)
    a = p.parse_args()
    set_threads(a.threads)
    import tempfile

    torch.manual_seed(0)
    args = M.load_args(a.preset)
    ours = M.Transformer(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_twin(ours, tmp + "/ck")
    ids = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1))
    prompt = torch.randint(0, args.vocab_size, (1, a.prompt))
    print(f"preset {a.preset}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")

    rows = []
    for name, f_ours, f_hf, work, unit in [
        (f"train fwd+bwd {a.batch}x{a.seq}", lambda: train_step_ours(ours, ids), lambda: train_step_hf(hf, ids),
         a.batch * a.seq, "tokens/s"),
        (f"greedy decode {a.new_tokens} after {a.prompt}", lambda: decode_ours(ours.eval(), prompt, a.new_tokens),
         lambda: decode_hf(hf.eval(), prompt, a.new_tokens), a.new_tokens, "new tokens/s"),
    ]:
        f_ours(), f_hf()  # warm-up
        t_ours, t_hf = [], []
        for _ in range(a.repeats):  # alternate so that machine noise hits both alike
            t_ours.append(timed(f_ours))
            t_hf.append(timed(f_hf))
        r_ours, r_hf = work / statistics.median(t_ours), work / statistics.median(t_hf)
        rows.append((name, unit, r_ours, r_hf))
    print(f"{'measurement':<34}{'unit':<14}{'ours':>10}{'transformers':>14}{'ratio':>8}")
    for name, unit, r_ours, r_hf in rows:
        print(f"{name:<34}{unit:<14}{r_ours:>10.1f}{r_hf:>14.1f}{r_ours / r_hf:>8.2f}")


if __name__ == "__main__":
    main()
