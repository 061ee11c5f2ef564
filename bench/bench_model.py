"""Benchmark the model core against Hugging Face transformers' DeepseekV3 with the identical config
and weights.

Measures, side by side in one run (ratios > 1 mean this reference is faster):
* training step: forward + backward tokens/s at batch x seq (default 8 x 256);
* cached greedy decode: new tokens/s for 256 tokens after a 256-token prompt (ours: absorbed MLA
  against the latent cache; transformers: its DynamicCache of per-head keys/values,
  `generate(do_sample=False)`).
Timings alternate between the two implementations and report the median of --repeats runs.

    python bench/bench_model.py                # cpu-small preset, fp32, this CPU
    python bench/bench_model.py --preset tiny --batch 4 --seq 128 --new-tokens 64
    python bench/bench_model.py --sweep        # SWEEP_CONFIGS x {fp32, bf16}, 1 thread, a few min

--sweep runs every config of SWEEP_CONFIGS in fp32 and bf16 with batch x seq 4 x 256 and 64 greedy
tokens after a 128-token prompt (flags change them), and adds the training step's model FLOP
utilisation (MFU) of both implementations: model FLOPs (train_flops: 3x the forward's matmul and
attention FLOPs, no recomputation) / step time / this machine's matmul peak for that dtype, measured
in the same run (best of square matmuls, peak_matmul_flops).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# scripts named bench_* shadow no project module; import the project's modules from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model as M
from generate import set_threads

# The sweep: cpu-small and three variations of it that a new user would try. Head dims, YaRN and one
# dense layer first stay cpu-small's; the wide config doubles every width with the hidden size.
_MOE32 = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, n_routed_experts=32,
              num_experts_per_tok=4, n_shared_experts=1, vocab_size=8192)
SWEEP_CONFIGS = {
    "cpu-small": {},  # D 192, 4 layers, 4 heads, 16 experts top-4 + 1 shared, vocab 4352
    "moe32": _MOE32,  # D 256, 32 experts top-4 + 1 shared, vocab 8192
    # 8 of 64 experts per token
    "moe64-top8": dict(_MOE32, n_routed_experts=64, num_experts_per_tok=8),
    # D 512, 8 heads, every width x2
    "wide512": dict(_MOE32, hidden_size=512, num_attention_heads=8, intermediate_size=1024,
                    moe_intermediate_size=192, q_lora_rank=192, kv_lora_rank=128),
}


def hf_twin(ours: M.Transformer, tmpdir: str):
    """transformers' DeepseekV3ForCausalLM loaded from our own checkpoint (so the weights are
    identical)."""
    import transformers
    from transformers import DeepseekV3ForCausalLM

    # no YaRN-ratio warning per config (ours are small on purpose)
    transformers.utils.logging.set_verbosity_error()
    # no "Loading weights" bar between the table's lines
    transformers.utils.logging.disable_progress_bar()
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


def interleaved(f_ours, f_hf, repeats: int) -> tuple[float, float]:
    """Median seconds of each after one warm-up call each; the calls alternate so machine noise hits
    both alike."""
    f_ours(), f_hf()
    t_ours, t_hf = [], []
    for _ in range(repeats):
        t_ours.append(timed(f_ours))
        t_hf.append(timed(f_hf))
    return statistics.median(t_ours), statistics.median(t_hf)


def train_flops(args: M.ModelArgs, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x the forward; PaLM's MFU convention,
    arXiv 2204.02311 App. B): 2 FLOPs per multiply-add of every matmul a token goes through (its K
    routed experts, not all E) and the causal attention's q·k and p·v products, each query against
    the keys at or before it."""
    D, H, L, V = args.hidden_size, args.num_attention_heads, args.num_hidden_layers, args.vocab_size
    Dn, Dr, Dv = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    Ckv, Cq = args.kv_lora_rank, args.q_lora_rank
    q = D * H * (Dn + Dr) if Cq is None else D * Cq + Cq * H * (Dn + Dr)
    # multiply-adds per token: the projections
    attn = q + D * (Ckv + Dr) + Ckv * H * (Dn + Dv) + H * Dv * D
    moe_layers = sum(args.is_moe_layer(i) for i in range(L))
    routed = args.num_experts_per_tok + args.n_shared_experts
    ffn = (L - moe_layers) * 3 * D * args.intermediate_size + moe_layers * (
        # + the router's (E, D)
        routed * 3 * D * args.moe_intermediate_size + D * args.n_routed_experts)
    per_token = L * attn + ffn + D * V  # + lm_head
    scores = L * H * (Dn + Dr + Dv) * seq * (seq + 1) / 2  # causal: query t sees t + 1 keys
    return 3 * 2 * (batch * seq * per_token + batch * scores)


def peak_matmul_flops(dtype: torch.dtype, n: int = 1024, reps: int = 7) -> float:
    """FLOP/s of the best of `reps` n x n x n matmuls in `dtype`: the ceiling the MFU columns divide
    by."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    return 2 * n**3 / min(timed(torch.matmul, a, b) for _ in range(reps))


def sweep(a) -> None:
    """Every SWEEP_CONFIGS entry x dtype, ours and transformers on identical weights; one table."""
    names = a.configs.split(",") if a.configs else list(SWEEP_CONFIGS)
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    peak = {dt: peak_matmul_flops(dt) for dt in dtypes}
    base = M.load_args("cpu-small")
    cfgs = {n: dataclasses.replace(base, **SWEEP_CONFIGS[n]) for n in names}
    # estimate: (repeats + 1) alternating pairs per measurement, each implementation assumed at 30%
    # of peak for training and at 150 new tokens/s for decode (this machine's order of magnitude),
    # plus loading the twin
    est = sum((a.repeats + 1) * 2 * (train_flops(c, a.batch, a.seq) / (0.3 * peak[dt])
                                     + a.new_tokens / 150) + 3
              for c in cfgs.values() for dt in dtypes)
    print(f"sweep: {len(cfgs)} configs x {len(dtypes)} dtypes, train {a.batch}x{a.seq}, decode "
          f"{a.new_tokens} after {a.prompt}, {a.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; estimated "
          f"{est / 60:.1f} min")
    print("matmul peak (1024^3, best of 7): " + ", ".join(f"{str(dt).removeprefix('torch.')} "
                                                          f"{p / 1e9:.0f} GFLOP/s"
                                                           for dt, p in peak.items()), flush=True)
    rows = []
    for name, cfg in cfgs.items():
        for dt in dtypes:
            torch.manual_seed(0)
            ours = M.Transformer(cfg).to(dt)
            with tempfile.TemporaryDirectory() as tmp:
                hf = hf_twin(ours, tmp + "/ck")
            ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1))
            prompt = torch.randint(0, cfg.vocab_size, (1, a.prompt))
            tr_o, tr_h = interleaved(lambda: train_step_ours(ours.train(), ids),
                                     lambda: train_step_hf(hf.train(), ids), a.repeats)
            ours.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
            de_o, de_h = interleaved(lambda: decode_ours(ours.eval(), prompt, a.new_tokens),
                                     lambda: decode_hf(hf.eval(), prompt, a.new_tokens), a.repeats)
            flops = train_flops(cfg, a.batch, a.seq)
            rows.append((name, str(dt).removeprefix("torch."), tr_o, tr_h, flops / tr_o / peak[dt],
                         flops / tr_h / peak[dt], a.new_tokens / de_o, a.new_tokens / de_h))
            print(f"... {name} {rows[-1][1]} done", flush=True)
            del ours, hf
    print(f"\n{'config':<12}{'dtype':<10}{'train ms ours':>14}{'theirs':>8}{'ratio':>7}"
          f"{'MFU ours':>10}{'theirs':>8}{'decode tok/s ours':>19}{'theirs':>8}{'ratio':>7}  "
          "targets (train >= 1.2, decode >= 2.5)")
    for name, dt, tr_o, tr_h, mfu_o, mfu_h, de_o, de_h in rows:
        met = [f"train {'met' if tr_h / tr_o >= 1.2 else 'MISSED'}",
               f"decode {'met' if de_o / de_h >= 2.5 else 'MISSED'}"]
        print(f"{name:<12}{dt:<10}{tr_o * 1e3:>14.0f}{tr_h * 1e3:>8.0f}{tr_h / tr_o:>7.2f}"
              f"{mfu_o:>10.0%}{mfu_h:>8.0%}{de_o:>19.1f}{de_h:>8.1f}{de_o / de_h:>7.2f}  "
              f"{', '.join(met)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-small", help="model preset (random weights)")
    p.add_argument("--batch", type=int, default=None,
                   help="training batch size (default 8; --sweep 4)")
    p.add_argument("--seq", type=int, default=256, help="training sequence length")
    p.add_argument("--prompt", type=int, default=None,
                   help="decode: prompt tokens (default 256; --sweep 128)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="decode: new tokens (default 256; --sweep 64)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement, median reported (default 3; --sweep 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (0 = automatic, as generate.set_threads; default 0, --sweep: "
                        "1)")
    p.add_argument("--sweep", action="store_true",
                   help="every SWEEP_CONFIGS config x --dtypes, with MFU (docstring)")
    p.add_argument("--configs", default="",
                   help=f"--sweep: comma-separated subset of {', '.join(SWEEP_CONFIGS)}")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="--sweep: comma-separated torch dtypes")
    a = p.parse_args()
    unknown = [n for n in a.configs.split(",") if a.configs and n not in SWEEP_CONFIGS]
    if unknown:
        p.error(f"unknown --configs {unknown}; choose from {', '.join(SWEEP_CONFIGS)}")
    bad = [d for d in a.dtypes.split(",") if not isinstance(getattr(torch, d, None), torch.dtype)]
    if bad:
        p.error(f"--dtypes {bad} are not torch dtypes; use e.g. float32,bfloat16")
    # defaults: (single config, --sweep), for the flags left unset
    defaults = dict(batch=(8, 4), prompt=(256, 128), new_tokens=(256, 64), repeats=(3, 5),
                    threads=(0, 1))
    for key, (single, swept) in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, swept if a.sweep else single)
    set_threads(a.threads)
    if a.sweep:
        return sweep(a)

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
        (f"train fwd+bwd {a.batch}x{a.seq}",
         lambda: train_step_ours(ours, ids), lambda: train_step_hf(hf, ids),
         a.batch * a.seq, "tokens/s"),
        (f"greedy decode {a.new_tokens} after {a.prompt}",
         lambda: decode_ours(ours.eval(), prompt, a.new_tokens),
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
