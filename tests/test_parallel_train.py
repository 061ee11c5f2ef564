"""Protects train.py and MuonClip under tensor + expert parallelism: `torchrun --nproc-per-node 2 train.py`
gives the one-process run, step for step.

* The same run (tiny preset, MuonClip with a low tau so that QK-Clip fires, gradient clipping on) is trained for 3
  steps in this test process and on 2 ranks started by torchrun (gloo on CPU): 2 steps, a checkpoint, then
  `--resume` for the third. Both start from one one-process checkpoint (--init): a random init under W ranks is not
  the one-device model of the same seed (model.Transformer.reset_parameters).
* Compared: every step's loss, gradient norm, max logits, clipped heads and load imbalance (rank 0's log.jsonl); the
  validation loss; the final weights (the 2-rank checkpoint, loaded in this one process); the optimizer state
  (optimizer.pt holds the gathered, one-process state whatever the world size).
* Tolerance: fp32 throughout, |a - b| <= 1e-5·max|b| + 1e-7 per value or tensor (the ranks add the same numbers in
  another order: split matmuls, fp32 all-reduces, about 1e-7 relative); weights also + 0.1% of their 3-step move
  (AdamW's 1/sqrt(v) enlarges the difference of a near-zero gradient). This strict run uses Newton-Schulz in fp32
  (_ns_fp32): the shipped bf16 NS amplifies 1e-7 input differences to ~10% of an update (its quintic has slope
  3.44 at 0, over 5 steps), so the shipped path is checked separately, strictly before the first update only.
* The progress lines are printed once (rank 0), and the checkpoint loads in one process.
Run: pytest tests/test_parallel_train.py -q   (CPU; three torchrun starts, about 25 s)"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # started by torchrun: the modules are flat files at the repository root
    sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

import model as M  # noqa: E402
import muonclip  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
import tokenizer as tk  # noqa: E402
from conftest import run_torchrun  # noqa: E402

RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # Trainer sets the process-wide count; give the other test files theirs back
    yield
    torch.set_num_threads(n)


def _ns_fp32(G: torch.Tensor, steps: int = muonclip.NS_STEPS) -> torch.Tensor:
    """muonclip.zeropower_via_newtonschulz5 in fp32 instead of bf16, for the strict comparison. Its quintic has slope
    3.44 at 0, so 5 steps multiply a difference along a small singular direction by up to ~500: in bf16, the 1e-7
    differences of the gathered momentum become differences of 1e-2..1e-1 of an update."""
    a, b, c = muonclip.NS_COEFFICIENTS
    X = G.float().mT if G.size(-2) > G.size(-1) else G.float()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + muonclip.NS_EPS)
    for _ in range(steps):
        Gram = X @ X.mT
        X = a * X + (b * Gram + c * Gram @ Gram) @ X
    return X.mT if G.size(-2) > G.size(-1) else X


def _torchrun(argv: list[str], fp32_ns: bool = False, timeout: float = 240.0) -> str:
    """`torchrun --nproc-per-node 2 train.py ARGV` under a timeout (fp32_ns: through this file, with _ns_fp32); its
    stdout + stderr. Fails the test on an error or a hang (the ranks run in their own process group)."""
    entry = [str(Path(__file__).resolve()), "fp32-ns"] if fp32_ns else ["train.py"]
    rc, out, seconds = run_torchrun(2, [*entry, *argv], timeout)
    assert rc == 0, f"torchrun train.py failed:\n{out[-12000:]}"
    print(f"torchrun train.py on 2 ranks: {seconds:.1f} s")
    return out


def _close(a, b, what: str, rtol: float = RTOL, moved: float = 0.0) -> None:
    """|a - b| <= rtol·max|b| + ATOL + moved (elementwise max over the tensor or list)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert diff <= rtol * scale + ATOL + moved, f"{what}: max |diff| {diff:.3e} vs max |value| {scale:.3e}"


def _steps(log: Path) -> list[dict]:
    return runs.read_log(log)[1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return M.Transformer.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ptrain")
    tok = d / "bytes.tiktoken"
    tk.save_ranks({bytes([i]): i for i in range(256)}, tok)  # byte-level: 256 + 256 specials = tiny's 512 ids
    corpus = d / "corpus.py"
    corpus.write_text(tk.read_corpus(max_bytes=30_000), encoding="utf-8")
    torch.manual_seed(0)
    M.Transformer(M.load_args("tiny")).save_pretrained(d / "init")  # the one-process start of every run
    common = ["--init", d / "init", "--tokenizer", tok, "--data", corpus, "--data-cache", d / "cache",
              "--threads", 1, "--batch-size", 2, "--seq-len", 32, "--val-batches", 1, "--eval-every", 1000,
              "--log-every", 1, "--qk-clip-tau", 0.05, "--grad-clip", 0.5,  # tau this low clips heads every step
              "--warmup-frac", 0, "--decay-frac", 0]  # constant lr: a 2-step run resumed to 3 = the 3-step run
    return d, [str(x) for x in common]


@pytest.mark.slow
def test_two_ranks_train_like_one_process_and_resume(setup, monkeypatch):
    """3 steps on one process vs 2 steps on 2 ranks + --resume to 3, both with fp32 Newton-Schulz (_ns_fp32)."""
    d, common = setup
    monkeypatch.setattr(muonclip, "zeropower_via_newtonschulz5", _ns_fp32)
    assert train.main([*common, "--steps", "3", "--out", str(d / "one")]) == 0
    _torchrun([*common, "--steps", "2", "--out", str(d / "two")], fp32_ns=True)
    out = _torchrun(["--resume", str(d / "two"), "--steps", "3"], fp32_ns=True)
    assert "resumed at step 2/3" in out and out.count("step     3/3") == 1, out[-3000:]  # printed once

    one, two = _steps(d / "one" / "log.jsonl"), _steps(d / "two" / "log.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3]
    assert all(r["clipped_heads"] > 0 for r in one)  # QK-Clip fired: each rank clipped its own heads
    for a, b in zip(two, one):
        for key in ("loss", "grad_norm", "max_logit", "load_maxvio"):
            _close(a[key], b[key], f"step {b['step']} {key}")
        assert a["clipped_per_layer"] == b["clipped_per_layer"], b["step"]
    _close(two[-1]["val_loss"], one[-1]["val_loss"], "val_loss")

    # the 2-rank checkpoint is an ordinary one-process checkpoint: it loads here and holds the same weights, to
    # 1e-5 of their size plus 0.1% of what the 3 steps moved them (AdamW divides by sqrt(v): a gradient element near 0
    # turns its 1e-7 difference into a larger one of its update; measured 3e-4 of the move, in lm_head)
    got, want, start = _weights(d / "two" / "ckpt"), _weights(d / "one" / "ckpt"), _weights(d / "init")
    assert got.keys() == want.keys()
    for name in want:
        moved = (want[name] - start[name]).abs().max().item()
        _close(got[name], want[name], name, moved=1e-3 * moved)
    assert moved > 0
    # ...and the same optimizer state, gathered to the one-process layout
    got = torch.load(d / "two" / "ckpt" / "optimizer.pt", weights_only=True)
    want = torch.load(d / "one" / "ckpt" / "optimizer.pt", weights_only=True)
    assert got["state"].keys() == want["state"].keys()
    for i, s in want["state"].items():
        for k, v in s.items():
            _close(got["state"][i][k], v, f"optimizer state {i} {k}", rtol=1e-4)


@pytest.mark.slow
def test_torchrun_train_py_end_to_end(setup):
    """The user's command, bf16 Newton-Schulz as shipped: the first step (loss, gradient norm and max logits before
    any update) equals the one-process step (1e-5). The update itself is only close: bf16 NS turns the ranks' 1e-7
    gradient differences into differences of up to 10% of an expert's one-step move (measured; the expert stacks are
    not even gathered), so the bound is 25% of the move. The strict check is the fp32-NS test above."""
    d, common = setup
    assert train.main([*common, "--steps", "1", "--out", str(d / "one-bf16")]) == 0
    out = _torchrun([*common, "--steps", "1", "--out", str(d / "two-bf16")])
    assert "2 ranks under torchrun" in out and out.count("step     1/1") == 1, out[-3000:]
    (a,), (b,) = _steps(d / "two-bf16" / "log.jsonl"), _steps(d / "one-bf16" / "log.jsonl")
    for key in ("loss", "grad_norm", "max_logit", "load_maxvio"):
        _close(a[key], b[key], key)
    assert a["clipped_per_layer"] == b["clipped_per_layer"]
    got, want, start = _weights(d / "two-bf16" / "ckpt"), _weights(d / "one-bf16" / "ckpt"), _weights(d / "init")
    for name in want:
        _close(got[name], want[name], name, moved=0.25 * (want[name] - start[name]).abs().max().item())


if __name__ == "__main__":  # torchrun tests/test_parallel_train.py fp32-ns ARGS: train.py with _ns_fp32
    assert sys.argv[1] == "fp32-ns"
    muonclip.zeropower_via_newtonschulz5 = _ns_fp32
    sys.exit(train.main(sys.argv[2:]))
