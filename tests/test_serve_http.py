"""Protects serve.py against hostile and careless clients at the API level: abandoned requests and the bounded
queue, bounded `stop`, tool calls recognised only from special token ids and only for declared tools, the tool-call
streamer's work per token, NaN logits, the API key from the environment, and the request fields of Kimi's `partial` /
vLLM's `continue_final_message` (anything unimplemented is a 400). The transport under it (framing, body limits,
Host / Origin, the connection cap) is tests/test_http_server.py's.

Compares against: raw sockets, the official `openai` client, the scripted stand-in model of tests/test_serve.py
(canned replies, with the markers as special ids or spelled out in ordinary tokens), a tiny random model with NaN
weights, and tracemalloc's count of the memory each streamer step allocates.
Run: pytest tests/test_serve_http.py -q   (CPU, ~10 s)"""
import dataclasses
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch

import model as M
import serve
from conftest import ROOT, random_model
from test_http_server import CHAT, exchange, post
from test_serve import (GET_WEATHER_TOOLS, Live, ScriptedModel, abandon_long_request, error_of,  # noqa: F401
                        one_running_one_queued, scripted_reply, section, tiny_ckpt, tok)
from tokenizer import CALL_ARG_BEGIN, CALL_BEGIN, SECTION_BEGIN, mask_pipes, unmask_pipes

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def scripted(tok):
    live = Live(serve.ModelEngine(ScriptedModel(tok), tok, "scripted stand-in"))
    yield live
    live.close()


# ---------------------------------------------------------------------------------------------------------------
# Abandoned requests, the queue


def test_abandoned_non_streamed_request_is_cancelled(scripted):
    def send_and_hang_up(model, before):
        body = json.dumps({"model": "kimi-k2-instruct", "max_tokens": 400,
                           "messages": [{"role": "user", "content": "long"}]}).encode()
        sock = socket.create_connection((scripted.host, scripted.port))
        sock.sendall(post(scripted, f"Content-Length: {len(body)}\r\n", body))
        deadline = time.monotonic() + 10
        while model.steps - before < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.close()  # fire and forget

    abandon_long_request(scripted, send_and_hang_up)


def test_full_queue_answers_429_with_retry_after(tok):
    model = ScriptedModel(tok)
    model.delay = 0.01
    live = Live(serve.ModelEngine(model, tok), max_queue=1)
    try:
        results, threads = one_running_one_queued(live)
        status, headers, body, _ = exchange(live, post(live, f"Content-Length: {len(CHAT)}\r\n"))
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert body["error"]["code"] == "rate_limit_exceeded" and set(body["error"]) == {"message", "type", "param",
                                                                                          "code"}
        for t in threads:
            t.join(30)
        assert results == [200, 200]
    finally:
        live.close()


# ---------------------------------------------------------------------------------------------------------------
# Request fields: stop, partial / continue_final_message, unimplemented fields


def test_stop_is_bounded_like_openai(scripted):
    client = scripted.client(max_retries=0)
    ask = dict(model="kimi-k2-instruct", messages=[{"role": "user", "content": "hi"}])
    for stop in (["a", "b", "c", "d", "e"], [str(i) for i in range(30000)], ["x" * 129]):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**ask, stop=stop)
        assert error_of(e)["param"] == "stop"
    assert client.chat.completions.create(**ask, stop=["a", "b", "c", "x" * 128]).choices[0].message.content


def continuation(prompt: str) -> str:
    """Replies to a prompt that ends inside an assistant message by finishing the arithmetic."""
    if prompt.endswith("<|im_middle|>17*23 = "):
        return "391."
    return scripted_reply(prompt)


def test_partial_and_continue_final_message_continue_the_assistant_text(scripted):
    model, client = scripted.engine.model, scripted.client()
    model.reply = continuation
    try:
        msgs = [{"role": "user", "content": "What is 17*23?"}]
        r = client.chat.completions.create(model="kimi-k2-instruct", messages=msgs + [
            {"role": "assistant", "content": "17*23 = ", "partial": True}])  # Kimi's partial mode
        assert model.prompts[-1].endswith("<|im_assistant|>assistant<|im_middle|>17*23 = ")  # no <|im_end|>, no turn
        assert r.choices[0].message.content == "391." and r.choices[0].finish_reason == "stop"
        r = client.chat.completions.create(model="kimi-k2-instruct", messages=msgs + [
            {"role": "assistant", "content": "17*23 = "}],
            extra_body={"continue_final_message": True, "add_generation_prompt": False})  # vLLM's form
        assert r.choices[0].message.content == "391."
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="kimi-k2-instruct", messages=msgs + [{"role": "assistant", "content": "17*23 = "}],
            extra_body={"continue_final_message": True}, stream=True) if c.choices)
        assert streamed == "391."
        # without either, the same messages are a finished assistant turn and the model answers a new one
        r = client.chat.completions.create(model="kimi-k2-instruct", messages=msgs + [
            {"role": "assistant", "content": "17*23 = "}])
        assert model.prompts[-1].endswith("17*23 = <|im_end|><|im_assistant|>assistant<|im_middle|>")
    finally:
        model.reply = scripted_reply


@pytest.mark.parametrize("kw,param", [
    (dict(messages=[{"role": "user", "content": "hi", "partial": True}]), "messages[0].partial"),
    (dict(messages=[{"role": "assistant", "content": "a", "partial": True},
                    {"role": "user", "content": "hi"}]), "messages[0].partial"),
    (dict(extra_body={"continue_final_message": True}), "messages"),  # the last message is the user's
    (dict(extra_body={"continue_final_message": True, "add_generation_prompt": True}), "add_generation_prompt"),
    (dict(extra_body={"add_generation_prompt": False}), "add_generation_prompt"),
    (dict(extra_body={"continue_final_message": 1}), "continue_final_message"),  # 1 == True, but not a boolean
    (dict(extra_body={"repetition_penalty": 1.2}), "repetition_penalty"),
    (dict(extra_body={"min_p": 0.1}), "min_p"),
    (dict(extra_body={"best_of": 2}), "best_of"),
    (dict(extra_body={"temprature": 0.1}), "temprature"),  # a typo is not silently ignored either
    (dict(extra_body={"guided_json": {"type": "object"}}), "guided_json"),
    (dict(reasoning_effort="high"), "reasoning_effort"),
    (dict(functions=[{"name": "f", "parameters": {}}]), "functions"),
    (dict(store=True), "store"),
], ids=lambda x: str(x)[:50])
def test_unimplemented_fields_are_400_naming_them(scripted, kw, param):
    client = scripted.client(max_retries=0)
    ask = {"model": "kimi-k2-instruct", "messages": [{"role": "user", "content": "hi"}], **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**ask)
    assert error_of(e)["param"] == param


def test_neutral_values_and_identifiers_are_accepted(scripted):
    r = scripted.client().chat.completions.create(
        model="kimi-k2-instruct", messages=[{"role": "user", "content": "hi"}], n=1, frequency_penalty=0,
        presence_penalty=0, logprobs=False, logit_bias={}, response_format={"type": "text"}, store=False,
        user="u1", metadata={"k": "v"}, service_tier="auto", prompt_cache_key="c", safety_identifier="s",
        extra_body={"top_k": 5, "repetition_penalty": 1, "min_p": 0, "add_generation_prompt": True,
                    "continue_final_message": False, "some_unset_field": None})
    assert r.choices[0].message.content == "echo: hi"


# ---------------------------------------------------------------------------------------------------------------
# Tool calls: only from special ids, only for declared tools; the streamer is incremental


def test_markers_spelled_in_ordinary_tokens_are_text(scripted, tok):
    """A model that writes `<|tool_calls_section_begin|>...` with ordinary byte tokens wrote text, not a call."""
    model, client = scripted.engine.model, scripted.client()
    spelled = section(("functions.get_weather:0", '{"city": "Tokyo"}'))
    model.encode = tok.encode  # every marker as ordinary tokens
    try:
        ask = dict(model="kimi-k2-instruct", messages=[{"role": "user", "content": "Check weather"}],
                   tools=GET_WEATHER_TOOLS)
        r = client.chat.completions.create(**ask)
        assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == (spelled, None)
        assert r.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(**ask, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == spelled
        assert not any(c.choices[0].delta.tool_calls for c in chunks)
        r = client.chat.completions.create(**ask, tool_choice="none")  # the section stop matches the real marker
        assert r.choices[0].message.content == "Let me check." + spelled
    finally:
        del model.encode


def test_calls_to_undeclared_tools_are_never_returned(scripted):
    model, client = scripted.engine.model, scripted.client()
    model.reply = lambda prompt: "On it." + section(("functions.delete_all_files:0", "{}"),
                                                    ("functions.get_weather:1", '{"city": "Oslo"}'))
    try:
        for tools, calls in [(GET_WEATHER_TOOLS, ["get_weather"]), (None, []),
                             ([{"name": "send_email", "parameters": {"type": "object"}}], [])]:
            ask = dict(model="kimi-k2-instruct", messages=[{"role": "user", "content": "Clean up"}])
            if tools:
                ask["tools"] = tools
            r = client.chat.completions.create(**ask)
            assert [c.function.name for c in r.choices[0].message.tool_calls or []] == calls
            assert r.choices[0].finish_reason == ("tool_calls" if calls else "stop")
            assert r.choices[0].message.content == "On it."
            chunks = list(client.chat.completions.create(**ask, stream=True))
            names = [tc.function.name for c in chunks for tc in c.choices[0].delta.tool_calls or [] if tc.id]
            assert names == calls and [tc.index for c in chunks for tc in c.choices[0].delta.tool_calls or []
                                       if tc.id] == list(range(len(calls)))
        assert any("delete_all_files' is not a tool this request declared" in line for line in scripted.lines)
    finally:
        model.reply = scripted_reply


def test_masked_stream_decoding_round_trips(tok):
    text = "a|b <|im_end|> \ufdd0 ||"
    ids = tok.encode(text) + [tok.tool_call_begin_id] + tok.encode("x|y")
    dec = tok.stream_decoder(masked=True)
    out = "".join(dec.feed(i) for i in ids) + dec.flush()
    assert "|" not in out.replace(CALL_BEGIN, "") and out.count(CALL_BEGIN) == 1
    assert unmask_pipes(out) == tok.decode(ids).replace("\ufdd0", "\ufffd")
    assert mask_pipes("<|x|>") == "<\ufdd0x\ufdd0>"


def test_tool_call_streamer_work_per_token_does_not_grow():
    """Feeding one more token allocates the same at 500 tokens into a call's arguments as at 5,000: nothing before
    it is copied or re-parsed (the old streamer re-split the whole text every token: quadratic)."""
    def per_feed_bytes(n_tokens: int) -> float:
        s = serve.ToolCallStreamer(0)
        s.feed("Sure." + SECTION_BEGIN + CALL_BEGIN + "functions.f:0" + CALL_ARG_BEGIN + '{"a": "')
        sizes = []
        tracemalloc.start()
        try:
            for _ in range(n_tokens):
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                s.feed("word ")
                sizes.append(tracemalloc.get_traced_memory()[1] - base)
        finally:
            tracemalloc.stop()
        return statistics.median(sizes[-200:])

    short, long = per_feed_bytes(500), per_feed_bytes(5000)
    assert long < 1.5 * short + 64, (short, long)


# ---------------------------------------------------------------------------------------------------------------
# The model's own failures, the API key


def test_nan_logits_are_a_clear_500(tok, scripted):
    args = dataclasses.replace(M.PRESETS["tiny"](), vocab_size=tok.n_vocab, max_position_embeddings=256)
    model = random_model(args, seed=0)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    live = Live(serve.ModelEngine(model, tok, "NaN weights"))
    try:
        client = live.client(max_retries=0)
        for temperature in (0.0, 0.6):
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model="kimi-k2-instruct", max_tokens=4, temperature=temperature,
                                               messages=[{"role": "user", "content": "hi"}])
            err = error_of(e)
            assert err["code"] == "model_error" and err["type"] == "server_error" and "NaN" in err["message"]
        assert not any("Traceback" in line for line in live.lines)
    finally:
        live.close()


def test_api_key_from_the_environment(tiny_ckpt):
    env = {**os.environ, "KIMI_API_KEY": "from-env", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", str(tiny_ckpt), "--port", "0",
                             "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = next(m.group(1) for line in proc.stdout if (m := re.search(r"at (http://\S+/v1)", line)))
        ask = dict(model="kimi-k2-instruct", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="YOUR_API_KEY", max_retries=0).chat.completions.create(**ask)
        assert openai.OpenAI(base_url=url, api_key="from-env").chat.completions.create(**ask).choices
        assert "from-env" not in " ".join(proc.args)
    finally:
        proc.kill()
        proc.communicate(timeout=20)
