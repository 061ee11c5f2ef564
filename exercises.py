"""Classroom exercises cut from the real code: a student rewrites one marked region, a check grades it.

For a student:
    python exercises.py                 the exercises: name, file, concept, level, minutes, compared against
    python exercises.py start rope      copies the modules into lab/ and replaces the `rope` region of
                                        lab/attention.py by a stub stating the task (never the repository)
    python exercises.py check rope      grades lab/: PASS/FAIL per check, a score, and a diagnostic that names
                                        the likely mistake ("half-split pairs ...") or the largest error
    python exercises.py hint rope       the next hint (one more per call); `show rope` prints the task again
    python exercises.py solution rope   the reference region, exactly as it stands in the repository
    python exercises.py tour            one token through a tiny model: each step, its shapes, its file:line
For a teacher: `grade --json FILE` grades every started exercise of a workspace (a table, and JSON per check);
`bench` times every exercise's check against the reference. TEACHING.md has a 2-hour lab, a one-week sequence
and how to collect a class's JSON. `--lab DIR` (or K2_LAB in the environment) moves the workspace from ./lab.

Where the exercises live. A region is marked in the real module by two one-line comments at the indentation of
its body, `# exercise: NAME` and `# end exercise: NAME`, so the reference code is the solution and cannot
drift from the exercise. `start` copies the modules and puts the stub between the markers in lab/FILE; `check`
runs the checks in a fresh Python process with lab/ first on sys.path, so `import attention` (and everything
it imports) gets the workspace's copies. A check draws fresh random inputs (the seed is printed; `--seed`
repeats a run) of shapes the statement does not reveal, and a timeout stops a student's infinite loop. A
region must be a block whose replacement by a stub (comments + `raise NotImplementedError`) keeps its module
importable: a function body, or a statement block inside one.

The Exercise API: how to add an exercise (the three sections after the API are complete examples).
1. Put the two markers around the region in the module; nothing else changes there.
2. Write the truth here, independently of the module: an fp64 naive recomputation, transformers' function
   where one applies, or hand-computed values; and the output of each known mistake, computed the same way.
3. Write checks, functions `check_WHAT(lab) -> None`; the first line of the docstring says what is verified.
   `lab.MODULE` is the workspace's module (`lab.attention.apply_rope`); `lab.gen` is a torch.Generator seeded
   afresh for this check, `lab.randint(lo, hi)` and `lab.uniform(lo, hi)` draw from it. A check raises
   `CheckFailed(message)` (`expect_close` does, naming the known mistake whose output matches) or
   `CheckSkipped(reason)`; any other exception is the student's, and is reported at the student's own line.
4. `register(Exercise(...))` with its `Mistake`s: a description (the diagnostic must contain it) and the
   source edits (old -> new) that plant the mistake in the reference region. tests/test_exercises.py then
   proves, for every registered exercise, that the stub fails, the reference passes, each planted mistake (at
   least two) fails with its diagnostic, and that the markers are intact. `python exercises.py bench` times
   the new check.
"""
from __future__ import annotations

import argparse
import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent
LAB_ENV = "K2_LAB"            # environment variable that moves the workspace (as --lab DIR does)
DEFAULT_TIMEOUT = 20.0        # seconds for one `check`; a correct solution takes a few (`exercises.py bench`)
LEVELS = ("intro", "core", "advanced")


# ----------------------------------------------------------------------------------------------------------------
# The Exercise API


class CheckFailed(AssertionError):
    """A check's verdict on the student's code: what is wrong, in words a student can act on."""


class CheckSkipped(Exception):
    """A check that cannot run here (e.g. transformers is not installed); it does not count in the score."""


@dataclass(frozen=True)
class Mistake:
    """A known wrong variant. `edits` plant it in the reference region (each `old` occurs exactly once there);
    the check's diagnostic for it must contain `words` (default: the description itself)."""
    description: str
    edits: tuple[tuple[str, str], ...]
    words: str = ""

    @property
    def expected(self) -> str:
        return self.words or self.description


@dataclass(frozen=True)
class Exercise:
    name: str                    # the marker name and the CLI argument
    file: str                    # the module holding the region, e.g. "attention.py"
    concept: str                 # a few words for the table
    level: str                   # one of LEVELS
    minutes: int                 # expected time for a student who has read the module's docstring
    against: str                 # what the checks compare against (independent truth)
    statement: str               # what to compute: formula and paper reference, shapes, names in scope
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
    """What a check sees: the workspace's modules as attributes (`lab.attention`), a random generator."""

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


def expect_close(got, want: Tensor, what: str, atol: float, rtol: float = 0.0,
                 mistakes: dict[str, Tensor] | None = None) -> None:
    """Raise CheckFailed unless `got` has want's shape and |got - want| <= atol + rtol·|want| everywhere.

    On a mismatch, `got` is compared with each known mistake's output (same tolerance) and the first that
    matches is named; otherwise the message gives the largest error and its index."""
    if not isinstance(got, Tensor):
        raise CheckFailed(f"{what}: expected a tensor, got {type(got).__name__}")
    if _close(got, want, atol, rtol):
        return
    for description, out in (mistakes or {}).items():
        if _close(got, out, atol, rtol):
            raise CheckFailed(f"{what}: wrong, and it matches a known mistake: {description}")
    if got.shape != want.shape:
        raise CheckFailed(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    bad = ~torch.isfinite(g) & torch.isfinite(w)
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise CheckFailed(f"{what}: {int(bad.sum())} of {g.numel()} values are NaN or inf, e.g. at index {i}"
                          f" (expected {w[i].item():.6g})")
    err = (g - w).abs().nan_to_num(nan=math.inf) - rtol * w.abs()
    i = tuple(int(v) for v in (err == err.max()).nonzero()[0])
    tol = f"{atol:g}" + (f" + {rtol:g}·|expected|" if rtol else "")
    raise CheckFailed(f"{what}: max error {(g - w).abs()[i].item():.3g} at index {i} (got {g[i].item():.6g}, "
                      f"expected {w[i].item():.6g}; tolerance {tol}); it matches none of the known mistakes")


def _close(got: Tensor, want: Tensor, atol: float, rtol: float) -> bool:
    if got.shape != want.shape:
        return False
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    fin = torch.isfinite(w)
    if not torch.equal(torch.isfinite(g), fin) or not torch.equal(g[~fin].nan_to_num(), w[~fin].nan_to_num()):
        return False
    return bool(((g[fin] - w[fin]).abs() <= atol + rtol * w[fin].abs()).all())


# ----------------------------------------------------------------------------------------------------------------
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
    """fp64, one pair at a time: y_a = x_a cos θ_i - x_b sin θ_i, y_b = x_a sin θ_i + x_b cos θ_i (RoFormer,
    arXiv 2104.09864 §3.4.2) with (a, b) = (2i, 2i+1) interleaved or (i, i+Dr/2) half-split.
    x (B, T, ..., Dr), theta (T, Dr/2). The optional arguments produce the known mistakes."""
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
    return {ROPE_HALF: rope_truth(x, theta, pairs="half"), ROPE_SIGN: rope_truth(x, theta, sign=-1.0),
            ROPE_SWAP: rope_truth(x, theta, swap=True)}


def check_rope_random(lab: Lab) -> None:
    """matches an fp64 recomputation on random shapes, with and without a head dim"""
    B, T, H, Dr = lab.randint(1, 3), lab.randint(2, 9), lab.randint(1, 5), 2 * lab.randint(3, 12)
    theta = _angles(lab, T, Dr // 2)
    for x in (torch.randn(B, T, H, Dr, generator=lab.gen), torch.randn(B, T, Dr, generator=lab.gen)):
        y = lab.attention.apply_rope(x, theta.cos().float(), theta.sin().float())
        expect_close(y, rope_truth(x, theta), f"apply_rope on x {tuple(x.shape)}", atol=1e-5,
                     mistakes=_rope_mistakes(x, theta))


def check_rope_by_hand(lab: Lab) -> None:
    """x = [1, 0, 0, 1] at angles (π/2, π) gives [0, 1, 0, -1] (worked by hand)"""
    x = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])  # (B=1, T=1, Dr=4)
    theta = torch.tensor([[math.pi / 2, math.pi]], dtype=torch.float64)
    y = lab.attention.apply_rope(x, theta.cos().float(), theta.sin().float())
    # pair (x0, x1) = (1, 0) turned by 90° is (0, 1); pair (x2, x3) = (0, 1) turned by 180° is (0, -1)
    expect_close(y, torch.tensor([[[0.0, 1.0, 0.0, -1.0]]]), "apply_rope([1, 0, 0, 1], θ = (π/2, π))",
                 atol=1e-6, mistakes=_rope_mistakes(x, theta))


def check_rope_dtype_and_strides(lab: Lab) -> None:
    """keeps a bf16 input's dtype and shape, and works on a slice of a wider tensor (as q[..., Dn:])"""
    B, T, H, Dr = lab.randint(1, 2), lab.randint(2, 6), lab.randint(2, 4), 2 * lab.randint(2, 8)
    Dn = lab.randint(1, 9)
    theta = _angles(lab, T, Dr // 2)
    x = torch.randn(B, T, H, Dn + Dr, generator=lab.gen).bfloat16()[..., Dn:]   # a non-contiguous view
    y = lab.attention.apply_rope(x, theta.cos().float(), theta.sin().float())
    if not isinstance(y, Tensor) or y.dtype != torch.bfloat16:
        raise CheckFailed(f"apply_rope on a bf16 input returned {getattr(y, 'dtype', type(y).__name__)}: "
                          f"compute in fp32 if you like, but return x's dtype")
    expect_close(y, rope_truth(x, theta), f"apply_rope on a bf16 slice {tuple(x.shape)}", atol=0.02,
                 rtol=0.01, mistakes=_rope_mistakes(x, theta))


def check_rope_transformers(lab: Lab) -> None:
    """matches transformers' DeepseekV3 apply_rotary_pos_emb_interleave (whose output is de-interleaved)"""
    try:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
    except ImportError:
        raise CheckSkipped("transformers is not installed") from None
    B, T, H, Dr = lab.randint(1, 3), lab.randint(2, 7), lab.randint(1, 4), 2 * lab.randint(2, 8)
    theta = _angles(lab, T, Dr // 2)
    x = torch.randn(B, T, H, Dr, generator=lab.gen, dtype=torch.float64)
    y = lab.attention.apply_rope(x, theta.cos(), theta.sin())
    # HF: (B, H, T, Dr) inputs, cos/sin (B, T, Dr) in rotate_half layout [θ_0..θ_n-1, θ_0..θ_n-1]
    cos, sin = (f(torch.cat([theta, theta], -1))[None] for f in (torch.cos, torch.sin))
    ref, _ = apply_rotary_pos_emb_interleave(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    ref = ref.transpose(1, 2)                       # (B, T, H, Dr) as [re_0..re_n-1, im_0..im_n-1]
    def deinterleave(t):
        return t.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2) if isinstance(t, Tensor) else t

    expect_close(deinterleave(y), ref, "apply_rope vs transformers (both de-interleaved)", atol=1e-5,
                 mistakes={k: deinterleave(v) for k, v in _rope_mistakes(x, theta).items()})


register(Exercise(
    name="rope", file="attention.py", concept="interleaved RoPE", level="intro", minutes=20,
    against="fp64 pair-by-pair; transformers; by hand",
    statement="""\
Rotate every interleaved pair (x_2i, x_2i+1) of the last dim of x by its angle θ_i (RoFormer arXiv 2104.09864
§3.4.2; the pair layout of DeepSeek-V3's released weights, arXiv 2412.19437 §2.1.1, inference/model.py
apply_rotary_emb):  y_2i = x_2i cos θ_i - x_2i+1 sin θ_i,   y_2i+1 = x_2i sin θ_i + x_2i+1 cos θ_i.
In scope: x (B, T, ..., Dr), any dtype, possibly a non-contiguous slice; cos, sin (T, Dr/2) fp32, already
cos θ and sin θ for each position t and pair i (broadcast them over B and any head dims); torch.
Return y with x's shape and dtype (compute in fp32).""",
    hints=("Shape cos and sin to (1, T, 1, ..., 1, Dr/2) so they broadcast against the pairs; "
           "x.unflatten(-1, (-1, 2)) gives (..., Dr/2, 2) with x_2i in [..., 0] and x_2i+1 in [..., 1].",
           "A pair (a, b) rotated by θ is the complex number (a + ib)·e^{iθ}: torch.view_as_complex needs "
           "the pairs in the last dim and a contiguous fp32 tensor.",
           "Interleaved means neighbours: x_0 pairs with x_1, not with x_Dr/2 (that is the half-split layout "
           "of rotate_half, which these weights were not trained with)."),
    checks=(check_rope_random, check_rope_by_hand, check_rope_dtype_and_strides, check_rope_transformers),
    mistakes=(
        Mistake(ROPE_HALF, (("torch.view_as_complex(x32.unflatten(-1, (-1, 2)))",
                             "torch.view_as_complex(x32.unflatten(-1, (2, -1)).mT.contiguous())"),
                            ("torch.view_as_real(y).flatten(-2)", "torch.view_as_real(y).mT.flatten(-2)"))),
        Mistake(ROPE_SIGN, (("torch.complex(cos, sin)", "torch.complex(cos, -sin)"),)),
        Mistake(ROPE_SWAP, (("torch.complex(cos, sin)", "torch.complex(sin, cos)"),)),
    )))


# ----------------------------------------------------------------------------------------------------------------
# Exercise: top-p (nucleus) sampling (generate.py sample)

TOP_P_STRICT = ("the token that crosses top_p is dropped (kept only tokens whose cumulative probability "
                "stays strictly below p): the nucleus is one token too small")
TOP_P_ORDER = "the cut made in sorted order was applied to the logits in vocabulary order (no scatter back)"
TOP_P_UNSORTED = "the cumulative sum was taken in vocabulary order, not from the most likely token down"


def nucleus_truth(logits: Tensor, p: float, rule: str = "right") -> Tensor:
    """The distribution top-p samples from, fp64, one row at a time (Holtzman et al., arXiv 1904.09751 §3.1):
    the smallest set of most likely tokens whose probability reaches p, renormalised. `rule` makes the
    mistakes."""
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
    return {TOP_P_STRICT: nucleus_truth(logits, p, "strict"), TOP_P_ORDER: nucleus_truth(logits, p, "order"),
            TOP_P_UNSORTED: nucleus_truth(logits, p, "unsorted")}


def _sampled_distribution(lab: Lab, logits: Tensor, **kw) -> tuple[Tensor, Tensor]:
    """Call the lab's sample() and capture the probabilities it hands to torch.multinomial: (probs, ids)."""
    seen: list[Tensor] = []
    real = torch.multinomial

    def spy(probs, *a, **k):
        seen.append(probs.detach().clone())
        return real(probs, *a, **k)

    torch.multinomial = spy
    try:
        ids = lab.generate.sample(logits.clone(), generator=lab.gen, **kw)
    finally:
        torch.multinomial = real
    if not seen:
        raise CheckFailed("sample() never called torch.multinomial: keep the sampling line after the region")
    return seen[-1], ids


def _safe_p(lab: Lab, logits: Tensor, lo: float, hi: float) -> float:
    """A random p at least 1e-4 from every cumulative probability, so fp32 rounding cannot move the cut."""
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
    if not (isinstance(ids, Tensor) and ids.shape == (B,) and bool((want.gather(1, ids[:, None]) > 0).all())):
        raise CheckFailed(f"sample() returned {ids!r}: expected {B} token ids, each inside its row's nucleus")


def check_top_p_after_top_k(lab: Lab) -> None:
    """after top-k has masked tokens to -inf, the nucleus is taken among the survivors"""
    B, V = lab.randint(2, 4), lab.randint(30, 90)
    k = lab.randint(4, V // 2)
    logits = torch.randn(B, V, generator=lab.gen) * 3
    kth = logits.topk(k, -1).values[:, -1:]
    masked = logits.double().masked_fill(logits < kth, float("-inf"))
    p = _safe_p(lab, masked, 0.3, 0.9)
    probs, _ = _sampled_distribution(lab, logits, temperature=1.0, top_k=k, top_p=p)
    expect_close(probs, nucleus_truth(masked, p), f"distribution after top_k={k}, top_p={p:.3f}", atol=1e-5,
                 mistakes=_top_p_mistakes(masked, p))


def check_top_p_by_hand(lab: Lab) -> None:
    """probabilities (0.05, 0.5, 0.15, 0.3) with top_p 0.75 keep tokens 1 and 3: (0, 0.625, 0, 0.375)"""
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    # sorted: 0.5 (sum above 0 < 0.75, keep), 0.3 (sum above 0.5 < 0.75, keep), 0.15 (0.8 >= 0.75, drop), 0.05
    probs, _ = _sampled_distribution(lab, logits, temperature=1.0, top_p=0.75)
    expect_close(probs, torch.tensor([[0.0, 0.625, 0.0, 0.375]]), "distribution for probs (0.05, 0.5, 0.15, "
                 "0.3), top_p 0.75", atol=1e-5, mistakes=_top_p_mistakes(logits, 0.75))


def check_top_p_tiny(lab: Lab) -> None:
    """a tiny top_p keeps exactly the most likely token"""
    B, V = lab.randint(2, 4), lab.randint(10, 50)
    logits = torch.randn(B, V, generator=lab.gen)
    probs, ids = _sampled_distribution(lab, logits, temperature=1.0, top_p=1e-9)
    expect_close(probs, nucleus_truth(logits, 1e-9), "distribution for top_p 1e-9", atol=1e-6,
                 mistakes=_top_p_mistakes(logits, 1e-9))
    if not (isinstance(ids, Tensor) and torch.equal(ids, logits.argmax(-1))):
        raise CheckFailed(f"with top_p 1e-9 sample() must return the argmax {logits.argmax(-1).tolist()}, "
                          f"got {ids!r}")


register(Exercise(
    name="top_p", file="generate.py", concept="top-p (nucleus) sampling", level="intro", minutes=20,
    against="fp64 nucleus; by hand",
    statement="""\
Keep the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling, Holtzman et
al., arXiv 1904.09751 §3.1): sort each row's probabilities in descending order; a token stays if the tokens
ranked above it sum to LESS than top_p (so the token that crosses top_p stays, and the most likely token
always stays). Set the logits of every other token to -inf, in vocabulary order: the softmax and
torch.multinomial after the region renormalise and draw.
In scope: logits (B, V) fp32, already divided by the temperature and with top-k's losers at -inf; top_p, a
float in (0, 1); torch. Leave the result in `logits` (B, V).""",
    hints=("logits.sort(dim=-1, descending=True) gives the sorted values and `order`, the vocabulary id at "
           "each rank.",
           "The probability mass ranked above a token is cumsum - probs (an exclusive cumulative sum).",
           "Build the -inf mask in sorted order, then put it back in vocabulary order with "
           "scatter(-1, order, ...)."),
    checks=(check_top_p_random, check_top_p_after_top_k, check_top_p_by_hand, check_top_p_tiny),
    mistakes=(
        Mistake(TOP_P_STRICT, (("drop = probs.cumsum(dim=-1) - probs >= top_p",
                                "drop = probs.cumsum(dim=-1) >= top_p"),)),
        Mistake(TOP_P_ORDER, (("logits.scatter(-1, order, sorted_logits.masked_fill(drop, float(\"-inf\")))",
                               "logits.masked_fill(drop, float(\"-inf\"))"),)),
        Mistake(TOP_P_UNSORTED, (("logits.sort(dim=-1, descending=True)",
                                  "logits, torch.arange(logits.shape[-1]).expand_as(logits)"),)),
    )))


# ----------------------------------------------------------------------------------------------------------------
# Exercise: Newton-Schulz orthogonalisation (muonclip.py zeropower_via_newtonschulz5)

NS_ORDER = "the coefficients in the wrong order (a must multiply X, c the (X Xᵀ)² X term)"
NS_NO_NORM = "G not divided by its Frobenius norm first (singular values above ~1.3 leave p's basin)"
NS_TALL = ("the tall matrix was not transposed: X Xᵀ is then the big A×A Gram matrix (iterate on the wide "
           "side, A <= B, and transpose back)")
NS_ABC = (3.4445, -4.7750, 2.0315)   # KellerJordan/Muon muon.py, written out again as the independent truth


def newton_schulz_truth(G: Tensor, steps: int = 5, abc: tuple[float, float, float] = NS_ABC,
                        normalise: bool = True) -> Tensor:
    """fp64, one matrix at a time: X = G/‖G‖_F, then X <- aX + b(XXᵀ)X + c(XXᵀ)²X (Muon, K. Jordan 2024;
    Moonlight arXiv 2502.16982 §2.1). For a tall matrix this is the same polynomial of the singular values
    as on Gᵀ, so the truth needs no transpose."""
    a, b, c = abc
    out = torch.empty(G.shape, dtype=torch.float64)
    for i, g in enumerate(G.double().reshape(-1, *G.shape[-2:])):
        X = g / (g.norm() + 1e-7) if normalise else g
        for _ in range(steps):
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        out.view(-1, *G.shape[-2:])[i] = X
    return out


def _ns_mistakes(G: Tensor) -> dict[str, Tensor]:
    return {NS_ORDER: newton_schulz_truth(G, abc=NS_ABC[::-1]),
            NS_NO_NORM: newton_schulz_truth(G, normalise=False)}


def _ns_call(lab: Lab, G: Tensor) -> Tensor:
    X = lab.muonclip.zeropower_via_newtonschulz5(G)
    if not isinstance(X, Tensor) or X.shape != G.shape or X.dtype != torch.bfloat16:
        raise CheckFailed(f"zeropower_via_newtonschulz5 on {tuple(G.shape)} returned "
                          f"{getattr(X, 'dtype', type(X).__name__)} {tuple(getattr(X, 'shape', ()))}: "
                          f"expected bf16 with G's shape")
    return X


def _small_norm_stack(lab: Lab, shape: tuple[int, ...]) -> Tensor:
    """Matrices of random Frobenius norm in [0.3, 0.6]: finite without the normalisation, but different."""
    G = torch.randn(shape, generator=lab.gen)
    norm = 0.3 + 0.3 * torch.rand(shape[:-2] + (1, 1), generator=lab.gen)
    return G / G.norm(dim=(-2, -1), keepdim=True) * norm


# bf16 iteration against fp64: tests/test_muonclip.py measures 1.5-3.6% relative error; 0.05 absolute per
# entry of a near-orthogonal matrix (entries ~1/sqrt(A)) passes both common formulations, rejects the mistakes
NS_ATOL = 0.05


def check_ns_wide_and_tall(lab: Lab) -> None:
    """matches fp64 Newton-Schulz for a wide, a tall and a square matrix"""
    n = lab.randint(6, 24)
    for shape in ((n, n + lab.randint(4, 40)), (n + lab.randint(4, 40), n), (n, n)):
        G = _small_norm_stack(lab, shape)
        expect_close(_ns_call(lab, G), newton_schulz_truth(G), f"Newton-Schulz of a {shape[0]}×{shape[1]} "
                     f"matrix", atol=NS_ATOL, mistakes=_ns_mistakes(G))


def check_ns_batched(lab: Lab) -> None:
    """orthogonalises each matrix of an (E, A, B) stack on its own"""
    E, A, B = lab.randint(2, 4), lab.randint(8, 20), lab.randint(8, 20)
    G = _small_norm_stack(lab, (E, A, B)) * torch.tensor([1.0] + [7.0] * (E - 1)).view(E, 1, 1)  # unequal
    expect_close(_ns_call(lab, G), newton_schulz_truth(G), f"Newton-Schulz of an ({E}, {A}, {B}) stack",
                 atol=NS_ATOL, mistakes=_ns_mistakes(G))


def check_ns_large_input(lab: Lab) -> None:
    """a gradient with large entries gives a finite near-orthogonal result (and zeros give zeros)"""
    A, B = lab.randint(20, 40), lab.randint(6, 16)
    G = torch.randn(A, B, generator=lab.gen) * 100
    expect_close(_ns_call(lab, G), newton_schulz_truth(G), f"Newton-Schulz of a {A}×{B} matrix with entries "
                 f"~100", atol=NS_ATOL, mistakes=_ns_mistakes(G))
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
        raise CheckFailed(f"a {A}×{B} matrix took {flops:,} matmul flops, {flops / wide:.1f}x the {wide:,} "
                          f"of iterating on its {B}×{A} transpose: {NS_TALL}")


register(Exercise(
    name="newton_schulz", file="muonclip.py", concept="Muon's Newton-Schulz iteration", level="core",
    minutes=30,
    against="fp64 iteration; flop count",
    statement="""\
Approximate the orthogonal polar factor U Vᵀ of every matrix in G with 5 steps of the quintic Newton-Schulz
iteration (Muon, K. Jordan 2024; Moonlight arXiv 2502.16982 §2.1, Algorithm 1; Kimi K2 arXiv 2507.20534 §2.1):
X = G / (‖G‖_F + NS_EPS), then `steps` times X <- a·X + b·(X Xᵀ) X + c·(X Xᵀ)² X with (a, b, c) =
NS_COEFFICIENTS. Iterate in bf16, on the wide side: if a matrix is tall (A > B) work on its transpose and
transpose back, so that X Xᵀ is the smaller Gram matrix. Each matrix of a stack is its own: norms per matrix.
In scope: G (..., A, B) any float dtype, any leading batch dims; steps (int); NS_COEFFICIENTS, NS_EPS; torch.
Return X, bf16, with G's shape.""",
    hints=("X.norm(dim=(-2, -1), keepdim=True) gives one Frobenius norm per matrix of the stack; X.mT "
           "transposes the last two dims.",
           "torch.matmul/`@` broadcasts over leading dims, so one loop over the steps handles any stack.",
           "The Frobenius norm bounds the spectral norm, so after the division every singular value is at "
           "most 1: the polynomial p(x) = a x + b x³ + c x⁵ then pushes each towards ~1 (it diverges above "
           "~1.3)."),
    checks=(check_ns_wide_and_tall, check_ns_batched, check_ns_large_input, check_ns_wide_side),
    mistakes=(
        Mistake(NS_ORDER, (("a, b, c = NS_COEFFICIENTS", "c, b, a = NS_COEFFICIENTS"),)),
        Mistake(NS_NO_NORM, (("X = X / (X.norm(dim=(-2, -1), keepdim=True) + NS_EPS)", "X = X"),)),
        Mistake(NS_TALL, (("transposed = G.size(-2) > G.size(-1)", "transposed = False"),)),
    )))


# ----------------------------------------------------------------------------------------------------------------
# Exercise: a BPE merge step (tokenizer.py learn_bpe)

BPE_UNWEIGHTED = ("pair counts not weighted by chunk frequency (a chunk that occurs f times contributes each "
                  "of its pairs f times)")
BPE_TIE = ("ties broken the other way: among equally frequent pairs the one whose first occurrence comes "
           "first in the text must win")
BPE_OVERLAP = ("overlapping replacement: 'aaa' with the pair (a, a) must become [aa, a], not [aa, aa] (after "
               "a merge the scan goes on after the pair)")
BPE_RTL = "pairs replaced right to left: 'aaa' with the pair (a, a) must become [aa, a], not [a, aa]"
BPE_TIE_IDS = ("ties broken by comparing the pairs' token ids ({}), not by which occurs first in the text")


def _merge_ltr(word: list, pair: tuple, new) -> list:
    """Left to right, non-overlapping: the textbook replacement (Sennrich et al., arXiv 1508.07909 §3.1)."""
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
    """The mistake: every position where the pair starts is merged, even one that overlaps the previous."""
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


def bpe_truth(chunks: list[tuple[str, int]], n_ranks: int, weighted: bool = True, tie: str = "first",
              merge: Callable = _merge_ltr) -> dict[bytes, int]:
    """Byte-level BPE recomputed from scratch at every step (Sennrich et al., arXiv 1508.07909 §3.1): ranks
    0..255 are the bytes; then count every adjacent pair over all chunks (times the chunk's frequency), merge
    the most frequent (ties: the earliest first occurrence; a dict filled in text order keeps that order)
    into the next rank. A merge that spells an existing token reuses its rank. The options make the
    mistakes."""
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
    """{description: run(**kwargs)} for each known mistake given as keyword arguments of a truth function,
    then for every two of them made together where that differs from each alone (so a student who makes
    two gets both named)."""
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


def expect_same(got, want, what: str, mistakes: dict | None = None, show: Callable | None = None) -> None:
    """Raise CheckFailed unless got == want (exact, for texts, token lists, dicts). On a mismatch every known
    mistake whose output equals `got` is named; otherwise `show(got, want)` (default: both reprs) says
    where."""
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
    by_rank = {r: t for t, r in got.items()} if all(isinstance(r, int) for r in got.values()) else {}
    for t, r in sorted(want.items(), key=lambda tr: tr[1]):
        if by_rank.get(r) != t:
            return f"{len(got)} ranks, expected {len(want)}; rank {r} is {by_rank.get(r)!r}, expected {t!r}"
    extra = sorted(set(by_rank) - set(want.values()))
    return f"{len(got)} ranks, expected {len(want)}; unexpected rank {extra[0]}: {by_rank[extra[0]]!r}"


def _learn(lab: Lab, chunks: list[tuple[str, int]], n_ranks: int):
    return lab.tokenizer.learn_bpe(dict(chunks), n_ranks)


def check_bpe_by_hand(lab: Lab) -> None:
    """four corpora worked by hand: chunk weights, the tie-break, overlapping pairs, the scan direction"""
    cases = [
        # (a, b) occurs once, (c, d) three times: "cd" wins only when the counts are weighted
        ([("ab", 1), ("cd", 3)], 257, {b"cd": 256}),
        # (z, w) and (x, y) both occur twice; (z, w) occurs first in the text
        ([("zw", 2), ("xy", 2)], 257, {b"zw": 256}),
        # aaaaa: (a, a) x4 -> [aa, aa, a]; (aa, aa) and (aa, a) tie, (aa, aa) is first -> [aaaa, a] -> aaaaa
        ([("aaaaa", 1)], 259, {b"aa": 256, b"aaaa": 257, b"aaaaa": 258}),
        # baaa: (a, a) x2 -> [b, aa, a]; (b, aa) and (aa, a) tie, (b, aa) is first -> baa
        ([("baaa", 1)], 258, {b"aa": 256, b"baa": 257}),
    ]
    for chunks, n_ranks, merges in cases:
        want = {bytes([b]): b for b in range(256)} | merges
        expect_same(_learn(lab, chunks, n_ranks), want, f"learn_bpe({dict(chunks)}, n_ranks={n_ranks}) (new "
                    f"ranks expected: {merges})", _bpe_mistakes(chunks, n_ranks), _show_ranks)


def _random_chunks(lab: Lab) -> list[tuple[str, int]]:
    """Distinct random words over a small alphabet (with 2- and 3-byte characters), random frequencies."""
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
    """stops when every chunk is one token (fewer ranks than asked), and n_ranks=256 gives just the bytes"""
    chunks = _random_chunks(lab)
    possible = len(bpe_truth(chunks, 10 ** 6))
    n_ranks = possible + lab.randint(1, 50)
    expect_same(_learn(lab, chunks, n_ranks), bpe_truth(chunks, n_ranks), f"learn_bpe asked for more ranks "
                f"than the {possible} this corpus can make", _bpe_mistakes(chunks, n_ranks), _show_ranks)
    expect_same(_learn(lab, chunks, 256), bpe_truth(chunks, 256), "learn_bpe with n_ranks=256", None,
                _show_ranks)


register(Exercise(
    name="bpe_merge", file="tokenizer.py", concept="BPE merge step (byte-level trainer)", level="core",
    minutes=35,
    against="BPE recomputed from scratch; by hand",
    statement="""\
Train byte-level BPE (Sennrich et al., arXiv 1508.07909 §3.1; byte-level: GPT-2 §2.2). Ranks 0..255 are the
single bytes in byte order (bytes([b]) -> b). Then, until there are n_ranks ranks, one merge step:
  1. count every adjacent pair of tokens over all chunks, a chunk occurring f times counting its pairs f
     times;
  2. pick the most frequent pair; ties go to the pair whose first occurrence comes first in the text (chunks
     in the given order, then position in the chunk) — tiktoken's _educational.bpe_train picks the same;
  3. its two tokens' bytes, concatenated, become the next rank;
  4. replace the pair in every chunk left to right without overlapping: "aaa" with (a, a) -> [aa, a].
Stop early when no pair is left (every chunk one token). BPE never merges across chunks.
In scope: chunk_counts, a dict {chunk str: count} in order of first appearance; n_ranks (int >= 256);
verbose (print progress if you like); _merge_word(word, pair, new_id) (step 4 on a list of ids).
Return {token bytes: rank} with ranks 0..len-1.""",
    hints=("Keep one list of token ids per distinct chunk (list(chunk.encode('utf-8'))) beside its count, "
           "and token_bytes[id] for every id: a recount of all pairs at every step is fast enough here.",
           "A dict filled while scanning the chunks in order remembers first occurrences: max(counts, "
           "key=counts.get) returns the first of the tied pairs.",
           "Replace with a while loop over the positions: on a match append the new id and skip two, else "
           "copy one. The real trainer keeps counts incrementally (see `solution`); you need not."),
    checks=(check_bpe_by_hand, check_bpe_random, check_bpe_runs_out),
    mistakes=(
        Mistake(BPE_UNWEIGHTED, (("freqs = list(chunk_counts.values())",
                                  "freqs = [1] * len(chunk_counts)"),)),
        Mistake(BPE_TIE, (("pair = _pop_most_frequent(heap, counts, where, words)",
                           "pair = max(counts, key=lambda p: (counts[p], min(where[p]), next(\n"
                           "            i for i, q in enumerate(zip(words[min(where[p])], "
                           "words[min(where[p])][1:])) if q == p)), default=None)"),)),
        Mistake(BPE_OVERLAP, (("new_word = _merge_word(word, pair, new_id)",
                               "new_word = [new_id if tuple(word[i:i + 2]) == pair else t for i, t in "
                               "enumerate(word)\n                        if tuple(word[i:i + 2]) == pair or "
                               "i == 0 or tuple(word[i - 1:i + 1]) != pair]"),)),
        Mistake(BPE_RTL, (("new_word = _merge_word(word, pair, new_id)",
                           "new_word = _merge_word(word[::-1], pair[::-1], new_id)[::-1]"),)),
    )))


# ----------------------------------------------------------------------------------------------------------------
# Exercise: rendering an assistant's tool calls in the chat template (tokenizer.py _chat_segments)

RENDER_FROM_1 = "made-up call ids counted from 1: the first call of a conversation is functions.NAME:0"
RENDER_PER_MESSAGE = ("the made-up call index restarts in every assistant message: it counts every tool call "
                      "of the conversation so far (n_calls must grow by the number of calls)")
RENDER_PER_NAME = ("made-up call index counted per tool name: IDX counts every earlier call of the "
                   "conversation, whatever its name")
RENDER_ASCII = ("dict arguments not written as the template's tojson: json.dumps with ensure_ascii=False "
                "(non-ASCII characters stay as they are, not \\u escapes)")
RENDER_STR_AGAIN = ("string arguments encoded again: the template prints a JSON string of arguments as it is "
                    "(only a dict goes through tojson)")
RENDER_NO_END = "the section is not closed: <|tool_calls_section_end|> must follow the last <|tool_call_end|>"
RENDER_AS_TEXT = ("markers added as text, not as special tokens: encode_chat then spells <|tool_call_begin|> "
                  "etc. with ordinary byte tokens (add(MARKER, True, sup))")
RENDER_UNSUPERVISED = ("the tool-call section is not supervised: the loss mask must be 1 on the markers, ids "
                       "and arguments an assistant wrote")
_RENDER_CALLS = 'calls = _normalize_tool_calls(m["tool_calls"], at, n_calls)'   # the line the mistakes edit
K2_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."   # Kimi-K2-Instruct-0905 chat_template


def chat_truth(messages: list[dict], id_from: int = 0, per_message: bool = False, per_name: bool = False,
               ascii_json: bool = False, str_again: bool = False, section_end: bool = True,
               markers_special: bool = True, section_supervised: bool = True) -> list[tuple[str, bool, bool]]:
    """The conversation as Kimi-K2-Instruct-0905's chat_template.jinja lays it out (with the generation
    prompt), written again from the template: (text, is_special, supervised) pieces, adjacent texts of the
    same supervision joined. An assistant's tool calls (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md):
    content, then <|tool_calls_section_begin|>, per call <|tool_call_begin|>ID<|tool_call_argument_begin|>
    ARGS<|tool_call_end|>, then <|tool_calls_section_end|>; ID the call's id or functions.NAME:IDX, IDX
    counting every call of the conversation from 0; ARGS a string as it is, a dict as Hugging Face's tojson
    (json.dumps, ensure_ascii=False, keys in order). The options produce the known mistakes."""
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
        put({"user": "<|im_user|>", "assistant": "<|im_assistant|>"}.get(m["role"], "<|im_system|>"), True)
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
    return mistake_outputs(variants, lambda **kw: "".join(t for t, _, _ in chat_truth(messages, **kw)))


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
    """A dict of random JSON values (keys in random order, some non-ASCII), or such a dict already written
    as JSON text with its own spacing (kept byte for byte by the template)."""
    keys = ["city", "q", "n", "ok", "ünits", "list"]
    args = {keys.pop(lab.randint(0, len(keys) - 1)): _VALUES[lab.randint(0, len(_VALUES) - 1)]
            for _ in range(lab.randint(0, 3))}
    if lab.randint(0, 2) == 0:
        separators = ((",", ":"), (" , ", " : "))[lab.randint(0, 1)]
        return json.dumps(args, ensure_ascii=False, separators=separators)
    return args


def _random_conversation(lab: Lab, turns: int, ids: bool) -> list[dict]:
    """user, then `turns` times: an assistant with 1-3 tool calls (random content) and one tool reply per
    call; with `ids`, some calls carry their own id."""
    messages: list[dict] = [{"role": "user", "content": "Please help, ö."}]
    n = 0
    for _ in range(turns):
        calls = []
        for _ in range(lab.randint(1, 3)):
            call = {"type": "function", "function": {"name": _NAMES[lab.randint(0, len(_NAMES) - 1)],
                                                     "arguments": _random_arguments(lab)}}
            if ids and lab.randint(0, 2) == 0:
                call["id"] = f"call_{lab.randint(0, 99999)}"
            calls.append(call)
        content = (None, "", "Let me look.", "Zwei Schritte:\n")[lab.randint(0, 3)]
        messages.append({"role": "assistant", "content": content, "tool_calls": calls})
        for j, call in enumerate(calls):
            call_id = call.get("id") or f"functions.{call['function']['name']}:{n + j}"
            messages.append({"role": "tool", "tool_call_id": call_id, "content": f'{{"result": {j}}}'})
        n += len(calls)
    return messages


def check_render_by_hand(lab: Lab) -> None:
    """two calls, a dict with non-ASCII and a JSON string, render to the text worked out by hand"""
    messages = [
        {"role": "user", "content": "Weather in Zürich, and the time?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich",
                                                                                    "days": [1, 2]}}},
            {"type": "function", "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}}]},
    ]
    want = ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
            "<|im_user|>user<|im_middle|>Weather in Zürich, and the time?<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|>Checking.<|tool_calls_section_begin|>"
            "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
            '{"city": "Zürich", "days": [1, 2]}<|tool_call_end|>'
            '<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{"tz":"CET"}<|tool_call_end|>'
            "<|tool_calls_section_end|><|im_end|><|im_assistant|>assistant<|im_middle|>")
    got = lab.tokenizer.apply_chat_template(messages)
    expect_same(got, want, "apply_chat_template of get_weather({'city': 'Zürich', ...}) and "
                "get_time('{\"tz\":\"CET\"}')", _render_mistakes(messages), _show_text)


def check_render_ids_across_turns(lab: Lab) -> None:
    """ids made up for calls without one count every call of the conversation, across assistant turns"""
    messages = _random_conversation(lab, turns=lab.randint(2, 4), ids=False)
    n = sum(len(m.get("tool_calls") or ()) for m in messages)
    _expect_rendered(lab, messages, f"a conversation of {n} calls in {len(messages)} messages, no ids given")


def check_render_random(lab: Lab) -> None:
    """random names, arguments (dicts and JSON strings), given ids and contents match the template"""
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
        raise CheckFailed(f"arguments {bad!r} were rendered without an error: raise ValueError saying what "
                          f"is wrong (the template takes a JSON object, as a string or a dict)")


def check_render_tokens(lab: Lab) -> None:
    """encode_chat: the section's markers are special ids, and the loss mask is 1 on the whole section"""
    tok = lab.tokenizer.Tokenizer.load(ROOT / "demo" / "tiktoken.model")   # the repository's 4,096-rank file
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
            return f"ids differ from position {i} on: got {got[0][i:i + 8]}, expected {want[0][i:i + 8]}"
        i = next(k for k, (a, b) in enumerate(zip(got[1], want[1])) if a != b)
        return f"the loss mask at position {i} (id {want[0][i]}) is {got[1][i]}, expected {want[1][i]}"

    got = tok.encode_chat(messages)
    got = tuple(got) if isinstance(got, (tuple, list)) else got
    want = encoded(chat_truth(messages))
    right = "".join(t for t, _, _ in chat_truth(messages))
    if isinstance(got, tuple) and len(got) == 2 and got[0] != want[0]:  # a mistake in the text itself?
        text = tok.decode(got[0])
        for description, wrong in _render_mistakes(messages).items():
            if text == wrong != right:
                raise CheckFailed(f"encode_chat: wrong, and it matches a known mistake: {description}")
    expect_same(got, want, f"encode_chat of {len(messages)} messages with tool calls",
                {RENDER_AS_TEXT: encoded(chat_truth(messages, markers_special=False)),
                 RENDER_UNSUPERVISED: encoded(chat_truth(messages, section_supervised=False))}, show)


register(Exercise(
    name="render_tool_call", file="tokenizer.py", concept="tool calls in the chat template", level="intro",
    minutes=25,
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
    hints=("Walk through check_render_by_hand's expected text: every marker is one special token, the id and "
           "the arguments are plain text between them.",
           "The index is n_calls + j for the j-th call of this message (from 0); afterwards n_calls += "
           "len(m['tool_calls']), so the next assistant message goes on counting.",
           "Section 7 of the module has the pieces: _normalize_tool_calls(m['tool_calls'], at, n_calls) "
           "gives [(id, argument text)] and _tool_call_segments(calls, sup) the section's segments."),
    checks=(check_render_by_hand, check_render_ids_across_turns, check_render_random, check_render_tokens,
            check_render_bad_arguments),
    mistakes=(
        Mistake(RENDER_FROM_1, ((_RENDER_CALLS, _RENDER_CALLS.replace("n_calls)", "n_calls + 1)")),)),
        Mistake(RENDER_PER_MESSAGE, (("n_calls += len(calls)", "pass"),)),
        Mistake(RENDER_ASCII, ((_RENDER_CALLS,
                                'calls = [(i, a if isinstance(c["function"]["arguments"], str) else '
                                'json.dumps(c["function"]["arguments"]))\n'
                                f'                     for (i, a), c in zip({_RENDER_CALLS[8:]}, '
                                'm["tool_calls"])]'),)),
        Mistake(RENDER_STR_AGAIN, ((_RENDER_CALLS,
                                    'calls = [(i, _tojson(c["function"]["arguments"]))\n'
                                    f'                     for (i, _), c in zip({_RENDER_CALLS[8:]}, '
                                    'm["tool_calls"])]'),)),
        Mistake(RENDER_NO_END, (("_tool_call_segments(calls, sup)",
                                 "_tool_call_segments(calls, sup)[:-1]"),)),
        Mistake(RENDER_AS_TEXT, (("add(*seg)", "add(seg[0], False, seg[2])"),)),
        Mistake(RENDER_UNSUPERVISED, (("add(*seg)", "add(seg[0], seg[1], False)"),)),
    )))


# ----------------------------------------------------------------------------------------------------------------
# Exercise: parsing tool calls out of the model's text (tokenizer.py parse_tool_calls)

_PARSE_CALLS = "result.calls = [_parse_call(part) for part in parts[1:]]"   # the line the mistakes edit
PARSE_GREEDY = ("two calls swallowed into one: a greedy match ran from the first <|tool_call_begin|> to the "
                "last <|tool_call_end|> (cut the section at every <|tool_call_begin|>, or match "
                "non-greedily)")
PARSE_PAST_END = ("calls after <|tool_calls_section_end|> were read too: only the first section's calls "
                  "count; the text after it is `after`")
PARSE_NAME = ("the name must be NAME alone: not 'functions.NAME', not 'NAME:IDX', and a dotted name "
              "(db.query) kept whole")
PARSE_SKIPPED = ("a broken call was skipped silently: every <|tool_call_begin|> gives a ToolCall, a broken "
                 "one with its error (a regex over the whole section just steps over it)")
PARSE_UNCLOSED = ("a section without <|tool_calls_section_end|> (output cut off) was ignored: parse it to "
                  "the end of the text and add SECTION_NOT_CLOSED to errors")
S_BEGIN, S_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
C_BEGIN, C_ARGS, C_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def wire_truth(calls: list[tuple[str, int, str]], between: str = "") -> str:
    """A tool-call section as K2 writes it (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md), from (name, index,
    argument text) triples; `between` goes between the calls (whitespace, which a parser must allow)."""
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
        raise CheckFailed(f"parse_tool_calls returned {type(result).__name__}: expected a ToolCallParse "
                          f"(content, calls, errors, has_section, closed, after)")
    calls = [dict(id=c.id, name=c.name, index=c.index, arguments=c.arguments, raw_arguments=c.raw_arguments,
                  ok=c.error is None) for c in result.calls]
    return dict(content=result.content, has_section=result.has_section, closed=result.closed,
                after=result.after, n_errors=len(result.errors),
                not_closed=lab.tokenizer.SECTION_NOT_CLOSED in result.errors, calls=calls)


def _parse_mistake(got: dict, want: dict) -> str | None:
    """The known mistake that explains `got`, if one does."""
    g, w = got["calls"], want["calls"]
    gi, wi = [c["id"] for c in g], [c.get("id") for c in w]
    rest = iter(wi)
    if len(g) < len(w) and all(i in rest for i in gi):   # some calls are missing, the others in order
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
        if wrong and all(got_name in (f"functions.{name}", f"{name}:{index}", f"functions.{name}:{index}",
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
              for i, (gc, c) in enumerate(zip(seen["calls"], want["calls"])) for k in c if gc[k] != c[k]]
    if len(got["calls"]) != len(want["calls"]):
        ids = [c.get("id") for c in want["calls"]]
        which = ids if None not in ids else "(one per <|tool_call_begin|> in the section)"
        diffs.insert(0, f"{len(got['calls'])} calls {[c['id'] for c in got['calls']]}, expected {len(ids)} "
                        f"{which}")
    where = diffs[0]
    raise CheckFailed(f"{what}: {where}; it matches none of the known mistakes")


def _well_formed(content: str, calls: list[dict], after: str = "", n_errors: int = 0) -> dict:
    return dict(content=content, has_section=True, closed=True, after=after, n_errors=n_errors,
                not_closed=False, calls=calls)


def check_parse_round_trip(lab: Lab) -> None:
    """calls written in K2's wire format (random names, indices, JSON arguments) are read back exactly"""
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
        _expect_parse(lab, text, _well_formed(content, want_calls, after), f"{len(triples)} call(s)")


def check_parse_malformed(lab: Lab) -> None:
    """broken calls are reported one by one, never raise, never swallow their neighbours (cases by hand)"""
    ok_a, ok_g = _parsed("a", 0, {"x": 1}), _parsed("g", 1, {"q": 2})
    cut = (f'Sure.{S_BEGIN}{C_BEGIN}functions.a:0{C_ARGS}{{"x": 1}}{C_END}'
           f'{C_BEGIN}functions.b:1{C_ARGS}{{"y": ')
    cases = [
        # cut off inside the second call's arguments: the first call stands, the second is an error
        ("a section cut off", cut,
         dict(content="Sure.", has_section=True, closed=False, after="", n_errors=1, not_closed=True,
              calls=[ok_a, dict(id="functions.b:1", name="b", ok=False, arguments=None)])),
        # Python's quotes are not JSON: that call is an error, the next one is fine
        ("a call with bad JSON",
         f"{S_BEGIN}{C_BEGIN}functions.f:0{C_ARGS}{{'q': 1}}{C_END}{C_BEGIN}functions.g:1{C_ARGS}{{\"q\": 2}}"
         f"{C_END}{S_END}",
         _well_formed("", [dict(id="functions.f:0", name="f", ok=False, arguments=None), ok_g])),
        # the first call has no <|tool_call_end|>: it is an error, the dotted second one is whole
        ("a call without its end marker",
         f'{S_BEGIN}{C_BEGIN}functions.a:0{C_ARGS}{{"x": 1}}{C_BEGIN}functions.db.query:1{C_ARGS}{{}}{C_END}'
         f"{S_END}",
         _well_formed("", [dict(id="functions.a:0", name="a", ok=False, arguments=None),
                           _parsed("db.query", 1, {})])),
        # arguments must be a JSON object
        ("arguments that are a JSON list", f"{S_BEGIN}{C_BEGIN}functions.a:0{C_ARGS}[1, 2]{C_END}{S_END}",
         _well_formed("", [dict(id="functions.a:0", name="a", ok=False, arguments=None)])),
        # no section at all: everything is content, even text that looks like a call
        ("no section", f"Nothing to call. {C_BEGIN}functions.x:0{C_ARGS}{{}}{C_END}",
         dict(content=f"Nothing to call. {C_BEGIN}functions.x:0{C_ARGS}{{}}{C_END}", has_section=False,
              closed=False, after="", n_errors=0, not_closed=False, calls=[])),
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
    """random soups of markers and text: never raises, and the section and call count follow the rules"""
    pieces = (S_BEGIN, S_END, C_BEGIN, C_BEGIN, C_ARGS, C_END, "functions.a:0", "functions.db.q:12", "{", "}",
              '"x"', ": ", "1", " ", "\n", "ok", "<|", "|>")
    for _ in range(40):
        text = "".join(pieces[lab.randint(0, len(pieces) - 1)] for _ in range(lab.randint(0, 30)))
        # the rules, applied with str.find: content up to the first section begin, the section up to the
        # first end after it (or the text's end), one call per <|tool_call_begin|> inside
        begin = text.find(S_BEGIN)
        if begin < 0:
            want = dict(content=text, has_section=False, closed=False, after="", n_errors=0, not_closed=False,
                        calls=[])
        else:
            end = text.find(S_END, begin + len(S_BEGIN))
            body = text[begin + len(S_BEGIN):end if end >= 0 else len(text)]
            want = dict(content=text[:begin], has_section=True, closed=end >= 0,
                        after=text[end + len(S_END):] if end >= 0 else "",
                        n_errors=(end < 0) + bool(body.split(C_BEGIN)[0].strip()), not_closed=end < 0,
                        calls=[{} for _ in range(body.count(C_BEGIN))])
        _expect_parse(lab, text, want, "random text")


def check_parse_long_whitespace(lab: Lab) -> None:
    """a call cut off inside thousands of blank tokens is parsed right, in time linear in the text"""
    def cut_off(n: int) -> str:
        return (f"{S_BEGIN}{C_BEGIN}functions.a:0{C_ARGS}{{\"x\": 1}}{C_END}{C_BEGIN}functions.b:1{C_ARGS}"
                + " " * n)

    def seconds(text: str) -> float:
        t0 = time.perf_counter()
        lab.tokenizer.parse_tool_calls(text)
        return time.perf_counter() - t0

    # linear: 10x the text, ~10x the time; a backtracking regex (\s*(.*?)\s*) is cubic in the spaces.
    # Small sizes first, so that a cubic parser fails here in seconds instead of running into the timeout.
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
                          f"something backtracks over the whitespace (a regex like \\s*(.*?)\\s* over the "
                          f"section); cut the text at the markers with find/split instead")
    n = 20_000 + lab.randint(0, 5000)
    _expect_parse(lab, cut_off(n), dict(content="", has_section=True, closed=False, after="", n_errors=1,
                                        not_closed=True, calls=[_parsed("a", 0, {"x": 1}),
                                                                dict(id="functions.b:1", name="b", ok=False,
                                                                     arguments=None)]),
                  f"a section cut off after {n:,} spaces")


register(Exercise(
    name="parse_tool_calls", file="tokenizer.py", concept="parsing tool calls from model output",
    level="core", minutes=30,
    against="round trips of an independent writer; broken cases by hand",
    statement="""\
Read K2's tool calls back out of generated text (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md; the wire
format: content, then <|tool_calls_section_begin|>, calls <|tool_call_begin|>functions.NAME:IDX
<|tool_call_argument_begin|>{json}<|tool_call_end|>, then <|tool_calls_section_end|>). Never raise.
Return ToolCallParse(content, calls, errors, has_section, closed, after):
  no <|tool_calls_section_begin|> in text: content = text, nothing else;
  else content = the text before the first one; the section runs to the first <|tool_calls_section_end|>
  after it (closed=True, after = the text after that end marker) or, if there is none, to the end of the
  text (closed=False, and SECTION_NOT_CLOSED in errors); only this first section is parsed;
  calls: one ToolCall per <|tool_call_begin|> in the section, in order; one broken call (bad JSON, no end
  marker) is an error of its own and must not swallow the next; non-blank text before the first call is an
  error message in errors.
In scope: text (str); find_section(text) -> (begin, end) positions (-1 if absent); _parse_call(part) -> a
ToolCall for the text after one <|tool_call_begin|> (name, index, arguments or error; never raises);
SECTION_BEGIN, SECTION_END, CALL_BEGIN, SECTION_NOT_CLOSED, ToolCallParse; re.""",
    hints=("find_section(text) gives both positions at once; the section's body is between the end of "
           "SECTION_BEGIN and the end marker (or the end of the text).",
           "body.split(CALL_BEGIN): element 0 is whatever came before the first call (normally empty), every "
           "other element is one call for _parse_call.",
           "A regex over the whole section with .* (greedy) joins calls; even .*? must not run past a broken "
           "call's missing end marker into the next call."),
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
                                            '        call.name = call.id.split(":")[0] or call.name'),)),
        Mistake(PARSE_SKIPPED, ((_PARSE_CALLS, _PARSE_CALLS.replace("]]", "] if CALL_END in part]")),)),
        Mistake(PARSE_UNCLOSED, (("body = text[start + len(SECTION_BEGIN):]\n        "
                                  "result.errors.append(SECTION_NOT_CLOSED)",
                                  "return ToolCallParse(content=text)"),)),
    )))


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: markers and regions

MARKER = re.compile(r"^(?P<indent>[ \t]*)# (?P<end>end )?exercise: (?P<name>\S+)[ \t]*$")


class ExerciseError(Exception):
    """A problem the user can fix (unknown name, no workspace, broken markers): printed, no traceback."""


def get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise ExerciseError(f"unknown exercise {name!r}; the exercises are: {', '.join(EXERCISES)} "
                            f"(`python exercises.py list` describes them)")
    return EXERCISES[name]


def find_region(lines: list[str], name: str, where: str) -> tuple[int, int, str]:
    """(first, end, indent): lines[first:end] is the region between the markers of `name` (0-based)."""
    starts = [i for i, s in enumerate(lines) if (m := MARKER.match(s)) and m["name"] == name and not m["end"]]
    ends = [i for i, s in enumerate(lines) if (m := MARKER.match(s)) and m["name"] == name and m["end"]]
    if len(starts) != 1 or len(ends) != 1:
        raise ExerciseError(f"{where} must hold exactly one '# exercise: {name}' and one "
                            f"'# end exercise: {name}' line; found {len(starts)} and {len(ends)}")
    s, e = starts[0], ends[0]
    indent = MARKER.match(lines[s])["indent"]
    if not s < e - 1 or MARKER.match(lines[e])["indent"] != indent:
        raise ExerciseError(f"{where}: the markers of {name} (lines {s + 1} and {e + 1}) must enclose at "
                            f"least one line and share one indentation")
    return s + 1, e, indent


def reference_region(ex: Exercise, root: Path = ROOT) -> list[str]:
    lines = (root / ex.file).read_text().splitlines(keepends=True)
    first, end, _ = find_region(lines, ex.name, ex.file)
    return lines[first:end]


def marker_problems(root: Path = ROOT) -> list[str]:
    """Every way the repository's markers disagree with the registry (an empty list when all is well)."""
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
                problems.append(f"{path.name}:{i}: marker for {m['name']!r}, which is not an exercise "
                                f"registered for {path.name}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: the workspace


def lab_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get(LAB_ENV) or ROOT / "lab").resolve()


def project_modules(root: Path = ROOT) -> list[str]:
    """The top-level modules a workspace holds copies of (everything but this file and setup.py)."""
    return sorted(p.stem for p in root.glob("*.py") if p.name not in (Path(__file__).name, "setup.py"))


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
    """The lines that replace the region in the workspace: the task as comments, then NotImplementedError."""
    lines = [f"# Exercise {ex.name} ({ex.minutes} min): {ex.concept}. Replace these lines with your code.\n"]
    lines += [f"# {s}".rstrip() + "\n" for s in ex.statement.splitlines()]
    lines += [f"raise NotImplementedError(\"exercise {ex.name} is not written yet: see the comments \"\n",
              f"                          \"above; `python exercises.py hint {ex.name}` gives a hint\")\n"]
    return [indent + s for s in lines]


def start(ex: Exercise, lab: Path, force: bool = False) -> str:
    """Create or extend the workspace and put the stub of `ex` in lab/FILE; returns a note for the student."""
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
            raise ExerciseError(f"{_show(target)} no longer has the markers of {ex.name}; restore them, or "
                                f"run `python exercises.py start {ex.name} --force` to copy the file afresh "
                                f"(your changes to it are lost)") from None
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
        raise ExerciseError(f"{_show(target)} already holds your work on {ex.name} (lines {first + 1}-"
                            f"{end}); `python exercises.py start {ex.name} --force` replaces it by the blank "
                            f"stub")
    if ex.name not in state["started"]:
        state["started"].append(ex.name)
    _save_state(lab, state)
    return note


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: running the checks


@contextlib.contextmanager
def lab_imports(lab: Path) -> Iterator[None]:
    """Within the block `import attention` etc. load lab/'s copies; the previous modules come back after."""
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
    return fn.__doc__.strip().splitlines()[0] if fn.__doc__ else ""


def _student_error(e: BaseException, lab: Path) -> str:
    """An exception as the student needs it: the deepest frame in the student's workspace, with its line."""
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
    if isinstance(e, NotImplementedError) and "is not written yet" in str(e):  # a stub, this one or another's
        stub_at = f"{_show(Path(f.filename))}:{f.lineno}"
        return f"NotImplementedError: {str(e).split(':')[0]} ({stub_at} is its stub)"
    return f"{what}\n    at {_show(Path(f.filename))}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def failed_all(ex: Exercise, message: str) -> list[dict]:
    """Every check of `ex` failed with one message (the module does not import, a timeout, a crash)."""
    return [dict(name=check_title(c), about=check_about(c), passed=False, score=0.0, message=message,
                 skipped=False) for c in ex.checks]


def run_checks(ex: Exercise, lab: Path, seed: int) -> list[dict]:
    """Run every check of `ex` against the workspace in this process: one dict per check
    (name, passed, score, message, skipped)."""
    lab = lab.resolve()
    results = []
    with lab_imports(lab):
        try:
            importlib.import_module(Path(ex.file).stem)
        except Exception as e:  # noqa: BLE001 — the student's module does not import: every check fails
            return failed_all(ex, f"{_show(lab / ex.file)} does not import: {_student_error(e, lab)}")
        for i, check in enumerate(ex.checks):
            r = dict(name=check_title(check), about=check_about(check), passed=False, score=0.0, message="",
                     skipped=False)
            try:
                check(Lab(lab, seed + i))
                r.update(passed=True, score=1.0)
            except CheckSkipped as e:
                r.update(skipped=True, message=f"skipped: {e}")
            except CheckFailed as e:
                r["message"] = str(e)
            except Exception as e:  # noqa: BLE001 — the student's exception, reported at the student's line
                r["message"] = _student_error(e, lab)
            results.append(r)
    return results


def summary(ex: Exercise, results: list[dict], seed: int | None = None, seconds: float | None = None) -> dict:
    counted = [r for r in results if not r.get("skipped")]
    passed = sum(r["passed"] for r in counted)
    return dict(exercise=ex.name, file=ex.file, passed=passed, total=len(counted),
                score=round(passed / len(counted), 4) if counted else 0.0, seed=seed,
                seconds=None if seconds is None else round(seconds, 2), checks=results)


def check(ex: Exercise, lab: Path, timeout: float = DEFAULT_TIMEOUT, seed: int | None = None) -> dict:
    """Grade `ex` in a fresh process (where modules load from the workspace, and a loop can be stopped)."""
    if ex.name not in _state(lab)["started"] or not (lab / ex.file).is_file():
        raise ExerciseError(f"{ex.name} is not started in {_show(lab)}: run `python exercises.py start "
                            f"{ex.name}` first")
    seed = int.from_bytes(os.urandom(3), "little") if seed is None else seed
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_run", ex.name, "--lab", str(lab),
               "--out", str(out), "--seed", str(seed)]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # a file edited in the same second must reload
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            msg = (f"stopped after {timeout:g} s: the checks of {ex.name} normally take a few seconds, so "
                   f"your code probably loops forever (look at the loops in your region of "
                   f"{_show(lab / ex.file)}); `--timeout S` gives it longer")
            return summary(ex, failed_all(ex, msg), seed, time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        if not out.is_file():
            msg = f"the check process died (exit code {proc.returncode}) before reporting:\n{log[-2000:]}"
            return summary(ex, failed_all(ex, msg), seed, seconds)
        return summary(ex, json.loads(out.read_text()), seed, seconds)


def _print_result(res: dict) -> None:
    print(f"check {res['exercise']} ({res['file']}, seed {res['seed']}, {res['seconds']} s)")
    for r in res["checks"]:
        tag = "SKIP" if r.get("skipped") else "PASS" if r["passed"] else "FAIL"
        print(f"  {tag}  {r['name']}: {r.get('about', '')}")
        if r["message"] and not r["passed"]:
            print(textwrap.indent(r["message"], "        "))
    done = res["passed"] == res["total"]
    print(f"score {res['passed']}/{res['total']}" + ("  -- all checks pass" if done else ""))


def grade(lab: Path, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Check every started exercise: {"lab", "date", "passed", "total", "exercises": [one per exercise]}."""
    started = [n for n in _state(lab)["started"] if n in EXERCISES]
    if not started:
        raise ExerciseError(f"no exercise is started in {_show(lab)}: run `python exercises.py start NAME` "
                            f"first")
    res = [check(EXERCISES[n], lab, timeout) for n in started]
    return dict(lab=str(lab), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                passed=sum(r["passed"] for r in res), total=sum(r["total"] for r in res), exercises=res)


def bench(timeout: float = 60.0) -> list[tuple[str, float, str]]:
    """Seconds of `check` for every exercise against a workspace holding the reference code."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lab = Path(tmp) / "lab"
        lab.mkdir()
        for m in project_modules():
            shutil.copy2(ROOT / f"{m}.py", lab / f"{m}.py")
        _save_state(lab, {"started": list(EXERCISES), "hints": {}})
        for ex in EXERCISES.values():
            res = check(ex, lab, timeout)
            rows.append((ex.name, res["seconds"], f"{res['passed']}/{res['total']}"))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The tour: one token through a tiny model, each step with its shapes and the file:line to put a breakpoint on

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
    """file:line of a function of this project; for torch's own modules (nn.Linear), the line calling it."""
    code = inspect.unwrap(fn).__code__
    if Path(code.co_filename).resolve().parent == ROOT:
        return f"{Path(code.co_filename).name}:{code.co_firstlineno}"
    for frame in inspect.stack(0)[1:]:
        if Path(frame.filename).resolve().parent == ROOT and frame.filename != __file__:
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"


def _shapes(v) -> str:
    if isinstance(v, Tensor):
        return str(tuple(v.shape))
    if isinstance(v, (tuple, list)):
        return ", ".join(_shapes(t) for t in v if isinstance(t, Tensor))
    return ""


def tour(prompt_len: int = 5, seed: int = 0) -> list[str]:
    """Run a prompt through config.PRESETS["tiny"] (random weights) and the sampler, recording each step."""
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
            return f"token {t} -> experts {idx[t].tolist()}, weights {[round(x, 3) for x in w[t].tolist()]}"
        if name == "lm_head":
            return f"token {t}: highest logits at ids {out[0, t].topk(3).indices.tolist()}"
        if name == "sample":
            return f"next token id {out.tolist()}"
        return ""

    def enter(name: str, where: str, args_) -> list:
        first = next((v for v in args_ if isinstance(v, Tensor)), None)
        ev = [depth[0], TOUR_STEPS[name], where, _shapes(first), "", ""]
        events.append(ev)
        depth[0] += 1
        return ev

    def leave(ev: list, name: str, out) -> None:
        depth[0] -= 1
        ev[4], ev[5] = _shapes(out if isinstance(out, Tensor) else tuple(out)), note(name, out)

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
        mod.register_forward_pre_hook(lambda m, a: open_events.update({id(m): enter(name, _where(fwd), a)}))
        mod.register_forward_hook(lambda m, a, out: leave(open_events.pop(id(m)), name, out))

    for qual, mod in net.named_modules():
        attr, cls = qual.rsplit(".", 1)[-1], type(mod).__name__
        name = attr if attr in TOUR_STEPS else cls if cls in TOUR_STEPS else None
        if name:
            hook(mod, name)
    functions = [(attention, "apply_rope"), (attention, "attend"), (moe, "run_experts"),
                 (model_py, "rope_cos_sin")]  # called by name from their module's globals: wrapped there
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
            f"{args.num_hidden_layers} layers, layer 0 dense, then MoE with {args.n_routed_experts} experts "
            f"top-{args.num_experts_per_tok}), following token {t}, then the sampler. Shapes: B=1 batch, "
            f"T={prompt_len} tokens, D={args.hidden_size}, H={args.num_attention_heads} heads, "
            f"V={args.vocab_size}. `where` is the file:line where the step's code starts (for nn.Linear: "
            f"where it is called); a breakpoint there stops at it, e.g. `python -m pdb generate.py`, then "
            f"`b attention.py:LINE`.")
    rows = []
    for d, label, where, i, o, n in events:
        rows.append(["  " * d + label, where, f"{i} -> {o}"])
        if n:
            rows.append(["  " * (d + 1) + "= " + n, "", ""])
    return textwrap.wrap(head, 110) + [""] + _table(rows, ["step", "where", "shapes"]).splitlines()


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(s.rstrip() for s in lines)


def cmd_list(a) -> None:
    print(_table([[e.name, e.file, e.concept, e.level, e.minutes, e.against] for e in EXERCISES.values()],
                 ["name", "file", "concept", "level", "min", "checked against"]))
    print(f"\n{len(EXERCISES)} exercises, {sum(e.minutes for e in EXERCISES.values())} minutes in all. "
          f"Start one with `python exercises.py start NAME`.")


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
    print(f"# the reference between '# exercise: {ex.name}' and '# end exercise: {ex.name}' in {ex.file}:",
          file=sys.stderr)
    sys.stdout.write("".join(reference_region(ex)))


def cmd_grade(a) -> int:
    lab = lab_dir(a.lab)
    res = grade(lab, a.timeout)
    print(_table([[r["exercise"], f"{r['passed']}/{r['total']}", r["score"], r["seconds"],
                   next((c["name"] for c in r["checks"] if not c["passed"] and not c.get("skipped")), "")]
                  for r in res["exercises"]],
                 ["exercise", "passed", "score", "seconds", "first failing check"]))
    out = Path(a.json) if a.json else lab / "grade.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"\n{res['passed']}/{res['total']} checks pass; JSON in {_show(out)}")
    return 0 if res["passed"] == res["total"] else 1


def cmd_bench(a) -> None:
    t0 = time.perf_counter()
    rows = bench()
    total = time.perf_counter() - t0
    print(_table([[n, f"{s:.1f}", p] for n, s, p in rows], ["exercise", "check (s)", "passed"]))
    print(f"\nall {len(rows)} exercises: {total:.1f} s (`grade` of a full lab); {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f} (other processes on them), torch {torch.__version__}")


def cmd_tour(a) -> None:
    print("\n".join(tour()))


def cmd_run(a) -> None:
    """The child process of `check`: run the checks in-process, write the results as JSON."""
    sys.dont_write_bytecode = True
    results = run_checks(get(a.name), Path(a.lab), a.seed)
    Path(a.out).write_text(json.dumps(results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--lab", help=f"the workspace folder (default: ${LAB_ENV}, else lab/ by this file)")
    named = argparse.ArgumentParser(add_help=False, parents=[common])
    named.add_argument("name", help="an exercise name (`python exercises.py list`)")
    timed = argparse.ArgumentParser(add_help=False)
    timed.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                       help="seconds before the checks are stopped")
    timed.add_argument("--json", help="also write the result as JSON to this file")
    sub.add_parser("list", help="the exercises (the default)").set_defaults(fn=cmd_list)
    sub.add_parser("show", parents=[named], help="the task of one exercise").set_defaults(fn=cmd_show)
    s = sub.add_parser("start", parents=[named], help="copy the modules into the workspace, blank one region")
    s.add_argument("--force", action="store_true", help="replace your work on this region by the blank stub")
    s.set_defaults(fn=cmd_start)
    s = sub.add_parser("check", parents=[named, timed], help="grade one exercise in the workspace")
    s.add_argument("--seed", type=int, help="reproduce a run (the seed is printed)")
    s.set_defaults(fn=cmd_check)
    sub.add_parser("hint", parents=[named], help="the next hint").set_defaults(fn=cmd_hint)
    sub.add_parser("solution", parents=[named], help="the reference region").set_defaults(fn=cmd_solution)
    s = sub.add_parser("grade", parents=[common, timed], help="check every started exercise")
    s.set_defaults(fn=cmd_grade)
    sub.add_parser("tour", help="one token through a tiny model, step by step").set_defaults(fn=cmd_tour)
    sub.add_parser("bench", help="time every check against the reference").set_defaults(fn=cmd_bench)
    s = sub.add_parser("_run")  # internal: the child process of `check`
    s.add_argument("name")
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
