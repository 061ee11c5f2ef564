"""Classroom exercises cut from the real code: a student rewrites one marked region, a check
grades it.

For a student:
    python exercises.py                 the exercises: name, file, concept, level, minutes, compared
                                        against
    python exercises.py start rope      copies the modules into lab/ and replaces the `rope` region
                                        of lab/attention.py by a stub stating the task (never the
                                        repository)
    python exercises.py check rope      grades lab/: PASS/FAIL per check, a score, and a diagnostic
                                        that names the likely mistake ("half-split pairs ...") or
                                        the largest error
    python exercises.py hint rope       the next hint (one more per call); `show rope` prints the
                                        task again
    python exercises.py solution rope   the reference region, exactly as it stands in the repository
    python exercises.py tour            one token through a tiny model: each step, its shapes,
                                        its file:line
For a teacher: `grade --json FILE` grades every started exercise of a workspace (a table, and JSON
per check); `bench` times every exercise's check against the reference. TEACHING.md has a 2-hour
lab, a one-week sequence and how to collect a class's JSON. `--lab DIR` (or K2_LAB in the
environment) moves the workspace from ./lab.

Where the exercises live. A region is marked in the real module by two one-line comments at the
indentation of its body, `# exercise: NAME` and `# end exercise: NAME`, so the reference code is the
solution and cannot drift from the exercise. `start` copies the modules and puts the stub between
the markers in lab/FILE; `check` runs the checks in a fresh Python process with lab/ first on
sys.path, so `import attention` (and everything it imports) gets the workspace's copies. A check
draws fresh random inputs (the seed is printed; `--seed` repeats a run) of shapes the statement does
not reveal, and a timeout stops a student's infinite loop. A region must be a block whose
replacement by a stub (comments + `raise NotImplementedError`) keeps its module importable: a
function body, or a statement block inside one.

The Exercise API: how to add an exercise (the three sections after the API are complete examples).
1. Put the two markers around the region in the module; nothing else changes there.
2. Write the truth here, independently of the module: an fp64 naive recomputation or hand-computed
   values; and the output of each known mistake, computed the same way. Where transformers has the
   function, a test in tests/test_exercises.py checks the truth against it (importing transformers
   takes seconds: too slow for a student's check).
3. Write checks, functions `check_WHAT(lab) -> None`; the first paragraph of the docstring says what
   is verified. `lab.MODULE` is the workspace's module (`lab.attention.apply_rope`); `lab.gen` is a
   torch.Generator seeded afresh for this check, `lab.randint(lo, hi)` and `lab.uniform(lo, hi)`
   draw from it. A check raises `CheckFailed(message)` (`expect_close` does, naming the known
   mistake whose output matches) or `CheckSkipped(reason)`; any other exception is the student's,
   and is reported at the student's own line. `torch` here is imported on first use, so that the
   command line starts at once: write `torch.Tensor`, not `Tensor`, outside annotations.
4. `register(Exercise(...))` in a new section above the plumbing, with its `Mistake`s: a description
   (the diagnostic must contain it) and the source edits (old -> new) that plant the mistake in the
   reference region. tests/test_exercises.py then proves, for every registered exercise, that the
   stub fails, the reference passes, each planted mistake (at least two) fails with its diagnostic,
   and that the markers are intact. `python exercises.py bench` times the new check.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from torch import Tensor


class _Torch:
    """`torch`, imported on its first use: `list`, `start`, `hint`, `solution` and the parent
    process of `check` answer without loading it (seconds on a busy machine); the checks, in the
    child, load it."""

    def __getattr__(self, name: str):
        import torch as real
        return getattr(real, name)


torch = _Torch()

ROOT = Path(__file__).resolve().parent
LAB_ENV = "K2_LAB"            # environment variable that moves the workspace (as --lab DIR does)
# seconds an exercise's checks may run; the reference needs 1-2 (`bench`)
DEFAULT_TIMEOUT = 20.0
LEVELS = ("intro", "core", "advanced")


# ------------------------------------------------------------------------------------------------
# The Exercise API


class CheckFailed(AssertionError):
    """A check's verdict on the student's code: what is wrong, in words a student can act on."""


class CheckSkipped(Exception):
    """A check that cannot run here (e.g. it needs a GPU); it does not count in the score."""


@dataclass(frozen=True)
class Mistake:
    """A known wrong variant: the checks' diagnostic for it contains `description`; `edits` (old ->
    new, each `old` exactly once in the region) plant it in the reference code, for
    tests/test_exercises.py."""
    description: str
    edits: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Exercise:
    name: str                    # the marker name and the CLI argument
    file: str                    # the module holding the region, e.g. "attention.py"
    concept: str                 # a few words for the table
    level: str                   # one of LEVELS
    minutes: int                 # expected time for a student who has read the module's docstring
    against: str                 # what the checks compare against (independent truth)
    # what to compute: formula and paper reference, shapes, names in scope
    statement: str
    hints: tuple[str, ...]       # 1-3, given in order by `hint`
    checks: tuple[Callable[["Lab"], None], ...]
    mistakes: tuple[Mistake, ...]


EXERCISES: dict[str, Exercise] = {}


def register(ex: Exercise) -> Exercise:
    assert ex.name not in EXERCISES, f"exercise {ex.name!r} registered twice"
    assert ex.level in LEVELS and 1 <= len(ex.hints) <= 3 and ex.checks, ex.name
    EXERCISES[ex.name] = ex
    return ex


class Lab:
    """What a check sees: the workspace's modules as attributes (`lab.attention`), a random
    generator."""

    def __init__(self, directory: Path, seed: int):
        self.dir, self.seed = directory, seed
        self.gen = torch.Generator().manual_seed(seed)

    def __getattr__(self, module: str):
        if module.startswith("_"):
            raise AttributeError(module)
        return importlib.import_module(module)

    def randint(self, lo: int, hi: int) -> int:
        """A random integer in [lo, hi] from this check's generator."""
        return int(torch.randint(lo, hi + 1, (), generator=self.gen))

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.gen, dtype=torch.float64))


def expect_close(got, want: Tensor, what: str, atol: float = 0.0, rtol: float = 0.0,
                 mistakes: dict[str, Tensor] | None = None,
                 matrix_rtol: float | None = None) -> None:
    """Raise CheckFailed unless `got` has want's shape and |got - want| <= atol + rtol·|want|
    everywhere, or, with `matrix_rtol`, ‖got - want‖_F <= matrix_rtol·‖want‖_F for every matrix (the
    last two dims; for results whose rounding error spreads unevenly over the entries, as bf16
    Newton-Schulz).

    On a mismatch, `got` is compared with each known mistake's output (same tolerance) and the first
    that matches is named; otherwise the message gives the largest error and its index."""
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: expected a tensor, got {type(got).__name__}")
    if _close(got, want, atol, rtol, matrix_rtol):
        return
    for description, out in (mistakes or {}).items():
        if _close(got, out, atol, rtol, matrix_rtol):
            raise CheckFailed(f"{what}: wrong, and it matches a known mistake: {description}")
    if got.shape != want.shape:
        raise CheckFailed(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    bad = ~torch.isfinite(g) & torch.isfinite(w)
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise CheckFailed(f"{what}: {int(bad.sum())} of {g.numel()} values are NaN or inf, e.g. at "
                          f"index {i} (expected {w[i].item():.6g}); it matches none of the known "
                          "mistakes")
    if matrix_rtol is not None:
        rel = (g - w).norm(dim=(-2, -1)) / w.norm(dim=(-2, -1))
        i = tuple(int(v) for v in (rel == rel.max()).nonzero()[0])
        raise CheckFailed(f"{what}: relative error ‖got - expected‖_F/‖expected‖_F = "
                          f"{rel[i].item():.3g} for the matrix at index {i} (tolerance "
                          f"{matrix_rtol:g}); it matches none of the known mistakes")
    err = (g - w).abs().nan_to_num(nan=math.inf) - rtol * w.abs()
    i = tuple(int(v) for v in (err == err.max()).nonzero()[0])
    tol = f"{atol:g}" + (f" + {rtol:g}·|expected|" if rtol else "")
    raise CheckFailed(f"{what}: max error {(g - w).abs()[i].item():.3g} at index {i} (got "
                      f"{g[i].item():.6g}, expected {w[i].item():.6g}; tolerance {tol}); it "
                      "matches none of the known mistakes")


def _close(got: Tensor, want: Tensor, atol: float, rtol: float, matrix_rtol: float | None) -> bool:
    if got.shape != want.shape:
        return False
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    fin = torch.isfinite(w)
    if (not torch.equal(torch.isfinite(g), fin)
            or not torch.equal(g[~fin].nan_to_num(), w[~fin].nan_to_num())):
        return False
    if matrix_rtol is not None:
        g, w = g.nan_to_num(), w.nan_to_num()
        return bool(((g - w).norm(dim=(-2, -1)) <= matrix_rtol * w.norm(dim=(-2, -1))).all())
    return bool(((g[fin] - w[fin]).abs() <= atol + rtol * w[fin].abs()).all())


# ------------------------------------------------------------------------------------------------
# Exercise: interleaved RoPE (attention.py apply_rope)

ROPE_HALF = "half-split pairs (x_i, x_i+Dr/2) instead of interleaved pairs (x_2i, x_2i+1)"
ROPE_SIGN = "rotation in the wrong direction (by -θ: the sign of the sin terms is flipped)"
ROPE_SWAP = "cos and sin swapped"


def _angles(lab: Lab, T: int, half: int) -> Tensor:
    """Random positions times random inverse frequencies: (T, Dr/2) fp64 angles."""
    pos = torch.randint(0, 5000, (T,), generator=lab.gen).double()
    inv_freq = 10.0 ** -torch.rand(half, generator=lab.gen, dtype=torch.float64).mul(4)
    return pos[:, None] * inv_freq[None, :]


def rope_truth(x: Tensor, theta: Tensor, pairs: str = "interleaved", sign: float = 1.0,
               swap: bool = False) -> Tensor:
    """fp64, one pair at a time: y_a = x_a cos θ_i - x_b sin θ_i, y_b = x_a sin θ_i + x_b cos θ_i
    (RoFormer, arXiv 2104.09864 §3.4.2) with (a, b) = (2i, 2i+1) interleaved or (i, i+Dr/2)
    half-split. x (B, T, ..., Dr), theta (T, Dr/2). The optional arguments produce the known
    mistakes."""
    x = x.double()
    y = torch.empty_like(x)
    half = x.shape[-1] // 2
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 3)
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if pairs == "interleaved" else (i, i + half)
        cos, sin = theta[:, i].cos().view(shape), sign * theta[:, i].sin().view(shape)
        if swap:
            cos, sin = sin, cos
        y[..., a] = x[..., a] * cos - x[..., b] * sin
        y[..., b] = x[..., a] * sin + x[..., b] * cos
    return y


def _rope_mistakes(x: Tensor, theta: Tensor) -> dict[str, Tensor]:
    return {ROPE_HALF: rope_truth(x, theta, pairs="half"),
            ROPE_SIGN: rope_truth(x, theta, sign=-1.0), ROPE_SWAP: rope_truth(x, theta, swap=True)}


def check_rope_random(lab: Lab) -> None:
    """matches an fp64 recomputation on random shapes, with and without a head dim"""
    B, T, H, Dr = lab.randint(1, 3), lab.randint(2, 9), lab.randint(1, 5), 2 * lab.randint(3, 12)
    theta = _angles(lab, T, Dr // 2)
    for x in (torch.randn(B, T, H, Dr, generator=lab.gen),
              torch.randn(B, T, Dr, generator=lab.gen)):
        y = lab.attention.apply_rope(x, theta.cos().float(), theta.sin().float())
        expect_close(y, rope_truth(x, theta), f"apply_rope on x {tuple(x.shape)}", atol=1e-5,
                     mistakes=_rope_mistakes(x, theta))


def check_rope_by_hand(lab: Lab) -> None:
    """x = [1, 0, 0, 1] at angles (π/2, π) gives [0, 1, 0, -1] (worked by hand)"""
    x = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])  # (B=1, T=1, Dr=4)
    theta = torch.tensor([[math.pi / 2, math.pi]], dtype=torch.float64)
    y = lab.attention.apply_rope(x, theta.cos().float(), theta.sin().float())
    # pair (x0, x1) = (1, 0) turned by 90° is (0, 1);
    # pair (x2, x3) = (0, 1) turned by 180° is (0, -1)
    expect_close(y, torch.tensor([[[0.0, 1.0, 0.0, -1.0]]]),
                 "apply_rope([1, 0, 0, 1], θ = (π/2, π))",
                 atol=1e-6, mistakes=_rope_mistakes(x, theta))


def check_rope_dtype_and_strides(lab: Lab) -> None:
    """keeps a bf16 input's dtype and shape, and works on a slice of a wider tensor (as q[...,
    Dn:])"""
    B, T, H, Dr = lab.randint(1, 2), lab.randint(2, 6), lab.randint(2, 4), 2 * lab.randint(2, 8)
    Dn = lab.randint(1, 9)
    theta = _angles(lab, T, Dr // 2)
    # a non-contiguous view
    x = torch.randn(B, T, H, Dn + Dr, generator=lab.gen).bfloat16()[..., Dn:]
    y = lab.attention.apply_rope(x, theta.cos().float(), theta.sin().float())
    if not isinstance(y, torch.Tensor) or y.dtype != torch.bfloat16:
        raise CheckFailed("apply_rope on a bf16 input returned "
                          f"{getattr(y, 'dtype', type(y).__name__)}: compute in fp32 if you like, "
                          "but return x's dtype")
    expect_close(y, rope_truth(x, theta), f"apply_rope on a bf16 slice {tuple(x.shape)}", atol=0.02,
                 rtol=0.01, mistakes=_rope_mistakes(x, theta))


register(Exercise(
    name="rope", file="attention.py", concept="interleaved RoPE", level="intro", minutes=20,
    against="fp64 pair by pair (= transformers); by hand",
    statement="""\
Rotate every interleaved pair (x_2i, x_2i+1) of the last dim of x by its angle θ_i (RoFormer arXiv
2104.09864 §3.4.2; the pair layout of DeepSeek-V3's released weights, arXiv 2412.19437 §2.1.1,
inference/model.py apply_rotary_emb):
    y_2i = x_2i cos θ_i - x_2i+1 sin θ_i,   y_2i+1 = x_2i sin θ_i + x_2i+1 cos θ_i.
In scope: x (B, T, ..., Dr), any dtype, possibly a non-contiguous slice; cos, sin (T, Dr/2) fp32,
already cos θ and sin θ for each position t and pair i (broadcast them over B and any head
dims); torch.
Return y with x's shape and dtype (compute in fp32).""",
    hints=("Shape cos and sin to (1, T, 1, ..., 1, Dr/2) so they broadcast against the pairs; "
           "x.unflatten(-1, (-1, 2)) gives (..., Dr/2, 2) with x_2i in [..., 0] and x_2i+1 in "
           "[..., 1].",
           "A pair (a, b) rotated by θ is the complex number (a + ib)·e^{iθ}: "
           "torch.view_as_complex needs the pairs in the last dim and a contiguous fp32 tensor.",
           "Interleaved means neighbours: x_0 pairs with x_1, not with x_Dr/2 (that is the "
           "half-split layout of rotate_half, which these weights were not trained with)."),
    checks=(check_rope_random, check_rope_by_hand, check_rope_dtype_and_strides),
    mistakes=(
        Mistake(ROPE_HALF, (("torch.view_as_complex(x32.unflatten(-1, (-1, 2)))",
                             "torch.view_as_complex(x32.unflatten(-1, (2, -1)).mT.contiguous())"),
                            ("torch.view_as_real(y).flatten(-2)",
                             "torch.view_as_real(y).mT.flatten(-2)"))),
        Mistake(ROPE_SIGN, (("torch.complex(cos, sin)", "torch.complex(cos, -sin)"),)),
        Mistake(ROPE_SWAP, (("torch.complex(cos, sin)", "torch.complex(sin, cos)"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: top-p (nucleus) sampling (generate.py sample)

TOP_P_STRICT = ("the token that crosses top_p is dropped (kept only tokens whose cumulative "
                "probability stays strictly below p): the nucleus is one token too small")
TOP_P_ORDER = ("the cut made in sorted order was applied to the logits in vocabulary order (no "
               "scatter back)")
TOP_P_UNSORTED = ("the cumulative sum was taken in vocabulary order, not from the most likely "
                  "token down")


def nucleus_truth(logits: Tensor, p: float, rule: str = "right") -> Tensor:
    """The distribution top-p samples from, fp64, one row at a time (Holtzman et al., arXiv
    1904.09751 §3.1): the smallest set of most likely tokens whose probability reaches p,
    renormalised. `rule` makes the mistakes."""
    probs = logits.double().softmax(-1)
    out = torch.zeros_like(probs)
    for r in range(probs.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda j: -probs[r, j].item())
        keep, total = [], 0.0
        ids = list(range(probs.shape[1])) if rule == "unsorted" else order
        for rank, j in enumerate(ids):
            if rank > 0 and (total >= p or (rule == "strict" and total + probs[r, j].item() >= p)):
                break
            keep.append(j)
            total += probs[r, j].item()
        if rule == "order":  # the sorted cut, applied to vocabulary positions 0..n-1
            keep = list(range(len(keep)))
        mask = torch.zeros(probs.shape[1], dtype=torch.bool)
        mask[keep] = True
        q = probs[r] * mask
        out[r] = q / q.sum() if q.sum() > 0 else q
    return out


def _top_p_mistakes(logits: Tensor, p: float) -> dict[str, Tensor]:
    return {TOP_P_STRICT: nucleus_truth(logits, p, "strict"),
            TOP_P_ORDER: nucleus_truth(logits, p, "order"),
            TOP_P_UNSORTED: nucleus_truth(logits, p, "unsorted")}


def _sampled_distribution(lab: Lab, logits: Tensor, **kw) -> tuple[Tensor, Tensor]:
    """Call the lab's sample() and capture the probabilities it hands to torch.multinomial: (probs,
    ids)."""
    # the module itself: sample() looks torch.multinomial up there at each call
    import torch as module
    seen: list[Tensor] = []
    real = module.multinomial

    def spy(probs, *a, **k):
        seen.append(probs.detach().clone())
        return real(probs, *a, **k)

    module.multinomial = spy
    try:
        ids = lab.generate.sample(logits.clone(), generator=lab.gen, **kw)
    finally:
        module.multinomial = real
    if not seen:
        raise CheckFailed("sample() never called torch.multinomial: keep the sampling line after "
                          "the region")
    return seen[-1], ids


def _safe_p(lab: Lab, logits: Tensor, lo: float, hi: float) -> float:
    """A random p at least 1e-4 from every cumulative probability, so fp32 rounding cannot move the
    cut."""
    cum = logits.double().softmax(-1).sort(-1, descending=True).values.cumsum(-1)
    while True:
        p = lab.uniform(lo, hi)
        if bool(((cum - p).abs() > 1e-4).all()):
            return p


def check_top_p_random(lab: Lab) -> None:
    """samples from the renormalised nucleus of fp64 truth, for random logits, temperature and p"""
    B, V = lab.randint(2, 5), lab.randint(20, 120)
    logits = torch.randn(B, V, generator=lab.gen) * lab.uniform(1.0, 4.0)
    t = lab.uniform(0.5, 1.5)
    p = _safe_p(lab, logits / t, 0.2, 0.95)
    probs, ids = _sampled_distribution(lab, logits, temperature=t, top_p=p)
    want = nucleus_truth(logits.double() / t, p)
    expect_close(probs, want, f"distribution sampled from (B={B}, V={V}, top_p={p:.3f})", atol=1e-5,
                 mistakes=_top_p_mistakes(logits.double() / t, p))
    inside = (isinstance(ids, torch.Tensor) and ids.shape == (B,)
              and bool((want.gather(1, ids[:, None]) > 0).all()))
    if not inside:
        raise CheckFailed(f"sample() returned {ids!r}: expected {B} token ids, each inside its "
                          "row's nucleus")


def check_top_p_after_top_k(lab: Lab) -> None:
    """after top-k has masked tokens to -inf, the nucleus is taken among the survivors"""
    B, V = lab.randint(2, 4), lab.randint(30, 90)
    k = lab.randint(4, V // 2)
    logits = torch.randn(B, V, generator=lab.gen) * 3
    kth = logits.topk(k, -1).values[:, -1:]
    masked = logits.double().masked_fill(logits < kth, float("-inf"))
    p = _safe_p(lab, masked, 0.3, 0.9)
    probs, _ = _sampled_distribution(lab, logits, temperature=1.0, top_k=k, top_p=p)
    expect_close(probs, nucleus_truth(masked, p), f"distribution after top_k={k}, top_p={p:.3f}",
                 atol=1e-5, mistakes=_top_p_mistakes(masked, p))


def check_top_p_by_hand(lab: Lab) -> None:
    """probabilities (0.05, 0.5, 0.15, 0.3) with top_p 0.75 keep tokens 1 and 3: (0, 0.625, 0,
    0.375)"""
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    # sorted: 0.5 (sum above 0 < 0.75, keep), 0.3 (sum above 0.5 < 0.75, keep), 0.15 (0.8 >= 0.75,
    # drop), 0.05
    probs, _ = _sampled_distribution(lab, logits, temperature=1.0, top_p=0.75)
    expect_close(probs, torch.tensor([[0.0, 0.625, 0.0, 0.375]]),
                 "distribution for probs (0.05, 0.5, 0.15, "
                 "0.3), top_p 0.75", atol=1e-5, mistakes=_top_p_mistakes(logits, 0.75))


def check_top_p_tiny(lab: Lab) -> None:
    """a tiny top_p keeps exactly the most likely token"""
    B, V = lab.randint(2, 4), lab.randint(10, 50)
    logits = torch.randn(B, V, generator=lab.gen)
    probs, ids = _sampled_distribution(lab, logits, temperature=1.0, top_p=1e-9)
    expect_close(probs, nucleus_truth(logits, 1e-9), "distribution for top_p 1e-9", atol=1e-6,
                 mistakes=_top_p_mistakes(logits, 1e-9))
    if not (isinstance(ids, torch.Tensor) and torch.equal(ids, logits.argmax(-1))):
        raise CheckFailed("with top_p 1e-9 sample() must return the argmax "
                          f"{logits.argmax(-1).tolist()}, got {ids!r}")


register(Exercise(
    name="top_p", file="generate.py", concept="top-p (nucleus) sampling", level="intro", minutes=20,
    against="fp64 nucleus; by hand",
    statement="""\
Keep the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling,
Holtzman et al., arXiv 1904.09751 §3.1): sort each row's probabilities in descending order; a token
stays if the tokens ranked above it sum to LESS than top_p (so the token that crosses top_p stays,
and the most likely token always stays). Set the logits of every other token to -inf, in vocabulary
order: the softmax and torch.multinomial after the region renormalise and draw.
In scope: logits (B, V) fp32, already divided by the temperature and with top-k's losers at -inf;
top_p, a float in (0, 1); torch. Leave the result in `logits` (B, V).""",
    hints=("logits.sort(dim=-1, descending=True) gives the sorted values and `order`, the "
           "vocabulary id at each rank.",
           "The probability mass ranked above a token is cumsum - probs (an exclusive cumulative "
           "sum).",
           "Build the -inf mask in sorted order, then put it back in vocabulary order with "
           "scatter(-1, order, ...)."),
    checks=(check_top_p_random, check_top_p_after_top_k, check_top_p_by_hand, check_top_p_tiny),
    mistakes=(
        Mistake(TOP_P_STRICT, (("drop = probs.cumsum(dim=-1) - probs >= top_p",
                                "drop = probs.cumsum(dim=-1) >= top_p"),)),
        Mistake(TOP_P_ORDER,
                (("logits.scatter(-1, order, sorted_logits.masked_fill(drop, float(\"-inf\")))",
                               "logits.masked_fill(drop, float(\"-inf\"))"),)),
        Mistake(TOP_P_UNSORTED, (("logits.sort(dim=-1, descending=True)",
                                  "logits, torch.arange(logits.shape[-1]).expand_as(logits)"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: Newton-Schulz orthogonalisation (muonclip.py zeropower_via_newtonschulz5)

NS_ORDER = "the coefficients in the wrong order (a must multiply X, c the (X Xᵀ)² X term)"
NS_NO_NORM = ("G not divided by its Frobenius norm first (singular values above ~1.3 leave p's "
              "basin)")
NS_STACK_NORM = "one Frobenius norm for the whole stack instead of one per matrix"
NS_TALL = ("the tall matrix was not transposed: X Xᵀ is then the big A×A Gram matrix (iterate on "
           "the wide side, A <= B, and transpose back)")
# KellerJordan/Muon muon.py, written out again as the independent truth
NS_ABC = (3.4445, -4.7750, 2.0315)


def newton_schulz_truth(G: Tensor, steps: int = 5, abc: tuple[float, float, float] = NS_ABC,
                        norm: str = "matrix") -> Tensor:
    """fp64, one matrix at a time: X = G/‖G‖_F, then X <- aX + b(XXᵀ)X + c(XXᵀ)²X (Muon, K.
    Jordan 2024; Moonlight arXiv 2502.16982 §2.1). For a tall matrix this is the same polynomial of
    the singular values as on Gᵀ, so the truth needs no transpose. `abc` and `norm` ("none",
    "stack") give the mistakes."""
    a, b, c = abc
    out = torch.empty(G.shape, dtype=torch.float64)
    stack_norm = G.double().norm()
    for i, g in enumerate(G.double().reshape(-1, *G.shape[-2:])):
        X = {"matrix": g / (g.norm() + 1e-7), "stack": g / (stack_norm + 1e-7), "none": g}[norm]
        for _ in range(steps):
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        out.view(-1, *G.shape[-2:])[i] = X
    return out


def _ns_mistakes(G: Tensor) -> dict[str, Tensor]:
    return {NS_ORDER: newton_schulz_truth(G, abc=NS_ABC[::-1]),
            NS_NO_NORM: newton_schulz_truth(G, norm="none"),
            NS_STACK_NORM: newton_schulz_truth(G, norm="stack")}


def _ns_call(lab: Lab, G: Tensor) -> Tensor:
    X = lab.muonclip.zeropower_via_newtonschulz5(G)
    if not isinstance(X, torch.Tensor) or X.shape != G.shape or X.dtype != torch.bfloat16:
        raise CheckFailed(f"zeropower_via_newtonschulz5 on {tuple(G.shape)} returned "
                          f"{getattr(X, 'dtype', type(X).__name__)} "
                          f"{tuple(getattr(X, 'shape', ()))}: expected bf16 with G's shape")
    return X


def _matrices(lab: Lab, shape: tuple[int, ...], lo: float = 0.3, hi: float = 0.6) -> Tensor:
    """fp32 matrices U·diag(s)·Vᵀ with singular values spread over a factor of 10 and Frobenius
    norms drawn from [lo, hi] (by default small enough that even without the normalisation the
    iteration stays finite).
    Why not plain randn: each NS step multiplies a tiny singular value by up to 3.44, so the bf16
    rounding of the near-0 singular values of a Gaussian matrix is amplified unevenly, and a correct
    answer would fail at random (3 seeds in 400 did, at 0.05 elementwise)."""
    *batch, A, B = shape
    r = min(A, B)
    # (..., A, r)
    U = torch.linalg.qr(torch.randn(*batch, A, r, generator=lab.gen, dtype=torch.float64))[0]
    # (..., B, r)
    V = torch.linalg.qr(torch.randn(*batch, B, r, generator=lab.gen, dtype=torch.float64))[0]
    # in (0.1, 1]
    s = 10.0 ** -torch.rand(*batch, 1, r, generator=lab.gen, dtype=torch.float64)
    # (..., A, B)
    G = (U * s) @ V.mT
    norm = lo + (hi - lo) * torch.rand(*batch, 1, 1, generator=lab.gen, dtype=torch.float64)
    return (G / G.norm(dim=(-2, -1), keepdim=True) * norm).float()


# bf16 iteration against fp64, relative Frobenius error per matrix: the reference measures at most
# 3.2% on these inputs (tests/test_muonclip.py: 1.5% on 64x256, 3.6% for K. Jordan's three-rounding
# formulation); the nearest mistake (no normalisation) is 8% or more away
NS_RTOL = 0.05


def check_ns_wide_and_tall(lab: Lab) -> None:
    """matches fp64 Newton-Schulz for a wide, a tall and a square matrix"""
    n = lab.randint(6, 24)
    for shape in ((n, n + lab.randint(4, 40)), (n + lab.randint(4, 40), n), (n, n)):
        G = _matrices(lab, shape)
        expect_close(_ns_call(lab, G), newton_schulz_truth(G),
                     f"Newton-Schulz of a {shape[0]}×{shape[1]} "
                     f"matrix", matrix_rtol=NS_RTOL, mistakes=_ns_mistakes(G))


def check_ns_batched(lab: Lab) -> None:
    """orthogonalises each matrix of an (E, A, B) stack on its own"""
    E, A, B = lab.randint(2, 4), lab.randint(8, 20), lab.randint(8, 20)
    G = _matrices(lab, (E, A, B))
    G[1:] *= 7  # unequal norms: one norm for the whole stack shrinks matrix 0 far below the others
    expect_close(_ns_call(lab, G), newton_schulz_truth(G),
                 f"Newton-Schulz of an ({E}, {A}, {B}) stack",
                 matrix_rtol=NS_RTOL, mistakes=_ns_mistakes(G))


def check_ns_large_input(lab: Lab) -> None:
    """a gradient with large entries gives a finite near-orthogonal result (and zeros give zeros)"""
    A, B = lab.randint(20, 40), lab.randint(6, 16)
    G = _matrices(lab, (A, B), 100 * (A * B) ** 0.5, 200 * (A * B) ** 0.5)  # entries ~100
    expect_close(_ns_call(lab, G), newton_schulz_truth(G),
                 f"Newton-Schulz of a {A}×{B} matrix with entries "
                 f"~100", matrix_rtol=NS_RTOL, mistakes=_ns_mistakes(G))
    Z = _ns_call(lab, torch.zeros(A, B))
    if not bool((Z == 0).all()):
        raise CheckFailed("Newton-Schulz of a zero matrix must be zero (add NS_EPS to the norm)")


def check_ns_wide_side(lab: Lab) -> None:
    """iterates on the wide side: a tall A×B matrix costs as many flops as its transpose"""
    from torch.utils.flop_counter import FlopCounterMode
    B = lab.randint(8, 16)
    A = 4 * B
    G = torch.randn(A, B, generator=lab.gen)
    with FlopCounterMode(display=False) as fc:
        _ns_call(lab, G)
    # per step on the wide side (B×A): X Xᵀ 2·B²A, (X Xᵀ)² 2·B³, P X 2·B²A
    wide = 5 * (4 * B * B * A + 2 * B ** 3)
    flops = fc.get_total_flops()
    if flops > 1.5 * wide:
        raise CheckFailed(f"a {A}×{B} matrix took {flops:,} matmul flops, {flops / wide:.1f}x the "
                          f"{wide:,} of iterating on its {B}×{A} transpose: {NS_TALL}")


register(Exercise(
    name="newton_schulz", file="muonclip.py", concept="Muon's Newton-Schulz iteration",
    level="core", minutes=30,
    against="fp64 iteration; flop count",
    statement="""\
Approximate the orthogonal polar factor U Vᵀ of every matrix in G with 5 steps of the quintic
Newton-Schulz iteration (Muon, K. Jordan 2024; Moonlight arXiv 2502.16982 §2.1; Kimi K2 arXiv
2507.20534 §2.1):
X = G / (‖G‖_F + NS_EPS), then `steps` times X <- a·X + b·(X Xᵀ) X + c·(X Xᵀ)² X with (a, b, c) =
NS_COEFFICIENTS. Iterate in bf16, on the wide side: if a matrix is tall (A > B) work on its
transpose and transpose back, so that X Xᵀ is the smaller Gram matrix. Each matrix of a stack is its
own: norms per matrix.
In scope: G (..., A, B) any float dtype, any leading batch dims; steps (int); NS_COEFFICIENTS,
NS_EPS; torch.
Return X, bf16, with G's shape.""",
    hints=("X.norm(dim=(-2, -1), keepdim=True) gives one Frobenius norm per matrix of the stack; "
           "X.mT transposes the last two dims.",
           "torch.matmul/`@` broadcasts over leading dims, so one loop over the steps handles any "
           "stack.",
           "The Frobenius norm bounds the spectral norm, so after the division every singular "
           "value is at most 1: the polynomial p(x) = a x + b x³ + c x⁵ then pushes each towards "
           "~1 (it diverges above ~1.3)."),
    checks=(check_ns_wide_and_tall, check_ns_batched, check_ns_large_input, check_ns_wide_side),
    mistakes=(
        Mistake(NS_ORDER, (("a, b, c = NS_COEFFICIENTS", "c, b, a = NS_COEFFICIENTS"),)),
        Mistake(NS_NO_NORM, (("X = X / (X.norm(dim=(-2, -1), keepdim=True) + NS_EPS)", "X = X"),)),
        Mistake(NS_TALL, (("transposed = G.size(-2) > G.size(-1)", "transposed = False"),)),
        Mistake(NS_STACK_NORM, (("X.norm(dim=(-2, -1), keepdim=True)", "X.norm()"),)),
    )))


# New exercises go above this line, one section each, in the order a reader meets them in the model.
# Everything below is plumbing; the command line at the very bottom must run after every register().


# ------------------------------------------------------------------------------------------------
# Exercise: YaRN frequencies (attention.py rope_parameters)

YARN_REVERSED = ("the ramp is reversed: the high-frequency pairs (small i, many turns over the "
                 "original context) were interpolated and the low-frequency ones kept")
YARN_NO_2PI = ("the correction pair index without the 2π: a pair's wavelength is 2π/θ_i, so it "
               "turns L0·θ_i/(2π) times over the original context, not L0·θ_i")
YARN_NO_ROUND = ("the ramp's ends were not rounded outward to whole pairs (floor the start, ceil "
                 "the end, unless rope_scaling sets truncate: false)")


def yarn_truth(d: int, base: float, L0: int, s: float, beta_fast: float, beta_slow: float,
               truncate: bool = True, mistake: str = "") -> Tensor:
    """fp64, pair by pair: YaRN's "NTK-by-parts" inverse frequencies (arXiv 2309.00071 §3.2, eq.
    17-18), in the pair-index form of DeepSeek-V3 inference/model.py precompute_freqs_cis. Pair i
    has θ_i = base^(-2i/d) and wavelength λ_i = 2π/θ_i, so it turns r_i = L0/λ_i times over the
    original context L0; r_i = n at i(n) = d·ln(L0/(2πn)) / (2·ln base). γ_i ramps linearly from 0
    at i(beta_fast) to 1 at i(beta_slow); h(θ_i) = (1 - γ_i)·θ_i + γ_i·θ_i/s. `mistake` ("reversed",
    "no_2pi", "no_round") makes the mistakes."""
    turns = (lambda n: L0 / n) if mistake == "no_2pi" else (lambda n: L0 / (2 * math.pi * n))
    lo, hi = (d * math.log(turns(n)) / (2 * math.log(base)) for n in (beta_fast, beta_slow))
    if truncate and mistake != "no_round":
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    out = []
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        gamma = min(max((i - lo) / (hi - lo), 0.0), 1.0)     # 1: interpolate (divide by s)
        if mistake == "reversed":
            gamma = 1 - gamma
        out.append((1 - gamma) * theta + gamma * theta / s)
    return torch.tensor(out, dtype=torch.float64)


def _yarn_mistakes(*a, **kw) -> dict[str, Tensor]:
    return {YARN_REVERSED: yarn_truth(*a, mistake="reversed", **kw),
            YARN_NO_2PI: yarn_truth(*a, mistake="no_2pi", **kw),
            YARN_NO_ROUND: yarn_truth(*a, mistake="no_round", **kw)}


def _attn_args(lab: Lab, **kw):
    """The workspace's ModelArgs for one dense layer (no router to validate), small sizes, given
    overrides."""
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, first_k_dense_replace=1,
                intermediate_size=16, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                max_position_embeddings=1 << 17, bos_token_id=None, eos_token_id=None)
    return lab.config.ModelArgs(**{**base, **kw})


def _inv_freq(lab: Lab, args) -> Tensor:
    out = lab.attention.rope_parameters(args)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise CheckFailed(f"rope_parameters returned {type(out).__name__}: leave `inv_freq` set in "
                          f"the region (the lines after it return (inv_freq, multiplier))")
    return out[0]


def check_yarn_random(lab: Lab) -> None:
    """matches fp64 NTK-by-parts frequencies for random base, context, factor and betas, rounded or
    not"""
    d, base = 2 * lab.randint(16, 40), 10 ** lab.uniform(4.0, 6.0)
    L0, s = 2 ** lab.randint(11, 14), lab.uniform(4.0, 64.0)
    beta_fast, beta_slow = float(lab.randint(16, 48)), lab.uniform(1.0, 2.0)
    for truncate in (None, False):
        rs = {"type": "yarn", "factor": s, "original_max_position_embeddings": L0,
              "beta_fast": beta_fast, "beta_slow": beta_slow}
        if truncate is not None:
            rs["truncate"] = truncate
        args = _attn_args(lab, qk_rope_head_dim=d, rope_theta=base, rope_scaling=rs)
        want = (d, base, L0, s, beta_fast, beta_slow)
        expect_close(_inv_freq(lab, args), yarn_truth(*want, truncate=truncate is None),
                     f"inv_freq (Dr={d}, base {base:.0f}, L0 {L0}, factor {s:.2f}, beta_fast "
                     f"{beta_fast:g}, beta_slow {beta_slow:.3f}, truncate {truncate is None})",
                     atol=0, rtol=1e-5, mistakes=_yarn_mistakes(*want, truncate=truncate is None))


def check_yarn_k2(lab: Lab) -> None:
    """K2 (base 50000, L0 4096, factor 32, beta_fast = beta_slow = 1): pairs 0..19 kept, 20..31
    divided by 32"""
    # i(1) = 64·ln(4096/2π) / (2·ln 50000) = 19.16: floor 19, ceil 20,
    # so the ramp is a step between them
    k2 = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
          "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    args = _attn_args(lab, qk_rope_head_dim=64, rope_theta=50000.0, rope_scaling=k2)
    want = torch.tensor([50000.0 ** (-2 * i / 64) / (32 if i >= 20 else 1) for i in range(32)],
                        dtype=torch.float64)
    expect_close(_inv_freq(lab, args), want, "inv_freq for K2's rope_scaling", atol=0, rtol=1e-5,
                 mistakes=_yarn_mistakes(64, 50000.0, 4096, 32.0, 1.0, 1.0))


def check_yarn_deepseek_v3(lab: Lab) -> None:
    """DeepSeek-V3 (base 1e4, L0 4096, factor 40, betas 32/1): kept to pair 10, a ramp to 23, then
    /40"""
    # i(32) = 10.47 -> 10, i(1) = 22.51 -> 23: γ_i = (i - 10)/13, so θ_11 keeps 1 - (1/13)(1 - 1/40)
    # = 0.925
    ds = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    args = _attn_args(lab, qk_rope_head_dim=64, rope_theta=10000.0, rope_scaling=ds)
    ratio = [1.0] * 11 + [1.0 - (i - 10) / 13 * (1 - 1 / 40) for i in range(11, 23)] + [1 / 40] * 9
    want = torch.tensor([10000.0 ** (-2 * i / 64) * r for i, r in enumerate(ratio)],
                        dtype=torch.float64)
    expect_close(_inv_freq(lab, args), want, "inv_freq for DeepSeek-V3's rope_scaling", atol=0,
                 rtol=1e-5, mistakes=_yarn_mistakes(64, 10000.0, 4096, 40.0, 32.0, 1.0))


register(Exercise(
    name="yarn", file="attention.py", concept="YaRN frequencies (NTK-by-parts)", level="core",
    minutes=25, against="fp64 pair by pair; by hand (K2, DeepSeek-V3)",
    statement="""\
Stretch the RoPE frequencies to a longer context with YaRN's "NTK-by-parts" (arXiv 2309.00071 §3.2;
the pair-index form of DeepSeek-V3 inference/model.py precompute_freqs_cis; config key
rope_scaling).
Pair i (θ_i = freq[i]) has wavelength 2π/θ_i: it turns r_i = L0·θ_i/(2π) times over the original
context L0, and r_i = n at the pair index   i(n) = d·ln(L0 / (2π·n)) / (2·ln base).
The ramp runs from lo = i(beta_fast) to hi = i(beta_slow): round lo down and hi up to whole pairs
unless rs.get("truncate", True) is False; clamp lo >= 0 and hi <= d - 1; if lo == hi, add 0.001 to
hi.
    γ_i = clamp((i - lo) / (hi - lo), 0, 1),     inv_freq_i = (1 - γ_i)·θ_i + γ_i·θ_i / s
so the pairs that turn many times keep θ_i and the slow ones are divided by s.
In scope: d (qk_rope_head_dim, even), base (rope_theta), freq (d/2,) fp32 = base^(-2i/d), s
(factor), L0 (original_max_position_embeddings), beta_fast, beta_slow (floats), rs (the rope_scaling
dict); math, torch. Leave inv_freq, (d/2,) fp32.""",
    hints=("torch.arange(d // 2) gives every pair index i at once; .clamp(0, 1) bounds the ramp.",
           "beta_fast (many turns) gives the smaller index: fast pairs sit at the start of the "
           "vector.",
           "Check by hand: K2 (d 64, base 50000, L0 4096, s 32, betas 1/1) keeps pairs 0..19 and "
           "divides 20..31 by 32."),
    checks=(check_yarn_random, check_yarn_k2, check_yarn_deepseek_v3),
    mistakes=(
        Mistake(YARN_REVERSED, (("inv_freq = freq * (1 - ramp) + (freq / s) * ramp",
                                 "inv_freq = freq * ramp + (freq / s) * (1 - ramp)"),)),
        Mistake(YARN_NO_2PI, (("math.log(L0 / (n_rot * 2 * math.pi))", "math.log(L0 / n_rot)"),)),
        Mistake(YARN_NO_ROUND, (('if rs.get("truncate", True):', "if False:"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: YaRN's softmax scale (attention.py softmax_scale)

SCALE_ONCE = ("YaRN's m was applied once: the softmax scale takes m² (m on the query and m on the "
              "key)")
SCALE_NOPE = "1/√Dn (the nope dim only): the query·key dot product runs over Dn + Dr dims"
SCALE_KEY = ("m computed from rope_scaling's mscale, not mscale_all_dim (mscale_all_dim is the one "
             "that goes into the softmax scale)")


def scale_truth(Dn: int, Dr: int, rs: dict | None, mistake: str = "") -> Tensor:
    """fp64: (Dn + Dr)^-1/2 · m², m = 0.1·mscale_all_dim·ln(factor) + 1 for factor > 1 (YaRN arXiv
    2309.00071 §3.4, eq. 22: √(1/t) = 0.1 ln s + 1; DeepSeek-V3 inference/model.py MLA.__init__),
    applied only when rope_scaling sets mscale_all_dim. `mistake` ("once", "nope", "key") makes the
    mistakes."""
    scale = (Dn if mistake == "nope" else Dn + Dr) ** -0.5
    if rs is not None and rs.get("mscale_all_dim"):
        a = rs.get("mscale", 1.0) if mistake == "key" else rs["mscale_all_dim"]
        m = 0.1 * a * math.log(rs["factor"]) + 1 if rs["factor"] > 1 else 1.0
        scale *= m if mistake == "once" else m * m
    return torch.tensor(scale, dtype=torch.float64)


def _scale_mistakes(Dn: int, Dr: int, rs: dict | None) -> dict[str, Tensor]:
    return {SCALE_ONCE: scale_truth(Dn, Dr, rs, "once"),
            SCALE_NOPE: scale_truth(Dn, Dr, rs, "nope"), SCALE_KEY: scale_truth(Dn, Dr, rs, "key")}


def _scale(lab: Lab, args):
    got = lab.attention.softmax_scale(args)
    return torch.tensor(float(got), dtype=torch.float64) if isinstance(got, (int, float)) else got


def check_yarn_scale_random(lab: Lab) -> None:
    """matches the fp64 m²-corrected scale for random head dims, factor, mscale and
    mscale_all_dim"""
    Dn, Dr = lab.randint(4, 200), 2 * lab.randint(2, 40)
    rs = {"type": "yarn", "factor": lab.uniform(2.0, 64.0),
          "original_max_position_embeddings": 4096,
          "mscale": lab.uniform(0.3, 0.8), "mscale_all_dim": lab.uniform(0.9, 1.6)}
    args = _attn_args(lab, qk_nope_head_dim=Dn, qk_rope_head_dim=Dr, rope_scaling=rs)
    expect_close(_scale(lab, args), scale_truth(Dn, Dr, rs),
                 f"softmax_scale (Dn {Dn}, Dr {Dr}, factor "
                 f"{rs['factor']:.2f}, mscale {rs['mscale']:.3f}, mscale_all_dim "
                 f"{rs['mscale_all_dim']:.3f})",
                 atol=0, rtol=1e-9, mistakes=_scale_mistakes(Dn, Dr, rs))


def check_yarn_scale_k2(lab: Lab) -> None:
    """K2: 192^-0.5·(1 + 0.1·ln 32)² = 0.13086080; DeepSeek-V3 (factor 40): 0.13523378 (by hand)"""
    for factor, want in ((32.0, 0.13086080), (40.0, 0.13523378)):
        rs = {"type": "yarn", "factor": factor, "original_max_position_embeddings": 4096,
              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
        args = _attn_args(lab, qk_nope_head_dim=128, qk_rope_head_dim=64, rope_scaling=rs)
        expect_close(_scale(lab, args), torch.tensor(want, dtype=torch.float64),
                     f"softmax_scale for factor "
                     f"{factor:g}, Dn 128, Dr 64", atol=0, rtol=1e-7,
                     mistakes=_scale_mistakes(128, 64, rs))


def check_yarn_scale_without_m(lab: Lab) -> None:
    """plain 1/√(Dn+Dr) without rope_scaling, or when rope_scaling has no mscale_all_dim"""
    Dn, Dr = lab.randint(4, 200), 2 * lab.randint(2, 40)
    for rs in (None, {"type": "yarn", "factor": lab.uniform(2.0, 64.0),
                      "original_max_position_embeddings": 64, "mscale": 0.707}):
        args = _attn_args(lab, qk_nope_head_dim=Dn, qk_rope_head_dim=Dr, rope_scaling=rs)
        expect_close(_scale(lab, args), scale_truth(Dn, Dr, rs),
                     f"softmax_scale (Dn {Dn}, Dr {Dr}, "
                     f"rope_scaling {rs})", atol=0, rtol=1e-9, mistakes=_scale_mistakes(Dn, Dr, rs))


register(Exercise(
    name="yarn_scale", file="attention.py", concept="YaRN's m² softmax scale", level="intro",
    minutes=10, against="fp64 formula; by hand (K2, DeepSeek-V3)",
    statement="""\
The softmax scale of MLA with YaRN's attention temperature m (YaRN arXiv 2309.00071 §3.4;
DeepSeek-V3 inference/model.py MLA.__init__):
    scale = (Dn + Dr)^-1/2 · m²,     m = 0.1·mscale_all_dim·ln(factor) + 1   (m = 1 if factor <= 1)
m², because DeepSeek folds the m of the query and the m of the key into the scale, at every length.
Apply it only when rope_scaling is set and has a non-zero mscale_all_dim; else the plain
(Dn + Dr)^-1/2.
In scope: args (ModelArgs: qk_nope_head_dim = Dn, qk_rope_head_dim = Dr, rope_scaling = None or a
dict with "factor", "mscale_all_dim", ...);
yarn_get_mscale(scale, mscale) = 0.1·mscale·ln(scale) + 1; math.
Leave `scale`, a float.""",
    hints=("The head dim of the dot product is the whole query: nope part plus rope part.",
           "rs.get(\"mscale_all_dim\") is None or 0 when the key is absent or zero."),
    checks=(check_yarn_scale_random, check_yarn_scale_k2, check_yarn_scale_without_m),
    mistakes=(
        Mistake(SCALE_ONCE, (('rs["mscale_all_dim"]) ** 2', 'rs["mscale_all_dim"])'),)),
        Mistake(SCALE_NOPE, (("scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5",
                              "scale = args.qk_nope_head_dim ** -0.5"),)),
        Mistake(SCALE_KEY, (('rs["mscale_all_dim"]) ** 2', 'rs.get("mscale", 1.0)) ** 2'),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: the latent KV-cache update (attention.py KVCache.update)

CACHE_SHIFT = ("off by one: the new rows were written at pos+1.. instead of pos.. (position pos is "
               "the next free row)")
CACHE_ZERO = ("the new rows were written at 0..T every step (overwriting the prefix) instead of at "
              "pos..pos+T")
CACHE_NEW = ("returned only the new rows: return the layer's whole prefix 0..pos+T, which "
             "attention reads as keys")
CACHE_ADVANCE = ("self.pos was advanced inside update(): every layer must write at the same pos "
                 "(the model advances it once, after all layers)")


def cache_truth(rows: Tensor, steps: list[int], max_len: int,
                rule: str = "right") -> tuple[list[Tensor], Tensor]:
    """The cache replayed by positions, as worked by hand (DeepSeek-V3 inference/model.py
    MLA.forward: kv_cache[:, start_pos:end_pos] = ..., then attention reads [:end_pos]). rows (L, B,
    N, C) holds each layer's row [c_kv | k_pe] of every token; each step of T tokens calls update
    for layers 0..L-1, then pos += T. Returns what every call returns, in call order, and the final
    cache (L, B, max_len, C). `rule` ("shift", "zero", "new", "advance") makes the mistakes."""
    L, B, _, C = rows.shape
    cache, pos, n, outs = torch.zeros(L, B, max_len, C, dtype=rows.dtype), 0, 0, []
    for T in steps:
        for layer in range(L):
            at = {"shift": pos + 1, "zero": 0}.get(rule, pos)
            cache[layer, :, at:at + T] = rows[layer, :, n:n + T]
            end = pos + T + (rule == "shift")
            outs.append(cache[layer, :, (pos if rule == "new" else 0):end].clone())
            if rule == "advance":
                pos += T
        pos, n = pos + T, n + T
    return outs, cache


def _run_cache(lab: Lab, cache, rows: Tensor, steps: list[int],
               Ckv: int) -> Iterator[tuple[int, Tensor]]:
    """Drive the workspace's cache as model.py does; yields (call index, returned rows)."""
    i, n = 0, 0
    for T in steps:
        for layer in range(rows.shape[0]):
            new = rows[layer, :, n:n + T]
            yield i, cache.update(layer, new[..., :Ckv].clone(), new[..., Ckv:].clone())
            i += 1
        cache.pos += T
        n += T


def _check_cache(lab: Lab, rows: Tensor, steps: list[int], Ckv: int, max_len: int,
                 what: str) -> None:
    L, B, _, C = rows.shape
    args = _attn_args(lab, num_hidden_layers=L, first_k_dense_replace=L, kv_lora_rank=Ckv,
                      qk_rope_head_dim=C - Ckv)
    cache = lab.attention.KVCache(args, B, max_len)
    want, final = cache_truth(rows, steps, max_len)
    wrong = {d: cache_truth(rows, steps, max_len, r) for d, r in ((CACHE_SHIFT, "shift"),
                                                                  (CACHE_ZERO, "zero"),
                                                                  (CACHE_NEW, "new"),
                                                                  (CACHE_ADVANCE, "advance"))}
    for i, got in _run_cache(lab, cache, rows, steps, Ckv):
        step, layer = divmod(i, L)
        expect_close(got, want[i],
                     f"{what}: update() of layer {layer} at step {step} (steps of {steps} tokens)",
                     atol=0, mistakes={d: w[0][i] for d, w in wrong.items()})
    expect_close(cache.latent, final, f"{what}: the whole cache after steps of {steps} tokens",
                 atol=0, mistakes={d: w[1] for d, w in wrong.items()})


def check_kv_cache_steps(lab: Lab) -> None:
    """a prefill, single-token decode steps and a chunk land at the right rows of every layer"""
    L, B, Ckv, Dr = lab.randint(2, 3), lab.randint(1, 3), lab.randint(3, 9), 2 * lab.randint(1, 4)
    steps = [lab.randint(2, 6)] + [1] * lab.randint(2, 4) + [lab.randint(2, 5)]
    N = sum(steps)
    rows = torch.randn(L, B, N, Ckv + Dr, generator=lab.gen)
    _check_cache(lab, rows, steps, Ckv, (L + 1) * N + 2, "random rows")


def check_kv_cache_by_hand(lab: Lab) -> None:
    """2 tokens then 1: rows [1 2 | 5], [3 4 | 6], then [7 8 | 9] at row 2; the update returns all
    three"""
    # (L=1, B=1, N=3, Ckv+Dr=3)
    rows = torch.tensor([[[[1.0, 2.0, 5.0], [3.0, 4.0, 6.0], [7.0, 8.0, 9.0]]]])
    args = _attn_args(lab, kv_lora_rank=2, qk_rope_head_dim=2)
    # Dr = 2: k_pe [5, 50], [6, 60], [9, 90]
    rows4 = torch.cat([rows, rows[..., 2:] * 10], -1)
    cache = lab.attention.KVCache(args, 1, 8)
    got = [out for _, out in _run_cache(lab, cache, rows4, [2, 1], 2)]
    want = [torch.tensor([[[1.0, 2, 5, 50], [3, 4, 6, 60]]]),
            torch.tensor([[[1.0, 2, 5, 50], [3, 4, 6, 60], [7, 8, 9, 90]]])]
    wrong = {d: cache_truth(rows4, [2, 1], 8, r)[0] for d, r in ((CACHE_SHIFT, "shift"),
                                                                 (CACHE_ZERO, "zero"),
                                                                 (CACHE_NEW, "new"),
                                                                 (CACHE_ADVANCE, "advance"))}
    for i in range(2):
        expect_close(got[i], want[i], f"update() number {i + 1} (2 tokens, then 1)", atol=0,
                     mistakes={d: w[i] for d, w in wrong.items()})


register(Exercise(
    name="kv_cache", file="attention.py", concept="the latent KV-cache update", level="intro",
    minutes=10, against="positions worked by hand",
    statement="""\
Write one layer's new tokens into MLA's latent cache and return what attention reads (DeepSeek-V2
arXiv 2405.04434 §2.1.2: only c_kv and the rotated k^R are cached; DeepSeek-V3 inference/model.py
MLA.forward: kv_cache[:bsz, start_pos:end_pos] = ..., then attention reads [:end_pos]).
self.pos tokens are cached; the T new ones take rows pos..pos+T-1 of layer `layer`: c_kv in the c_kv
columns, k_pe in the k_pe columns. Do NOT change self.pos: the model calls update once per layer,
then advances pos by T itself.
In scope: self.latent (L, B, max_len, Ckv+Dr); self.c_kv and self.k_pe, views of its two column
blocks, (L, B, max_len, Ckv) and (L, B, max_len, Dr); self.pos (int); layer (int); c_kv (B, T, Ckv);
k_pe (B, T, Dr); torch. Return that layer's rows [c_kv | k_pe] of tokens 0..pos+T-1,
(B, pos+T, Ckv+Dr) (a view is fine).""",
    hints=("Writing into a slice of a view writes into self.latent: self.c_kv[layer, :, a:b] = "
           "c_kv.",
           "The last row written is pos + T - 1, so the prefix to return ends at pos + T "
           "(exclusive)."),
    checks=(check_kv_cache_steps, check_kv_cache_by_hand),
    mistakes=(
        Mistake(CACHE_SHIFT, (("end = self.pos + c_kv.shape[1]",
                               "end = self.pos + 1 + c_kv.shape[1]"),
                              ("self.c_kv[layer, :, self.pos:end]",
                               "self.c_kv[layer, :, self.pos + 1:end]"),
                              ("self.k_pe[layer, :, self.pos:end]",
                               "self.k_pe[layer, :, self.pos + 1:end]"))),
        Mistake(CACHE_ZERO, (("self.c_kv[layer, :, self.pos:end]",
                              "self.c_kv[layer, :, :c_kv.shape[1]]"),
                             ("self.k_pe[layer, :, self.pos:end]",
                              "self.k_pe[layer, :, :k_pe.shape[1]]"))),
        Mistake(CACHE_NEW, (("return self.latent[layer, :, :end]",
                             "return self.latent[layer, :, self.pos:end]"),)),
        Mistake(CACHE_ADVANCE, (("return self.latent[layer, :, :end]",
                                 "self.pos = end\n        return self.latent[layer, :, :end]"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: MLA attention, naive (attention.py MLA.forward, impl "naive")
# (the truth and the setup serve the absorbed exercise too)

MLA_SCALE_NOPE = ("softmax scale 1/√Dn: the scores run over Dn + Dr dims and carry YaRN's m² "
                  "(self.softmax_scale)")
MLA_SCALE_NO_M = "softmax scale 1/√(Dn+Dr) without YaRN's m²: use self.softmax_scale"
MLA_NO_CAUSAL = ("no causal mask: a query saw later tokens (query t sits at position start + t and "
                 "sees keys 0..start+t; pass `start` to attend)")
MLA_KV_HALVES = ("keys and values taken from the wrong halves of kv_b_proj's per-head rows (each "
                 "head's rows are [k_nope Dn | v Dv])")
ABS_WRONG_HALF = ("q_nope absorbed through the values' half of kv_b_proj (W^UV) instead of the "
                  "keys' half (W^UK, each head's first Dn rows)")
ABS_NO_ROPE = ("the rope term is missing: the scores are q_lat·c_kv + q_pe·k_pe (concatenate q_pe "
               "to the latent query and attend against the whole cached row [c_kv | k_pe])")
ABS_SCALE = ("softmax scale 1/√(Ckv+Dr) from the latent width: absorption does not change the "
             "logits, the scale stays self.softmax_scale (1/√(Dn+Dr)·m²)")


def mla_truth(W: dict[str, Tensor], x: Tensor, theta: Tensor, dims: tuple[int, int, int, int, int],
              scale: float, causal: bool = True, kv_halves: str = "kv", rope_term: bool = True
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fp64, head by head, straight from the equations (DeepSeek-V2 arXiv 2405.04434 §2.1.2-2.1.3,
    DeepSeek-V3 arXiv 2412.19437 §2.1.1), over tokens at positions 0..S-1 with rotation angles theta
    (S, Dr/2): c_q = RMSNorm(W^DQ x), [q^C | q^R] = W^UQ/QR c_q; c_kv = RMSNorm(W^DKV x), k^R =
    RoPE(W^KR x) shared by all heads; k^C_h = W^UK_h c_kv, v_h = W^UV_h c_kv; o_h =
    softmax((q^C_h·k^C_h + RoPE(q^R_h)·k^R)·scale, causal) v_h; y = W^O [o_1 … o_H]. dims (H, Dn,
    Dr, Dv, Ckv). Returns y (B, S, D), c_kv (B, S, Ckv), k^R (B, S, Dr) and each head's largest
    visible scaled logit (H,) (QK-Clip's S_max, Kimi K2 arXiv 2507.20534 §2.1). kv_halves "vk" (rows
    [v | k]), "vv" (keys from the value rows), causal, rope_term make the mistakes."""
    H, Dn, Dr, Dv, Ckv = dims
    W = {k: v.double() for k, v in W.items()}
    x = x.double()
    B, S, _ = x.shape

    def rms(v, w):
        return w * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)

    if "q_proj.weight" in W:
        q = x @ W["q_proj.weight"].T
    else:
        q = rms(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"]) @ W["q_b_proj.weight"].T
    q = q.view(B, S, H, Dn + Dr)
    q_nope, q_pe = q[..., :Dn], rope_truth(q[..., Dn:], theta)
    kv_a = x @ W["kv_a_proj_with_mqa.weight"].T
    c_kv, k_pe = (rms(kv_a[..., :Ckv], W["kv_a_layernorm.weight"]),
                  rope_truth(kv_a[..., Ckv:], theta))
    wb = W["kv_b_proj.weight"].view(H, Dn + Dv, Ckv)
    later = torch.ones(S, S, dtype=torch.bool).triu(1)          # key s is later than query t
    outs, s_max = [], torch.empty(H, dtype=torch.float64)
    for h in range(H):
        w_k, w_v = {"kv": (wb[h, :Dn], wb[h, Dn:]), "vk": (wb[h, Dv:], wb[h, :Dv]),
                    "vv": (wb[h, Dn:], wb[h, Dn:])}[kv_halves]
        k_nope, v = c_kv @ w_k.T, c_kv @ w_v.T                  # (B, S, Dn), (B, S, Dv)
        logits = q_nope[:, :, h] @ k_nope.transpose(1, 2)      # (B, S, S)
        if rope_term:
            logits = logits + q_pe[:, :, h] @ k_pe.transpose(1, 2)
        logits = logits * scale
        if causal:
            logits = logits.masked_fill(later, float("-inf"))
        s_max[h] = logits.max()
        outs.append(logits.softmax(-1) @ v)                     # (B, S, Dv)
    return torch.cat(outs, -1) @ W["o_proj.weight"].T, c_kv, k_pe, s_max


@dataclass
class _MLASetup:
    args: object               # the workspace's ModelArgs
    attn: object               # the workspace's MLA, random weights
    W: dict[str, Tensor]       # those weights
    dims: tuple[int, int, int, int, int]
    scale: float               # the true softmax scale of args, fp64


def _mla_setup(lab: Lab, Dv_equals_Dn: bool = False, q_lora: bool = True) -> _MLASetup:
    """An MLA of random shapes and weights (norm gains near 1, projections of std fan_in^-1/2), with
    YaRN."""
    H, Dn, Dr = lab.randint(2, 4), lab.randint(4, 10), 2 * lab.randint(2, 4)
    Dv = Dn if Dv_equals_Dn else lab.randint(4, 10)
    Ckv, D = lab.randint(Dn + Dr + 6, 32), lab.randint(16, 40)
    rs = {"type": "yarn", "factor": lab.uniform(8.0, 40.0), "original_max_position_embeddings": 64,
          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
          "mscale_all_dim": lab.uniform(0.7, 1.3)}
    Cq = lab.randint(8, 24) if q_lora else None
    args = _attn_args(lab, hidden_size=D, num_attention_heads=H, q_lora_rank=Cq, kv_lora_rank=Ckv,
                      qk_nope_head_dim=Dn, qk_rope_head_dim=Dr, v_head_dim=Dv, rope_scaling=rs)
    attn = lab.attention.MLA(args).eval()
    W = {}
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):
                w = 1 + 0.2 * torch.randn(p.shape, generator=lab.gen)
            else:
                w = torch.randn(p.shape, generator=lab.gen) * p.shape[1] ** -0.5
            p.copy_(w)
            W[name] = w
    return _MLASetup(args, attn, W, (H, Dn, Dr, Dv, Ckv), float(scale_truth(Dn, Dr, rs)))


def _mla_tokens(lab: Lab, su: _MLASetup, B: int, S: int) -> tuple[Tensor, Tensor]:
    """Random hidden states (B, S, D) and rotation angles (S, Dr/2) of positions 0..S-1."""
    x = torch.randn(B, S, su.args.hidden_size, generator=lab.gen)
    inv_freq = 10.0 ** -torch.rand(su.dims[2] // 2, generator=lab.gen, dtype=torch.float64).mul(3)
    return x, torch.arange(S, dtype=torch.float64)[:, None] * inv_freq


def _mla_run(lab: Lab, su: _MLASetup, B: int, P: int, T: int, impl: str, cached: bool = True
             ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The workspace's MLA on T new tokens after P cached ones (the cache rows written from the
    truth), against the truth's output for those T tokens: (got, want, known mistakes' outputs),
    each (B, T, D)."""
    x, theta = _mla_tokens(lab, su, B, P + T)
    _, c_kv, k_pe, _ = mla_truth(su.W, x, theta, su.dims, su.scale)
    cache = None
    if cached:
        cache = lab.attention.KVCache(su.args, B, P + T + lab.randint(0, 3))
        cache.c_kv[0, :, :P] = c_kv[:, :P].float()
        cache.k_pe[0, :, :P] = k_pe[:, :P].float()
        cache.pos = P
    cos, sin = theta[P:].cos().float(), theta[P:].sin().float()
    with torch.no_grad():
        got = su.attn(x[:, P:], cos, sin, cache, 0, impl)
    H, Dn, Dr, Dv, Ckv = su.dims
    variants = {MLA_SCALE_NOPE: dict(scale=Dn ** -0.5),
                MLA_SCALE_NO_M: dict(scale=(Dn + Dr) ** -0.5),
                MLA_NO_CAUSAL: dict(causal=False), MLA_KV_HALVES: dict(kv_halves="vk"),
                ABS_SCALE: dict(scale=(Ckv + Dr) ** -0.5), ABS_NO_ROPE: dict(rope_term=False)}
    if Dn == Dv:
        variants[ABS_WRONG_HALF] = dict(kv_halves="vv")
    mistakes = {}
    for d, kw in variants.items():
        mistakes[d] = mla_truth(su.W, x, theta, su.dims, **{"scale": su.scale, **kw})[0][:, P:]
    return got, mla_truth(su.W, x, theta, su.dims, su.scale)[0][:, P:], mistakes


def _mla_expect(lab: Lab, su: _MLASetup, B: int, P: int, T: int, impl: str,
                cached: bool = True) -> None:
    got, want, mistakes = _mla_run(lab, su, B, P, T, impl, cached)
    H, Dn, Dr, Dv, Ckv = su.dims
    where = f"cache holding {P} tokens" if cached else "no cache"
    expect_close(got, want,
                 f"MLA output ({impl}) for {T} new token{'s' * (T > 1)}, {where} (B {B}, H {H}, "
                 f"Dn {Dn}, Dr {Dr}, Dv {Dv}, Ckv {Ckv})", atol=2e-5 * float(want.abs().max()),
                 mistakes=mistakes)


def check_mla_prefill(lab: Lab) -> None:
    """a prefill without cache matches the fp64 layer written from the MLA equations"""
    _mla_expect(lab, _mla_setup(lab), lab.randint(1, 3), 0, lab.randint(3, 9), "naive",
                cached=False)


def check_mla_chunk_after_cache(lab: Lab) -> None:
    """a chunk of tokens after a filled cache (the causal mask is offset by the cached length)"""
    _mla_expect(lab, _mla_setup(lab), lab.randint(1, 3), lab.randint(2, 8), lab.randint(2, 5),
                "naive")


def check_mla_plain_query_decode(lab: Lab) -> None:
    """a plain q_proj (q_lora_rank None, as Moonlight) with Dv = Dn: single-token decode and a short
    chunk"""
    su = _mla_setup(lab, Dv_equals_Dn=True, q_lora=False)
    for T in (1, lab.randint(2, 4)):
        _mla_expect(lab, su, 2, lab.randint(2, 8), T, "naive")


def check_mla_records_max_logit(lab: Lab) -> None:
    """in training with record_max_logits on, each head's largest visible logit reaches QK-Clip's
    max_logits"""
    su = _mla_setup(lab)
    x, theta = _mla_tokens(lab, su, lab.randint(1, 3), lab.randint(3, 8))
    attn = su.attn.train()
    attn.record_max_logits = True
    attn.max_logits.fill_(float("-inf"))
    with torch.no_grad():
        attn(x, theta.cos().float(), theta.sin().float(), None, 0, "naive")
    H, Dn, Dr, Dv, Ckv = su.dims
    mistakes = {MLA_SCALE_NOPE: dict(scale=Dn ** -0.5),
                MLA_SCALE_NO_M: dict(scale=(Dn + Dr) ** -0.5),
                MLA_NO_CAUSAL: dict(causal=False), MLA_KV_HALVES: dict(kv_halves="vk")}
    if bool((attn.max_logits == float("-inf")).all()):
        raise CheckFailed("max_logits was not updated in a training forward with record_max_logits "
                          "on: pass `rec` to attend as its max_logits")
    expect_close(attn.max_logits, mla_truth(su.W, x, theta, su.dims, su.scale)[3],
                 f"max_logits (H={H}) after "
                 f"a {x.shape[1]}-token training forward", atol=1e-4,
                 mistakes={d: mla_truth(su.W, x, theta, su.dims, **{"scale": su.scale, **kw})[3]
                           for d, kw in mistakes.items()})


_MLA_SCOPE = """\
In scope (MLA.forward): B, T, S (= start + T, cached plus new tokens), H, Ckv, Dn, Dr, Dv;
q_nope (B, T, H, Dn); q_pe (B, T, H, Dr), already rotated; c_kv (B, S, Ckv), the normed latent
of every token so far; k_pe (B, S, Dr), every token's rotated rope key, ONE for all heads;
start (int, the position of the first new token); rec (None or an (H,) buffer: pass it to attend,
which folds QK-Clip's max logit into it); self.kv_b_proj (Linear Ckv -> H·(Dn+Dv), each head's
rows [k_nope Dn | v Dv]); self.softmax_scale ((Dn+Dr)^-1/2·m², float); torch;
attend(q, k, v, scale, start, max_logits) -> (B, H, T, Ev): causal softmax attention of
q (B, H, T, E) against k (B, 1 or H, S, E), v (B, 1 or H, S, Ev)."""

register(Exercise(
    name="mla", file="attention.py", concept="MLA attention (naive)", level="core", minutes=30,
    against="fp64 layer from the MLA equations; transformers (test)",
    statement="""\
Multi-head Latent Attention, the naive way (DeepSeek-V2 arXiv 2405.04434 §2.1.2-2.1.3;
DeepSeek-V3 arXiv 2412.19437 §2.1.1, eq. 1-11). Decompress every token's latent into per-head
keys and values, k^C_h = W^UK_h c_kv and v_h = W^UV_h c_kv (both in kv_b_proj). Head h's key
is [k^C_h | k^R], with the ONE rope key k^R = k_pe shared by all heads; its query [q^C_h | q^R_h].
    o_h = softmax(q_h·k_hᵀ · softmax_scale + causal mask) v_h
where query t (position start + t) sees keys 0..start+t.
""" + _MLA_SCOPE + """
Leave o (B, H, T, Dv), each head's output (o_proj after the region mixes the heads).""",
    hints=("kv_b_proj(c_kv).view(B, S, H, Dn + Dv) splits into k_nope and v along the last dim.",
           "k_pe[:, :, None, :].expand(B, S, H, Dr) gives every head the same rope key without a "
           "copy.",
           "attend wants heads before tokens: .transpose(1, 2) turns (B, S, H, E) into (B, H, S, "
           "E)."),
    checks=(check_mla_prefill, check_mla_chunk_after_cache, check_mla_plain_query_decode,
            check_mla_records_max_logit),
    mistakes=(
        Mistake(MLA_SCALE_NOPE, (("self.softmax_scale, start, rec)", "Dn ** -0.5, start, rec)"),)),
        Mistake(MLA_SCALE_NO_M, (("self.softmax_scale, start, rec)",
                                  "(Dn + Dr) ** -0.5, start, rec)"),)),
        Mistake(MLA_NO_CAUSAL, (("self.softmax_scale, start, rec)",
                                 "self.softmax_scale, S, rec)"),)),
        Mistake(MLA_KV_HALVES, (("k_nope, v = kv.split([Dn, Dv], dim=-1)",
                                 "v, k_nope = kv.split([Dv, Dn], dim=-1)"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: absorbed decode against the latent cache (attention.py MLA.forward, impl "absorb")


def check_absorbed_decode(lab: Lab) -> None:
    """single-token decode after a filled latent cache equals the fp64 naive layer"""
    _mla_expect(lab, _mla_setup(lab, Dv_equals_Dn=True), lab.randint(2, 3), lab.randint(3, 10), 1,
                "absorb")


def check_absorbed_chunk(lab: Lab) -> None:
    """a chunk after the cache, and a prefill without cache (plain q_proj), equal the fp64 naive
    layer"""
    su = _mla_setup(lab, Dv_equals_Dn=True, q_lora=False)
    _mla_expect(lab, su, lab.randint(1, 2), lab.randint(2, 6), lab.randint(2, 4), "absorb")
    _mla_expect(lab, su, lab.randint(1, 2), 0, lab.randint(2, 6), "absorb", cached=False)


def check_absorbed_reads_latent(lab: Lab) -> None:
    """decode reads the latent rows: matmul flops per cached token ~2H(2Ckv+Dr), no per-token
    up-projection"""
    from torch.utils.flop_counter import FlopCounterMode
    su = _mla_setup(lab)
    H, Dn, Dr, Dv, Ckv = su.dims
    flops = []
    for P in (8, 40):
        cache = lab.attention.KVCache(su.args, 2, P + 1)
        cache.pos = P
        x = torch.randn(2, 1, su.args.hidden_size, generator=lab.gen)
        cos, sin = torch.ones(1, Dr // 2), torch.zeros(1, Dr // 2)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            su.attn(x, cos, sin, cache, 0, "absorb")
        flops.append(fc.get_total_flops())
    # batch 2, 32 more tokens
    per_token, latent = (flops[1] - flops[0]) / (2 * 32), 2 * H * (2 * Ckv + Dr)
    if per_token > 1.5 * latent:
        raise CheckFailed(f"decode costs {per_token:,.0f} matmul flops per cached token, "
                          f"{per_token / latent:.1f}x the {latent:,} of scoring and mixing the "
                          f"latent rows (H={H}, Ckv={Ckv}, Dr={Dr}): the cached latents were "
                          "up-projected (kv_b_proj on c_kv); absorb W^UK into the query and W^UV "
                          "into the output instead")


register(Exercise(
    name="absorbed", file="attention.py", concept="absorbed MLA decode on the latent cache",
    level="advanced", minutes=40,
    against="fp64 naive layer on the same weights and cache; flop count",
    statement="""\
MLA without decompressing the cache (DeepSeek-V2 arXiv 2405.04434 §2.1.2: "W^UK can be absorbed
into W^Q, and W^UV into W^O"; DeepSeek-V3 inference/model.py MLA.forward, attn_impl "absorb").
W^UK_h (Dn, Ckv) and W^UV_h (Dv, Ckv) are head h's two row blocks of kv_b_proj.weight, and
    q^C_h·k^C_h = q^C_h·(W^UK_h c) = (W^UK_hᵀ q^C_h)·c = q_lat_h·c
    score_h(t, s) = q_lat_h(t)·c_kv(s) + q^R_h(t)·k^R(s)
so one key row [c_kv | k_pe] (Ckv + Dr) serves every head. Values: mix the latent rows,
z_h = softmax(score_h · softmax_scale + causal mask) c_kv, then o_h = W^UV_h z_h.
Never run kv_b_proj on the cached latents: decode must cost O(H·(Ckv+Dr)) per cached token.
""" + _MLA_SCOPE + """
latent: None or the cache's rows [c_kv | k_pe] (B, S, Ckv+Dr); self.kv_b_proj.weight
(H·(Dn+Dv), Ckv). Leave o (B, H, T, Dv).""",
    hints=("self.kv_b_proj.weight.view(H, Dn + Dv, Ckv): rows [:, :Dn] are W^UK, rows [:, Dn:] are "
           "W^UV.",
           "(B, H, T, Dn) @ (H, Dn, Ckv) broadcasts over B: the latent query in one matmul.",
           "attend(qh, latent[:, None], c_kv[:, None], ...) with qh = [q_lat | q_pe] (B, H, T, "
           "Ckv+Dr): one shared key/value head; then z @ W^UVᵀ per head."),
    checks=(check_absorbed_decode, check_absorbed_chunk, check_absorbed_reads_latent),
    mistakes=(
        Mistake(ABS_WRONG_HALF, (("q_nope.transpose(1, 2) @ w_uk",
                                  "q_nope.transpose(1, 2) @ w_uv"),)),
        Mistake(ABS_NO_ROPE, (("qh = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1)",
                               "qh = q_lat"),
                              ("attend(qh, latent[:, None], c_kv[:, None],",
                               "attend(qh, c_kv[:, None], c_kv[:, None],"))),
        Mistake(ABS_SCALE, (("self.softmax_scale, start, rec)",
                             "(Ckv + Dr) ** -0.5, start, rec)"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: the sigmoid router (moe.py Gate.forward)


ROUTER_SOFTMAX = ("softmax affinities instead of sigmoid (K2 and DeepSeek-V3 score each expert on "
                  "its own: σ(x·w_e))")
ROUTER_BIAS_WEIGHT = ("the correction bias leaked into the gate weights (weight the chosen experts "
                      "by their UNBIASED scores s; s + b is only for choosing)")
ROUTER_BIAS_UNUSED = ("the correction bias was not used to choose the experts (top-k of s + b, not "
                      "of s)")
ROUTER_NO_RENORM = "the chosen weights were not renormalised to sum to 1 before the scaling factor"
ROUTER_RENORM = "the weights were renormalised although norm_topk_prob is False"
ROUTER_NO_SCALE = "routed_scaling_factor missing (multiply the renormalised weights by it)"
ROUTER_NO_GROUP = ("the group limit was ignored (with n_group > 1, choose the topk_group best "
                   "groups first, a group's score being the sum of its 2 best biased scores)")


def router_truth(x: Tensor, W: Tensor, bias: Tensor, k: int, n_group: int = 1, topk_group: int = 1,
                 scale: float = 1.0, norm: bool = True,
                 mistake: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """fp64, one token at a time (DeepSeek-V3 arXiv 2412.19437 §2.1.2, eq. 15-16; group-limited
    routing as in its inference/model.py Gate): s = σ(x Wᵀ); choose the k largest s + b among the
    experts of the topk_group groups whose 2 best s + b sum highest; w = scale · s_j / Σ_chosen s.
    Returns (dense (N, E) weights, zero off the chosen experts; scores (N, E); margin (N,), the
    smallest gap a top-k or group cut had to split). `mistake` (a ROUTER_* string) produces that
    mistake's output instead."""
    logits = x.double() @ W.double().T                                         # (N, E)
    scores = logits.softmax(-1) if mistake == ROUTER_SOFTMAX else logits.sigmoid()
    N, E = scores.shape
    size = E // n_group
    dense, margin = (torch.zeros(N, E, dtype=torch.float64),
                     torch.full((N,), math.inf, dtype=torch.float64))
    for n in range(N):
        s = scores[n].tolist()
        c = s if mistake == ROUTER_BIAS_UNUSED else [s[e] + float(bias[e]) for e in range(E)]
        allowed = list(range(E))
        if n_group > 1 and mistake != ROUTER_NO_GROUP:
            group_score = [sum(sorted(c[g * size:(g + 1) * size])[-2:]) for g in range(n_group)]
            ranked = sorted(range(n_group), key=lambda g: -group_score[g])
            margin[n] = group_score[ranked[topk_group - 1]] - group_score[ranked[topk_group]]
            allowed = [e for g in ranked[:topk_group] for e in range(g * size, (g + 1) * size)]
        ranked = sorted(allowed, key=lambda e: -c[e])
        if len(ranked) > k:
            margin[n] = min(margin[n].item(), c[ranked[k - 1]] - c[ranked[k]])
        chosen = ranked[:k]
        w = [c[e] if mistake == ROUTER_BIAS_WEIGHT else s[e] for e in chosen]
        total = (sum(w) if (norm and mistake != ROUTER_NO_RENORM) or mistake == ROUTER_RENORM
                 else 1.0)
        factor = 1.0 if mistake == ROUTER_NO_SCALE else scale
        for e, v in zip(chosen, w):
            dense[n, e] = factor * v / total
    return dense, scores, margin


ROUTER_MISTAKES = (ROUTER_SOFTMAX, ROUTER_BIAS_WEIGHT, ROUTER_BIAS_UNUSED, ROUTER_NO_RENORM,
                   ROUTER_RENORM, ROUTER_NO_SCALE, ROUTER_NO_GROUP)


def _router_case(lab: Lab, N: int, D: int, E: int, k: int, n_group: int = 1, topk_group: int = 1,
                 norm: bool = True, dtype: torch.dtype = torch.float32) -> tuple:
    """A Gate of the lab with random weights and bias, random tokens x, and {"" for the truth, else
    a mistake: (dense weights, scores)}. Tokens whose top-k or group cut (for the truth or any
    mistake) is closer than 1e-4 are dropped, so fp32 rounding cannot flip a choice. Returns (gate,
    x, outputs)."""
    scale = lab.uniform(1.5, 3.0)
    args = SimpleNamespace(num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
                           norm_topk_prob=norm,
                           routed_scaling_factor=scale, n_routed_experts=E, hidden_size=D)
    gate = lab.moe.Gate(args)
    W = torch.randn(E, D, generator=lab.gen) / math.sqrt(D)
    bias = 0.1 * torch.randn(E, generator=lab.gen)
    x = torch.randn(N, D, generator=lab.gen).to(dtype)
    with torch.no_grad():
        gate.weight.copy_(W)
        gate.e_score_correction_bias.copy_(bias)
    gate = gate.to(dtype)
    W = gate.weight.detach()                         # as rounded to dtype: the truth sees the same
    bias = gate.e_score_correction_bias.detach().float()      # (kept or rounded, as the Gate keeps it)
    cut = dict(k=k, n_group=n_group, topk_group=topk_group, scale=scale, norm=norm)
    outs = {m: router_truth(x, W, bias, mistake=m, **cut) for m in ("",) + ROUTER_MISTAKES}
    keep = torch.stack([o[2] for o in outs.values()]).min(0).values > 1e-4
    x = x[keep]
    return gate, x, {m: (o[0][keep], o[1][keep]) for m, o in outs.items()}


def _check_router(gate, x: Tensor, outs: dict, what: str) -> None:
    N, E, k = x.shape[0], outs[""][0].shape[1], gate.top_k
    with torch.no_grad():
        got = gate(x)
    if not (isinstance(got, tuple) and len(got) == 3
            and all(isinstance(t, torch.Tensor) for t in got)):
        raise CheckFailed("Gate.forward must return three tensors (weights, idx, scores), got "
                          f"{type(got)}")
    weights, idx, scores = got
    if weights.shape != (N, k) or idx.shape != (N, k) or scores.shape != (N, E):
        raise CheckFailed(f"{what}: shapes weights {tuple(weights.shape)}, idx {tuple(idx.shape)}, "
                          f"scores {tuple(scores.shape)}; expected ({N}, {k}), ({N}, {k}), ({N}, "
                          f"{E})")
    if idx.dtype != torch.int64 or weights.dtype != torch.float32 or scores.dtype != torch.float32:
        raise CheckFailed(f"{what}: dtypes weights {weights.dtype}, idx {idx.dtype}, scores "
                          f"{scores.dtype}; expected float32, int64, float32 (route in fp32 "
                          "whatever x's dtype)")
    if bool((idx.sort(-1).values.diff(dim=-1) == 0).any()) or bool(((idx < 0) | (idx >= E)).any()):
        raise CheckFailed(f"{what}: idx must hold {k} distinct expert ids in [0, {E}) per token")
    expect_close(scores, outs[""][1], f"{what}: scores", atol=1e-5,
                 mistakes={ROUTER_SOFTMAX: outs[ROUTER_SOFTMAX][1]})
    dense = torch.zeros(N, E, dtype=torch.float64).scatter(1, idx, weights.double())
    expect_close(dense, outs[""][0],
                 f"{what}: weights of the chosen experts (as an (N, E) matrix, zero "
                 f"elsewhere)", atol=1e-5, rtol=1e-5,
                 mistakes={m: outs[m][0] for m in ROUTER_MISTAKES})


def check_router_random(lab: Lab) -> None:
    """chooses and weights the experts as fp64 truth, one group (K2: n_group = topk_group = 1)"""
    E = lab.randint(8, 40)
    gate, x, outs = _router_case(lab, N=lab.randint(20, 60), D=lab.randint(8, 32), E=E,
                                    k=lab.randint(2, min(8, E - 1)))
    _check_router(gate, x, outs, f"router, E={E}, top-{gate.top_k}")


def check_router_groups(lab: Lab) -> None:
    """group-limited top-k (DeepSeek-V3: n_group groups, keep topk_group): as fp64 truth"""
    G = 2 * lab.randint(1, 2)
    m = lab.randint(3, 8)
    tg = lab.randint(1, G - 1)
    gate, x, outs = _router_case(lab, N=lab.randint(30, 60), D=lab.randint(8, 32), E=G * m,
                                    k=lab.randint(2, min(8, tg * m - 1)), n_group=G, topk_group=tg)
    _check_router(gate, x, outs, f"router, {G} groups of {m}, keep {tg}, top-{gate.top_k}")


def check_router_bf16_no_renorm(lab: Lab) -> None:
    """a bf16 model routes in fp32; with norm_topk_prob False the weights are scale · s"""
    E = lab.randint(8, 24)
    gate, x, outs = _router_case(lab, N=lab.randint(20, 40), D=lab.randint(8, 32), E=E,
                                    k=lab.randint(2, min(6, E - 1)), norm=False,
                                 dtype=torch.bfloat16)
    _check_router(gate, x, outs, f"bf16 router, norm_topk_prob False, E={E}, top-{gate.top_k}")


def check_router_by_hand(lab: Lab) -> None:
    """logits (ln 3, 0, -ln 3, 0), bias (0, 0, .4, -.1), top-2, scale 2.5: weights (1.875, 0, 0.625,
    0)"""
    args = SimpleNamespace(num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True,
                           routed_scaling_factor=2.5, n_routed_experts=4, hidden_size=4)
    gate = lab.moe.Gate(args)
    bias = torch.tensor([0.0, 0.0, 0.4, -0.1])
    with torch.no_grad():
        gate.weight.copy_(torch.eye(4))
        gate.e_score_correction_bias.copy_(bias)
    x = torch.tensor([[math.log(3), 0.0, -math.log(3), 0.0]])
    # s = (0.75, 0.5, 0.25, 0.5); s + b = (0.75, 0.5, 0.65, 0.4) chooses experts 0 and 2 (expert 2
    # only thanks to its bias); w = 2.5 · (0.75, 0.25) / (0.75 + 0.25) = (1.875, 0.625)
    truth = torch.tensor([[1.875, 0.0, 0.625, 0.0]], dtype=torch.float64)
    outs = {m: router_truth(x, torch.eye(4), bias, 2, scale=2.5, mistake=m)[:2]
            for m in ROUTER_MISTAKES}
    outs[""] = (truth, torch.tensor([[0.75, 0.5, 0.25, 0.5]], dtype=torch.float64))
    _check_router(gate, x, outs, "router on the worked example")


register(Exercise(
    name="router", file="moe.py", concept="sigmoid router with correction bias", level="core",
    minutes=30, against="fp64 per-token truth; by hand",
    statement="""\
Route each token to K experts (DeepSeek-V3 arXiv 2412.19437 §2.1.2, eq. 15-16, and its
inference/model.py Gate; Kimi K2 arXiv 2507.20534 §2.1 uses one group; config keys n_group,
topk_group, norm_topk_prob, routed_scaling_factor):
    s = σ(x W_gᵀ), in fp32 whatever x's dtype      the affinities, one sigmoid per expert
    c = s + b                                      b: the correction bias, used ONLY to choose
    if n_group > 1: split the E experts into n_group equal groups; a group's score is the sum
        of its 2 largest c; keep the topk_group best groups, set c of all other experts to -inf
    idx = top-K of c                               (best first)
    w = s[idx] (UNBIASED), / Σ s[idx] if norm_topk_prob, then × routed_scaling_factor
In scope: x (N, D) any float dtype; self.weight (E, D) W_g; self.e_score_correction_bias (E,)
fp32 b; self.top_k (K), self.n_group, self.topk_group, self.norm_topk_prob,
self.routed_scaling_factor; torch, F. Return (w (N, K) fp32, idx (N, K) int64, s (N, E) fp32).""",
    hints=("torch.sigmoid(F.linear(x.float(), self.weight.float())) gives s in fp32; then "
           "c.topk(K, dim=-1) gives the indices, and s.gather(1, idx) the unbiased scores of the "
           "chosen experts.",
           "Groups: c.view(N, n_group, E // n_group).topk(2, dim=-1).values.sum(-1) scores the "
           "groups; a boolean (N, n_group) mask of the kept ones, broadcast over the group's "
           "experts, feeds masked_fill.",
           "Mask with -inf, not 0.0: biased scores can be negative, so a 0.0 from a dropped group "
           "could win."),
    checks=(check_router_random, check_router_groups, check_router_bf16_no_renorm,
            check_router_by_hand),
    mistakes=(
        Mistake(ROUTER_SOFTMAX,
                (("scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))",
                  "scores = torch.softmax(F.linear(x.float(), self.weight.float()), -1)"),)),
        Mistake(ROUTER_BIAS_WEIGHT, (("weights = scores.gather(1, idx)",
                                      "weights = choice.gather(1, idx)"),)),
        Mistake(ROUTER_NO_RENORM, (("weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)",
                                    "weights = weights"),)),
        Mistake(ROUTER_NO_SCALE, (("return weights * self.routed_scaling_factor, idx, scores",
                                   "return weights, idx, scores"),)),
        Mistake(ROUTER_NO_GROUP, (("if self.n_group > 1:", "if False:"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: combining the routed experts' outputs
# (moe.py moe_reference; MoE.forward adds the shared expert)

COMBINE_NO_WEIGHTS = ("the routing weights were not applied (each expert's output times the "
                      "token's weight w_k)")
COMBINE_OVERWRITE = ("a token's row was overwritten by each of its experts (out[tok] = ...) "
                     "instead of summing its K experts: only its highest-numbered expert counts")
COMBINE_ROWS = ("each expert's outputs were added to rows 0..n_e-1 instead of its tokens' rows "
                "(add row j to row tok[j], e.g. index_add_(0, tok, ...))")


def _swiglu64(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """fp64 SwiGLU expert (DeepSeek-V3 inference/model.py Expert): down(silu(gate x) ⊙ up x), x (n,
    D)."""
    x, gate, up, down = (t.detach().double() for t in (x, gate, up, down))
    h = x @ gate.T
    return (h * h.sigmoid() * (x @ up.T)) @ down.T


def combine_truth(x: Tensor, weights: Tensor, idx: Tensor, experts, mistake: str = "") -> Tensor:
    """fp64, one token and one slot at a time: out_n = Σ_k w_nk · Expert_idx[n,k](x_n) (DeepSeek-V3
    arXiv 2412.19437 §2.1.2, eq. 12 without the shared term). `mistake` (a COMBINE_* string) gives
    its output."""
    N, K = idx.shape
    out = torch.zeros(x.shape, dtype=torch.float64)
    stacks = [p.detach() for p in (experts.gate_proj, experts.up_proj, experts.down_proj)]
    for e in range(stacks[0].shape[0]):
        # ascending, as nonzero() gives
        toks = [n for n in range(N) for k in range(K) if idx[n, k] == e]
        for j, n in enumerate(toks):
            k = int((idx[n] == e).nonzero())
            y = _swiglu64(x[n:n + 1], *(s[e] for s in stacks))[0]
            w = 1.0 if mistake == COMBINE_NO_WEIGHTS else float(weights[n, k])
            if mistake == COMBINE_OVERWRITE:
                out[n] = w * y
            else:
                out[j if mistake == COMBINE_ROWS else n] += w * y
    return out


def _combine_mistakes(x: Tensor, weights: Tensor, idx: Tensor, experts,
                      shared: Tensor | None = None) -> dict:
    extra = 0 if shared is None else shared
    return {m: combine_truth(x, weights, idx, experts, m) + extra
            for m in (COMBINE_NO_WEIGHTS, COMBINE_OVERWRITE, COMBINE_ROWS)}


def _routing(lab: Lab, N: int, E: int, K: int) -> tuple[Tensor, Tensor]:
    """Random routing: K distinct experts per token, positive weights (N, K) fp32 and idx (N, K)
    int64."""
    idx = torch.stack([torch.randperm(E, generator=lab.gen)[:K] for _ in range(N)])
    weights = torch.rand(N, K, generator=lab.gen) * 2 + 0.1
    return weights, idx


def _experts(lab: Lab, E: int, D: int, I: int, dtype: torch.dtype = torch.float32):
    ex = lab.moe.Experts(E, D, I)
    with torch.no_grad():
        for p in (ex.gate_proj, ex.up_proj):
            p.copy_(torch.randn(p.shape, generator=lab.gen) / math.sqrt(D))
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=lab.gen) / math.sqrt(I))
    return ex.to(dtype)


def _moe_reference(lab: Lab, x: Tensor, weights: Tensor, idx: Tensor, experts) -> Tensor:
    out = lab.moe.moe_reference(x, weights, idx, experts)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype:
        raise CheckFailed(f"moe_reference on x {tuple(x.shape)} {x.dtype} returned "
                          f"{getattr(out, 'dtype', type(out).__name__)} "
                          f"{tuple(getattr(out, 'shape', ()))}: expected x's shape and dtype "
                          "(accumulate in _acc_dtype(x), cast back at the end)")
    return out


def check_combine_random(lab: Lab) -> None:
    """out_n = Σ_k w_nk · Expert_idx[n,k](x_n), as fp64 truth, for random routing"""
    N, D, I, E = lab.randint(8, 40), lab.randint(4, 24), lab.randint(4, 24), lab.randint(3, 12)
    K = lab.randint(2, min(4, E))
    experts = _experts(lab, E, D, I)
    weights, idx = _routing(lab, N, E, K)
    x = torch.randn(N, D, generator=lab.gen)
    with torch.no_grad():
        out = _moe_reference(lab, x, weights, idx, experts)
    expect_close(out, combine_truth(x, weights, idx, experts),
                 f"moe_reference, N={N}, E={E}, K={K}",
                 atol=1e-5, rtol=1e-4, mistakes=_combine_mistakes(x, weights, idx, experts))


def check_combine_skewed_and_bf16(lab: Lab) -> None:
    """experts with no token, one expert chosen by every token, K = 1; a bf16 input keeps its
    dtype"""
    N, D, I, E = lab.randint(6, 20), lab.randint(4, 16), lab.randint(4, 16), lab.randint(6, 12)
    experts = _experts(lab, E, D, I)
    x = torch.randn(N, D, generator=lab.gen)
    for K in (1, lab.randint(2, 3)):
        # only experts 0..2 of E receive tokens: expert 1 in every token's first slot, then 0 and 2
        weights, _ = _routing(lab, N, 3, K)
        others = torch.stack([torch.tensor([0, 2])[torch.randperm(2, generator=lab.gen)]
                              for _ in range(N)])
        idx = torch.cat([torch.ones(N, 1, dtype=torch.int64), others[:, :K - 1]], dim=1)
        with torch.no_grad():
            out = _moe_reference(lab, x, weights, idx, experts)
        expect_close(out, combine_truth(x, weights, idx, experts), f"moe_reference, K={K}, experts "
                     f"3..{E - 1} idle", atol=1e-5, rtol=1e-4,
                     mistakes=_combine_mistakes(x, weights, idx, experts))
    xb, experts_b = x.bfloat16(), experts.to(torch.bfloat16)
    with torch.no_grad():
        out = _moe_reference(lab, xb, weights, idx, experts_b)
    want = combine_truth(xb, weights, idx, experts_b)
    # bf16 rounds every stage of the expert: the reference stays within 1.4% of the largest output
    # (measured, 300 seeds); 4% of it separates the known mistakes
    expect_close(out, want, "moe_reference on bf16 x and experts",
                 atol=0.04 * want.abs().max().item(),
                 mistakes=_combine_mistakes(xb, weights, idx, experts_b))


class _FixedRouting(torch.nn.Module):
    """Stands in for the MoE layer's Gate: the same given routing for every call."""

    def __init__(self, weights: Tensor, idx: Tensor, E: int):
        super().__init__()
        self.weights, self.idx, self.E = weights, idx, E

    def forward(self, x: Tensor):
        return self.weights, self.idx, torch.zeros(x.shape[0], self.E)


def check_combine_layer(lab: Lab) -> None:
    """the whole MoE layer: y = Σ_k w_k · Expert_k(x) + Shared(x) (shared expert weight 1)"""
    B, T, D, I = lab.randint(1, 3), lab.randint(3, 10), lab.randint(4, 16), lab.randint(4, 12)
    E, K = lab.randint(4, 8), lab.randint(2, 3)
    args = SimpleNamespace(num_experts_per_tok=K, n_group=1, topk_group=1, norm_topk_prob=True,
                           routed_scaling_factor=2.5, n_routed_experts=E, hidden_size=D,
                           moe_intermediate_size=I, n_shared_experts=1)
    layer = lab.moe.MoE(args).eval()
    layer.experts = _experts(lab, E, D, I)
    se = layer.shared_experts
    for w in (se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight):
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=lab.gen) / math.sqrt(w.shape[1]))
    weights, idx = _routing(lab, B * T, E, K)
    layer.gate, layer.impl = _FixedRouting(weights, idx, E), "reference"
    x = torch.randn(B, T, D, generator=lab.gen)
    with torch.no_grad():
        y = layer(x)
    xf = x.reshape(-1, D)
    shared = _swiglu64(xf, se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight)
    want = (combine_truth(xf, weights, idx, layer.experts) + shared).view(B, T, D)
    mistakes = {k: v.view(B, T, D)
                for k, v in _combine_mistakes(xf, weights, idx, layer.experts, shared).items()}
    expect_close(y, want, f"MoE layer on x ({B}, {T}, {D}), E={E}, K={K}", atol=1e-5, rtol=1e-4,
                 mistakes=mistakes)


def check_combine_gradients(lab: Lab) -> None:
    """the routing weights get the gradient ∂L/∂w_nk = <∂L/∂out_n, Expert_idx[n,k](x_n)> (the
    router's)"""
    N, D, I, E = lab.randint(6, 20), lab.randint(4, 16), lab.randint(4, 16), lab.randint(3, 8)
    K = lab.randint(2, min(3, E))
    experts = _experts(lab, E, D, I)
    weights, idx = _routing(lab, N, E, K)
    weights.requires_grad_(True)
    x = torch.randn(N, D, generator=lab.gen)
    g = torch.randn(N, D, generator=lab.gen)
    out = _moe_reference(lab, x, weights, idx, experts)
    if out.requires_grad:
        (out * g).sum().backward()
    stacks = (experts.gate_proj, experts.up_proj, experts.down_proj)
    want = torch.tensor([[float(g[n].double()
                                @ _swiglu64(x[n:n + 1], *(s[idx[n, k]] for s in stacks))[0])
                          for k in range(K)] for n in range(N)], dtype=torch.float64)
    if weights.grad is None:
        raise CheckFailed("no gradient reached the routing weights: multiply by them inside "
                          "autograd's graph (no .item(), .detach() or Python floats); the router "
                          "learns only through them")
    expect_close(weights.grad, want, "gradient of Σ g·out with respect to the routing weights",
                 atol=1e-4, rtol=1e-4)


register(Exercise(
    name="combine", file="moe.py", concept="routed experts' weighted combine", level="intro",
    minutes=20, against="fp64 token-by-token; the MoE layer; fp64 gradient",
    statement="""\
Each token's routed output is the weighted sum of its K experts (DeepSeek-V3 arXiv 2412.19437
§2.1.2, eq. 12; MoE.forward then adds the shared expert with weight 1:
y = Σ_k w_k·Expert_k(x) + Shared(x)):
    out_n = Σ_{k<K} weights[n, k] · Expert_{idx[n, k]}(x_n),
    Expert_e(x) = swiglu(x, experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e])
Loop over the experts: find the (token, slot) pairs that chose expert e, run expert e once on
those tokens' rows, and add the weighted outputs into their tokens' rows. An expert may receive no
token. Accumulate in _acc_dtype(x) (fp32 for fp32/bf16 x, fp64 for fp64), return x's dtype, and
keep `weights` in autograd's graph (the router learns through them).
In scope: x (N, D); weights (N, K) fp32; idx (N, K) int64, K distinct experts per row; experts
with .gate_proj, .up_proj (E, I, D), .down_proj (E, D, I), .num_experts; swiglu, _acc_dtype, torch.
Return out (N, D).""",
    hints=("(idx == e).nonzero(as_tuple=True) gives the tokens that chose expert e and the slot in "
           "which each chose it; weights[tok, slot] is then their weights.",
           "out.index_add_(0, tok, rows) adds row j of `rows` into row tok[j] of out."),
    checks=(check_combine_random, check_combine_skewed_and_bf16, check_combine_layer,
            check_combine_gradients),
    mistakes=(
        Mistake(COMBINE_NO_WEIGHTS, (("y.to(acc) * weights[tok, slot, None]", "y.to(acc)"),)),
        Mistake(COMBINE_OVERWRITE, (("out.index_add_(0, tok, y.to(acc) * weights[tok, slot, None])",
                                     "out[tok] = y.to(acc) * weights[tok, slot, None]"),)),
        Mistake(COMBINE_ROWS, (("out.index_add_(0, tok, ",
                                "out.index_add_(0, torch.arange(tok.numel()), "),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: Muon's update scale (muonclip.py muon_scale)

MUON_ROWS = "scaled by sqrt(A), the number of rows: use the larger side, sqrt(max(A, B))"
MUON_COLS = "scaled by sqrt(B), the number of columns: use the larger side, sqrt(max(A, B))"
MUON_NO_RMS = "the 0.2 factor is missing (Moonlight matches AdamW's update RMS of ~0.2, not 1)"
MUON_KELLER = ("Keller Jordan's original scale max(1, A/B)^½ (torch.optim.Muon "
               "adjust_lr_fn=\"original\"), not Moonshot's 0.2·sqrt(max(A, B))")
MUON_ALL_DIMS = ("the expert count E of an (E, A, B) stack was taken as a side of the matrix: "
                 "every expert is its own A×B matrix, use the last two dims only")


def muon_scale_truth(shape: tuple[int, ...], mistake: str = "") -> float:
    """Moonlight arXiv 2502.16982 §2.2 (eq. 4, Lemma 1): the Muon update of an A×B matrix is
    rescaled by 0.2·sqrt(max(A, B)) so that its RMS matches AdamW's; leading dims are a batch.
    `mistake` gives its value."""
    A, B = shape[-2], shape[-1]
    return {MUON_ROWS: 0.2 * math.sqrt(A), MUON_COLS: 0.2 * math.sqrt(B),
            MUON_NO_RMS: math.sqrt(max(A, B)),
            MUON_KELLER: max(1.0, A / B) ** 0.5, MUON_ALL_DIMS: 0.2 * math.sqrt(max(shape))
            }.get(mistake, 0.2 * math.sqrt(max(A, B)))


def _muon_scale_compare(got: list, shapes: list[tuple[int, ...]], what: str, rtol: float) -> None:
    for s, v in zip(shapes, got):
        if not isinstance(v, (int, float)) and not (isinstance(v, torch.Tensor) and v.numel() == 1):
            raise CheckFailed(f"muon_scale({s}) returned {type(v).__name__}: expected a number")
    got_t = torch.tensor([float(v) for v in got], dtype=torch.float64)
    def row(mistake=""):
        return torch.tensor([muon_scale_truth(s, mistake) for s in shapes], dtype=torch.float64)

    expect_close(got_t, row(), f"{what} for shapes {shapes}", atol=0.0, rtol=rtol,
                 mistakes={m: row(m) for m in (MUON_ROWS, MUON_COLS, MUON_NO_RMS, MUON_KELLER,
                                               MUON_ALL_DIMS)})


def _muon_shapes(lab: Lab) -> list[tuple[int, ...]]:
    """A tall, a wide and a square matrix, and an expert stack whose count exceeds both sides."""
    a, b = lab.randint(4, 30), lab.randint(40, 300)
    n = lab.randint(5, 60)
    e, i, d = lab.randint(70, 130), lab.randint(4, 30), lab.randint(31, 64)
    return [(b, a), (a, b), (n, n), (e, i, d)]


def check_muon_scale_shapes(lab: Lab) -> None:
    """equals 0.2·sqrt(max(A, B)) for tall, wide and square matrices and an (E, A, B) expert
    stack"""
    shapes = _muon_shapes(lab)
    _muon_scale_compare([lab.muonclip.muon_scale(torch.Size(s)) for s in shapes], shapes,
                        "muon_scale", rtol=1e-9)


def check_muon_scale_by_hand(lab: Lab) -> None:
    """(4, 9) -> 0.6, (16, 4) -> 0.8, an (8, 100, 25) stack -> 2.0 (worked by hand)"""
    shapes = [(4, 9), (16, 4), (8, 100, 25)]       # 0.2·√9, 0.2·√16, 0.2·√100
    got = [lab.muonclip.muon_scale(s) for s in shapes]
    _muon_scale_compare(got, shapes, "muon_scale", rtol=1e-9)
    if [round(float(v), 9) for v in got] != [0.6, 0.8, 2.0]:
        raise CheckFailed(f"muon_scale gave {got} for {shapes}; expected [0.6, 0.8, 2.0]")


def check_muon_scale_in_the_update(lab: Lab) -> None:
    """muon_update's result is 0.2·sqrt(max(A, B)) times the fp64 Newton-Schulz factor (fitted per
    matrix)"""
    shapes = _muon_shapes(lab)[:2] + [(lab.randint(2, 4), lab.randint(40, 64), lab.randint(4, 20))]
    fitted = []
    for s in shapes:
        G = torch.randn(s, generator=lab.gen)
        update = lab.muonclip.muon_update(G, torch.zeros_like(G))
        # the update's direction; only its scale is graded here
        O = newton_schulz_truth(G)
        # least-squares factor per matrix, <update, O> / <O, O>: bf16 Newton-Schulz moves it by < 1%
        # (measured over 30 seeds on such shapes)
        fitted.append(float(((update.double() * O).sum((-2, -1)) / (O * O).sum((-2, -1))).mean()))
    _muon_scale_compare(fitted, shapes, "the scale of muon_update's result", rtol=0.04)


register(Exercise(
    name="muon_scale", file="muonclip.py", concept="Muon's update-RMS scale", level="intro",
    minutes=10, against="the formula per shape; by hand; fitted on muon_update",
    statement="""\
Return the factor Muon's orthogonalised update O of an A×B matrix is multiplied by, so that its RMS
matches AdamW's and AdamW's learning rate and weight decay carry over (Moonlight arXiv 2502.16982
§2.2, eq. 4 and Lemma 1; Kimi K2 arXiv 2507.20534 §2.1, Algorithm 1):  0.2·sqrt(max(A, B)).
The leading dims of an (..., A, B) shape are a batch: each expert of an (E, I, D) stack is its own
I×D matrix. MuonClip.step then applies W ← W·(1 − lr·wd) − lr·muon_scale(W.shape)·O: the
weight decay is decoupled and uses the unscaled lr.
In scope: shape (a tuple or torch.Size); MUON_RMS (0.2); math. Return a Python float.""",
    hints=("O ≈ U Vᵀ has min(A, B) singular values near 1, so ‖O‖_F² ≈ min(A, B) and its RMS is "
           "sqrt(min(A, B) / (A·B)) = 1/sqrt(max(A, B)).",
           "shape[-2] and shape[-1] are the matrix's sides, whatever the leading dims."),
    checks=(check_muon_scale_shapes, check_muon_scale_by_hand, check_muon_scale_in_the_update),
    mistakes=(
        Mistake(MUON_ROWS, (("math.sqrt(max(A, B))", "math.sqrt(A)"),)),
        Mistake(MUON_COLS, (("math.sqrt(max(A, B))", "math.sqrt(B)"),)),
        Mistake(MUON_NO_RMS, (("return MUON_RMS * math.sqrt(max(A, B))",
                               "return math.sqrt(max(A, B))"),)),
        Mistake(MUON_ALL_DIMS, (("math.sqrt(max(A, B))", "math.sqrt(max(shape))"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: the aux-loss-free routing-bias update (muonclip.py routing_bias_delta)

BIAS_REVERSED = ("the sign is reversed: over-loaded experts got a larger bias (more tokens); use "
                 "sign(mean load - load_i)")
BIAS_RAW = ("the raw difference (mean load - load_i) was used instead of its sign: every step is "
            "±speed")
BIAS_NO_SPEED = "the sign was not multiplied by the update speed"
BIAS_ZERO = "an expert exactly at the mean load moved: sign(0) is 0"
BIAS_NOT_CENTRED = "the 'moonlight' rule without subtracting the mean of the signs"


def bias_delta_truth(load: Tensor, speed: float, rule: str = "deepseek",
                     mistake: str = "") -> Tensor:
    """fp64, one expert at a time: Δb_i = speed · sign(mean load - load_i) (DeepSeek-V3 arXiv
    2412.19437 §2.1.2, "bias update speed" γ; Wang et al. arXiv 2408.15664 Algorithm 1); rule
    'moonlight' (Moonlight arXiv 2502.16982 App. C) subtracts the mean of those signs. `mistake`
    gives its output."""
    load = [float(v) for v in load]
    mean = sum(load) / len(load)
    def sign(v):
        return (v > 0) - (v < 0) if mistake != BIAS_ZERO else (1 if v >= 0 else -1)

    d = [(l - mean if mistake == BIAS_REVERSED else mean - l) for l in load]
    d = d if mistake == BIAS_RAW else [float(sign(v)) for v in d]
    if rule == "moonlight" and mistake != BIAS_NOT_CENTRED:
        d = [v - sum(d) / len(d) for v in d]
    return torch.tensor(d, dtype=torch.float64) * (1.0 if mistake == BIAS_NO_SPEED else speed)


def _bias_mistakes(load: Tensor, speed: float, rule: str) -> dict[str, Tensor]:
    ms = [BIAS_REVERSED, BIAS_RAW, BIAS_NO_SPEED, BIAS_ZERO]
    ms += [BIAS_NOT_CENTRED] if rule == "moonlight" else []
    return {m: bias_delta_truth(load, speed, rule, m) for m in ms}


def _loads(lab: Lab) -> Tensor:
    """Token counts (E,) in pairs (m+d, m-d): the mean m is an integer, and some experts sit exactly
    at it."""
    E, m = 2 * lab.randint(3, 16), lab.randint(20, 200)
    d = torch.randint(0, m, (E // 2,), generator=lab.gen)
    d[:2] = 0                                            # at least one pair at the mean
    load = torch.cat([m + d, m - d])
    return load[torch.randperm(E, generator=lab.gen)]


def _delta(lab: Lab, load: Tensor, speed: float, rule: str) -> Tensor:
    delta = lab.muonclip.routing_bias_delta(load, speed, rule)
    if (not isinstance(delta, torch.Tensor) or delta.shape != load.shape
            or delta.dtype != torch.float32):
        got = (f"{getattr(delta, 'dtype', type(delta).__name__)} "
               f"{tuple(getattr(delta, 'shape', ()))}")
        raise CheckFailed(f"routing_bias_delta on load {tuple(load.shape)} {load.dtype} returned "
                          f"{got}: expected fp32 of load's shape (the bias it moves is fp32)")
    return delta


def check_bias_update_deepseek(lab: Lab) -> None:
    """'deepseek' rule: speed · sign(mean load - load_i), as fp64 truth, for int and float loads"""
    speed = lab.uniform(1e-4, 1e-2)
    for load in (_loads(lab), _loads(lab).float()):
        expect_close(_delta(lab, load, speed, "deepseek"), bias_delta_truth(load, speed),
                     f"routing_bias_delta(load of {load.numel()} experts ({load.dtype}), speed "
                     f"{speed:.2g})",
                     atol=1e-9, rtol=1e-6, mistakes=_bias_mistakes(load, speed, "deepseek"))


def check_bias_update_moonlight(lab: Lab) -> None:
    """'moonlight' rule: the signs minus their mean; an unknown rule raises ValueError"""
    speed = lab.uniform(1e-4, 1e-2)
    load = _loads(lab)
    # one hot expert: the signs no longer sum to 0
    load[0] += 3 * int(load.float().mean())
    expect_close(_delta(lab, load, speed, "moonlight"), bias_delta_truth(load, speed, "moonlight"),
                 f"routing_bias_delta(rule='moonlight', speed {speed:.2g})", atol=1e-9, rtol=1e-6,
                 mistakes=_bias_mistakes(load, speed, "moonlight"))
    try:
        lab.muonclip.routing_bias_delta(load, speed, "aux_loss")
    except ValueError:
        return
    raise CheckFailed("routing_bias_delta(load, speed, rule='aux_loss') must raise ValueError "
                      "naming the rules ('deepseek', 'moonlight')")


def check_bias_update_by_hand(lab: Lab) -> None:
    """loads (3, 1, 2, 2) -> (-1, 1, 0, 0)·speed; 'moonlight' on (5, 1, 1, 1) -> (-1.5, .5, .5,
    .5)·speed"""
    load = torch.tensor([3, 1, 2, 2])
    # mean 2: expert 0 is over-loaded (less attractive), expert 1 under-loaded, experts 2 and 3 stay
    expect_close(_delta(lab, load, 1e-3, "deepseek"), torch.tensor([-1e-3, 1e-3, 0.0, 0.0]),
                 "routing_bias_delta((3, 1, 2, 2), 0.001)", atol=1e-9,
                 mistakes=_bias_mistakes(load, 1e-3, "deepseek"))
    load = torch.tensor([5, 1, 1, 1])
    # mean 2: signs (-1, 1, 1, 1), their mean 0.5
    expect_close(_delta(lab, load, 1e-3, "moonlight"),
                 torch.tensor([-1.5e-3, 0.5e-3, 0.5e-3, 0.5e-3]),
                 "routing_bias_delta((5, 1, 1, 1), 0.001, 'moonlight')", atol=1e-9,
                 mistakes=_bias_mistakes(load, 1e-3, "moonlight"))


def check_bias_update_layer(lab: Lab) -> None:
    """update_routing_bias_ moves a MoE layer's e_score_correction_bias by the rule, zeroes its load
    count"""
    E, D = lab.randint(4, 12), lab.randint(4, 8)
    args = SimpleNamespace(num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True,
                           routed_scaling_factor=1.0, n_routed_experts=E, hidden_size=D,
                           moe_intermediate_size=4, n_shared_experts=1)
    layer = lab.moe.MoE(args)
    before = 0.05 * torch.randn(E, generator=lab.gen)
    load = torch.randint(0, 50, (E,), generator=lab.gen).float()
    layer.gate.e_score_correction_bias.copy_(before)
    layer.expert_load.copy_(load)
    speed = lab.uniform(1e-4, 1e-2)
    lab.muonclip.update_routing_bias_(torch.nn.Sequential(layer), speed)
    moved = layer.gate.e_score_correction_bias - before
    expect_close(moved, bias_delta_truth(load, speed),
                 f"change of e_score_correction_bias ({E} experts, "
                 f"speed {speed:.2g})", atol=1e-7, mistakes=_bias_mistakes(load, speed, "deepseek"))
    if bool(layer.expert_load.any()):
        raise CheckFailed("expert_load must be zero after update_routing_bias_ (it is outside your "
                          "region: restore muonclip.py's update_routing_bias_)")


register(Exercise(
    name="bias_update", file="muonclip.py", concept="aux-loss-free routing-bias update",
    level="intro", minutes=15, against="fp64 per expert; by hand; a MoE layer",
    statement="""\
Move each expert's routing bias towards balanced load (DeepSeek-V3 arXiv 2412.19437 §2.1.2,
auxiliary-loss-free load balancing, "bias update speed" γ, 0.001 in §4.2; Wang et al. arXiv
2408.15664): after a step in which expert i received load_i tokens,
    'deepseek':   Δb_i = speed · sign(mean_j load_j − load_i)
an over-loaded expert's bias goes down (fewer tokens choose it), an under-loaded one's goes up, an
expert exactly at the mean stays. 'moonlight' (Moonlight arXiv 2502.16982 App. C) subtracts the
mean of those signs: Δb_i = speed · (sign_i − mean_j sign_j). Any other rule: raise ValueError.
In scope: load (E,) token counts, any dtype; speed (float); rule ('deepseek' or 'moonlight');
torch. Return Δb (E,) fp32 (update_routing_bias_ adds it to the fp32 e_score_correction_bias).""",
    hints=("torch.sign gives -1, 0 or +1 per entry, so an expert exactly at the mean does not "
           "move.",
           "Convert load to fp32 first: bincount counts are int64, and load.mean() needs a float "
           "tensor."),
    checks=(check_bias_update_deepseek, check_bias_update_moonlight, check_bias_update_by_hand,
            check_bias_update_layer),
    mistakes=(
        Mistake(BIAS_REVERSED, (("err = load.mean() - load", "err = load - load.mean()"),)),
        Mistake(BIAS_RAW, (("direction = torch.sign(err)", "direction = err"),)),
        Mistake(BIAS_NOT_CENTRED, (("direction = direction - direction.mean()",
                                    "direction = direction"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: QK-Clip per head on MLA's weights (muonclip.py _scale_qk_rows_)


QK_QR_ROOT = "q^R (the head's rope query rows) was scaled by sqrt(γ_h): it must take the whole γ_h"
QK_KR = ("the shared rope key k^R (the last Dr rows of kv_a_proj_with_mqa) was scaled: every head "
         "uses it, so leave it alone and give q^R the whole γ_h")
QK_ALL_HEADS = ("every head was scaled by the layer's smallest γ (per-layer clipping): each head "
                "takes its own γ_h, and heads at or under τ (γ_h = 1) stay unchanged")
QK_V = ("the value rows of kv_b_proj were scaled too: only k^C rows take sqrt(γ_h) (values are not "
        "logits)")
QK_Q_ONLY = ("q^C took the whole γ_h and k^C none: the logits are right, but K2 splits it evenly, "
             "sqrt(γ_h) on q^C and on k^C")


def qk_clip_truth(q: Tensor, kv_b: Tensor, gamma: Tensor, H: int, Dn: int,
                  mistake: str = "") -> tuple:
    """fp64, one head at a time (Kimi K2 arXiv 2507.20534 §2.1, Algorithm 1, MLA case): rows of head
    h in q ([q^C (Dn) | q^R (Dr)] per head) × sqrt(γ_h) and × γ_h; rows of k^C in kv_b ([k^C (Dn) |
    v (Dv)] per head) × sqrt(γ_h), v rows untouched. Returns the new (q, kv_b); `mistake` gives its
    output."""
    q, kv_b = q.double().clone(), kv_b.double().clone()
    g = gamma.double().tolist()
    if mistake == QK_ALL_HEADS:
        g = [min(g)] * H
    qh, kvh = q.view(H, -1, q.shape[-1]), kv_b.view(H, -1, kv_b.shape[-1])
    for h in range(H):
        root = math.sqrt(g[h])
        qh[h, :Dn] *= g[h] if mistake == QK_Q_ONLY else root
        qh[h, Dn:] *= root if mistake == QK_QR_ROOT else g[h]
        if mistake == QK_V:
            kvh[h] *= root
        elif mistake != QK_Q_ONLY:
            kvh[h, :Dn] *= root
    return q, kv_b


def _mla(lab: Lab, q_lora: bool):
    """A real attention.MLA of random small sizes, its weights drawn from the check's generator."""
    H, Dn, Dr, Dv = lab.randint(2, 6), lab.randint(2, 8), 2 * lab.randint(1, 4), lab.randint(2, 8)
    args = dataclasses.replace(lab.config.PRESETS["tiny"](), num_attention_heads=H,
                               qk_nope_head_dim=Dn,
                               qk_rope_head_dim=Dr, v_head_dim=Dv, kv_lora_rank=lab.randint(4, 12),
                               q_lora_rank=lab.randint(4, 12) if q_lora else None,
                               hidden_size=lab.randint(8, 24))
    attn = lab.attention.MLA(args)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=lab.gen))
    return attn


def _gamma(lab: Lab, H: int) -> Tensor:
    """Per-head factors: about half the heads exactly 1 (under τ), the rest (at least one) in (0.05,
    0.95)."""
    g = 0.05 + 0.9 * torch.rand(H, generator=lab.gen)
    g[torch.rand(H, generator=lab.gen) < 0.5] = 1.0
    g[lab.randint(0, H - 1)] = 0.05 + 0.9 * lab.uniform(0, 1)
    return g


def _q_weight(attn) -> Tensor:
    return (attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj).weight


def _check_qk_rows(lab: Lab, attn, gamma: Tensor, what: str) -> None:
    H, Dn = attn.num_heads, attn.qk_nope_head_dim
    before = {n: p.detach().clone() for n, p in attn.named_parameters()}
    qname = "q_proj.weight" if attn.q_lora_rank is None else "q_b_proj.weight"
    outs = {m: qk_clip_truth(before[qname], before["kv_b_proj.weight"], gamma, H, Dn, m)
            for m in ("", QK_QR_ROOT, QK_ALL_HEADS, QK_V, QK_Q_ONLY)}
    with torch.no_grad():
        lab.muonclip._scale_qk_rows_(attn, gamma.clone())
    after = dict(attn.named_parameters())
    if not torch.equal(after["kv_a_proj_with_mqa.weight"], before["kv_a_proj_with_mqa.weight"]):
        raise CheckFailed(f"{what}: {QK_KR}")
    expect_close(after[qname], outs[""][0], f"{what}: {qname} (per head [q^C | q^R] rows)",
                 atol=1e-6, rtol=1e-6, mistakes={m: o[0] for m, o in outs.items() if m})
    expect_close(after["kv_b_proj.weight"], outs[""][1],
                 f"{what}: kv_b_proj.weight (per head [k^C | v] "
                 f"rows)", atol=1e-6, rtol=1e-6, mistakes={m: o[1] for m, o in outs.items() if m})
    for name in before:
        if name not in (qname, "kv_b_proj.weight") and not torch.equal(after[name], before[name]):
            raise CheckFailed(f"{what}: {name} changed; QK-Clip only rescales q^C, q^R and k^C "
                              "rows")
    # heads under τ: exactly as before
    same = gamma == 1
    qh, qt = (after[qname].view(H, -1, after[qname].shape[-1]),
              outs[""][0].view(H, -1, after[qname].shape[-1]))
    if not torch.equal(qh[same].double(), qt[same]):
        raise CheckFailed(f"{what}: heads {same.nonzero().flatten().tolist()} have γ = 1 (under τ) "
                          f"and must stay bit-identical")


def check_qk_clip_rows(lab: Lab) -> None:
    """K2's layout (q_lora_rank set, q_b_proj): q^C × sqrt(γ_h), q^R × γ_h, k^C × sqrt(γ_h), all
    else kept"""
    attn = _mla(lab, q_lora=True)
    _check_qk_rows(lab, attn, _gamma(lab, attn.num_heads),
                   f"QK-Clip of {attn.num_heads} heads (q_b_proj)")


def check_qk_clip_plain_q(lab: Lab) -> None:
    """Moonlight's layout (q_lora_rank None: q_proj): the same rows scaled"""
    attn = _mla(lab, q_lora=False)
    _check_qk_rows(lab, attn, _gamma(lab, attn.num_heads),
                   f"QK-Clip of {attn.num_heads} heads (q_proj)")


def check_qk_clip_logits(lab: Lab) -> None:
    """through qk_clip_: every logit of a head over τ becomes γ_h times what it was (fp64, random
    latents)"""
    attn = _mla(lab, q_lora=True)
    H, Dn, Dr = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    tau = lab.uniform(20.0, 100.0)
    # recorded max logits, some over τ
    S = tau * (0.5 + 2 * torch.rand(H, generator=lab.gen))
    S[0] = 3 * tau
    attn.record_max_logits = True
    attn.max_logits.copy_(S)
    c_q = torch.randn(7, attn.q_lora_rank, generator=lab.gen, dtype=torch.float64)
    c_kv = torch.randn(5, attn.kv_lora_rank, generator=lab.gen, dtype=torch.float64)
    h = torch.randn(5, attn.kv_a_proj_with_mqa.in_features, generator=lab.gen, dtype=torch.float64)

    def logits() -> tuple[Tensor, Tensor]:
        """The two parts (H, 7, 5) of q_h·k_h: q^C·k^C and q^R·k^R, with q = W_qb c_q, k^C = W_kc
        c_kv and the shared k^R = W_kR h (RoPE rotates q^R and k^R by position and does not change
        any scaling)."""
        q = (c_q @ attn.q_b_proj.weight.detach().double().T).view(7, H, Dn + Dr)
        kv = (c_kv @ attn.kv_b_proj.weight.detach().double().T).view(5, H, -1)
        k_r = h @ attn.kv_a_proj_with_mqa.weight.detach().double()[-Dr:].T      # (5, Dr)
        return (torch.einsum("thd,shd->hts", q[..., :Dn], kv[..., :Dn]),
                torch.einsum("thd,sd->hts", q[..., Dn:], k_r))

    nope, rope = logits()
    old = nope + rope
    lab.muonclip.qk_clip_(torch.nn.Sequential(attn), tau)
    gamma = torch.where(S > tau, tau / S, torch.ones_like(S)).double()
    g = gamma[:, None, None]
    # fp32 weights rescaled in fp32: each logit moves by a few fp32 roundings of its largest terms
    expect_close(sum(logits()), g * old, f"logits of {H} heads after qk_clip_ (τ = {tau:.1f}, γ = "
                 f"{[round(v, 3) for v in gamma.tolist()]})", atol=1e-5 * old.abs().max().item(),
                 rtol=1e-5,
                 mistakes={QK_ALL_HEADS: gamma.min() * old, QK_QR_ROOT: g * nope + g.sqrt() * rope})


register(Exercise(
    name="qk_clip", file="muonclip.py", concept="QK-Clip per head on MLA", level="core", minutes=25,
    against="fp64 rows per head; fp64 logits",
    statement="""\
Rescale the query/key weights of one MLA layer per head so that every logit of head h becomes γ_h
times what it was (Kimi K2 arXiv 2507.20534 §2.1, QK-Clip, Algorithm 1; γ_h = min(1, τ/S_max,h) is
given, exactly 1.0 for heads at or under τ, which must stay bit-identical). A head's logit is
q^C·k^C + q^R·k^R, and k^R is ONE rope key shared by all heads, so:
    q^C rows × sqrt(γ_h),  k^C rows × sqrt(γ_h),  q^R rows × γ_h,  k^R untouched, v rows untouched.
Row layouts (nn.Linear weights (out, in), in place, under no_grad already):
    q_b_proj.weight, or q_proj.weight when attn.q_lora_rank is None: (H·(Dn+Dr), in), per head
        [Dn rows of q^C | Dr rows of q^R]
    kv_b_proj.weight: (H·(Dn+Dv), Ckv), per head [Dn rows of k^C | Dv rows of v]
    kv_a_proj_with_mqa.weight: (Ckv+Dr, D), its last Dr rows make k^R (leave it)
In scope: attn (attention.MLA: .num_heads H, .qk_nope_head_dim Dn, .qk_rope_head_dim Dr,
.q_lora_rank, the projections above); gamma (H,) fp32; torch. Return nothing.""",
    hints=("w.view(H, Dn + Dr, w.size(-1)) gives a per-head view of the rows; multiplying a slice "
           "of a view in place (mul_) changes the weight itself.",
           "gamma[:, None, None] broadcasts one factor per head over that head's rows and columns.",
           "Why γ on q^R alone: k^R is the same vector for every head, so scaling it by one head's "
           "factor would change the logits of all the others."),
    checks=(check_qk_clip_rows, check_qk_clip_plain_q, check_qk_clip_logits),
    mistakes=(
        Mistake(QK_QR_ROOT, (("qh[:, Dn:].mul_(gamma.to(q.dtype)[:, None, None])",
                              "qh[:, Dn:].mul_(root.to(q.dtype)[:, None, None])"),)),
        Mistake(QK_KR, (("kvh[:, :Dn].mul_(root.to(kv.dtype)[:, None, None])",
                         "kvh[:, :Dn].mul_(root.to(kv.dtype)[:, None, None])\n"
                         "    attn.kv_a_proj_with_mqa.weight[-Dr:].mul_(root.min())"),)),
        Mistake(QK_ALL_HEADS, (("root = gamma.sqrt()",
                                "gamma = gamma.min().expand(H)\n    root = gamma.sqrt()"),)),
        Mistake(QK_V, (("kvh[:, :Dn].mul_(", "kvh.mul_("),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: a BPE merge step (tokenizer.py learn_bpe)

BPE_UNWEIGHTED = ("pair counts not weighted by chunk frequency (a chunk that occurs f times "
                  "contributes each of its pairs f times)")
BPE_TIE = ("ties broken the other way: among equally frequent pairs the one whose first occurrence "
           "comes first in the text must win")
BPE_OVERLAP = ("overlapping replacement: 'aaa' with the pair (a, a) must become [aa, a], not [aa, "
               "aa] (after a merge the scan goes on after the pair)")
BPE_RTL = ("pairs replaced right to left: 'aaa' with the pair (a, a) must become [aa, a], not [a, "
           "aa]")
BPE_TIE_IDS = ("ties broken by comparing the pairs' token ids ({}), not by which occurs first in "
               "the text")


def _merge_ltr(word: list, pair: tuple, new) -> list:
    """Left to right, non-overlapping: the textbook replacement (Sennrich et al., arXiv 1508.07909
    §3.1)."""
    out, i = [], 0
    while i < len(word):
        if tuple(word[i:i + 2]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _merge_overlapping(word: list, pair: tuple, new) -> list:
    """The mistake: every position where the pair starts is merged, even one that overlaps the
    previous."""
    out = []
    for i in range(len(word)):
        if tuple(word[i:i + 2]) == pair:
            out.append(new)
        elif i == 0 or tuple(word[i - 1:i + 1]) != pair:
            out.append(word[i])
    return out


def _merge_rtl(word: list, pair: tuple, new) -> list:
    """The mistake: the same scan from the right end."""
    return _merge_ltr(word[::-1], pair[::-1], new)[::-1]


def bpe_truth(chunks: list[tuple[str, int]], n_ranks: int, weighted: bool = True,
              tie: str = "first", merge: Callable = _merge_ltr) -> dict[bytes, int]:
    """Byte-level BPE recomputed from scratch at every step (Sennrich et al., arXiv 1508.07909
    §3.1): ranks 0..255 are the bytes; then count every adjacent pair over all chunks (times the
    chunk's frequency), merge the most frequent (ties: the earliest first occurrence; a dict filled
    in text order keeps that order) into the next rank. A merge that spells an existing token reuses
    its rank. The options make the mistakes."""
    words = [[bytes([b]) for b in chunk.encode("utf-8")] for chunk, _ in chunks]
    freqs = [f if weighted else 1 for _, f in chunks]
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < n_ranks:
        counts: dict[tuple[bytes, bytes], int] = {}
        for word, f in zip(words, freqs):
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + f
        if not counts:
            break
        best = max(counts.values())
        tied = [pair for pair, c in counts.items() if c == best]   # in order of first occurrence
        ids = {p: (ranks[p[0]], ranks[p[1]]) for p in tied}
        pair = {"first": tied[0], "last": tied[-1], "smallest": min(tied, key=ids.get),
                "largest": max(tied, key=ids.get)}[tie]
        merged = pair[0] + pair[1]
        ranks.setdefault(merged, len(ranks))
        words = [merge(word, pair, merged) for word in words]
    return ranks


def mistake_outputs(variants: dict[str, dict], run: Callable) -> dict:
    """{description: run(**kwargs)} for each known mistake given as keyword arguments of a truth
    function, then for every two of them made together where that differs from each alone (so a
    student who makes two gets both named)."""
    out = {d: run(**kw) for d, kw in variants.items()}
    names = list(variants)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if not set(variants[a]) & set(variants[b]):
                both = run(**variants[a], **variants[b])
                if both != out[a] and both != out[b]:
                    out[f"{a} — and also: {b}"] = both
    return out


def _bpe_mistakes(chunks: list[tuple[str, int]], n_ranks: int) -> dict[str, dict[bytes, int]]:
    variants = {BPE_UNWEIGHTED: dict(weighted=False), BPE_TIE: dict(tie="last"),
                BPE_OVERLAP: dict(merge=_merge_overlapping), BPE_RTL: dict(merge=_merge_rtl),
                BPE_TIE_IDS.format("the smallest won"): dict(tie="smallest"),
                BPE_TIE_IDS.format("the largest won"): dict(tie="largest")}
    return mistake_outputs(variants, lambda **kw: bpe_truth(chunks, n_ranks, **kw))


def expect_same(got, want, what: str, mistakes: dict | None = None,
                show: Callable | None = None) -> None:
    """Raise CheckFailed unless got == want (exact, for texts, token lists, dicts). On a mismatch
    every known mistake whose output equals `got` is named; otherwise `show(got, want)` (default:
    both reprs) says where."""
    if got == want:
        return
    named = [description for description, out in (mistakes or {}).items() if got == out]
    if named:
        raise CheckFailed(f"{what}: wrong, and it matches a known mistake: {' — or: '.join(named)}")
    where = show(got, want) if show else f"got {got!r:.300}, expected {want!r:.300}"
    raise CheckFailed(f"{what}: {where}; it matches none of the known mistakes")


def _show_ranks(got, want: dict[bytes, int]) -> str:
    """The first rank at which two BPE vocabularies differ."""
    if not isinstance(got, dict):
        return f"expected a dict {{token bytes: rank}}, got {type(got).__name__}"
    by_rank = ({r: t for t, r in got.items()}
               if all(isinstance(r, int) for r in got.values()) else {})
    for t, r in sorted(want.items(), key=lambda tr: tr[1]):
        if by_rank.get(r) != t:
            return (f"{len(got)} ranks, expected {len(want)}; rank {r} is {by_rank.get(r)!r}, "
                    f"expected {t!r}")
    extra = sorted(set(by_rank) - set(want.values()))
    return (f"{len(got)} ranks, expected {len(want)}; unexpected rank {extra[0]}: "
            f"{by_rank[extra[0]]!r}")


def _learn(lab: Lab, chunks: list[tuple[str, int]], n_ranks: int):
    return lab.tokenizer.learn_bpe(dict(chunks), n_ranks)


def check_bpe_by_hand(lab: Lab) -> None:
    """four corpora worked by hand: chunk weights, the tie-break, overlapping pairs, the scan
    direction"""
    cases = [
        # (a, b) occurs once, (c, d) three times: "cd" wins only when the counts are weighted
        ([("ab", 1), ("cd", 3)], 257, {b"cd": 256}),
        # (z, w) and (x, y) both occur twice; (z, w) occurs first in the text
        ([("zw", 2), ("xy", 2)], 257, {b"zw": 256}),
        # aaaaa: (a, a) x4 -> [aa, aa, a]; (aa, aa) and (aa, a) tie, (aa, aa) is first -> [aaaa, a]
        # -> aaaaa
        ([("aaaaa", 1)], 259, {b"aa": 256, b"aaaa": 257, b"aaaaa": 258}),
        # baaa: (a, a) x2 -> [b, aa, a]; (b, aa) and (aa, a) tie, (b, aa) is first -> baa
        ([("baaa", 1)], 258, {b"aa": 256, b"baa": 257}),
    ]
    for chunks, n_ranks, merges in cases:
        want = {bytes([b]): b for b in range(256)} | merges
        expect_same(_learn(lab, chunks, n_ranks), want,
                    f"learn_bpe({dict(chunks)}, n_ranks={n_ranks}) (new "
                    f"ranks expected: {merges})", _bpe_mistakes(chunks, n_ranks), _show_ranks)


def _random_chunks(lab: Lab) -> list[tuple[str, int]]:
    """Distinct random words over a small alphabet (with 2- and 3-byte characters), random
    frequencies."""
    letters = ["a", "b", "c", "d", "é", "中", " "][:lab.randint(2, 7)]
    chunks: dict[str, int] = {}
    for _ in range(lab.randint(4, 16)):
        word = "".join(letters[lab.randint(0, len(letters) - 1)] for _ in range(lab.randint(1, 9)))
        chunks.setdefault(word, lab.randint(1, 4))
    return list(chunks.items())


def check_bpe_random(lab: Lab) -> None:
    """matches BPE recomputed from scratch at every merge, on random small corpora"""
    for _ in range(6):
        chunks = _random_chunks(lab)
        n_ranks = 256 + lab.randint(3, 30)
        expect_same(_learn(lab, chunks, n_ranks), bpe_truth(chunks, n_ranks),
                    f"learn_bpe on {len(chunks)} chunks {chunks[:3]}..., n_ranks={n_ranks}",
                    _bpe_mistakes(chunks, n_ranks), _show_ranks)


def check_bpe_runs_out(lab: Lab) -> None:
    """stops when every chunk is one token (fewer ranks than asked), and n_ranks=256 gives just the
    bytes"""
    chunks = _random_chunks(lab)
    possible = len(bpe_truth(chunks, 10 ** 6))
    n_ranks = possible + lab.randint(1, 50)
    expect_same(_learn(lab, chunks, n_ranks), bpe_truth(chunks, n_ranks),
                f"learn_bpe asked for more ranks "
                f"than the {possible} this corpus can make", _bpe_mistakes(chunks, n_ranks),
                _show_ranks)
    expect_same(_learn(lab, chunks, 256), bpe_truth(chunks, 256), "learn_bpe with n_ranks=256",
                None, _show_ranks)


register(Exercise(
    name="bpe_merge", file="tokenizer.py", concept="BPE merge step (byte-level trainer)",
    level="core", minutes=35,
    against="BPE recomputed from scratch; by hand",
    statement="""\
Train byte-level BPE (Sennrich et al., arXiv 1508.07909 §3.1; byte-level: GPT-2 §2.2). Ranks 0..255
are the single bytes in byte order (bytes([b]) -> b). Then, until there are n_ranks ranks, one merge
step:
  1. count every adjacent pair of tokens over all chunks, a chunk occurring f times counting its
     pairs f times;
  2. pick the most frequent pair; ties go to the pair whose first occurrence comes first in the text
     (chunks in the given order, then position in the chunk) — tiktoken's _educational.bpe_train
     picks the same;
  3. its two tokens' bytes, concatenated, become the next rank;
  4. replace the pair in every chunk left to right without overlapping:
     "aaa" with (a, a) -> [aa, a].
Stop early when no pair is left (every chunk one token). BPE never merges across chunks.
In scope: chunk_counts, a dict {chunk str: count} in order of first appearance;
n_ranks (int >= 256); verbose (print progress if you like); _merge_word(word, pair, new_id) (step 4
on a list of ids).
Return {token bytes: rank} with ranks 0..len-1.""",
    hints=("Keep one list of token ids per distinct chunk (list(chunk.encode('utf-8'))) beside its "
           "count, and token_bytes[id] for every id: a recount of all pairs at every step is fast "
           "enough here.",
           "A dict filled while scanning the chunks in order remembers first occurrences: "
           "max(counts, key=counts.get) returns the first of the tied pairs.",
           "Replace with a while loop over the positions: on a match append the new id and skip "
           "two, else copy one. The real trainer keeps counts incrementally (see `solution`); you "
           "need not."),
    checks=(check_bpe_by_hand, check_bpe_random, check_bpe_runs_out),
    mistakes=(
        Mistake(BPE_UNWEIGHTED, (("freqs = list(chunk_counts.values())",
                                  "freqs = [1] * len(chunk_counts)"),)),
        Mistake(BPE_TIE, (("pair = _pop_most_frequent(heap, counts, where, words)",
                           "pair = max(counts, key=lambda p: (counts[p], min(where[p]), next(\n"
                           "            i for i, q in enumerate(zip(words[min(where[p])], "
                           "words[min(where[p])][1:])) if q == p)), default=None)"),)),
        Mistake(BPE_OVERLAP, (("new_word = _merge_word(word, pair, new_id)",
                               "new_word = [new_id if tuple(word[i:i + 2]) == pair else t "
                               "for i, t in enumerate(word)\n"
                               "                        if tuple(word[i:i + 2]) == pair or "
                               "i == 0 or tuple(word[i - 1:i + 1]) != pair]"),)),
        Mistake(BPE_RTL, (("new_word = _merge_word(word, pair, new_id)",
                           "new_word = _merge_word(word[::-1], pair[::-1], new_id)[::-1]"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: rendering an assistant's tool calls in the chat template (tokenizer.py _chat_segments)

RENDER_FROM_1 = ("made-up call ids counted from 1: the first call of a conversation is "
                 "functions.NAME:0")
RENDER_PER_MESSAGE = ("the made-up call index restarts in every assistant message: it counts every "
                      "tool call of the conversation so far (n_calls must grow by the number of "
                      "calls)")
RENDER_PER_NAME = ("made-up call index counted per tool name: IDX counts every earlier call of the "
                   "conversation, whatever its name")
RENDER_ASCII = ("dict arguments not written as the template's tojson: json.dumps with "
                "ensure_ascii=False (non-ASCII characters stay as they are, not \\u escapes)")
RENDER_STR_AGAIN = ("string arguments encoded again: the template prints a JSON string of "
                    "arguments as it is (only a dict goes through tojson)")
RENDER_NO_END = ("the section is not closed: <|tool_calls_section_end|> must follow the last "
                 "<|tool_call_end|>")
RENDER_AS_TEXT = ("markers added as text, not as special tokens: encode_chat then spells "
                  "<|tool_call_begin|> etc. with ordinary byte tokens (add(MARKER, True, sup))")
RENDER_UNSUPERVISED = ("the tool-call section is not supervised: the loss mask must be 1 on the "
                       "markers, ids and arguments an assistant wrote")
# the line the mistakes edit
_RENDER_CALLS = 'calls = _normalize_tool_calls(m["tool_calls"], at, n_calls)'
# Kimi-K2-Instruct-0905 chat_template
K2_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."


def chat_truth(messages: list[dict], id_from: int = 0, per_message: bool = False,
               per_name: bool = False,
               ascii_json: bool = False, str_again: bool = False, section_end: bool = True,
               markers_special: bool = True,
               section_supervised: bool = True) -> list[tuple[str, bool, bool]]:
    """The conversation as Kimi-K2-Instruct-0905's chat_template.jinja lays it out (with the
    generation prompt), written again from the template: (text, is_special, supervised) pieces,
    adjacent texts of the same supervision joined. An assistant's tool calls (MoonshotAI/Kimi-K2
    docs/tool_call_guidance.md): content, then <|tool_calls_section_begin|>, per call
    <|tool_call_begin|>ID<|tool_call_argument_begin|> ARGS<|tool_call_end|>, then
    <|tool_calls_section_end|>; ID the call's id or functions.NAME:IDX, IDX counting every call of
    the conversation from 0; ARGS a string as it is, a dict as Hugging Face's tojson (json.dumps,
    ensure_ascii=False, keys in order). The options produce the known mistakes."""
    pieces: list[tuple[str, bool, bool]] = []

    def put(text: str, special: bool = False, sup: bool = False, in_section: bool = False) -> None:
        special = special and (markers_special or not in_section)
        if not special and not text:
            return
        if not special and pieces and not pieces[-1][1] and pieces[-1][2] == sup:
            pieces[-1] = (pieces[-1][0] + text, False, sup)
        else:
            pieces.append((text, special, sup))

    put("<|im_system|>", True), put("system"), put("<|im_middle|>", True), put(K2_SYSTEM)
    put("<|im_end|>", True)
    n_calls, by_name = 0, {}   # calls so far, and per tool name (for the per-name mistake)
    for m in messages:
        sup = m["role"] == "assistant"
        put({"user": "<|im_user|>", "assistant": "<|im_assistant|>"}.get(m["role"],
                                                                         "<|im_system|>"),
            True)
        put(m["role"]), put("<|im_middle|>", True)
        if m.get("tool_calls"):
            put(m.get("content") or "", sup=True)
            s = sup and section_supervised
            put("<|tool_calls_section_begin|>", True, s, True)
            for j, call in enumerate(m["tool_calls"]):
                fn = call["function"]
                same_name = by_name.get(fn["name"], 0)
                index = (same_name if per_name else j if per_message else n_calls + j) + id_from
                by_name[fn["name"]] = same_name + 1
                call_id = call.get("id") or f"functions.{fn['name']}:{index}"
                args = fn["arguments"]
                if not isinstance(args, str) or str_again:
                    args = json.dumps(args, ensure_ascii=ascii_json)
                put("<|tool_call_begin|>", True, s, True), put(call_id, sup=s)
                put("<|tool_call_argument_begin|>", True, s, True), put(args, sup=s)
                put("<|tool_call_end|>", True, s, True)
            if section_end:
                put("<|tool_calls_section_end|>", True, s, True)
            n_calls += len(m["tool_calls"])
        elif m["role"] == "tool":
            put(f"## Return of {m['tool_call_id']}\n    {m['content']}")
        else:
            put(m["content"], sup=sup)
        put("<|im_end|>", True, sup)
    put("<|im_assistant|>", True), put("assistant"), put("<|im_middle|>", True)
    return pieces


def _render_mistakes(messages: list[dict]) -> dict[str, str]:
    """Each known mistake's rendered text."""
    variants = {RENDER_FROM_1: dict(id_from=1), RENDER_PER_MESSAGE: dict(per_message=True),
                RENDER_PER_NAME: dict(per_name=True),
                RENDER_ASCII: dict(ascii_json=True), RENDER_STR_AGAIN: dict(str_again=True),
                RENDER_NO_END: dict(section_end=False)}
    return mistake_outputs(variants,
                           lambda **kw: "".join(t for t, _, _ in chat_truth(messages, **kw)))


def _show_text(got, want: str) -> str:
    """Where two rendered texts first differ."""
    if not isinstance(got, str):
        return f"expected a str, got {type(got).__name__}"
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"the text differs from character {i} on: got {got[max(0, i - 40):i + 60]!r}, expected "
            f"{want[max(0, i - 40):i + 60]!r}")


def _expect_rendered(lab: Lab, messages: list[dict], what: str) -> None:
    got = lab.tokenizer.apply_chat_template(messages)
    want = "".join(t for t, _, _ in chat_truth(messages))
    expect_same(got, want, what, _render_mistakes(messages), _show_text)


_NAMES = ("get_weather", "search", "db.query", "f2", "send_email", "calc.add", "x")
_VALUES = ("Zürich", "東京 weather", "plain", 3, -1.5, True, None, [1, "ü"], {"deep": {"k": "é"}}, "")


def _random_arguments(lab: Lab):
    """A dict of random JSON values (keys in random order, some non-ASCII), or such a dict already
    written as JSON text with its own spacing (kept byte for byte by the template)."""
    keys = ["city", "q", "n", "ok", "ünits", "list"]
    args = {keys.pop(lab.randint(0, len(keys) - 1)): _VALUES[lab.randint(0, len(_VALUES) - 1)]
            for _ in range(lab.randint(0, 3))}
    if lab.randint(0, 2) == 0:
        separators = ((",", ":"), (" , ", " : "))[lab.randint(0, 1)]
        return json.dumps(args, ensure_ascii=False, separators=separators)
    return args


def _random_conversation(lab: Lab, turns: int, ids: bool) -> list[dict]:
    """user, then `turns` times: an assistant with 1-3 tool calls (random content) and one tool
    reply per call; with `ids`, some calls carry their own id."""
    messages: list[dict] = [{"role": "user", "content": "Please help, ö."}]
    n = 0
    for _ in range(turns):
        calls = []
        for _ in range(lab.randint(1, 3)):
            call = {"type": "function",
                    "function": {"name": _NAMES[lab.randint(0, len(_NAMES) - 1)],
                                 "arguments": _random_arguments(lab)}}
            if ids and lab.randint(0, 2) == 0:
                call["id"] = f"call_{lab.randint(0, 99999)}"
            calls.append(call)
        content = (None, "", "Let me look.", "Zwei Schritte:\n")[lab.randint(0, 3)]
        messages.append({"role": "assistant", "content": content, "tool_calls": calls})
        for j, call in enumerate(calls):
            call_id = call.get("id") or f"functions.{call['function']['name']}:{n + j}"
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": f'{{"result": {j}}}'})
        n += len(calls)
    return messages


def check_render_by_hand(lab: Lab) -> None:
    """two calls, a dict with non-ASCII and a JSON string, render to the text worked out by hand"""
    messages = [
        {"role": "user", "content": "Weather in Zürich, and the time?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Zürich", "days": [1, 2]}}},
            {"type": "function", "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}}]},
    ]
    want = ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot "
            "AI.<|im_end|><|im_user|>user<|im_middle|>Weather in Zürich, and the time?<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|>Checking.<|tool_calls_section_begin|>"
            "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
            '{"city": "Zürich", "days": [1, 2]}<|tool_call_end|>'
            '<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{"tz":"CET"}'
            '<|tool_call_end|>'
            "<|tool_calls_section_end|><|im_end|><|im_assistant|>assistant<|im_middle|>")
    got = lab.tokenizer.apply_chat_template(messages)
    expect_same(got, want, "apply_chat_template of get_weather({'city': 'Zürich', ...}) and "
                "get_time('{\"tz\":\"CET\"}')", _render_mistakes(messages), _show_text)


def check_render_ids_across_turns(lab: Lab) -> None:
    """ids made up for calls without one count every call of the conversation, across assistant
    turns"""
    messages = _random_conversation(lab, turns=lab.randint(2, 4), ids=False)
    n = sum(len(m.get("tool_calls") or ()) for m in messages)
    _expect_rendered(lab, messages,
                     f"a conversation of {n} calls in {len(messages)} messages, no ids given")


def check_render_random(lab: Lab) -> None:
    """random names, arguments (dicts and JSON strings), given ids and contents match the
    template"""
    for _ in range(3):
        messages = _random_conversation(lab, turns=lab.randint(1, 3), ids=True)
        _expect_rendered(lab, messages, f"a random conversation of {len(messages)} messages")


def check_render_bad_arguments(lab: Lab) -> None:
    """arguments that are not a JSON object (Python's quotes, a list, a number) are a ValueError"""
    for bad in ("{'city': 'Paris'}", "[1, 2]", 5):
        call = {"type": "function", "function": {"name": "get_weather", "arguments": bad}}
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                                       "tool_calls": [call]}]
        try:
            lab.tokenizer.apply_chat_template(messages)
        except ValueError:
            continue
        raise CheckFailed(f"arguments {bad!r} were rendered without an error: raise ValueError "
                          "saying what is wrong (the template takes a JSON object, as a string or "
                          "a dict)")


def check_render_tokens(lab: Lab) -> None:
    """encode_chat: the section's markers are special ids, and the loss mask is 1 on the whole
    section"""
    # the repository's 4,096-rank file
    tok = lab.tokenizer.Tokenizer.load(ROOT / "demo" / "tiktoken.model")
    messages = _random_conversation(lab, turns=lab.randint(1, 2), ids=True)

    def encoded(pieces: list[tuple[str, bool, bool]]) -> tuple[list[int], list[int]]:
        ids, mask = [], []
        for text, special, sup in pieces:
            piece = [tok.special_tokens[text]] if special else tok.encode(text)
            ids += piece
            mask += [int(sup)] * len(piece)
        return ids, mask

    def show(got, want) -> str:
        if not (isinstance(got, tuple) and len(got) == 2):
            return f"expected (ids, mask), got {type(got).__name__}"
        if got[0] != want[0]:
            i = next((k for k, (a, b) in enumerate(zip(got[0], want[0])) if a != b), len(want[0]))
            return (f"ids differ from position {i} on: got {got[0][i:i + 8]}, expected "
                    f"{want[0][i:i + 8]}")
        i = next(k for k, (a, b) in enumerate(zip(got[1], want[1])) if a != b)
        return (f"the loss mask at position {i} (id {want[0][i]}) is {got[1][i]}, expected "
                f"{want[1][i]}")

    got = tok.encode_chat(messages)
    got = tuple(got) if isinstance(got, (tuple, list)) else got
    want = encoded(chat_truth(messages))
    right = "".join(t for t, _, _ in chat_truth(messages))
    # a mistake in the text itself?
    if isinstance(got, tuple) and len(got) == 2 and got[0] != want[0]:
        text = tok.decode(got[0])
        for description, wrong in _render_mistakes(messages).items():
            if text == wrong != right:
                raise CheckFailed("encode_chat: wrong, and it matches a known mistake: "
                                  f"{description}")
    expect_same(got, want, f"encode_chat of {len(messages)} messages with tool calls",
                {RENDER_AS_TEXT: encoded(chat_truth(messages, markers_special=False)),
                 RENDER_UNSUPERVISED: encoded(chat_truth(messages, section_supervised=False))},
                show)


register(Exercise(
    name="render_tool_call", file="tokenizer.py", concept="tool calls in the chat template",
    level="intro", minutes=25,
    against="the 0905 template written again; by hand",
    statement="""\
Render an assistant message that has tool_calls, as Kimi-K2-Instruct-0905's chat_template.jinja
does (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md): its content when non-empty (a string), then
  <|tool_calls_section_begin|>
  per call: <|tool_call_begin|>ID<|tool_call_argument_begin|>ARGS<|tool_call_end|>
  <|tool_calls_section_end|>
ID: the call's "id", or if it has none functions.NAME:IDX, IDX counting every tool call of
the conversation before this one from 0 (n_calls counts those of earlier messages: add this
message's). ARGS: call["function"]["arguments"]; a string (JSON object text) as it is, byte
for byte; a dict as the template's tojson, json.dumps(x, ensure_ascii=False): keys in their
order, non-ASCII kept. Raise ValueError for arguments that are neither a JSON object string
nor a dict.
In scope: m (the message dict), at (its place, for messages), sup (True: supervised), n_calls;
add(text, is_special=False, supervised=False) appends a segment (the markers are special, all
is supervised=sup); SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_ARG_BEGIN, CALL_END;
tool_call_id(name, index); _tojson(x, at); json.""",
    hints=("Walk through check_render_by_hand's expected text: every marker is one special token, "
           "the id and the arguments are plain text between them.",
           "The index is n_calls + j for the j-th call of this message (from 0); afterwards "
           "n_calls += len(m['tool_calls']), so the next assistant message goes on counting.",
           "Section 7 of the module has the pieces: _normalize_tool_calls(m['tool_calls'], at, "
           "n_calls) gives [(id, argument text)] and _tool_call_segments(calls, sup) the section's "
           "segments."),
    checks=(check_render_by_hand, check_render_ids_across_turns, check_render_random,
            check_render_tokens, check_render_bad_arguments),
    mistakes=(
        Mistake(RENDER_FROM_1, ((_RENDER_CALLS,
                                 _RENDER_CALLS.replace("n_calls)", "n_calls + 1)")),)),
        Mistake(RENDER_PER_MESSAGE, (("n_calls += len(calls)", "pass"),)),
        Mistake(RENDER_ASCII, ((_RENDER_CALLS,
                                'calls = [(i, a if isinstance(c["function"]["arguments"], str) '
                                'else json.dumps(c["function"]["arguments"]))\n'
                                f'                     for (i, a), c in zip({_RENDER_CALLS[8:]}, '
                                'm["tool_calls"])]'),)),
        Mistake(RENDER_STR_AGAIN, ((_RENDER_CALLS,
                                    'calls = [(i, _tojson(c["function"]["arguments"]))\n'
                                    '                     for (i, _), c in '
                                    f'zip({_RENDER_CALLS[8:]}, m["tool_calls"])]'),)),
        Mistake(RENDER_NO_END, (("_tool_call_segments(calls, sup)",
                                 "_tool_call_segments(calls, sup)[:-1]"),)),
        Mistake(RENDER_AS_TEXT, (("add(*seg)", "add(seg[0], False, seg[2])"),)),
        Mistake(RENDER_UNSUPERVISED, (("add(*seg)", "add(seg[0], seg[1], False)"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Exercise: parsing tool calls out of the model's text (tokenizer.py parse_tool_calls)

# the line the mistakes edit
_PARSE_CALLS = "result.calls = [_parse_call(part) for part in parts[1:]]"
PARSE_GREEDY = ("two calls swallowed into one: a greedy match ran from the first "
                "<|tool_call_begin|> to the last <|tool_call_end|> (cut the section at every "
                "<|tool_call_begin|>, or match non-greedily)")
PARSE_PAST_END = ("calls after <|tool_calls_section_end|> were read too: only the first section's "
                  "calls count; the text after it is `after`")
PARSE_NAME = ("the name must be NAME alone: not 'functions.NAME', not 'NAME:IDX', and a dotted "
              "name (db.query) kept whole")
PARSE_SKIPPED = ("a broken call was skipped silently: every <|tool_call_begin|> gives a ToolCall, "
                 "a broken one with its error (a regex over the whole section just steps over it)")
PARSE_UNCLOSED = ("a section without <|tool_calls_section_end|> (output cut off) was ignored: "
                  "parse it to the end of the text and add SECTION_NOT_CLOSED to errors")
S_BEGIN, S_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
C_BEGIN, C_ARGS, C_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def wire_truth(calls: list[tuple[str, int, str]], between: str = "") -> str:
    """A tool-call section as K2 writes it (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md), from
    (name, index, argument text) triples; `between` goes between the calls (whitespace, which a
    parser must allow)."""
    return (S_BEGIN + between.join(f"{C_BEGIN}functions.{name}:{index}{C_ARGS}{args}{C_END}"
                                   for name, index, args in calls) + S_END)


def _parsed(name: str, index: int, args) -> dict:
    """The expected fields of a well-formed call."""
    return dict(id=f"functions.{name}:{index}", name=name, index=index, arguments=args,
                raw_arguments=json.dumps(args, ensure_ascii=False), ok=True)


def _parse_summary(lab: Lab, result) -> dict:
    """A ToolCallParse as plain data: the fields a check compares."""
    keys = ("content", "calls", "errors", "has_section", "closed", "after")
    if not all(hasattr(result, k) for k in keys):
        raise CheckFailed(f"parse_tool_calls returned {type(result).__name__}: expected a "
                          f"ToolCallParse (content, calls, errors, has_section, closed, after)")
    calls = [dict(id=c.id, name=c.name, index=c.index, arguments=c.arguments,
                  raw_arguments=c.raw_arguments, ok=c.error is None) for c in result.calls]
    return dict(content=result.content, has_section=result.has_section, closed=result.closed,
                after=result.after, n_errors=len(result.errors),
                not_closed=lab.tokenizer.SECTION_NOT_CLOSED in result.errors, calls=calls)


def _parse_mistake(got: dict, want: dict) -> str | None:
    """The known mistake that explains `got`, if one does."""
    g, w = got["calls"], want["calls"]
    gi, wi = [c["id"] for c in g], [c.get("id") for c in w]
    rest = iter(wi)
    # some calls are missing, the others in order
    if len(g) < len(w) and all(i in rest for i in gi):
        if all(c.get("ok") is False for c in w if c.get("id") not in gi):
            return PARSE_SKIPPED
        if len(g) == 1 and gi[0] == wi[0]:
            return PARSE_GREEDY
    if len(g) > len(w) and gi[:len(w)] == wi:
        return PARSE_PAST_END
    if want["not_closed"] and w and not g:
        return PARSE_UNCLOSED
    if len(g) == len(w):
        wrong = [(gc["name"], c["name"], c["index"]) for gc, c in zip(g, w) if "index" in c
                 and gc["name"] != c["name"]]
        # 'functions.NAME', 'NAME:IDX', or the guide's id.split('.')[1], which cuts a dotted name
        if wrong and all(got_name in (f"functions.{name}", f"{name}:{index}",
                                      f"functions.{name}:{index}",
                                      name.split(".")[0]) for got_name, name, index in wrong):
            return PARSE_NAME
    return None


def _expect_parse(lab: Lab, text: str, want: dict, what: str) -> None:
    got = _parse_summary(lab, lab.tokenizer.parse_tool_calls(text))
    # a call's expected dict lists only the fields that are fixed (a broken call has no index, ...)
    seen = dict(got, calls=[{k: gc[k] for k in c} for gc, c in zip(got["calls"], want["calls"])])
    if len(got["calls"]) == len(want["calls"]) and seen == want:
        return
    what = f"{what}, text {text[:400]!r}{'...' if len(text) > 400 else ''}"
    mistake = _parse_mistake(got, want)
    if mistake:
        raise CheckFailed(f"{what}: wrong, and it matches a known mistake: {mistake}")
    diffs = [f"{k} is {seen[k]!r:.120}, expected {want[k]!r:.120}" for k in want
             if k != "calls" and seen[k] != want[k]]
    diffs += [f"call {i} {k} is {gc[k]!r:.120}, expected {c[k]!r:.120}"
              for i, (gc, c) in enumerate(zip(seen["calls"], want["calls"]))
              for k in c if gc[k] != c[k]]
    if len(got["calls"]) != len(want["calls"]):
        ids = [c.get("id") for c in want["calls"]]
        which = ids if None not in ids else "(one per <|tool_call_begin|> in the section)"
        diffs.insert(0,
                     f"{len(got['calls'])} calls {[c['id'] for c in got['calls']]}, expected "
                     f"{len(ids)} "
                        f"{which}")
    where = diffs[0]
    raise CheckFailed(f"{what}: {where}; it matches none of the known mistakes")


def _well_formed(content: str, calls: list[dict], after: str = "", n_errors: int = 0) -> dict:
    return dict(content=content, has_section=True, closed=True, after=after, n_errors=n_errors,
                not_closed=False, calls=calls)


def check_parse_round_trip(lab: Lab) -> None:
    """calls written in K2's wire format (random names, indices, JSON arguments) are read back
    exactly"""
    contents = ("", "Let me check.", "Zwei Aufrufe:\n", "functions.fake:0 is not a call")
    afters = ("", "", "tail text", wire_truth([("late.call", 99, "{}")]),
              C_BEGIN + "functions.stray:7" + C_ARGS + "{}" + C_END)
    for k in range(4):
        index, triples, want_calls = lab.randint(0, 5), [], []
        for _ in range(lab.randint(2 if k == 0 else 1, 4)):
            name = _NAMES[lab.randint(0, len(_NAMES) - 1)]
            args = _random_arguments(lab)
            args = json.loads(args) if isinstance(args, str) else args
            triples.append((name, index, json.dumps(args, ensure_ascii=False)))
            want_calls.append(_parsed(name, index, args))
            index += lab.randint(1, 2)
        content, after = contents[lab.randint(0, 3)], afters[lab.randint(0, 4)]
        text = content + wire_truth(triples, ("", "\n", " \n ")[lab.randint(0, 2)]) + after
        _expect_parse(lab, text, _well_formed(content, want_calls, after),
                      f"{len(triples)} call(s)")


def check_parse_malformed(lab: Lab) -> None:
    """broken calls are reported one by one, never raise, never swallow their neighbours (cases by
    hand)"""
    ok_a, ok_g = _parsed("a", 0, {"x": 1}), _parsed("g", 1, {"q": 2})
    cut = (f'Sure.{S_BEGIN}{C_BEGIN}functions.a:0{C_ARGS}{{"x": 1}}{C_END}'
           f'{C_BEGIN}functions.b:1{C_ARGS}{{"y": ')
    cases = [
        # cut off inside the second call's arguments: the first call stands, the second is an error
        ("a section cut off", cut,
         dict(content="Sure.", has_section=True, closed=False, after="", n_errors=1,
              not_closed=True,
              calls=[ok_a, dict(id="functions.b:1", name="b", ok=False, arguments=None)])),
        # Python's quotes are not JSON: that call is an error, the next one is fine
        ("a call with bad JSON",
         f"{S_BEGIN}{C_BEGIN}functions.f:0{C_ARGS}{{'q': 1}}{C_END}"
         f"{C_BEGIN}functions.g:1{C_ARGS}{{\"q\": 2}}{C_END}{S_END}",
         _well_formed("", [dict(id="functions.f:0", name="f", ok=False, arguments=None), ok_g])),
        # the first call has no <|tool_call_end|>: it is an error, the dotted second one is whole
        ("a call without its end marker",
         f'{S_BEGIN}{C_BEGIN}functions.a:0{C_ARGS}{{"x": 1}}'
         f'{C_BEGIN}functions.db.query:1{C_ARGS}{{}}{C_END}'
         f"{S_END}",
         _well_formed("", [dict(id="functions.a:0", name="a", ok=False, arguments=None),
                           _parsed("db.query", 1, {})])),
        # arguments must be a JSON object
        ("arguments that are a JSON list",
         f"{S_BEGIN}{C_BEGIN}functions.a:0{C_ARGS}[1, 2]{C_END}{S_END}",
         _well_formed("", [dict(id="functions.a:0", name="a", ok=False, arguments=None)])),
        # no section at all: everything is content, even text that looks like a call
        ("no section", f"Nothing to call. {C_BEGIN}functions.x:0{C_ARGS}{{}}{C_END}",
         dict(content=f"Nothing to call. {C_BEGIN}functions.x:0{C_ARGS}{{}}{C_END}",
              has_section=False, closed=False, after="", n_errors=0, not_closed=False, calls=[])),
        # text inside the section before the first call is reported; the call still counts
        ("stray text in the section",
         f"{S_BEGIN}oops{C_BEGIN}functions.a:0{C_ARGS}{{\"x\": 1}}{C_END}{S_END}",
         _well_formed("", [ok_a], n_errors=1)),
        # only the first section: the second is text after it
        ("two sections", f"A{S_BEGIN}{C_BEGIN}functions.a:0{C_ARGS}{{\"x\": 1}}{C_END}{S_END}B"
         + wire_truth([("g", 1, '{"q": 2}')]),
         _well_formed("A", [ok_a], after="B" + wire_truth([("g", 1, '{"q": 2}')]))),
    ]
    for what, text, want in cases:
        _expect_parse(lab, text, want, what)


def check_parse_marker_soup(lab: Lab) -> None:
    """random soups of markers and text: never raises, and the section and call count follow the
    rules"""
    pieces = (S_BEGIN, S_END, C_BEGIN, C_BEGIN, C_ARGS, C_END, "functions.a:0", "functions.db.q:12",
              "{", "}", '"x"', ": ", "1", " ", "\n", "ok", "<|", "|>")
    for _ in range(40):
        text = "".join(pieces[lab.randint(0, len(pieces) - 1)] for _ in range(lab.randint(0, 30)))
        # the rules, applied with str.find: content up to the first section begin, the section up to
        # the first end after it (or the text's end), one call per <|tool_call_begin|> inside
        begin = text.find(S_BEGIN)
        if begin < 0:
            want = dict(content=text, has_section=False, closed=False, after="", n_errors=0,
                        not_closed=False, calls=[])
        else:
            end = text.find(S_END, begin + len(S_BEGIN))
            body = text[begin + len(S_BEGIN):end if end >= 0 else len(text)]
            want = dict(content=text[:begin], has_section=True, closed=end >= 0,
                        after=text[end + len(S_END):] if end >= 0 else "",
                        n_errors=(end < 0) + bool(body.split(C_BEGIN)[0].strip()),
                        not_closed=end < 0, calls=[{} for _ in range(body.count(C_BEGIN))])
        _expect_parse(lab, text, want, "random text")


def check_parse_long_whitespace(lab: Lab) -> None:
    """a call cut off inside thousands of blank tokens is parsed right, in time linear in the
    text"""
    def cut_off(n: int) -> str:
        return (f"{S_BEGIN}{C_BEGIN}functions.a:0{C_ARGS}{{\"x\": 1}}{C_END}"
                f"{C_BEGIN}functions.b:1{C_ARGS}"
                + " " * n)

    def seconds(text: str) -> float:
        t0 = time.perf_counter()
        lab.tokenizer.parse_tool_calls(text)
        return time.perf_counter() - t0

    # linear: 10x the text, ~10x the time;
    # a backtracking regex (\s*(.*?)\s*) is cubic in the spaces.
    # Small sizes first, so that a cubic parser fails here in seconds instead of running into
    # the timeout.
    n = 100 + lab.randint(0, 25)
    small = min(seconds(cut_off(n)) for _ in range(3))
    limit = 40 * max(small, 1e-3)
    big = seconds(cut_off(10 * n))
    for _ in range(2):   # a slow run may be the machine: it has to be slow three times
        if big <= limit:
            break
        big = min(big, seconds(cut_off(10 * n)))
    if big > limit:
        raise CheckFailed(f"parsing {10 * n:,} spaces took {big / small:.0f}x as long as {n:,} "
                          f"({big:.2f} s): "
                          "something backtracks over the whitespace (a regex like \\s*(.*?)\\s* "
                          f"over the section); cut the text at the markers with find/split instead")
    n = 20_000 + lab.randint(0, 5000)
    _expect_parse(lab, cut_off(n), dict(content="", has_section=True, closed=False, after="",
                                        n_errors=1, not_closed=True,
                                        calls=[_parsed("a", 0, {"x": 1}),
                                               dict(id="functions.b:1", name="b", ok=False,
                                                    arguments=None)]),
                  f"a section cut off after {n:,} spaces")


register(Exercise(
    name="parse_tool_calls", file="tokenizer.py", concept="parsing tool calls from model output",
    level="core", minutes=30,
    against="round trips of an independent writer; broken cases by hand",
    statement="""\
Read K2's tool calls back out of generated text (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md; the
wire format: content, then <|tool_calls_section_begin|>, calls <|tool_call_begin|>functions.NAME:IDX
<|tool_call_argument_begin|>{json}<|tool_call_end|>, then <|tool_calls_section_end|>). Never raise.
Return ToolCallParse(content, calls, errors, has_section, closed, after):
  no <|tool_calls_section_begin|> in text: content = text, nothing else;
  else content = the text before the first one; the section runs to the first
  <|tool_calls_section_end|> after it (closed=True, after = the text after that end marker) or, if
  there is none, to the end of the text (closed=False, and SECTION_NOT_CLOSED in errors); only this
  first section is parsed; calls: one ToolCall per <|tool_call_begin|> in the section, in order; one
  broken call (bad JSON, no end marker) is an error of its own and must not swallow the next;
  non-blank text before the first call is an error message in errors.
In scope: text (str); find_section(text) -> (begin, end) positions (-1 if absent);
_parse_call(part) -> a ToolCall for the text after one <|tool_call_begin|> (name, index, arguments
or error; never raises);
SECTION_BEGIN, SECTION_END, CALL_BEGIN, SECTION_NOT_CLOSED, ToolCallParse; re.""",
    hints=("find_section(text) gives both positions at once; the section's body is between the end "
           "of SECTION_BEGIN and the end marker (or the end of the text).",
           "body.split(CALL_BEGIN): element 0 is whatever came before the first call (normally "
           "empty), every other element is one call for _parse_call.",
           "A regex over the whole section with .* (greedy) joins calls; even .*? must not run "
           "past a broken call's missing end marker into the next call."),
    checks=(check_parse_round_trip, check_parse_malformed, check_parse_marker_soup,
            check_parse_long_whitespace),
    mistakes=(
        Mistake(PARSE_GREEDY, ((_PARSE_CALLS,
                                "result.calls = [_parse_call(p + CALL_END) for p in re.findall(\n"
                                '        r"<\\|tool_call_begin\\|>(.*)<\\|tool_call_end\\|>", '
                                'body, re.DOTALL)]'),)),
        Mistake(PARSE_PAST_END, (("body = text[start + len(SECTION_BEGIN):end]",
                                  "body = text[start + len(SECTION_BEGIN):]"),)),
        Mistake(PARSE_NAME, ((_PARSE_CALLS, _PARSE_CALLS + "\n    for call in result.calls:\n"
                                            '        call.name = call.id.split(":")[0] or '
                                            'call.name'),)),
        Mistake(PARSE_SKIPPED, ((_PARSE_CALLS,
                                 _PARSE_CALLS.replace("]]", "] if CALL_END in part]")),)),
        Mistake(PARSE_UNCLOSED, (("body = text[start + len(SECTION_BEGIN):]\n        "
                                  "result.errors.append(SECTION_NOT_CLOSED)",
                                  "return ToolCallParse(content=text)"),)),
    )))


# ------------------------------------------------------------------------------------------------
# Plumbing: markers and regions

MARKER = re.compile(r"^(?P<indent>[ \t]*)# (?P<end>end )?exercise: (?P<name>\S+)[ \t]*$")


class ExerciseError(Exception):
    """A problem the user can fix (unknown name, no workspace, broken markers): printed, no
    traceback."""


def get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise ExerciseError(f"unknown exercise {name!r}; the exercises are: {', '.join(EXERCISES)} "
                            f"(`python exercises.py list` describes them)")
    return EXERCISES[name]


def find_region(lines: list[str], name: str, where: str) -> tuple[int, int, str]:
    """(first, end, indent): lines[first:end] is the region between the markers of `name`
    (0-based)."""
    starts = [i for i, s in enumerate(lines)
              if (m := MARKER.match(s)) and m["name"] == name and not m["end"]]
    ends = [i for i, s in enumerate(lines)
            if (m := MARKER.match(s)) and m["name"] == name and m["end"]]
    if len(starts) != 1 or len(ends) != 1:
        raise ExerciseError(f"{where} must hold exactly one '# exercise: {name}' and one "
                            f"'# end exercise: {name}' line; found {len(starts)} and {len(ends)}")
    s, e = starts[0], ends[0]
    indent = MARKER.match(lines[s])["indent"]
    if not s < e - 1 or MARKER.match(lines[e])["indent"] != indent:
        raise ExerciseError(f"{where}: the markers of {name} (lines {s + 1} and {e + 1}) must "
                            f"enclose at least one line and share one indentation")
    return s + 1, e, indent


def reference_region(ex: Exercise, root: Path = ROOT) -> list[str]:
    lines = (root / ex.file).read_text().splitlines(keepends=True)
    first, end, _ = find_region(lines, ex.name, ex.file)
    return lines[first:end]


def marker_problems(root: Path = ROOT) -> list[str]:
    """Every way the repository's markers disagree with the registry (an empty list when all is
    well)."""
    problems = []
    for ex in EXERCISES.values():
        if not (root / ex.file).is_file():
            problems.append(f"{ex.name}: its file {ex.file} does not exist")
            continue
        try:
            reference_region(ex, root)
        except ExerciseError as e:
            problems.append(str(e))
    for path in sorted(root.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = MARKER.match(line)
            if m and (m["name"] not in EXERCISES or EXERCISES[m["name"]].file != path.name):
                problems.append(f"{path.name}:{i}: marker for {m['name']!r}, which is not an "
                                f"exercise registered for {path.name}")
    return problems


# ------------------------------------------------------------------------------------------------
# Plumbing: the workspace


def lab_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get(LAB_ENV) or ROOT / "lab").resolve()


def project_modules(root: Path = ROOT) -> list[str]:
    """The top-level modules a workspace holds copies of (everything but this file and setup.py)."""
    return sorted(p.stem for p in root.glob("*.py")
                  if p.name not in (Path(__file__).name, "setup.py"))


def _state(lab: Path) -> dict:
    f = lab / ".exercises.json"
    return json.loads(f.read_text()) if f.is_file() else {"started": [], "hints": {}}


def _save_state(lab: Path, state: dict) -> None:
    (lab / ".exercises.json").write_text(json.dumps(state, indent=1))


def _show(path: Path) -> str:
    """A path as the student would type it: relative to the current directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def stub(ex: Exercise, indent: str) -> list[str]:
    """The lines that replace the region in the workspace: the task as comments, then
    NotImplementedError."""
    lines = [f"# Exercise {ex.name} ({ex.minutes} min): {ex.concept}. Replace these lines with "
             "your code.\n"]
    lines += [f"# {s}".rstrip() + "\n" for s in ex.statement.splitlines()]
    lines += [f"raise NotImplementedError(\"exercise {ex.name} is not written yet: see the "
              "comments \"\n",
              f"                          \"above; `python exercises.py hint {ex.name}` gives a "
              "hint\")\n"]
    return [indent + s for s in lines]


def start(ex: Exercise, lab: Path, force: bool = False) -> str:
    """Create or extend the workspace and put the stub of `ex` in lab/FILE; returns a note for the
    student."""
    lab.mkdir(parents=True, exist_ok=True)
    for m in project_modules():
        if not (lab / f"{m}.py").exists():
            shutil.copy2(ROOT / f"{m}.py", lab / f"{m}.py")
    target = lab / ex.file
    lines = target.read_text().splitlines(keepends=True)
    try:
        first, end, indent = find_region(lines, ex.name, _show(target))
    except ExerciseError:
        if not force:
            raise ExerciseError(f"{_show(target)} no longer has the markers of {ex.name}; restore "
                                f"them, or run `python exercises.py start {ex.name} --force` to "
                                f"copy the file afresh (your changes to it are lost)") from None
        shutil.copy2(ROOT / ex.file, target)
        lines = target.read_text().splitlines(keepends=True)
        first, end, indent = find_region(lines, ex.name, ex.file)
    body, blank = lines[first:end], stub(ex, indent)
    state = _state(lab)
    if body == blank:
        note = f"{ex.name} was already started; {_show(target)} is unchanged."
    elif body == reference_region(ex) or force:
        target.write_text("".join(lines[:first] + blank + lines[end:]))
        note = f"Started {ex.name}: write your code in {_show(target)} at line {first + 1}."
    else:
        raise ExerciseError(f"{_show(target)} already holds your work on {ex.name} (lines "
                            f"{first + 1}-{end}); `python exercises.py start {ex.name} --force` "
                            f"replaces it by the blank stub")
    if ex.name not in state["started"]:
        state["started"].append(ex.name)
    _save_state(lab, state)
    return note


# ------------------------------------------------------------------------------------------------
# Plumbing: running the checks


@contextlib.contextmanager
def lab_imports(lab: Path) -> Iterator[None]:
    """Within the block `import attention` etc. load lab/'s copies; the previous modules come back
    after."""
    names = project_modules()
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, str(lab))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(lab))
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def check_title(fn: Callable) -> str:
    return fn.__name__.removeprefix("check_")


def check_about(fn: Callable) -> str:
    """The first paragraph of the check's docstring, on one line."""
    if not fn.__doc__:
        return ""
    return " ".join(s.strip() for s in fn.__doc__.strip().split("\n\n")[0].splitlines())


def _student_error(e: BaseException, lab: Path) -> str:
    """An exception as the student needs it: the deepest frame in the student's workspace, with its
    line."""
    if isinstance(e, SyntaxError) and e.filename and Path(e.filename).resolve().is_relative_to(lab):
        text = (e.text or "").rstrip("\n")
        code = text.lstrip()
        col = max((e.offset or 1) - 1 - (len(text) - len(code)), 0)
        where = f"{_show(Path(e.filename))}:{e.lineno}"
        return f"{type(e).__name__} in {where}: {e.msg}\n    {code}\n    {' ' * col}^"
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if Path(f.filename).resolve().is_relative_to(lab)]
    what = f"{type(e).__name__}: {e}"
    if not frames:
        return f"{what} (raised by the check while it used your result)"
    f = frames[-1]
    # a stub, this one or another's
    if isinstance(e, NotImplementedError) and "is not written yet" in str(e):
        stub_at = f"{_show(Path(f.filename))}:{f.lineno}"
        return f"NotImplementedError: {str(e).split(':')[0]} ({stub_at} is its stub)"
    return (f"{what}\n    at {_show(Path(f.filename))}:{f.lineno} in {f.name}: "
            f"{(f.line or '').strip()}")


def failed_all(ex: Exercise, message: str) -> list[dict]:
    """Every check of `ex` failed with one message (the module does not import, a timeout, a
    crash)."""
    return [dict(name=check_title(c), about=check_about(c), passed=False, score=0.0,
                 message=message, skipped=False) for c in ex.checks]


def run_checks(ex: Exercise, lab: Path, seed: int) -> list[dict]:
    """Run every check of `ex` against the workspace in this process: one dict per check
    (name, passed, score, message, skipped)."""
    lab = lab.resolve()
    results = []
    threads = torch.get_num_threads()
    # one thread: the checks' tensors are tiny, so more threads only add synchronisation; on a
    # machine busy with other work, their spin-waits made an fp64 64x30 Newton-Schulz 1000x slower
    # (0.13 s, not 0.1 ms)
    torch.set_num_threads(1)
    with contextlib.ExitStack() as restore:
        restore.callback(torch.set_num_threads, threads)
        restore.enter_context(lab_imports(lab))
        try:
            importlib.import_module(Path(ex.file).stem)
        # the student's module does not import: every check fails
        except Exception as e:  # noqa: BLE001
            return failed_all(ex,
                              f"{_show(lab / ex.file)} does not import: {_student_error(e, lab)}")
        for i, check in enumerate(ex.checks):
            r = dict(name=check_title(check), about=check_about(check), passed=False, score=0.0,
                     message="", skipped=False)
            try:
                check(Lab(lab, seed + i))
                r.update(passed=True, score=1.0)
            except CheckSkipped as e:
                r.update(skipped=True, message=f"skipped: {e}")
            except CheckFailed as e:
                r["message"] = str(e)
            # the student's exception, reported at the student's line
            except Exception as e:  # noqa: BLE001
                r["message"] = _student_error(e, lab)
            results.append(r)
    return results


def summary(ex: Exercise, results: list[dict], seed: int | None = None,
            seconds: float | None = None) -> dict:
    counted = [r for r in results if not r.get("skipped")]
    passed = sum(r["passed"] for r in counted)
    return dict(exercise=ex.name, file=ex.file, passed=passed, total=len(counted),
                score=round(passed / len(counted), 4) if counted else 0.0, seed=seed,
                seconds=None if seconds is None else round(seconds, 2), checks=results)


def check(ex: Exercise, lab: Path, timeout: float = DEFAULT_TIMEOUT,
          seed: int | None = None) -> dict:
    """Grade one exercise in a fresh process: summary(...) of its checks."""
    return check_all([ex], lab, timeout, seed)[0]


def check_all(exs: list[Exercise], lab: Path, timeout: float = DEFAULT_TIMEOUT,
              seed: int | None = None) -> list[dict]:
    """Grade exercises in a fresh process, where the modules load from the workspace. One process
    for all of them (importing torch takes longer than most checks), each exercise stopped after
    `timeout` seconds; after a timeout or a crash, a new process takes the exercises that are left.
    The timeout counts from the moment the process has imported torch (seconds on a busy machine),
    so it measures only the checks."""
    for ex in exs:
        if ex.name not in _state(lab)["started"] or not (lab / ex.file).is_file():
            raise ExerciseError(f"{ex.name} is not started in {_show(lab)}: run `python "
                                f"exercises.py start {ex.name}` first")
    seed = int.from_bytes(os.urandom(3), "little") if seed is None else seed
    results: dict[str, dict] = {}
    todo = list(exs)
    # a file edited in the same second must reload
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        while todo:
            log = Path(tmp) / "log.txt"
            cmd = [sys.executable, str(Path(__file__).resolve()), "_run", *(ex.name for ex in todo),
                   "--lab", str(lab), "--out", tmp, "--seed", str(seed)]
            ready = Path(tmp) / "ready"
            ready.unlink(missing_ok=True)
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
            # the first exercise's time includes starting Python and torch
            t0 = time.perf_counter()
            while not ready.is_file() and proc.poll() is None:
                time.sleep(0.02)
            t_ready = time.perf_counter()
            while todo:
                ex, done = todo[0], Path(tmp) / f"{todo[0].name}.json"
                if done.is_file():
                    res = json.loads(done.read_text())
                    results[ex.name] = summary(ex, res, seed, time.perf_counter() - t0)
                    todo.pop(0)
                    t0 = t_ready = time.perf_counter()
                elif proc.poll() is not None:
                    msg = (f"the check process died (exit code {proc.returncode}) before "
                           f"reporting:\n{log.read_text()[-2000:]}")
                    results[ex.name] = summary(ex, failed_all(ex, msg), seed,
                                               time.perf_counter() - t0)
                    todo.pop(0)
                    break
                elif time.perf_counter() - t_ready > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    msg = (f"stopped after {timeout:g} s: the checks of {ex.name} normally take a "
                           "few seconds, so your code probably loops forever (look at the loops "
                           f"in your region of {_show(lab / ex.file)}); `--timeout S` gives it "
                           "longer")
                    results[ex.name] = summary(ex, failed_all(ex, msg), seed,
                                               time.perf_counter() - t0)
                    todo.pop(0)
                    break
                else:
                    time.sleep(0.02)
            proc.wait()
    return [results[ex.name] for ex in exs]


def _print_result(res: dict) -> None:
    print(f"check {res['exercise']} ({res['file']}, seed {res['seed']}, {res['seconds']} s)")
    for r in res["checks"]:
        tag = "SKIP" if r.get("skipped") else "PASS" if r["passed"] else "FAIL"
        print(f"  {tag}  {r['name']}: {r.get('about', '')}")
        if r["message"] and not r["passed"]:
            print(textwrap.indent(r["message"], "        "))
    done = res["passed"] == res["total"]
    print(f"score {res['passed']}/{res['total']}" + ("  -- all checks pass" if done else ""))


def changed_outside_regions(lab: Path) -> list[str]:
    """The workspace's modules that differ from the repository's outside the exercise regions: the
    checks run the whole workspace, so a teacher should know when a student changed more than the
    regions."""
    def outside(text: str) -> list[str]:
        keep, inside = [], False
        for line in text.splitlines():
            m = MARKER.match(line)
            inside = bool(m and not m["end"]) or (inside and not m)
            keep += [] if inside else [line]
        return keep

    return [f"{m}.py" for m in project_modules() if (lab / f"{m}.py").is_file()
            and outside((lab / f"{m}.py").read_text()) != outside((ROOT / f"{m}.py").read_text())]


def grade(lab: Path, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Check every started exercise: {"lab", "date", "passed", "total", "exercises": [one per
    exercise]}."""
    started = [n for n in _state(lab)["started"] if n in EXERCISES]
    if not started:
        raise ExerciseError(f"no exercise is started in {_show(lab)}: run `python exercises.py "
                            f"start NAME` first")
    res = check_all([EXERCISES[n] for n in started], lab, timeout)
    return dict(lab=str(lab),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                passed=sum(r["passed"] for r in res), total=sum(r["total"] for r in res),
                changed_outside_regions=changed_outside_regions(lab), exercises=res)


def bench(timeout: float = 60.0) -> tuple[list[list[str]], float]:
    """Time the checks against a workspace holding the reference code: per exercise, `check` alone
    (its own process: what a student waits for) and its share of one `grade`; and that `grade`'s
    total seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        lab = Path(tmp) / "lab"
        lab.mkdir()
        for m in project_modules():
            shutil.copy2(ROOT / f"{m}.py", lab / f"{m}.py")
        _save_state(lab, {"started": list(EXERCISES), "hints": {}})
        alone = [check(ex, lab, timeout) for ex in EXERCISES.values()]
        t0 = time.perf_counter()
        together = grade(lab, timeout)["exercises"]
        total = time.perf_counter() - t0
    rows = [[a["exercise"], f"{a['seconds']:.1f}", f"{g['seconds']:.1f}",
             f"{a['passed']}/{a['total']}"]
            for a, g in zip(alone, together)]
    return rows, total


# ------------------------------------------------------------------------------------------------
# The tour: one token through a tiny model, each step with its shapes and the file:line to put a
# breakpoint on

TOUR_STEPS = {  # module class or attribute name -> what the step does
    "ParallelEmbedding": "embedding: token ids -> vectors (no sqrt(D) scaling)",
    "rope_cos_sin": "RoPE tables: cos/sin of position·inv_freq (YaRN-scaled)",
    "Block": "block: x + MLA(norm(x)), then x + FFN(norm(x))",
    "input_layernorm": "RMSNorm before attention",
    "MLA": "MLA attention (DeepSeek-V2 §2.1)",
    "q_a_proj": "query down-projection W^DQ -> c_q",
    "q_a_layernorm": "RMSNorm of the query latent",
    "q_b_proj": "query up-projection W^UQ, W^QR -> per-head q_nope | q_pe",
    "q_proj": "query projection -> per-head q_nope | q_pe",
    "kv_a_proj_with_mqa": "KV down-projection -> latent c_kv | rope key k_pe",
    "kv_a_layernorm": "RMSNorm of the latent c_kv (what the cache keeps)",
    "apply_rope": "RoPE on interleaved pairs (exercise rope)",
    "kv_b_proj": "latent up-projection W^UK, W^UV -> per-head k_nope | v",
    "attend": "softmax(q·k · scale) v, causal mask",
    "o_proj": "output projection W^O",
    "post_attention_layernorm": "RMSNorm before the FFN",
    "MLP": "SwiGLU MLP: down(silu(gate(x)) * up(x))",
    "MoE": "MoE: router, routed experts, shared expert",
    "Gate": "router: sigmoid, top-k of score + bias, renormalise, x scale",
    "run_experts": "routed experts: K chosen SwiGLU experts per token, weighted",
    "shared_experts": "shared expert (weight 1, every token)",
    "norm": "final RMSNorm",
    "lm_head": "head: vector -> logits over the vocabulary (fp32)",
    "sample": "sampler: temperature, top-k, top-p, draw (exercise top_p)",
}


def _where(fn) -> str:
    """file:line of a function of this project; for torch's own modules (nn.Linear), the line
    calling it."""
    code = inspect.unwrap(fn).__code__
    if Path(code.co_filename).resolve().parent == ROOT:
        return f"{Path(code.co_filename).name}:{code.co_firstlineno}"
    for frame in inspect.stack(0)[1:]:
        if Path(frame.filename).resolve().parent == ROOT and frame.filename != __file__:
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"


def _shapes(v) -> str:
    if isinstance(v, torch.Tensor):
        return str(tuple(v.shape))
    if isinstance(v, (tuple, list)):
        return ", ".join(_shapes(t) for t in v if isinstance(t, torch.Tensor))
    return ""


def tour(prompt_len: int = 5, seed: int = 0) -> list[str]:
    """Run a prompt through config.PRESETS["tiny"] (random weights) and the sampler, recording each
    step."""
    import attention
    import config
    import generate
    import model as model_py
    import moe

    torch.manual_seed(seed)
    args = config.PRESETS["tiny"]()
    net = model_py.Transformer(args).eval()
    events: list[list] = []          # [depth, label, where, input shapes, output shapes, note]
    depth = [0]
    t = prompt_len - 1               # the token we follow: the last one of the prompt

    def note(name: str, out) -> str:
        if name == "Gate":
            w, idx, _ = out
            return (f"token {t} -> experts {idx[t].tolist()}, weights "
                    f"{[round(x, 3) for x in w[t].tolist()]}")
        if name == "lm_head":
            return f"token {t}: highest logits at ids {out[0, t].topk(3).indices.tolist()}"
        if name == "sample":
            return f"next token id {out.tolist()}"
        return ""

    def enter(name: str, where: str, args_) -> list:
        first = next((v for v in args_ if isinstance(v, torch.Tensor)), None)
        ev = [depth[0], TOUR_STEPS[name], where, _shapes(first), "", ""]
        events.append(ev)
        depth[0] += 1
        return ev

    def leave(ev: list, name: str, out) -> None:
        depth[0] -= 1
        ev[4], ev[5] = (_shapes(out if isinstance(out, torch.Tensor) else tuple(out)),
                        note(name, out))

    def wrap(name: str, fn):
        def traced(*a, **k):
            ev = enter(name, _where(fn), a)
            out = fn(*a, **k)
            leave(ev, name, out)
            return out
        return traced

    open_events: dict[int, list] = {}  # id(module) -> its event, between its pre-hook and its hook

    def hook(mod, name: str):
        fwd = type(mod).forward
        mod.register_forward_pre_hook(
            lambda m, a: open_events.update({id(m): enter(name, _where(fwd), a)}))
        mod.register_forward_hook(lambda m, a, out: leave(open_events.pop(id(m)), name, out))

    for qual, mod in net.named_modules():
        attr, cls = qual.rsplit(".", 1)[-1], type(mod).__name__
        name = attr if attr in TOUR_STEPS else cls if cls in TOUR_STEPS else None
        if name:
            hook(mod, name)
    functions = [(attention, "apply_rope"), (attention, "attend"), (moe, "run_experts"),
                 # called by name from their module's globals: wrapped there
                 (model_py, "rope_cos_sin")]
    saved = [(m, a, getattr(m, a)) for m, a in functions]
    try:
        for m, a, fn in saved:
            setattr(m, a, wrap(a, fn))
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, args.vocab_size, (1, prompt_len), generator=gen)
        with torch.no_grad():
            logits = net(ids)
        wrap("sample", generate.sample)(logits[:, -1], temperature=0.6, top_p=0.9, generator=gen)
    finally:
        for m, a, fn in saved:
            setattr(m, a, fn)
    head = (f"A prompt of {prompt_len} token ids through config.PRESETS['tiny'] (random weights: "
            f"{args.num_hidden_layers} layers, layer 0 dense, then MoE with "
            f"{args.n_routed_experts} experts top-{args.num_experts_per_tok}), following token "
            f"{t}, then the sampler. Shapes: B=1 batch, T={prompt_len} tokens, "
            f"D={args.hidden_size}, H={args.num_attention_heads} heads, V={args.vocab_size}. "
            "`where` is the file:line where the step's code starts (for nn.Linear: where it is "
            "called); a breakpoint there stops at it, e.g. `python -m pdb generate.py`, then `b "
            "attention.py:LINE`.")
    rows = []
    for d, label, where, i, o, n in events:
        rows.append(["  " * d + label, where, f"{i} -> {o}"])
        if n:
            rows.append(["  " * (d + 1) + "= " + n, "", ""])
    return textwrap.wrap(head, 110) + [""] + _table(rows, ["step", "where", "shapes"]).splitlines()


# ------------------------------------------------------------------------------------------------
# Command line


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(s.rstrip() for s in lines)


def cmd_list(a) -> None:
    print(_table([[e.name, e.file, e.concept, e.level, e.minutes, e.against]
                  for e in EXERCISES.values()],
                 ["name", "file", "concept", "level", "min", "checked against"]))
    print(f"\n{len(EXERCISES)} exercises, {sum(e.minutes for e in EXERCISES.values())} minutes in "
          f"all. Start one with `python exercises.py start NAME`.")


def cmd_show(a) -> None:
    ex = get(a.name)
    print(f"{ex.name}: {ex.concept} ({ex.file}, {ex.level}, ~{ex.minutes} min)\n\n{ex.statement}")


def cmd_start(a) -> None:
    ex, lab = get(a.name), lab_dir(a.lab)
    print(start(ex, lab, a.force))
    print(f"\n{ex.statement}\n\nWhen done: python exercises.py check {ex.name}    (stuck? python "
          f"exercises.py hint {ex.name})")


def cmd_check(a) -> int:
    ex, lab = get(a.name), lab_dir(a.lab)
    res = check(ex, lab, a.timeout, a.seed)
    _print_result(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0 if res["passed"] == res["total"] else 1


def cmd_hint(a) -> None:
    ex, lab = get(a.name), lab_dir(a.lab)
    state = _state(lab) if lab.is_dir() else {"started": [], "hints": {}}
    n = state["hints"].get(ex.name, 0)
    if n < len(ex.hints):
        print(f"Hint {n + 1}/{len(ex.hints)} for {ex.name}: {ex.hints[n]}")
        state["hints"][ex.name] = n + 1
        if lab.is_dir():
            _save_state(lab, state)
    else:
        print(f"No more hints for {ex.name} (all {len(ex.hints)} given):\n" +
              "\n".join(f"  {i + 1}. {h}" for i, h in enumerate(ex.hints)) +
              f"\n`python exercises.py solution {ex.name}` shows the reference.")


def cmd_solution(a) -> None:
    ex = get(a.name)
    print(f"# the reference between '# exercise: {ex.name}' and '# end exercise: {ex.name}' in "
          f"{ex.file}:",
          file=sys.stderr)
    sys.stdout.write("".join(reference_region(ex)))


def cmd_grade(a) -> int:
    lab = lab_dir(a.lab)
    res = grade(lab, a.timeout)
    print(_table([[r["exercise"], f"{r['passed']}/{r['total']}", r["score"], r["seconds"],
                   next((c["name"] for c in r["checks"]
                         if not c["passed"] and not c.get("skipped")), "")]
                  for r in res["exercises"]],
                 ["exercise", "passed", "score", "seconds", "first failing check"]))
    out = Path(a.json) if a.json else lab / "grade.json"
    out.write_text(json.dumps(res, indent=1))
    if res["changed_outside_regions"]:
        print("\nnote: changed outside the exercise regions: "
              f"{', '.join(res['changed_outside_regions'])}")
    print(f"\n{res['passed']}/{res['total']} checks pass; JSON in {_show(out)}")
    return 0 if res["passed"] == res["total"] else 1


def cmd_bench(a) -> None:
    rows, total = bench()
    print(_table(rows, ["exercise", "check alone (s)", "in grade (s)", "passed"]))
    print(f"\n`grade` of all {len(rows)} exercises: {total:.1f} s, one process (the first exercise "
          f"pays for starting Python and torch). {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} (other work on them), torch {torch.__version__}")


def cmd_tour(a) -> None:
    print("\n".join(tour()))


def cmd_run(a) -> None:
    """The child process of `check`: run each exercise's checks, write its results to
    OUT/NAME.json."""
    sys.dont_write_bytecode = True
    torch.zeros(0)  # import torch now, then tell the parent that the timeout may start
    (Path(a.out) / "ready").touch()
    for name in a.names:
        results = run_checks(get(name), Path(a.lab), a.seed)
        tmp = Path(a.out) / f"{name}.json.tmp"
        tmp.write_text(json.dumps(results))
        tmp.rename(tmp.with_suffix(""))  # the parent sees the whole file or none of it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd",
                           metavar="{list,show,start,check,hint,solution,grade,tour,bench}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--lab",
                        help=f"the workspace folder (default: ${LAB_ENV}, else lab/ by this file)")
    named = argparse.ArgumentParser(add_help=False, parents=[common])
    named.add_argument("name", help="an exercise name (`python exercises.py list`)")
    timed = argparse.ArgumentParser(add_help=False)
    timed.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                       help="seconds before the checks are stopped")
    timed.add_argument("--json", help="also write the result as JSON to this file")
    sub.add_parser("list", help="the exercises (the default)").set_defaults(fn=cmd_list)
    sub.add_parser("show", parents=[named],
                   help="the task of one exercise").set_defaults(fn=cmd_show)
    s = sub.add_parser("start", parents=[named],
                       help="copy the modules into the workspace, blank one region")
    s.add_argument("--force", action="store_true",
                   help="replace your work on this region by the blank stub")
    s.set_defaults(fn=cmd_start)
    s = sub.add_parser("check", parents=[named, timed], help="grade one exercise in the workspace")
    s.add_argument("--seed", type=int, help="reproduce a run (the seed is printed)")
    s.set_defaults(fn=cmd_check)
    sub.add_parser("hint", parents=[named], help="the next hint").set_defaults(fn=cmd_hint)
    sub.add_parser("solution", parents=[named],
                   help="the reference region").set_defaults(fn=cmd_solution)
    s = sub.add_parser("grade", parents=[common, timed], help="check every started exercise")
    s.set_defaults(fn=cmd_grade)
    sub.add_parser("tour",
                   help="one token through a tiny model, step by step").set_defaults(fn=cmd_tour)
    sub.add_parser("bench",
                   help="time every check against the reference").set_defaults(fn=cmd_bench)
    s = sub.add_parser("_run")  # internal: the child process of `check`
    s.add_argument("names", nargs="+")
    s.add_argument("--lab", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, required=True)
    s.set_defaults(fn=cmd_run)
    a = p.parse_args(argv)
    try:
        return (a.fn if a.cmd else cmd_list)(a) or 0
    except ExerciseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
