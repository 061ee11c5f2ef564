"""Protects http_server.py, the transport under serve.py, against hostile and careless clients, at the socket
level (where the openai client would hide the problem): HTTP framing and body limits, Host / Origin / Content-Type
checks, the connection cap and its eviction, the header timeout, Nagle's algorithm off, and a log that cannot carry
terminal escapes.

Compares against: raw sockets speaking HTTP/1.1 by hand, a byte-counting wrapper of the handler's input, the official
`openai` client, and the scripted stand-in model of tests/test_serve.py behind a live ChatServer.
Run: pytest tests/test_http_server.py -q   (CPU, ~10 s)"""
import http.client
import json
import re
import socket
import threading
import time

import pytest

import serve
from conftest import ROOT
from test_serve import Live, ScriptedModel, one_running_one_queued, tok  # noqa: F401

openai = pytest.importorskip("openai")

CHAT = json.dumps({"model": "kimi-k2-instruct", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(scope="module")
def scripted(tok):
    live = Live(serve.ModelEngine(ScriptedModel(tok), tok, "scripted stand-in"))
    yield live
    live.close()


def exchange(live: Live, data: bytes, timeout: float = 10.0) -> tuple[int, dict, dict | str, bool]:
    """Send raw bytes on a fresh connection -> (status, headers, JSON body or text, whether the server closed)."""
    with socket.create_connection((live.host, live.port), timeout=timeout) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = resp.read()
        closed = resp.getheader("Connection") == "close"
    try:
        return resp.status, dict(resp.getheaders()), json.loads(body), closed
    except json.JSONDecodeError:
        return resp.status, dict(resp.getheaders()), body.decode(errors="replace"), closed


def new_lines(live: Live, before: int, n: int = 1) -> list[str]:
    """The log lines after the first `before`, once there are n (the request line is written after the answer)."""
    deadline = time.monotonic() + 5
    while len(live.lines) < before + n and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # and no more
    return live.lines[before:]


def post(live: Live, extra_headers: str = "", body: bytes = CHAT, host: str | None = None) -> bytes:
    host = host or f"127.0.0.1:{live.port}"
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{extra_headers}\r\n").encode("latin-1") + body  # http.server decodes header bytes as Latin-1


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def server_closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the server has closed the connection (end of file or a reset), False if it is still open and
    silent after `timeout` seconds (e.g. because it still waits to read more)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def sends_fail(sock: socket.socket, total: int = 64 << 20) -> bool:
    """Keep sending up to `total` bytes: True if a send fails first (nobody reads them), False if all were taken."""
    piece = b"x" * (1 << 16)
    try:
        for _ in range(total // len(piece)):
            sock.sendall(piece)
    except OSError:  # a broken pipe, a reset, or a timeout of the filled buffers
        return True
    return False


def answer_on_open_socket(sock: socket.socket) -> tuple[int, dict, dict]:
    """Read one response from a socket that stays open afterwards -> (status, headers, JSON body)."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, dict(resp.getheaders()), json.loads(resp.read())


class CountingReader:
    """Wraps a handler's rfile and counts the bytes the handler took from it (request line, headers, body)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def readline(self, *args):
        line = self.f.readline(*args)
        self.n += len(line)
        return line

    def read(self, *args):
        data = self.f.read(*args)
        self.n += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)


# ---------------------------------------------------------------------------------------------------------------
# Bodies and framing


@pytest.mark.parametrize("size_line", [b"-1", b"+5", b"0x5", b" 5", b"5 ", b"fffffffff", b"5;x=\"open", b"5;=v",
                                       b"5\x00"])
def test_bad_chunk_size_lines_are_refused_at_once(scripted, size_line):
    """A size line that is not 1-8 hex digits (and well-formed extensions) is a 400, answered without waiting for
    more of the body: `-1` used to read until the client closed, whatever --max-body-bytes said."""
    data = post(scripted, "Transfer-Encoding: chunked\r\n", b"") + size_line + b"\r\n"  # then nothing more
    status, _, body, closed = exchange(scripted, data, timeout=5)
    assert status == 400 and closed and "chunk size line" in body["error"]["message"]


def test_chunk_extensions_that_parse_are_accepted(scripted):
    status, _, body, _ = exchange(scripted, post(scripted, "Transfer-Encoding: chunked\r\n", b"") +
                                  b"%x;name=value;flag ; q=\"a \\\" b\"\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT))
    assert status == 200 and body["choices"][0]["message"]["content"] == "echo: hi", body


def test_negative_chunk_on_the_401_path_is_not_read_either(tok):
    live = Live(serve.ModelEngine(ScriptedModel(tok), tok), api_key="sekrit")
    try:
        data = post(live, "Transfer-Encoding: chunked\r\n", b"") + b"-1\r\n"
        status, _, body, closed = exchange(live, data, timeout=5)
        assert status == 401 and closed and body["error"]["code"] == "invalid_api_key"
    finally:
        live.close()


def test_chunked_body_over_the_limit_is_refused_before_it_is_read(tok):
    live = Live(serve.ModelEngine(ScriptedModel(tok), tok), max_body_bytes=1000)
    try:  # the first chunk's size already says it is over the limit: the 2 MB of it never need to be sent
        status, _, body, closed = exchange(live, post(live, "Transfer-Encoding: chunked\r\n", b"") + b"200000\r\n",
                                           timeout=5)
        assert status == 413 and closed and body["error"]["code"] == "request_too_large"
    finally:
        live.close()


@pytest.mark.parametrize("api_key", [None, "sekrit"], ids=["413", "401"])
def test_a_declared_body_over_the_limit_is_answered_on_the_headers_and_never_read(tok, api_key):
    """Content-Length over --max-body-bytes: the answer (413; 401 without the key) comes before any of the body is
    sent, the server closes, and what the client sends afterwards is not read (it used to be read and discarded
    up to 64 MiB, so the connection stayed open waiting for it)."""
    live = Live(serve.ModelEngine(ScriptedModel(tok), tok), max_body_bytes=1000, api_key=api_key)
    try:
        for framing in (b"Content-Length: 10000000\r\n", b"Transfer-Encoding: chunked\r\n"):
            with socket.create_connection((live.host, live.port), timeout=10) as sock:
                sock.sendall(post(live, framing.decode(), b"") + (b"3e9\r\n" if b"chunked" in framing else b""))
                status, headers, body = answer_on_open_socket(sock)
                assert status == (401 if api_key else 413) and headers["Connection"] == "close", body
                assert body["error"]["code"] == ("invalid_api_key" if api_key else "request_too_large")
                assert server_closed(sock) and sends_fail(sock)
        assert live.raw("GET", "/v1/models", headers={"Authorization": f"Bearer {api_key}"})[0] == 200
    finally:
        live.close()


def test_chunked_body_is_refused_once_its_total_passes_the_limit(tok):
    """The handler reads the body up to the size line that takes the total over the limit and no further: not
    that chunk's data, not what the client sends after the 413."""
    readers = []

    class Probe(serve.Handler):
        def setup(self) -> None:
            super().setup()
            self.rfile = CountingReader(self.rfile)
            readers.append(self.rfile)

    live = Live(serve.ModelEngine(ScriptedModel(tok), tok), max_body_bytes=1000)
    live.server.RequestHandlerClass = Probe
    try:
        head = post(live, "Transfer-Encoding: chunked\r\n", b"")
        first, over = b"3e8\r\n" + b"x" * 1000 + b"\r\n", b"1\r\n"  # 1,000 bytes: the limit; 1 more: over it
        with socket.create_connection((live.host, live.port), timeout=10) as sock:
            sock.sendall(head + first + over)  # and not the byte itself
            status, _, body = answer_on_open_socket(sock)
            assert status == 413 and body["error"]["code"] == "request_too_large"
            assert server_closed(sock) and sends_fail(sock)
        assert [r.n for r in readers] == [len(head) + len(first) + len(over)]
    finally:
        live.close()


@pytest.mark.parametrize("headers,status", [
    (f"Content-Length: {len(CHAT)}\r\nTransfer-Encoding: chunked\r\n", 400),  # two framings: which one ends it?
    (f"Content-Length: {len(CHAT)}\r\nContent-Length: {len(CHAT) + 1}\r\n", 400),  # differing duplicates
    ("Transfer-Encoding: xchunkedx\r\n", 501),
    ("Transfer-Encoding: gzip, chunked\r\n", 501),
    ("Content-Length: \u00b2\r\n", 400),  # str.isdigit() is true for these, int() is not
    ("Content-Length: 1\u00b9\r\n", 400),
    ("Content-Length: " + "9" * 5000 + "\r\n", 400),  # int() refuses over 4,300 digits
    ("Content-Length: -5\r\n", 400),
], ids=["cl+te", "two-cl", "xchunkedx", "gzip", "superscript2", "1superscript1", "5000-digits", "negative"])
def test_ambiguous_framing_is_refused_and_the_connection_closed(scripted, headers, status):
    body = chunked(CHAT) if "chunked" in headers else CHAT
    before = len(scripted.lines)
    got, _, data, closed = exchange(scripted, post(scripted, headers, body))
    assert (got, closed) == (status, True), data
    assert set(data["error"]) == {"message", "type", "param", "code"}
    new = new_lines(scripted, before)
    assert len(new) == 1 and "Traceback" not in new[0], new  # logged once, as a request line


@pytest.mark.parametrize("line,status", [(b"POST /v1/chat/completions HTTP/2.0", 505),
                                         (b"GET /" + b"a" * 70_000 + b" HTTP/1.1", 414), (b"GET / HTTP/x", 400)],
                         ids=["http2", "long-line", "bad-version"])
def test_unreadable_request_lines_get_a_status_line_and_openai_shape(scripted, line, status):
    got, _, body, closed = exchange(scripted, line + b"\r\nHost: localhost\r\n\r\n")
    assert (got, closed) == (status, True) and set(body["error"]) == {"message", "type", "param", "code"}


def test_http11_without_host_is_refused(scripted):
    status, _, body, closed = exchange(scripted, b"GET /v1/models HTTP/1.1\r\n\r\n")
    assert status == 400 and closed and "Host" in body["error"]["message"]
    status, _, body, _ = exchange(scripted, b"GET /v1/models HTTP/1.0\r\n\r\n")  # HTTP/1.0 has no Host rule
    assert status == 200 and body["object"] == "list"


def test_huge_integers_and_nan_in_the_json_are_client_errors(scripted):
    before = len(scripted.lines)
    for raw in [b'{"model": "kimi-k2-instruct", "seed": ' + b"7" * 5000 + b', "messages": []}',
                b'{"model": "kimi-k2-instruct", "messages": [{"role": "user", "content": "hi"}], "user": NaN}',
                b'{"model": "kimi-k2-instruct", "messages": [{"role": "user", "content": "hi"}], '
                b'"metadata": {"x": -Infinity}}']:
        status, body = scripted.raw("POST", "/v1/chat/completions", raw, {"Content-Type": "application/json"})
        assert status == 400 and "not valid JSON" in body["error"]["message"], body
    assert not any("Traceback" in line for line in new_lines(scripted, before, 3))

# ---------------------------------------------------------------------------------------------------------------
# Host, Origin, Content-Type


def test_only_loopback_hosts_by_default(scripted):
    for host, status in [("evil.example", 400), ("evil.example:8000", 400), ("127.0.0.1.evil.example", 400),
                         ("localhost", 200), (f"localhost:{scripted.port}", 200), ("[::1]:80", 200),
                         ("127.0.0.2", 200), ("", 400)]:
        got, _, body, _ = exchange(scripted, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert got == status, (host, body)
        if status == 400:
            assert body["error"]["code"] == "host_not_allowed"
    live = Live(scripted.engine, allowed_hosts=["kimi.lan"])
    try:
        got, _, _, _ = exchange(live, b"GET /v1/models HTTP/1.1\r\nHost: kimi.lan:8000\r\n\r\n")
        assert got == 200
    finally:
        live.close()


def test_browser_pages_and_text_plain_posts_are_refused(scripted):
    status, _, body, _ = exchange(scripted, post(scripted, f"Origin: http://evil.example\r\nContent-Length: "
                                                           f"{len(CHAT)}\r\n"))
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    data = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(CHAT)}\r\n\r\n").encode() + CHAT
    status, _, body, closed = exchange(scripted, data)
    assert status == 415 and body["error"]["code"] == "unsupported_media_type" and not closed


def test_allowed_origin_gets_cors(tok):
    live = Live(serve.ModelEngine(ScriptedModel(tok), tok), allowed_origins=["http://localhost:3000"])
    try:
        status, headers, _, _ = exchange(live, b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                                               b"Origin: http://localhost:3000\r\nAccess-Control-Request-Method: "
                                               b"POST\r\nAccess-Control-Request-Headers: content-type\r\n\r\n")
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        status, headers, body, _ = exchange(live, post(live, f"Origin: http://localhost:3000\r\nContent-Length: "
                                                             f"{len(CHAT)}\r\n"))
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        status, _, _, _ = exchange(live, post(live, f"Origin: http://localhost:4000\r\nContent-Length: "
                                                    f"{len(CHAT)}\r\n"))
        assert status == 403
    finally:
        live.close()

# ---------------------------------------------------------------------------------------------------------------
# Connections: the cap and its eviction, the header timeout, Nagle's algorithm


def handler_threads() -> int:
    """Threads socketserver started for connections (in this process: every Live server's)."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_idle_socket_flood_cannot_lock_out_a_normal_request(tok):
    """With --max-connections 8, 8 + 24 idle sockets (nothing sent, half a request line, a header block and one byte
    of a 1,000-byte body): each new one takes the place of the longest-waiting one, a normal request still gets its
    200, and the server holds no more than 8 connection threads. Without a cap every socket held a thread."""
    cap, extra = 8, 24
    live = Live(serve.ModelEngine(ScriptedModel(tok), tok), max_connections=cap)
    before, sockets = handler_threads(), []
    idle = [b"", b"POST /v1/chat/comp", post(live, "Content-Length: 1000\r\n", b"{")]
    try:
        for i in range(cap + extra):
            sockets.append(socket.create_connection((live.host, live.port), timeout=10))
            sockets[-1].sendall(idle[i % 3])
        status, _, body, _ = exchange(live, post(live, f"Content-Length: {len(CHAT)}\r\n"), timeout=30)
        assert status == 200 and body["choices"][0]["message"]["content"] == "echo: hi"
        deadline = time.monotonic() + 10  # evicted connections' threads end as their reads return
        while handler_threads() > before + cap and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handler_threads() <= before + cap and len(live.server.waiting_since) <= cap
        closed: set[socket.socket] = set()  # each connection past the cap evicted one (the normal one too)
        while len(closed) < extra + 1 and time.monotonic() < deadline:
            closed |= {s for s in sockets if s not in closed and server_closed(s, timeout=0.01)}
        assert len(closed) == extra + 1 and sum("closed, to make room" in line for line in live.lines) == extra + 1
    finally:
        for s in sockets:
            s.close()
        live.close()


def test_when_every_connection_is_busy_a_new_one_gets_503(tok):
    """Busy connections (a request running, one queued) are never evicted; past the cap the newcomer is told."""
    model = ScriptedModel(tok)
    model.delay = 0.01
    live = Live(serve.ModelEngine(model, tok), max_connections=2, max_queue=4)
    try:
        results, threads = one_running_one_queued(live)
        status, headers, body, closed = exchange(live, post(live, f"Content-Length: {len(CHAT)}\r\n"))
        assert (status, closed) == (503, True) and int(headers["Retry-After"]) >= 1
        assert body["error"]["code"] == "server_busy" and set(body["error"]) == {"message", "type", "param", "code"}
        for t in threads:
            t.join(30)
        assert results == [200, 200]
        assert live.raw("GET", "/v1/models")[0] == 200
    finally:
        live.close()


def test_a_connection_may_wait_for_its_request_only_so_long(tok):
    """A connection that sends no request line (or no complete header) within the header timeout is closed; once
    the header is in, a slower body is still waited for (the 120 s per-read timeout)."""
    live = Live(serve.ModelEngine(ScriptedModel(tok), tok), header_timeout=0.3)
    try:
        for sent in (b"", b"GET /v1/mo", b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"):
            with socket.create_connection((live.host, live.port)) as sock:
                sock.sendall(sent)
                assert server_closed(sock, timeout=10), sent  # it used to wait 120 s
        with socket.create_connection((live.host, live.port), timeout=10) as sock:
            sock.sendall(post(live, f"Content-Length: {len(CHAT)}\r\n", b""))
            time.sleep(1.0)  # over the header timeout, between the header and the body
            sock.sendall(CHAT)
            status, _, body = answer_on_open_socket(sock)
            assert status == 200 and body["choices"][0]["message"]["content"] == "echo: hi"
    finally:
        live.close()


def test_nagle_is_off_on_accepted_connections(scripted):
    """With Nagle's algorithm on, the body of each keep-alive response waited ~40 ms for the delayed ACK of its
    headers; the socket option is what matters (timing it would be a flaky test)."""
    seen = []

    class Probe(serve.Handler):
        def setup(self) -> None:
            super().setup()
            seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    live = Live(scripted.engine)
    live.server.RequestHandlerClass = Probe
    try:
        assert live.raw("GET", "/v1/models")[0] == 200
        assert seen and all(seen)
    finally:
        live.close()


# ---------------------------------------------------------------------------------------------------------------
# The log


def test_log_lines_carry_no_terminal_escapes(scripted):
    before = len(scripted.lines)
    exchange(scripted, b"GET /v1/\x1b[2J\x1b]0;pwned\x07\x9b31m HTTP/1.1\r\nHost: localhost\r\n\r\n")
    new = "\n".join(new_lines(scripted, before))
    assert "GET /v1/\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m 404" in new
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", new)


@pytest.mark.slow
def test_a_small_fault_campaign(monkeypatch):
    """bench/bench_faults.py in small: fuzzed requests all answered without a 500, the server still serving during
    and after an idle-socket flood past its connection cap, with its threads bounded by the cap, and a train.py run
    killed with SIGKILL mid-save resumes."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # a folder of scripts: bench_faults imports bench_serve
    import bench_faults

    r = bench_faults.campaign(requests=40, idle=40, n_kills=1, seed=1, max_connections=16)
    f, flood, t = r["fuzz"], r["flood"], r["train"]
    assert (f["served"], f["status_500"], f["still_serving"], r["tracebacks"]) == (40, 0, True, 0), r
    assert (flood["status"], flood["after"]) == (200, 200), flood
    assert flood["closed"] >= 40 - 16 and flood["threads"] <= flood["threads_before"] + 16 + 4, flood
    assert t["resumable"] == 1 and not t["errors"], t
