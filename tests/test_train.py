"""Protects train.py: the K2-shaped LR schedule, learning on real text, fine-tuning from a JSONL file,
bit-identical resume after Ctrl-C, crash-safe checkpoints that transformers and generate.py load, the plot, clear
errors (a bad flag is argparse's usage error, exit 2; a run that cannot start or go on is one `error:` line, exit
1), and that every CLI flag reaches the code. Also what a user at the shell runs into: damaged checkpoints, a
second Ctrl-C or a SIGTERM mid-save, a new run started over an unfinished one, divergence (a NaN/inf never reaches
the log or replaces the last good checkpoint). The data pipeline's own tests are in tests/test_data.py, those of
find_checkpoint's recovery and of read_log (runs.py) in tests/test_runs.py, the recipe's in tests/test_recipe.py.
Compares against: the unigram entropy of the training text (computed here); an uninterrupted run of the same
configuration (losses and final weights, bitwise); transformers' DeepseekV3ForCausalLM on a checkpoint train.py
wrote (logits, fp32, |Δ| <= 1e-4·max|logit|, as tests/test_hf_parity.py); hand-computed LR values.
Everything runs the `tiny` preset with a byte-level tokenizer built here (256 ranks + 256 specials = tiny's 512
vocab) on a ~120 KB slice of the default corpus (the standard library's source), so nothing is downloaded.
Run: pytest tests/test_train.py -q   (CPU, about a minute; `-m "not slow"` skips the two longest)
"""
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch

import model as M
import runs
import tokenizer as tk
import train
from conftest import ROOT, hf_available
from test_data import CONVS
from test_runs import DEAD, _fake_ckpt, _Killed

# One thread: the tiny model's ops are too small to split, and on a shared 2-core machine a second OpenMP thread
# made a step 50x slower (3.3 s vs 0.06 s, measured while other jobs ran).
TINY = ["--config", "tiny", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # Trainer sets the process-wide count; give the other test files theirs back
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# fixtures: a byte-level tokenizer, a corpus slice, one short pretraining run reused by several tests


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    tok_path = d / "bytes.tiktoken"
    tk.save_ranks({bytes([i]): i for i in range(256)}, tok_path)  # byte-level: ids = bytes, no merges
    corpus = d / "slice.py"
    corpus.write_text(tk.read_corpus(max_bytes=120_000), encoding="utf-8")  # first files of the stdlib, sorted
    return dict(dir=d, tok=tok_path, corpus=corpus, cache=d / "cache")


def flags(files, out, *extra):
    return [*TINY, "--tokenizer", str(files["tok"]), "--data", str(files["corpus"]), "--data-cache",
            str(files["cache"]), "--out", str(out), "--log-every", "1000", *map(str, extra)]


def make(files, out, *extra) -> train.Trainer:
    args, given = train.parse_args(flags(files, out, *extra))
    return train.Trainer(args, given)


def losses(log_path):
    _, recs = runs.read_log(log_path)
    return [(r["step"], r["loss"], r.get("val_loss")) for r in recs]


def main_fails(argv, capsys) -> tuple[int, str]:
    """train.main on a run that cannot start or go on: (exit status, what reached stderr). A
    SystemExit("error: ...") prints its message as one line to stderr and exits with status 1."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    code, err = exc.value.code, capsys.readouterr().err
    if isinstance(code, str):
        return 1, err + code + "\n"
    return code, err


@pytest.fixture(scope="module")
def pretrained(files):
    """6 steps of tiny with a fast-moving routing bias, so the checkpoint has a non-zero e_score_correction_bias."""
    out = files["dir"] / "pre"
    t = make(files, out, "--steps", 6, "--batch-size", 4, "--seq-len", 32, "--bias-update-speed", 0.05)
    assert t.run() == 0
    return out / "ckpt"


def test_lr_schedule_hand_computed():
    lr = lambda s: train.lr_at(s, total=100, peak=1.0, warmup_frac=0.1, decay_frac=0.3, final_frac=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(9) == 1.0  # warmup: (s+1)/10
    assert lr(10) == lr(50) == lr(69) == 1.0  # constant until step 70 = 100 - 30
    assert lr(70) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 30)))
    assert lr(84) == pytest.approx(0.55)  # halfway through the cosine: (peak + final) / 2
    assert lr(99) == pytest.approx(0.1)  # ends at 10% of the peak, K2's 2e-4 -> 2e-5
    decay = [lr(s) for s in range(70, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


# ----------------------------------------------------------------------------------------------------------------
# SFT: loss only on what the assistant wrote


def test_sft_run_from_jsonl_with_init(files, pretrained, tmp_path):
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": m, "tools": t}) + "\n" for m, t in CONVS))
    args, given = train.parse_args(["--threads", "1", "--sft", "--data", str(jsonl), "--init", str(pretrained),
                                    "--steps", "3", "--batch-size", "2", "--seq-len", "600", "--val-fraction", "0.1",
                                    "--out", str(tmp_path / "sft"), "--log-every", "1000",
                                    "--export", str(tmp_path / "demo"), "--export-dtype", "bf16"])
    t = train.Trainer(args, given)
    assert t.tokenizer_path == pretrained / "tiktoken.model"  # the tokenizer comes with the checkpoint
    assert t.data.n_val_convs == 1 and t.data.dropped == 0
    assert t.run() == 0
    recs = runs.read_log(tmp_path / "sft" / "log.jsonl")[1]
    assert len(recs) == 3 and "val_loss" in recs[-1]
    assert all(r["target_tokens"] < 2 * 601 for r in recs)  # only the supervised targets of 2 rows
    exported = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert exported == ["config.json", "model.safetensors", "tiktoken.model"]  # the model alone, as demo/ ships
    import generate
    model, _ = generate.load(tmp_path / "demo")
    trained = t.model.state_dict()
    assert all(torch.equal(v, trained[k].to(torch.bfloat16).float()) for k, v in model.state_dict().items()
               if not k.endswith("e_score_correction_bias"))


# ----------------------------------------------------------------------------------------------------------------
# the loop: learning, resume, checkpoints


@pytest.mark.slow
def test_tiny_model_beats_unigram_entropy(files, tmp_path):
    """200 steps of 8x64 bytes (~100K tokens) must get the validation loss clearly under the unigram entropy."""
    text = files["corpus"].read_bytes()
    counts = np.array(list(Counter(text).values()), dtype=np.float64)
    p = counts / counts.sum()
    entropy = float(-(p * np.log(p)).sum())  # nats per byte-token; 3.236 for this slice (Python 3.11 stdlib)
    t = make(files, tmp_path, "--steps", 200, "--batch-size", 8, "--seq-len", 64, "--eval-every", 100,
             "--save-every", 1000, "--val-fraction", 0.05)  # 6,000 held-out bytes
    assert t.run() == 0
    recs = runs.read_log(tmp_path / "log.jsonl")[1]
    first, val = recs[0]["loss"], recs[-1]["val_loss"]
    print(f"unigram entropy {entropy:.3f} nats; loss at step 1 {first:.3f}; val loss after 200 steps {val:.3f}")
    # observed (torch 2.13 CPU): entropy 3.236, step 1 6.260 (~ln 512), val 2.431: the model uses context, not
    # only frequencies. 0.4 nats of margin leaves room for other CPUs' kernels to take a slightly different path.
    assert val < entropy - 0.4, (val, entropy)


def test_resume_after_ctrl_c_is_bit_identical(files, tmp_path):
    # QK-Clip with a tau low enough to fire, the balance loss, accumulation: every piece of state must round-trip
    cfg = ("--steps", 10, "--batch-size", 2, "--seq-len", 32, "--grad-accum", 2, "--eval-every", 4, "--save-every", 3,
           "--qk-clip-tau", 0.05, "--seq-aux-alpha", 1e-4, "--bias-update-speed", 0.01)
    full = make(files, tmp_path / "full", *cfg)
    assert full.run() == 0

    def ctrl_c_after_step_5(trainer, rec):  # what a Ctrl-C between two steps does
        if trainer.step == 5:
            raise KeyboardInterrupt

    part = make(files, tmp_path / "part", *cfg)
    assert part.run(on_step=ctrl_c_after_step_5) == 130
    assert json.loads((tmp_path / "part/ckpt/trainer_state.json").read_text())["step"] == 5
    resumed = train.Trainer(*train.parse_args(["--resume", str(tmp_path / "part")]))
    assert resumed.step == 5
    # a second interruption, this time inside a forward pass: that step must be replayed, not skipped
    calls = []

    def ctrl_c_mid_forward(module, inputs):
        calls.append(1)
        if len(calls) == 3:  # step 7, second micro-batch
            raise KeyboardInterrupt
    handle = resumed.model.register_forward_pre_hook(ctrl_c_mid_forward)
    assert resumed.run() == 130
    handle.remove()
    assert resumed.step == 6
    again = train.Trainer(*train.parse_args(["--resume", str(tmp_path / "part")]))
    assert again.run() == 0

    want, got = losses(tmp_path / "full/log.jsonl"), losses(tmp_path / "part/log.jsonl")
    assert [s for s, _, _ in got] == list(range(1, 11))
    assert got == want  # losses and validation losses, exactly equal floats
    assert any(r["clipped_heads"] for r in runs.read_log(tmp_path / "full/log.jsonl")[1])  # QK-Clip really ran
    a = M.Transformer.from_pretrained(tmp_path / "full/ckpt").state_dict()
    b = M.Transformer.from_pretrained(tmp_path / "part/ckpt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings_and_plain_models(files, pretrained, tmp_path):
    run_dir = pretrained.parent
    with pytest.raises(ValueError, match="--lr"):
        train.Trainer(*train.parse_args(["--resume", str(run_dir), "--lr", "0.5"]))
    M.Transformer.from_pretrained(pretrained).save_pretrained(tmp_path / "model")  # weights only, no trainer state
    with pytest.raises(FileNotFoundError, match="--init"):
        train.Trainer(*train.parse_args(["--resume", str(tmp_path / "model")]))


def test_failed_save_keeps_the_last_checkpoint(files, tmp_path, monkeypatch):
    t = make(files, tmp_path, "--steps", 5, "--batch-size", 2, "--seq-len", 32, "--save-every", 2)

    def ctrl_c_after_step_2(trainer, rec):
        if trainer.step == 2:
            raise KeyboardInterrupt
    assert t.run(on_step=ctrl_c_after_step_2) == 130
    ckpt = tmp_path / "ckpt"
    good = {k: v.clone() for k, v in M.Transformer.from_pretrained(ckpt).state_dict().items()}
    t.train_step()  # step 3: the weights now differ from the checkpoint

    def crash(*_):  # dies inside save_pretrained's extra hook, after the weights were written to the temporary dir
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(t.opt, "state_dict", crash)
    with pytest.raises(OSError, match="simulated"):
        t.save()
    monkeypatch.undo()
    loaded = M.Transformer.from_pretrained(ckpt).state_dict()
    assert all(torch.equal(good[k], loaded[k]) for k in good)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2

    # a kill between save_pretrained's two renames (old moved aside, new not yet in place): the new copy was complete
    # (fsynced before the first rename), so --resume finishes that save and continues from step 3, not 2
    real_rename = os.rename

    def rename_then_die(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):
            raise SystemExit("killed (simulated)")
    monkeypatch.setattr(os, "rename", rename_then_die)
    with pytest.raises(SystemExit):
        t.save()
    monkeypatch.undo()
    assert not ckpt.exists()
    resumed = train.Trainer(*train.parse_args(["--resume", str(tmp_path)]))
    assert resumed.step == 3 and ckpt.exists()
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), t.model.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")) == []  # leftovers removed


# crash-safe checkpoints: a kill -9, a power loss or a full disk at any point of a save


def test_a_save_removes_what_killed_saves_left_but_not_a_live_ones(files, tmp_path):
    t = make(files, tmp_path, "--steps", 4, "--batch-size", 2, "--seq-len", 16, "--save-every", 2)
    t.train_step(), t.train_step()  # step 2 saved
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (DEAD[0], live.pid):  # a kill -9 during a save leaves its temporary copy, named by its pid
            _fake_ckpt(tmp_path / f".ckpt.tmp-{pid}", "partial")
        t.train_step(), t.train_step()  # step 4 saved
        # the dead process's copy is gone; the live one's is kept (it may be writing it right now)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")) == [f".ckpt.tmp-{live.pid}"]
    finally:
        live.kill()
        live.wait()
    assert json.loads((tmp_path / "ckpt/trainer_state.json").read_text())["step"] == 4


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the fsynced files through /proc")
def test_a_save_fsyncs_every_file_and_folder_before_each_rename(files, tmp_path, monkeypatch):
    t = make(files, tmp_path, "--steps", 4, "--batch-size", 2, "--seq-len", 16, "--save-every", 2)
    t.train_step(), t.train_step()  # step 2 saved: the next save replaces a checkpoint (two renames)
    t.train_step()
    events, real_fsync, real_rename = [], os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst, **kw):
        events.append(("rename", str(src), str(dst)))
        real_rename(src, dst, **kw)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    t.train_step()  # step 4 saved
    monkeypatch.undo()
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) == 2, events  # ckpt -> .ckpt.old-PID, then .ckpt.tmp-PID -> ckpt
    tmp = os.path.realpath(events[renames[1]][1])  # /proc names the files by their real paths
    synced = {e[1] for e in events[:renames[0]] if e[0] == "fsync"}
    written = {os.path.join(tmp, p.name) for p in (tmp_path / "ckpt").iterdir()}
    assert written | {tmp} <= synced, sorted(written | {tmp} - synced)  # the data, then the names, are on the disk
    parent = str(tmp_path.resolve())
    for i in renames:  # each rename reaches the disk before the next step (the second, or deleting the old copy)
        assert ("fsync", parent) in events[i + 1:i + 2], events[i:i + 2]


def _resume_dir_at_step_2(files, out, *extra):
    t = make(files, out, "--steps", 4, "--batch-size", 2, "--seq-len", 16, "--save-every", 2, *extra)

    def stop(trainer, rec):
        if trainer.step == 2:
            raise KeyboardInterrupt
    assert t.run(on_step=stop) == 130


def test_resume_after_a_kill_at_any_point_of_a_save_is_bit_identical(files, tmp_path, monkeypatch):
    cfg = ("--steps", 4, "--batch-size", 2, "--seq-len", 16, "--save-every", 2, "--eval-every", 2)
    full = make(files, tmp_path / "full", *cfg)
    assert full.run() == 0
    want = losses(tmp_path / "full/log.jsonl")
    want_weights = full.model.state_dict()
    # every call that changes what the disk holds, or makes it durable, during the step-4 save (which replaces the
    # step-2 checkpoint): a kill just before any one of them leaves the files that the snapshot copies
    ops = {name: getattr(os, name) for name in ("fsync", "rename", "replace", "unlink", "rmdir")}
    armed, seen = [], []

    def killing(name):
        def op(*args, **kw):
            if armed and not seen:  # seen: the snapshot copy itself is not counted
                armed[0] -= 1
                if armed[0] < 0:
                    seen.append(name)
                    shutil.copytree(tmp_path / "part", tmp_path / "snap", symlinks=True)
                    raise _Killed
            return ops[name](*args, **kw)
        return op
    for name in ops:
        monkeypatch.setattr(os, name, killing(name))

    kinds = []
    for k in range(100):
        shutil.rmtree(tmp_path / "part", ignore_errors=True)
        shutil.rmtree(tmp_path / "snap", ignore_errors=True)
        part = make(files, tmp_path / "part", *cfg)
        armed.clear(), seen.clear()

        def arm(trainer, rec):
            if trainer.step == 3:
                armed.append(k)  # the k-th operation of the next save is where the kill lands
        try:
            part.run(on_step=arm)
        except _Killed:
            pass
        if not seen:  # k is past the save's last operation: every kill point was tried
            break
        kinds.append(seen[0])
        armed.clear()
        again = train.Trainer(*train.parse_args(["--resume", str(tmp_path / "snap"), "--threads", "1"]))
        assert again.step in (2, 4), (k, seen)  # the old checkpoint, or the new one when the save got far enough
        assert again.run() == 0
        assert losses(tmp_path / "snap/log.jsonl") == want, (k, seen)
        got = M.Transformer.from_pretrained(tmp_path / "snap/ckpt").state_dict()
        assert all(torch.equal(got[n], want_weights[n]) for n in got), (k, seen)
        assert not [p for p in os.listdir(tmp_path / "snap") if p.startswith(".ckpt")], (k, seen)  # cleaned up
    assert {"fsync", "rename", "unlink", "rmdir"} <= set(kinds), kinds  # each step of the save was interrupted


@pytest.mark.parametrize("where", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoint(files, tmp_path, monkeypatch, capsys, where):
    from safetensors import SafetensorError
    import safetensors.torch

    _resume_dir_at_step_2(files, tmp_path)
    capsys.readouterr()
    if where == "model.safetensors":  # what safetensors raised when a 1 MiB tmpfs filled up
        def save_file(*_, **__):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    elif where == "optimizer.pt":  # what torch.save raised there (no errno: the disk's free space says it)
        def save(*_, **__):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(train.torch, "save", save)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    else:
        real_write_text = type(tmp_path).write_text

        def write_text(self, *a, **kw):
            if self.name == "trainer_state.json":
                raise OSError(28, "No space left on device", str(self))
            return real_write_text(self, *a, **kw)
        monkeypatch.setattr(type(tmp_path), "write_text", write_text)
    code, err = main_fails(["--resume", str(tmp_path), "--threads", "1"], capsys)
    assert code == 1  # step 4's save fails
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    ckpt = tmp_path / "ckpt"
    assert f"cannot save {ckpt}: the disk is full" in err and "the previous version there is intact" in err, err
    assert f"continue from step 2 with `python train.py --resume {tmp_path}`" in err, err
    monkeypatch.undo()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    M.Transformer.from_pretrained(ckpt)  # complete and loadable
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")) == []  # no partial copy left


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["args"].update(lr=-1), "its saved --lr -1 is out of range (must be > 0 and finite)"),  # trained
    (lambda s: s.update(step="abc"), "step is 'abc', expected a whole number >= 0"),  # was a TypeError
    (lambda s: s["args"].update(steps="10"), "args.steps is '10', expected a whole number"),
    (lambda s: s["args"].update(optimizer="sgd"), "args.optimizer is 'sgd', expected one of muonclip, muon, adamw"),
    (lambda s: s["args"].update(sft="yes"), "args.sft is 'yes', expected true or false"),
    (lambda s: s["args"].update(warmup_frac=0.9), "--warmup-frac 0.9 + --decay-frac 0.355 > 1"),
    (lambda s: s.update(tokens_seen=-5), "tokens_seen is -5, expected a whole number >= 0"),
])
def test_resume_revalidates_the_saved_state_and_flags(pretrained, tmp_path, capsys, edit, message):
    def damage(ckpt):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        edit(state)
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    run = _damaged(pretrained.parent, tmp_path, damage)
    code, err = main_fails(["--resume", str(run), "--threads", "1"], capsys)
    assert code == 1
    assert err.startswith(f"error: {run / 'ckpt' / 'trainer_state.json'}: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_saves_and_exits_cleanly(files, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *flags(files, tmp_path, "--steps", 100000, "--batch-size", 2,
                                                          "--seq-len", 32, "--save-every", 100000)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or log.read_text().count('"loss"') < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted: saved step" in out and "Traceback" not in out
    state = json.loads((tmp_path / "ckpt/trainer_state.json").read_text())
    assert state["step"] >= 3 and state["step"] == losses(log)[-1][0]  # the log ends at the saved step


# ----------------------------------------------------------------------------------------------------------------
# what a checkpoint is for


@hf_available
def test_checkpoint_loads_in_transformers_with_equal_logits(pretrained):
    from transformers import DeepseekV3ForCausalLM

    ours = M.Transformer.from_pretrained(pretrained).eval()
    bias = ours.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().max() > 0.04  # trained bias (speed 0.05): parity covers it
    hf = DeepseekV3ForCausalLM.from_pretrained(pretrained, attn_implementation="eager").eval()
    ids = torch.randint(0, 512, (2, 80), generator=torch.Generator().manual_seed(0))  # 80 > 64: YaRN range in play
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-4 * scale, f"max |diff| {err:.3e} vs logit scale {scale:.3e}"


def test_checkpoint_works_with_generate(pretrained):
    import generate
    model, tok = generate.load(pretrained)
    prompt = torch.tensor([tok.encode("def ")])
    out = list(generate.generate_tokens(model, prompt, 5, temperature=0.0))
    assert len(out) == 5


def test_plot_writes_png(files, pretrained, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "c.png"
    assert train.main(["plot", str(pretrained.parent), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------------
# errors and flags


@pytest.mark.parametrize("bad, message, expected_code", [
    (["--data", "/nonexistent/corpus"], "does not exist", 1),
    (["--seq-len", 4096], "max_position_embeddings", 1),
    (["--seq-len", 2000], "needs at least 2001 tokens", 1),  # 1% of the 120 KB slice: 1,200 validation tokens
    (["--tokenizer", str(tk.DEMO_RANK_FILE)], "vocab_size=512", 1),
    (["--val-fraction", 1.5], "val-fraction", 2),
    (["--val-batches", 0], "--val-batches 0 is out of range", 2),  # used to end the run in a 0/0 at its first eval
    (["--data-max-bytes", -5], "--data-max-bytes -5", 2),  # used to train on all but the last 5 bytes
    (["--warmup-frac", -1], "--warmup-frac -1.0", 2),
    (["--final-lr-frac", -1], "--final-lr-frac -1.0", 2),  # used to end the schedule at lr = -peak
    (["--weight-decay", -0.1], "--weight-decay -0.1", 2),
    (["--grad-clip", -1], "--grad-clip -1.0", 2),  # used to mean "off" silently
    (["--bias-update-speed", -1], "--bias-update-speed -1.0", 2),
    (["--lr", "inf"], "must be > 0 and finite", 2),
    (["--threads", -1], "--threads -1", 2),  # used to be a RuntimeError traceback from torch.set_num_threads
    (["--device", "foo"], "--device 'foo' is not a device name", 1),  # used to be torch's RuntimeError traceback
])
def test_bad_inputs_are_clear_errors(files, tmp_path, bad, message, expected_code, capsys):
    argv = flags(files, tmp_path, "--steps", 1)
    for flag, value in zip(bad[::2], bad[1::2]):
        i = argv.index(flag) if flag in argv else None
        if i is None:
            argv += [flag, str(value)]
        else:
            argv[i + 1] = str(value)
    code, err = main_fails(argv, capsys)
    assert code == expected_code
    # a bad flag is argparse's usage error (exit 2); a run that cannot start is one line (exit 1)
    assert err.startswith("error: " if code == 1 else "usage: ") and message in err, err
    assert "Traceback" not in err and (code == 2 or err.count("\n") == 1), err


def test_empty_corpus_is_a_clear_error(files, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    argv = flags(files, tmp_path, "--steps", 1)
    argv[argv.index("--data") + 1] = str(empty)
    code, err = main_fails(argv, capsys)
    assert code == 1 and "corpus is empty" in err


def test_a_model_too_big_for_the_machine_is_refused_before_allocating(files, tmp_path, monkeypatch, capsys):
    real = M.Transformer

    def transformer(args):  # shapes on the meta device are free; real memory for K2 would take down the machine
        if torch.get_default_device().type != "meta":
            pytest.fail(f"train.py allocated a {args.num_hidden_layers}-layer model on a real device")
        return real(args)
    monkeypatch.setattr(M, "Transformer", transformer)
    code, err = main_fails(flags(files, tmp_path, "--config", "kimi-k2"), capsys)
    assert code == 1  # the later --config wins
    assert "--config kimi-k2 has 1,026.41B parameters: training needs about" in err, err


def test_nonfinite_loss_stops_with_the_step_and_advice(files, tmp_path):
    t = make(files, tmp_path, "--steps", 3, "--batch-size", 2, "--seq-len", 16, "--optimizer", "adamw")
    t.train_step()
    with torch.no_grad():
        t.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(train.TrainingError, match=r"step 2: loss is nan.*lower --lr.*--optimizer muonclip"):
        t.train_step()


def test_cli_flags_reach_the_optimizer_and_the_model(files, tmp_path):
    t = make(files, tmp_path, "--optimizer", "adamw", "--lr", 3e-3, "--weight-decay", 0.05, "--steps", 40,
             "--warmup-frac", 0.25, "--batch-size", 2, "--seq-len", 16, "--grad-accum", 3, "--seq-aux-alpha", 1e-4)
    assert [g["use_muon"] for g in t.opt.param_groups] == [False]  # AdamW really gets every parameter
    assert all(g["weight_decay"] == 0.05 for g in t.opt.param_groups) and t.opt.qk_clip_tau is None
    assert all(m.seq_aux_alpha == 1e-4 for m in t.moes) and t.moes
    rec = t.train_step()
    assert rec["lr"] == pytest.approx(3e-3 / 10) and t.opt.param_groups[0]["lr"] == rec["lr"]  # warmup: 1/10 of peak
    assert rec["tokens"] == 3 * 2 * 16 and "aux_loss" in rec
    assert len(rec["max_logit"]) == 2 and len(rec["load_maxvio"]) == 1  # per layer: 2 attention, 1 MoE (tiny)

    t = make(files, tmp_path, "--qk-clip-tau", 42, "--bias-update-speed", 0.01, "--bias-update-rule", "moonlight")
    assert t.opt.qk_clip_tau == 42 and t.opt.bias_update_speed == 0.01 and t.opt.bias_update_rule == "moonlight"
    assert sorted(g["use_muon"] for g in t.opt.param_groups) == [False, True]
    assert make(files, tmp_path, "--optimizer", "muon").opt.qk_clip_tau is None


# ----------------------------------------------------------------------------------------------------------------
# adversarial use from the shell: paths, damaged checkpoints, signals, divergence


def _damaged(run_dir, tmp_path, damage):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    damage(dst / "ckpt")
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "trainer_state.json").write_text("{"), "trainer_state.json is damaged"),
    (lambda c: (c / "trainer_state.json").write_text(json.dumps(
        {k: v for k, v in json.loads((c / "trainer_state.json").read_text()).items() if k != "data_state"})),
     "lacks data_state"),
    (lambda c: (c / "optimizer.pt").unlink(), "has no optimizer.pt"),
    (lambda c: os.truncate(c / "optimizer.pt", 1000), "optimizer.pt is damaged"),
    (lambda c: os.truncate(c / "model.safetensors", 1000), "cannot read the checkpoint"),
    (lambda c: (c / "config.json").write_text("{"), "config.json is not a JSON config"),
])
def test_resume_from_a_damaged_checkpoint_is_a_clear_error(pretrained, tmp_path, capsys, damage, message):
    run = _damaged(pretrained.parent, tmp_path, damage)  # each used to be a traceback (KeyError, SafetensorError, ...)
    code, err = main_fails(["--resume", str(run), "--threads", "1"], capsys)
    assert code == 1
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_resume_checks_steps_and_keeps_the_log_valid(pretrained, tmp_path, capsys):
    run = _damaged(pretrained.parent, tmp_path, lambda c: None)
    code, err = main_fails(["--resume", str(run), "--steps", "3"], capsys)
    assert code == 1  # the checkpoint is at step 6
    assert "--steps 3 is below the checkpoint's step 6" in err
    log = run / "log.jsonl"
    log.write_bytes(log.read_bytes().split(b"\n")[0])  # the config line alone, its newline cut off
    t = train.Trainer(*train.parse_args(["--resume", str(run), "--steps", "7"]))
    assert t.run() == 0  # shorter than at the checkpoint: truncate() used to pad the log with NUL bytes
    assert b"\0" not in log.read_bytes()
    assert [r["step"] for r in runs.read_log(log)[1]] == [7]  # and the new records start lines of their own


def test_resume_uses_the_checkpoints_tokenizer_when_the_original_moved(files, tmp_path):
    tok = tmp_path / "moved.tiktoken"
    shutil.copyfile(files["tok"], tok)
    t = make(files, tmp_path / "run", "--tokenizer", tok, "--steps", 4, "--batch-size", 2, "--seq-len", 16)

    def stop(trainer, rec):
        if trainer.step == 2:
            raise KeyboardInterrupt
    assert t.run(on_step=stop) == 130
    tok.unlink()  # the run's --tokenizer file is gone; ckpt/tiktoken.model is the same bytes
    resumed = train.Trainer(*train.parse_args(["--resume", str(tmp_path / "run")]))
    assert resumed.tokenizer_path == tmp_path / "run" / "ckpt" / "tiktoken.model" and resumed.run() == 0


def test_a_new_run_never_overwrites_an_unfinished_one(files, tmp_path, capsys):
    t = make(files, tmp_path, "--steps", 5, "--batch-size", 2, "--seq-len", 16)

    def stop(trainer, rec):
        if trainer.step == 2:
            raise KeyboardInterrupt
    assert t.run(on_step=stop) == 130
    log = (tmp_path / "log.jsonl").read_bytes()
    # retyping the first command instead of adding --resume used to wipe the log at once and the checkpoint later
    code, err = main_fails(flags(files, tmp_path, "--steps", 5, "--batch-size", 2, "--seq-len", 16),
                           capsys)
    assert code == 1 and "holds an unfinished run (saved at step 2 of 5)" in err
    assert (tmp_path / "log.jsonl").read_bytes() == log
    # while a run holds the folder, a second one is refused before it writes anything
    holder = open(tmp_path / ".lock", "a+")
    try:
        runs.fcntl.flock(holder, runs.fcntl.LOCK_EX | runs.fcntl.LOCK_NB)
        resumed = train.Trainer(*train.parse_args(["--resume", str(tmp_path)]))
        with pytest.raises(ValueError, match="in use by another train.py run"):
            resumed.run()
        assert (tmp_path / "log.jsonl").read_bytes() == log
    finally:
        holder.close()
    assert resumed.run() == 0  # the lock is gone with its holder


def _signal_during_save(monkeypatch, sig):
    """Once `armed` is non-empty, the next checkpoint save sends `sig` to this process half-way (while it writes
    optimizer.pt), as a real Ctrl-C or `kill` would arrive. Returns (armed, sent)."""
    real_save = torch.save
    armed, sent = [], []

    def save(obj, f, *args, **kw):
        if armed and not sent and str(f).endswith("optimizer.pt"):
            sent.append(sig)
            os.kill(os.getpid(), sig)
        return real_save(obj, f, *args, **kw)
    monkeypatch.setattr(train.torch, "save", save)
    return armed, sent


def test_second_ctrl_c_during_the_interrupt_save_still_says_where(files, tmp_path, monkeypatch, capsys):
    t = make(files, tmp_path, "--steps", 50, "--batch-size", 2, "--seq-len", 16, "--save-every", 1000)
    armed, sent = _signal_during_save(monkeypatch, signal.SIGINT)

    def first_ctrl_c(trainer, rec):
        if trainer.step == 2:
            armed.append(True)  # the save the interrupt starts receives a second Ctrl-C
            raise KeyboardInterrupt
    try:
        code = t.run(on_step=first_ctrl_c)
    except KeyboardInterrupt:  # caught here: escaping, it would end the whole pytest session
        pytest.fail("the second Ctrl-C escaped Trainer.run, so the user was not told where the checkpoint is")
    assert code == 130 and sent == [signal.SIGINT]
    out = capsys.readouterr().out
    assert f"interrupted: saved step 2 to {tmp_path / 'ckpt'}" in out, out  # used to end with a bare "interrupted"
    assert json.loads((tmp_path / "ckpt/trainer_state.json").read_text())["step"] == 2
    M.Transformer.from_pretrained(tmp_path / "ckpt")  # complete and loadable


def test_sigterm_saves_and_stops_like_ctrl_c(files, tmp_path, monkeypatch):
    received = []
    old = signal.signal(signal.SIGTERM, lambda *_: received.append(1))  # if train.py ignored SIGTERM, not a kill
    try:
        t = make(files, tmp_path, "--steps", 50, "--batch-size", 2, "--seq-len", 16, "--save-every", 2)
        armed, sent = _signal_during_save(monkeypatch, signal.SIGTERM)
        armed.append(True)  # `kill PID` arrives in the middle of the step-2 checkpoint: it completes, the run stops
        try:
            code = t.run()
        except KeyboardInterrupt:
            pytest.fail("SIGTERM escaped Trainer.run as a KeyboardInterrupt")
        assert code == 130 and sent == [signal.SIGTERM] and not received
    finally:
        signal.signal(signal.SIGTERM, old)
    assert json.loads((tmp_path / "ckpt/trainer_state.json").read_text())["step"] == 2
    assert losses(tmp_path / "log.jsonl")[-1][0] == 2


def test_divergence_never_replaces_the_last_good_checkpoint(files, tmp_path):
    t = make(files, tmp_path / "a", "--steps", 10, "--batch-size", 2, "--seq-len", 16, "--eval-every", 1)
    t.evaluate = lambda: float("nan")  # a validation loss that overflowed: it used to go into the log as NaN
    with pytest.raises(train.TrainingError, match=r"step 1: the validation loss is nan.*no checkpoint of this run"):
        t.train_step()
    assert "NaN" not in (tmp_path / "a/log.jsonl").read_text() if (tmp_path / "a/log.jsonl").exists() else True
    t = make(files, tmp_path / "b", "--steps", 10, "--batch-size", 2, "--seq-len", 16, "--save-every", 2,
             "--optimizer", "adamw")
    t.train_step(), t.train_step()  # step 2 saved
    good = M.Transformer.from_pretrained(tmp_path / "b/ckpt").state_dict()
    t.train_step()
    real_step = t.opt.step

    def overflowing_step():  # an update that overflows the weights (a huge lr, a loss spike)
        real_step()
        with torch.no_grad():
            t.model.lm_head.weight[0, 0] = float("inf")
    t.opt.step = overflowing_step
    with pytest.raises(train.TrainingError, match=r"step 4: the update made lm_head.weight non-finite.*"
                                                  r"last good checkpoint, step 2"):
        t.train_step()  # step 4 would save: it used to write the inf weights over the step-2 checkpoint
    loaded = M.Transformer.from_pretrained(tmp_path / "b/ckpt").state_dict()
    assert all(torch.equal(good[k], loaded[k]) for k in good)
    assert json.loads((tmp_path / "b/ckpt/trainer_state.json").read_text())["step"] == 2


def test_plot_without_matplotlib_fails_before_training(files, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, err = main_fails(flags(files, tmp_path, "--steps", 1, "--plot"), capsys)
    assert code == 1
    assert "--plot needs matplotlib" in err and not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("content, message", [
    ([{"role": "bot", "content": "x"}], ":3: messages[0] has unknown role 'bot'"),
    ([{"role": "user", "content": "only a question"}], "1 have no assistant reply to train on"),
])
def test_sft_jsonl_problems_name_the_line_or_the_reason(files, tmp_path, capsys, content, message):
    good = json.dumps({"messages": CONVS[0][0]}) + "\n"
    jsonl = tmp_path / "chats.jsonl"

    def sft(data):
        return main_fails([*TINY, "--tokenizer", str(files["tok"]), "--sft", "--data", str(data), "--steps",
                           "1", "--out", str(tmp_path / "o"), "--seq-len", "600", "--val-fraction", "0.3"],
                          capsys)
    jsonl.write_text(good + good + json.dumps({"messages": content}) + "\n")
    code, err = sft(jsonl)
    assert code == 1
    assert err.startswith("error: ") and message in err, err
    jsonl.write_bytes(good.encode() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')  # Latin-1
    code, err = sft(jsonl)
    assert code == 1 and "chats.jsonl is not UTF-8 text" in err  # was: no file name
    code, err = sft(tmp_path)
    assert code == 1 and "is a folder" in err  # was: "does not exist"
