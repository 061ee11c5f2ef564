"""Protects runs.py, a training run on disk: finding a checkpoint after a kill at any point of a
save or of its recovery (the newest complete version, every leftover removed), and reading a
log.jsonl (a bad line named, a line cut off mid-write skipped). What train.py does with them end to
end (resume, the lock, Ctrl-C and SIGTERM, damaged checkpoints, `train.py plot`) is tested through
train.py's command line in tests/test_train.py.
Compares against: checkpoint folders and logs written here, labelled so that the one picked shows.
Run: pytest tests/test_runs.py -q   (CPU, seconds)
"""
import json
import os
import shutil

import pytest

import model as M
import runs
import train

# crash-safe checkpoints: a kill -9 or a power loss at any point of a save or of its recovery

# above Linux's PID_MAX_LIMIT (2**22): never a live process's id
DEAD = (9_876_543, 19_290_000, 5_000_001)


def _fake_ckpt(path, label, mtime=None):
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "label").write_text(label)
    if mtime is not None:
        os.utime(path / "config.json", (mtime, mtime))


class _Killed(BaseException):
    """A kill -9 at one point of a save, simulated: the files on disk at that instant are copied
    aside first."""


@pytest.mark.parametrize("on_disk, restored", [
    # the campaign's case: a stale copy of an older save (the 9876 sorts after 19290 as text)
    # beside the pair of the save killed between its renames; the newest complete version is that
    # save's new copy
    ([f"old-{DEAD[0]}", f"old-{DEAD[1]}", f"tmp-{DEAD[1]}"], f"tmp-{DEAD[1]}"),
    # killed while writing; while deleting the old copy
    (["ckpt", f"tmp-{DEAD[0]}", f"old-{DEAD[1]}"], "ckpt"),
    # the first save, killed while writing it: nothing to resume
    ([f"tmp-{DEAD[0]}"], None),
    # moved by hand: the newest config.json wins
    ([f"old-{DEAD[0]}", f"old-{DEAD[1]}"], f"old-{DEAD[0]}"),
])
def test_find_checkpoint_picks_the_newest_complete_version_and_removes_leftovers(
        tmp_path, on_disk, restored):
    for i, name in enumerate(on_disk):
        path = tmp_path / (name if name == "ckpt" else f".ckpt.{name}")
        # listed newest first
        _fake_ckpt(path, name, mtime=2_000_000_000 - i)
    # a reader that changes nothing (generate.py) names the leftovers
    if "ckpt" not in on_disk:
        with pytest.raises(FileNotFoundError, match=r"a save was interrupted and left \.ckpt\."):
            M.Transformer.from_pretrained(tmp_path / "ckpt")
    if restored is None:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            runs.find_checkpoint(tmp_path)
    else:
        assert (runs.find_checkpoint(tmp_path) / "label").read_text() == restored
    # every leftover removed
    assert sorted(os.listdir(tmp_path)) == ([] if restored is None else ["ckpt"])


def test_a_kill_during_the_recovery_leaves_a_state_the_next_recovery_finishes(tmp_path,
                                                                             monkeypatch):
    ops = {name: getattr(os, name) for name in ("fsync", "rename", "unlink", "rmdir")}
    # kill before the k-th operation of recovering a save killed between its renames
    for k in range(100):
        run, snap = tmp_path / f"run{k}", tmp_path / f"snap{k}"
        run.mkdir()
        _fake_ckpt(run / f".ckpt.old-{DEAD[0]}", "old")
        _fake_ckpt(run / f".ckpt.tmp-{DEAD[0]}", "new")
        count = []

        def killing(name):
            def op(*args, **kw):
                count.append(name)
                if len(count) == k + 1:
                    shutil.copytree(run, snap)
                    raise _Killed
                return ops[name](*args, **kw)
            return op
        for name in ops:
            monkeypatch.setattr(os, name, killing(name))
        try:
            runs.find_checkpoint(run)
        except _Killed:
            pass
        monkeypatch.undo()
        # k is past the recovery's last operation
        if not snap.exists():
            break
        assert (runs.find_checkpoint(snap) / "label").read_text() == "new", (k, count)
        assert os.listdir(snap) == ["ckpt"], (k, count)
    # rename, fsync, and deleting old-P's files and folder were each interrupted
    assert k >= 5


# reading a log


def test_read_log_names_bad_lines_and_skips_a_cut_off_last_one(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    good = json.dumps({"step": 1, "loss": 2.0}) + "\n"
    # a run writing (or killed while writing) its last line
    log.write_text(good + '{"step": 2, "lo')
    assert [r["step"] for r in runs.read_log(log)[1]] == [1]
    log.write_text(good + "garbage\n" + good)
    with pytest.raises(ValueError, match=r"log.jsonl:2 is not a train.py log line"):
        runs.read_log(log)
    capsys.readouterr()
    # SystemExit("error: ..."): one line on stderr, exit status 1
    with pytest.raises(SystemExit) as exc:
        train.main(["plot", str(log), "--out", str(tmp_path / "c.png")])
    code, err = exc.value.code, capsys.readouterr().err
    if isinstance(code, str):
        code, err = 1, err + code + "\n"
    assert code == 1 and "log.jsonl:2" in err
