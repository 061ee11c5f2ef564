"""Protects the CPU thread count of every entry point: `--threads N` reaches torch inside the run (generate.py,
serve.py's worker thread, chat_data.py eval, train.py), and the automatic default (0) leaves out the cores other
processes are busy on and respects a cgroup CPU quota (runtime.set_threads / busy_cores / cpu_quota).
Compares against: torch.get_num_threads() read inside the model's forward (the thread that really runs it), a real
busy process pinned to one of this process's cores, and the rule cores - busy written out by hand.
Run: pytest tests/test_threads.py -q   (CPU, a few seconds)"""
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch

import chat_data as C
import generate as G
import model as M
import runtime
import serve
import tokenizer as tk
import train

ASKED = 3  # neither torch's default on a 2-core machine nor what the automatic rule can pick there


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # the entry points set the process-wide count; give the other tests theirs back
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def seen(monkeypatch) -> list[int]:
    """torch.get_num_threads() at every forward of any model, in whatever thread runs it."""
    seen: list[int] = []
    forward = M.Transformer.forward

    def spy(self, *args, **kw):
        seen.append(torch.get_num_threads())
        return forward(self, *args, **kw)

    monkeypatch.setattr(M.Transformer, "forward", spy)
    return seen


def test_generate_honours_threads(seen):
    G.main(["--threads", str(ASKED), "--prompt", "hi", "--max-new-tokens", "2"])
    assert seen and set(seen) == {ASKED}


def test_chat_data_eval_honours_threads(seen):
    assert C.main(["eval", "-n", "1", "--threads", str(ASKED)]) == 0
    assert seen and set(seen) == {ASKED}


def _tiny_run(tmp_path, *flags: str) -> list[str]:
    tok = tmp_path / "bytes.tiktoken"
    tk.save_ranks({bytes([i]): i for i in range(256)}, tok)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    return ["--config", "tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--val-batches", "1",
            "--tokenizer", str(tok), "--data", str(corpus), "--data-cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "run"), *flags]


def test_train_honours_threads(seen, tmp_path):
    assert train.main(_tiny_run(tmp_path, "--threads", str(ASKED))) == 0
    assert seen and set(seen) == {ASKED}


def test_train_resume_keeps_the_automatic_count(seen, tmp_path, monkeypatch):
    """The count the automatic default chose is saved with the run, so a resume computes with the same count
    (bit-identical losses) even if the machine got busier in between."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    monkeypatch.setattr(runtime, "cpu_quota", lambda: None)
    monkeypatch.setattr(runtime, "busy_cores", lambda cpus: (0.0, "stub: an idle machine"))
    assert train.main(_tiny_run(tmp_path)) == 0
    assert set(seen) == {cores}
    seen.clear()
    monkeypatch.setattr(runtime, "busy_cores", lambda cpus: (cores - 1.0, "stub: a busy machine"))  # auto would pick 1
    assert train.main(["--resume", str(tmp_path / "run"), "--steps", "2"]) == 0
    assert seen and set(seen) == {cores}


def test_serve_honours_threads_in_its_worker_thread(seen, monkeypatch):
    """The model runs in serve.py's worker thread, not the one that parsed the flags: the count must reach it."""
    answers = []

    def serve_one_request(self):  # instead of serving forever: one request from a client thread, then shut down
        def client():
            body = json.dumps({"model": serve.DEFAULT_MODEL_NAME, "max_tokens": 2,
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            req = urllib.request.Request(self.url + "/chat/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                answers.append(json.loads(r.read()))
            self.shutdown()
        threading.Thread(target=client, daemon=True).start()
        original(self)

    original = serve.ChatServer.serve_forever
    monkeypatch.setattr(serve.ChatServer, "serve_forever", serve_one_request)
    old_handler = signal.getsignal(signal.SIGTERM)
    try:
        serve.main(["--threads", str(ASKED), "--port", "0"])
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    assert answers and answers[0]["choices"][0]["message"]["role"] == "assistant"
    assert seen and set(seen) == {ASKED}


def test_automatic_count_leaves_out_busy_cores(monkeypatch):
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "cpu_quota", lambda: None)
    for busy in (0.0, 0.4, 1.0, 1.6, len(cpus) + 3.0):
        monkeypatch.setattr(runtime, "busy_cores", lambda cpus, busy=busy: (busy, "stub"))
        n, why = runtime.set_threads(0)
        assert n == max(1, len(cpus) - round(busy)) == torch.get_num_threads(), (busy, n)
        assert f"{busy:.1f} busy" in why
    monkeypatch.setattr(runtime, "busy_cores", lambda cpus: (0.0, "stub"))
    for quota, expect in ((None, len(cpus)), (0.5, 1), (1.0, 1), (1.5, 1), (64.0, len(cpus))):  # docker --cpus
        monkeypatch.setattr(runtime, "cpu_quota", lambda quota=quota: quota)
        assert runtime.set_threads(0)[0] == min(expect, len(cpus)) == torch.get_num_threads(), quota
    monkeypatch.setenv("OMP_NUM_THREADS", str(ASKED))  # torchrun sets it (to 1) for its ranks: it wins
    assert runtime.set_threads(0) == (ASKED, f"OMP_NUM_THREADS={ASKED}") and torch.get_num_threads() == ASKED
    assert runtime.set_threads(2)[0] == 2 == torch.get_num_threads()  # an explicit count wins over everything


@pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"),
                    reason="busy_cores reads Linux's /proc/stat")
def test_busy_cores_sees_a_real_busy_process():
    """A busy loop pinned to one of our cores is at least ~one busy core (other jobs can only add to it)."""
    cpu = min(os.sched_getaffinity(0))
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        busy, how = runtime.busy_cores({cpu}, seconds=0.3)  # the loop's core alone: it is ~fully busy
        assert busy >= 0.7 and "/proc/stat" in how, busy
    finally:
        loop.kill()
        loop.wait(timeout=10)


def test_cpu_quota_reads_cgroup_v2(tmp_path):
    f = tmp_path / "cpu.max"
    for text, quota in (("200000 100000\n", 2.0), ("50000 100000\n", 0.5), ("max 100000\n", None), ("", None)):
        f.write_text(text)
        assert runtime.cpu_quota(f) == quota, text
    assert runtime.cpu_quota(tmp_path / "missing") is None


def test_threads_flag_rejects_negative_counts(capsys):
    for main, argv in ((G.main, ["--threads", "-1"]), (serve.main, ["--threads", "-2"]),
                       (C.main, ["eval", "--threads", "-1"])):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and "--threads" in capsys.readouterr().err
