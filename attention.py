"""Multi-head Latent Attention (MLA) with decoupled RoPE and YaRN, as in Kimi K2 / DeepSeek-V3.

The math of one layer (DeepSeek-V2 §2.1, arXiv 2405.04434), for the token at position t:
    c_q  = RMSNorm(W^DQ x)      q^C = W^UQ c_q,   q^R = W^QR c_q     per head (both in q_b_proj)
    c_kv = RMSNorm(W^DKV x)     k^R = RoPE(W^KR x)                   one key shared by all heads
    k^C  = W^UK c_kv            v   = W^UV c_kv                      per head, from the latent
    q = [q^C | RoPE(q^R)]       k   = [k^C | k^R]
    o_h = softmax(q_h·k_hᵀ · scale + causal mask) v_h                y = W^O [o_1 | … | o_H]

How it differs from textbook multi-head attention:
* Keys and values are rebuilt from a small per-token latent c_kv (kv_lora_rank = 512 numbers)
  plus ONE rotary key k_pe (qk_rope_head_dim = 64) shared by all heads, so the cache holds 576
  numbers per token and layer instead of H·(Dn+Dr) + H·Dv = 20,480 (35.6x less for K2's
  config.json; config.kv_cache_bytes_per_token). Queries also go through a low-rank bottleneck
  (q_lora_rank).
* Each head's query/key is split into a "nope" part (no position) and a "rope" part (rotated).
  RoPE is applied only to the rope parts; the rope key is shared (MQA-like), the nope key and
  value are per head.
* RoPE uses INTERLEAVED pairs (x_2i, x_2i+1), the layout of the released weights (DeepSeek-V3
  inference/model.py `apply_rotary_emb` treats each pair as one complex number); rotating
  half-split pairs (x_i, x_i+32) on these weights silently breaks the model.
* YaRN (arXiv 2309.00071) stretches the low-frequency pairs by `factor` and puts its whole
  temperature correction into the softmax scale, at every length:
      scale = qk_head_dim^-0.5 · m²,   m = 0.1·mscale_all_dim·ln(factor) + 1.

Two formulations of the same function, tests/test_attention.py keeps them equal:
* "naive"  : up-project the latent into per-head k_nope and v (the definition; cheaper for long
             prefill).
* "absorb" : fold W^UK into the query and W^UV into the output, attend directly against the
             cached latent (DeepSeek's `attn_impl="absorb"`; reads 576 numbers per cached token —
             the fast decode path).
Both read the same latent cache (`KVCache`): c_kv AFTER kv_a_layernorm, k_pe AFTER RoPE
(DeepSeek-V3 inference/model.py `MLA.forward`, absorb branch).

References: DeepSeek-V2 §2.1 (arXiv 2405.04434) for MLA, DeepSeek-V3 (arXiv 2412.19437), YaRN
(arXiv 2309.00071), Kimi K2 (arXiv 2507.20534) §2.1 for QK-Clip, whose per-head max logit is
recorded here (`record_max_logits`).

Tensor parallelism (parallel.py): each rank computes its H/W heads; the latent path and cache are
replicated.

Shapes: B batch, T new tokens, S key/cache length, D hidden, H heads (this rank's, under TP),
Dn/Dr/Dv nope/rope/value head dims, Cq/Ckv query/KV latent ranks.
Paper symbols ↔ names: W^DQ q_a_proj, W^UQ+W^QR q_b_proj, W^DKV+W^KR kv_a_proj_with_mqa,
W^UK+W^UV kv_b_proj, W^O o_proj, c^KV c_kv, k^R k_pe, q^C q_nope, q^R q_pe.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import parallel
from config import ModelArgs


class RMSNorm(nn.Module):
    """y = w · cast_back(x / sqrt(mean(x²) + eps)), statistics in fp32 (transformers'
    DeepseekV3RMSNorm order). x (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # y = x32 · rsqrt(mean(x32²) + eps) as one fused kernel (the same bits forward and backward,
        # and 1 op instead of 5: a decode step runs 4 norms per layer); fp32 statistics: a mean of
        # D squares is too coarse in bf16
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        # cast back first, then the weight (HF order)
        return self.weight * y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# RoPE with YaRN


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature m(s) = 0.1·mscale·ln(s) + 1 for s > 1 (YaRN §3.4; DeepSeek
    `yarn_get_mscale`)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(args: ModelArgs) -> tuple[Tensor, float]:
    """Inverse frequencies (Dr/2,) fp32 and the cos/sin multiplier for `args.rope_scaling` (None or
    YaRN).

    YaRN's "NTK-by-parts" interpolation (arXiv 2309.00071; transformers'
    `_compute_yarn_parameters`): pair i keeps its base frequency if its wavelength fits in the
    original context many times (beta_fast), is divided by `factor` if it fits less than beta_slow
    times, and is blended linearly in between.
    K2 (base 50000, L0 4096, factor 32, beta_fast = beta_slow = 1): a hard step — pairs 0..19 keep
    the base frequency, pairs 20..31 are divided by 32.
    """
    d, base = args.qk_rope_head_dim, args.rope_theta
    # the plain RoPE frequencies
    freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # (Dr/2,)
    rs = args.rope_scaling
    if rs is None:
        return freq, 1.0
    s, L0 = rs["factor"], rs["original_max_position_embeddings"]
    # YaRN paper defaults (§3.3) when absent or null,
    # as HF's `rope_parameters.get("beta_fast") or 32`
    beta_fast, beta_slow = rs.get("beta_fast") or 32.0, rs.get("beta_slow") or 1.0

    # exercise: yarn
    def correction_dim(n_rot: float) -> float:
        # the pair index whose wavelength makes n_rot turns over L0 tokens
        return d * math.log(L0 / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    # DeepSeek rounds the ramp's ends to whole pairs; HF's `truncate: false` does not
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001  # avoid 0/0 in the ramp (same guard as HF and DeepSeek)
    # 0: keep the base frequency, 1: interpolate (divide by the factor)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)  # (Dr/2,)
    inv_freq = freq * (1 - ramp) + (freq / s) * ramp  # (Dr/2,)
    # end exercise: yarn
    # cos/sin multiplier: mscale / mscale_all_dim; 1.0 for K2 and DeepSeek-V3, whose YaRN
    # temperature lives entirely in the softmax scale (see softmax_scale). Same rule as HF
    # `_compute_yarn_parameters`.
    if rs.get("attention_factor") is not None:
        mult = float(rs["attention_factor"])
    elif rs.get("mscale") and rs.get("mscale_all_dim"):
        mult = yarn_get_mscale(s, rs["mscale"]) / yarn_get_mscale(s, rs["mscale_all_dim"])
    else:
        mult = yarn_get_mscale(s)
    return inv_freq, mult


def softmax_scale(args: ModelArgs) -> float:
    """qk_head_dim^-0.5 · m², m = yarn_get_mscale(factor, mscale_all_dim) when YaRN sets
    mscale_all_dim (DeepSeek-V3 inference/model.py `MLA.__init__`).

    K2: 192^-0.5 · (1 + 0.1·ln 32)² = 0.13086080, at every sequence length (not only beyond 4096
    tokens).
    """
    # exercise: yarn_scale
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    rs = args.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        scale *= yarn_get_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    # end exercise: yarn_scale
    return scale


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, mult: float) -> tuple[Tensor, Tensor]:
    """cos and sin of positions·inv_freq, (T, Dr/2) each, in fp32 (angles up to 128K·1 rad need fp32
    at least)."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, Dr/2)
    return angles.cos() * mult, angles.sin() * mult


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x_2i, x_2i+1) by angle θ_i (DeepSeek `apply_rotary_emb`).
    x (B, T, ..., Dr); cos/sin (T, Dr/2).

    y_2i = x_2i cos θ_i − x_2i+1 sin θ_i,   y_2i+1 = x_2i sin θ_i + x_2i+1 cos θ_i.
    """
    # exercise: rope
    # broadcast over B and any head dim
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 3) + (cos.shape[-1],)  # (1, T, 1.., Dr/2)
    rot = torch.complex(cos, sin).view(shape)  # e^{iθ_i}
    # pair (x_2i, x_2i+1) as the complex number x_2i + i·x_2i+1: one complex product is the
    # rotation above, in 3 kernels instead of 9 (decode runs this twice per layer per token);
    # fp32: the precision of the tables
    x32 = x.float()
    # complex views need adjacent pairs, even strides and an even offset (odd head or latent
    # widths give odd ones; a slice with one token and one head is "contiguous" at an odd offset)
    if (x32.stride(-1) != 1 or x32.storage_offset() % 2
            or any(st % 2 for st in x32.stride()[:-1])):
        x32 = x32.clone(memory_format=torch.contiguous_format)
    y = torch.view_as_complex(x32.unflatten(-1, (-1, 2))) * rot  # (..., Dr/2) complex
    return torch.view_as_real(y).flatten(-2).to(x.dtype)  # (..., Dr)
    # end exercise: rope


# --------------------------------------------------------------------------------------------------
# The latent KV cache


class KVCache:
    """MLA's cache: per layer and token, one row [c_kv | k_pe] — the normed latent c_kv (Ckv) and
    the rotated shared key k_pe (Dr). `c_kv` and `k_pe` are views of the two parts; the absorbed
    decode reads whole rows as its key.

    That is kv_lora_rank + qk_rope_head_dim = 576 numbers per token per layer for K2 (DeepSeek-V2
    §2.1.2), read by both the naive and the absorbed formulation. `pos` is the number of tokens
    already cached; the model writes the new tokens at [pos, pos+T) in every layer and then advances
    `pos` once. Set `pos` back to rewind (e.g. to reuse a shared prompt prefix).
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        L, Ckv, Dr = args.num_hidden_layers, args.kv_lora_rank, args.qk_rope_head_dim
        if max_len > args.max_position_embeddings:
            raise ValueError(f"KVCache max_len={max_len} exceeds max_position_embeddings="
                             f"{args.max_position_embeddings}; ask for a shorter cache")
        # one row [c_kv | k_pe] per token: the absorbed decode uses the row as is, as the key shared
        # by all heads
        self.latent = torch.zeros(L, batch_size, max_len, Ckv + Dr,
                                  device=device, dtype=dtype)  # (L, B, S, Ckv+Dr)
        self.kv_lora_rank = Ckv
        self.pos = 0

    @property
    def c_kv(self) -> Tensor:
        return self.latent[..., :self.kv_lora_rank]  # (L, B, S, Ckv)

    @property
    def k_pe(self) -> Tensor:
        return self.latent[..., self.kv_lora_rank:]  # (L, B, S, Dr)

    @property
    def max_len(self) -> int:
        return self.latent.shape[2]

    @property
    def batch_size(self) -> int:
        return self.latent.shape[1]

    def update(self, layer: int, c_kv: Tensor, k_pe: Tensor) -> Tensor:
        """Store one layer's new tokens at [pos, pos+T); return that layer's rows [c_kv | k_pe] so
        far, (B, pos+T, Ckv+Dr)."""
        # exercise: kv_cache
        end = self.pos + c_kv.shape[1]
        self.c_kv[layer, :, self.pos:end] = c_kv
        self.k_pe[layer, :, self.pos:end] = k_pe
        return self.latent[layer, :, :end]
        # end exercise: kv_cache

    def nbytes(self) -> int:
        return self.latent.nbytes


# --------------------------------------------------------------------------------------------------
# The attention itself


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, start: int,
           max_logits: Tensor | None = None) -> Tensor:
    """Causal softmax attention. q (B, H, T, E), k (B, Hk, S, E), v (B, Hk, S, Ev) with Hk in
    {1, H}; -> (B, H, T, Ev).

    Query t sits at absolute position start + t and may see keys 0..start+t (S = start + T).
    Per-head keys run PyTorch's fused scaled_dot_product_attention (its kernels keep the softmax in
    fp32). The explicit path below runs instead when `max_logits` (H,) is given — it folds each
    head's largest unmasked logit into it (QK-Clip's S_max) — and when one key/value serves all
    heads (Hk = 1, the absorbed latent): the heads' queries are then stacked as rows h·T + t of a
    single head, so each product reads the shared key once, not H expanded copies.
    """
    B, H, T, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    mask = None
    if T > 1:
        # key s is visible to query t iff s <= start + t
        t_pos = start + torch.arange(T, device=q.device)
        mask = torch.arange(S, device=q.device)[None, :] <= t_pos[:, None]  # (T, S)
    shared = k.shape[1] == 1 and H > 1
    if max_logits is None and not shared:
        Ev = v.shape[-1]
        # the fused kernels want one head size for q, k and v (K2: 192 vs 128): zero columns of v
        # give zero output columns, dropped below (as HF does for flash attention)
        if Ev < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - Ev))  # (B, H, S, E)
        if start == 0 and T > 1:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return o[..., :Ev]  # (B, H, T, Ev)
    if shared:
        q = q.reshape(B, 1, H * T, q.shape[-1])  # (B, 1, H·T, E)
        # row h·T + t gets query t's row of the mask
        mask = None if mask is None else mask.repeat(H, 1)  # (H·T, S)
    # fp32 pre-softmax logits
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H|1, T|H·T, S)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if max_logits is not None:
        # QK-Clip statistic, max over batch and all visible (t, s) pairs; never differentiated
        with torch.no_grad():
            step_max = logits.view(B, H, T, S).amax(dim=(0, 2, 3))  # (H,)
            max_logits.copy_(torch.maximum(max_logits, step_max))
    probs = torch.softmax(logits, dim=-1)  # fp32 softmax
    return torch.matmul(probs.to(v.dtype), v).view(B, H, T, v.shape[-1])  # (B, H, T, Ev)


class MLA(nn.Module):
    """Multi-head Latent Attention of one layer. Module names are the Hugging Face checkpoint's
    (Kimi-K2-Instruct model.safetensors.index.json).

    Tensor parallelism (parallel.py): with W ranks this rank computes H/W of the heads, `first_head`
    onward. `num_heads` is that LOCAL count and every per-head tensor (q_b_proj/q_proj and kv_b_proj
    rows, o_proj columns, max_logits) holds only those heads, so per-head code such as QK-Clip runs
    unchanged on each rank's rows. The latent path (q_a_proj, kv_a_proj_with_mqa, the two latent
    norms, the KV cache) is replicated.
    """

    # state-dict names split across ranks -> the dim they are split on (rows = heads;
    # o_proj: columns)
    SHARD_DIMS = {"q_proj.weight": 0, "q_b_proj.weight": 0, "kv_b_proj.weight": 0,
                  "o_proj.weight": 1}

    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.hidden_size
        # this rank's heads
        H, self.first_head = parallel.split(args.num_attention_heads, "num_attention_heads")
        self.num_heads = H
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = (
            args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim)
        qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank is None:
            # Moonlight: a plain query projection
            self.q_proj = nn.Linear(D, H * qk_head_dim, bias=False)
        else:
            # K2 / DeepSeek-V3: low-rank query, per head rows [q_nope Dn | q_pe Dr];
            # eps always 1e-6: HF builds q_a_layernorm without the config's eps
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * qk_head_dim, bias=False)
        # output rows [c_kv Ckv | k_pe Dr]: the latent and the one rope key shared by all heads
        kv_a_rows = self.kv_lora_rank + self.qk_rope_head_dim
        self.kv_a_proj_with_mqa = nn.Linear(D, kv_a_rows, bias=False)
        # on c_kv only, never on k_pe
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=1e-6)
        # per head rows [k_nope Dn | v Dv]: W^UK and W^UV stacked
        kv_b_rows = H * (self.qk_nope_head_dim + self.v_head_dim)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, kv_b_rows, bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=False)
        self.softmax_scale = softmax_scale(args)
        # QK-Clip bookkeeping (muonclip.qk_clip_): when recording, the largest logit per head since
        # the last reset
        self.record_max_logits = False
        self.register_buffer("max_logits", torch.full((H,), float("-inf")), persistent=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                layer: int = 0, impl: str = "naive") -> Tensor:
        """x (B, T, D) at positions cache.pos.. (or 0..); cos/sin (T, Dr/2);
        impl "naive" | "absorb". -> (B, T, D)."""
        B, T, _ = x.shape
        H, Ckv = self.num_heads, self.kv_lora_rank
        Dn, Dr, Dv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        # copy_to_ranks marks where replicated tensors enter this rank's heads (identity forward;
        # parallel.py)
        if self.q_lora_rank is None:
            q = self.q_proj(parallel.copy_to_ranks(x))  # (B, T, H·(Dn+Dr))
        else:
            # low-rank query (DeepSeek-V2 §2.1.2)
            c_q = self.q_a_layernorm(self.q_a_proj(x))  # (B, T, Cq)
            q = self.q_b_proj(parallel.copy_to_ranks(c_q))  # (B, T, H·(Dn+Dr))
        q_nope, q_pe = q.view(B, T, H, Dn + Dr).split([Dn, Dr], dim=-1)  # (B,T,H,Dn), (B,T,H,Dr)
        q_pe = apply_rope(q_pe, cos, sin)  # (B, T, H, Dr)
        # low-rank KV joint compression plus the decoupled rope key (DeepSeek-V2 §2.1.2-2.1.3)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([Ckv, Dr], dim=-1)  # (B,T,Ckv), (B,T,Dr)
        c_kv = parallel.copy_to_ranks(self.kv_a_layernorm(c_kv))  # (B, T, Ckv)
        # one rotary key per token, shared by all heads
        k_pe = parallel.copy_to_ranks(apply_rope(k_pe, cos, sin))  # (B, T, Dr)
        start, latent = 0, None
        if cache is not None:
            # cache what the next step needs: the normed latent and the ROTATED rope key
            start = cache.pos
            # rows [c_kv | k_pe] of every token so far, S = start + T
            latent = cache.update(layer, c_kv, k_pe)  # (B, S, Ckv+Dr)
            c_kv, k_pe = latent.split([Ckv, Dr], dim=-1)  # (B, S, Ckv), (B, S, Dr)
        S = c_kv.shape[1]
        # eval passes never feed QK-Clip
        rec = self.max_logits if self.record_max_logits and self.training else None
        if impl == "naive":
            # exercise: mla
            # up-project every cached token: per-head keys/values
            kv = self.kv_b_proj(c_kv).view(B, S, H, Dn + Dv)  # (B, S, H, Dn+Dv)
            k_nope, v = kv.split([Dn, Dv], dim=-1)  # (B, S, H, Dn), (B, S, H, Dv)
            # the shared rope key, viewed once per head
            k_pe_h = k_pe[:, :, None, :].expand(B, S, H, Dr)  # (B, S, H, Dr)
            k = torch.cat([k_nope, k_pe_h], dim=-1)  # (B, S, H, Dn+Dr)
            qh = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, Dn+Dr)
            o = attend(qh, k.transpose(1, 2), v.transpose(1, 2),
                       self.softmax_scale, start, rec)  # (B, H, T, Dv)
            # end exercise: mla
        elif impl == "absorb":
            # exercise: absorbed
            w = self.kv_b_proj.weight.view(H, Dn + Dv, Ckv)
            w_uk, w_uv = w[:, :Dn], w[:, Dn:]  # (H, Dn, Ckv), (H, Dv, Ckv)
            # q_nope·k_nope = q_nope·(W^UK c) = (W^UKᵀ q_nope)·c: the query moves into the latent
            # space
            q_lat = q_nope.transpose(1, 2) @ w_uk  # (B, H, T, Dn) @ (H, Dn, Ckv) -> (B, H, T, Ckv)
            qh = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1)  # (B, H, T, Ckv+Dr)
            # q_lat·c + q_pe·k_pe: the latent row [c_kv | k_pe] is the one key of all heads
            # (MQA-like)
            if latent is None:
                latent = torch.cat([c_kv, k_pe], dim=-1)  # (B, S, Ckv+Dr)
            # attention mixes the latent rows; W^UV comes after the mixing
            z = attend(qh, latent[:, None], c_kv[:, None],
                       self.softmax_scale, start, rec)  # (B, H, T, Ckv)
            o = z @ w_uv.transpose(1, 2)  # (B, H, T, Ckv) @ (H, Ckv, Dv) -> (B, H, T, Dv)
            # end exercise: absorbed
        else:
            raise ValueError(f"attention impl must be 'naive' or 'absorb', got {impl!r}")
        # under TP each rank's o_proj sees only its heads' columns: one all-reduce sums the heads
        # (parallel.py)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, H * Dv))  # (B, T, D)
        return parallel.reduce_from_ranks(y)  # (B, T, D)
