"""Protects MoE routing and dispatch: the correction bias picks experts but never weights them (DeepSeek-V3 §2.1.2),
dropped groups are masked with -inf, weights are renormalised and scaled, and the fast paths (moe_grouped,
moe_segments) equal moe_reference, forward and gradients (also at sizes and dtypes torch._grouped_mm rejects); the
size-dependent choice between them never changes a result beyond rounding.
Compares against: a dense all-experts MoE written here (every expert on every token, masked by the routing weights),
a router written here from DeepSeek-V3's noaux_tc rule in float64, and hand-made 4-expert cases.
Tolerances: fp32 1e-5 relative; bf16 paths within 2x the bf16 reference's own error against fp64.
Run: pytest tests/test_moe.py -q   (CPU, seconds)"""
import pytest
import torch
import torch.nn.functional as F

import moe as MOE
from conftest import random_model, tiny_args


def make_moe(kind="k2", seed=0, **overrides) -> MOE.MoE:
    args = tiny_args(kind, **overrides)
    torch.manual_seed(seed)
    m = MOE.MoE(args)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
        m.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    return m.eval()


def dense_all_experts(x, weights, idx, experts):
    """Independent twin: run EVERY expert on EVERY token in float64, then keep each token's routed ones."""
    x = x.double()
    g = torch.einsum("nd,eid->nei", x, experts.gate_proj.double())
    u = torch.einsum("nd,eid->nei", x, experts.up_proj.double())
    y = torch.einsum("nei,edi->ned", F.silu(g) * u, experts.down_proj.double())  # (N, E, D)
    w = torch.zeros(x.shape[0], experts.num_experts, dtype=torch.float64)
    w.scatter_add_(1, idx, weights.double())  # (N, E) routing weight, 0 for experts not chosen
    return (w[..., None] * y).sum(1)


def router_reference(x, weight, bias, n_group, topk_group, k, scale):
    """DeepSeek-V3's noaux_tc router (inference/model.py Gate) in float64, group by group with Python loops."""
    s = torch.sigmoid(x.double() @ weight.double().T)
    c = s + bias.double()
    N, E = c.shape
    idx = []
    for n in range(N):
        size = E // n_group
        groups = sorted(range(n_group), key=lambda j: -c[n, j * size:(j + 1) * size].topk(2).values.sum().item())
        allowed = [e for j in groups[:topk_group] for e in range(j * size, (j + 1) * size)]
        idx.append(sorted(allowed, key=lambda e: -c[n, e].item())[:k])
    idx = torch.tensor(idx)
    w = s.gather(1, idx)
    return w / w.sum(-1, keepdim=True) * scale, idx


@pytest.mark.parametrize("kind", ["k2", "deepseek"])
def test_router_matches_spec_reference(kind):
    m = make_moe(kind, seed=1)
    x = torch.randn(64, m.gate.weight.shape[1], generator=torch.Generator().manual_seed(1))
    w, idx, scores = m.gate(x)
    rw, ridx = router_reference(x, m.gate.weight, m.gate.e_score_correction_bias, m.gate.n_group,
                                m.gate.topk_group, m.gate.top_k, m.gate.routed_scaling_factor)
    assert torch.equal(idx.sort(-1).values, ridx.sort(-1).values)
    order_ours, order_ref = idx.argsort(-1), ridx.argsort(-1)
    torch.testing.assert_close(w.gather(1, order_ours).double(), rw.gather(1, order_ref), rtol=1e-6, atol=1e-7)
    # normalised weights sum to routed_scaling_factor
    torch.testing.assert_close(w.sum(-1), torch.full((64,), m.gate.routed_scaling_factor), rtol=1e-6, atol=0)


def test_bias_selects_but_never_weights():
    """Hand-made 4 experts, top-2: a huge bias forces expert 3 in, but its weight is its unbiased sigmoid score."""
    args = tiny_args("k2", n_routed_experts=4, num_experts_per_tok=2, hidden_size=64)
    gate = MOE.Gate(args)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor([2.0, 1.0, 0.0, -3.0])  # logits = x0 · these
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    x = torch.zeros(1, 64)
    x[0, 0] = 1.0
    w, idx, s = gate(x)
    assert sorted(idx[0].tolist()) == [0, 3]  # without the bias it would be [0, 1]
    s0, s3 = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-3.0))
    expect = torch.tensor([s0, s3]) / (s0 + s3) * args.routed_scaling_factor
    torch.testing.assert_close(w[0][idx[0].argsort()], expect, rtol=1e-6, atol=0)


def test_dropped_groups_are_minus_inf_not_zero():
    """2 groups of 2, keep 1. Biased scores of the kept group are negative; a 0.0 fill would let a dropped expert win."""
    args = tiny_args("k2", n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, hidden_size=64)
    gate = MOE.Gate(args)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor([3.0, 2.0, -3.0, -4.0])
        gate.e_score_correction_bias.copy_(torch.tensor([-2.0, -2.0, -0.5, -0.5]))
    x = torch.zeros(1, 64)
    x[0, 0] = 1.0
    # biased: [0.953-2, 0.881-2, 0.047-0.5, 0.018-0.5] = [-1.05, -1.12, -0.45, -0.48]: group 1 wins (sum -0.93)
    # keep group 1 = experts {2, 3}; with a 0.0 fill experts 0/1 (0.0 > -0.45) would be picked instead
    _, idx, _ = gate(x)
    assert sorted(idx[0].tolist()) == [2, 3]


@pytest.mark.parametrize("kind", ["k2", "deepseek", "moonlight"])
@pytest.mark.parametrize("n", [1, 7, 129])
def test_reference_and_grouped_match_dense(kind, n):
    m = make_moe(kind, seed=n)
    x = torch.randn(n, m.gate.weight.shape[1], generator=torch.Generator().manual_seed(n))
    w, idx, _ = m.gate(x)
    ref = dense_all_experts(x, w, idx, m.experts)
    for fn in (MOE.moe_reference, MOE.moe_grouped, MOE.moe_segments):
        out = fn(x, w, idx, m.experts)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("dtype,D,I", [(torch.float32, 45, 7), (torch.float32, 46, 12), (torch.bfloat16, 44, 12),
                                       (torch.float64, 48, 24)])
def test_grouped_handles_what_grouped_mm_rejects(dtype, D, I):
    """torch._grouped_mm rejects rows whose byte stride is not a multiple of 16 ("strides should be multiple of 16
    bytes": fp32 sizes not divisible by 4, bf16 not by 8) and float64. moe_grouped must still equal the dense
    reference there."""
    m = make_moe("k2", seed=11, hidden_size=D, moe_intermediate_size=I).to(dtype)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(11)).to(dtype)
    w, idx, _ = m.gate(x)
    ref = dense_all_experts(x, w, idx, m.experts)
    err_ref = (MOE.moe_reference(x, w, idx, m.experts).double() - ref).abs().max().item()
    for fn in (MOE.moe_grouped, MOE.moe_segments):
        err = (fn(x, w, idx, m.experts).double() - ref).abs().max().item()
        # fp32: 1e-5 of the scale; bf16: within twice the reference loop's own bf16 error
        assert err <= max(2 * err_ref, 1e-5 * ref.abs().max().item()), f"{fn.__name__} {err:.2e} vs {err_ref:.2e}"


def test_float64_inputs_sum_in_float64():
    """x, routing weights and experts all in float64 (tests/test_kernels.py's exact reference): every path runs
    (it used to stop at index_add_ with "self (Float) and source (Double)") and agrees with the float64 dense
    twin to float64 rounding, not float32's."""
    m = make_moe("k2", seed=12).double()
    x = torch.randn(40, m.gate.weight.shape[1], generator=torch.Generator().manual_seed(12)).double()
    w, idx, _ = m.gate(x)
    w = w.double()
    ref = dense_all_experts(x, w, idx, m.experts)
    for fn in (MOE.moe_reference, MOE.moe_grouped, MOE.moe_segments):
        out = fn(x, w, idx, m.experts)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12 * ref.abs().max().item())
    out = MOE.moe_grouped(x[:2], w[:2], idx[:2], m.experts)  # the decode case (pairs <= experts)
    torch.testing.assert_close(out, ref[:2], rtol=0, atol=1e-12 * ref.abs().max().item())


def test_experts_with_no_tokens_and_skewed_routing():
    m = make_moe("k2", seed=3)
    x = torch.randn(50, m.gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    idx = torch.stack([torch.zeros(50, dtype=torch.long), torch.full((50,), 5)], 1)  # only experts 0 and 5 used
    w = torch.rand(50, 2, generator=torch.Generator().manual_seed(4))
    ref = dense_all_experts(x, w, idx, m.experts)
    for fn in (MOE.moe_reference, MOE.moe_grouped, MOE.moe_segments):
        torch.testing.assert_close(fn(x, w, idx, m.experts).double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def _outputs_and_grads(m, x, fn):
    """fn's output and the gradients of x, the router and the expert stacks, for one fixed projection of it."""
    m.zero_grad()
    x.grad = None
    w, idx, _ = m.gate(x)
    out = fn(x, w, idx, m.experts)
    (out * torch.linspace(-1, 1, x.shape[1])).sum().backward()
    return [out.detach(), x.grad.clone(), m.gate.weight.grad.clone()] + [
        torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in m.experts.parameters()]


# random configs: expert counts that no thread count divides (7, 13), more experts than tokens (empty experts),
# a single token, the decode case (pairs <= experts) and sizes _grouped_mm rejects (D = 45)
@pytest.mark.parametrize("n,E,K,D", [(1, 8, 2, 64), (2, 8, 2, 64), (33, 8, 2, 64), (5, 13, 3, 48), (64, 7, 2, 45),
                                     (200, 13, 4, 64)])
def test_fast_paths_equal_reference_forward_and_gradients(n, E, K, D):
    m = make_moe("k2", seed=9 + n, n_routed_experts=E, num_experts_per_tok=K, hidden_size=D)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(n), requires_grad=True)
    ref = _outputs_and_grads(m, x, MOE.moe_reference)
    for fn in (MOE.moe_grouped, MOE.moe_segments):
        got = _outputs_and_grads(m, x, fn)
        for name, a, b in zip(["out", "x", "router", "gate", "up", "down"], ref, got):
            # fp32, different summation orders: 1e-5 of each tensor's scale
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item() + 1e-12,
                                       msg=lambda e: f"{fn.__name__} {name}: {e}")


def test_bf16_paths_within_twice_reference_error():
    m = make_moe("k2", seed=2)
    x = torch.randn(200, m.gate.weight.shape[1], generator=torch.Generator().manual_seed(2))
    w, idx, _ = m.gate(x)
    ref64 = dense_all_experts(x, w, idx, m.experts)
    mb = make_moe("k2", seed=2).to(torch.bfloat16)
    xb = x.bfloat16()
    err_ref = (MOE.moe_reference(xb, w, idx, mb.experts).double() - ref64).abs().max()
    err_grp = (MOE.moe_grouped(xb, w, idx, mb.experts).double() - ref64).abs().max()
    assert err_grp <= 2 * err_ref + 1e-6, f"grouped {err_grp:.2e} vs reference {err_ref:.2e}"


def test_routing_bias_stays_fp32_and_load_is_counted():
    model = random_model(tiny_args("k2"), seed=0).to(torch.bfloat16)
    moe = model.model.layers[1].mlp
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.weight.dtype == torch.bfloat16
    model.train()
    ids = torch.randint(0, 320, (2, 10))
    model(ids)
    assert moe.expert_load.sum().item() == 2 * 10 * moe.gate.top_k
    model.eval()
    model(ids)  # eval forwards do not count
    assert moe.expert_load.sum().item() == 2 * 10 * moe.gate.top_k


def test_impl_choice_is_explicit():
    cpu = torch.device("cpu")
    assert MOE.pick_expert_impl("auto", cpu)[0] == "auto"  # on a CPU "auto" is decided per call, by its size
    assert MOE.pick_expert_impl("reference", cpu, torch.float32) == ("reference", "requested explicitly")
    assert MOE.pick_expert_impl("segments", cpu)[0] == "segments"
    with pytest.raises(RuntimeError, match="cuda"):
        MOE.pick_expert_impl("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="expert impl"):
        MOE.pick_expert_impl("fast", torch.device("cpu"))
    model = random_model(tiny_args("k2"))
    ids = torch.randint(0, 320, (1, 16))
    outs = []
    with torch.no_grad():
        for impl in ("reference", "grouped", "segments", "auto"):
            model.set_expert_impl(impl)
            outs.append(model(ids))
    for b in outs[1:]:
        torch.testing.assert_close(b, outs[0], rtol=0, atol=1e-5 * outs[0].abs().max().item())


def _train_step_results(model, ids):
    model.zero_grad()
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_path_choice_never_changes_results(monkeypatch, dtype):
    """Whichever sorted path the cache-size rule picks, a training step gives the same loss and gradients: force
    each. fp32: to 1e-5 of each tensor's scale (the two sum in the same order; BLAS may round a product differently
    by the buffer's address); bf16: both within twice the reference loop's own distance from the fp32 step."""
    model = random_model(tiny_args("k2"), seed=4).train()
    ids = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(4))
    model.set_expert_impl("reference")
    exact = _train_step_results(model, ids)  # fp32 reference loop
    model = model.to(dtype)
    results = {}
    for impl in ("reference", "grouped", "segments"):
        model.set_expert_impl(impl)
        results[impl] = _train_step_results(model, ids)
    for impl in ("grouped", "segments"):
        for e, r, a in zip(exact, results["reference"], results[impl]):
            if dtype == torch.float32:
                torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * r.abs().max().item() + 1e-12)
            else:
                err_ref, err = (r.float() - e).abs().max().item(), (a.float() - e).abs().max().item()
                assert err <= 2 * err_ref + 1e-6, f"{impl}: {err:.2e} vs the reference loop's {err_ref:.2e}"
    # and "auto" is one of them, chosen by a pure function of the call: the same pick on every call
    model.set_expert_impl("auto")
    picks = []
    monkeypatch.setattr(MOE, "SORTED_PATHS", {k: (lambda f, k=k: lambda *a: picks.append(k) or f(*a))(f)
                                              for k, f in MOE.SORTED_PATHS.items()})
    for _ in range(2):
        _train_step_results(model, ids)
    assert len(picks) == 4 and len(set(picks)) == 1  # 2 MoE layers x 2 steps, one choice


def test_cpu_rule_follows_the_cache_size(monkeypatch):
    """grouped while the sorted arrays fit the reported cache, segments beyond; training counts twice the bytes;
    widths torch._grouped_mm rejects (D = 45 fp32) and float64 take segments whatever the size."""
    assert MOE._cache_bytes.__wrapped__() >= 0  # the real reader runs on this platform
    m = make_moe("k2", seed=6)
    D = m.gate.weight.shape[1]
    x = torch.randn(100, D, generator=torch.Generator().manual_seed(6))
    w, idx, _ = m.gate(x)
    live = idx.numel() * D * (4 + 4)  # fp32 rows + fp32 outputs, forward only
    monkeypatch.setattr(MOE, "_cache_bytes", lambda: live)
    with torch.no_grad():
        assert MOE.cpu_sorted_path(x, idx, m.experts)[0] == "grouped"
        monkeypatch.setattr(MOE, "_cache_bytes", lambda: live - 1)
        assert MOE.cpu_sorted_path(x, idx, m.experts)[0] == "segments"
    monkeypatch.setattr(MOE, "_cache_bytes", lambda: live)
    assert MOE.cpu_sorted_path(x, idx, m.experts)[0] == "segments"  # grad enabled (parameters): twice the bytes
    monkeypatch.setattr(MOE, "_cache_bytes", lambda: 1 << 40)
    for dtype, width in ((torch.float32, 45), (torch.float64, 48)):
        mm = make_moe("k2", seed=6, hidden_size=width).to(dtype)
        xx = torch.randn(40, width).to(dtype)
        assert MOE.cpu_sorted_path(xx, mm.gate(xx)[1], mm.experts)[0] == "segments"


def test_fused_autograd_wrapper_with_a_stand_in_kernel(monkeypatch):
    """The autograd wrapper around the CUDA kernel, on CPU: a stand-in `moe_forward` (the reference in fp32) checks
    that forward passes the right tensors and that backward (recomputed through moe_grouped) gives the reference's
    gradients. The real kernel is compared in tests/test_kernels.py on a GPU."""
    class StandIn:
        @staticmethod
        def moe_forward(x, idx, weights, gate, up, down):
            stack = MOE.Experts(gate.shape[0], gate.shape[2], gate.shape[1])
            stack.gate_proj.data, stack.up_proj.data, stack.down_proj.data = gate, up, down
            return MOE.moe_reference(x, weights, idx, stack)

    monkeypatch.setattr(MOE, "_ext", StandIn)
    m = make_moe("k2", seed=10)
    x = torch.randn(21, m.gate.weight.shape[1], generator=torch.Generator().manual_seed(10), requires_grad=True)
    results = []
    for impl in ("reference", "cuda"):
        m.zero_grad()
        x.grad = None
        w, idx, _ = m.gate(x)
        out = MOE.run_experts(impl, x, w, idx, m.experts)
        (out * torch.linspace(-1, 1, x.shape[1])).sum().backward()
        results.append([out.detach(), x.grad.clone(), m.gate.weight.grad.clone()]
                       + [p.grad.clone() for p in m.experts.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    impl, why = MOE.pick_expert_impl("auto", torch.device("cuda"), torch.float32)
    assert impl == "grouped" and "bf16-only" in why


def test_sequence_balance_loss_against_a_loop():
    gen = torch.Generator().manual_seed(12)
    N, T, E, K, alpha = 3, 10, 6, 2, 1e-4
    scores = torch.rand(N, T, E, generator=gen, dtype=torch.float64).requires_grad_()
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N * T)]).view(N, T, K)
    loss = MOE.sequence_balance_loss(scores, idx, E, K, alpha)
    ref = 0.0
    for n in range(N):                                       # DeepSeek-V3 §2.1.2, one sequence at a time
        for i in range(E):
            f = E / (K * T) * sum(int(i in idx[n, t].tolist()) for t in range(T))
            P = sum(scores[n, t, i] / scores[n, t].sum() for t in range(T)) / T
            ref = ref + f * P
    ref = alpha * ref / N
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    loss.backward()
    assert scores.grad.abs().sum() > 0                       # the gradient flows through the scores, not f
    # perfect balance (uniform scores, every expert chosen equally often) gives exactly alpha
    uniform = torch.full((1, E, E), 0.5)
    rotate = torch.stack([torch.tensor([t, (t + 1) % E]) for t in range(E)])[None]
    assert MOE.sequence_balance_loss(uniform, rotate, E, K, alpha).item() == pytest.approx(alpha)
