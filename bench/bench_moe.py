"""Benchmark of the routed-expert paths of one MoE layer, side by side on the same inputs.

Paths (all share moe.moe_reference's contract: x (N, D), weights/idx (N, K) -> (N, D)):
  reference  moe.moe_reference: a Python loop over the experts that received tokens
  grouped    moe.moe_grouped: sort the (token, slot) pairs by expert, grouped matmuls
             (torch._grouped_mm when the installed torch has it for this device and dtype; the
             header line says whether it was used)
  segments   moe.moe_segments: the same sort, the experts one by one on their contiguous segments
  dense      every expert on every token, masked by the routing weights: E/K times the useful
             work, the naive bound
  fused      kernels.cu through kimi_k2_kernels.moe_forward (only when built and on CUDA); with
             --configs, also each tile configuration forced (fused:small / fused:medium /
             fused:large)

Columns: time per call (median of events-timed repeats after warm-up); useful TFLOP/s counting only
the routed pairs' work, 3 matmuls · 2·D·I per (token, slot) (x3 with --backward); weight GB/s over
the DISTINCT experts touched (each read once, 3·D·I bf16 values), the floor that matters at small T;
on CUDA each as a fraction of a ceiling (default: an H200's, as PyTorch reaches them: 788 TFLOP/s
bf16 matmul, 4.3 TB/s copy; other GPUs: pass --peak-tflops / --peak-tbps), and "roof" = the roofline
time max(flops/peak, bytes/bandwidth) over the measured time. max|Δ| is the output's largest
difference from moe_reference on the same inputs.

Shapes come from model.PRESETS (D hidden_size, I moe_intermediate_size, E n_routed_experts, K
num_experts_per_tok): kimi-k2 (7168, 2048, 384, 8), gpu-small (1536, 512, 64, 8), cpu-small (192,
96, 16, 4), tiny. Routing is drawn uniformly at random without replacement per token (a balanced
router).

Run:
    # CPU: cpu-small at T in {1, 16, 256, 2048}, seconds
    python bench/bench_moe.py
    # CPU, forward + backward: the training cost
    python bench/bench_moe.py --backward --dtype float32
    # layers given as D:I:E:K
    python bench/bench_moe.py --shapes 256:96:32:4,256:96:64:8
    # GPU: gpu-small and kimi-k2, T from 1 to 16,384
    python bench/bench_moe.py --device cuda
    python bench/bench_moe.py --device cuda --shapes kimi-k2 --tokens 1,8 --configs \
        --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# scripts named bench_* shadow no project module; import the project's modules from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model
import moe
from generate import add_threads_argument, set_threads

# An H200's ceilings as PyTorch reaches them, measured on one: a bf16 8192³ torch.matmul on random
# data, and a device-to-device tensor copy counting bytes read + written (NVIDIA's H200 SXM
# datasheet: 989 TFLOP/s, 4.8 TB/s)
H200_TFLOPS = 788.0
H200_TBPS = 4.3


def dense_all_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                      experts: moe.Experts) -> torch.Tensor:
    """Every expert on every token; the routing weights (zero for experts not chosen) mask the
    sum. (N, D)."""
    N, E = x.shape[0], experts.num_experts
    dense_w = torch.zeros(N, E, dtype=torch.float32, device=x.device)
    dense_w = dense_w.scatter_(1, idx, weights)  # (N, E)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(E):
        y = moe.swiglu(x, experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e])  # (N, D)
        out += y.float() * dense_w[:, e, None]  # (N, D)
    return out.to(x.dtype)


def with_backward(fn, x: torch.Tensor, experts: moe.Experts) -> None:
    """fn's forward and backward into x and the expert stacks (the training cost of one MoE layer's
    experts)."""
    with torch.enable_grad():
        x.requires_grad_(True)
        for p in experts.parameters():
            p.grad = None
        fn().float().sum().backward()


def make_inputs(N: int, D: int, I: int, E: int, K: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0):
    """Random layer and routing. Weights ~ N(0, 1/fan_in) drawn in place (no fp32 copy of a 34 GB K2
    layer)."""
    torch.manual_seed(seed)
    with torch.device("meta"):  # shapes only: a K2 layer in fp32 would be 68 GB before the cast
        experts = moe.Experts(E, D, I)
    # allocated once, directly in the bench dtype
    experts = experts.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for p, fan_in in ((experts.gate_proj, D), (experts.up_proj, D), (experts.down_proj, I)):
            for e in range(E):  # one expert at a time keeps the temporary small
                p[e].normal_(0.0, fan_in**-0.5)
    x = torch.randn(N, D, device=device, dtype=dtype)
    # (N, K) K distinct experts per token
    idx = torch.rand(N, E, device=device).argsort(dim=1)[:, :K]
    w = torch.rand(N, K, device=device) + 0.1
    # normalised and scaled like moe.Gate (K2 routed_scaling_factor)
    w = w / w.sum(-1, keepdim=True) * 2.827
    return x, w, idx, experts


def time_call(fn, device: torch.device, min_reps: int = 3, max_reps: int = 50,
              budget_s: float = 1.0) -> float:
    """Median seconds per call: one warm-up call, then repeats until min_reps and the time budget
    are both met."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps
                                     or time.perf_counter() - start < budget_s):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def uses_grouped_mm(x, w, idx, experts) -> bool:
    """Whether moe.moe_grouped calls torch._grouped_mm for these inputs (watched on one call, not
    guessed)."""
    real = getattr(torch, "_grouped_mm", None)
    if real is None:
        return False
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    torch._grouped_mm = spy
    try:
        moe.moe_grouped(x, w, idx, experts)
    finally:
        torch._grouped_mm = real
    return bool(calls)


def bench_one(shape: str, N: int, impls: list[str], args, device: torch.device,
              dtype: torch.dtype) -> list[dict]:
    if ":" in shape:  # a layer given by its sizes, D:I:E:K
        D, I, E, K = (int(v) for v in shape.split(":"))
    else:
        cfg = model.load_args(shape)
        D, I = cfg.hidden_size, cfg.moe_intermediate_size
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    x, w, idx, experts = make_inputs(N, D, I, E, K, dtype, device)
    # useful work only: the routed pairs (x3: + backward)
    flops = N * K * 3 * 2 * D * I * (3 if args.backward else 1)
    touched = int(torch.unique(idx).numel())
    # each distinct expert's three matrices, read once
    weight_bytes = touched * 3 * D * I * x.element_size()
    paths = {
        "reference": lambda: moe.moe_reference(x, w, idx, experts),
        "grouped": lambda: moe.moe_grouped(x, w, idx, experts),
        "segments": lambda: moe.moe_segments(x, w, idx, experts),
        "dense": lambda: dense_all_experts(x, w, idx, experts),
    }
    if moe._ext is not None and device.type == "cuda":
        ext = moe._ext
        paths["fused"] = lambda: ext.moe_forward(x, idx, w, experts.gate_proj, experts.up_proj,
              experts.down_proj)
        if args.configs:
            for i, name in enumerate(("small", "medium", "large"), start=1):
                paths[f"fused:{name}"] = (lambda c: lambda: ext.moe_forward(
                    x, idx, w, experts.gate_proj, experts.up_proj, experts.down_proj, config=c))(i)
    rows = []
    with torch.no_grad():
        ref = paths["reference"]()
        for name, fn in paths.items():
            if name.split(":")[0] not in impls:
                continue
            row = dict(shape=shape, T=N, D=D, I=I, E=E, K=K, impl=name, experts_touched=touched)
            if name == "dense" and N * E * 6 * D * I > args.dense_max_flop:
                row["skipped"] = (f"dense would do {N * E * 6 * D * I / 1e12:.1f} TFLOP "
                                  "(> --dense-max-flop)")
                rows.append(row)
                continue
            if name == "fused" or name.startswith("fused:"):
                row["config"] = name.split(":")[1] if ":" in name else moe._ext.pick_config(N, K, E)
            try:
                out = fn()
                row["max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
                row["has_nan"] = bool(torch.isnan(out).any())
                timed_fn = fn
                if args.backward and name in ("reference", "grouped", "segments"):
                    timed_fn = (lambda f: lambda: with_backward(f, x, experts))(fn)
                elif args.backward:
                    row["skipped"] = "forward only (--backward times the PyTorch paths)"
                    rows.append(row)
                    continue
                sec = time_call(timed_fn, device, budget_s=args.budget)
            # report and go on: one path failing is a result
            except (RuntimeError, torch.OutOfMemoryError) as err:
                row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                rows.append(row)
                continue
            row.update(ms=sec * 1e3, tflops=flops / sec / 1e12,
                       weight_gbps=weight_bytes / sec / 1e9)
            if device.type == "cuda":
                roof = max(flops / (args.peak_tflops * 1e12),
                           weight_bytes / (args.peak_tbps * 1e12))
                row.update(frac_peak=row["tflops"] / args.peak_tflops,
                           frac_hbm=row["weight_gbps"] / (args.peak_tbps * 1e3),
                           frac_roof=roof / sec)
            rows.append(row)
    # what run_experts("auto") picks for this shape on this machine
    if device.type == "cpu" and "auto" in impls:
        with torch.enable_grad() if args.backward else torch.no_grad():
            pick, why = moe.cpu_sorted_path(x.requires_grad_(args.backward), idx, experts)
        rows.append(dict(shape=shape, T=N, D=D, I=I, E=E, K=K, impl="auto", pick=f"picks {pick}: "
                                                                                 f"{why}"))
    del x, w, idx, experts, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], device: torch.device) -> None:
    frac = device.type == "cuda"
    head = f"{'shape':10s} {'T':>6s} {'impl':13s} {'ms':>9s} {'TFLOP/s':>8s} {'weight GB/s':>11s}"
    head += f" {'%peak':>6s} {'%HBM':>6s} {'roof':>5s}" if frac else ""
    print(head + f" {'max|Δ|':>8s}  note")
    for r in rows:
        line = f"{r['shape']:10s} {r['T']:6d} {r['impl']:13s}"
        if "skipped" in r or "pick" in r:
            print(f"{line} {'—':>9s}  {r['pick'] if 'pick' in r else 'skipped: ' + r['skipped']}")
            continue
        line += f" {r['ms']:9.4g} {r['tflops']:8.3g} {r['weight_gbps']:11.4g}"
        if frac:
            line += (f" {100 * r['frac_peak']:5.1f}% {100 * r['frac_hbm']:5.1f}% "
                     f"{100 * r['frac_roof']:4.0f}%")
        note = f"config {r['config']}" if "config" in r else ""
        note += " NaN!" if r["has_nan"] else ""
        print(f"{line} {r['max_abs_diff']:8.1e}  {note}")


def check_targets(rows: list[dict]) -> None:
    """The fused kernel's targets on an H200: prefill (gpu-small, T=16384) at >= 35 % of the bf16
    matmul ceiling and no slower than grouped; decode (kimi-k2, T <= 8) at >= 60 % of the memory
    bandwidth over the experts touched."""
    def find(shape, T, impl):
        return next((r for r in rows if r["shape"] == shape and r["T"] == T
                     and r["impl"] == impl and "ms" in r), None)

    fused, grouped = find("gpu-small", 16384, "fused"), find("gpu-small", 16384, "grouped")
    if fused:
        vs = f", grouped {grouped['ms']:.3f} ms" if grouped else ""
        ok = fused["frac_peak"] >= 0.35 and (grouped is None or fused["ms"] <= grouped["ms"])
        print(f"target gpu-small T=16384: fused {fused['ms']:.3f} ms = "
              f"{100 * fused['frac_peak']:.1f}% of peak{vs} (want >= 35% and no slower than "
              f"grouped): {'MET' if ok else 'NOT MET'}")
    for T in sorted({r["T"] for r in rows if r["shape"] == "kimi-k2" and r["T"] <= 8}):
        if r := find("kimi-k2", T, "fused"):
            print(f"target kimi-k2 T={T}: fused {r['ms']:.3f} ms = {100 * r['frac_hbm']:.1f}% of "
                  f"HBM bandwidth over the {r['experts_touched']} experts touched (want >= 60%): "
                  f"{'MET' if r['frac_hbm'] >= 0.6 else 'NOT MET'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- what to run
    p.add_argument("--device", default="", help="cpu | cuda; empty = cuda if available, else cpu")
    p.add_argument("--shapes", default="", help="comma-separated model.PRESETS names or D:I:E:K "
                                                "layer sizes; empty = cpu-small on CPU, "
                                                "gpu-small,kimi-k2 on CUDA")
    p.add_argument("--tokens", default="", help="comma-separated token counts T; empty = "
                                                "1,16,256,2048 on CPU, 1,8,64,512,4096,16384 on "
                                                "CUDA")
    p.add_argument("--impls", default="reference,grouped,segments,dense,fused,auto",
                   help="paths to time (fused: CUDA + built only; auto: which sorted path moe "
                        "picks on a CPU)")
    p.add_argument("--backward", action="store_true",
                   help="time forward + backward (reference, grouped, segments)")
    p.add_argument("--configs", action="store_true",
                   help="also time the fused kernel with each tile config forced")
    p.add_argument("--dtype", default="bfloat16",
                   help="bfloat16 | float32 (the fused kernel is bf16 only)")
    # --- limits and ceilings
    p.add_argument("--dense-max-flop", type=float, default=0.0,
                   help="skip the dense path above this many FLOP; 0 = 2e13 on CUDA, 2e10 on CPU")
    p.add_argument("--budget", type=float, default=0.5,
                   help="seconds of timed repeats per measurement (min 3 reps)")
    p.add_argument("--peak-tflops", type=float, default=H200_TFLOPS,
                   help="bf16 matmul ceiling for %%peak")
    p.add_argument("--peak-tbps", type=float, default=H200_TBPS,
                   help="memory bandwidth ceiling (TB/s) for %%HBM")
    p.add_argument("--json", default="", help="also write every row to this JSON file")
    add_threads_argument(p)
    args = p.parse_args()
    if args.dtype not in ("bfloat16", "float32"):
        p.error(f"--dtype must be bfloat16 or float32, got {args.dtype!r}")
    if args.tokens and not all(t.strip().isdigit() and int(t) > 0 for t in args.tokens.split(",")):
        p.error(f"--tokens must be comma-separated positive integers, got {args.tokens!r}")
    if args.device and args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    set_threads(args.threads)

    if args.device:
        device, why = torch.device(args.device), "requested with --device"
    elif torch.cuda.is_available():
        device, why = torch.device("cuda"), "CUDA device found"
    else:
        device, why = torch.device("cpu"), "no CUDA device found"
    cuda = device.type == "cuda"
    shapes = (args.shapes or ("gpu-small,kimi-k2" if cuda else "cpu-small")).split(",")
    default_tokens = "1,8,64,512,4096,16384" if cuda else "1,16,256,2048"
    tokens = [int(t) for t in (args.tokens or default_tokens).split(",")]
    args.dense_max_flop = args.dense_max_flop or (2e13 if cuda else 2e10)
    dtype = getattr(torch, args.dtype)
    impls = args.impls.split(",")

    print(f"device: {device} ({why}); torch {torch.__version__}; dtype {args.dtype}")
    if cuda:
        print(f"gpu: {torch.cuda.get_device_name(device)}; ceilings {args.peak_tflops:g} TFLOP/s, "
              f"{args.peak_tbps:g} TB/s")
    impl, reason = moe.pick_expert_impl("auto", device)
    print(f"moe.pick_expert_impl: {impl} ({reason})")
    x, w, idx, ex = make_inputs(4, 64, 32, 8, 2, dtype, device)
    print("moe_grouped uses torch._grouped_mm here: "
          f"{'yes' if uses_grouped_mm(x, w, idx, ex) else 'no'}")
    rows = []
    for shape in shapes:
        for N in tokens:
            rows += bench_one(shape, N, impls, args, device, dtype)
            print(f"... {shape} T={N} done", flush=True)
    print()
    print_table(rows, device)
    if cuda:
        check_targets(rows)
    if args.json:
        with open(args.json, "w") as f:
            gpu = torch.cuda.get_device_name(device) if cuda else None
            json.dump(dict(device=str(device), gpu=gpu, torch=torch.__version__, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
