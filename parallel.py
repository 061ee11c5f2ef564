"""Tensor and expert parallelism for Kimi K2: joining a torchrun job, this rank's share, and the few
collectives.

The model is split inside its own modules (one code path; at world size 1 every helper here is the
identity and the model is the ordinary single-device one, bit for bit). With W ranks, following
DeepSeek-V3's inference/model.py (ParallelEmbedding, Column/RowParallelLinear, experts partitioned
across ranks):
* Attention (attention.MLA): rank r computes heads [r·H/W, (r+1)·H/W): its rows of q_b_proj (or
  q_proj) and kv_b_proj, its columns of o_proj. q_a_proj, kv_a_proj_with_mqa and the latent norms
  are small and replicated, and so is the latent KV cache (every head reads all 576 numbers of every
  cached token). One all-reduce sums the heads' o_proj outputs.
* Dense MLP and shared expert (moe.MLP): the intermediate units are split (gate/up rows, down
  columns).
* Routed experts (moe.MoE): rank r owns experts [r·E/W, (r+1)·E/W) (K2 on 16 ranks: 24 each). Every
  rank holds every token (the attention all-reduce left them there), routes them all identically,
  runs the pairs that chose its own experts, and one all-reduce sums routed + shared outputs. moe.py
  says why not all-to-all.
* Embedding and lm_head (model.py): the vocabulary rows are split. The embedding all-reduces the
  rows looked up on their owner rank; the head all-gathers the logits, so every rank holds the full
  (B, T, V) fp32 logits.
Which tensors are split, and along which dim: `Transformer.shard_dims()`.

Autograd, for training: Megatron-LM's two conjugate operators (Shoeybi et al., arXiv 1909.08053 §3,
"f" and "g"). `copy_to_ranks` is the identity forward and an all-reduce backward; it sits where a
replicated activation enters split weights. `reduce_from_ranks` is an all-reduce forward and the
identity backward; it sits where the ranks' partial outputs are summed. Together they give every
replicated tensor the same full gradient on every rank.

Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): `init` joins
the job with NCCL on CUDA devices and gloo on CPU. A rank that fails ends its process at once
(`abort_on_error`), so torchrun stops the others instead of leaving them blocked in a collective
that can never complete.

What a split costs each rank, before buying the machines: `memory_plan` counts the bytes one of W
ranks holds (weights, latent KV cache, activation workspace) from the shapes alone, on the meta
device; `python model.py --config kimi-k2 --plan --world-size 16` prints it.
"""
from __future__ import annotations

import datetime
import gc
import math
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from config import kv_cache_bytes_per_token, valid_world_sizes, world_size_problems

# this process's place in the job; set once by init(), read by the modules when they are built
_WORLD_SIZE = 1
_RANK = 0


def world_size() -> int:
    return _WORLD_SIZE


def rank() -> int:
    return _RANK


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process job (torchrun, or the same variables set
    by hand)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_type: str = "cpu", timeout_s: float = 600.0) -> torch.device:
    """Join the job described by torchrun's environment; returns this rank's device (cuda:LOCAL_RANK
    or cpu).

    device_type "cuda" uses NCCL with one GPU per rank; "cpu" uses gloo. Without WORLD_SIZE > 1 in
    the environment this is a single process: nothing is joined. timeout_s bounds every collective
    (a rank that never arrives turns into an error on the others after this long, instead of a
    hang).
    """
    global _WORLD_SIZE, _RANK
    if not launched_by_torchrun():
        return torch.device("cuda" if device_type == "cuda" else "cpu")
    if dist.is_initialized():
        raise RuntimeError("parallel.init() called twice in one process")
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but this node has "
                               f"{torch.cuda.device_count()} CUDA devices; start at most that many "
                               "processes per node (--nproc-per-node)")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _WORLD_SIZE, _RANK = dist.get_world_size(), dist.get_rank()
    return device


def shutdown() -> None:
    """Leave the job (a no-op in a single process)."""
    global _WORLD_SIZE, _RANK
    if dist.is_initialized():
        # no rank tears its connections down while a peer is still in a collective (gloo aborts)
        dist.barrier()
        dist.destroy_process_group()
        # free the process group's C++ worker threads now, not during interpreter shutdown
        gc.collect()
    _WORLD_SIZE, _RANK = 1, 0


def split(n: int, what: str) -> tuple[int, int]:
    """This rank's share of n things (heads, experts, vocabulary rows, hidden units): (count, index
    of its first)."""
    if n % _WORLD_SIZE:
        raise ValueError(f"{what}={n} cannot be split evenly over {_WORLD_SIZE} ranks; "
                         "use a world size that divides it")
    part = n // _WORLD_SIZE
    return part, _RANK * part


def local_slice(full: Tensor, dim: int | None) -> Tensor:
    """This rank's slice of a full tensor split along dim (None: replicated, the whole tensor). A
    view."""
    if dim is None or _WORLD_SIZE == 1:
        return full
    part, first = split(full.shape[dim], f"dimension {dim} of a {tuple(full.shape)} tensor")
    return full.narrow(dim, first, part)


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, so a W-rank job prints each line once."""
    if _RANK == 0:
        print(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# Collectives inside the forward pass (autograd-aware; the identity at world size 1)


class _CopyToRanks(torch.autograd.Function):
    """Megatron's f: forward identity; backward all-reduce, because every rank's split weights used
    the same input."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _all_reduce_fp32(grad)


class _ReduceFromRanks(torch.autograd.Function):
    """Megatron's g: forward all-reduce (sum of the ranks' partial outputs); backward identity."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _all_reduce_fp32(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _GatherFromRanks(torch.autograd.Function):
    """Forward: concatenate every rank's slice along dim; backward: keep this rank's slice of the
    gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        ctx.dim = dim
        return gather_full(x, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return local_slice(grad, ctx.dim).contiguous(), None


def _all_reduce_fp32(x: Tensor) -> Tensor:
    # The sum runs in fp32 whatever the activation dtype: on one device these partial sums are
    # accumulated in fp32 inside a single matmul (or moe_reference's fp32 buffer) and rounded once;
    # a bf16 all-reduce would round once per rank. Twice the bytes of a bf16 all-reduce; production
    # engines usually accept the bf16 rounding.
    # A copy: the input is never changed.
    y = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    dist.all_reduce(y)
    return y.to(x.dtype)


def copy_to_ranks(x: Tensor) -> Tensor:
    return x if _WORLD_SIZE == 1 else _CopyToRanks.apply(x)


def reduce_from_ranks(x: Tensor) -> Tensor:
    return x if _WORLD_SIZE == 1 else _ReduceFromRanks.apply(x)


def gather_from_ranks(x: Tensor, dim: int = -1) -> Tensor:
    return x if _WORLD_SIZE == 1 else _GatherFromRanks.apply(x, dim % x.dim())


# --------------------------------------------------------------------------------------------------
# Collectives outside autograd: statistics, sampled tokens, whole tensors (for checkpoints and
# optimizers)


def gather_full(x: Tensor, dim: int | None) -> Tensor:
    """The full tensor from every rank's slice along dim (None: replicated, returned as is). Every
    rank gets it."""
    if dim is None or _WORLD_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_WORLD_SIZE)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def all_reduce_(x: Tensor, op: str = "sum") -> Tensor:
    """In place over all ranks: op "sum" (e.g. a gradient norm's squares) or "max" (QK-Clip's max
    logits)."""
    if _WORLD_SIZE > 1:
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return x


def broadcast_(x: Tensor, src: int = 0) -> Tensor:
    """In place: every rank gets rank src's x (e.g. the sampled token, so all ranks decode the same
    sequence)."""
    if _WORLD_SIZE > 1:
        dist.broadcast(x, src)
    return x


def barrier() -> None:
    if _WORLD_SIZE > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# Failing cleanly


def check_all_ok(err: BaseException | None, what: str) -> None:
    """Collective: every rank passes the error it hit (or None). If any rank failed, EVERY rank
    raises: the failing ranks their own error, the others a RuntimeError naming the rank and its
    message. Use it after a step that can fail on some ranks only (reading a checkpoint), before the
    next collective would wait forever for them."""
    if _WORLD_SIZE == 1:
        if err is not None:
            raise err
        return
    messages: list = [None] * _WORLD_SIZE
    dist.all_gather_object(messages, None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    failed = [r for r, m in enumerate(messages) if m is not None]
    if failed:
        others = f" (and ranks {failed[1:]})" if failed[1:] else ""
        raise RuntimeError(f"{what} failed on rank {failed[0]} of {_WORLD_SIZE}{others}: "
                           f"{messages[failed[0]]}")


@contextmanager
def abort_on_error() -> Iterator[None]:
    """Wrap a script's body: an exception on any rank prints `[rank r/W] ...` with its traceback and
    ends that process immediately with exit code 1. torchrun then stops the other ranks (and with
    gloo they also see the closed connection), so the job ends with a clear message instead of
    hanging in its next collective. os._exit skips the interpreter's shutdown, which could itself
    block in NCCL teardown behind the failed step."""
    try:
        yield
    except BaseException as err:
        clean_exit = isinstance(err, SystemExit) and not err.code
        if _WORLD_SIZE == 1 or isinstance(err, KeyboardInterrupt) or clean_exit:
            raise
        msg = err.code if isinstance(err, SystemExit) else f"{type(err).__name__}: {err}"
        if not isinstance(err, SystemExit):
            traceback.print_exc()
        print(f"[rank {_RANK}/{_WORLD_SIZE}] failed: {msg}; ending this rank so the job stops",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


# --------------------------------------------------------------------------------------------------
# Memory plan per rank (python model.py --config kimi-k2 --plan --world-size 16)

# H200: "141 GB" (NVIDIA datasheet); nvidia-smi on an H200 reports 143,771 MiB = 140.4 GiB, which is
# what we count
H200_GIB = 143_771 / 1024
# CUDA context, cuBLAS workspace, NCCL buffers and allocator fragmentation: a rough allowance,
# UNVERIFIED (measure torch.cuda.mem_get_info() after the first forward on the real machine)
RESERVE_GIB = 4.0


def _stored_fp8(name: str) -> bool:
    """Is this tensor FP8 in the released checkpoint? Every projection matrix of attention, MLPs and
    experts; not the router, norms, embedding or lm_head (DeepSeek-V3 README_WEIGHTS.md; the
    Kimi-K2-Instruct safetensors index lists a weight_scale_inv beside exactly these)."""
    return name.endswith(("_proj.weight", "_proj_with_mqa.weight")) or ".mlp.experts." in name


def memory_plan(model: torch.nn.Module, world_size: int, batch: int = 1, context: int = 131072,
                prefill_chunk: int = 8192) -> dict[str, float]:
    """Bytes ONE of world_size ranks needs, from the shapes alone. `model`: the network built on the
    meta device (nothing allocated) in this process; its `shard_dims()` says which tensors W ranks
    split.

    weights_*: the split tensors (1/W each) and the replicated ones, in bf16 (what this reference
    runs: FP8 checkpoints are dequantized at load) and with FP8 kept (1 byte + one fp32 scale per
    128x128 block, what vLLM/SGLang run). kv_cache: the MLA latent cache in bf16, replicated on
    every rank (every head reads all of it). workspace: an ESTIMATE of the largest activations of
    one forward over batch x prefill_chunk tokens with `context` keys (prefill is the peak; decode
    needs far less), counted from the tensors the code creates:
      residual stream h, its normed copy, a partial output and its fp32 all-reduce copy:
        N·D·(2+2+2+4)
      + the larger of: attention (this rank's heads; naive prefill up-projects K/V of all S keys;
        the T x S scores are not counted, a fused SDPA kernel never materializes them), the MoE
        layer (router scores; this rank's M = N·K/W (token, expert) pairs at perfect balance
        through moe_grouped; the fp32 per-token accumulator), the dense MLP
      + the last position's logits (fp32, full vocabulary on every rank).
    """
    args = model.args
    problems = world_size_problems(args, world_size)
    if problems:
        raise ValueError(f"world size {world_size} does not divide {', '.join(problems)}; world "
                         f"sizes that work: {valid_world_sizes(args, 64)}")
    dims, W = model.shard_dims(), world_size
    out = dict(weights_split_bf16=0, weights_replicated_bf16=0, weights_split_fp8=0,
               weights_replicated_fp8=0)
    for name, t in model.state_dict().items():
        shape = list(t.shape)
        # this process's shape is already 1/_WORLD_SIZE of the full one
        if name in dims:
            shape[dims[name]] = shape[dims[name]] * _WORLD_SIZE // W
        n = math.prod(shape)
        # the routing bias stays fp32 (moe.Gate)
        bf16 = n * (4 if name.endswith("e_score_correction_bias") else 2)
        fp8 = bf16
        # one byte per weight + an fp32 scale per 128x128 block of each matrix
        if _stored_fp8(name):
            *stack, rows, cols = shape
            fp8 = n + 4 * math.prod(stack) * math.ceil(rows / 128) * math.ceil(cols / 128)
        where = "split" if name in dims else "replicated"
        out[f"weights_{where}_bf16"] += bf16
        out[f"weights_{where}_fp8"] += fp8
    out["kv_cache"] = batch * context * kv_cache_bytes_per_token(args)[0]
    # activation workspace of one forward (bf16 activations = 2 bytes), see the docstring
    N, S, D, V = batch * prefill_chunk, batch * context, args.hidden_size, args.vocab_size
    Hl = args.num_attention_heads // W
    Dn, Dr, Dv = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    residual = N * D * (2 + 2 + 2 + 4)
    attention = 2 * (N * Hl * (Dn + Dr) + S * Hl * (Dn + Dv) + S * Hl * (Dn + Dr) + N * Hl * Dv)
    E, K, Ie = args.n_routed_experts, args.num_experts_per_tok, args.moe_intermediate_size
    M = N * K // W
    moe = N * E * 4 * 2 + M * D * 2 + M * Ie * 2 * 3 + M * D * (2 + 4 + 4) + N * D * 4
    moe += N * (Ie * args.n_shared_experts // W) * 2 * 3
    dense = N * (args.intermediate_size // W) * 2 * 3
    logits = batch * V * 4 + batch * (V // W) * 2
    out["workspace"] = residual + max(attention, moe, dense) + logits
    for kind in ("bf16", "fp8"):
        out[f"total_{kind}"] = (out[f"weights_split_{kind}"] + out[f"weights_replicated_{kind}"]
                                + out["kv_cache"] + out["workspace"])
    return out


def print_memory_plan(model: torch.nn.Module, name: str, world_size: int, batch: int, context: int,
                      prefill_chunk: int, gpu_gib: float = H200_GIB,
                      reserve_gib: float = RESERVE_GIB) -> None:
    """Print memory_plan for `world_size` ranks, then the per-rank totals of every world size that
    splits the config evenly. `model`: the network on the meta device, as for memory_plan."""
    args = model.args
    plan = memory_plan(model, world_size, batch, context, prefill_chunk)
    usable = (gpu_gib - reserve_gib) * 2**30
    W = world_size
    print(f"memory plan: {name} on {W} ranks, per rank (from the shapes; nothing is allocated)")
    print(f"  each rank: {args.num_attention_heads // W} of {args.num_attention_heads} heads, "
          f"{args.n_routed_experts // W} of {args.n_routed_experts} experts, "
          f"{args.vocab_size // W:,} of {args.vocab_size:,} vocabulary rows, "
          f"1/{W} of the dense and shared MLP units")
    print(f"  {'':<56}{'bf16':>12}{'FP8 kept':>12}")
    rows = [(f"weights split across ranks (1/{W} each)", "weights_split_bf16", "weights_split_fp8"),
            ("weights replicated (latent path, norms, router)", "weights_replicated_bf16",
             "weights_replicated_fp8"),
            (f"MLA latent KV cache, {batch} x {context:,} tokens (replicated)", "kv_cache",
             "kv_cache"),
            (f"activation workspace, {prefill_chunk:,}-token prefill (estimate)", "workspace",
             "workspace"),
            ("TOTAL", "total_bf16", "total_fp8")]
    for label, a, b in rows:
        print(f"  {label:<56}{plan[a] / 2**30:>8.1f} GiB{plan[b] / 2**30:>8.1f} GiB")
    verdict = {True: "fits", False: "does NOT fit"}
    print(f"  H200: {gpu_gib:.1f} GiB ('141 GB') - {reserve_gib:.1f} GiB reserve = "
          f"{usable / 2**30:.1f} GiB usable: bf16 {verdict[plan['total_bf16'] <= usable]}, "
          f"FP8 kept {verdict[plan['total_fp8'] <= usable]}")
    print("  bf16 = what this reference runs (the FP8 checkpoint is dequantized to bf16 at load);")
    print("  FP8 kept = what vLLM/SGLang run with FP8 matmul kernels; this reference does not "
          "implement it.")
    print(f"world sizes that split {name} evenly; 'seqs' = how many {context:,}-token caches fit "
          "beside the weights:")
    print(f"  {'W':>4}{'bf16 / rank':>15}{'seqs':>7}{'FP8 kept / rank':>19}{'seqs':>7}")
    for w in valid_world_sizes(args, 64):
        p = memory_plan(model, w, 1, context, prefill_chunk)
        row = f"  {w:>4}"
        for kind in ("bf16", "fp8"):
            free = usable - (p["total_" + kind] - p["kv_cache"])  # room left for latent caches
            row += f"{p['total_' + kind] / 2**30:>11.1f} GiB{max(int(free // p['kv_cache']), 0):>7}"
        print(row)
    print("  (a rank that fits 0 sequences cannot run at this context; Moonshot's deployment guide "
          "names 16 GPUs as the smallest FP8 unit at 128K, which leaves room to batch)")
