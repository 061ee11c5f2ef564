"""An OpenAI-compatible chat server for Kimi K2: `openai` client code (the README's examples) runs unchanged.

`python serve.py` serves the shipped demo model on http://127.0.0.1:8000/v1 under the name `kimi-k2-instruct`:
  GET  /v1/models              the one served model, in OpenAI's list shape
  POST /v1/chat/completions    OpenAI's chat wire format: every role incl. `tool` and assistant `tool_calls`; `tools`
                               (flat or wrapped schemas) and `tool_choice`; temperature, top_p, max_tokens, stop,
                               seed; `stream: true` (server-sent events); usage; finish_reason stop/length/tool_calls;
                               continuing a final assistant message (Kimi's `partial`, vLLM's `continue_final_message`)

What differs from a textbook "wrap generate() in a web handler":
1. Tool calls. The model writes K2's tool-call section as text (Moonshot's docs/tool_call_guidance.md):
   `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}...`.
   A K2 deployment (vLLM/SGLang with the `kimi_k2` parser, deploy_guidance.md) returns that as structured
   `tool_calls`: the id as the model wrote it (K2 numbers its calls on from those already in the history; ids
   made up for botched calls, and the forced ones of point 3, count the same way), type function, the name, the
   arguments as a JSON string;
   `content` is the text before the section (null if empty), and finish_reason is "tool_calls" (same guide), or
   "length" if the token limit cut the section off. We do the same with tools.parse_assistant. A call the model
   botched (broken JSON, a bad id) is still returned, with arguments "{}" so that the client can send the turn back
   (tokenizer.encode_chat accepts only JSON-object arguments); what was wrong is written to the server log.
   Two rules keep a model's text from acting as a call. The structure comes from special token ids only: a model
   can spell `<|tool_call_begin|>` with ordinary byte tokens too, so the text of ordinary tokens reaches this file
   with its '|' masked (tokenizer.PIPE_MASK; unmasked in what is sent), and such a spelling stays content. And a
   call to a tool the request did not declare (or whose name is unreadable) is never returned: it is dropped and
   logged; if no call is left, the answer is the content before the section, with finish_reason "stop".
2. Streaming without leaking markers. Text is held back while it may be the start of a tool-call section; inside a
   section each call is sent as soon as its id is complete (index, id, type, name) and its arguments once the call
   is closed, as one fragment, because only then is it known whether they are JSON (`ToolCallStreamer`, a state
   machine: the work per token does not grow with the answer). So the concatenated deltas equal the non-streamed
   answer, always (tests/test_serve.py checks it).
3. tool_choice (OpenAI's four forms), done by shaping the prompt, as constrained engines do:
   - "auto" (the default when tools are given): tools declared; the model decides.
   - "none" (the default without tools): tools are NOT rendered into the prompt (a model shown tools is primed to
     call them), and `<|tool_calls_section_begin|>` is a stop string, so no call can come out: the text before it
     is the answer, finish_reason "stop".
   - "required": tools declared, and `<|tool_calls_section_begin|><|tool_call_begin|>` is prefilled after the
     generation prompt; the model's next tokens are then constrained (generate.constrain_start, a token-level mask
     as guided decoding does) to `functions.NAME:IDX<|tool_call_argument_begin|>` for a declared NAME, so it picks
     which tool by its own probabilities but cannot invent one.
   - {"type": "function", "function": {"name": N}}: prefill up to the arguments,
     `...<|tool_call_begin|>functions.N:IDX<|tool_call_argument_begin|>`, so the model writes only N's arguments.
   The prefill is returned as part of the answer (it is what the assistant said) but counted in prompt_tokens,
   since the model did not sample it; max_tokens bounds the sampled tokens only. The model may still add calls
   after a forced one (no grammar constrains it). parallel_tool_calls false returns only the first call, as vLLM
   does (vllm-project/vllm#26233: later calls are dropped from the answer, generation is not cut short).
4. One model, one request at a time. `Worker` is the only thread that touches the model: HTTP threads validate and
   tokenize a request, put it on a FIFO queue, and relay what the worker produces. Each request gets its own KV
   cache (generate.TextStream builds one), and in eval mode a forward writes nothing into the model, so the queue
   is less about corruption than about keeping it that way whatever the model grows (a kernel workspace, a shared
   cache) and about predictability: each request runs at full speed with the whole CPU/GPU, and gets exactly the
   answer it would get alone with its seed. No batching: with 8 clients the 8th waits for 7 answers
   (bench/bench_serve.py measures it); continuous batching is what vLLM and SGLang add. At most --max-queue requests wait
   (more get 429 with Retry-After), and a request whose client disconnects, streamed or not, is cancelled, so
   nobody waits behind an answer no one will read.
5. Continuing a message. A last assistant message with `"partial": true` (Moonshot's API), or the request field
   `continue_final_message: true` (vLLM's), renders the prompt without that message's <|im_end|> and without a new
   turn (add_generation_prompt false), so the model continues the given text; the answer is the continuation only.

Why the standard library's http.server.ThreadingHTTPServer and not FastAPI/uvicorn: it is well known, has zero
dependencies, and is enough for an educational single-model server whose throughput is bound by the model anyway;
server-sent events are plain chunked writes.

Defaults: loopback only (127.0.0.1; there is no TLS, so exposing it means --host 0.0.0.0 and --api-key, or
$KIMI_API_KEY, which does not show in `ps`), temperature 0.6 (Moonshot's recommendation for Kimi-K2-Instruct,
MoonshotAI/Kimi-K2 README), max_tokens when absent = min(256, what is left of the context)
(--default-max-tokens), request bodies up to
4 MiB (--max-body-bytes, refused on the headers when they declare more, and never read), 32 waiting requests
(--max-queue), 128 open connections (--max-connections; at the cap the one that has waited longest without a
complete request makes room), 30 s to send a request's header.

A local server is also reachable from any web page its user opens. So by default it answers only requests whose
Host is a loopback name or --host (a page that rebinds its own domain to 127.0.0.1 still sends that domain as
Host; --allowed-hosts adds names), refuses requests carrying a browser's Origin header (--allowed-origins allows
a page, with CORS), and wants `Content-Type: application/json` on POST (a page can send text/plain anywhere
without asking). HTTP framing that could be read two ways (Content-Length with chunked, differing lengths, other
transfer codings, chunk sizes that are not hex digits) is refused and the connection closed.

Not supported, and answered with a 400 naming the field rather than ignored: any field not in FIELDS (e.g.
repetition_penalty, min_p, best_of, functions), n > 1, logprobs, logit_bias, response_format other than text,
non-zero frequency/presence penalties, store. Null counts as absent. Images are refused by the tokenizer
(K2-Instruct has no vision input).

References: OpenAI API reference, Chat Completions (create, the chat.completion and chat.completion.chunk objects,
streaming, error codes); MoonshotAI/Kimi-K2 docs/tool_call_guidance.md and deploy_guidance.md; vLLM's `kimi_k2`
tool parser (id handling); Moonshot's partial mode (platform docs, "Partial Mode"); RFC 9110
and RFC 9112 (HTTP semantics and framing). No shapes in this file, so no shape legend.
"""
from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Protocol, Sequence

import torch

import generate as G
from tokenizer import (CALL_ARG_BEGIN, CALL_BEGIN, CALL_END, CALL_ID_RE, ROLES, SECTION_BEGIN, SECTION_END,
                       TOOL_NAME_RE, Tokenizer, ToolCall, find_section, join_segments, mask_pipes,
                       normalize_tools, parse_arguments, tool_call_head, tool_call_id, tool_call_opening,
                       unmask_pipes)
from tools import count_tool_calls, parse_assistant

DEFAULT_MODEL_NAME = "kimi-k2-instruct"  # the model name the README's `openai` client examples use
DEFAULT_TEMPERATURE = 0.6  # Kimi-K2-Instruct's recommended temperature (MoonshotAI/Kimi-K2 README)
DEFAULT_MAX_TOKENS = 256  # ours: OpenAI's default is "the rest of the context", too slow on a CPU for a default
# ours: a full 128K-token context is ~0.5 MB of text; 4 MiB leaves room for JSON escaping and tool schemas, and
# still stops a runaway client before it costs memory
DEFAULT_MAX_BODY_BYTES = 4 << 20
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts
MAX_STOP = 4  # OpenAI's limit: "Up to 4 sequences where the API will stop generating" (Chat Completions, stop)
# ours (OpenAI states none): every token is checked against every prefix of every stop string, so their length
# bounds the work per token; 128 characters is far beyond any real stop sequence
MAX_STOP_CHARS = 128
# ours: requests waiting for the model beyond the one it runs; more get 429. With one request at a time a long queue
# only turns into timeouts; 32 still lets bench/bench_serve.py's 8 clients and a classroom's worth of users line up
DEFAULT_MAX_QUEUE = 32
# ours: open connections (one thread each). At most --max-queue + 1 of them are busy with a request (the rest wait
# for one); 128 leaves room for a classroom's keep-alive connections besides a full default queue. A larger
# --max-queue raises it to twice the busy ones
DEFAULT_MAX_CONNECTIONS = 128
# ours: seconds a connection may wait for its next request line (and each header line) before it is closed; nginx
# waits 60 s for a request's header (client_header_timeout); the openai client drops its idle keep-alive
# connections after 5 s (httpx's keepalive_expiry)
HEADER_TIMEOUT = 30
API_KEY_ENV = "KIMI_API_KEY"  # --api-key's fallback: a key in the environment does not show in `ps`
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|::1|localhost)$")


# ---------------------------------------------------------------------------------------------------------------
# 1. Errors in OpenAI's shape
# ---------------------------------------------------------------------------------------------------------------

class APIError(Exception):
    """An error response: {"error": {"message", "type", "param", "code"}} with an HTTP status (OpenAI's shape).
    headers: extra response headers (Retry-After on a 429)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param, code)


# ---------------------------------------------------------------------------------------------------------------
# 2. The request: validation and the prompt
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ChatRequest:
    """A validated /v1/chat/completions body."""
    messages: list[dict]
    tools: list[dict] | None  # wrapped form (tokenizer.normalize_tools); None = no tools
    tool_choice: str  # "auto" | "none" | "required" | "function" (then `function` names it)
    function: str | None
    max_tokens: int | None  # None = the server's default
    max_tokens_param: str  # which field set it, for error messages
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    parallel_tool_calls: bool = True  # OpenAI's default; False: at most one call comes back
    continue_final: bool = False  # continue the last (assistant) message instead of starting a new turn


# The request fields this server reads; README lists them. Any other field with a value other than null is a 400
# naming it: silently ignoring, say, repetition_penalty would return an answer the client did not ask for.
FIELDS = frozenset({
    # OpenAI Chat Completions (create), implemented
    "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "stream",
    "stream_options", "tools", "tool_choice", "parallel_tool_calls",
    # OpenAI, accepted at the value that changes nothing (_refuse_unsupported)
    "n", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "logit_bias", "response_format",
    "store",
    # OpenAI, about who asks or how to route, not about the answer: accepted and ignored
    "user", "safety_identifier", "prompt_cache_key", "metadata", "service_tier",
    # vLLM's sampling and chat-template extensions (the last two accepted at their neutral value only)
    "top_k", "continue_final_message", "add_generation_prompt", "repetition_penalty", "min_p",
})


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_request(body: Any, served_name: str) -> ChatRequest:
    """Check a request body against OpenAI's rules (and ours); raises APIError naming the bad field."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter (a string); this server serves "
                  f"{served_name!r}", "model")
    if model != served_name:  # OpenAI answers an unknown model with 404 model_not_found
        raise APIError(404, f"The model `{model}` does not exist or you do not have access to it. This server "
                            f"serves `{served_name}` (GET /v1/models).", "model", "model_not_found")
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is a required property", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array of message objects", "messages")
    unknown = next((k for k, v in body.items() if k not in FIELDS and v is not None), None)
    if unknown is not None:
        raise bad(f"{unknown} is not supported by this server (it would be ignored, and the answer would not be the "
                  f"one asked for); remove it. Accepted fields: {', '.join(sorted(FIELDS))}", unknown)
    msgs, partial = [], False
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role', got {json.dumps(m)[:120]}",
                      f"messages[{i}]")
        if "partial" in m:  # Kimi's partial mode: the last message, an assistant one, is continued
            if not isinstance(m["partial"], (bool, type(None))):
                raise bad(f"messages[{i}].partial must be true or false", f"messages[{i}].partial")
            if m["partial"] and (i != len(messages) - 1 or m["role"] != "assistant"):
                raise bad("partial: true marks the last message, an assistant one, whose text the model continues",
                          f"messages[{i}].partial")
            partial = bool(m["partial"])
            m = {k: v for k, v in m.items() if k != "partial"}
        if m["role"] == "developer":  # OpenAI's newer name for the system role
            m = {**m, "role": "system"}
        # OpenAI allows text parts as assistant and tool content too; the template wants one string there (beside
        # tool_calls and in a tool result it would print a list as is), so join them
        if m["role"] in ("assistant", "tool") and isinstance(m.get("content"), list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in m["content"]):
            m = {**m, "content": "".join(p["text"] for p in m["content"])}
        if m["role"] not in ROLES:
            raise bad(f"messages[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)} (or developer)",
                      f"messages[{i}].role")
        msgs.append(m)

    def number(name: str, default: float, ok: Callable[[float], bool], rule: str) -> float:
        v = body.get(name)
        if v is None:
            return default
        if not _is_number(v) or not ok(v):
            raise bad(f"{name} must be a number {rule}, got {json.dumps(v)}", name)
        return float(v)

    temperature = number("temperature", DEFAULT_TEMPERATURE, lambda t: 0 <= t <= 2, "in [0, 2]")
    top_p = number("top_p", 1.0, lambda p: 0 < p <= 1, "in (0, 1]")
    top_k = body.get("top_k")  # not OpenAI's; vLLM's extension (-1 or 0 = off)
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise bad(f"top_k must be an integer >= -1 (-1 or 0 = off), got {json.dumps(top_k)}", "top_k")
    max_tokens, max_param = None, "max_tokens"
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are given (as vLLM)
        v = body.get(name)
        if v is not None:
            if not _is_int(v) or v < 1:
                raise bad(f"{name} must be an integer >= 1, got {json.dumps(v)}", name)
            max_tokens, max_param = v, name
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad(f"stop must be a string or an array of strings, got {json.dumps(body.get('stop'))[:120]}", "stop")
    if len(stop) > MAX_STOP:
        raise bad(f"stop: at most {MAX_STOP} sequences, got {len(stop)}", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad(f"stop: each sequence may have at most {MAX_STOP_CHARS} characters, got one of "
                  f"{max(len(s) for s in stop):,}", "stop")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise bad(f"seed must be an integer in [-2**63, 2**64), got {json.dumps(seed)[:40]}", "seed")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad(f"n must be 1: this server returns one choice per request (run n requests with different seeds "
                  f"instead), got {json.dumps(n)}", "n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad(f"stream must be true or false, got {json.dumps(stream)}", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    if options is not None and (not isinstance(options, dict) or
                                not isinstance(options.get("include_usage", False), bool)):
        raise bad("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    _refuse_unsupported(body)
    continue_final = _continue_final(body, msgs, partial)
    tools, tool_choice, function = _parse_tools(body.get("tools"), body.get("tool_choice"))
    return ChatRequest(msgs, tools, tool_choice, function, max_tokens, max_param, temperature, top_p,
                       max(top_k or 0, 0), seed, stop, stream, include_usage,
                       body.get("parallel_tool_calls") is not False, continue_final)


def _continue_final(body: dict, msgs: list[dict], partial: bool) -> bool:
    """Kimi's `partial: true` on the last message, or vLLM's `continue_final_message: true` (which vLLM pairs with
    `add_generation_prompt: false`): the prompt ends inside the last assistant message, with no <|im_end|> and no
    new turn, and the answer is what the model writes next."""
    cont, gen = body.get("continue_final_message"), body.get("add_generation_prompt")
    for name, v in (("continue_final_message", cont), ("add_generation_prompt", gen)):
        if not isinstance(v, (bool, type(None))):
            raise bad(f"{name} must be true or false, got {json.dumps(v)[:40]}", name)
    if cont and gen:
        raise bad("continue_final_message and add_generation_prompt cannot both be true (as in vLLM): continuing "
                  "the last message means no new assistant turn", "add_generation_prompt")
    if not (cont or partial):
        if gen is False:
            raise bad("add_generation_prompt false is supported together with continue_final_message true only",
                      "add_generation_prompt")
        return False
    last = msgs[-1]
    if last["role"] != "assistant" or last.get("tool_calls") or not isinstance(last.get("content"), str):
        raise bad("continuing the final message (partial / continue_final_message) needs the last message to be an "
                  "assistant message with string content and no tool_calls", "messages")
    return True


def _refuse_unsupported(body: dict) -> None:
    """Fields that would change the answer if honoured: refuse them instead of silently ignoring them."""
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"{name} is not supported by this server (only 0)", name)
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        raise bad("logprobs are not supported by this server", "logprobs")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported by this server", "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("response_format: only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
                  "response_format")
    if body.get("parallel_tool_calls") not in (None, True, False):
        raise bad("parallel_tool_calls must be true or false", "parallel_tool_calls")
    if body.get("store"):
        raise bad("store is not supported by this server: completions are not kept", "store")
    for name, neutral in (("repetition_penalty", 1), ("min_p", 0)):
        if body.get(name) not in (None, neutral):
            raise bad(f"{name} is not supported by this server (only {neutral}, which changes nothing)", name)


def _parse_tools(tools: Any, choice: Any) -> tuple[list[dict] | None, str, str | None]:
    """-> (wrapped tools or None, tool_choice mode, the forced function's name). Module docstring, point 3."""
    if tools is not None and not isinstance(tools, list):
        raise bad(f"tools must be an array of tool objects, got {json.dumps(tools)[:120]}", "tools")
    wrapped = None
    if tools:
        try:
            wrapped = normalize_tools(tools)
        except ValueError as err:
            raise bad(str(err), "tools") from None
        names = set()
        for i, t in enumerate(wrapped):
            fn = t["function"]
            name = fn.get("name")
            if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
                # the model names a tool only through the id functions.NAME:IDX, whose regex allows [\w.] (Moonshot)
                raise bad(f"tools[{i}]: function name {name!r} must be letters, digits, '_' or '.' (K2's call id "
                          f"functions.NAME:IDX cannot carry other characters)", f"tools[{i}].function.name")
            if name in names:
                raise bad(f"tools[{i}]: duplicate function name {name!r}", f"tools[{i}].function.name")
            names.add(name)
            if "parameters" in fn and not isinstance(fn["parameters"], dict):
                raise bad(f"tools[{i}]: parameters must be a JSON Schema object", f"tools[{i}].function.parameters")
            if "description" in fn and not isinstance(fn["description"], str):
                raise bad(f"tools[{i}]: description must be a string", f"tools[{i}].function.description")
    if choice is None:
        return wrapped, ("auto" if wrapped else "none"), None  # OpenAI's defaults
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad(f"tool_choice must be 'auto', 'none', 'required' or {{\"type\": \"function\", \"function\": "
                      f"{{\"name\": ...}}}}, got {choice!r}", "tool_choice")
        if choice == "required" and not wrapped:
            raise bad("tool_choice 'required' needs tools: the request declares none", "tool_choice")
        return wrapped, (choice if wrapped else "none"), None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad(f"tool_choice must be 'auto', 'none', 'required' or {{\"type\": \"function\", \"function\": "
                  f"{{\"name\": ...}}}}, got {json.dumps(choice)[:120]}", "tool_choice")
    declared = [t["function"]["name"] for t in wrapped or []]
    if name not in declared:
        raise bad(f"tool_choice names function {name!r}, which is not among the declared tools "
                  f"({', '.join(declared) or 'none'})", "tool_choice")
    return wrapped, "function", name


@dataclass
class Prompt:
    """What the model is fed: ids (template + prefill), and the prefill as text (it is part of the answer)."""
    ids: list[int]
    prefill: str
    first_index: int  # tool calls already in the history: the IDX of the next one (vLLM's kimi_k2 tool parser)
    allowed_starts: list[list[int]] = field(default_factory=list)  # what the completion may begin with (required)


def build_prompt(tok: Tokenizer, req: ChatRequest) -> Prompt:
    """The 0905 chat template with the generation prompt, plus the tool_choice prefill (module docstring, point 3)."""
    first_index = count_tool_calls(req.messages)
    try:  # continuing the last message: no <|im_end|> after it and no new turn (tokenizer._chat_segments, rule 5)
        ids, _ = tok.encode_chat(req.messages, req.tools if req.tool_choice != "none" else None,
                                 add_generation_prompt=not req.continue_final)
    except ValueError as err:  # bad roles, content, tool_calls, tool results: the tokenizer says what and where
        raise bad(str(err), "tools" if str(err).startswith("tools") else "messages") from None
    prefill, extra, starts = "", [], []
    if req.tool_choice in ("required", "function"):
        forced = tool_call_id(req.function, first_index) if req.tool_choice == "function" else None
        opening = tool_call_opening(forced)
        prefill, extra = join_segments(opening), tok.encode_segments(opening)
        if forced is None:  # the id of a declared tool, encoded as the template encodes it
            starts = [tok.encode_segments(tool_call_head(tool_call_id(t["function"]["name"], first_index)))
                      for t in req.tools]
    return Prompt(ids + extra, prefill, first_index, starts)


# ---------------------------------------------------------------------------------------------------------------
# 3. The engine (the model behind a small interface, so tests can put a scripted stand-in behind the same server)
# ---------------------------------------------------------------------------------------------------------------

class TextStreamLike(Protocol):
    """generate.TextStream's contract: iterate for text pieces, in which the '|' of ordinary tokens is masked
    (tokenizer.PIPE_MASK) so that K2's markers come only from special ids; afterwards finish_reason
    ("stop"/"length"), prompt_tokens and completion_tokens."""
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int

    def __iter__(self) -> Iterator[str]: ...


class Engine(Protocol):
    tok: Tokenizer
    context: int  # prompt + completion tokens the model can hold
    description: str

    def stream(self, prompt_ids: Sequence[int], params: G.SamplingParams) -> TextStreamLike: ...


class ModelEngine:
    """A model and its tokenizer; stream() is generate.TextStream (cached decode, stop tokens and strings, length).
    Tests put a scripted stand-in model here, so the same engine code runs behind the same server."""

    def __init__(self, model: Any, tok: Tokenizer, description: str = ""):
        self.model, self.tok = model, tok
        self.context = model.args.max_position_embeddings
        self.description = description or type(model).__name__

    @classmethod
    def load(cls, ckpt: str | Path, device: str = "", dtype: str = "") -> "ModelEngine":
        """A checkpoint directory (config.json, safetensors, tiktoken.model) via generate.load; device and dtype
        empty = autodetect, and the reason is part of the description printed at start."""
        dev, why_dev = G.pick_device(device)
        dt, why_dt = G.pick_dtype(dtype, dev)
        model, tok = G.load(ckpt, dev, dt)
        n = sum(p.numel() for p in model.parameters())
        return cls(model, tok, f"{ckpt} ({n / 1e6:,.1f} M parameters, context {model.args.max_position_embeddings})"
                               f"; device {dev} ({why_dev}); dtype {str(dt).removeprefix('torch.')} ({why_dt})")

    def stream(self, prompt_ids: Sequence[int], params: G.SamplingParams) -> TextStreamLike:
        return G.TextStream(self.model, self.tok, prompt_ids, params, mask_pipes=True)


# ---------------------------------------------------------------------------------------------------------------
# 4. The worker: the one thread that drives the model, FIFO
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One generation. The worker puts ("text", piece), then ("done", stream) or ("error", exception) on `events`."""
    prompt_ids: list[int]
    params: G.SamplingParams
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away: stop generating


class Worker:
    """Owns the engine; runs jobs one at a time in arrival order (queue.Queue is FIFO). At most max_queue jobs wait
    (cancelled ones do not count); one more is refused with a 429 whose Retry-After is the measured wait."""

    def __init__(self, engine: Engine, max_queue: int = DEFAULT_MAX_QUEUE):
        self.engine, self.max_queue = engine, max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.current: Job | None = None
        self.seconds_per_job = 1.0  # running average (weight 1/4 on the newest), for Retry-After
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        with self.lock:
            waiting = sum(1 for j in list(self.jobs.queue) if j is not None and not j.cancelled.is_set())
            if waiting >= self.max_queue:
                wait = max(1, math.ceil((waiting + 1) * self.seconds_per_job))
                raise APIError(429, f"The server is busy: {waiting} requests are waiting for the model (at most "
                                    f"{self.max_queue}, --max-queue). Retry in about {wait} s.",
                               code="rate_limit_exceeded", type="requests", headers={"Retry-After": str(wait)})
            self.jobs.put(job)
        return job

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running job, let the thread finish, and wait for it (a daemon, so exit never hangs on it)."""
        if self.current is not None:
            self.current.cancelled.set()
        self.jobs.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            self.current, t0 = job, time.perf_counter()
            try:
                stream = self.engine.stream(job.prompt_ids, job.params)
                for piece in stream:
                    job.events.put(("text", piece))
                    if job.cancelled.is_set():  # closing the generator ends the decode loop
                        break
                job.events.put(("done", stream))
            except Exception as err:  # reported to that request; the worker keeps serving the others
                job.events.put(("error", err))
            finally:
                self.current = None
                self.seconds_per_job += (time.perf_counter() - t0 - self.seconds_per_job) / 4


# ---------------------------------------------------------------------------------------------------------------
# 5. Model text -> OpenAI message and stream deltas
# ---------------------------------------------------------------------------------------------------------------

def finish_reason(text: str, stream_reason: str | None, has_calls: bool) -> str:
    """Moonshot's tool_call_guidance.md: "tool_calls" when the answer carries tool calls, except "length" when the
    token limit cut their section off (its calls are incomplete); otherwise the stream's "stop" / "length"."""
    if not has_calls:
        return stream_reason or "stop"
    if stream_reason == "length" and find_section(text)[1] < 0:
        return "length"
    return "tool_calls"


def assistant_message(text: str, first_index: int, max_calls: int | None = None,
                      declared: Collection[str] | None = None) -> tuple[dict, list[str]]:
    """The whole completion (pipes masked, TextStreamLike) -> ({"role", "content", ["tool_calls"]}, problems for the
    log). declared: the request's tool names; a call to any other tool is dropped (module docstring, point 1);
    None = keep all. max_calls: keep only the first calls (1 for parallel_tool_calls false); None = all."""
    turn = parse_assistant(text, None, first_index)
    problems = list(turn.errors) + [f"{c.id}: {c.error}" for c in turn.calls if c.error]
    if declared is not None:
        problems += [f"{c.id}: dropped, {c.name!r} is not a tool this request declared" for c in turn.calls
                     if c.name not in declared]
        turn.calls = [c for c in turn.calls if c.name in declared]
    if max_calls is not None and len(turn.calls) > max_calls:
        problems.append(f"parallel_tool_calls is false: dropped {len(turn.calls) - max_calls} call(s) after the first")
        turn.calls = turn.calls[:max_calls]
    # content: the text before the section; null when there is none but there are calls (as K2 deployments do)
    content = unmask_pipes(turn.content)
    msg: dict[str, Any] = {"role": "assistant", "content": content if content or not turn.calls else None}
    if turn.calls:
        msg["tool_calls"] = [c.to_openai() for c in turn.calls]
        for call in msg["tool_calls"]:
            call["function"]["arguments"] = unmask_pipes(call["function"]["arguments"])
    return msg, [unmask_pipes(p) for p in problems]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker (it may still become the marker)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallStreamer:
    """The completion text, piece by piece -> OpenAI delta dicts that add up to assistant_message(whole text).

    A small state machine over K2's markers, so each character is looked at a bounded number of times (the work
    per piece does not grow with the text before it): content is sent up to the tool-call section, holding back a
    tail that could be the start of its marker; in the section, call j's header (index, id, type, name) goes out
    once `functions.NAME:IDX<|tool_call_argument_begin|>` is complete, and its arguments once `<|tool_call_end|>`
    closes them. Both are final then (the same rules as the parser: tokenizer.CALL_RE), so nothing sent is ever
    taken back. A call to an undeclared tool is skipped; a malformed call stops the streaming of calls, and
    finish() sends the rest from the parser itself. Text is masked (TextStreamLike); deltas are not.
    max_calls and declared: as in assistant_message."""

    def __init__(self, first_index: int, max_calls: int | None = None, declared: Collection[str] | None = None):
        self.first_index, self.max_calls, self.declared = first_index, max_calls, declared
        self.pieces: list[str] = []  # everything fed, for finish()
        self.state = "content"  # -> section -> head -> args -> section ...; or done (section over), stuck (malformed)
        self.tail = ""  # fed text not consumed yet: a possible marker start, plus the newest piece
        self.field: list[str] = []  # the current call's id or arguments so far
        self.head: tuple[str, str] = ("", "")  # the current call's id and name
        self.keep = False  # the current call goes out (declared, and within max_calls)
        self.content_sent, self.headers_sent, self.args_sent = 0, 0, 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def feed(self, piece: str) -> list[dict]:
        self.pieces.append(piece)
        self.tail += piece
        out: list[dict] = []
        while self.state not in ("done", "stuck"):
            if self.state == "content":
                before, marker = self._next(SECTION_BEGIN)
                if before:
                    out.append({"content": unmask_pipes(before)})
                    self.content_sent += len(before)
                if marker is None:
                    break
                self.state = "section"
            elif self.state == "section":  # between calls: text here is not part of any call
                _, marker = self._next(CALL_BEGIN, SECTION_END)
                if marker is None:
                    break
                self.state, self.field = ("head", []) if marker == CALL_BEGIN else ("done", [])
            else:  # head or args: collect up to the marker that ends them
                ending = CALL_ARG_BEGIN if self.state == "head" else CALL_END
                before, marker = self._next(ending, CALL_BEGIN, SECTION_END)
                self.field.append(before)
                if marker is None:
                    break
                if marker != ending:  # a call without its argument marker or end marker: malformed
                    self.state = "stuck"
                elif self.state == "head":
                    out += self._head("".join(self.field).strip())
                else:
                    out += self._args("".join(self.field).strip())
        if self.state in ("done", "stuck"):
            self.tail = ""
        return out

    def _next(self, *markers: str) -> tuple[str, str | None]:
        """Consume the tail up to and including the first of markers -> (text before it, marker); or, with none in
        it, up to a possible start of one -> (that text, None)."""
        hits = [(i, m) for m in markers if (i := self.tail.find(m)) >= 0]
        if hits:
            i, marker = min(hits)
            before, self.tail = self.tail[:i], self.tail[i + len(marker):]
            return before, marker
        cut = len(self.tail) - max(_partial_suffix(self.tail, m) for m in markers)
        before, self.tail = self.tail[:cut], self.tail[cut:]
        return before, None

    def _head(self, head: str) -> list[dict]:
        idm = CALL_ID_RE.match(head)
        if idm is None:  # a malformed id: the parser will make one up in finish()
            self.state = "stuck"
            return []
        self.state, self.field, self.head = "args", [], (head, idm.group("name"))
        self.keep = (self.declared is None or idm.group("name") in self.declared) and (
            self.max_calls is None or self.headers_sent < self.max_calls)
        if not self.keep:
            return []
        self.headers_sent += 1
        return [self._header(self.headers_sent - 1, head, idm.group("name"))]

    def _args(self, raw: str) -> list[dict]:
        self.state, self.field = "section", []
        if not self.keep:
            return []
        self.args_sent += 1
        if self.max_calls is not None and self.args_sent >= self.max_calls:
            self.state = "done"
        (call_id, name), (args, _) = self.head, parse_arguments(self.head[0], raw)
        call = ToolCall(id=call_id, name=name, raw_arguments=raw, arguments=args)
        return [self._arguments(self.args_sent - 1, unmask_pipes(call.to_openai()["function"]["arguments"]))]

    def finish(self) -> list[dict]:
        """End of the completion: the content and calls not sent yet, straight from assistant_message."""
        msg, _ = assistant_message(self.text, self.first_index, self.max_calls, self.declared)
        out = []
        content = msg["content"] or ""
        if len(content) > self.content_sent:
            out.append({"content": content[self.content_sent:]})
            self.content_sent = len(content)
        for j, call in enumerate(msg.get("tool_calls", [])):
            if j >= self.headers_sent:
                out.append(self._header(j, call["id"], call["function"]["name"]))
                self.headers_sent += 1
            if j >= self.args_sent:
                out.append(self._arguments(j, call["function"]["arguments"]))
                self.args_sent += 1
        return out

    @staticmethod
    def _header(j: int, call_id: str, name: str) -> dict:
        return {"tool_calls": [{"index": j, "id": call_id, "type": "function",
                                "function": {"name": name, "arguments": ""}}]}

    @staticmethod
    def _arguments(j: int, args: str) -> dict:
        return {"tool_calls": [{"index": j, "function": {"arguments": args}}]}


# ---------------------------------------------------------------------------------------------------------------
# 6. HTTP: the server, then one request's story (checks, route, answer), then the plumbing under it
# ---------------------------------------------------------------------------------------------------------------

class ChatServer(ThreadingHTTPServer):
    """The HTTP server: one thread per connection (ThreadingHTTPServer), one Worker for the model.

    allowed_hosts: Host header names accepted besides loopback ones and the bound address ("*" = any); a browser
    page that reaches 127.0.0.1 through DNS rebinding sends its own domain as Host, so it is refused.
    allowed_origins: web origins (e.g. http://localhost:3000) whose pages may call the server ("*" = any); any other
    request with an Origin header, i.e. from a browser page, is refused.
    max_connections: open connections at most (None: DEFAULT_MAX_CONNECTIONS, or twice max_queue + 1 if more);
    header_timeout: seconds a connection may wait for its next request line before it is closed."""
    daemon_threads = True  # a connection left open never blocks shutdown
    # the listen backlog: socketserver's default of 5 drops the connects of a burst (each then retried by the
    # client's kernel after 1 s); the system's maximum, as uvicorn and nginx use a large one (2048, 511)
    request_queue_size = socket.SOMAXCONN

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000,
                 served_model_name: str = DEFAULT_MODEL_NAME, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 log: Callable[[str], None] | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 allowed_hosts: Sequence[str] = (), allowed_origins: Sequence[str] = (),
                 max_connections: int | None = None, header_timeout: float = HEADER_TIMEOUT):
        super().__init__((host, port), Handler)
        self.max_connections = (max(DEFAULT_MAX_CONNECTIONS, 2 * (max_queue + 1)) if max_connections is None
                                else max_connections)
        self.header_timeout = header_timeout
        # open connections -> since when each has waited for a request (time.monotonic()), None while it has one
        self.waiting_since: dict[socket.socket, float | None] = {}
        self.connections_lock = threading.Lock()
        self.engine, self.worker = engine, Worker(engine, max_queue)
        self.served_model_name, self.api_key = served_model_name, api_key
        self.max_body_bytes, self.default_max_tokens = max_body_bytes, default_max_tokens
        sink = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.log = lambda line: sink(_printable(line))  # request paths and headers are the client's text
        self.allowed_hosts = {h.lower() for h in allowed_hosts} | ({host.lower()} if host not in ("", "0.0.0.0", "::")
                                                                   else set())
        self.allowed_origins = set(allowed_origins)
        self.started = int(time.time())

    def host_allowed(self, name: str) -> bool:
        return bool(LOOPBACK.match(name)) or name in self.allowed_hosts or "*" in self.allowed_hosts

    # --- the connection cap. At the cap, a new connection takes the place of the one that has waited longest
    # without sending a complete request (its socket is shut down, which ends its thread's read at once). A flood
    # of idle or trickling sockets therefore only ever evicts its own oldest members, while a normal client's
    # connection is the newest and sends its request within milliseconds, after which it cannot be evicted. Only
    # when every connection is busy with a request (at most --max-queue + 1 can be, plus answers being written) is
    # the new one refused: 503 with Retry-After, written here without starting a thread.
    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self.connections_lock:
            if len(self.waiting_since) >= self.max_connections:
                waiting = [(since, sock) for sock, since in self.waiting_since.items() if since is not None]
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
                self.log(f"{peer}: closed, to make room at {self.max_connections} connections (--max-connections) "
                         f"(it had waited longest without a complete request)")
            self.waiting_since[request] = time.monotonic()
        super().process_request(request, client_address)

    def mark_waiting(self, sock: socket.socket, waiting: bool) -> None:
        """A connection starts waiting for a request (True) or has received one in full (False)."""
        with self.connections_lock:
            if sock in self.waiting_since:  # not if it was evicted meanwhile
                self.waiting_since[sock] = time.monotonic() if waiting else None

    def shutdown_request(self, request: socket.socket) -> None:  # socketserver's hook: a connection ends
        with self.connections_lock:
            self.waiting_since.pop(request, None)
        super().shutdown_request(request)

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        wait = max(1, math.ceil(self.worker.seconds_per_job))  # a connection frees when the running request ends
        err = APIError(503, f"all {self.max_connections} connections this server accepts (--max-connections) are "
                            f"busy with requests; retry in about {wait} s", code="server_busy")
        body = json.dumps(err.body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                f"{len(body)}\r\nRetry-After: {wait}\r\nConnection: close\r\n\r\n").encode()
        try:  # a fresh socket's send buffer is empty: this never blocks the accepting thread
            request.setblocking(False)
            request.send(head + body)
        except OSError:
            pass
        super().shutdown_request(request)
        self.log(f"{client_address[0]}:{client_address[1]} refused: 503, all {self.max_connections} connections "
                 f"busy")

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Errors outside a request (socketserver's hook). A client dropping an idle keep-alive connection is
        routine and stays quiet; anything else is logged with its traceback."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            self.log(f"error on the connection from {client_address[0]}:{client_address[1]}\n"
                     f"{traceback.format_exc()}")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        """Stop serving (call from another thread than serve_forever), close the socket, stop the worker."""
        self.shutdown()
        self.server_close()
        self.worker.stop()


_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls but newline: terminal escapes
HOST_RE = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::\d*)?|(?P<name>[^:\[\]/@\s]+)(?::\d*)?")  # RFC 9110 §7.2
# RFC 9112 §7.1.1: chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ), value a
# token or a quoted-string. Eight hex digits are 4 GiB, already far over any body limit.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
CHUNK_LINE_RE = re.compile(rb"([0-9A-Fa-f]{1,8})(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|\"(?:[^\"\\\r\n]|\\.)*\"))?)*"
                           rb"\r?\n" % (_TOKEN, _TOKEN))
MAX_LINE = 1024  # ours: bytes in a chunk-size or trailer line (a real one is a few bytes)
MAX_TRAILERS = 32  # ours: trailer lines after the last chunk (clients send none)


def _printable(line: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line)


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"


def _json_int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:  # over Python's int_max_str_digits (4,300 by default): a client error, not a 500
        raise ValueError(f"an integer of {len(digits):,} digits (at most {sys.get_int_max_str_digits():,})") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity); send a number")


class Handler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection (keep-alive, as the openai client uses it). Checks, routes, answers, errors."""
    protocol_version = "HTTP/1.1"
    server_version = "kimi-k2-serve/1"
    timeout = 120  # seconds any one socket read or write within a request may block; a stalled client then frees
    # its thread. Waiting for a request line and headers is bounded by the server's header_timeout instead
    # A response is two writes (headers, body); with Nagle's algorithm (RFC 896) the second waits for the client's
    # delayed ACK of the first (RFC 1122 §4.2.3.2): ~40 ms added to every answer on a keep-alive connection.
    disable_nagle_algorithm = True
    poll_seconds = 0.2  # ours: while a request waits for the model, how often to check that its client is there
    cors: str | None = None  # the request's Origin, when it is allowed (per request; see _handle)
    server: ChatServer

    # --- entry points: every method goes through _handle, so every failure is an OpenAI-shaped error
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

    def do_HEAD(self) -> None:  # both answered 405 in OpenAI's shape rather than http.server's HTML 501 page
        self._handle()

    def do_OPTIONS(self) -> None:  # and a CORS preflight from an allowed origin
        self._handle()

    def handle_one_request(self) -> None:
        """http.server reads the request line and headers, then calls do_METHOD (which goes to _handle)."""
        self.server.mark_waiting(self.connection, True)
        self.connection.settimeout(self.server.header_timeout)
        super().handle_one_request()

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # replaced by the one line per request _handle writes

    def log_error(self, format: str, *args: Any) -> None:  # malformed request lines, timeouts
        self.server.log(f"{self.address_string()} {format % args}")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header block: 400, 414, 431, 505) in OpenAI's
        shape rather than its HTML page, and always with a status line: for a request line it could not read,
        http.server would otherwise answer as to HTTP/0.9, with a bare body."""
        self.log_error("code %d, message %s", code, message)
        if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
            self.request_version = "HTTP/1.0"
        err = APIError(code, message or "the request could not be read")
        self._send_json(code, err.body(), close=True)

    def _handle(self) -> None:
        # one Handler serves every request of a keep-alive connection: reset the per-request state
        t0, self.status, self.usage, self.streaming = time.perf_counter(), 0, None, False
        self.body_touched = self.body_read = False
        self.cors = None  # the allowed Origin
        path = self.path.split("?", 1)[0]
        self.connection.settimeout(self.timeout)
        try:
            self._check_framing()
            if not self.headers.get("Transfer-Encoding") and int(self.headers.get("Content-Length", "0")) == 0:
                self.server.mark_waiting(self.connection, False)  # no body: the request is complete
            self._check_host()
            self._check_origin()
            if self.command == "OPTIONS" and self.cors is not None:
                return self._preflight()
            self._check_auth()
            if path == "/v1/models" or path.startswith("/v1/models/"):
                self._require_method("GET")
                self._models(path)
            elif path == "/v1/chat/completions":
                self._require_method("POST")
                self._chat()
            else:
                raise APIError(404, f"Invalid URL ({self.command} {path}): this server has GET /v1/models and "
                                    f"POST /v1/chat/completions")
        except APIError as err:
            if err.status == 500:  # the server's fault (the model's output): say what, once
                self.server.log(f"  {err.message}")
            self._send_error(err)
        except ConnectionError:  # the client went away (broken pipe, reset, closed while waiting)
            self.close_connection = True
            self.status = 499  # nginx's "client closed request"
        except Exception as err:  # a bug: answer 500 with the message, keep serving
            self.server.log(traceback.format_exc())
            self._send_error(APIError(500, f"internal error: {type(err).__name__}: {err}"))
        finally:
            tokens = (f" tokens={self.usage['prompt_tokens']}+{self.usage['completion_tokens']}" if self.usage
                      else "")
            self.server.log(f"{self.command} {path} {self.status}{tokens} {time.perf_counter() - t0:.2f}s")

    # --- routes
    def _models(self, path: str) -> None:
        card = {"id": self.server.served_model_name, "object": "model", "created": self.server.started,
                "owned_by": "kimi-k2-reference", "max_model_len": self.server.engine.context}
        if path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [card]})
        name = path.removeprefix("/v1/models/")
        if name != card["id"]:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                           "model", "model_not_found")
        self._send_json(200, card)

    def _chat(self) -> None:
        server, engine = self.server, self.server.engine
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":  # a web page can POST text/plain cross-origin without asking (CORS)
            raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                           code="unsupported_media_type")
        req = parse_request(self._read_json(), server.served_model_name)
        prompt = build_prompt(engine.tok, req)
        n_prompt, context = len(prompt.ids), engine.context
        room = context - n_prompt  # tokens left for the completion
        if room < 1:  # the messages alone fill the context: no max_tokens can help, whatever was asked
            raise bad(f"This model's maximum context length is {context} tokens; the messages alone take "
                      f"{n_prompt}. Shorten the messages.", "messages", "context_length_exceeded")
        if req.max_tokens is None:
            max_tokens = min(server.default_max_tokens, room)
        elif req.max_tokens > room:
            raise bad(f"This model's maximum context length is {context} tokens. However, you requested "
                      f"{n_prompt + req.max_tokens} tokens ({n_prompt} in the messages, {req.max_tokens} in the "
                      f"completion). Reduce the messages or {req.max_tokens_param} (at most {room}).",
                      req.max_tokens_param, "context_length_exceeded")
        else:
            max_tokens = req.max_tokens
        # the model's text has its ordinary '|' masked (TextStreamLike), so user stop strings are matched masked;
        # tool_choice "none": the section marker stops generation, so no call can come out (docstring, point 3)
        stop = [mask_pipes(s) for s in req.stop] + ([SECTION_BEGIN] if req.tool_choice == "none" else [])
        params = G.SamplingParams(max_tokens, req.temperature, req.top_p, req.top_k, req.seed, stop,
                                  allowed_starts=prompt.allowed_starts)
        job = server.worker.submit(Job(prompt.ids, params))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": server.served_model_name}
        declared = {t["function"]["name"] for t in req.tools or []}
        max_calls = None if req.parallel_tool_calls else 1
        try:
            if req.stream:
                self._chat_stream(job, prompt, req, meta, ToolCallStreamer(prompt.first_index, max_calls, declared))
            else:
                self._chat_once(job, prompt, meta, max_calls, declared)
        finally:
            job.cancelled.set()  # no-op when it finished; stops the decode loop if the client went away

    def _events(self, job: Job) -> Iterator[tuple[str, Any]]:
        """What the worker produces for job; a client that closes its connection meanwhile ends the wait."""
        check_at = time.monotonic() + self.poll_seconds
        while True:
            try:
                kind, value = job.events.get(timeout=self.poll_seconds)
            except queue.Empty:
                kind = value = None
            if time.monotonic() >= check_at:  # while queued, and while a non-streamed answer is being generated
                if self._client_gone():
                    raise ConnectionAbortedError("the client closed the connection")
                check_at = time.monotonic() + self.poll_seconds
            if kind is None:
                continue
            if kind == "error":
                if isinstance(value, G.NonFiniteLogits):  # generate.sample's check: the model's fault
                    raise APIError(500, str(value), code="model_error")
                if isinstance(value, ValueError):  # e.g. generate.check_context: the request's fault
                    raise bad(str(value))
                raise value
            yield kind, value
            if kind == "done":
                return

    def _usage(self, stream: TextStreamLike) -> dict:
        p, c = stream.prompt_tokens, stream.completion_tokens  # p includes the prefill (the model did not sample it)
        self.usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        return self.usage

    def _chat_once(self, job: Job, prompt: Prompt, meta: dict, max_calls: int | None, declared: set[str]) -> None:
        pieces, stream = [prompt.prefill], None
        for kind, value in self._events(job):
            if kind == "text":
                pieces.append(value)
            else:
                stream = value
        text = "".join(pieces)
        msg, problems = assistant_message(text, prompt.first_index, max_calls, declared)
        for p in problems:
            self.server.log(f"  tool-call problem: {p}")
        reason = finish_reason(text, stream.finish_reason, "tool_calls" in msg)
        self._send_json(200, {**meta, "choices": [{"index": 0, "message": msg, "logprobs": None,
                                                   "finish_reason": reason}], "usage": self._usage(stream)})

    def _chat_stream(self, job: Job, prompt: Prompt, req: ChatRequest, meta: dict,
                     splitter: ToolCallStreamer) -> None:
        base = {**meta, "object": "chat.completion.chunk"}
        if req.include_usage:
            base["usage"] = None  # OpenAI: every chunk has usage null, then one last chunk carries it

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        started = False
        for kind, value in self._events(job):
            if not started:  # headers go out with the first event, so an early failure is still a plain error
                self._start_stream()
                self._write_event(chunk({"role": "assistant", "content": ""}))
                for delta in splitter.feed(prompt.prefill):
                    self._write_event(chunk(delta))
                started = True
            if kind == "text":
                for delta in splitter.feed(value):
                    self._write_event(chunk(delta))
            else:
                stream = value
        for delta in splitter.finish():
            self._write_event(chunk(delta))
        self._write_event(chunk({}, finish_reason(splitter.text, stream.finish_reason, splitter.headers_sent > 0)))
        usage = self._usage(stream)
        if req.include_usage:
            self._write_event(_sse({**base, "choices": [], "usage": usage}))
        self._end_stream()

    # --- checks, in the order _handle runs them
    def _check_framing(self) -> None:
        """RFC 9112's rules for where a request and its body end (§6.1, §6.3) and for Host (§3.2). A request that
        breaks them could be read two ways (by a proxy in front, and by us), so it is refused and the connection
        closed rather than guessed at."""
        h = self.headers
        hosts, lengths = h.get_all("Host") or [], h.get_all("Content-Length") or []
        codings = h.get_all("Transfer-Encoding") or []
        err = None
        if len(hosts) > 1 or (not hosts and self.request_version == "HTTP/1.1"):
            err = bad("an HTTP/1.1 request needs exactly one Host header (RFC 9112 §3.2)")
        elif codings and lengths:
            err = bad("Content-Length and Transfer-Encoding together: send one of them (RFC 9112 §6.3)")
        elif codings and ",".join(codings).strip().lower() != "chunked":
            err = APIError(501, f"Transfer-Encoding {','.join(codings)[:40]!r} is not supported; send the body with "
                                f"Content-Length or Transfer-Encoding: chunked", code="not_implemented")
        elif len({v.strip() for v in lengths}) > 1:
            err = bad(f"differing Content-Length headers {[v[:20] for v in lengths][:4]}: send one")
        elif lengths and not re.fullmatch(r"[0-9]{1,15}", lengths[0].strip()):
            err = bad(f"invalid Content-Length header {lengths[0][:40]!r}: expected a number of bytes")
        if err is not None:
            self.body_touched = True  # where the body ends is unknown: answer and close
            raise err

    def _check_host(self) -> None:
        host = self.headers.get("Host")
        if host is None:  # HTTP/1.0 (an HTTP/1.1 request without one was refused above)
            return
        m = HOST_RE.fullmatch(host.strip())
        name = (m.group("v6") or m.group("name")).lower().rstrip(".") if m else ""
        if not self.server.host_allowed(name):
            raise APIError(400, f"Host {host[:80]!r} is not a name this server answers to (loopback by default, so "
                                f"that a web page cannot reach it through DNS rebinding); start the server with "
                                f"--allowed-hosts NAME to accept more", code="host_not_allowed")

    def _check_origin(self) -> None:
        """A browser marks a page's requests with Origin; other clients (the openai library, curl) send none."""
        origin = self.headers.get("Origin")
        if origin is None:
            return
        if origin in self.server.allowed_origins or "*" in self.server.allowed_origins:
            self.cors = origin
            return
        raise APIError(403, f"Requests from web pages (here Origin {origin[:80]!r}) are refused: any site could "
                            f"otherwise use this server from its visitors' browsers. To allow one, start the server "
                            f"with --allowed-origins ORIGIN", code="origin_not_allowed")

    def _preflight(self) -> None:
        """The CORS preflight a browser sends before a page's JSON POST (Fetch standard, CORS protocol)."""
        self.send_response(204)
        self._cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers", "authorization, content-type"))
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.status = 204

    def _check_auth(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):  # constant time
            raise APIError(401, "Incorrect API key provided. Send the key given to --api-key as 'Authorization: "
                                "Bearer KEY'." if given else "You didn't provide an API key. Send "
                                "'Authorization: Bearer KEY' (the key given to --api-key).", code="invalid_api_key")

    def _require_method(self, method: str) -> None:
        if self.command != method:
            raise APIError(405, f"Method {self.command} not allowed on {self.path.split('?')[0]}; use {method}",
                           code="method_not_allowed")

    def _client_gone(self) -> bool:
        """True when the client has closed its end: the socket reads as end-of-file. MSG_PEEK leaves any pipelined
        request in place. (A client that half-closes and still waits for its answer looks gone too; HTTP clients
        do not do that.)"""
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
            n = int(self.headers.get("Content-Length", "0"))  # _check_framing checked that it is a number
            if n > limit:  # refused on the headers alone: none of the body is read (_send_error closes)
                raise APIError(413, f"request body is {n:,} bytes; this server accepts at most {limit:,} "
                                    f"(--max-body-bytes)", code="request_too_large")
            raw = self.rfile.read(n)
            if len(raw) < n:
                raise bad(f"the request body ended after {len(raw):,} of its {n:,} bytes (Content-Length)")
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
        """A body sent with Transfer-Encoding: chunked (RFC 9112 §7.1): hex size line, data, CRLF; 0 ends it. Never
        reads more than `limit` bytes of data, and every line it reads is bounded."""
        parts, total = [], 0
        while True:
            line = self.rfile.readline(MAX_LINE)
            m = CHUNK_LINE_RE.fullmatch(line)
            if m is None:
                raise bad(f"malformed chunk size line {line[:40]!r} in a chunked request body: expected 1-8 hex "
                          f"digits, optional ;extensions, CRLF")
            size = int(m.group(1), 16)
            if size == 0:
                break
            total += size
            if total > limit:
                raise APIError(413, f"request body is over {limit:,} bytes, the most this server accepts "
                                    f"(--max-body-bytes)", code="request_too_large")
            parts.append(self.rfile.read(size))
            if len(parts[-1]) < size or self.rfile.read(2) != b"\r\n":
                raise bad("a chunk of the request body is shorter than its size line says, or not followed by CRLF")
        for _ in range(MAX_TRAILERS):  # trailer fields, up to the blank line
            line = self.rfile.readline(MAX_LINE)
            if line in (b"\r\n", b"\n"):
                return b"".join(parts)
            if not line.endswith(b"\n"):
                break
        raise bad(f"the chunked request body does not end with a blank line within {MAX_TRAILERS} trailer lines")

    def _skip_body(self) -> bool:
        """Read and drop the body of a request refused before its body was read. False when that is not possible
        (too large, malformed, or half read already): the connection must then close."""
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

    def _send_json(self, status: int, obj: Any, close: bool = False, headers: dict[str, str] | None = None) -> None:
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
        if self.command != "HEAD":  # a HEAD response has headers only (RFC 9110 §9.3.2)
            self.wfile.write(data)
        self.status = status

    def _send_error(self, err: APIError) -> None:
        if self.streaming:  # headers are out: report in-band, as OpenAI does, and end the stream
            self._write_event(_sse({"error": err.body()["error"]}))
            self._end_stream()
            return
        # A body left unread would be parsed as the next request of this connection: read it if it is within
        # the limit. A body over the limit is never read: answer and close at once. A client still sending then
        # gets a connection reset for what follows; the answer was sent before it and stays readable (httpx, the
        # openai library's transport, reads it; Python's http.client gives up on the failed send). nginx instead
        # reads and discards up to 30 s more (lingering_close), the reading of a refused body this server avoids.
        reusable = self.body_read or self._skip_body()
        self._send_json(err.status, err.body(), close=not reusable, headers=err.headers)

    # --- server-sent events over chunked transfer encoding (HTTP/1.0 clients: plain body, then close)
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
        self._write_event(_sse(b"[DONE]"))
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve a Kimi K2 checkpoint with OpenAI's chat completions API.")
    # --- what to serve
    p.add_argument("--ckpt", default=str(G.DEMO_DIR), help="checkpoint directory (config.json, safetensors, "
                                                           "tiktoken.model); default: the shipped demo model")
    p.add_argument("--served-model-name", default=DEFAULT_MODEL_NAME,
                   help="the model name requests must ask for (the README's client examples use kimi-k2-instruct)")
    # --- where
    p.add_argument("--host", default="127.0.0.1", help="address to bind; loopback by default (no TLS here)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 = any free port (printed at start)")
    p.add_argument("--api-key", default=None, help=f"if set, requests need 'Authorization: Bearer KEY' (else 401); "
                                                   f"default: ${API_KEY_ENV}, which unlike this flag does not show "
                                                   f"in `ps`")
    p.add_argument("--allowed-hosts", default="", help="comma-separated Host names to accept besides loopback ones "
                                                       "and --host (* = any); needed with --host 0.0.0.0")
    p.add_argument("--allowed-origins", default="", help="comma-separated web origins whose pages may call the "
                                                         "server, e.g. http://localhost:3000 (* = any); default none")
    # --- limits
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies get 413")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="max_tokens for requests that give none (capped at what is left of the context)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests that may wait for the model; more get 429 with Retry-After")
    p.add_argument("--max-connections", type=int, default=None,
                   help=f"connections open at once (default {DEFAULT_MAX_CONNECTIONS}, or 2 x (--max-queue + 1) if "
                        f"more); at the cap the one that has waited longest without sending a complete request is "
                        f"closed to make room, and if all are busy with requests the new one gets 503")
    # --- hardware
    p.add_argument("--device", default="", help="cpu | cuda | mps; empty = pick the best available")
    p.add_argument("--dtype", default="", help="fp32 | bf16 | fp16; empty = bf16 on a capable GPU, else fp32")
    G.add_threads_argument(p)
    a = p.parse_args(argv)
    connections = 1 if a.max_connections is None else a.max_connections
    if min(a.max_body_bytes, a.default_max_tokens, connections) < 1 or a.max_queue < 0:
        sys.exit("error: --max-body-bytes, --default-max-tokens and --max-connections must be at least 1, "
                 "--max-queue at least 0")
    api_key = a.api_key or os.environ.get(API_KEY_ENV) or None
    threads, why_threads = G.set_threads(a.threads)  # before the worker thread starts: it inherits the count
    print(f"{threads} CPU thread(s) ({why_threads})", flush=True)
    try:
        engine = ModelEngine.load(a.ckpt, a.device, a.dtype)
        server = ChatServer(engine, a.host, a.port, a.served_model_name, api_key, a.max_body_bytes,
                            a.default_max_tokens, max_queue=a.max_queue, max_connections=a.max_connections,
                            allowed_hosts=[h.strip() for h in a.allowed_hosts.split(",") if h.strip()],
                            allowed_origins=[o.strip() for o in a.allowed_origins.split(",") if o.strip()])
    except (ValueError, FileNotFoundError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"model: {engine.description}", flush=True)
    if not LOOPBACK.match(a.host):
        print(f"warning: listening on {a.host}, not loopback: anyone who can reach this port can use the model "
              f"(plain HTTP{'' if api_key else ', no --api-key'}); requests must name this machine in Host: "
              f"{', '.join(sorted(server.allowed_hosts)) or 'only loopback names, so pass --allowed-hosts'}",
              flush=True)
    print(f"serving '{a.served_model_name}' at {server.url} (Ctrl-C to stop)", flush=True)

    def on_sigterm(signum: int, frame: Any) -> None:  # `kill` shuts down as cleanly as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        server.server_close()
        server.worker.stop()


if __name__ == "__main__":
    main()
