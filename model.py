"""Kimi K2: the whole network, embedding -> 61 blocks -> norm -> head.

The forward pass, a pre-norm residual decoder (DeepSeek-V3 §2, arXiv 2412.19437), layers
l = 0 .. L-1:
    h      = Embed(tokens)                                 (B, T, D)
    h      = h + MLA(RMSNorm(h))                           attention.py
    h      = h + FFN_l(RMSNorm(h))                         dense MLP for l < first_k_dense_replace,
                                                           MoE after (moe.py)
    logits = lm_head(RMSNorm(h))                           (B, T, V) fp32

Kimi K2 is architecturally DeepSeek-V3 (its config.json names `architectures:
["DeepseekV3ForCausalLM"]`): a pre-norm decoder of 61 blocks, each Multi-head Latent Attention
(attention.py) followed by an FFN that is a dense SwiGLU MLP for the first `first_k_dense_replace`
= 1 layer and a Mixture-of-Experts (moe.py: 384 routed experts, 8 per token, plus 1 shared) for the
other 60. Then a final RMSNorm and an untied lm_head. No biases, no dropout, no embedding scaling.
What differs from DeepSeek-V3 is configuration only (config.py): 64 heads instead of 128, 384
experts instead of 256, one dense layer instead of three, a single expert group, rope_theta 50000,
YaRN factor 32, vocab 163,840.

This file:
* `Transformer`: `model(tokens)` gives fp32 logits, `model(tokens, cache)` decodes incrementally
  against MLA's latent cache (attention.KVCache). State-dict names are the HF checkpoint's.
* `Transformer.from_pretrained` / `save_pretrained`: the HF safetensors layout, read and written by
  checkpoint.py (sharded, FP8 dequantized on load, crash-safe saves).
* `param_report` and `python model.py --config kimi-k2`: parameter counts and KV-cache sizes on the
  meta device (no memory); `--plan --world-size 16` prints the memory each of 16 GPUs needs
  (parallel.memory_plan).
* Tensor + expert parallelism (parallel.py) lives inside these same modules: under `torchrun` each
  rank builds only its share (`Transformer.shard_dims()` says which tensors are split and along
  which dim), `from_pretrained` reads only that share, and the logits are the full (B, T, V) on
  every rank.
The configuration (`ModelArgs`, `PRESETS`, `load_args`) lives in config.py and is re-exported here.

References: DeepSeek-V3 (arXiv 2412.19437), Kimi K2 (arXiv 2507.20534), Kimi-K2-Instruct
config.json (Hugging Face, July 2025).
Shapes: B batch, T tokens, D hidden, V vocab, L layers, E routed experts, K experts per token.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import checkpoint
import parallel
from attention import MLA, KVCache, RMSNorm, rope_cos_sin, rope_parameters
# re-exported: callers and tests use model.ModelArgs, model.load_args, model.PRESETS, ...
from config import (PRESETS, ModelArgs, kv_cache_bytes_per_token, load_args,  # noqa: F401
                    valid_world_sizes, world_size_problems)
from moe import MLP, MoE, pick_expert_impl


# --------------------------------------------------------------------------------------------------
# The network


class ParallelEmbedding(nn.Module):
    """Token embedding whose vocabulary rows are split across ranks (DeepSeek-V3
    inference/model.py). ids (B, T) -> (B, T, D). Each rank looks up the ids it owns, writes zeros
    for the others, and an all-reduce fills them in."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        # this rank's vocabulary rows
        self.num_rows, self.first_row = parallel.split(vocab_size, "vocab_size")
        self.weight = nn.Parameter(torch.empty(self.num_rows, dim))  # (V/W, D)
        # as nn.Embedding does, so a seed gives the same random model as before
        nn.init.normal_(self.weight)

    def forward(self, ids: Tensor) -> Tensor:
        if parallel.world_size() == 1:
            return F.embedding(ids, self.weight)  # (B, T, D), what nn.Embedding does
        mine = (ids >= self.first_row) & (ids < self.first_row + self.num_rows)  # (B, T) owned ids
        h = F.embedding(torch.where(mine, ids - self.first_row, 0), self.weight)  # (B, T, D)
        # each id's row from its owner
        return parallel.reduce_from_ranks(h.masked_fill(~mine[..., None], 0.0))  # (B, T, D)


class Block(nn.Module):
    """Pre-norm residual block: x + MLA(norm(x)), then x + FFN(norm(x)); FFN is a dense MLP or the
    MoE."""

    def __init__(self, layer: int, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = (MoE(args) if args.is_moe_layer(layer)
                    else MLP(args.hidden_size, args.intermediate_size))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int,
                attn_impl: str) -> Tensor:
        h = self.input_layernorm(x)  # (B, T, D)
        x = x + self.self_attn(h, cos, sin, cache, layer, attn_impl)  # (B, T, D)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, D)


class Transformer(nn.Module):
    """Kimi K2 / DeepSeek-V3 decoder. State-dict names are the HF checkpoint's
    (`model.layers.3.self_attn.q_a_proj.weight`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        problems = world_size_problems(args, parallel.world_size())
        # one message naming every field, before any module raises about just one of them
        if problems:
            raise ValueError(f"world size {parallel.world_size()} does not divide "
                             f"{', '.join(problems)}; world sizes that work for this config: "
                             f"{valid_world_sizes(args, 64)}")
        self.model = nn.ModuleDict(dict(
            embed_tokens=ParallelEmbedding(args.vocab_size, args.hidden_size),
            layers=nn.ModuleList(Block(i, args) for i in range(args.num_hidden_layers)),
            norm=RMSNorm(args.hidden_size, args.rms_norm_eps),
        ))
        # untied from embed_tokens; under TP each rank holds V/W rows and the logits are
        # all-gathered in forward
        vocab_rows = parallel.split(args.vocab_size, "vocab_size")[0]
        self.lm_head = nn.Linear(args.hidden_size, vocab_rows, bias=False)
        inv_freq, self.rope_mult = rope_parameters(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (Dr/2,) never stored
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as HF DeepseekV3: N(0, initializer_range) for every matrix, norms 1, routing
        bias 0.

        Under parallelism every rank draws each FULL matrix from the same stream and keeps its slice
        (seed every rank alike), so replicated tensors agree across ranks and split ones are slices
        of one N(0, std) draw. It is not the one-device model of the same seed (module constructors
        draw from the stream for their own, smaller shapes first); to start W ranks from a
        one-device model, save it and load it with from_pretrained.
        """
        std = self.args.initializer_range
        dims = self.shard_dims()
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            full_shape = list(p.shape)
            if name in dims:
                full_shape[dims[name]] *= parallel.world_size()
            full = torch.empty(full_shape, device=p.device, dtype=p.dtype).normal_(0.0, std)
            p.copy_(parallel.local_slice(full, dims.get(name)))
        self.reset_buffers()

    def shard_dims(self) -> dict[str, int]:
        """State-dict names of the tensors split across ranks -> the dim they are split along; every
        other tensor is replicated (the same on every rank). Expert stacks are split along dim 0,
        the expert dim. Read by loading, saving, the memory plan, and optimizers that need whole
        matrices (Muon: parallel.gather_full)."""
        dims = {"model.embed_tokens.weight": 0, "lm_head.weight": 0}
        names = set(self.state_dict())
        for prefix, m in self.named_modules():
            for local, dim in getattr(m, "SHARD_DIMS", {}).items():
                if f"{prefix}.{local}" in names:
                    dims[f"{prefix}.{local}"] = dim
        return dims

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the RoPE frequencies: angles reach 128K·inv_freq
        # radians, and a bf16 inv_freq (8 mantissa bits) would misplace every position beyond a few
        # hundred. Recomputed in fp32.
        super()._apply(fn, recurse)
        self.inv_freq.data = rope_parameters(self.args)[0].to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the buffers that are never stored in a checkpoint (RoPE frequencies, training
        statistics)."""
        self.inv_freq.copy_(rope_parameters(self.args)[0])
        for m in self.modules():
            if isinstance(m, MLA):
                m.max_logits.fill_(float("-inf"))
            elif isinstance(m, MoE):
                m.expert_load.zero_()

    def set_expert_impl(self, impl: str) -> str:
        """Choose the routed-expert path for every MoE layer ("auto" | "reference" | "grouped" |
        "cuda"); returns why."""
        p = self.lm_head.weight
        impl, why = pick_expert_impl(impl, p.device, p.dtype)
        for m in self.modules():
            if isinstance(m, MoE):
                m.impl = impl
        return f"{impl} ({why})"

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, attn_impl: str | None = None,
                last_only: bool = False) -> Tensor:
        """input_ids (B, T) int -> logits (B, T, V) fp32 (or (B, 1, V) with last_only).

        Without a cache the T tokens sit at positions 0..T-1. With a cache they continue it at
        cache.pos.., their latents are appended and cache.pos advances by T. attn_impl: "naive" |
        "absorb"; default absorbed for single-token decode against a cache (reads only the latent),
        naive otherwise (cheaper for many queries).
        """
        self._check_inputs(input_ids, cache)
        T = input_ids.shape[1]
        start = 0 if cache is None else cache.pos
        if attn_impl is None:
            attn_impl = "absorb" if cache is not None and T == 1 else "naive"
        positions = torch.arange(start, start + T, device=input_ids.device)  # absolute positions
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_mult)  # (T, Dr/2) fp32
        h = self.model.embed_tokens(input_ids)  # (B, T, D), no sqrt(D) scaling
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, cache, i, attn_impl)  # (B, T, D)
        if cache is not None:
            cache.pos += T
        if last_only:
            h = h[:, -1:]  # (B, 1, D)
        logits = self.lm_head(parallel.copy_to_ranks(self.model.norm(h)))  # (B, T, V/W) own rows
        return parallel.gather_from_ranks(logits, dim=-1).float()  # (B, T, V) fp32 on every rank

    def _check_inputs(self, input_ids: Tensor, cache: KVCache | None) -> None:
        """A clear error for ids the network cannot take, before any layer runs."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be a (batch, seq) integer tensor, got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids is empty: pass at least one token")
        V = self.args.vocab_size
        hint = "is the tokenizer the one this model was trained with?"
        if input_ids.is_cuda:
            # reading min/max back would stall every decode step on a device-to-host copy. The
            # assert runs on the GPU and fails the next synchronizing call as a device-side
            # assertion (which, like an out-of-range embedding lookup, ends the CUDA context;
            # recent PyTorch versions print this message with it)
            in_range = ((input_ids >= 0) & (input_ids < V)).all()
            torch._assert_async(in_range, f"token ids must be in [0, vocab_size={V}); {hint}")
        else:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"token ids must be in [0, vocab_size={V}), got [{lo}, {hi}]; "
                                 f"{hint}")
        start = 0 if cache is None else cache.pos
        if start + T > self.args.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_position_embeddings="
                             f"{self.args.max_position_embeddings}; shorten the input")
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds batch {cache.batch_size}, input has batch {B}")
            if start + T > cache.max_len:
                raise ValueError(f"cache is full: {start} cached + {T} new > max_len "
                                 f"{cache.max_len}; allocate a longer KVCache")

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty latent cache on this model's device and dtype (default length: the whole
        context)."""
        p = self.lm_head.weight
        max_len = max_len or self.args.max_position_embeddings
        return KVCache(self.args, batch_size, max_len, p.device, p.dtype)

    # ----------------------------------------------------------------------------------------------
    # Hugging Face checkpoints (the format itself: checkpoint.py)

    def checkpoint_names(self) -> dict[str, tuple[str, int | None]]:
        """Every checkpoint tensor name of the FULL model -> (our state-dict name, expert index or
        None): the routed experts are one tensor per expert on disk, stacked here."""
        return checkpoint.checkpoint_names(self)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "Transformer":
        """Load a HF-format directory: config.json + model.safetensors, or shards with
        model.safetensors.index.json.

        Tensors are read one at a time (never the whole file), FP8 weights (e4m3; e5m2 too) are
        dequantized with their block `weight_scale_inv` (128x128, or quantization_config's
        weight_block_size), `*.rotary_emb.inv_freq` and MTP layers (index >= num_hidden_layers) are
        ignored. Any missing, unexpected or mis-shaped tensor is an error that names all of them.
        dtype: default = the checkpoint's embedding dtype.

        Under parallelism (parallel.init, e.g. from torchrun) each rank allocates only its share and
        reads only that from disk: its own experts' tensors and its rows/columns of the split
        matrices (safetensors slices; an FP8 slice is dequantized with the scale blocks it
        overlaps). `model.load_report` holds the bytes this rank read. If loading fails on any rank,
        every rank raises (parallel.check_all_ok) instead of waiting for the others.
        """
        return checkpoint.from_pretrained(cls, path, device, dtype)

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 2 << 30,
                        extra: Callable[[Path], None] | None = None) -> None:
        """Write config.json + safetensors (sharded with an index above max_shard_bytes),
        atomically.

        Everything is written into a temporary sibling directory first (`extra(tmp_dir)` may add
        files, e.g. the optimizer state), then swapped in with renames, so an interrupted save never
        leaves a half-written checkpoint at `path`. Files already in `path` that this call does not
        write (a tokenizer) are carried over. Under parallelism every rank calls it: the split
        tensors are gathered (one at a time, but rank 0 then holds the whole model in CPU memory:
        fine for small models, not for K2) and rank 0 writes the usual HF layout.
        """
        checkpoint.save_pretrained(self, path, max_shard_bytes, extra)


# --------------------------------------------------------------------------------------------------
# Parameter and cache accounting (python model.py --config kimi-k2)


def param_report(args: ModelArgs) -> dict[str, int]:
    """Count parameters by kind on the meta device (no memory). Includes the routing-bias buffers
    (model.layers.{l}.mlp.gate.e_score_correction_bias, stored in the checkpoint)."""
    with torch.device("meta"):
        model = Transformer(args)
    kinds = dict(embedding=0, attention=0, norms=0, dense_mlp=0, router=0, routed_experts=0,
                 shared_experts=0, head=0)
    for name, t in model.state_dict().items():
        n = t.numel()
        if name.startswith("model.embed_tokens"):
            kinds["embedding"] += n
        elif name.startswith("lm_head"):
            kinds["head"] += n
        elif ".self_attn." in name:
            kinds["attention"] += n  # includes the two latent norms
        elif ".mlp.experts." in name:
            kinds["routed_experts"] += n
        elif ".mlp.shared_experts." in name:
            kinds["shared_experts"] += n
        elif ".mlp.gate." in name:
            kinds["router"] += n
        elif ".mlp." in name:
            kinds["dense_mlp"] += n
        else:
            kinds["norms"] += n  # input/post-attention norms and the final norm
    total = sum(kinds.values())
    # a token uses K of the E routed experts in each MoE layer; everything else is always active
    active_experts = kinds["routed_experts"] * args.num_experts_per_tok // args.n_routed_experts
    return dict(kinds, total=total, active=total - kinds["routed_experts"] + active_experts,
                active_routed_experts=active_experts)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.2f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return ""


def main() -> None:
    p = argparse.ArgumentParser(description="Print a Kimi K2 config's parameter counts and "
                                "KV-cache sizes, or with --plan the memory per GPU (meta device: "
                                "no memory is allocated).")
    p.add_argument("--config", default="kimi-k2",
                   help=f"a preset ({', '.join(PRESETS)}) or a config.json path")
    p.add_argument("--context", type=int, default=131072,
                   help="context length for the KV-cache sizes")
    # --- memory plan for tensor + expert parallelism (parallel.py)
    p.add_argument("--plan", action="store_true",
                   help="print the memory one rank needs instead of the counts")
    p.add_argument("--world-size", type=int, default=16,
                   help="ranks (GPUs) the model is split over, for --plan")
    p.add_argument("--batch", type=int, default=1,
                   help="sequences in flight, each with a --context cache (--plan)")
    p.add_argument("--prefill-chunk", type=int, default=8192,
                   help="tokens per prefill forward, as generate.PREFILL_CHUNK (--plan's "
                        "activation estimate)")
    p.add_argument("--gpu-gib", type=float, default=parallel.H200_GIB,
                   help="memory per GPU (default: an H200)")
    a = p.parse_args()
    for flag in ("context", "world_size", "batch", "prefill_chunk", "gpu_gib"):
        if not getattr(a, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(a, flag)}")
    args = load_args(a.config)
    if a.plan:
        with torch.device("meta"):
            model = Transformer(args)  # shapes only: shard_dims says which tensors the ranks split
        return parallel.print_memory_plan(model, a.config, a.world_size, a.batch, a.context,
                                          a.prefill_chunk, a.gpu_gib)
    r = param_report(args)
    print(f"config: {a.config}  ({args.num_hidden_layers} layers, hidden {args.hidden_size}, "
          f"{args.num_attention_heads} heads, {args.n_routed_experts} experts "
          f"top-{args.num_experts_per_tok} + {args.n_shared_experts} shared, "
          f"vocab {args.vocab_size})")
    print(f"{'parameters':<34}{'total':>20}{'activated per token':>22}")
    rows = [("embedding", r["embedding"], r["embedding"]),
            ("attention (MLA, incl. latent norms)", r["attention"], r["attention"]),
            ("block + final norms", r["norms"], r["norms"]),
            ("dense MLP", r["dense_mlp"], r["dense_mlp"]),
            ("router (weight + bias)", r["router"], r["router"]),
            ("routed experts", r["routed_experts"], r["active_routed_experts"]),
            ("shared experts", r["shared_experts"], r["shared_experts"]),
            ("lm_head", r["head"], r["head"])]
    for name, tot, act in rows:
        print(f"  {name:<32}{tot:>20,}{act:>22,}")
    print(f"  {'TOTAL':<32}{r['total']:>20,}{r['active']:>22,}")
    emb = r["embedding"] + r["head"]
    print(f"  {'excluding embedding + head':<32}{r['total'] - emb:>20,}{r['active'] - emb:>22,}")
    print(f"weights in bf16: {_fmt_bytes(2 * r['total'])}  "
          f"(FP8 e4m3: about {_fmt_bytes(r['total'])} + block scales)")
    mla, mha = kv_cache_bytes_per_token(args)
    print(f"KV cache, bf16, all layers:    per token         at {a.context:,} tokens")
    print(f"  MLA latent (c_kv + k_pe)     {_fmt_bytes(mla):>14}   "
          f"{_fmt_bytes(mla * a.context):>14}")
    print(f"  multi-head K/V equivalent    {_fmt_bytes(mha):>14}   "
          f"{_fmt_bytes(mha * a.context):>14}   ({mha / mla:.1f}x the latent)")
    if a.config == "kimi-k2":
        print(f"Moonshot's README states 1T total / 32B activated: these counts rounded down "
              f"({r['total'] / 1e12:.3f}T / {r['active'] / 1e9:.2f}B). The tech report's "
              "1.04T / 32.6B does not reproduce from the released config.json under any "
              "embedding/head convention (README, 'Parameter counts').")


if __name__ == "__main__":
    try:
        main()
    # a bad config or path: say what is wrong, no traceback
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
