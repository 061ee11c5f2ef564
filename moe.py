"""Mixture-of-Experts feed-forward of Kimi K2 (DeepSeekMoE with the aux-loss-free sigmoid router).

The math of one MoE layer for a token x (DeepSeek-V3 §2.1.2, arXiv 2412.19437):
    s   = σ(x W_gᵀ)                                    (E,) affinities, fp32
    idx = topk_K(s + b)                                b: correction bias, used only to choose
    w_j = γ · s_j / Σ_{i∈idx} s_i,  j ∈ idx            γ = routed_scaling_factor (K2 2.827)
    Expert(x) = W_down (silu(W_gate x) ⊙ W_up x)       SwiGLU (`swiglu`), shared expert too
    y   = Σ_{j∈idx} w_j · Expert_j(x) + Shared(x)

How it differs from a dense transformer FFN, in the order the forward pass runs:
1. Router (`Gate`): sigmoid affinities s in fp32; the per-expert correction bias b (not trained by
   gradients; moved by muonclip.update_routing_bias_ to balance load) is added ONLY to choose the
   top-k experts; the chosen experts are weighted by their UNBIASED scores, renormalised to sum to
   1 and multiplied by routed_scaling_factor. DeepSeek-V3 first keeps the topk_group best of
   n_group expert groups (group-limited routing); K2 and Moonlight use one group, i.e. a plain
   top-k. (DeepSeek-V3 §2.1.2; DeepSeek-V3 inference/model.py `Gate`.)
2. Routed experts (`Experts`): n_routed_experts small SwiGLU MLPs, stored stacked (E, I, D) so
   they can be run as grouped matmuls and orthogonalised by Muon in one batched call. Each token
   visits num_experts_per_tok of them.
3. Shared expert(s) (`shared_experts`): one SwiGLU MLP every token always goes through, weight 1.

Dispatch — four implementations of one contract (x (N, D), weights (N, K), idx (N, K) -> (N, D)),
the three PyTorch ones built on the one expert formula `swiglu`:
* `moe_reference`: the definition, a loop over the experts that received tokens (the plain twin).
* `moe_grouped`:   sort the (token, slot) pairs by expert once, then each stage (gate/up, down) as
                   ONE grouped matmul over all experts' contiguous segments; one gather, one
                   scatter.
* `moe_segments`:  the same sort, gather and scatter, but expert by expert: all stages of one
                   expert's segment run while its rows are in cache (the reference loop's good
                   habit, without its E scans and gradients).
* "cuda":          the fused kernel from kernels.cu, when built and on a CUDA device.
`pick_expert_impl` is the single place that chooses between them and says why; on a CPU "auto"
picks a sorted path per call from its bytes and this machine's cache size (`cpu_sorted_path`).
tests/test_moe.py holds every path to the reference.

Expert parallelism (parallel.py): with W ranks, rank r holds experts [r·E/W, (r+1)·E/W) and the
shared expert's and dense MLP's hidden units are split W ways. See MoE.forward for how tokens
reach their experts' ranks.

Training: MoE.forward counts each expert's load (read by muonclip.update_routing_bias_) and, when
asked, adds DeepSeek-V3's optional sequence-wise balance loss (`sequence_balance_loss`, at the end
of this file).

References: DeepSeekMoE (arXiv 2401.06066), DeepSeek-V3 §2.1.2 (arXiv 2412.19437), Kimi K2
(arXiv 2507.20534).
Shapes: N tokens (B·T flattened), D hidden, E routed experts, K experts per token, I expert
intermediate size, G expert groups, M = N·K (token, slot) pairs.
"""
from __future__ import annotations

import functools
import glob
import os
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import parallel
from config import ModelArgs


def swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor,
           linear: Callable[[Tensor, Tensor], Tensor] = F.linear) -> Tensor:
    """The expert formula, the one copy every path uses: down(silu(gate x) ⊙ up x).

    x (n, D); gate/up (I, D), down (D, I) in nn.Linear's (out, in) layout -> (n, D). `linear`
    multiplies rows by a weight; moe_grouped passes a grouped matmul over sorted segments, whose
    "weights" are then the (E, ·, ·) stacks.
    """
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)  # (n, I) -> (n, D)


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) ⊙ up(x)). Dense layers (I = intermediate_size) and the shared
    expert.

    Tensor parallelism: each rank holds inter_dim/W hidden units (gate/up rows, down columns) and
    computes a partial output. reduce=True sums the partials here (dense layers); the shared expert
    passes reduce=False because MoE sums its partial together with the routed experts' in one
    all-reduce.
    """

    SHARD_DIMS = {"gate_proj.weight": 0, "up_proj.weight": 0, "down_proj.weight": 1}

    def __init__(self, dim: int, inter_dim: int, reduce: bool = True):
        super().__init__()
        # this rank's hidden units
        inter_dim, _ = parallel.split(inter_dim, "the MLP's intermediate size")
        self.reduce = reduce
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)  # w1 in DeepSeek's naming
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)  # w3
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)  # w2

    def forward(self, x: Tensor) -> Tensor:
        if self.reduce:
            x = parallel.copy_to_ranks(x)
        y = swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)  # (.., D)
        return parallel.reduce_from_ranks(y) if self.reduce else y


# --------------------------------------------------------------------------------------------------
# 1. The router


class Gate(nn.Module):
    """Sigmoid top-k router with the aux-loss-free correction bias. HF names: `mlp.gate.weight`,
    `mlp.gate.e_score_correction_bias`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = (
            args.num_experts_per_tok, args.n_group, args.topk_group)
        self.norm_topk_prob, self.routed_scaling_factor = (
            args.norm_topk_prob, args.routed_scaling_factor)
        # expert centroids
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))  # (E, D)
        # fp32 buffer, not a parameter: no gradient, no optimizer; moved only by the balancing rule
        # (DeepSeek-V3 §2.1.2, auxiliary-loss-free load balancing).
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts))

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the bias: steps of 1e-3 (DeepSeek-V3 §4.2) would
        # vanish in bf16; the released checkpoints store it in fp32
        super()._apply(fn, recurse)
        self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, D) -> weights (N, K) fp32, idx (N, K) int64 (best first), scores (N, E) fp32
        sigmoid affinities."""
        # exercise: router
        # fp32: bf16 rounding must not decide which experts win top-k (HF casts x and W_g to fp32
        # as well)
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # (N, E)
        # the bias is used ONLY to choose experts
        choice = scores + self.e_score_correction_bias  # (N, E)
        if self.n_group > 1:
            # group-limited routing (DeepSeek-V3): keep topk_group groups, the rest -> -inf
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)  # (N, G, E/G)
            # each group's score: the sum of its 2 best experts
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
            keep = group_score.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            # -inf, not 0.0: biased scores can be negative, a 0.0 from a dropped group could win
            # (DeepSeek-V3 inference/model.py `Gate` masks with -inf; transformers' router fills
            # 0.0)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(N, E)
        idx = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(1, idx)  # (N, K) UNBIASED scores of the chosen experts
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)  # HF's epsilon
        return weights * self.routed_scaling_factor, idx, scores
        # end exercise: router


# --------------------------------------------------------------------------------------------------
# 2. The routed experts and the three dispatch paths


class Experts(nn.Module):
    """E routed SwiGLU experts stored stacked. HF checkpoints store them one by one as
    `mlp.experts.{e}.{gate,up,down}_proj.weight`; model.py maps slice [e] of these stacks to those
    names. Under expert parallelism a rank's stack holds experts first_expert .. first_expert +
    num_experts - 1."""

    SHARD_DIMS = {"gate_proj": 0, "up_proj": 0, "down_proj": 0}  # split along the expert dim

    def __init__(self, num_experts: int, dim: int, inter_dim: int, first_expert: int = 0):
        super().__init__()
        self.first_expert = first_expert  # global index of row 0 (0 on a single device)
        self.gate_proj = nn.Parameter(torch.empty(num_experts, inter_dim, dim))  # (E, I, D)
        self.up_proj = nn.Parameter(torch.empty(num_experts, inter_dim, dim))  # (E, I, D)
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, inter_dim))  # (E, D, I)

    @property
    def num_experts(self) -> int:
        return self.gate_proj.shape[0]


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Where a token's K expert outputs are summed: fp32 for bf16/fp16/fp32 inputs (as HF), fp64 for
    fp64 inputs (the exact references of tests/test_kernels.py)."""
    return torch.promote_types(x.dtype, torch.float32)


def moe_reference(x: Tensor, weights: Tensor, idx: Tensor, experts: Experts) -> Tensor:
    """The definition: each token's output is the weighted sum of its K experts.
    x (N, D), weights/idx (N, K) -> (N, D)."""
    # exercise: combine
    # fp32 (fp64 for fp64 inputs): sums K expert outputs per token (HF)
    acc = _acc_dtype(x)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)  # (N, D)
    # unbind once, not stack[e] per expert: the backward of each stack[e] would write a zero-filled
    # (E, ·, ·) gradient of the whole stack, E times per layer; unbind's backward stacks the E
    # pieces once
    gate, up, down = (p.unbind(0) for p in (experts.gate_proj, experts.up_proj, experts.down_proj))
    for e in range(experts.num_experts):
        # which tokens chose expert e, and in which slot
        tok, slot = (idx == e).nonzero(as_tuple=True)  # (n_e,), (n_e,)
        if tok.numel() == 0:  # experts may receive no tokens at all
            continue
        y = swiglu(x[tok], gate[e], up[e], down[e])  # (n_e, D)
        out.index_add_(0, tok, y.to(acc) * weights[tok, slot, None])
    return out.to(x.dtype)
    # end exercise: combine


def _grouped_mm_ok(w: Tensor) -> bool:
    """Whether torch._grouped_mm can multiply (M, In) rows of w's dtype by the stack w (G, Out, In);
    see _grouped_matmul."""
    usable = ((torch.float32, torch.float16, torch.bfloat16) if w.device.type == "cpu"
              else (torch.bfloat16,))
    aligned = all(n * w.element_size() % 16 == 0 for n in (w.shape[1], w.shape[2], w.stride(1)))
    return hasattr(torch, "_grouped_mm") and w.dtype in usable and aligned


def _grouped_matmul(a: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Rows of `a` (M, In) sorted by group, group g has counts[g] rows; w (G, Out, In).
    -> (M, Out), row r @ w[g(r)]ᵀ."""
    # torch._grouped_mm takes fp32/fp16/bf16 on a CPU and bf16 on CUDA (not fp64), and needs
    # 16-byte-aligned row strides ("strides should be multiple of 16 bytes"): In and Out (D and I)
    # must be multiples of 4 fp32 / 8 bf16 numbers — Out too, because the backward multiplies by
    # the (M, Out) gradient. Anything else takes the loop below.
    if a.dtype == w.dtype and _grouped_mm_ok(w):
        # end offset of every group (empty groups repeat an offset)
        offs = counts.cumsum(0).to(torch.int32)  # (G,)
        return torch._grouped_mm(a, w.transpose(1, 2), offs=offs)  # (M, Out)
    # fallback: one matmul per contiguous segment (no gathers: the rows are already sorted);
    # unbind, not w[g], so that the backward does not write a zero-filled gradient of the whole
    # stack per group
    parts, ws = torch.split(a, counts.tolist()), w.unbind(0)
    return torch.cat([F.linear(p, ws[g]) for g, p in enumerate(parts)], dim=0)  # (M, Out)


def _moe_few_pairs(x: Tensor, weights: Tensor, flat: Tensor, experts: Experts) -> Tensor:
    """moe_grouped's small-batch case (decode): one SwiGLU per (token, slot) pair, reading the
    chosen expert's matrices in place — no grouping, no copy of any weight; only the K experts a
    token uses are touched. x (N, D), weights (N, K), flat (M,) expert of each pair -> (N, D)."""
    N, K = weights.shape
    gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
    # training: unbind once (see moe_reference); decode indexes, as E views per stack would cost
    # more there
    if torch.is_grad_enabled() and gate.requires_grad:
        gate, up, down = gate.unbind(0), up.unbind(0), down.unbind(0)
    # N views (1, D), one op; pair p = n·K + k reads token n's row
    rows = x.split(1)
    y = torch.cat([swiglu(rows[p // K], gate[e], up[e], down[e])
                   for p, e in enumerate(flat.tolist())])  # (M, D)
    # routing weight per pair, fp32 accumulation as the reference
    y = y.to(_acc_dtype(x)) * weights.reshape(-1, 1)  # (M, D)
    return y.view(N, K, -1).sum(1).to(x.dtype)  # (N, D)


def moe_grouped(x: Tensor, weights: Tensor, idx: Tensor, experts: Experts) -> Tensor:
    """Same contract as moe_reference; sorts (token, slot) pairs by expert and runs grouped matmuls
    over the segments."""
    N, K = idx.shape
    flat = idx.reshape(-1)  # (M,) expert of each (token, slot) pair, M = N·K
    if N * K <= experts.num_experts:
        # decode: fewer pairs than experts, most groups would be empty
        return _moe_few_pairs(x, weights, flat, experts)
    # pairs grouped by expert, token order kept inside a group
    order = flat.argsort(stable=True)  # (M,)
    counts = torch.bincount(flat, minlength=experts.num_experts)  # (E,) pairs per expert, 0 allowed
    tok = order // K  # (M,) token of each sorted pair
    h = x[tok]  # (M, D) the only gather: input rows, expert-sorted
    y = swiglu(h, experts.gate_proj, experts.up_proj, experts.down_proj,
               linear=lambda a, w: _grouped_matmul(a, w, counts))  # (M, D)
    # routing weight per pair, fp32 as the reference
    acc = _acc_dtype(x)
    y = y.to(acc) * weights.reshape(-1)[order, None]  # (M, D)
    if x.device.type == "cpu":
        # the only scatter: each pair's row added into its token's row, in expert order as the
        # reference loop adds them (a CPU adds serially, so the sum is deterministic); fp32
        # accumulation as the reference
        out = torch.zeros(N, x.shape[1], dtype=acc, device=x.device)
        return out.index_add_(0, tok, y).to(x.dtype)  # (N, D)
    # on a GPU index_add_ adds a token's K rows with atomics in any order: place each row once,
    # then sum the K
    out = torch.zeros(N * K, x.shape[1], dtype=acc, device=x.device)
    # back to (token, slot) order; each row written once, so the sum below is deterministic
    out[order] = y  # (M, D)
    return out.view(N, K, -1).sum(1).to(x.dtype)  # (N, D)


def moe_segments(x: Tensor, weights: Tensor, idx: Tensor, experts: Experts) -> Tensor:
    """Same contract as moe_reference; moe_grouped's sort, gather and scatter, with the experts run
    one by one on their contiguous segments, all three matmuls of an expert before the next (small
    working set per expert)."""
    N, K = idx.shape
    flat = idx.reshape(-1)  # (M,)
    if N * K <= experts.num_experts:
        # decode: fewer pairs than experts (see moe_grouped)
        return _moe_few_pairs(x, weights, flat, experts)
    order = flat.argsort(stable=True)  # (M,) pairs grouped by expert
    counts = torch.bincount(flat, minlength=experts.num_experts).tolist()  # (E,) pairs per expert
    tok = order // K  # (M,) token of each sorted pair
    w = weights.reshape(-1)[order, None]  # (M, 1) routing weight of each sorted pair
    # split (views; one cat in backward) and unbind, never [e]: indexing would build a full-size
    # gradient per expert. E pieces of (n_e, D), (n_e,), (n_e, 1):
    rows, toks, ws = x[tok].split(counts), tok.split(counts), w.split(counts)
    gate, up, down = (p.unbind(0) for p in (experts.gate_proj, experts.up_proj, experts.down_proj))
    acc = _acc_dtype(x)
    out = torch.zeros(N, x.shape[1], dtype=acc, device=x.device)  # (N, D)
    for e, n_e in enumerate(counts):
        if n_e == 0:
            continue
        y = swiglu(rows[e], gate[e], up[e], down[e])  # (n_e, D)
        # fp32, the reference's arithmetic in its order
        out.index_add_(0, toks[e], y.to(acc) * ws[e])  # (N, D)
    return out.to(x.dtype)


# The fused CUDA kernel (kernels.cu, built by setup.py when nvcc and a CUDA torch are present).
# Tried once, here.
try:
    import kimi_k2_kernels as _ext
    _EXT_WHY = "CUDA kernels built"
except ImportError as err:
    _ext, _EXT_WHY = None, f"CUDA kernels not built ({err})"

EXPERT_IMPLS = ("reference", "grouped", "segments", "cuda")
SORTED_PATHS = {"grouped": moe_grouped, "segments": moe_segments}

# How a CPU chooses between the two sorted paths. They do the same FLOPs and differ in memory
# traffic and call count:
# - moe_grouped makes a few passes over whole (pairs, D) arrays with few, large calls (cheap while
#   those arrays stay in cache; Python overhead independent of E);
# - moe_segments makes the same passes one expert's (n_e, D) piece at a time (in cache at any batch
#   size, but ~10 calls per expert, forward and backward).
# So the rule is a byte count against THIS machine's largest cache as the OS reports it
# (`_cache_bytes`), not a constant: moe_grouped while its gathered rows (input dtype) and fp32
# weighted outputs — and in training their gradients, twice the bytes — fit in the last-level
# cache, moe_segments beyond.
# Measured forward + backward on a 2-core AMD EPYC with 32 MiB of L3 (bench_moe.py --backward):
# grouped 1.4-1.9x faster at 64 tokens, segments 1.05-1.5x faster at 4,096 tokens, on cpu-small
# and the D 256 / 512, 32 / 64-expert layers of bench_model.py's sweep; the rule puts the switch
# at 1,000-2,700 tokens there, and near the switch the two differ by a few percent.
# Why a rule and not a timing of both paths: the choice must be the same in every process on a
# machine. The two sorted paths agree to rounding, not to the bit (BLAS sums in an order that can
# depend on a buffer's address), and a resumed training run has to repeat the uninterrupted one
# exactly (tests/test_train.py); a timing on a busy machine could flip between runs.
@functools.lru_cache(maxsize=None)
def _cache_bytes() -> int:
    """Bytes of this CPU's largest cache (usually the shared L3), from sysconf or Linux sysfs; 0 if
    neither says."""
    sizes = []
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            sizes.append(int(os.sysconf(name)))
        except (ValueError, OSError):  # not a name this platform knows
            pass
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):  # e.g. "32768K"
        with open(f) as fh:
            text = fh.read().strip()
        scale = {"K": 1024, "M": 1024**2}.get(text[-1:], 1)
        if text.rstrip("KM").isdigit():
            sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=0)


def cpu_sorted_path(x: Tensor, idx: Tensor, experts: Experts) -> tuple[str, str]:
    """The sorted path for this call on a CPU, and why (see the comment above). Same arguments, same
    answer."""
    params = (experts.gate_proj, experts.up_proj, experts.down_proj)
    if not (x.dtype == params[0].dtype and all(_grouped_mm_ok(p) for p in params)):
        return "segments", ("no torch._grouped_mm for this dtype or width: moe_grouped would loop "
                            "over the experts too")
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    # gathered rows and fp32 outputs (and their gradients)
    live = idx.numel() * x.shape[1] * (x.element_size() + 4) * (2 if grad else 1)
    cache = _cache_bytes()
    if cache == 0:
        return "grouped", ("the OS does not report a cache size; grouped, the faster path at "
                           "small batches")
    fits = live <= cache
    return ("grouped" if fits else "segments"), (
        f"{live / 2**20:.1f} MiB of sorted arrays {'fit' if fits else 'exceed'} the "
        f"{cache / 2**20:.0f} MiB cache")


def pick_expert_impl(requested: str, device: torch.device,
                     dtype: torch.dtype = torch.bfloat16) -> tuple[str, str]:
    """The single place that chooses the expert path. requested: "auto" | "reference" | "grouped" |
    "segments" | "cuda"; the environment variable KIMI_EXPERT_IMPL overrides "auto". On a CPU
    "auto" stays "auto": run_experts then picks a sorted path per call by its size
    (cpu_sorted_path). Returns (impl, reason)."""
    if requested == "auto":
        requested = os.environ.get("KIMI_EXPERT_IMPL", "auto")
    if requested not in EXPERT_IMPLS + ("auto",):
        raise ValueError(f"expert impl must be one of auto, {', '.join(EXPERT_IMPLS)}; "
                         f"got {requested!r}")
    if requested == "cuda" and (_ext is None or device.type != "cuda"):
        why = _EXT_WHY if _ext is None else f"device is {device.type}"
        raise RuntimeError(f"expert impl 'cuda' requested, but {why}; rebuild with "
                           "KIMI_BUILD_CUDA=1 on a GPU machine")
    if requested != "auto":
        return requested, "requested explicitly"
    if device.type == "cuda":
        if _ext is None:
            return "grouped", _EXT_WHY
        if dtype != torch.bfloat16:
            dtype_name = str(dtype).removeprefix("torch.")
            return "grouped", f"the fused kernel is bf16-only and the model is {dtype_name}"
        return "cuda", "kernels built, device is CUDA, dtype bf16"
    if device.type != "cpu":
        return "grouped", f"device is {device.type}"
    return "auto", (f"device is cpu: grouped while the sorted arrays fit the "
                    f"{_cache_bytes() / 2**20:.0f} MiB cache, segments beyond")


class FusedExperts(torch.autograd.Function):
    """Forward: the fused kernel of kernels.cu (bf16 in/out, fp32 accumulation, deterministic).
    Backward: recompute moe_grouped under autograd from the saved inputs — the PyTorch path defines
    the gradient, so training on a GPU can use the kernel without a hand-written backward."""

    @staticmethod
    def forward(ctx, x, weights, idx, gate_proj, up_proj, down_proj):
        ctx.save_for_backward(x, weights, idx, gate_proj, up_proj, down_proj)
        return _ext.moe_forward(x.contiguous(), idx, weights.float().contiguous(),
                                gate_proj, up_proj, down_proj)

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, idx, gate, up, down = ctx.saved_tensors
        needs = [ctx.needs_input_grad[i] for i in (0, 1, 3, 4, 5)]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n)
                      for t, n in zip((x, weights, gate, up, down), needs)]
            # the same three stacks, as leaves of this small graph (moe_grouped reads only these
            # attributes)
            stand_in = SimpleNamespace(gate_proj=leaves[2], up_proj=leaves[3], down_proj=leaves[4],
                                       num_experts=gate.shape[0])
            out = moe_grouped(leaves[0], leaves[1], idx, stand_in)
            wanted = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
        gx, gw, gg, gu, gd = (next(grads) if t.requires_grad else None for t in leaves)
        return gx, gw, None, gg, gu, gd


def run_experts(impl: str, x: Tensor, weights: Tensor, idx: Tensor, experts: Experts) -> Tensor:
    """Dispatch to the chosen implementation; all share the contract of moe_reference. "auto" is
    resolved here, per call, because on a CPU the faster sorted path depends on the call's size
    (cpu_sorted_path)."""
    if impl == "auto":
        impl = pick_expert_impl("auto", x.device, x.dtype)[0]
        if impl == "auto":
            few_pairs = idx.numel() <= experts.num_experts
            impl = "grouped" if few_pairs else cpu_sorted_path(x, idx, experts)[0]
    if impl == "reference":
        return moe_reference(x, weights, idx, experts)
    if impl in SORTED_PATHS:
        return SORTED_PATHS[impl](x, weights, idx, experts)
    if impl == "cuda":
        return FusedExperts.apply(x, weights, idx,
                                  experts.gate_proj, experts.up_proj, experts.down_proj)
    raise ValueError(f"unknown expert impl {impl!r}")


# --------------------------------------------------------------------------------------------------
# 3. The MoE layer


class MoE(nn.Module):
    """Router + routed experts + shared expert(s) of one layer. HF names: `mlp.gate`,
    `mlp.experts`, `mlp.shared_experts`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Gate(args)  # replicated: every rank routes every token, identically
        # this rank's experts
        n_local, first = parallel.split(args.n_routed_experts, "n_routed_experts")
        self.experts = Experts(n_local, args.hidden_size, args.moe_intermediate_size, first)
        # the shared experts are one MLP of width I·S (Moonlight: 2 × 1408 = 2816); reduced below,
        # with the routed sum
        shared_width = args.moe_intermediate_size * args.n_shared_experts
        self.shared_experts = MLP(args.hidden_size, shared_width, reduce=False)
        # pick_expert_impl ("auto": chosen per call); set per model with Transformer.set_expert_impl
        self.impl = "auto"
        # tokens routed to each expert during training forwards since the last reset (read by the
        # bias update)
        self.register_buffer("expert_load", torch.zeros(args.n_routed_experts), persistent=False)
        # optional complementary sequence-wise balance loss (DeepSeek-V3 §2.1.2): off by default;
        # 1e-4 (DeepSeek-V3 §4.2) when on.
        # The trainer sets seq_aux_alpha and adds up `aux_loss` over the MoE layers.
        self.seq_aux_alpha, self.aux_loss = 0.0, None

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, D) -> (B, T, D).

        Expert parallelism, the all-reduce scheme: every rank already holds all N tokens (the
        attention all-reduce left them there) and routes them identically, so no token has to
        travel. Each rank runs only the (token, slot) pairs that chose one of its own experts, and
        ONE all-reduce sums routed and shared partial outputs.
        Why this rather than DeepSeek-V3's all-to-all dispatch (§3.2): all-to-all pays off when the
        ranks hold DIFFERENT tokens (data-parallel attention), sending each token only to the <= K
        ranks that need it. Here tokens are replicated by tensor-parallel attention, so there is
        nothing to dispatch; the all-reduce is the same collective every other layer uses, has
        fixed-size buffers (all-to-all first exchanges per-rank counts, then variable-sized token
        lists) and is deterministic. At K2's K = 8 on W = 16 ranks the bytes are even similar: a
        ring all-reduce moves about 2·N·D per rank, dispatch + combine about 2·N·D·K/W = N·D.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        # the same on every rank: idx holds global expert ids
        weights, idx, scores = self.gate(x)  # (N, K), (N, K), (N, E)
        if self.training:
            # load and balance loss over ALL experts, identical on every rank (no communication)
            with torch.no_grad():
                load = torch.bincount(idx.flatten(), minlength=self.expert_load.numel())  # (E,)
                self.expert_load += load.float()
            if self.seq_aux_alpha > 0:
                B, T = shape[0], shape[1]
                self.aux_loss = sequence_balance_loss(scores.view(B, T, -1), idx.view(B, T, -1),
                                                      scores.shape[-1], idx.shape[-1],
                                                      self.seq_aux_alpha)
        # where the replicated tokens and routing weights enter this rank's experts (identity
        # forward; parallel.py)
        x, weights = parallel.copy_to_ranks(x), parallel.copy_to_ranks(weights)
        first, n_local = self.experts.first_expert, self.experts.num_experts
        if n_local == self.expert_load.numel():
            # this rank holds every expert (one device): the (N, K) batch as is
            y = run_experts(self.impl, x, weights, idx, self.experts)  # (N, D)
        else:
            # expert parallelism: only the pairs routed to experts first .. first + n_local - 1
            mine = (idx >= first) & (idx < first + n_local)  # (N, K)
            tok, slot = mine.nonzero(as_tuple=True)  # (n,), (n,)
            # fp32: a token's K outputs sum here
            y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # (N, D)
            if tok.numel():  # a rank may receive no pairs at all
                # one pair per row (K = 1), local expert ids
                y_mine = run_experts(self.impl, x[tok], weights[tok, slot, None],
                                     idx[tok, slot, None] - first, self.experts)  # (n, D)
                y = y.index_add(0, tok, y_mine.float())  # (N, D)
        # shared expert: weight 1 (under TP, this rank's partial sum of it)
        y = y + self.shared_experts(x)  # (N, D)
        # sum over ranks; identity on one device
        return parallel.reduce_from_ranks(y).to(x.dtype).view(shape)  # (B, T, D)


# --------------------------------------------------------------------------------------------------
# 4. The optional sequence-wise balance loss (training only; MoE.forward adds it when asked)

# DeepSeek-V3 §4.2 (alpha = 0.0001); the configs' aux_loss_alpha = 0.001 differs
SEQ_AUX_ALPHA = 1e-4


def sequence_balance_loss(scores: Tensor, idx: Tensor, n_experts: int, top_k: int,
                          alpha: float = SEQ_AUX_ALPHA) -> Tensor:
    """Complementary sequence-wise balance loss (DeepSeek-V3 §2.1.2), averaged over the N sequences.

    scores (N, T, E): unbiased sigmoid router scores (fp32, with grad); idx (N, T, K): the experts
    each token was routed to. L = alpha · Σ_i f_i·P_i with f_i = E/(K·T)·#{t: i in idx_t} (no
    gradient) and P_i the mean over t of the scores renormalised over all E experts. Equals alpha at
    perfect balance. Off by default in the reference.
    """
    N, T, E = scores.shape
    assert E == n_experts and idx.shape == (N, T, top_k), \
        f"scores {tuple(scores.shape)}, idx {tuple(idx.shape)}"
    s = scores.float()  # fp32: a mean over E·T small numbers
    P = (s / s.sum(-1, keepdim=True)).mean(1)  # (N, E)
    ones = torch.ones(N, T * top_k, device=s.device)
    # (N, E) tokens routed to each expert
    counts = torch.zeros(N, E, device=s.device).scatter_add_(1, idx.reshape(N, T * top_k), ones)
    f = counts * (E / (top_k * T))  # (N, E), 1 everywhere at perfect balance
    return alpha * (f * P).sum(-1).mean()
