"""Benchmark of muonclip.py: optimizer step time of MuonClip vs torch.optim.AdamW, and batched vs
looped Newton-Schulz over expert stacks. Prints tables; asserts nothing (timings belong in the
README with this command).

    python bench/bench_muonclip.py                    # CPU, cpu-small preset, a minute or so
    python bench/bench_muonclip.py --preset gpu-small --device cuda

The target is MuonClip <= 1.5x AdamW per optimizer step. Muon does more arithmetic than AdamW by
design (5 Newton-Schulz steps, three matmuls each, per matrix), so the ratio depends on the shapes
and on how fast bf16 matmuls are on the device; Moonlight (arXiv 2502.16982 §2.3) measures the
overhead against a whole training step instead.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# scripts named bench_* shadow no project module; import the project's modules from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model as kimi
from generate import add_threads_argument, set_threads
from muonclip import NS_STEPS, MuonClip, split_params, zeropower_via_newtonschulz5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Best (minimum) wall time of fn() in milliseconds: on a shared machine the minimum is the
    repeatable number."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def optimizer_table(preset: str, device: torch.device, repeats: int) -> None:
    torch.manual_seed(0)
    m = kimi.Transformer(kimi.PRESETS[preset]()).to(device).train()  # fp32 master weights
    n_params = sum(p.numel() for p in m.parameters())
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    lr = 1e-4  # small, so hundreds of steps do not blow the weights up while we time them
    rows = []
    # AdamW as people use it: torch's default implementation choice (foreach on CUDA, per-tensor
    # loop on CPU)
    adamw = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rows.append(("torch.optim.AdamW (all params)", time_it(adamw.step, device, repeats)))
    adamw_fused = None
    if device.type == "cuda":
        adamw_fused = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                                        weight_decay=0.1, fused=True)
        rows.append(("torch.optim.AdamW fused=True", time_it(adamw_fused.step, device, repeats)))
    for name, kw in [("MuonClip, mode adamw (all params)", dict(use_muon=False, qk_clip_tau=None)),
                     ("MuonClip, mode muon (no QK-Clip)", dict(qk_clip_tau=None)),
                     ("MuonClip (Muon + AdamW + bias + QK-Clip)", dict())]:
        opt = MuonClip.from_model(m, lr=lr, **kw)
        # a recorded max logit above tau in every head: QK-Clip rescales every step
        for layer in m.model.layers:
            layer.self_attn.max_logits.fill_(200.0)

        def step(opt=opt):
            opt.step()
            for layer in m.model.layers:
                layer.self_attn.max_logits.fill_(200.0)

        rows.append((name, time_it(step, device, repeats)))
    base = rows[0][1]
    print(f"\noptimizer step, preset {preset} ({n_params / 1e6:.2f}M params, fp32), device "
          f"{device}, best of {repeats}")
    print(f"{'optimizer':44s} {'ms/step':>9s} {'x AdamW':>8s}")
    for name, ms in rows:
        print(f"{name:44s} {ms:9.2f} {ms / base:8.2f}")
    # Why Muon costs more: per (A, B) matrix with a <= b, each NS step does X Xᵀ (a²b), P = bΓ + cΓ²
    # (a³) and P X (a²b) multiply-adds, while AdamW does ~10 flops per parameter and is memory
    # bound.
    muon, _ = split_params(m)
    flops = 0
    for _, p in muon:
        a, b = sorted(p.shape[-2:])
        flops += p[..., 0, 0].numel() * NS_STEPS * 2 * (2 * a * a * b + a ** 3)
    X = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
    # GFLOP/s of a large bf16 matmul
    rate = 2 * 1024 ** 3 / time_it(lambda: X @ X, device, repeats) / 1e6
    print(f"Newton-Schulz work: {flops / 1e9:.2f} GFLOP per step; at this device's bf16 matmul "
          f"rate ({rate:.0f} GFLOP/s, 1024^3) that alone takes >= {flops / 1e6 / rate:.1f} ms, "
          f"{flops / 1e6 / rate / base:.1f}x the AdamW step")


def expert_table(device: torch.device, repeats: int, shapes: list[tuple[int, int, int]]) -> None:
    print(f"\nNewton-Schulz over an expert stack (E, I, D), bf16, device {device}, best of "
          f"{repeats}")
    print(f"{'E x I x D':>18s} {'batched ms':>11s} {'loop ms':>9s} {'speedup':>8s}")
    for E, I, D in shapes:
        G = torch.randn(E, I, D, device=device)
        batched = time_it(lambda: zeropower_via_newtonschulz5(G), device, repeats)
        looped = time_it(lambda: [zeropower_via_newtonschulz5(g) for g in G], device, repeats)
        print(f"{f'{E} x {I} x {D}':>18s} {batched:11.2f} {looped:9.2f} {looped / batched:8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-small",
                   help="model preset whose parameters are optimized")
    p.add_argument("--device", default="", help="cpu | cuda; empty = cuda if available, else cpu")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed repetitions per row (the best is reported)")
    add_threads_argument(p)
    args = p.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    optimizer_table(args.preset, device, args.repeats)
    # cpu-small's experts, gpu-small's experts, and K2's expert count with small matrices
    if device.type == "cuda" or args.preset != "cpu-small":
        shapes = [(16, 96, 192), (64, 512, 1536), (384, 64, 256)]
    else:
        shapes = [(16, 96, 192), (64, 128, 384), (384, 32, 64)]
    if device.type == "cuda":
        shapes.append((384, 2048, 7168))  # one K2 layer's gate_proj stack (5.6G params in fp32)
    expert_table(device, args.repeats, shapes)


if __name__ == "__main__":
    main()
