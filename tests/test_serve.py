"""Protects serve.py, the OpenAI-compatible server: plain `openai` client code runs unchanged against it, tool
calls come back in K2 deployments' wire format, streaming adds up to the non-streamed answer, concurrent requests
stay independent, and every bad request gets OpenAI's error shape and status while the server keeps serving.

Compares against: the official `openai` Python client (what the getting-started examples use) talking to a live server on a
free loopback port; a scripted stand-in model (`ScriptedModel`: logits that force a canned reply, run through the
real generate.TextStream) for exact wire-format checks; a tiny random model saved to disk and loaded like a real
checkpoint (or the shipped demo model for the getting-started snippets, when demo/ has one) for real generation; the same
requests run one at a time for the concurrency check; raw http.client for what the openai client cannot send.
Run: pytest tests/test_serve.py -q   (CPU, 15-30 s on 2 cores; needs `pip install openai`)"""
import dataclasses
import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import model as M
import serve
from conftest import ROOT, random_model
from tokenizer import CALL_ARG_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END, Tokenizer

openai = pytest.importorskip("openai")

DEMO = ROOT / "demo"
GET_WEATHER_TOOLS = [{  # a minimal flat-form schema, as in tools.py
    "name": "get_weather",
    "description": "Retrieve current weather for a given city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
}]


def get_weather(city: str) -> dict:  # a minimal get_weather tool
    return {"weather": "Sunny, 25°C"}


# ---------------------------------------------------------------------------------------------------------------
# The scripted stand-in model: whatever the prompt, the logits put all mass on the next token of a canned reply


def section(*calls: tuple[str, str]) -> str:
    """A K2 tool-call section for [(id, arguments text)]."""
    return SECTION_BEGIN + "".join(f"{CALL_BEGIN}{i}{CALL_ARG_BEGIN}{a}{CALL_END}" for i, a in calls) + SECTION_END


def scripted_reply(prompt: str) -> str:
    """The stand-in's "policy", from the rendered prompt. Prefills first (tool_choice required / named), then the
    last user message; the IDX of new calls counts the calls already in the history, as K2 is trained to."""
    n_calls = prompt.count(CALL_BEGIN)
    if prompt.endswith(CALL_ARG_BEGIN):  # named function: only the arguments are left to write
        return '{"city": "Tokyo"}' + CALL_END + SECTION_END
    if prompt.endswith(CALL_BEGIN):  # required: the name is the model's choice
        return f'functions.get_weather:{n_calls - 1}{CALL_ARG_BEGIN}{{"city": "Paris"}}{CALL_END}{SECTION_END}'
    last_turn = prompt.rsplit("<|im_end|>", 2)[-2]  # the turn before the generation prompt
    if "## Return of functions.get_weather:0" in last_turn:
        return "It is Sunny, 25°C in Tokyo."
    user = prompt.rsplit("<|im_user|>user<|im_middle|>", 1)[-1].split("<|im_end|>")[0]
    declared = "tool_declare" in prompt
    if user == "Check weather":  # the getting-started tool example
        weather = section(("functions.get_weather:0", '{"city": "Tokyo"}'))
        return weather if declared else "Let me check." + weather  # no tools declared: tool_choice none
    return {
        "Introduce yourself briefly.": "I am Kimi, an AI assistant made by Moonshot AI. ¿Qué tal? 你好",
        "What’s the current weather in Tokyo?": "I cannot look that up without a tool.",
        "two calls": "Checking both cities." + section(
            (f"functions.get_weather:{n_calls}", '{"city": "Beijing"}'),
            (f"functions.get_weather:{n_calls + 1}", '{"city": "Tokyo"}')),
        "broken calls": "Hmm." + section(("functions.get_weather:0", '{"city": Tok'),  # not JSON
                                         ("get weather", '{"city": "Oslo"}'),  # not an id
                                         ("functions.calc:2", '[1, 2]')),  # JSON, but not an object
        "cut off": section(("functions.get_weather:0", '{"city": "' + "Tokyo " * 200)),
        "stop strings": "alpha beta STOP gamma",
        "long": " ".join(["word"] * 300),
    }.get(user, f"echo: {user}")


class ScriptedModel:
    """Quacks like model.Transformer for generate.generate_tokens: the prefill call fixes the script (reply to the
    decoded prompt, then <|im_end|>), every call returns logits with all mass on the script's next token."""

    def __init__(self, tok: Tokenizer, context: int = 1024):
        self.tok = tok
        self.args = SimpleNamespace(max_position_embeddings=context)
        self.lm_head = SimpleNamespace(weight=torch.zeros(1))
        self.prompts: list[str] = []
        self.steps, self.delay = 0, 0.0  # decode steps taken; seconds per step (to make a reply slow)
        self.reply = scripted_reply  # prompt -> the canned reply

    def new_cache(self, batch_size: int, max_len: int) -> dict:
        return {}

    def __call__(self, ids: torch.Tensor, cache: dict, last_only: bool = False) -> torch.Tensor:
        if "script" not in cache:  # the prefill: our prompts fit one prefill chunk
            prompt = self.tok.decode(ids[0].tolist())
            self.prompts.append(prompt)
            cache["script"], cache["pos"] = self.encode(self.reply(prompt)) + [self.tok.im_end_id], 0
        else:
            cache["pos"] += 1
            self.steps += 1
            time.sleep(self.delay)
        script = cache["script"]
        logits = torch.full((1, 1, self.tok.n_vocab), float("-inf"))
        logits[0, 0, script[min(cache["pos"], len(script) - 1)]] = 0.0
        return logits

    def encode(self, text: str) -> list[int]:
        """Text with K2's marker names -> ids, markers as their special ids (as the real model emits them)."""
        ids = []
        for part in re.split(r"(<\|[a-z_]+\|>)", text):
            ids += [self.tok.special_tokens[part]] if part in self.tok.special_tokens else self.tok.encode(part)
        return ids


# ---------------------------------------------------------------------------------------------------------------
# Live servers


class Live:
    """A ChatServer on a free loopback port, served from a background thread; the log lines are kept."""

    def __init__(self, engine: serve.ModelEngine, **kw):
        self.lines: list[str] = []
        self.server = serve.ChatServer(engine, "127.0.0.1", 0, log=self.lines.append, **kw)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url, self.engine = self.server.url, engine
        self.host, self.port = self.server.server_address[:2]

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url, api_key=kw.pop("api_key", "YOUR_API_KEY"), **kw)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """A raw HTTP request -> (status, parsed JSON body or text)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        try:
            return resp.status, json.loads(data)
        except json.JSONDecodeError:
            return resp.status, data.decode(errors="replace")

    def close(self) -> None:
        self.server.close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="module")
def scripted(tok):
    live = Live(serve.ModelEngine(ScriptedModel(tok), tok, "scripted stand-in"))
    yield live
    live.close()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tok) -> Path:
    """A tiny random model saved like a real checkpoint, with the shipped tokenizer beside it."""
    path = tmp_path_factory.mktemp("tiny")
    args = dataclasses.replace(M.PRESETS["tiny"](), vocab_size=tok.n_vocab, max_position_embeddings=1024)
    random_model(args, seed=0).save_pretrained(path)
    shutil.copy(DEMO / "tiktoken.model", path / "tiktoken.model")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    live = Live(serve.ModelEngine.load(tiny_ckpt, "cpu", "fp32"))
    yield live
    live.close()


@pytest.fixture(scope="module")
def shipped(tiny, tiny_ckpt):
    """The shipped demo model when demo/ has one, else the tiny random model."""
    if not (DEMO / "config.json").exists():
        yield tiny
        return
    live = Live(serve.ModelEngine.load(DEMO, "cpu", "fp32"))
    yield live
    live.close()


def collect_stream(stream) -> dict:
    """Accumulate chat.completion.chunk deltas the way the OpenAI cookbook does (tool calls by index)."""
    out = {"role": None, "content": "", "tool_calls": {}, "finish_reason": None, "usage": None, "chunks": [],
           "content_deltas": []}
    for chunk in stream:
        out["chunks"].append(chunk)
        if chunk.usage is not None:
            out["usage"] = chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
        for choice in chunk.choices:
            d = choice.delta
            out["role"] = out["role"] or d.role
            if d.content:
                out["content"] += d.content
                out["content_deltas"].append(d.content)
            for tc in d.tool_calls or []:
                acc = out["tool_calls"].setdefault(tc.index, {"id": None, "type": None, "name": "", "arguments": ""})
                acc["id"] = acc["id"] or tc.id
                acc["type"] = acc["type"] or tc.type
                if tc.function is not None:
                    acc["name"] += tc.function.name or ""
                    acc["arguments"] += tc.function.arguments or ""
            if choice.finish_reason is not None:
                out["finish_reason"] = choice.finish_reason
    return out


def as_wire(response) -> dict:
    """A non-streamed answer in the same form as collect_stream's."""
    choice = response.choices[0]
    calls = {i: {"id": c.id, "type": c.type, "name": c.function.name, "arguments": c.function.arguments}
             for i, c in enumerate(choice.message.tool_calls or [])}
    return {"content": choice.message.content or "", "tool_calls": calls, "finish_reason": choice.finish_reason,
            "usage": response.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})}


# ---------------------------------------------------------------------------------------------------------------
# Plain `openai` client snippets (the README's examples), unchanged


def simple_chat(client, model_name):  # the getting-started "Simple Chat Example", verbatim
    messages = [
        {"role": "system", "content": "You are Kimi, a helpful AI assistant."},
        {"role": "user", "content": "What’s the current weather in Tokyo?"}
    ]
    response = client.chat.completions.create(
        model=model_name,
        messages=messages,
        temperature=0.6,
        max_tokens=100
    )
    return response.choices[0].message.content


def api_access(client):  # the "API Access" example, verbatim but for the client (the caller makes it)
    response = client.chat.completions.create(
        model="kimi-k2-instruct",
        messages=[
            {"role": "system", "content": "You are Kimi, an AI assistant by Moonshot AI."},
            {"role": "user", "content": "Introduce yourself briefly."}
        ],
        temperature=0.6,
        max_tokens=256
    )
    print(response.choices[0].message.content)
    return response


def tool_example(client):  # the getting-started tool example, verbatim (flat schema, "auto")
    tools = [{
        "name": "get_weather",
        "description": "Retrieve current weather for a given city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
    }]

    response = client.chat.completions.create(
        model="kimi-k2-instruct",
        messages=[{"role": "user", "content": "Check weather"}],
        tools=tools,
        tool_choice="auto"
    )
    return response


def follow_up(client, response):
    """The client loop of Moonshot's tool_call_guidance.md, one step: append the assistant turn and each call's
    result, and ask again."""
    messages = [{"role": "user", "content": "Check weather"}, response.choices[0].message]
    for call in response.choices[0].message.tool_calls:
        result = get_weather(**json.loads(call.function.arguments))
        messages.append({"role": "tool", "tool_call_id": call.id, "name": call.function.name,
                         "content": json.dumps(result)})
    return client.chat.completions.create(model="kimi-k2-instruct", messages=messages, tools=GET_WEATHER_TOOLS,
                                          tool_choice="auto")


def test_seed_snippets_exact_wire_format_with_the_scripted_model(scripted, tok):
    client = scripted.client()
    r = api_access(client)
    assert r.object == "chat.completion" and r.model == "kimi-k2-instruct" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.content == "I am Kimi, an AI assistant made by Moonshot AI. ¿Qué tal? 你好"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert simple_chat(client, "kimi-k2-instruct") == "I cannot look that up without a tool."

    r = tool_example(client)
    prompt = scripted.engine.model.prompts[-1]
    assert '"type": "function", "function": {"name": "get_weather"' in prompt  # flat schema declared wrapped
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("functions.get_weather:0", "function", "get_weather")
    assert call.function.arguments == '{"city": "Tokyo"}' and json.loads(call.function.arguments) == {"city": "Tokyo"}
    reply_ids = ScriptedModel(tok).encode(section(("functions.get_weather:0", '{"city": "Tokyo"}')))
    prompt_ids, _ = tok.encode_chat([{"role": "user", "content": "Check weather"}], GET_WEATHER_TOOLS)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(reply_ids) + 1  # + the <|im_end|> it stopped on
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    r2 = follow_up(client, r)
    assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content == "It is Sunny, 25°C in Tokyo."
    assert "## Return of functions.get_weather:0\n    " + json.dumps({"weather": "Sunny, 25°C"}) in \
        scripted.engine.model.prompts[-1]


def test_seed_snippets_run_against_a_real_model(shipped, tok):
    """The shipped demo model (or the tiny random one): the requests complete with valid shapes; a get_weather call,
    if the model makes one, parses and its result gets an answer."""
    client = shipped.client()
    r = api_access(client)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert isinstance(r.choices[0].message.content, (str, type(None)))
    assert 0 < r.usage.completion_tokens <= 256
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert isinstance(simple_chat(client, "kimi-k2-instruct"), (str, type(None)))
    r = tool_example(client)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.finish_reason == "tool_calls":
        for call in choice.message.tool_calls:
            assert call.type == "function" and re.fullmatch(r"functions\.[\w.]+:\d+", call.id)
            assert isinstance(json.loads(call.function.arguments), dict)  # always valid JSON: "{}" when botched
        if [c.function.name for c in choice.message.tool_calls] == ["get_weather"] and \
                "city" in json.loads(choice.message.tool_calls[0].function.arguments):
            r2 = follow_up(client, r)
            assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---------------------------------------------------------------------------------------------------------------
# Tool calls and tool_choice (scripted: exact)


def test_parallel_calls_numbered_after_the_history(scripted):
    client = scripted.client()
    history = [{"role": "user", "content": "Check weather"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "functions.get_weather:0", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": '{"weather": "Rainy"}'},
               {"role": "user", "content": "two calls"}]
    r = client.chat.completions.create(model="kimi-k2-instruct", messages=history, tools=GET_WEATHER_TOOLS)
    msg = r.choices[0].message
    assert msg.content == "Checking both cities." and r.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls] == [
        ("functions.get_weather:1", "get_weather", '{"city": "Beijing"}'),
        ("functions.get_weather:2", "get_weather", '{"city": "Tokyo"}')]


def test_parallel_tool_calls_false_returns_only_the_first_call(scripted):
    """OpenAI's parallel_tool_calls=false: at most one call. Like vLLM (vllm-project/vllm#26233) the calls after the
    first are dropped from the answer, streamed or not; finish_reason stays tool_calls."""
    client = scripted.client()
    ask = dict(model="kimi-k2-instruct", messages=[{"role": "user", "content": "two calls"}], tools=GET_WEATHER_TOOLS,
               parallel_tool_calls=False)
    once = as_wire(client.chat.completions.create(**ask))
    assert once["content"] == "Checking both cities." and once["finish_reason"] == "tool_calls"
    assert once["tool_calls"] == {0: {"id": "functions.get_weather:0", "type": "function", "name": "get_weather",
                                      "arguments": '{"city": "Beijing"}'}}
    streamed = collect_stream(client.chat.completions.create(**ask, stream=True,
                                                             stream_options={"include_usage": True}))
    assert {k: streamed[k] for k in once} == once
    both = client.chat.completions.create(**{**ask, "parallel_tool_calls": True})  # the default: both calls
    assert len(both.choices[0].message.tool_calls) == 2


def test_required_calls_a_declared_tool_on_a_real_model(tiny):
    """tool_choice "required": the call header is constrained to a declared tool, so even a random model (which
    otherwise writes any name, or none) calls one of them, with a well-formed id; the model picks which."""
    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
             for name in ("get_stock_price", "send_email")]
    client = tiny.client()
    names = set()
    for seed in range(8):
        ask = dict(model="kimi-k2-instruct", messages=[{"role": "user", "content": "Go."}], tools=tools,
                   tool_choice="required", max_tokens=12, temperature=1.0, seed=seed)
        got = (collect_stream(client.chat.completions.create(**ask, stream=True)) if seed % 2 else
               as_wire(client.chat.completions.create(**ask)))
        call = got["tool_calls"][0]
        assert call["id"] == f"functions.{call['name']}:0" and call["name"] in ("get_stock_price", "send_email")
        names.add(call["name"])
    assert names == {"get_stock_price", "send_email"}  # the model's own choice, not always the first tool


def test_tiny_temperature_is_greedy_not_an_error(tiny):
    """temperature 1e-300 used to overflow the logits (500, "probability tensor contains inf/nan"); below vLLM's
    1e-5 it is greedy, like temperature 0."""
    client = tiny.client(max_retries=0)
    ask = dict(model="kimi-k2-instruct", messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    greedy = client.chat.completions.create(**ask, temperature=0).choices[0].message.content
    for kw in (dict(temperature=1e-300), dict(temperature=1.0, top_p=1e-300)):
        assert client.chat.completions.create(**ask, **kw).choices[0].message.content == greedy, kw


def test_tool_choice_none_required_and_named(scripted):
    client = scripted.client()
    ask = dict(model="kimi-k2-instruct", messages=[{"role": "user", "content": "Check weather"}],
               tools=GET_WEATHER_TOOLS)
    r = client.chat.completions.create(**ask, tool_choice="none")  # tools not rendered; the section is a stop
    assert "tool_declare" not in scripted.engine.model.prompts[-1]
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == ("Let me check.", None)
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(**ask, tool_choice="required")  # prefilled up to the name
    assert scripted.engine.model.prompts[-1].endswith(f"<|im_middle|>{SECTION_BEGIN}{CALL_BEGIN}")
    (call,) = r.choices[0].message.tool_calls
    assert (call.id, call.function.arguments, r.choices[0].finish_reason) == (
        "functions.get_weather:0", '{"city": "Paris"}', "tool_calls")
    r = client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert scripted.engine.model.prompts[-1].endswith(f"{CALL_BEGIN}functions.get_weather:0{CALL_ARG_BEGIN}")
    (call,) = r.choices[0].message.tool_calls
    assert (call.id, call.function.name, call.function.arguments) == (
        "functions.get_weather:0", "get_weather", '{"city": "Tokyo"}')
    prompt_ids, _ = scripted.engine.tok.encode_chat(ask["messages"], GET_WEATHER_TOOLS)
    assert r.usage.prompt_tokens > len(prompt_ids)  # the prefill counts as prompt: the model did not sample it
    r = client.chat.completions.create(  # a function may be called "none": naming it still forces it
        **{**ask, "tools": GET_WEATHER_TOOLS + [{"name": "none", "parameters": {"type": "object"}}]},
        tool_choice={"type": "function", "function": {"name": "none"}})
    assert [c.id for c in r.choices[0].message.tool_calls] == ["functions.none:0"]


def test_botched_calls_come_back_usable(scripted):
    """A botched call to a declared tool comes back with arguments "{}"; the calls whose name is unreadable
    ("unknown") or not declared (calc) are dropped, and the log says why."""
    r = scripted.client().chat.completions.create(
        model="kimi-k2-instruct", messages=[{"role": "user", "content": "broken calls"}], tools=GET_WEATHER_TOOLS)
    msg = r.choices[0].message
    assert msg.content == "Hmm." and r.choices[0].finish_reason == "tool_calls"
    got = [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls]
    assert got == [("functions.get_weather:0", "get_weather", "{}")]
    assert any("tool-call problem" in line for line in scripted.lines)
    assert any("'calc' is not a tool this request declared" in line for line in scripted.lines)


# ---------------------------------------------------------------------------------------------------------------
# Streaming


STREAM_CASES = [("Introduce yourself briefly.", {}), ("Check weather", {}), ("two calls", {}), ("broken calls", {}),
                ("cut off", {"max_tokens": 40}), ("stop strings", {"stop": ["STOP", "never"]}),
                ("long", {"max_tokens": 17}), ("Check weather", {"tool_choice": "none"}),
                ("Check weather", {"tool_choice": "required"}),
                ("Check weather", {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}})]


@pytest.mark.parametrize("user,extra", STREAM_CASES, ids=[f"{u}-{sorted(e)}" for u, e in STREAM_CASES])
def test_stream_adds_up_to_the_non_streamed_answer_scripted(scripted, user, extra):
    client = scripted.client()
    ask = dict(model="kimi-k2-instruct", messages=[{"role": "user", "content": user}], tools=GET_WEATHER_TOOLS,
               **extra)
    once = as_wire(client.chat.completions.create(**ask))
    streamed = collect_stream(client.chat.completions.create(**ask, stream=True,
                                                             stream_options={"include_usage": True}))
    assert {k: streamed[k] for k in once} == once
    assert streamed["role"] == "assistant"
    assert not any("<|" in d for d in streamed["content_deltas"])  # no marker ever leaks into content
    chunks = streamed["chunks"]
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])  # usage: last chunk only
    assert [c.choices[0].finish_reason is not None for c in chunks[:-1]] == [False] * (len(chunks) - 2) + [True]
    for i, call in once["tool_calls"].items():  # header (id, type, name, "") first, then the arguments
        first = next(tc for c in chunks[:-1] for tc in c.choices[0].delta.tool_calls or [] if tc.index == i)
        assert (first.id, first.type, first.function.name, first.function.arguments) == (
            call["id"], "function", call["name"], "")


def test_stream_deltas_arrive_as_generated(scripted):
    r = scripted.client().chat.completions.create(
        model="kimi-k2-instruct", messages=[{"role": "user", "content": "two calls"}], tools=GET_WEATHER_TOOLS,
        stream=True)
    kinds = []
    for chunk in r:
        for ch in chunk.choices:
            d = ch.delta
            kinds += ["content"] * bool(d.content) + [f"call{tc.index}:{'head' if tc.id else 'args'}"
                                                       for tc in d.tool_calls or []]
    assert len([k for k in kinds if k == "content"]) > 1  # token by token, not one lump at the end
    calls = [k for k in kinds if k != "content"]
    assert calls == ["call0:head", "call0:args", "call1:head", "call1:args"]


def test_streamed_arguments_agree_with_the_whole_answer_on_a_runaway_index():
    """The streamer builds each call with the parser's own rules (tokenizer.read_call): a call whose
    index is too long for int() is an error call, so its arguments go out as "{}" streamed or not
    (the streamer used to check only the JSON and send the model's text)."""
    text = (SECTION_BEGIN + CALL_BEGIN + "functions.f:" + "7" * 5000 + CALL_ARG_BEGIN + '{"a": 1}' + CALL_END
            + SECTION_END)
    s = serve.ToolCallStreamer(first_index=0)
    deltas = s.feed(text) + s.finish()
    streamed = "".join(tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls", []))
    msg, problems = serve.assistant_message(text, 0)
    assert streamed == msg["tool_calls"][0]["function"]["arguments"] == "{}"
    assert any("5000-digit index" in p for p in problems)


def test_streamer_holds_back_a_possible_marker():
    s = serve.ToolCallStreamer(first_index=0)
    assert s.feed("Hi <|tool_calls_sec") == [{"content": "Hi "}]
    assert s.feed("tion_begin|>") == []
    assert s.feed(f"{CALL_BEGIN}functions.f:0") == []
    assert s.feed(f"{CALL_ARG_BEGIN}{{\"a\"") == [{"tool_calls": [{"index": 0, "id": "functions.f:0",
                                                                   "type": "function",
                                                                   "function": {"name": "f", "arguments": ""}}]}]
    assert s.feed(f": 1}}{CALL_END}") == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}]
    assert s.feed(SECTION_END) == [] and s.finish() == []
    s = serve.ToolCallStreamer(first_index=0)
    assert s.feed("a <") == [{"content": "a "}] and s.finish() == [{"content": "<"}]


def test_stream_equals_non_stream_on_a_real_model(tiny):
    client = tiny.client()
    for seed, extra in [(1, {}), (2, {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
                        (3, {"tool_choice": "required", "max_tokens": 60})]:
        ask = dict(model="kimi-k2-instruct", messages=[{"role": "user", "content": "Check weather in Paris"}],
                   tools=GET_WEATHER_TOOLS, seed=seed, max_tokens=extra.pop("max_tokens", 24), **extra)
        once = as_wire(client.chat.completions.create(**ask))
        streamed = collect_stream(client.chat.completions.create(**ask, stream=True,
                                                                 stream_options={"include_usage": True}))
        assert {k: streamed[k] for k in once} == once
        if extra:
            assert once["tool_calls"] and once["tool_calls"][0]["id"].startswith("functions.")


# ---------------------------------------------------------------------------------------------------------------
# Concurrency


def test_eight_concurrent_requests_are_independent(tiny):
    client = tiny.client()
    asks = [dict(model="kimi-k2-instruct", seed=100 + i, max_tokens=12 + i, temperature=1.0,
                 messages=[{"role": "user", "content": f"Request number {i}: tell me about {w}."}])
            for i, w in enumerate(["cats", "dogs", "the sea", "Tokyo", "MoE", "Muon", "tea", "rain"])]

    def run(ask: dict) -> tuple:
        if ask["seed"] % 2:  # half of them streamed
            s = collect_stream(client.chat.completions.create(**ask, stream=True))
            return s["content"], s["finish_reason"]
        r = client.chat.completions.create(**ask)
        return r.choices[0].message.content, r.choices[0].finish_reason

    alone = [run(a) for a in asks]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, asks))
    assert together == alone
    assert len(set(alone)) == len(alone)  # and the answers do differ, so the comparison means something


# ---------------------------------------------------------------------------------------------------------------
# Errors


def error_of(exc_info) -> dict:
    body = exc_info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]


BAD_REQUESTS = [  # (keyword arguments, status, param, code)
    (dict(model="gpt-4o"), 404, "model", "model_not_found"),
    (dict(n=2), 400, "n", None),
    (dict(tool_choice="sometimes", tools=GET_WEATHER_TOOLS), 400, "tool_choice", None),
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}, tools=GET_WEATHER_TOOLS), 400,
     "tool_choice", None),
    (dict(tool_choice="required"), 400, "tool_choice", None),  # no tools to require
    (dict(max_tokens=5000), 400, "max_tokens", "context_length_exceeded"),
    (dict(max_completion_tokens=0), 400, "max_completion_tokens", None),
    (dict(temperature=3), 400, "temperature", None),
    (dict(top_p=0), 400, "top_p", None),
    (dict(stop=[1, 2]), 400, "stop", None),
    (dict(seed="x"), 400, "seed", None),
    (dict(messages=[]), 400, "messages", None),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", None),
    (dict(messages=[{"role": "tool", "content": "x"}]), 400, "messages", None),  # no tool_call_id
    (dict(tools=[{"description": "no name"}]), 400, "tools", None),
    (dict(tools=[{"name": "get-weather"}]), 400, "tools[0].function.name", None),  # '-' cannot be in an id
    (dict(stream_options={"include_usage": True}), 400, "stream_options", None),
    (dict(logprobs=True), 400, "logprobs", None),
    # the messages alone overflow the 1,024-token context: that is the error, whatever max_tokens asks
    (dict(messages=[{"role": "user", "content": "word " * 1100}], max_tokens=5), 400, "messages",
     "context_length_exceeded"),
]


@pytest.mark.parametrize("kw,status,param,code", BAD_REQUESTS, ids=[str(sorted(b[0]))[:60] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(scripted, kw, status, param, code):
    client = scripted.client(max_retries=0)
    ask = {"model": "kimi-k2-instruct", "messages": [{"role": "user", "content": "hi"}], **kw}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**ask)
    assert e.value.status_code == status
    err = error_of(e)
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    ok = client.chat.completions.create(model="kimi-k2-instruct", messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content == "echo: hi"


def test_raw_http_errors_and_the_server_keeps_serving(scripted):
    ok_body = json.dumps({"model": "kimi-k2-instruct", "messages": [{"role": "user", "content": "hi"}]}).encode()
    cases = [
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b"", 400),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400),
        ("POST", "/v1/chat/completions", json.dumps({"model": "kimi-k2-instruct"}).encode(), 400),  # no messages
        ("GET", "/v1/chat/completions", None, 405),
        ("DELETE", "/v1/models", None, 405),
        ("POST", "/v1/completions", ok_body, 404),
        ("GET", "/", None, 404),
        ("GET", "/v1/models/other-model", None, 404),
        ("OPTIONS", "/v1/chat/completions", None, 405),  # not http.server's HTML "501 Unsupported method"
    ]
    for method, path, body, status in cases:
        got, data = scripted.raw(method, path, body, {"Content-Type": "application/json"})
        assert got == status, (method, path, data)
        assert set(data["error"]) == {"message", "type", "param", "code"}, data
    assert scripted.raw("HEAD", "/v1/chat/completions") == (405, "")  # headers only, as HEAD must be
    # A body over the 4 MiB default is refused on its headers and never read: the answer comes while the client
    # is still sending. The openai client reads it (http.client would give up on the send that then fails).
    with pytest.raises(openai.APIStatusError) as e:
        scripted.client(max_retries=0).chat.completions.create(
            model="kimi-k2-instruct", messages=[{"role": "user", "content": "x" * (5 << 20)}])
    assert e.value.status_code == 413 and error_of(e)["code"] == "request_too_large"
    status, data = scripted.raw("POST", "/v1/chat/completions", ok_body, {"Content-Type": "application/json"})
    assert status == 200 and data["choices"][0]["message"]["content"] == "echo: hi"
    status, data = scripted.raw("GET", "/v1/models")
    assert status == 200 and data["object"] == "list"
    assert [(m["id"], m["object"]) for m in data["data"]] == [("kimi-k2-instruct", "model")]
    assert scripted.client().models.list().data[0].id == "kimi-k2-instruct"
    assert any(re.fullmatch(r"POST /v1/chat/completions 200 tokens=\d+\+\d+ \d+\.\d\ds", line)
               for line in scripted.lines)


def test_keep_alive_connection_survives_errors(scripted):
    """Errors on one keep-alive connection (a refused body left unread included) do not confuse its next request."""
    conn = http.client.HTTPConnection(scripted.host, scripted.port, timeout=30)
    good = json.dumps({"model": "kimi-k2-instruct", "messages": [{"role": "user", "content": "hi"}]})
    for path, body, status in [("/v1/nope", good, 404), ("/v1/chat/completions", "{bad", 400),
                               ("/v1/chat/completions", good, 200), ("/v1/chat/completions", good, 200)]:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == status
    conn.close()


def test_openai_message_variants(scripted):
    """developer role (OpenAI's newer system), text parts in user, assistant (beside tool_calls) and tool content,
    an assistant turn sent back."""
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Check "}, {"type": "text", "text": "weather"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me check."}],
             "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0",
             "content": [{"type": "text", "text": '{"weather": "Sunny"}'}]}]
    r = scripted.client().chat.completions.create(model="kimi-k2-instruct", messages=msgs)
    prompt = scripted.engine.model.prompts[-1]
    assert prompt.startswith("<|im_system|>system<|im_middle|>Be brief.<|im_end|>")
    assert f"<|im_assistant|>assistant<|im_middle|>Let me check.{SECTION_BEGIN}{CALL_BEGIN}" in prompt
    assert '## Return of functions.get_weather:0\n    {"weather": "Sunny"}' in prompt
    assert r.choices[0].message.content == "It is Sunny, 25°C in Tokyo."


def test_chunked_uploads_and_refused_bodies_on_one_connection(scripted):
    """Chunked request bodies are read (RFC 9112 §7.1); a body refused before it was read (404, 405) is skipped, so
    the keep-alive connection's next request is parsed correctly."""
    conn = http.client.HTTPConnection(scripted.host, scripted.port, timeout=30)
    good = {"model": "kimi-k2-instruct", "messages": [{"role": "user", "content": "hi"}]}
    for path, body, status in [("/v1/chat/completions", good, 200), ("/v1/nope", good, 404),
                               ("/v1/models", good, 405), ("/v1/chat/completions", {**good, "n": 3}, 400),
                               ("/v1/chat/completions", good, 200)]:
        data = json.dumps(body).encode()
        conn.request("POST", path, body=iter([data[:10], data[10:]]), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        assert resp.status == status, answer
        assert resp.getheader("Connection") != "close"
    conn.close()


def one_running_one_queued(live) -> tuple[list[int], list[threading.Thread]]:
    """Start two slow requests: the first running in the worker, the second waiting in its queue. Returns the
    status list the two fill in and their threads (join them)."""
    slow = json.dumps({"model": "kimi-k2-instruct", "max_tokens": 60,
                       "messages": [{"role": "user", "content": "long"}]}).encode()
    results: list[int] = []

    def send() -> None:
        results.append(live.raw("POST", "/v1/chat/completions", slow, {"Content-Type": "application/json"})[0])

    running = threading.Thread(target=send)
    running.start()
    deadline = time.monotonic() + 10
    while live.server.worker.current is None and time.monotonic() < deadline:  # the first one runs
        time.sleep(0.005)
    waiting = threading.Thread(target=send)
    waiting.start()
    while live.server.worker.jobs.qsize() < 1 and time.monotonic() < deadline:  # the second one waits
        time.sleep(0.005)
    return results, [running, waiting]


def abandon_long_request(scripted, abandon) -> None:
    """Slow the model down, let `abandon(model, steps_before)` start the 300-word "long" reply and walk away from
    it, then check that the job was cut short (the next request runs after it, FIFO, within 150 steps) and that the
    log records it as 499."""
    model = scripted.engine.model
    model.delay, before = 0.01, model.steps  # "long" is 300 words: 3 s if it ran to the end
    try:
        abandon(model, before)
        r = scripted.client().chat.completions.create(model="kimi-k2-instruct",
                                                      messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "echo: hi"
        assert model.steps - before < 150  # FIFO: "hi" ran after the long job, which was cut short
    finally:
        model.delay = 0.0
    assert any(re.match(r"POST /v1/chat/completions 499 ", line) for line in scripted.lines), scripted.lines[-5:]


def test_client_going_away_stops_generation(scripted):
    def read_three_events_and_close(model, before):
        stream = scripted.client().chat.completions.create(
            model="kimi-k2-instruct", messages=[{"role": "user", "content": "long"}], max_tokens=400, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()

    abandon_long_request(scripted, read_three_events_and_close)


# ---------------------------------------------------------------------------------------------------------------
# The command line: --api-key, --served-model-name, the log, Ctrl-C


@pytest.mark.parametrize("argv", [["--max-body-bytes", "0"], ["--default-max-tokens", "0"],
                                  ["--max-connections", "0"], ["--max-queue", "-1"]])
def test_cli_limits_out_of_range_are_argparse_errors(argv, capsys):
    """A limit flag out of range is argparse's usage error (exit 2), before any model is loaded."""
    with pytest.raises(SystemExit) as exit_info:
        serve.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "must be at least 1, --max-queue at least 0" in err, err


def test_cli_api_key_and_clean_ctrl_c(tiny_ckpt):
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", str(tiny_ckpt), "--port", "0",
                             "--api-key", "sekrit", "--served-model-name", "my-kimi", "--device", "cpu"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stdout:  # "serving 'my-kimi' at http://127.0.0.1:PORT/v1 (Ctrl-C to stop)"
            if m := re.search(r"at (http://\S+/v1)", line):
                url = m.group(1)
                break
        assert url, proc.stderr.read()
        ask = dict(model="my-kimi", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).chat.completions.create(**ask)
        assert e.value.status_code == 401 and error_of(e)["code"] == "invalid_api_key"
        host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()
        conn = http.client.HTTPConnection(host, int(port), timeout=30)  # no Authorization header at all
        conn.request("POST", "/v1/chat/completions", body=json.dumps(ask))
        resp = conn.getresponse()
        assert resp.status == 401 and json.loads(resp.read())["error"]["code"] == "invalid_api_key"
        conn.close()
        r = openai.OpenAI(base_url=url, api_key="sekrit").chat.completions.create(**ask)
        assert r.model == "my-kimi" and r.usage.completion_tokens <= 3
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "shutting down" in out, (out, err)
        assert "Traceback" not in err
        assert re.search(r"POST /v1/chat/completions 401 .*\nPOST /v1/chat/completions 401 .*\n"
                         r"POST /v1/chat/completions 200 tokens=\d+\+[1-3] \d+\.\d\ds", err), err
    finally:
        if proc.poll() is None:
            proc.kill()
