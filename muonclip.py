"""MuonClip: the Muon optimizer with QK-Clip, and the training-time load balancing of Kimi K2.

The math of one step (Kimi K2, arXiv 2507.20534 §2.1, MuonClip algorithm; Moonlight, arXiv
2502.16982 §2.2):
    Muon, per hidden matrix W (A, B) with gradient G:
        M ← μ·M + G,   U = G + μ·M (Nesterov)                       μ = 0.95
        O = NS₅(U) ≈ U_svd V_svdᵀ                                   5 Newton-Schulz steps, bf16
        W ← W·(1 − lr·wd) − lr · 0.2·sqrt(max(A, B)) · O            RMS of the update ≈ AdamW's
    AdamW on the rest (embedding, head, norm weights):  W ← W·(1 − lr·wd) − lr · m̂ / (sqrt(v̂) + ε)
    Routing bias, per expert i (DeepSeek-V3 §2.1.2):  b_i ← b_i + u · sign(mean load − load_i)
    QK-Clip, per head h with S_max,h its largest pre-softmax logit of the step:
        γ_h = min(1, τ / S_max,h);  q^C, k^C rows × sqrt(γ_h),  q^R rows × γ_h   (τ = 100)

One training step of K2 uses this file in this order:
    forward (every MLA layer records its per-head max pre-softmax logit) -> backward ->
    MuonClip.step():
      1. Muon on every hidden matrix, AdamW on the rest, decoupled weight decay 0.1 on both
         (muon_updates, adamw_update)
      2. aux-loss-free routing-bias update from the expert loads counted in that step
         (update_routing_bias_)
      3. QK-Clip: shrink the query/key rows of every head whose max logit exceeded tau (qk_clip_)
The three pieces are plain functions; MuonClip only loops over parameters and calls them in that
order.

How it differs from a textbook optimizer:
- Muon replaces the update of a matrix by the orthogonal factor U Vᵀ of its Nesterov momentum (every
  singular value ~1), computed with 5 Newton-Schulz steps in bf16 instead of an SVD. Moonshot
  rescales it by 0.2·sqrt(max(A, B)) so its RMS matches AdamW's, which lets Muon reuse AdamW's
  learning rate and weight decay (Moonlight §2.2).
- Routed experts are stored stacked, (E, I, D). Each expert is its own matrix: the whole stack is
  orthogonalised in one batched call, never flattened into one big matrix (Moonlight toy_train.py)
  and never looped over in Python.
- QK-Clip is not an optimizer rule: after the step it rescales weights so that no head's logit can
  exceed tau for the inputs of that step. For MLA it scales q^C and k^C by sqrt(gamma), q^R by
  gamma, and leaves the shared k^R alone.
- The routing bias e_score_correction_bias is a buffer that no optimizer sees: a sign rule moves it
  toward balanced load.
Tensor + expert parallelism (parallel.py): `MuonClip.from_model` reads `model.shard_dims()`.
Momentum, AdamW and weight decay are elementwise, so they run on each rank's slice as they are.
Newton-Schulz is not (NS of a slice is not a slice of NS): a matrix split inside its (A, B) dims is
gathered whole, orthogonalised on every rank, and each rank keeps its slice; the 0.2·sqrt(max(A, B))
scale uses the full shape. Expert stacks are split along the expert dim, so every expert matrix is
whole on its rank and needs no communication. QK-Clip runs on each rank's own heads.
`full_state_dict` / `load_full_state_dict` gather / re-split the optimizer state, so a checkpoint is
the same one-process file whatever the world size. Data parallelism is not implemented: it would
all-reduce expert_load (SUM) and max_logits (MAX) before step().

Checked against (tests/test_muonclip.py): Newton-Schulz vs the SVD polar factor U Vᵀ and the fp64 NS
polynomial; the batched expert stack vs a per-matrix loop; the Muon part vs torch.optim.Muon and the
AdamW part vs torch.optim.AdamW, step for step; QK-Clip vs max logits recomputed in fp64 from the
weights.

References: Muon, K. Jordan 2024 (kellerjordan.github.io/posts/muon; code KellerJordan/Muon
muon.py); Moonlight "Muon is Scalable for LLM Training", arXiv 2502.16982 §2.2 (weight decay; update
RMS, Lemma 1), App. C (bias rule), App. D (decaying norm weights); MoonshotAI/Moonlight
examples/toy_train.py (param split, momentum, AdamW settings); Kimi K2, arXiv 2507.20534 §2.1
(MuonClip, QK-Clip); DeepSeek-V3, arXiv 2412.19437 §2.1.2 (aux-loss-free balancing, sequence-wise
loss), §4.2 (values); Wang et al., "Auxiliary-Loss-Free Load Balancing", arXiv 2408.15664 (bias
rule, MaxVio).

Shapes: A, B rows and columns of one weight matrix; E routed experts, I expert intermediate, D
hidden; H heads, Dn/Dr/Dv nope/rope/value head dims, Cq/Ckv query/KV latent ranks; N sequences, T
tokens per sequence, K experts per token.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

import parallel
from attention import MLA
# re-exported: the loss lives with the MoE it balances; train.py and tests import it from here
from moe import SEQ_AUX_ALPHA, MoE, sequence_balance_loss  # noqa: F401

# Newton-Schulz quintic coefficients, tuned by K. Jordan to maximise the slope at 0
# (KellerJordan/Muon muon.py; the same in Moonlight toy_train.py and torch.optim.Muon). They trade
# exact convergence for speed: see below.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5            # Moonlight toy_train.py ns_steps=5
NS_EPS = 1e-7           # Frobenius-norm guard, KellerJordan/Muon and Moonlight
# target update RMS, "matches AdamW's typical 0.2-0.4" (Moonlight arXiv 2502.16982 §2.2)
MUON_RMS = 0.2
QK_CLIP_TAU = 100.0     # Kimi K2 tech report (arXiv 2507.20534): tau = 100
BIAS_UPDATE_SPEED = 1e-3  # DeepSeek-V3 §4.2 (gamma = 0.001 for the first 14.3T tokens)
# parameters orthogonalised together, at most (512 MB of fp32 momentum): see _chunks
MUON_BATCH_NUMEL = 2**27


# --------------------------------------------------------------------------------------------------
# Muon: pure functions


def zeropower_via_newtonschulz5(G: Tensor, steps: int = NS_STEPS) -> Tensor:
    """Approximate orthogonal polar factor U Vᵀ of every matrix in G (..., A, B), returned in bf16
    with G's shape.

    Each NS step maps every singular value x through p(x) = a·x + b·x³ + c·x⁵ and keeps the singular
    vectors, so the output is U·S'·Vᵀ with S' = p⁵(S / ‖G‖_F). The coefficients push the slope at 0
    to 3.44 at the price of not converging to 1: for S/‖G‖_F ≥ 3e-3, S' lands in [0.68, 1.21] (fp64
    iteration of p; K. Jordan's notes say "~Uniform(0.5, 1.5)"), which does not hurt training (Muon
    post). Works on any leading batch dims, e.g. (E, I, D).
    """
    # exercise: newton_schulz
    assert G.ndim >= 2, f"Newton-Schulz needs matrices, got shape {tuple(G.shape)}"
    a, b, c = NS_COEFFICIENTS
    # bf16 on purpose (Moonlight toy_train.py): NS is stable in bf16 and the result only needs to be
    # near-orthogonal
    X = G.bfloat16()
    transposed = G.size(-2) > G.size(-1)
    # iterate on the wide side so the Gram matrix X Xᵀ is the small one
    if transposed:
        X = X.mT                         # (..., A, B) with A <= B
    # Frobenius norm >= spectral norm, so after this every singular value is <= 1, inside p's basin
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + NS_EPS)
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])     # (N, A, B), N = product of the leading dims
    for _ in range(steps):
        Gram = X @ X.mT                                       # (N, A, A)
        # baddbmm(C, M1, M2, beta, alpha) = beta·C + alpha·M1 M2 with one bf16 rounding at the end
        # (torch.optim.Muon uses addmm the same way). Keller's `b * Gram + c * Gram @ Gram` rounds
        # three times: measured on 64x256 Gaussians, 3.6% relative error against fp64 NS vs 1.5%
        # here.
        P = torch.baddbmm(Gram, Gram, Gram, beta=b, alpha=c)  # (N, A, A) b·X Xᵀ + c·(X Xᵀ)²
        X = torch.baddbmm(X, P, X, beta=a)  # (N, A, B) a·X + P·X = a·X + b·X Xᵀ X + c·(X Xᵀ)² X
    X = X.reshape(*batch_shape, *X.shape[-2:])                # (..., A, B)
    if transposed:
        X = X.mT                         # back to G's orientation
    return X
    # end exercise: newton_schulz


def muon_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """Moonshot's update scale 0.2·sqrt(max(A, B)) for a matrix of shape (..., A, B); the same for
    every expert slice."""
    # exercise: muon_scale
    A, B = shape[-2], shape[-1]
    # Why: an A×B matrix with min(A, B) unit singular values has RMS sqrt(1/max(A, B)), so raw Muon
    # updates get smaller as matrices grow. Multiplying by sqrt(max(A, B)) gives RMS ~1 for every
    # shape, and 0.2 matches the update RMS of AdamW (0.2-0.4), so AdamW's lr and weight decay carry
    # over unchanged (Moonlight arXiv 2502.16982 §2.2, Lemma 1). Keller Jordan's max(1, A/B)^0.5 is
    # a different rule (torch.optim.Muon adjust_lr_fn="original").
    return MUON_RMS * math.sqrt(max(A, B))
    # end exercise: muon_scale


def muon_updates(grads: list[Tensor], momentum_buffers: list[Tensor], beta: float = 0.95,
                 nesterov: bool = True, ns_steps: int = NS_STEPS,
                 shard_dims: list[int | None] | None = None) -> list[Tensor]:
    """Muon updates of several matrices or stacks of matrices: grads[i] (..., A, B) ->
    update (..., A, B), fp32, RMS ~0.2 for every matrix. Updates each momentum buffer in place:
    M <- beta·M + G (Moonlight's accumulating buffer, toy_train.py). The caller does
    W <- W·(1 - lr·wd) - lr·update.
    Every leading index (an expert of an (E, I, D) stack) is its own matrix.

    Newton-Schulz runs once per matrix shape, not once per tensor: each matrix is turned wide side
    out (A <= B) and all of one shape — every layer's q_a_proj, every expert of every layer — are
    stacked into one batched call. The result is the same (each matrix is still orthogonalised on
    its own); small matrices are overhead-bound, so fewer and larger matmuls are faster
    (bench_muonclip.py: 2.5x on the tiny preset's Newton-Schulz).
    shard_dims[i]: the dim along which grads[i] is this rank's slice (parallel.py; None: the whole
    tensor). A split inside the matrix dims is gathered (collective: every rank calls this with the
    same list) and orthogonalised whole; a split along a leading dim (the experts of a stack) needs
    nothing. The identity at world size 1.
    """
    shard_dims = shard_dims or [None] * len(grads)
    # per tensor: its matrices as (n, A, B) with A <= B; split dim; full shape
    wide, inside, shapes = [], [], []
    for grad, buf, dim in zip(grads, momentum_buffers, shard_dims):
        buf.mul_(beta).add_(grad)  # M_t = μ·M_{t-1} + G_t (Moonlight toy_train.py)
        # Nesterov: look one momentum step ahead, U_t = G_t + μ·M_t. (KellerJordan/Muon and
        # torch.optim.Muon keep an EMA instead, M = μM + (1-μ)G: this buffer times (1-μ), a factor
        # NS's normalisation removes.)
        U = grad.add(buf, alpha=beta) if nesterov else buf
        inside.append(dim if dim is not None and dim % U.ndim >= U.ndim - 2 else None)
        U = parallel.gather_full(U, inside[-1])  # (..., A, B) the whole matrix
        shapes.append(U.shape)
        U = U.mT if U.size(-2) > U.size(-1) else U
        wide.append(U.reshape(-1, *U.shape[-2:]))
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, U in enumerate(wide):
        by_shape.setdefault(tuple(U.shape[-2:]), []).append(i)
    updates: list[Tensor] = [grad for grad in grads]  # placeholders, each replaced below
    for members in by_shape.values():
        stacked = torch.cat([wide[i] for i in members])  # (Σn, A, B)
        O = zeropower_via_newtonschulz5(stacked, ns_steps)  # (Σn, A, B) bf16
        for i, part in zip(members, O.split([wide[i].shape[0] for i in members])):
            A, B = shapes[i][-2:]
            part = part.view(*shapes[i][:-2], min(A, B), max(A, B))  # (..., A, B) wide side out
            # back to its own orientation, then this rank's slice
            part = parallel.local_slice(part.mT if A > B else part, inside[i])  # (..., A, B)
            # fp32: applied to fp32 master weights
            updates[i] = part.float().mul_(muon_scale(shapes[i]))
    return updates


def muon_update(grad: Tensor, momentum_buffer: Tensor, beta: float = 0.95, nesterov: bool = True,
                ns_steps: int = NS_STEPS, shard_dim: int | None = None) -> Tensor:
    """The Muon update of one matrix or one stack of matrices (see muon_updates)."""
    return muon_updates([grad], [momentum_buffer], beta, nesterov, ns_steps, [shard_dim])[0]


def adamw_update(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> Tensor:
    """Bias-corrected Adam direction m̂ / (sqrt(v̂) + eps), same shape as grad; updates both moments
    in place.

    Same formula as torch.optim.AdamW (eps added after the bias correction). Moonlight's
    toy_train.py adds eps before it, m / (sqrt(v) + eps) · sqrt(1-β2^t)/(1-β1^t), which differs only
    while sqrt(v) ~ eps.
    """
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)                                          # m = β1·m + (1-β1)·g
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)            # v = β2·v + (1-β2)·g²
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    # sqrt(v̂) + eps, in place: one temporary
    denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction2)).add_(eps)
    # m̂ / (sqrt(v̂) + eps), reusing denom
    return torch.div(exp_avg, denom, out=denom).div_(bias_correction1)


# --------------------------------------------------------------------------------------------------
# Which parameter goes where (Moonlight toy_train.py get_optimizer)


def uses_muon(name: str, p: Tensor) -> bool:
    """Moonshot's split: Muon for every matrix (ndim >= 2) except the token embedding and the output
    head."""
    # Muon is meant for hidden layers; the embedding (a lookup of one-hot inputs) and the head train
    # better with AdamW, an empirical finding (KellerJordan/Muon docstring and post) that Moonlight
    # keeps (toy_train.py). The router gate.weight (E, D) is a matrix and goes to Muon under this
    # rule; K2's exact split is UNVERIFIED.
    return p.ndim >= 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight"))


NamedParams = list[tuple[str, nn.Parameter]]


def split_params(model: nn.Module) -> tuple[NamedParams, NamedParams]:
    """(muon, adamw) lists of (name, parameter) over the model's trainable parameters, by
    `uses_muon`."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("e_score_correction_bias"):
            raise ValueError(f"{name} is an nn.Parameter, but the routing bias must be a buffer: "
                             "it is moved by update_routing_bias_, never by a gradient "
                             "(DeepSeek-V3 §2.1.2); "
                             "register it with register_buffer")
        if p.ndim > 3:
            raise ValueError(f"{name} has shape {tuple(p.shape)}: Muon handles matrices (A, B) "
                             "and expert stacks (E, A, B) only; reshape it or route it to AdamW "
                             "explicitly")
        (muon if uses_muon(name, p) else adamw).append((name, p))
    return muon, adamw


# --------------------------------------------------------------------------------------------------
# The optimizer


class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer, then the routing-bias update and QK-Clip (MuonClip, Kimi K2
    tech report).

    Param groups carry `use_muon` (True: Muon, for (A, B) matrices and (E, A, B) expert stacks;
    False: AdamW). Both kinds get decoupled weight decay W <- W·(1 - lr·wd) with the unadjusted lr
    (Moonlight toy_train.py). If `model` is given, step() also calls update_routing_bias_(model,
    bias_update_speed) and qk_clip_(model, qk_clip_tau) (tau None: report and reset the max logits,
    clip nothing), and keeps their statistics in `last_stats` for logging. Build it with
    MuonClip.from_model or build_optimizer.
    """

    def __init__(self, param_groups: Iterable[dict], *, lr: float = 2e-4,
                 weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = NS_STEPS, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, model: nn.Module | None = None,
                 qk_clip_tau: float | None = QK_CLIP_TAU,
                 bias_update_speed: float = BIAS_UPDATE_SPEED,
                 bias_update_rule: str = "deepseek") -> None:
        # defaults: lr 2e-4 is K2's peak lr (K2 report); momentum 0.95, Nesterov, betas (0.9, 0.95),
        # eps 1e-8 and weight decay 0.1 are Moonlight toy_train.py's values
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, betas=betas, eps=eps)
        param_groups = [dict(g) for g in param_groups]
        for i, g in enumerate(param_groups):
            if not isinstance(g.get("use_muon"), bool):
                raise ValueError(f"param group {i} needs use_muon=True (Muon) or False (AdamW), "
                                 f"got {g.get('use_muon')!r}")
        if qk_clip_tau is not None and not qk_clip_tau > 0:
            raise ValueError(f"qk_clip_tau={qk_clip_tau} must be > 0 (K2 uses 100), or None to "
                             "turn QK-Clip off")
        if bias_update_rule not in ("deepseek", "moonlight"):
            raise ValueError(f"bias_update_rule={bias_update_rule!r}; "
                             "use 'deepseek' or 'moonlight'")
        super().__init__(param_groups, defaults)
        self._check_param_groups(model)
        self.model = model
        self.qk_clip_tau = qk_clip_tau
        self.bias_update_speed = bias_update_speed
        self.bias_update_rule = bias_update_rule
        self.last_stats: dict = {}
        # parameter -> the dim it is split along across ranks (parallel.py); absent = whole on every
        # rank
        dims = model.shard_dims() if hasattr(model, "shard_dims") else {}
        self.shard_dims: dict[Tensor, int] = (
            {p: dims[n] for n, p in model.named_parameters() if n in dims}
            if model is not None else {})

    @classmethod
    def from_model(cls, model: nn.Module, lr: float, *, weight_decay: float = 0.1,
                   momentum: float = 0.95, nesterov: bool = True, ns_steps: int = NS_STEPS,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                   qk_clip_tau: float | None = QK_CLIP_TAU,
                   bias_update_speed: float = BIAS_UPDATE_SPEED, bias_update_rule: str = "deepseek",
                   use_muon: bool = True) -> "MuonClip":
        """MuonClip over all trainable parameters of `model`, split by Moonshot's rule (uses_muon).

        use_muon=False puts every parameter on AdamW (the baseline of the paper's comparison);
        qk_clip_tau=None turns QK-Clip off (plain Muon). Turns on max-logit recording in every
        attention module, which QK-Clip and the logs read; the routing-bias update runs in every
        mode, because balancing is part of the model, not of Muon.
        """
        muon, adamw = split_params(model)
        if not use_muon:
            muon, adamw = [], muon + adamw
        groups = [dict(params=ps, use_muon=flag)
                  for ps, flag in ((muon, True), (adamw, False)) if ps]
        for attn in _attention_modules(model):
            attn.record_max_logits = True
        return cls(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                   ns_steps=ns_steps, betas=betas, eps=eps, model=model, qk_clip_tau=qk_clip_tau,
                   bias_update_speed=bias_update_speed, bias_update_rule=bias_update_rule)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter with a gradient, then (with a model) the bias update and
        QK-Clip."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            todo = []  # (parameter, gradient) of this group's parameters that get an update
            for p in group["params"]:
                grad = p.grad
                if grad is None and p in self.shard_dims and parallel.world_size() > 1:
                    # a rank whose experts got no token has no gradient for its slice of the stack;
                    # on one device that slice is zero rows of a gradient that exists. Zeros keep
                    # every rank's state in step.
                    grad = torch.zeros_like(p)
                # else the loss did not reach it: no update and no decay, as in torch.optim
                if grad is not None:
                    todo.append((p, grad))
            # Muon takes runs of parameters at once, so that Newton-Schulz is batched across them;
            # AdamW one by one
            for chunk in _chunks(todo, MUON_BATCH_NUMEL if group["use_muon"] else None):
                params, grads = [p for p, _ in chunk], [g for _, g in chunk]
                if group["use_muon"]:
                    for p in params:
                        # optimizer state in the parameter's dtype: keep master weights fp32
                        if not self.state[p]:
                            self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    buffers = [self.state[p]["momentum_buffer"] for p in params]
                    updates = muon_updates(grads, buffers, group["momentum"], group["nesterov"],
                                           group["ns_steps"],
                                           [self.shard_dims.get(p) for p in params])
                else:
                    updates = []
                    for p, grad in chunk:
                        state = self.state[p]
                        if not state:
                            state["step"] = 0
                            state["exp_avg"] = torch.zeros_like(p)
                            state["exp_avg_sq"] = torch.zeros_like(p)
                        state["step"] += 1
                        updates.append(adamw_update(grad, state["exp_avg"], state["exp_avg_sq"],
                                                    state["step"], group["betas"], group["eps"]))
                for p, update in zip(params, updates):
                    # decoupled weight decay with the UNadjusted lr, on every parameter incl. norms
                    # (Moonlight §2.2, App. D)
                    p.mul_(1 - lr * wd)
                    p.add_(update, alpha=-lr)
        if self.model is not None:
            # Kimi K2 tech report: optimizer step -> bias update -> QK-Clip, on the weights the step
            # just produced
            stats = update_routing_bias_(self.model, self.bias_update_speed, self.bias_update_rule)
            stats.update(qk_clip_(self.model, self.qk_clip_tau))
            self.last_stats = stats
        return loss

    def _check_param_groups(self, model: nn.Module | None) -> None:
        """Every Muon tensor is a matrix or a stack of matrices; with a model, every trainable
        parameter is in exactly one group and nothing else is (torch already rejects a tensor listed
        in two groups)."""
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        seen: set[int] = set()
        for i, g in enumerate(self.param_groups):
            labels = g.get("param_names") or [names.get(id(p), f"group {i} param {j}")
                                              for j, p in enumerate(g["params"])]
            for label, p in zip(labels, g["params"]):
                if id(p) in seen:
                    raise ValueError(f"{label} is listed twice in param group {i}; "
                                     "list each parameter once")
                seen.add(id(p))
                if g["use_muon"] and p.ndim not in (2, 3):
                    raise ValueError(f"{label} has shape {tuple(p.shape)} but is in a Muon group: "
                                     "Muon needs a matrix (A, B) or an expert stack (E, A, B); "
                                     "put it in a use_muon=False group")
                if not p.is_floating_point():
                    raise ValueError(f"{label} has dtype {p.dtype}; only floating-point tensors "
                                     "can be optimized")
        if model is None:
            return
        trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        missing = [n for k, n in trainable.items() if k not in seen]
        extra = [i for i in seen if i not in trainable]
        if missing:
            raise ValueError(f"{len(missing)} trainable parameters are in no param group, "
                             f"e.g. {missing[:3]}; add them, or set requires_grad=False to "
                             "freeze them")
        if extra:
            raise ValueError(f"{len(extra)} tensors in the param groups are not trainable "
                             "parameters of the model (frozen, or from another module); "
                             "remove them")

    def full_state_dict(self) -> dict:
        """state_dict() with the state of every split parameter gathered whole: the one-process
        optimizer state, whatever the world size (collective: every rank calls it, every rank gets
        it). For checkpoints."""
        sd = self.state_dict()
        # state_dict's integer ids, in this order
        params = [p for g in self.param_groups for p in g["params"]]
        # new inner dicts: state_dict() shares them with self.state
        sd["state"] = {i: {k: (parallel.gather_full(v, self.shard_dims.get(params[i]))
                               if _is_slice(v) else v)
                           for k, v in s.items()}
                       for i, s in sd["state"].items()}
        return sd

    def load_full_state_dict(self, sd: dict) -> None:
        """load_state_dict() of a `full_state_dict` (or a one-process state_dict): each rank keeps
        its slices."""
        params = [p for g in self.param_groups for p in g["params"]]
        sd = {**sd, "state": {i: {k: (parallel.local_slice(v, self.shard_dims.get(params[i]))
                                      .clone() if _is_slice(v) else v)
                                  for k, v in s.items()}
                              for i, s in sd["state"].items()}}
        self.load_state_dict(sd)


def _chunks(items: list[tuple[Tensor, Tensor]],
            max_numel: int | None) -> Iterable[list[tuple[Tensor, Tensor]]]:
    """Consecutive runs of (parameter, gradient) pairs of at most max_numel numbers each (None: one
    run per pair). Bounds the memory of batched Newton-Schulz: a run's momentum, stacked copies and
    updates exist at the same time. Every rank cuts at the same places (equal splits), as the
    gathers inside muon_updates require."""
    if max_numel is None:
        yield from ([item] for item in items)
        return
    run, numel = [], 0
    for item in items:
        if run and numel + item[0].numel() > max_numel:
            yield run
            run, numel = [], 0
        run.append(item)
        numel += item[0].numel()
    if run:
        yield run


def _is_slice(v) -> bool:
    """A per-element state tensor (momentum, Adam moments), shaped like its parameter; not a step
    count."""
    return isinstance(v, Tensor) and v.ndim > 0


def build_optimizer(name: str, model: nn.Module, lr: float, **kwargs) -> MuonClip:
    """The three optimizers of the paper's comparison: 'muonclip' (K2), 'muon' (no QK-Clip), 'adamw'
    (no Muon)."""
    if name == "muonclip":
        return MuonClip.from_model(model, lr, **kwargs)
    if name == "muon":
        return MuonClip.from_model(model, lr, **{**kwargs, "qk_clip_tau": None})
    if name == "adamw":
        return MuonClip.from_model(model, lr, **{**kwargs, "qk_clip_tau": None, "use_muon": False})
    raise ValueError(f"optimizer {name!r} is not one of 'muonclip', 'muon', 'adamw'")


# --------------------------------------------------------------------------------------------------
# Load balancing (DeepSeek-V3 report, arXiv 2412.19437, §2.1.2)


def _moe_modules(model: nn.Module) -> list[MoE]:
    """The model's MoE layers (moe.MoE): their expert_load buffers and routing biases."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def routing_bias_delta(load: Tensor, speed: float, rule: str = "deepseek") -> Tensor:
    """Change of the routing bias for one MoE layer: load (E,) tokens per expert -> delta (E,) fp32.

    'deepseek' (DeepSeek-V3 §2.1.2; Wang et al. 2408.15664): delta_i = speed · sign(mean_load -
    load_i), so over-loaded experts get less attractive and under-loaded ones more. 'moonlight'
    (Moonlight App. C): delta_i = speed · (sign(e_i) - mean_j sign(e_j)), the same minus its mean,
    which keeps sum(b) from drifting and changes no top-k choice. Which rule K2 used is UNVERIFIED
    (neither the Kimi K2 report nor its config says).
    """
    # exercise: bias_update
    load = load.float()  # fp32: e_score_correction_bias is fp32 in the checkpoint
    # mean_load = T·K/E (DeepSeek-V3 §2.1.2); equal to load.mean() because every token is routed to
    # exactly K experts
    err = load.mean() - load  # (E,), > 0 for under-loaded experts
    direction = torch.sign(err)
    if rule == "moonlight":
        direction = direction - direction.mean()
    elif rule != "deepseek":
        raise ValueError(f"rule={rule!r}; use 'deepseek' or 'moonlight'")
    return speed * direction
    # end exercise: bias_update


@torch.no_grad()
def update_routing_bias_(model: nn.Module, speed: float = BIAS_UPDATE_SPEED,
                         rule: str = "deepseek") -> dict:
    """Move every MoE layer's e_score_correction_bias toward balanced load, then zero expert_load.

    Uses the tokens counted since the last call (all micro-batches of the step). speed 0 only
    measures and resets (DeepSeek-V3 sets gamma = 0 for its last 500B tokens). Returns
    {"load_maxvio": per layer (max_i load_i - mean) / mean, 0 = perfect balance (MaxVio of arXiv
    2408.15664)}; layers that routed no token report 0.
    """
    maxvio = []
    for moe in _moe_modules(model):
        load = moe.expert_load.float()                                      # (E,)
        mean = load.mean()
        maxvio.append(((load.max() - mean) / mean).item() if mean > 0 else 0.0)
        if speed and mean > 0:
            moe.gate.e_score_correction_bias.add_(routing_bias_delta(load, speed, rule))
        moe.expert_load.zero_()
    return {"load_maxvio": maxvio}


# --------------------------------------------------------------------------------------------------
# QK-Clip (Kimi K2 tech report, arXiv 2507.20534)


def _attention_modules(model: nn.Module) -> list[MLA]:
    """The model's attention layers (attention.MLA): their max_logits buffers and query/key
    weights."""
    return [m for m in model.modules() if isinstance(m, MLA)]


def qk_clip_gamma(max_logits: Tensor, tau: float) -> Tensor:
    """Per-head factor gamma = min(1, tau / S_max): max_logits (H,) -> gamma (H,) fp32; exactly 1.0
    where S_max <= tau."""
    S = max_logits.float()  # fp32: the recorded logits are fp32
    # where(), not min(1, tau/S): a head that recorded nothing has S = -inf, and tau / -inf = -0.0
    # would zero it
    return torch.where(S > tau, tau / S, torch.ones_like(S))


@torch.no_grad()
def qk_clip_(model: nn.Module, tau: float | None = QK_CLIP_TAU) -> dict:
    """Rescale the q/k rows of every head whose recorded max logit exceeded tau, then reset the
    records.

    Per head h with gamma_h < 1 (Kimi K2 tech report): q_b_proj (or q_proj) rows of q^C
    x sqrt(gamma_h), rows of q^R x gamma_h; kv_b_proj rows of k^C x sqrt(gamma_h); v rows,
    kv_a_proj_with_mqa (the shared k^R), q_a_proj, norms and o_proj untouched. Every logit of head h
    is then exactly gamma_h times what it was, so for this step's inputs the largest one becomes
    tau. Heads at or under tau are bit-identical (multiplied by exactly 1.0).
    S_max is the logit as fed to softmax, YaRN's m² included; the report writes q·k/sqrt(d), and
    which of the two K2 clips is UNVERIFIED (the Kimi K2 tech report does not say). tau=None only
    reads and resets.
    Returns {"max_logit": per-layer max over heads (before clipping),
    "clipped_heads": total count, "clipped_per_layer": per-layer counts}.
    """
    max_per_layer, clipped_per_layer = [], []
    for attn in _attention_modules(model):
        if tau is not None and not attn.record_max_logits:
            raise RuntimeError("QK-Clip needs the max logits of the forward pass, but "
                               f"record_max_logits is False on {type(attn).__name__}; set it True "
                               "(MuonClip.from_model does) or pass qk_clip_tau=None")
        S = attn.max_logits  # (H,) fp32, max since the last reset
        max_per_layer.append(S.max())
        if tau is not None:
            gamma = qk_clip_gamma(S, tau)                                   # (H,)
            clipped = (gamma < 1).sum()
            clipped_per_layer.append(clipped)
            if clipped:
                _scale_qk_rows_(attn, gamma)
        attn.max_logits.fill_(float("-inf"))  # next step records afresh
    # under tensor parallelism each rank clipped its own heads (H/W of them); the statistics cover
    # all heads
    if max_per_layer:
        max_per_layer = parallel.all_reduce_(torch.stack(max_per_layer), "max").tolist()
    if clipped_per_layer:
        clipped_per_layer = [int(c) for c in parallel.all_reduce_(torch.stack(clipped_per_layer))]
    return {"max_logit": max_per_layer, "clipped_heads": sum(clipped_per_layer),
            "clipped_per_layer": clipped_per_layer}


def _scale_qk_rows_(attn: nn.Module, gamma: Tensor) -> None:
    """Apply per-head gamma (H,) to the query and key rows of one MLA module, in the checkpoint's
    row layout."""
    # exercise: qk_clip
    H, Dn, Dr = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    root = gamma.sqrt()  # (H,); sqrt(1.0) == 1.0 exactly
    q = (attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj).weight  # (H·(Dn+Dr), Cq or D)
    qh = q.view(H, Dn + Dr, q.size(-1))  # (H, Dn+Dr, Cq); per head [q^C | q^R]
    # q^C·k^C gets sqrt·sqrt = gamma; q^R·k^R gets gamma from q^R alone, because k^R is shared by
    # all heads (K2 report)
    qh[:, :Dn].mul_(root.to(q.dtype)[:, None, None])
    qh[:, Dn:].mul_(gamma.to(q.dtype)[:, None, None])
    kv = attn.kv_b_proj.weight                                              # (H·(Dn+Dv), Ckv)
    kvh = kv.view(H, -1, kv.size(-1))  # (H, Dn+Dv, Ckv); per head [k^C | v]
    kvh[:, :Dn].mul_(root.to(kv.dtype)[:, None, None])  # v rows untouched: values are not logits
    # end exercise: qk_clip
