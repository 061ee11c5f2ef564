"""A bounded fault campaign: does serve.py keep serving under malformed requests and an idle-socket
flood, and does a train.py run survive kill -9 in the middle of a checkpoint save? Prints one table;
asserts nothing.

    python bench/bench_faults.py                            # about a minute on 2 shared CPU cores
    python bench/bench_faults.py --requests 1000 --idle 800 --max-connections 128 --kills 20

1. Fuzz. A real `python serve.py` (a random-weight `tiny` model saved with the shipped tokenizer, on
   a free 127.0.0.1 port) gets --requests requests, each a valid chat request spoiled one way,
   chosen by a seeded RNG: a field set to a value of the wrong kind, a message spoiled, bytes of the
   JSON flipped or cut, hostile JSON (deep nesting, 5,000-digit integers, NaN), or the HTTP around
   it spoiled (Content-Length, Transfer-Encoding, chunk sizes, Host, Origin, Content-Type, the
   request line). Each is sent on its own connection and must be answered: "served" counts answers
   that are not a 500 (an error in OpenAI's shape, a 200 for the few spoilings that are still valid,
   http.server's own 400/414/431 for a broken request line or header block), within 10 s. Every 50
   requests, and at the end, a normal request must still get its 200.
2. Idle-socket flood. The server runs with --max-connections (64 here, below --idle). --idle
   connections (below the file-descriptor limit) are opened and left idle: a third send nothing, a
   third half a request line, a third a whole header block and one byte of a declared 1,000-byte
   body. With all of them open a normal request is timed; the server's resident memory (VmRSS, and
   VmHWM, the peak of the whole run) and thread count are read from /proc, and the idle sockets the
   server closed to stay within its cap are counted.
3. kill -9 during a save. `python train.py --config tiny` (a byte-level tokenizer and a slice of the
   default corpus, --save-every 1) is started, and killed with SIGKILL as soon as a checkpoint save
   has begun (its `.ckpt.tmp-PID` folder appears; the first save of the run is let through, so that
   there is a checkpoint to lose), after a random 0-3 ms so kills land at different points of the
   save; then `--resume` on the same run must load and save again before it is killed in turn; the
   last one is stopped with SIGTERM. "resumable" counts the kills after which --resume got as far as
   its next save.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

# scripts named bench_* shadow no project module; import the project's modules from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]  # the repository root
CHAT = {"model": "kimi-k2-instruct", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4}
FIELDS = ["model", "messages", "temperature", "top_p", "max_tokens", "stop", "seed", "n", "stream",
          "stream_options", "tools", "tool_choice", "logit_bias", "response_format", "top_k",
          "continue_final_message", "repetition_penalty", "parallel_tool_calls", "frobnicate"]
VALUES = [None, True, -1, 0, 0.5, 1e308, 10 ** 50, 2 ** 64, "x", "", [], {}, [1, 2], {"a": 1},
          "\x00\x1b[31m", "<|im_end|>", ["a"] * 10, [str(i) for i in range(1000)],
          {"type": "function"}, [{"name": "f"}]]


# --------------------------------------------------------------------------------------------------
# 1. Fuzzed requests


def request(body: bytes, headers: dict | None = None,
            line: str = "POST /v1/chat/completions HTTP/1.1", port: int = 0) -> bytes:
    h = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json",
         "Content-Length": str(len(body)), **(headers or {})}
    head = "".join(f"{k}: {v}\r\n" for k, v in h.items() if v is not None)
    return (line + "\r\n" + head + "\r\n").encode("latin-1") + body


def spoiled(rng: random.Random, port: int) -> tuple[str, bytes]:
    """One spoiled request: (what kind of spoiling, the bytes to send)."""
    body = dict(CHAT)
    kind = rng.choice(["field", "message", "bytes", "json", "length", "chunked", "headers", "line"])
    if kind == "field":
        body[rng.choice(FIELDS)] = rng.choice(VALUES)
        return kind, request(json.dumps(body).encode(), port=port)
    if kind == "message":
        m = {"role": rng.choice(["user", "system", "assistant", "tool", "developer", "wizard", 5,
                                 None]),
             rng.choice(["content", "tool_calls", "tool_call_id", "name", "partial"]):
                 rng.choice(VALUES)}
        body["messages"] = rng.choice([[m], [{"role": "user", "content": "hi"}, m], m, [m] * 3])
        return kind, request(json.dumps(body).encode(), port=port)
    if kind == "bytes":
        raw = bytearray(json.dumps(body).encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return kind, request(bytes(raw[:rng.randint(1, len(raw))] if rng.random() < 0.3 else raw),
                             port=port)
    if kind == "json":
        huge = [{"role": "user", "content": "x" * 2_000_000}]
        raw = rng.choice([b"[" * 100_000,
                          b'{"model": "kimi-k2-instruct", "seed": ' + b"9" * 5000 + b"}",
                          json.dumps(body).replace("4", "NaN").encode(), b'{"a": 1, "a": 2}',
                          json.dumps({**body, "messages": huge}).encode(),
                          b"\xff\xfe" + json.dumps(body).encode("utf-16-le"), b"null",
                          b'"just a string"'])
        return kind, request(raw, port=port)
    raw = json.dumps(body).encode()
    if kind == "length":
        value = rng.choice(["\u00b2", "1\u00b9", "9" * 5000, "-1", " ", "0x10", str(len(raw) - 5),
                            "1e3", f"{len(raw)}, {len(raw) + 1}"])
        return kind, request(raw, {"Content-Length": value}, port=port)
    if kind == "chunked":
        size = rng.choice([b"-1", b"+5", b"0x10", b"fffffffff", b"5;x=\"open", b"%x" % len(raw),
                           b"zz", b"5 5"])
        te = rng.choice(["chunked", "xchunkedx", "gzip, chunked", "chunked, chunked", "identity"])
        cl = rng.choice([None, str(len(raw))])
        return kind, request(size + b"\r\n" + raw + b"\r\n0\r\n\r\n",
                             {"Transfer-Encoding": te, "Content-Length": cl}, port=port)
    if kind == "headers":
        headers = rng.choice([{"Host": None}, {"Host": "evil.example"},
                              {"Origin": "http://evil.example"}, {"Content-Type": "text/plain"},
                              {"Content-Type": None}, {"Authorization": "Bearer x"},
                              {f"X-{i}": "y" for i in range(150)},
                              {"Host": "[::1]:1", "Expect": "100-continue"}])
        return kind, request(raw, headers, port=port)
    line = rng.choice(["POST /v1/chat/completions HTTP/2.0", "POST /v1/chat/completions",
                       "BREW /v1/chat HTTP/1.1", "POST /v1/\x1b[2Jchat HTTP/1.1",
                       "GET /" + "a" * 70_000 + " HTTP/1.1",
                       "POST /v1/chat/completions?x=\x00 HTTP/1.1",
                       "POST http://evil/v1/chat/completions HTTP/1.1"])
    return kind, request(raw, line=line, port=port)


def send(port: int, data: bytes, timeout: float = 10.0) -> int | None:
    """Send one request on a fresh connection -> the response's status, or None if no answer
    came."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            try:
                sock.sendall(data)
            # refused before all of it was read: the answer counts
            except (BrokenPipeError, ConnectionResetError):
                pass
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            resp.read()
            return resp.status
    except (OSError, http.client.HTTPException):
        return None


def normal_request(port: int) -> tuple[int | None, float]:
    t0 = time.perf_counter()
    status = send(port, request(json.dumps(CHAT).encode(), port=port), timeout=30)
    return status, time.perf_counter() - t0


def fuzz(port: int, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    statuses, still = [], []
    for i in range(n):
        statuses.append(send(port, spoiled(rng, port)[1]))
        if (i + 1) % 50 == 0 or i == n - 1:
            still.append(normal_request(port)[0] == 200)
    return {"total": n, "served": sum(s is not None and s != 500 for s in statuses),
            "status_500": statuses.count(500), "no_answer": statuses.count(None),
            "ok_200": statuses.count(200), "still_serving": all(still), "checks": len(still)}


# --------------------------------------------------------------------------------------------------
# 2. Idle-socket flood


def proc_status(pid: int) -> dict:
    """VmRSS, VmHWM (peak RSS) in MiB and Threads from /proc/PID/status (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def closed_by_server(sockets: list[socket.socket]) -> int:
    """How many of the sockets the server has closed (they read as end-of-file or a reset); waits
    for none."""
    readable, _, _ = select.select(sockets, [], [], 0)
    closed = 0
    for s in readable:
        try:
            closed += s.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            closed += 1
    return closed


def flood(port: int, pid: int, n: int) -> dict:
    before = proc_status(pid)
    sockets = []
    partial = [b"", b"POST /v1/chat/comp", request(b"{", {"Content-Length": "1000"}, port=port)]
    try:
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(partial[i % 3])
            sockets.append(s)
        time.sleep(0.5)  # every connection accepted, and its thread started or ended
        during = proc_status(pid)
        status, seconds = normal_request(port)
        time.sleep(0.5)
        peak, closed = proc_status(pid), closed_by_server(sockets)
    finally:
        for s in sockets:
            s.close()
    return {"sockets": n, "status": status, "seconds": seconds, "rss_before": before["VmRSS"],
            "rss_during": max(during["VmRSS"], peak["VmRSS"]), "peak_rss": peak["VmHWM"],
            "threads_before": before["Threads"],
            "threads": max(during["Threads"], peak["Threads"]), "closed": closed,
            "after": normal_request(port)[0]}


# --------------------------------------------------------------------------------------------------
# 3. kill -9 during a checkpoint save


def saving(run: Path) -> bool:
    """A checkpoint save is under way (or was cut short): model.save_pretrained's `.ckpt.tmp-PID`
    folder exists."""
    try:
        return any(e.name.startswith(".ckpt.tmp-") for e in os.scandir(run))
    except FileNotFoundError:
        return False


def saved_step(run: Path) -> int | None:
    try:
        return json.loads((run / "ckpt" / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def kills(tmp: Path, n: int, seed: int) -> dict:
    import tokenizer as tk

    rng = random.Random(seed)
    tok, corpus, run = tmp / "bytes.tiktoken", tmp / "slice.py", tmp / "run"
    # byte level: 256 + 256 specials = tiny's vocab_size
    tk.save_ranks({bytes([i]): i for i in range(256)}, tok)
    corpus.write_text(tk.read_corpus(max_bytes=100_000), encoding="utf-8")
    first = ["--config", "tiny", "--tokenizer", str(tok), "--data", str(corpus), "--data-cache",
             str(tmp / "cache"), "--out", str(run), "--steps", "100000", "--batch-size", "2",
             "--seq-len", "16", "--save-every", "1", "--eval-every", "100000", "--log-every",
             "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    landed, resumable, errors = 0, 0, []
    for i in range(n + 1):
        cmd = [sys.executable, str(ROOT / "train.py"), *(["--resume", str(run)] if i else first),
               "--threads", "1"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        before, deadline = saved_step(run), time.monotonic() + 120
        while proc.poll() is None and saved_step(run) == before and time.monotonic() < deadline:
            # wait until this run has saved once (a resumed one: loaded, trained and saved)
            time.sleep(0.01)
        if i and saved_step(run) != before:
            resumable += 1  # the previous kill left a run that this --resume continued
        while proc.poll() is None and not saving(run) and time.monotonic() < deadline:
            pass  # the next save begins: its .ckpt.tmp-PID folder appears
        if proc.poll() is not None or time.monotonic() >= deadline:
            proc.kill()
            last_line = (proc.communicate()[1] or "").strip().splitlines()[-1:]
            errors.append(last_line or [f"exit {proc.returncode}"])
            continue
        if i == n:  # the last one: a clean stop (train.py saves and exits on SIGTERM)
            proc.send_signal(signal.SIGTERM)
        else:
            # a save of tiny takes milliseconds: land anywhere in it
            time.sleep(rng.uniform(0, 0.003))
            proc.kill()
        proc.communicate(timeout=60)
        landed += i < n and (saving(run) or any(run.glob(".ckpt.old-*")))
    left = sum(1 for e in os.scandir(run) if re.match(r"\.ckpt\.(tmp|old)-", e.name))
    return {"kills": n, "resumable": resumable, "landed_in_save": landed,
            "final_step": saved_step(run), "left_behind": left, "errors": errors}


# --------------------------------------------------------------------------------------------------
# The campaign


def start_server(ckpt: Path, log: Path, max_connections: int) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", str(ckpt),
                             "--port", "0", "--device", "cpu",
                             "--max-connections", str(max_connections)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)
    for line in proc.stdout:
        if m := re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line):
            return proc, int(m.group(1))
    raise RuntimeError(f"serve.py did not start: {log.read_text()[-2000:]}")


def campaign(requests: int, idle: int, n_kills: int, seed: int = 0,
             max_connections: int = 64) -> dict:
    """Run the three parts, each bounded by its count; returns their figures."""
    from bench_serve import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = random_checkpoint("tiny", tmp / "ckpt")
        log = tmp / "serve.log"
        server, port = start_server(ckpt, log, max_connections)
        try:
            out = {"fuzz": fuzz(port, requests, seed), "flood": flood(port, server.pid, idle)}
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        out["tracebacks"] = log.read_text(errors="replace").count("Traceback")
        out["train"] = kills(tmp, n_kills, seed) if n_kills else None
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="bounded fault campaign: fuzzed requests, idle "
                                            "sockets, kill -9 in saves")
    p.add_argument("--requests", type=int, default=300, help="fuzzed requests")
    p.add_argument("--idle", type=int, default=300, help="idle sockets in the flood")
    p.add_argument("--max-connections", type=int, default=64,
                   help="the server's connection cap (serve.py's flag)")
    p.add_argument("--kills", type=int, default=5,
                   help="kill -9 of train.py during a checkpoint save (0 = skip)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the spoilings and of the kill delays")
    a = p.parse_args(argv)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if max(a.idle, a.max_connections) > limit - 64:
        p.error("--idle and --max-connections need about that many file descriptors; the limit is "
                f"{limit} (ulimit -n): use at most {limit - 64}")
    t0 = time.perf_counter()
    r = campaign(a.requests, a.idle, a.kills, a.seed, a.max_connections)
    f, fl, t = r["fuzz"], r["flood"], r["train"]
    print(f"\n| fault | result |\n|---|---|")
    print(f"| {f['total']} fuzzed requests (seed {a.seed}) | {f['served']}/{f['total']} served "
          f"(not a 500, answered within 10 s); {f['ok_200']} were still valid (200); 500s: "
          f"{f['status_500']}; no answer: {f['no_answer']}; tracebacks in the log: "
          f"{r['tracebacks']}; a normal request got its 200 in {f['checks']}/{f['checks']} "
          "checks |")
    print(f"| {fl['sockets']} idle sockets, --max-connections {a.max_connections} | normal "
          f"request: {fl['status']} in {fl['seconds'] * 1e3:.0f} ms; the server closed "
          f"{fl['closed']} idle sockets to stay within its cap; {fl['threads']} threads "
          f"({fl['threads_before']} before); RSS {fl['rss_during']:.0f} MiB "
          f"({fl['rss_before']:.0f} MiB before; the run's peak so far {fl['peak_rss']:.0f} MiB); "
          f"after the flood: {fl['after']} |")
    if t:
        print(f"| {t['kills']} kill -9 during a save | {t['resumable']}/{t['kills']} resumable "
              f"({t['landed_in_save']} kills left a save's folder behind; {t['left_behind']} such "
              f"folders at the end); the run reached step {t['final_step']}"
              + (f"; errors: {t['errors']}" if t["errors"] else "") + " |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
