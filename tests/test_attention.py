"""Protects MLA: YaRN frequencies and softmax scale (hand-computed K2 / DeepSeek-V3 numbers), the interleaved RoPE
convention, the latent cache (what it stores and its size), cached decode == full forward for the naive and absorbed
formulations, absorbed == naive, causality, and QK-Clip's recorded max logit.
Compares against: hand-computed values (HF _compute_yarn_parameters' formulas), complex-number RoPE in float64,
an attention written from the weights in this file (no model code), and the model's own full forward for the cache
tests.
Tolerances: fp32 1e-5 relative to the logit scale (observed ~1e-7); float64 RoPE 1e-12.
Run: pytest tests/test_attention.py -q   (CPU, seconds)"""
import math

import pytest
import torch

import attention as A
import model as M
from conftest import random_model, tiny_args


# ---------------------------------------------------------------- YaRN and the softmax scale (hand-computed)

def test_k2_yarn_frequencies_are_a_hard_step():
    inv_freq, mult = A.rope_parameters(M.PRESETS["kimi-k2"]())
    base = torch.tensor([50000.0 ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    expect = torch.cat([base[:20], base[20:] / 32])  # pairs 0..19 kept, 20..31 divided by 32 (K2's YaRN)
    torch.testing.assert_close(inv_freq.double(), expect, rtol=1e-6, atol=0)
    assert mult == 1.0  # mscale == mscale_all_dim: cos/sin are not scaled


def test_deepseek_v3_yarn_ramp():
    inv_freq, mult = A.rope_parameters(M.PRESETS["deepseek-v3"]())
    base = torch.tensor([10000.0 ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    ratio = inv_freq.double() / base
    # DeepSeek-V3's YaRN: 1.0 for i <= 10, then 0.925, 0.85, ... down to 0.1 at i = 22, and 1/40 from i = 23
    expect = [1.0] * 11 + [1.0 - (i - 10) / 13 * (1 - 1 / 40) for i in range(11, 23)] + [1 / 40] * 9
    torch.testing.assert_close(ratio, torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=0)
    assert abs(ratio[11].item() - 0.925) < 1e-5 and mult == 1.0


def test_yarn_without_truncation_keeps_fractional_ramp_ends():
    """`truncate: false` (a transformers YaRN key): the ramp runs between the UNROUNDED correction dims. DeepSeek-V3's
    numbers by hand: lo = 64·ln(4096 / (2π·32)) / (2·ln 10000) = 10.472 and hi = 64·ln(4096 / 2π) / (2·ln 10000) =
    22.513 (rounded, as test_deepseek_v3_yarn_ramp has them: 10 and 23)."""
    args = M.PRESETS["deepseek-v3"]()
    args.rope_scaling = dict(args.rope_scaling, truncate=False)
    inv_freq, mult = A.rope_parameters(args)
    base = torch.tensor([10000.0 ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    lo, hi = 10.47224, 22.51344  # the two values above, to 5 decimals
    ramp = [min(max((i - lo) / (hi - lo), 0.0), 1.0) for i in range(32)]
    expect = torch.tensor([1 - r + r / 40 for r in ramp], dtype=torch.float64)  # keep (1 - r), interpolate (r / 40)
    torch.testing.assert_close(inv_freq.double() / base, expect, rtol=2e-5, atol=0)
    assert mult == 1.0


def test_softmax_scales():
    assert math.isclose(A.softmax_scale(M.PRESETS["kimi-k2"]()), 0.13086080, rel_tol=1e-7)
    assert math.isclose(A.softmax_scale(M.PRESETS["deepseek-v3"]()), 0.13523378, rel_tol=1e-7)
    assert math.isclose(A.softmax_scale(M.PRESETS["moonlight-16b-a3b"]()), 192 ** -0.5, rel_tol=1e-12)


def test_rope_is_interleaved_pairs():
    """apply_rope == multiplying the complex numbers (x_2i + i·x_2i+1) by e^{i·pos·θ_i} (DeepSeek's convention)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64, generator=g)  # (B, T, H, Dr)
    inv_freq = torch.rand(8, dtype=torch.float64, generator=g)
    pos = torch.arange(5, 12)
    cos, sin = A.rope_cos_sin(pos, inv_freq.float(), 1.0)
    ours = A.apply_rope(x, cos.double(), sin.double())
    zc = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    rot = torch.polar(torch.ones(7, 8, dtype=torch.float64), pos[:, None].double() * inv_freq.float().double())
    ref = torch.view_as_real(zc * rot[None, :, None, :]).flatten(-2)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)  # angles come from the fp32 tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_the_hf_formula(dtype):
    """RMSNorm (a fused kernel) == x·rsqrt(mean(x²) + eps) in fp32, cast back, then the weight (HF's order),
    forward and gradients; written out here."""
    g = torch.Generator().manual_seed(1)
    norm = A.RMSNorm(45, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(45, generator=g))
    x = (3 * torch.randn(2, 5, 45, generator=g)).to(dtype).requires_grad_()
    w = norm.weight.detach().clone().requires_grad_()
    x32 = x.float()
    ref = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    out = norm(x)
    torch.testing.assert_close(out, ref)
    up = torch.randn(2, 5, 45, generator=g).to(dtype)
    got = torch.autograd.grad(out, (x, norm.weight), up)
    want = torch.autograd.grad(ref, (x, w), up)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- an attention written from the weights

def reference_mla(attn: A.MLA, x: torch.Tensor, inv_freq: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head MLA in float64 straight from the MLA equations (DeepSeek-V3 report), with a complex-number
    RoPE. -> (out, max logits)."""
    B, T, D = x.shape
    H, Dn, Dr, Dv, Ckv = (args.num_attention_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim,
                          args.kv_lora_rank)
    W = {k: v.double() for k, v in attn.state_dict().items()}
    x = x.double()

    def rms(v, w, eps=1e-6):
        return w * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)

    def rope(v, pos):
        z = torch.view_as_complex(v.unflatten(-1, (-1, 2)).contiguous())
        ang = pos.double()[:, None] * inv_freq.double()[None, :]
        shape = (1, T) + (1,) * (v.dim() - 3) + (Dr // 2,)
        return torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang).view(shape)).flatten(-2)

    if args.q_lora_rank is None:
        q = x @ W["q_proj.weight"].T
    else:
        q = rms(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"]) @ W["q_b_proj.weight"].T
    q = q.view(B, T, H, Dn + Dr)
    kv_a = x @ W["kv_a_proj_with_mqa.weight"].T
    c = rms(kv_a[..., :Ckv], W["kv_a_layernorm.weight"])
    kv = (c @ W["kv_b_proj.weight"].T).view(B, T, H, Dn + Dv)
    pos = torch.arange(T)
    q_pe, k_pe = rope(q[..., Dn:], pos), rope(kv_a[..., Ckv:], pos)  # k_pe (B, T, Dr): one key for all heads
    logits = (torch.einsum("bthn,bshn->bhts", q[..., :Dn], kv[..., :Dn])
              + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)) * A.softmax_scale(args)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    o = torch.einsum("bhts,bshv->bthv", logits.softmax(-1), kv[..., Dn:]).reshape(B, T, H * Dv)
    return o @ W["o_proj.weight"].T, logits.amax(dim=(0, 2, 3))


@pytest.mark.parametrize("kind", ["k2", "moonlight", "deepseek"])
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_mla_matches_reference_from_weights(kind, impl):
    args = tiny_args(kind)
    model = random_model(args, seed=1)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 90, args.hidden_size, generator=torch.Generator().manual_seed(2))
    cos, sin = A.rope_cos_sin(torch.arange(90), model.inv_freq, model.rope_mult)
    ref, ref_max = reference_mla(attn, x, model.inv_freq, args)
    with torch.no_grad():
        out = attn(x, cos, sin, impl=impl)
        attn.record_max_logits = True  # the explicit path that also records QK-Clip's S_max (training forwards only)
        out_rec = attn.train()(x, cos, sin, impl=impl)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(out_rec.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(attn.max_logits.double(), ref_max, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        attn.max_logits.fill_(float("-inf"))
        attn.eval()(x, cos, sin, impl=impl)  # an evaluation pass leaves the statistic alone
    assert attn.max_logits.max() == float("-inf")


# ---------------------------------------------------------------- the latent cache

@pytest.mark.parametrize("kind", ["k2", "moonlight"])
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_cached_decode_equals_full_forward(kind, impl):
    args = tiny_args(kind)
    model = random_model(args, seed=4)
    ids = torch.randint(0, args.vocab_size, (2, 80), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        for split in (1, 37, 79):  # prefill `split` tokens, then one token at a time (crosses position 64)
            cache = model.new_cache(2, 96)
            steps = [model(ids[:, :split], cache, attn_impl=impl)]
            steps += [model(ids[:, t:t + 1], cache, attn_impl=impl) for t in range(split, 80)]
            got = torch.cat(steps, dim=1)
            torch.testing.assert_close(got, full, rtol=0, atol=1e-5 * full.abs().max().item())
        # chunked prefill against a non-empty cache (T > 1 with start > 0 needs the offset causal mask)
        cache = model.new_cache(2, 96)
        got = torch.cat([model(ids[:, :30], cache, attn_impl=impl), model(ids[:, 30:80], cache, attn_impl=impl)], 1)
        torch.testing.assert_close(got, full, rtol=0, atol=1e-5 * full.abs().max().item())


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("odd", [dict(kv_lora_rank=15), dict(qk_nope_head_dim=15, num_attention_heads=1)])
def test_odd_widths_decode_one_token_at_batch_one(odd, impl):
    """k_pe and q_pe are slices at offset Ckv / Dn: odd widths put them at an odd storage offset, which
    a one-token, one-sequence slice carries into RoPE's complex view (it was a crash)."""
    args = tiny_args("k2", **odd)
    model = random_model(args, seed=6)
    ids = torch.randint(0, args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 8)
        steps = [model(ids[:, :3], cache, attn_impl=impl)]
        steps += [model(ids[:, t:t + 1], cache, attn_impl=impl) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5 * full.abs().max().item())


def test_absorbed_equals_naive_full_sequence():
    args = tiny_args("deepseek")
    model = random_model(args, seed=5)
    ids = torch.randint(0, args.vocab_size, (3, 70), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = model(ids, attn_impl="naive"), model(ids, attn_impl="absorb")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * a.abs().max().item())


def test_future_tokens_never_change_past_logits():
    args = tiny_args("k2")
    model = random_model(args, seed=6)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, args.vocab_size, (1, 50), generator=g)
    other = ids.clone()
    other[:, 30:] = torch.randint(0, args.vocab_size, (1, 20), generator=g)
    with torch.no_grad():
        a, b = model(ids), model(other)
    assert torch.equal(a[:, :30], b[:, :30]) or (a[:, :30] - b[:, :30]).abs().max() < 1e-6
    assert (a[:, 30:] - b[:, 30:]).abs().max() > 1e-3


def test_cache_stores_normed_latent_and_rotated_rope_key_only():
    args = tiny_args("k2")
    model = random_model(args, seed=8)
    ids = torch.randint(0, args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(8))
    cache = model.new_cache(2, 32)
    L, Ckv, Dr = args.num_hidden_layers, args.kv_lora_rank, args.qk_rope_head_dim
    # exactly kv_lora_rank + qk_rope_head_dim values per token per layer
    assert cache.nbytes() == L * 2 * 32 * (Ckv + Dr) * 4
    with torch.no_grad():
        model(ids, cache)
        attn = model.model.layers[1].self_attn
        h = model.model.embed_tokens(ids)
        h = h + model.model.layers[0].self_attn(model.model.layers[0].input_layernorm(h),
                                                *A.rope_cos_sin(torch.arange(20), model.inv_freq, 1.0))
        h = h + model.model.layers[0].mlp(model.model.layers[0].post_attention_layernorm(h))
        x = model.model.layers[1].input_layernorm(h)
        kv_a = attn.kv_a_proj_with_mqa(x)
        c = attn.kv_a_layernorm(kv_a[..., :Ckv])
        k_pe = A.apply_rope(kv_a[..., Ckv:], *A.rope_cos_sin(torch.arange(20), model.inv_freq, 1.0))
    torch.testing.assert_close(cache.c_kv[1, :, :20], c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.k_pe[1, :, :20], k_pe, rtol=1e-5, atol=1e-6)
    assert cache.pos == 20 and cache.c_kv[:, :, 20:].abs().max() == 0


def test_k2_cache_bytes_per_token():
    mla, mha = M.kv_cache_bytes_per_token(M.PRESETS["kimi-k2"]())
    assert (mla, mha) == (70_272, 2_498_560)  # 576·2·61 and 64·320·2·61 bytes, from config.json
    assert mla * 131072 == 9_210_691_584
