"""Protects muonclip.py: Newton-Schulz orthogonalisation, Moonshot's Muon update and scale, the Muon/AdamW split with
weight decay on every parameter, QK-Clip's per-head rescaling of MLA rows, the routing-bias update, the optional
sequence-wise balance loss, and exact resume from state_dict.
Compares against: SVD (torch.linalg.svd) and an fp64 scalar iteration of the NS polynomial; torch.optim.Muon
(adjust_lr_fn="match_rms_adamw") and torch.optim.AdamW step for step; max attention logits recomputed in fp64 from the
weights with HF's YaRN math, written here (never by calling MLA.forward); hand-computed bias updates; a per-
sequence loop for the balance loss.
Run: pytest tests/test_muonclip.py -q   (CPU, a few seconds)
"""
import copy
import io
import math

import pytest
import torch

import model as kimi
import muonclip
from conftest import random_model, tiny_args
from muonclip import (NS_COEFFICIENTS, MuonClip, adamw_update, build_optimizer, muon_scale, muon_update,
                      qk_clip_, qk_clip_gamma, routing_bias_delta, split_params,
                      update_routing_bias_, zeropower_via_newtonschulz5)

# Band of singular values NS5 promises: iterating p(x) = a x + b x^3 + c x^5 five times in fp64 maps every
# x = sigma / ||G||_F in [3e-3, 1] into [0.6818, 1.2024] (computed; K. Jordan's notes say "~Uniform(0.5, 1.5)").
NS_BAND = (0.6818, 1.2024)
# bf16 keeps 8 significant bits (relative step 2^-8 = 3.9e-3); five NS steps of two matmuls each, with slopes up to
# 3.44 per step, leave errors of ~1-2e-2 on singular values of ~1 (measured max 1.7e-2): allow 5e-2.
BF16_NS_ATOL = 5e-2


def ns5_scalar(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """What NS5 does to each normalised singular value, in exact (fp64) arithmetic."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return x


def matrix_with_singular_values(s: torch.Tensor, A: int, B: int, gen: torch.Generator) -> tuple:
    """G = U diag(s) V^T (fp64) with random orthonormal U (A, r), V (B, r); returns (G, U, V)."""
    r = s.numel()
    U, _ = torch.linalg.qr(torch.randn(A, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(B, r, generator=gen, dtype=torch.float64))
    return U @ torch.diag(s) @ V.T, U, V


def tiny_model(seed: int = 0, **overrides) -> kimi.Transformer:
    torch.manual_seed(seed)
    args = kimi.PRESETS["tiny"]()
    for k, v in overrides.items():
        setattr(args, k, v)
    return kimi.Transformer(args).train()


# ----------------------------------------------------------------------------------------------------------------
# Newton-Schulz


@pytest.mark.parametrize("A,B", [(64, 256), (256, 64), (96, 96)])
def test_newton_schulz_singular_values_follow_the_polynomial_and_stay_in_band(A, B):
    gen = torch.Generator().manual_seed(A * 1000 + B)
    r = min(A, B)
    s = torch.logspace(-1, 0, r, dtype=torch.float64)             # condition number 10: "well conditioned"
    G, U, V = matrix_with_singular_values(s, A, B, gen)
    O = zeropower_via_newtonschulz5(G).double()
    assert O.dtype == torch.float64 and O.shape == (A, B)
    predicted = ns5_scalar(s / s.norm())                           # each singular value through p^5 (fp64)
    # NS acts on singular values only: U^T O V is diagonal with the predicted values (bf16 tolerance)
    M = U.T @ O @ V                                                # (r, r)
    off = (M - torch.diag(torch.diag(M))).abs().max().item()
    diag_err = (torch.diag(M) - predicted).abs().max().item()
    sv = torch.linalg.svdvals(O)
    print(f"{A}x{B}: singular values [{sv.min():.4f}, {sv.max():.4f}], off-diagonal {off:.2e}, vs p^5 {diag_err:.2e}")
    assert off < BF16_NS_ATOL and diag_err < BF16_NS_ATOL
    assert NS_BAND[0] - BF16_NS_ATOL < sv.min() and sv.max() < NS_BAND[1] + BF16_NS_ATOL


def test_newton_schulz_is_close_to_the_svd_polar_factor():
    gen = torch.Generator().manual_seed(1)
    s = torch.logspace(-1, 0, 64, dtype=torch.float64)
    G, U, V = matrix_with_singular_values(s, 64, 192, gen)
    polar = U @ V.T                                                # the exact orthogonal factor of G
    O = zeropower_via_newtonschulz5(G).double()
    rel = ((O - polar).norm() / polar.norm()).item()
    cos = ((O * polar).sum() / (O.norm() * polar.norm())).item()
    # Approximate by design: ||O - UV^T||_F / ||UV^T||_F = RMS of (S' - 1), and S' spreads over NS_BAND, so up to
    # max(1 - 0.68, 1.20 - 1) = 0.32; measured 0.21. The direction is much closer: cosine 0.98 measured.
    print(f"relative distance to U V^T {rel:.3f}, cosine {cos:.4f}")
    assert rel < 0.32 and cos > 0.97


def test_newton_schulz_batched_equals_per_matrix_loop():
    gen = torch.Generator().manual_seed(2)
    for shape in [(16, 32, 96), (16, 96, 32), (2, 3, 24, 40)]:   # an expert stack, a tall stack, two batch dims
        G = torch.randn(*shape, generator=gen)
        batched = zeropower_via_newtonschulz5(G)
        looped = torch.stack([zeropower_via_newtonschulz5(g) for g in G.reshape(-1, *shape[-2:])]).view(shape)
        diff = (batched.float() - looped.float()).abs().max().item()
        print(f"{shape}: max |batched - looped| = {diff:.1e}")
        # bitwise equal on x86 CPU (measured); 1e-3 is ~2 bf16 steps at the entries' size (~0.1) for other BLAS
        assert diff <= 1e-3


def test_newton_schulz_handles_zero_matrix():
    assert torch.equal(zeropower_via_newtonschulz5(torch.zeros(8, 4)).float(), torch.zeros(8, 4))


# ----------------------------------------------------------------------------------------------------------------
# The Muon update and its scale


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 128), (8, 32, 96)])
def test_update_rms_matches_0_2(shape):
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(*shape, generator=gen)
    # 1) the scale itself: with the exact polar factor U V^T (all singular values 1), RMS is exactly 0.2 (Lemma 1)
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    rms_polar = (muon_scale(shape) * (U @ Vh)).pow(2).mean(dim=(-2, -1)).sqrt()          # (...,) one per matrix
    torch.testing.assert_close(rms_polar, torch.full_like(rms_polar, 0.2), rtol=1e-9, atol=0)
    # 2) the actual update: RMS = 0.2 * sqrt(mean S'^2) with S' in NS_BAND, so within [0.136, 0.24];
    # measured 0.172-0.179 on Gaussian inputs (S' sits mostly below 1)
    update = muon_update(G, torch.zeros_like(G), beta=0.95)
    rms = update.pow(2).mean(dim=(-2, -1)).sqrt()
    print(f"{shape}: update RMS {rms.min():.4f}..{rms.max():.4f}")
    assert update.dtype == torch.float32 and update.shape == G.shape
    assert ((0.2 * NS_BAND[0] - 0.01 < rms) & (rms < 0.2 * NS_BAND[1] + 0.01)).all()
    assert (abs(rms - 0.2) < 0.2 * 0.2).all()


def test_muon_updates_batched_across_tensors_equal_one_at_a_time(monkeypatch):
    """muon_updates stacks every matrix of one shape (wide side out) into one Newton-Schulz call: the updates and the
    momentum buffers equal the one-tensor-at-a-time results, for wide, tall, square matrices and expert stacks
    mixed; and MuonClip.step gives the same parameters whatever run length _chunks cuts the Muon group into."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(24, 40), (40, 24), (3, 24, 40), (2, 40, 24), (16, 16), (24, 56), (5, 16, 16)]
    grads = [torch.randn(*s, generator=gen) for s in shapes]
    bufs = [torch.randn(*s, generator=gen) for s in shapes]
    bufs_batched = [b.clone() for b in bufs]
    batched = muonclip.muon_updates(grads, bufs_batched, beta=0.9)
    for g, b, b_batched, u in zip(grads, bufs, bufs_batched, batched):
        b = 0.9 * b + g                                                   # the momentum rule, written out
        one = zeropower_via_newtonschulz5(g + 0.9 * b).float() * muon_scale(g.shape)  # Nesterov, NS of this tensor alone
        assert u.shape == g.shape and u.dtype == torch.float32
        # bitwise equal on x86 CPU (measured); 1e-3 relative is ~2 bf16 steps, for other BLAS
        torch.testing.assert_close(u, one, rtol=0, atol=1e-3 * one.abs().max().item())
        torch.testing.assert_close(b_batched, b, rtol=1e-6, atol=1e-6)

    results = []
    for cap in (2**27, 1000):  # one run holding every Muon parameter; runs of at most 1000 numbers
        monkeypatch.setattr(muonclip, "MUON_BATCH_NUMEL", cap)
        model = random_model(tiny_args("k2"), seed=12)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-2
        opt = MuonClip.from_model(model, lr=1e-2, qk_clip_tau=None)
        opt.step()
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _muon_pair(momentum: float, seed: int = 4):
    """Our MuonClip and torch.optim.Muon on copies of the same tensors: 2-D matrices, and an expert stack that torch
    sees as E separate 2-D parameters."""
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(0.02 * torch.randn(*s, generator=gen)) for s in [(64, 256), (256, 64), (48, 80)]]
    stack = torch.nn.Parameter(0.02 * torch.randn(4, 24, 40, generator=gen))             # (E, I, D)
    ours.append(stack)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours[:-1]]
    ref += [torch.nn.Parameter(stack.detach()[e].clone()) for e in range(stack.shape[0])]
    lr, wd = 0.02, 0.1
    opt = MuonClip([dict(params=ours, use_muon=True)], lr=lr, weight_decay=wd, momentum=momentum)
    # Moonlight's Muon settings in torch.optim.Muon (the PyTorch docs' match_rms_adamw rule)
    ref_opt = torch.optim.Muon(ref, lr=lr, weight_decay=wd, momentum=momentum, nesterov=True,
                               ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
                               adjust_lr_fn="match_rms_adamw")
    return ours, ref, opt, ref_opt, gen


def _step_both(ours, ref, opt, ref_opt, gen):
    """Feed the same random gradients to both; return (our updates, torch's updates), expert stack split per slice."""
    before = [p.detach().clone() for p in ours]
    for p in ours:
        p.grad = torch.randn(p.shape, generator=gen)
    grads = [p.grad for p in ours[:-1]] + list(ours[-1].grad.unbind(0))
    for r, g in zip(ref, grads):
        r.grad = g.clone()
    ref_before = [r.detach().clone() for r in ref]
    opt.step()
    ref_opt.step()
    d_ours = [p.detach() - b for p, b in zip(ours, before)]
    d_ours = d_ours[:-1] + list(d_ours[-1].unbind(0))
    d_ref = [r.detach() - b for r, b in zip(ref, ref_before)]
    return d_ours, d_ref


def test_muon_equals_torch_muon_when_inputs_match():
    # With momentum 0 both feed NS the raw gradient, bit for bit, so everything after it (NS in bf16, the
    # 0.2·sqrt(max(A, B)) scale per expert slice, decay with the unadjusted lr) must agree. Tolerance: fp32 rounding,
    # because torch folds the scale into the lr (one product) and we multiply the update (two): ~1 ulp per step, and
    # 1e-8 absolute is ~5 ulps at the parameters' size (0.02) for entries where decay and update nearly cancel.
    ours, ref, opt, ref_opt, gen = _muon_pair(momentum=0.0)
    for step in range(4):
        _step_both(ours, ref, opt, ref_opt, gen)
        flat = ours[:-1] + list(ours[-1].detach().unbind(0))
        for p, r in zip(flat, ref):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-8)


def test_muon_equals_torch_muon_with_momentum():
    # torch.optim.Muon keeps an EMA buffer B = μB + (1-μ)G and feeds NS (1-μ)G + μB (its docstring shows the sum
    # buffer, its code uses lerp); Moonlight keeps M = μM + G and feeds G + μM. So B = (1-μ)·M exactly in real
    # arithmetic (checked on the state, fp32 rounding), and the NS inputs differ only by the factor (1-μ) = 0.05,
    # which NS's normalisation removes. What remains is intrinsic: bf16 rounds 0.05·U and U differently, and NS
    # amplifies input noise along small singular directions (slope up to 3.44^5 ≈ 486), so the updates agree to a
    # few percent (measured 1-5% relative Frobenius over 6 steps), not to fp32 rounding.
    mu = 0.95
    ours, ref, opt, ref_opt, gen = _muon_pair(momentum=mu)
    for step in range(6):
        d_ours, d_ref = _step_both(ours, ref, opt, ref_opt, gen)
        rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(d_ours, d_ref))
        print(f"step {step}: max relative difference of the updates {rel:.3f}")
        assert rel < 0.1
    buf_ours = [opt.state[p]["momentum_buffer"] for p in ours]
    buf_ours = buf_ours[:-1] + list(buf_ours[-1].unbind(0))
    for b, r in zip(buf_ours, ref):
        torch.testing.assert_close((1 - mu) * b, ref_opt.state[r]["momentum_buffer"], rtol=1e-5, atol=1e-7)


def test_adamw_part_equals_torch_adamw():
    gen = torch.Generator().manual_seed(5)
    ours = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in [(7,), (33, 5), (4, 3, 2)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonClip([dict(params=ours, use_muon=False)], lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(50):
        for p, r in zip(ours, ref):
            # gradients from 1e-6 to 10 so eps matters in some steps
            g = torch.randn(p.shape, generator=gen) * 10.0 ** torch.randint(-6, 2, (), generator=gen).item()
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        # the same formula; torch folds 1/(1-β1^t) into the step size, we divide the update: fp32 rounding only
        for p, r in zip(ours, ref):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=0)


def test_adamw_update_first_step_is_sign_of_gradient():
    # hand check: at t=1 the bias-corrected m̂ = g and v̂ = g², so the update is g / (|g| + eps) ≈ sign(g)
    g = torch.tensor([3.0, -0.5, 2e-3])
    u = adamw_update(g, torch.zeros(3), torch.zeros(3), step=1, betas=(0.9, 0.95), eps=1e-8)
    torch.testing.assert_close(u, g / (g.abs() + 1e-8), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Parameter split, group validation, weight decay


def test_param_split_follows_moonshot_rule():
    m = tiny_model()
    muon, adamw = split_params(m)
    muon_names, adamw_names = {n for n, _ in muon}, {n for n, _ in adamw}
    assert adamw_names == {n for n, p in m.named_parameters()
                           if p.ndim == 1 or n in ("model.embed_tokens.weight", "lm_head.weight")}
    for name in ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.gate_proj",
                 "model.layers.1.mlp.experts.down_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.0.self_attn.q_b_proj.weight", "model.layers.0.mlp.up_proj.weight"]:
        assert name in muon_names
    assert not any("e_score_correction_bias" in n for n in muon_names | adamw_names)  # a buffer, in no group
    opt = MuonClip.from_model(m, lr=1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def test_param_group_validation_errors():
    m = tiny_model()
    muon, adamw = split_params(m)
    with pytest.raises(ValueError, match="in no param group"):
        MuonClip([dict(params=muon, use_muon=True), dict(params=adamw[1:], use_muon=False)], model=m)
    with pytest.raises(ValueError, match="Muon group"):
        MuonClip([dict(params=muon + adamw, use_muon=True)], model=m)
    with pytest.raises(ValueError, match="more than one parameter group"):
        MuonClip([dict(params=muon, use_muon=True), dict(params=adamw + muon[:1], use_muon=False)], model=m)
    with pytest.raises(ValueError, match="use_muon"):
        MuonClip([dict(params=adamw)])
    with pytest.raises(ValueError, match="not trainable parameters of the model"):
        MuonClip([dict(params=muon, use_muon=True), dict(params=adamw + [("stray", torch.nn.Parameter(torch.ones(3)))],
                                                         use_muon=False)], model=m)
    gate = m.model.layers[1].mlp.gate
    bias = gate.e_score_correction_bias
    del gate.e_score_correction_bias
    gate.e_score_correction_bias = torch.nn.Parameter(bias.clone())   # the mistake: bias as a parameter
    with pytest.raises(ValueError, match="must be a buffer"):
        MuonClip.from_model(m, lr=1e-3)


def test_weight_decay_lands_on_every_parameter_including_norms_and_expert_slices():
    m = tiny_model()
    lr, wd = 0.01, 0.1
    opt = MuonClip.from_model(m, lr=lr, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    bias_before = m.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)          # zero gradient: Muon's NS(0) = 0 and Adam's 0/(0+eps) = 0, only decay
    opt.step()
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), before[n] * (1 - lr * wd)), n     # e.g. norms and every expert slice
    assert torch.equal(m.model.layers[1].mlp.gate.e_score_correction_bias, bias_before)


def test_build_optimizer_modes():
    m = tiny_model()
    clip, muon, adamw = (build_optimizer(name, m, lr=1e-3) for name in ("muonclip", "muon", "adamw"))
    assert clip.qk_clip_tau == 100.0 and muon.qk_clip_tau is None and adamw.qk_clip_tau is None
    assert [g["use_muon"] for g in clip.param_groups] == [True, False]
    assert [g["use_muon"] for g in adamw.param_groups] == [False]
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["weight_decay"] == 0.1 for g in adamw.param_groups)
    assert all(layer.self_attn.record_max_logits for layer in m.model.layers)
    with pytest.raises(ValueError, match="not one of"):
        build_optimizer("sgd", m, lr=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# QK-Clip against an independent recomputation of the logits


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def yarn_ref(args) -> tuple[torch.Tensor, float, float]:
    """(inv_freq fp64, cos/sin multiplier, softmax scale), written from HF's _compute_yarn_parameters formulas."""
    d, base = args.qk_rope_head_dim, args.rope_theta
    f = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    rs = args.rope_scaling
    if rs is None:
        return f, 1.0, scale
    s, L0 = rs["factor"], rs["original_max_position_embeddings"]
    corr = lambda r: d * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(base))
    lo, hi = max(math.floor(corr(rs["beta_fast"])), 0), min(math.ceil(corr(rs["beta_slow"])), d - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    mscale = lambda m: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1
    mult = mscale(rs["mscale"]) / mscale(rs["mscale_all_dim"])
    return f * (1 - ramp) + f / s * ramp, mult, scale * mscale(rs["mscale_all_dim"]) ** 2


def mla_logits_ref(attn, x: torch.Tensor, args) -> torch.Tensor:
    """Pre-softmax logits (B, H, T, T) in fp64, -inf above the diagonal, from attn's weights and its input x (B, T, D)."""
    W = {n: p.detach().double() for n, p in attn.named_parameters()}
    H, Dn, Dr, Ckv = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank
    B, T, _ = x.shape
    x = x.double()
    if attn.q_lora_rank is None:
        q = x @ W["q_proj.weight"].T
    else:
        q = rms_norm_ref(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], 1e-6) @ W["q_b_proj.weight"].T
    q = q.view(B, T, H, Dn + Dr)
    q_nope, q_pe = q[..., :Dn], q[..., Dn:]                                    # per head [q^C | q^R]
    kv_a = x @ W["kv_a_proj_with_mqa.weight"].T                                # (B, T, Ckv + Dr)
    c = rms_norm_ref(kv_a[..., :Ckv], W["kv_a_layernorm.weight"], 1e-6)
    k_nope = (c @ W["kv_b_proj.weight"].T).view(B, T, H, -1)[..., :Dn]         # per head [k^C | v]
    inv_freq, mult, scale = yarn_ref(args)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq             # (T, Dr/2)
    cos, sin = ang.cos() * mult, ang.sin() * mult

    def rope(v):  # interleaved pairs (DeepSeek-V3 inference/model.py)
        v0, v1 = v[..., 0::2], v[..., 1::2]
        cs, sn = (cos, sin) if v.dim() == 3 else (cos[:, None], sin[:, None])
        return torch.stack([v0 * cs - v1 * sn, v0 * sn + v1 * cs], -1).flatten(-2)

    q_pe, k_pe = rope(q_pe), rope(kv_a[..., Ckv:])                             # k^R: one per token, all heads
    logits = scale * (torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf"))


@pytest.mark.parametrize("q_lora_rank", [32, None])     # K2's low-rank query, and Moonlight's plain q_proj
def test_qk_clip_bounds_every_head_and_leaves_the_rest_bit_identical(q_lora_rank):
    m = tiny_model(seed=6, q_lora_rank=q_lora_rank)
    args = m.args
    with torch.no_grad():                               # large weights so logits reach the hundreds, per head uneven
        for layer in m.model.layers:
            a = layer.self_attn
            q = (a.q_proj if q_lora_rank is None else a.q_b_proj).weight
            q.view(a.num_heads, -1, q.shape[1]).mul_(torch.tensor([250.0, 8.0, 150.0, 3.0])[:, None, None])
            a.kv_b_proj.weight.mul_(20.0)
            a.kv_a_proj_with_mqa.weight.mul_(20.0)
    inputs = {}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, a[0].detach().clone()))
             for i, layer in enumerate(m.model.layers)]
    opt = MuonClip.from_model(m, lr=0.0, weight_decay=0.0, qk_clip_tau=100.0)   # lr 0: only the clip changes weights
    ids = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    m(ids).sum().backward()
    for h in hooks:
        h.remove()
    recorded = [layer.self_attn.max_logits.clone() for layer in m.model.layers]
    before = [mla_logits_ref(layer.self_attn, inputs[i], args) for i, layer in enumerate(m.model.layers)]
    weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.step()
    stats = opt.last_stats
    tau = 100.0
    total_clipped = 0
    for i, layer in enumerate(m.model.layers):
        a = layer.self_attn
        s_ref = before[i].amax(dim=(0, 2, 3))                                      # (H,) fp64
        # the model's recording equals the independent max (fp32 logits vs fp64: 1e-5 relative)
        torch.testing.assert_close(recorded[i].double(), s_ref, rtol=1e-5, atol=1e-5)
        after = mla_logits_ref(a, inputs[i], args)
        s_after = after.amax(dim=(0, 2, 3))
        gamma = qk_clip_gamma(recorded[i], tau).double()
        print(f"layer {i}: S_max before {[round(v, 1) for v in s_ref.tolist()]}, after "
              f"{[round(v, 1) for v in s_after.tolist()]}")
        assert (s_after <= tau * (1 + 1e-5)).all()                               # no head above tau (fp32 tolerance)
        clipped = s_ref > tau
        assert clipped.any() and (~clipped).any()                                 # the test covers both cases
        torch.testing.assert_close(s_after[clipped], torch.full_like(s_after[clipped], tau), rtol=1e-5, atol=0)
        # every logit of head h, nope and rope terms alike, is exactly gamma_h times its old value (a q^R row scaled
        # by sqrt(gamma) would fail here). atol: the rescaled fp32 weights are rounded (2^-24 relative), and logits
        # near 0 are sums of terms as large as S_max (~400): 1e-4 absolute
        finite = torch.isfinite(before[i])
        torch.testing.assert_close(after[finite], (before[i] * gamma[None, :, None, None])[finite], rtol=1e-5,
                                   atol=1e-4)
        total_clipped += int(clipped.sum())
        # heads under tau: their rows are bit-identical; the shared rope key and everything else untouched
        prefix = f"model.layers.{i}.self_attn."
        qname = "q_proj.weight" if q_lora_rank is None else "q_b_proj.weight"
        H = a.num_heads
        for name, rows in [(qname, a.qk_nope_head_dim + a.qk_rope_head_dim),
                           ("kv_b_proj.weight", a.qk_nope_head_dim + a.v_head_dim)]:
            new, old = getattr(a, name.split(".")[0]).weight.view(H, rows, -1), weights[prefix + name].view(H, rows, -1)
            assert torch.equal(new[~clipped], old[~clipped])
        kv_b_new, kv_b_old = a.kv_b_proj.weight.view(H, -1, a.kv_lora_rank), weights[prefix + "kv_b_proj.weight"]
        assert torch.equal(kv_b_new[:, a.qk_nope_head_dim:], kv_b_old.view(H, -1, a.kv_lora_rank)[:, a.qk_nope_head_dim:])
        for name in ["kv_a_proj_with_mqa.weight", "o_proj.weight", "kv_a_layernorm.weight"] + (
                [] if q_lora_rank is None else ["q_a_proj.weight", "q_a_layernorm.weight"]):
            assert torch.equal(dict(a.named_parameters())[name], weights[prefix + name]), name
        assert torch.isneginf(a.max_logits).all()                                   # reset for the next step
    assert stats["clipped_heads"] == total_clipped
    assert stats["max_logit"] == pytest.approx([r.max().item() for r in recorded])


def test_step_order_is_update_then_bias_then_clip():
    # K2 report: optimizer step -> bias update -> QK-Clip. Replay the three by hand on a copy and compare bitwise.
    m = tiny_model(seed=16)
    ids = torch.randint(0, m.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(17))
    opt = MuonClip.from_model(m, lr=1e-2, qk_clip_tau=0.02, bias_update_speed=1e-3)   # tau 0.02: clips every head
    m(ids).logsumexp(-1).mean().backward()
    m2 = copy.deepcopy(m)
    opt2 = MuonClip.from_model(m2, lr=1e-2, qk_clip_tau=None, bias_update_speed=0.0)   # the update alone
    for p, p2 in zip(m.parameters(), m2.parameters()):
        p2.grad = p.grad.clone()
    recorded = [layer.self_attn.max_logits.clone() for layer in m2.model.layers]
    load = m2.model.layers[1].mlp.expert_load.clone()
    opt.step()
    opt2.step()                                              # 1. Muon/AdamW update with weight decay
    m2.model.layers[1].mlp.expert_load.copy_(load)
    update_routing_bias_(m2, 1e-3)                           # 2. bias update from this step's loads
    for layer, S in zip(m2.model.layers, recorded):
        layer.self_attn.max_logits.copy_(S)
    qk_clip_(m2, 0.02)                                       # 3. QK-Clip on the updated weights
    for (n, p), p2 in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(p, p2), n
    for (n, b), b2 in zip(m.named_buffers(), m2.buffers()):
        assert torch.equal(b, b2), n
    assert opt.last_stats["clipped_heads"] == 2 * m.args.num_attention_heads


def test_qk_clip_gamma_edge_cases():
    S = torch.tensor([float("-inf"), 50.0, 100.0, 400.0])
    assert torch.equal(qk_clip_gamma(S, 100.0), torch.tensor([1.0, 1.0, 1.0, 0.25]))   # -inf: nothing recorded


def test_qk_clip_refuses_to_run_without_recording():
    m = tiny_model()
    with pytest.raises(RuntimeError, match="record_max_logits"):
        qk_clip_(m, 100.0)
    assert qk_clip_(m, None)["clipped_heads"] == 0          # tau None: report only, works without recording


# ----------------------------------------------------------------------------------------------------------------
# Load balancing


def test_routing_bias_delta_rules_by_hand():
    load = torch.tensor([30.0, 10.0, 20.0, 20.0])          # mean 20: expert 0 over, expert 1 under, 2 and 3 balanced
    torch.testing.assert_close(routing_bias_delta(load, 1e-3), torch.tensor([-1e-3, 1e-3, 0.0, 0.0]))
    load = torch.tensor([50.0, 10.0, 10.0, 10.0])          # mean 20: signs (-1, 1, 1, 1), mean 0.5
    torch.testing.assert_close(routing_bias_delta(load, 1e-3, "moonlight"), torch.tensor([-1.5e-3, 5e-4, 5e-4, 5e-4]))
    assert abs(routing_bias_delta(load, 1e-3, "moonlight").sum().item()) < 1e-9


def test_bias_update_moves_overloaded_down_and_underloaded_up_after_a_real_forward():
    m = tiny_model(seed=8)
    moe = m.model.layers[1].mlp
    with torch.no_grad():
        moe.gate.weight[3] += 0.5                           # make expert 3 popular
    opt = MuonClip.from_model(m, lr=1e-3, bias_update_speed=1e-3)
    ids = torch.randint(0, m.args.vocab_size, (4, 16), generator=torch.Generator().manual_seed(9))
    m(ids).logsumexp(-1).mean().backward()
    load = moe.expert_load.clone()
    N, K, E = ids.numel(), m.args.num_experts_per_tok, m.args.n_routed_experts
    assert load.sum().item() == N * K                        # every token counted K times
    bias0 = moe.gate.e_score_correction_bias.clone()
    assert not moe.gate.e_score_correction_bias.requires_grad
    opt.step()
    delta = moe.gate.e_score_correction_bias - bias0
    mean = N * K / E
    assert load[3] > mean
    for i in range(E):                                       # b_i += 1e-3 · sign(mean - load_i)
        expected = 1e-3 * (1.0 if load[i] < mean else -1.0 if load[i] > mean else 0.0)
        assert delta[i].item() == pytest.approx(expected, abs=1e-9)
    assert torch.equal(moe.expert_load, torch.zeros(E))     # reset for the next step
    assert opt.last_stats["load_maxvio"][0] == pytest.approx((load.max() / mean - 1).item())


def test_optimizer_never_touches_the_bias():
    m = tiny_model(seed=10)
    opt = MuonClip.from_model(m, lr=1e-2, bias_update_speed=0.0)     # speed 0: only the optimizer could move it
    bias = m.model.layers[1].mlp.gate.e_score_correction_bias
    bias.fill_(0.25)
    ids = torch.randint(0, m.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(11))
    for _ in range(3):
        opt.zero_grad()
        m(ids).logsumexp(-1).mean().backward()
        opt.step()
    assert bias.grad is None and torch.equal(bias, torch.full_like(bias, 0.25))
    assert all(bias is not p for g in opt.param_groups for p in g["params"])


# ----------------------------------------------------------------------------------------------------------------
# Exact resume


def _train(m, opt, steps: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, m.args.vocab_size, (2, 16), generator=gen)
        logits = m(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_state_dict_resume_is_exact():
    # tau 0.02 (the tiny model's max logits are ~0.08) so QK-Clip fires every step and must replay exactly too
    make = lambda: MuonClip.from_model(tiny_model(seed=13), lr=1e-2, qk_clip_tau=0.02)
    opt = make()
    m = opt.model
    _train(m, opt, 3, seed=14)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "optim": opt.state_dict()}, buf)
    straight = _train(m, opt, 3, seed=15)
    assert opt.last_stats["clipped_heads"] > 0

    opt2 = make()
    m2 = opt2.model
    buf.seek(0)
    ckpt = torch.load(buf)
    m2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    resumed = _train(m2, opt2, 3, seed=15)
    assert resumed == straight
    for (n, p), p2 in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(p, p2), n
    for (n, b), b2 in zip(m.named_buffers(), m2.buffers()):
        assert torch.equal(b, b2), n                         # incl. the routing bias
