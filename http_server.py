"""A hardened HTTP/1.1 server for a small JSON API, on the standard library's http.server.

serve.py puts the OpenAI-compatible chat API on top of this file (its routes, its model); here is
only what every request goes through before and after a route sees it, in that order:
1. Accepting a connection. One thread per connection, at most --max-connections of them. At the
   cap, the connection that has waited longest without sending a complete request is closed to
   make room, so a flood of idle sockets only ever evicts its own members; only when every
   connection is busy with a request is the new one refused (503 with Retry-After).
2. Reading the request line and headers, within a header timeout (30 s; nginx's
   client_header_timeout is 60 s). http.server's own refusals (400, 414, 431, 505) come back as
   JSON errors, always with a status line.
3. Framing (RFC 9112 §6.1, §6.3, §3.2): Content-Length with chunked, differing lengths, other
   transfer codings, a missing or repeated Host: each could be read two ways (by a proxy in front,
   and by us), so it is refused and the connection closed.
4. Who may ask. A local server is also reachable from any web page its user opens. So by default
   it answers only requests whose Host is a loopback name or --host (a page that rebinds its own
   domain to 127.0.0.1 still sends that domain as Host; --allowed-hosts adds names), refuses
   requests carrying a browser's Origin header (--allowed-origins allows a page, with CORS), and
   wants `Content-Type: application/json` on a JSON body (a page can send text/plain anywhere
   without asking). Then the API key, if there is one (compared in constant time).
5. The route (a subclass's `route`), which reads the body: Content-Length or chunked (RFC 9112
   §7.1), never more than --max-body-bytes (a body declared larger is refused on the headers and
   never read), every line bounded.
6. The answer: JSON, or server-sent events over chunked transfer encoding. Every failure is an
   error in OpenAI's shape ({"error": {"message", "type", "param", "code"}}). A body a refused
   request left unread is read and dropped if it is within the limit, else the connection closes.
   A client that goes away is logged as 499 (nginx's "client closed request"); one line per
   request in a log that cannot carry terminal escapes.

Why http.server's ThreadingHTTPServer and not FastAPI/uvicorn: it is well known, has zero
dependencies, and is enough for an educational single-model server whose throughput is bound by
the model anyway; server-sent events are plain chunked writes.

References: RFC 9110 and RFC 9112 (HTTP semantics and framing); the Fetch standard (CORS
protocol); OpenAI API reference (error codes). No shapes in this file, so no shape legend.
"""
from __future__ import annotations

import hmac
import json
import re
import select
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

# ours: a full 128K-token context is ~0.5 MB of text; 4 MiB leaves room for JSON escaping and tool
# schemas, and still stops a runaway client before it costs memory
DEFAULT_MAX_BODY_BYTES = 4 << 20
# ours: open connections (one thread each). serve.py raises it to twice the requests that can be
# busy at once when its queue is longer.
DEFAULT_MAX_CONNECTIONS = 128
# ours: seconds a connection may wait for its next request line (and each header line) before it
# is closed; nginx waits 60 s for a request's header (client_header_timeout); the openai client
# drops its idle keep-alive connections after 5 s (httpx's keepalive_expiry)
HEADER_TIMEOUT = 30
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|::1|localhost)$")
# RFC 9110 §7.2
HOST_RE = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::\d*)?|(?P<name>[^:\[\]/@\s]+)(?::\d*)?")
# RFC 9112 §7.1.1: chunk-size [ chunk-ext ] CRLF;
# chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ), value a token or a quoted-string.
# Eight hex digits are 4 GiB, already far over any body limit.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
CHUNK_LINE_RE = re.compile(
    rb"([0-9A-Fa-f]{1,8})(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|\"(?:[^\"\\\r\n]|\\.)*\"))?)*"
    rb"\r?\n" % (_TOKEN, _TOKEN))
MAX_LINE = 1024  # ours: bytes in a chunk-size or trailer line (a real one is a few bytes)
MAX_TRAILERS = 32  # ours: trailer lines after the last chunk (clients send none)
# C0 and C1 controls but newline: terminal escapes
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


# --------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    """An error response: {"error": {"message", "type", "param", "code"}} with an HTTP status
    (OpenAI's shape). headers: extra response headers (Retry-After on a 429)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param, code)


# --------------------------------------------------------------------------------------------------
# The server: connections


class JSONServer(ThreadingHTTPServer):
    """One thread per connection (ThreadingHTTPServer), at most max_connections of them.

    allowed_hosts: Host header names accepted besides loopback ones and the bound address ("*" =
    any); a browser page that reaches 127.0.0.1 through DNS rebinding sends its own domain as Host,
    so it is refused. allowed_origins: web origins (e.g. http://localhost:3000) whose pages may call
    the server ("*" = any); any other request with an Origin header, i.e. from a browser page, is
    refused. header_timeout: seconds a connection may wait for its next request line before it is
    closed. log: where the one line per request goes (default: stderr)."""
    # a connection left open never blocks shutdown
    daemon_threads = True
    # the listen backlog: socketserver's default of 5 drops the connects of a burst (each then
    # retried by the client's kernel after 1 s); the system's maximum, as uvicorn and nginx use a
    # large one (2048, 511)
    request_queue_size = socket.SOMAXCONN

    def __init__(self, handler: type[JSONHandler], host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 log: Callable[[str], None] | None = None, allowed_hosts: Sequence[str] = (),
                 allowed_origins: Sequence[str] = (),
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 header_timeout: float = HEADER_TIMEOUT):
        super().__init__((host, port), handler)
        self.max_connections, self.header_timeout = max_connections, header_timeout
        # open connections -> since when each has waited for a request (time.monotonic()), None
        # while it has one
        self.waiting_since: dict[socket.socket, float | None] = {}
        self.connections_lock = threading.Lock()
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        sink = log or (lambda line: print(line, file=sys.stderr, flush=True))
        # request paths and headers are the client's text
        self.log = lambda line: sink(_printable(line))
        bound = {host.lower()} if host not in ("", "0.0.0.0", "::") else set()
        self.allowed_hosts = {h.lower() for h in allowed_hosts} | bound
        self.allowed_origins = set(allowed_origins)

    def host_allowed(self, name: str) -> bool:
        return bool(LOOPBACK.match(name)) or name in self.allowed_hosts or "*" in self.allowed_hosts

    def retry_after(self) -> int:
        """Seconds a client refused for load should wait (Retry-After); a subclass that knows how
        long a request takes says better."""
        return 1

    # --- the connection cap. At the cap, a new connection takes the place of the one that has
    # waited longest without sending a complete request (its socket is shut down, which ends its
    # thread's read at once). A flood of idle or trickling sockets therefore only ever evicts its
    # own oldest members, while a normal client's connection is the newest and sends its request
    # within milliseconds, after which it cannot be evicted. Only when every connection is busy
    # with a request is the new one refused: 503 with Retry-After, written here without starting a
    # thread.
    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self.connections_lock:
            if len(self.waiting_since) >= self.max_connections:
                waiting = [(since, sock) for sock, since in self.waiting_since.items()
                           if since is not None]
                if not waiting:
                    self._refuse(request, client_address)
                    return
                oldest = min(waiting, key=lambda w: w[0])[1]
                del self.waiting_since[oldest]
                try:
                    peer = "%s:%s" % oldest.getpeername()[:2]
                    oldest.shutdown(socket.SHUT_RDWR)
                except OSError:
                    peer = "a client"
                self.log(f"{peer}: closed, to make room at {self.max_connections} connections "
                         f"(--max-connections) (it had waited longest without a complete request)")
            self.waiting_since[request] = time.monotonic()
        super().process_request(request, client_address)

    def mark_waiting(self, sock: socket.socket, waiting: bool) -> None:
        """A connection starts waiting for a request (True) or has received one in full (False)."""
        with self.connections_lock:
            if sock in self.waiting_since:  # not if it was evicted meanwhile
                self.waiting_since[sock] = time.monotonic() if waiting else None

    # socketserver's hook: a connection ends
    def shutdown_request(self, request: socket.socket) -> None:
        with self.connections_lock:
            self.waiting_since.pop(request, None)
        super().shutdown_request(request)

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        wait = self.retry_after()
        err = APIError(503, f"all {self.max_connections} connections this server accepts "
                            f"(--max-connections) are busy with requests; retry in about {wait} s",
                       code="server_busy")
        body = json.dumps(err.body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: {wait}\r\nConnection: close\r\n"
                f"\r\n").encode()
        # a fresh socket's send buffer is empty: this never blocks the accepting thread
        try:
            request.setblocking(False)
            request.send(head + body)
        except OSError:
            pass
        super().shutdown_request(request)
        self.log(f"{client_address[0]}:{client_address[1]} refused: 503, all "
                 f"{self.max_connections} connections busy")

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Errors outside a request (socketserver's hook). A client dropping an idle keep-alive
        connection is routine and stays quiet; anything else is logged with its traceback."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            self.log(f"error on the connection from {client_address[0]}:{client_address[1]}\n"
                     f"{traceback.format_exc()}")

    def close(self) -> None:
        """Stop serving (call from another thread than serve_forever) and close the socket."""
        self.shutdown()
        self.server_close()


def _printable(line: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line)


def sse(obj: Any) -> bytes:
    """One server-sent event: `data: JSON` and a blank line (bytes are sent as they are)."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()
    return b"data: " + data + b"\n\n"


def _json_int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:
        # over Python's int_max_str_digits (4,300 by default): a client error, not a 500
        raise ValueError(f"an integer of {len(digits):,} digits "
                         f"(at most {sys.get_int_max_str_digits():,})") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity); send a number")


# --------------------------------------------------------------------------------------------------
# One connection: a request's checks, its route, its answer


class JSONHandler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection (keep-alive, as the openai client uses it): checks, route, answer,
    errors. A subclass implements `route(path)`, and reads a body with `_read_json`."""
    protocol_version = "HTTP/1.1"
    # seconds any one socket read or write within a request may block; a stalled client then frees
    # its thread. Waiting for a request line and headers is bounded by the server's header_timeout
    timeout = 120
    # A response is two writes (headers, body); with Nagle's algorithm (RFC 896) the second waits
    # for the client's delayed ACK of the first (RFC 1122 §4.2.3.2): ~40 ms added to every answer
    # on a keep-alive connection.
    disable_nagle_algorithm = True
    cors: str | None = None  # the request's Origin, when it is allowed (per request; see _handle)
    note = ""  # what the route adds to the request's log line
    server: JSONServer

    def route(self, path: str) -> None:
        raise APIError(404, f"Invalid URL ({self.command} {path})")

    # --- entry points: every method goes through _handle, so every failure is an OpenAI-shaped
    # error
    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # HEAD and OPTIONS: answered 405 in OpenAI's shape rather than http.server's HTML 501 page
    def do_HEAD(self) -> None:
        self._handle()

    # and a CORS preflight from an allowed origin
    def do_OPTIONS(self) -> None:
        self._handle()

    def handle_one_request(self) -> None:
        """http.server reads the request line and headers, then calls do_METHOD (which goes to
        _handle)."""
        self.server.mark_waiting(self.connection, True)
        self.connection.settimeout(self.server.header_timeout)
        super().handle_one_request()

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # replaced by the one line per request _handle writes

    # malformed request lines, timeouts
    def log_error(self, format: str, *args: Any) -> None:
        self.server.log(f"{self.address_string()} {format % args}")

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header block: 400, 414, 431,
        505) in OpenAI's shape rather than its HTML page, and always with a status line: for a
        request line it could not read, http.server would otherwise answer as to HTTP/0.9, with a
        bare body."""
        self.log_error("code %d, message %s", code, message)
        if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
            self.request_version = "HTTP/1.0"
        err = APIError(code, message or "the request could not be read")
        self._send_json(code, err.body(), close=True)

    def _handle(self) -> None:
        # one Handler serves every request of a keep-alive connection: reset the per-request state
        t0, self.status, self.note, self.streaming = time.perf_counter(), 0, "", False
        self.body_touched = self.body_read = False
        self.cors = None  # the allowed Origin
        path = self.path.split("?", 1)[0]
        self.connection.settimeout(self.timeout)
        try:
            self._check_framing()
            no_body = int(self.headers.get("Content-Length", "0")) == 0
            if not self.headers.get("Transfer-Encoding") and no_body:
                # no body: the request is complete
                self.server.mark_waiting(self.connection, False)
            self._check_host()
            self._check_origin()
            if self.command == "OPTIONS" and self.cors is not None:
                return self._preflight()
            self._check_auth()
            self.route(path)
        except APIError as err:
            # the server's fault (the model's output): say what, once
            if err.status == 500:
                self.server.log(f"  {err.message}")
            self._send_error(err)
        except ConnectionError:  # the client went away (broken pipe, reset, closed while waiting)
            self.close_connection = True
            # nginx's "client closed request"
            self.status = 499
        except Exception as err:  # a bug: answer 500 with the message, keep serving
            self.server.log(traceback.format_exc())
            self._send_error(APIError(500, f"internal error: {type(err).__name__}: {err}"))
        finally:
            self.server.log(f"{self.command} {path} {self.status}{self.note} "
                            f"{time.perf_counter() - t0:.2f}s")

    # --- checks, in the order _handle runs them
    def _check_framing(self) -> None:
        """RFC 9112's rules for where a request and its body end (§6.1, §6.3) and for Host
        (§3.2). A request that breaks them could be read two ways (by a proxy in front, and by
        us), so it is refused and the connection closed rather than guessed at."""
        h = self.headers
        hosts, lengths = h.get_all("Host") or [], h.get_all("Content-Length") or []
        codings = h.get_all("Transfer-Encoding") or []
        err = None
        if len(hosts) > 1 or (not hosts and self.request_version == "HTTP/1.1"):
            err = bad("an HTTP/1.1 request needs exactly one Host header (RFC 9112 §3.2)")
        elif codings and lengths:
            err = bad("Content-Length and Transfer-Encoding together: send one of them "
                      "(RFC 9112 §6.3)")
        elif codings and ",".join(codings).strip().lower() != "chunked":
            err = APIError(501, f"Transfer-Encoding {','.join(codings)[:40]!r} is not supported; "
                                f"send the body with Content-Length or Transfer-Encoding: chunked",
                           code="not_implemented")
        elif len({v.strip() for v in lengths}) > 1:
            err = bad(f"differing Content-Length headers {[v[:20] for v in lengths][:4]}: "
                      f"send one")
        elif lengths and not re.fullmatch(r"[0-9]{1,15}", lengths[0].strip()):
            err = bad(f"invalid Content-Length header {lengths[0][:40]!r}: "
                      f"expected a number of bytes")
        if err is not None:
            # where the body ends is unknown: answer and close
            self.body_touched = True
            raise err

    def _check_host(self) -> None:
        host = self.headers.get("Host")
        if host is None:  # HTTP/1.0 (an HTTP/1.1 request without one was refused above)
            return
        m = HOST_RE.fullmatch(host.strip())
        name = (m.group("v6") or m.group("name")).lower().rstrip(".") if m else ""
        if not self.server.host_allowed(name):
            raise APIError(400, f"Host {host[:80]!r} is not a name this server answers to "
                                f"(loopback by default, so that a web page cannot reach it through "
                                f"DNS rebinding); start the server with --allowed-hosts NAME to "
                                f"accept more", code="host_not_allowed")

    def _check_origin(self) -> None:
        """A browser marks a page's requests with Origin; other clients (the openai library, curl)
        send none."""
        origin = self.headers.get("Origin")
        if origin is None:
            return
        if origin in self.server.allowed_origins or "*" in self.server.allowed_origins:
            self.cors = origin
            return
        raise APIError(403, f"Requests from web pages (here Origin {origin[:80]!r}) are refused: "
                            f"any site could otherwise use this server from its visitors' "
                            f"browsers. To allow one, start the server with --allowed-origins "
                            f"ORIGIN", code="origin_not_allowed")

    def _preflight(self) -> None:
        """The CORS preflight a browser sends before a page's JSON POST (Fetch standard, CORS
        protocol)."""
        self.send_response(204)
        self._cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers",
                                          "authorization, content-type"))
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.status = 204

    def _check_auth(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        # constant time
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            if given:
                message = ("Incorrect API key provided. Send the key given to --api-key as "
                           "'Authorization: Bearer KEY'.")
            else:
                message = ("You didn't provide an API key. Send 'Authorization: Bearer KEY' (the "
                           "key given to --api-key).")
            raise APIError(401, message, code="invalid_api_key")

    def _require_method(self, method: str) -> None:
        if self.command != method:
            raise APIError(405, f"Method {self.command} not allowed on {self.path.split('?')[0]}; "
                                f"use {method}", code="method_not_allowed")

    def _require_json(self) -> None:
        """A JSON body must say so: a web page can POST text/plain cross-origin without asking
        (CORS), application/json only after a preflight."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                           code="unsupported_media_type")

    def _client_gone(self) -> bool:
        """True when the client has closed its end: the socket reads as end-of-file. MSG_PEEK
        leaves any pipelined request in place. (A client that half-closes and still waits for its
        answer looks gone too; HTTP clients do not do that.)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # --- request bodies
    def _read_json(self) -> Any:
        limit, self.body_touched = self.server.max_body_bytes, True
        if self.headers.get("Transfer-Encoding"):  # _check_framing let only "chunked" through
            raw = self._read_chunked(limit)
        else:
            # _check_framing checked that it is a number
            n = int(self.headers.get("Content-Length", "0"))
            if n > limit:
                # refused on the headers alone: none of the body is read (_send_error closes)
                raise APIError(413, f"request body is {n:,} bytes; this server accepts at most "
                                    f"{limit:,} (--max-body-bytes)", code="request_too_large")
            raw = self.rfile.read(n)
            if len(raw) < n:
                raise bad(f"the request body ended after {len(raw):,} of its {n:,} bytes "
                          f"(Content-Length)")
        self.body_read = True
        self.server.mark_waiting(self.connection, False)
        if not raw.strip():
            raise bad("the request body is empty; send a JSON object")
        try:
            return json.loads(raw, parse_int=_json_int, parse_constant=_no_constant)
        except RecursionError:
            raise bad("the request body nests JSON too deeply") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN, a 5,000-digit integer
            raise bad(f"the request body is not valid JSON: {err}") from None

    def _read_chunked(self, limit: int) -> bytes:
        """A body sent with Transfer-Encoding: chunked (RFC 9112 §7.1): hex size line, data, CRLF;
        0 ends it. Never reads more than `limit` bytes of data, and every line it reads is
        bounded."""
        parts, total = [], 0
        while True:
            line = self.rfile.readline(MAX_LINE)
            m = CHUNK_LINE_RE.fullmatch(line)
            if m is None:
                raise bad(f"malformed chunk size line {line[:40]!r} in a chunked request body: "
                          f"expected 1-8 hex digits, optional ;extensions, CRLF")
            size = int(m.group(1), 16)
            if size == 0:
                break
            total += size
            if total > limit:
                raise APIError(413, f"request body is over {limit:,} bytes, the most this server "
                                    f"accepts (--max-body-bytes)", code="request_too_large")
            parts.append(self.rfile.read(size))
            if len(parts[-1]) < size or self.rfile.read(2) != b"\r\n":
                raise bad("a chunk of the request body is shorter than its size line says, or not "
                          "followed by CRLF")
        for _ in range(MAX_TRAILERS):  # trailer fields, up to the blank line
            line = self.rfile.readline(MAX_LINE)
            if line in (b"\r\n", b"\n"):
                return b"".join(parts)
            if not line.endswith(b"\n"):
                break
        raise bad(f"the chunked request body does not end with a blank line within "
                  f"{MAX_TRAILERS} trailer lines")

    def _skip_body(self) -> bool:
        """Read and drop the body of a request refused before its body was read. False when that
        is not possible (too large, malformed, or half read already): the connection must then
        close."""
        if self.body_touched:
            return False
        try:
            self._read_json()
        except APIError:  # a body that is read but is not JSON is still out of the way
            return self.body_read
        return True

    # --- responses
    def _cors_headers(self) -> None:
        if self.cors is not None:
            self.send_header("Access-Control-Allow-Origin", self.cors)
            self.send_header("Vary", "Origin")

    def _send_json(self, status: int, obj: Any, close: bool = False,
                   headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self._cors_headers()
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        # a HEAD response has headers only (RFC 9110 §9.3.2)
        if self.command != "HEAD":
            self.wfile.write(data)
        self.status = status

    def _send_error(self, err: APIError) -> None:
        # headers are out: report in-band, as OpenAI does, and end the stream
        if self.streaming:
            self._write_event(sse({"error": err.body()["error"]}))
            self._end_stream()
            return
        # A body left unread would be parsed as the next request of this connection: read it if it
        # is within the limit. A body over the limit is never read: answer and close at once. A
        # client still sending then gets a connection reset for what follows; the answer was sent
        # before it and stays readable (httpx, the openai library's transport, reads it; Python's
        # http.client gives up on the failed send). nginx instead reads and discards up to 30 s
        # more (lingering_close), the reading of a refused body this server avoids.
        reusable = self.body_read or self._skip_body()
        self._send_json(err.status, err.body(), close=not reusable, headers=err.headers)

    # --- server-sent events over chunked transfer encoding (HTTP/1.0 clients: plain body, then
    # close)
    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self._cors_headers()
        self._chunked = self.request_version != "HTTP/1.0"
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.status, self.streaming = 200, True

    def _write_event(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def _end_stream(self) -> None:
        self._write_event(sse(b"[DONE]"))
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")
