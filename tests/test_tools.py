"""Protects tools.py: the tool registry, JSON-Schema argument validation, turning model text into calls (every
malformed call answered by an error tool result with the right id, never an exception, never dropped), the agent
loop's message shapes and step limit, and the two demo tools (a safe calculator, deterministic fake weather).

Compares against independent references: conversations rendered by hand from the Kimi-K2-Instruct-0905
chat_template.jinja (and the model's own output, which must re-render byte for byte), tokenizer.format_tool_calls
(round trip), Python's own arithmetic on random expression trees built and evaluated directly in this file,
hand-computed values, the documented get_weather rule recomputed here with hashlib (and in a second process with
another PYTHONHASHSEED), and a minimal flat-form get_weather tool and schema (the one chat_data.py also uses).
Run: python -m pytest -q tests/test_tools.py   (CPU, a few seconds; no model is loaded, the "model" is scripted)
"""
import ast
import copy
import hashlib
import json
import math
import operator
import os
import pathlib
import random
import re
import subprocess
import sys
import unicodedata

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tokenizer as K  # noqa: E402
import tools as T  # noqa: E402

S, Z, B, A, E = K.SECTION_BEGIN, K.SECTION_END, K.CALL_BEGIN, K.CALL_ARG_BEGIN, K.CALL_END
SYSTEM = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"

# A minimal flat-form get_weather tool and schema, as chat_data.py and tools.GET_WEATHER_SCHEMA have it.
WEATHER_TOOLS = [{
    "name": "get_weather",
    "description": "Retrieve current weather for a given city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
}]


def sunny_get_weather(city: str) -> dict:
    return {"weather": "Sunny, 25°C"}


def section(*calls: tuple[str, str]) -> str:
    """A tool-call section as the model writes it, from (id, argument text) pairs."""
    return S + "".join(B + cid + A + args + E for cid, args in calls) + Z


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def tools_block(schemas: list[dict]) -> str:
    """The tool_declare block of the 0905 chat_template.jinja, by hand."""
    return "<|im_system|>tool_declare<|im_middle|>\n  # Tools\n  " + json.dumps(schemas, ensure_ascii=False) + \
        "<|im_end|>"


def tool_turn(name: str, call_id: str, content: str) -> str:
    """A tool message with a `name`, as the 0905 chat_template.jinja renders it, by hand."""
    return f"<|im_system|>{name}<|im_middle|>## Return of {call_id}\n    {content}<|im_end|>"


class Script:
    """A fake model: returns canned outputs in order, and records what it was shown, rendered by the template."""

    def __init__(self, *outputs: str):
        self.outputs = list(outputs)
        self.prompts: list[str] = []
        self.seen: list[list[dict]] = []

    def __call__(self, messages: list[dict], tool_schemas: list[dict] | None) -> str:
        assert self.outputs, "the agent loop asked the model for more turns than the script has"
        self.seen.append(copy.deepcopy(messages))
        self.prompts.append(K.apply_chat_template(messages, tool_schemas, add_generation_prompt=True))
        return self.outputs.pop(0)


def weather_rule(city: str) -> tuple[str, int]:
    """tools.get_weather's documented rule, written again from its docstring."""
    key = " ".join(unicodedata.normalize("NFC", city).split()).casefold()
    d = hashlib.sha256(key.encode("utf-8")).digest()
    return ("Sunny", "Partly cloudy", "Cloudy", "Rainy", "Windy")[d[0] % 5], -5 + d[1] % 41


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

def test_a_flat_schema_tool_runs_through_the_registry():
    registry = T.ToolRegistry()
    registry.register(sunny_get_weather, WEATHER_TOOLS[0])
    wrapped = [{"type": "function", "function": WEATHER_TOOLS[0]}]
    assert registry.schemas() == wrapped == K.normalize_tools(WEATHER_TOOLS)
    model = Script(section(("functions.get_weather:0", '{"city": "Tokyo"}')), "It is sunny, 25°C, in Tokyo.")
    question = "What’s the current weather in Tokyo?"  # with a typographic apostrophe
    out = T.run_agent(model, [user(question)], registry)
    assert out[2] == {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
                      "content": '{"weather": "Sunny, 25°C"}'}
    assert out[-1] == {"role": "assistant", "content": "It is sunny, 25°C, in Tokyo."}
    assert model.prompts[0] == tools_block(wrapped) + SYSTEM + f"<|im_user|>user<|im_middle|>{question}<|im_end|>" \
        + GEN
    # the OpenAI form of the same schema registers to the same declaration
    other = T.ToolRegistry()
    other.register(sunny_get_weather, wrapped[0])
    assert other.schemas() == wrapped


def test_default_registry_declares_the_flat_weather_schema_and_a_calculator():
    registry = T.default_registry()
    assert registry.names() == ["get_weather", "calculator"]
    assert registry.schemas()[0] == {"type": "function", "function": WEATHER_TOOLS[0]}
    registry.schemas()[0]["function"]["name"] = "changed"  # callers get copies
    assert registry.schemas()[0]["function"]["name"] == "get_weather"
    K.apply_chat_template([user("hi")], registry.schemas())


def test_decorator_form():
    registry = T.ToolRegistry()

    @registry.tool({"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                                     "parameters": {"type": "object", "required": ["a", "b"],
                                                                    "properties": {"a": {"type": "integer"},
                                                                                   "b": {"type": "integer"}}}}})
    def add(a: int, b: int) -> int:
        return a + b

    assert add(2, 3) == 5 and "add" in registry and len(registry) == 1
    call = T.ToolCall(id="functions.add:0", name="add", raw_arguments='{"a": 2, "b": 3}', arguments={"a": 2, "b": 3})
    assert T.execute(registry, call) == "5"


def _f(city: str) -> dict:
    return {}


OBJ = {"type": "object", "properties": {"city": {"type": "string"}}}


@pytest.mark.parametrize("fn, schema, match", [
    (_f, {"name": "get_weather", "parameters": OBJ}, "already registered"),
    ("not a function", {"name": "g", "parameters": OBJ}, "must be callable"),
    (_f, {"name": "get-weather", "parameters": OBJ}, "letters, digits"),
    (_f, {"name": "f:0", "parameters": OBJ}, "letters, digits"),
    (_f, {"description": "no name"}, "invalid tool schema"),
    (_f, {"type": "retrieval", "name": "g"}, "invalid tool schema"),
    (_f, {"name": "g", "parameters": {"type": "object", "properties": {"city": {"type": "str"}}}}, "type is 'str'"),
    (_f, {"name": "g", "parameters": {"type": "object", "properties": {"city": {"anyOf": []}}}}, "anyOf"),
    (_f, {"name": "g", "parameters": {**OBJ, "required": "city"}}, "required must be a list"),
    (_f, {"name": "g", "parameters": {"type": "array"}}, "type 'object'"),
    (_f, {"name": "g", "parameters": {"type": "object", "properties": {"town": {"type": "string"}}}},
     "has property 'town', but _f\(\) does not take"),
    (_f, {"name": "g", "parameters": {"type": "object", "properties": {}}}, "requires 'city'"),
    (_f, {"name": "g", "parameters": {**OBJ, "properties": {"city": {"type": "string", "pattern": "("}}}},
     "not a valid regular expression"),
    (_f, {"name": "g", "parameters": {**OBJ, "properties": {"city": {"enum": []}}}}, "non-empty list"),
])
def test_invalid_registrations_are_clear_errors(fn, schema, match):
    registry = T.ToolRegistry()
    registry.register(_f, {"name": "get_weather", "parameters": OBJ})
    with pytest.raises(ValueError, match=match):
        registry.register(fn, schema)
    assert len(registry) == 1


# ---------------------------------------------------------------------------------------------------------------
# Schema validation
# ---------------------------------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "required": ["s"], "additionalProperties": False, "properties": {
    "s": {"type": "string", "maxLength": 5}, "n": {"type": "number", "minimum": 0}, "i": {"type": "integer"},
    "b": {"type": "boolean"}, "z": {"type": "null"}, "ns": {"type": ["string", "null"]},
    "e": {"enum": [1, 2]}, "p": {"type": "string", "pattern": "^[A-Z]"},
    "a": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
    "o": {"type": "object", "required": ["unit"], "additionalProperties": False,
          "properties": {"unit": {"type": "string", "enum": ["c", "f"]}}}}}


@pytest.mark.parametrize("args, expected", [
    ({"s": "x"}, None),
    ({"s": "x", "n": 2, "i": 3, "b": False, "z": None, "ns": None, "e": 2, "p": "Ab", "a": [1], "o": {"unit": "c"}},
     None),
    ({"s": "x", "n": 2.5, "ns": "y"}, None),
    ({"s": "x", "i": 1.0}, None),  # JSON Schema: a number with a zero fractional part is an integer
    ({"s": "x", "e": 1.0}, None),  # enum compares numbers by value
    ({"s": "x", "n": True}, "n: expected number, got true (boolean)"),  # bool is not a number in JSON
    ({"s": "x", "i": False}, "i: expected integer, got false (boolean)"),
    ({"s": "x", "e": True}, "e: expected one of [1, 2], got true (boolean)"),  # although True == 1 in Python
    ({"s": "x", "b": 1}, "b: expected boolean, got 1 (integer)"),
    ({"s": "x", "i": 1.5}, "i: expected integer, got 1.5 (number)"),
    ({"s": "x", "n": float("nan")}, "n: expected number, got nan (not a JSON number)"),
    ({"s": "x", "n": -1}, "n: must be at least 0"),
    ({"s": 7}, "s: expected string, got 7 (integer)"),
    ({"s": "toolong"}, "s: must have at most 5 characters"),
    ({"s": "x", "z": 0}, "z: expected null"),
    ({"s": "x", "ns": 3}, "ns: expected string or null"),
    ({"s": "x", "p": "ab"}, "p: must match the pattern"),
    ({}, "missing required argument 's'"),
    ({"s": "x", "q": 1}, "unexpected argument 'q' (allowed: s, n, i"),
    ({"s": "x", "a": []}, "a: must have at least 1 items"),
    ({"s": "x", "a": [1, "2"]}, "a[1]: expected integer, got \"2\" (string)"),
    ({"s": "x", "o": {"unit": "k"}}, "o.unit: expected one of [\"c\", \"f\"], got \"k\" (string)"),
    ({"s": "x", "o": {}}, "missing required property 'unit' in o"),
    ({"s": "x", "o": {"unit": "c", "x": 1}}, "unexpected property 'x' in o (allowed: unit)"),
    ([1], "arguments: expected object, got [1] (array)"),
])
def test_validate(args, expected):
    errors = T.validate(args, SCHEMA)
    if expected is None:
        assert errors == []
    else:
        assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_validate_reports_every_problem():
    errors = T.validate({"n": "x", "b": 0}, SCHEMA)
    assert errors == ["missing required argument 's'", 'n: expected number, got "x" (string)',
                      "b: expected boolean, got 0 (integer)"]


# ---------------------------------------------------------------------------------------------------------------
# Model text -> calls
# ---------------------------------------------------------------------------------------------------------------

def test_format_then_parse_round_trip():
    calls = [{"id": "functions.get_weather:0", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
             {"id": "functions.calculator:1", "type": "function",
              "function": {"name": "calculator", "arguments": '{"expression": "2 ** 10"}'}},
             {"id": "functions.web.search:2", "type": "function",
              "function": {"name": "web.search", "arguments": {"q": "weather", "n": 3}}}]
    turn = T.parse_assistant("Checking." + K.format_tool_calls(calls), T.default_registry(), first_index=0)
    assert turn.content == "Checking." and turn.errors == []
    assert [c.to_openai() for c in turn.calls[:2]] == calls[:2]  # ids, names and argument text unchanged
    assert [(c.id, c.name, c.arguments, c.error) for c in turn.calls] == [
        ("functions.get_weather:0", "get_weather", {"city": "北京"}, None),
        ("functions.calculator:1", "calculator", {"expression": "2 ** 10"}, None),
        ("functions.web.search:2", "web.search", {"q": "weather", "n": 3}, None)]
    assert T.parse_assistant("no calls here").calls == []


def test_random_round_trips():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 4)
        names = [rng.choice(["get_weather", "calculator", "a.b", "x_1"]) for _ in range(n)]
        args = [{rng.choice("abc"): rng.choice([1, -2.5, "Tōkyō", None, True, [1, 2], {"k": "v"}])} for _ in range(n)]
        first = rng.randint(0, 5)
        text = K.format_tool_calls([{"function": {"name": nm, "arguments": a}} for nm, a in zip(names, args)],
                                   first_index=first)
        turn = T.parse_assistant(text)
        assert [(c.id, c.name, c.arguments) for c in turn.calls] == [
            (f"functions.{nm}:{first + j}", nm, a) for j, (nm, a) in enumerate(zip(names, args))]


OK = "OK."  # the scripted model's final answer after reading an error


@pytest.mark.parametrize("output, call_id, name, error", [
    # broken JSON / not an object: the native id is kept
    (section(("functions.get_weather:0", '{"city": Tokyo}')), "functions.get_weather:0", "get_weather",
     "arguments of functions.get_weather:0 are not valid JSON"),
    (section(("functions.get_weather:0", '["Tokyo"]')), "functions.get_weather:0", "get_weather",
     "must be a JSON object"),
    # unknown tool
    (section(("functions.get_time:0", "{}")), "functions.get_time:0", "get_time",
     "unknown tool 'get_time'; available tools: get_weather, calculator"),
    # cut off: the section is not closed / the arguments stop mid-string
    (section(("functions.get_weather:0", '{"city": "Tokyo"}'))[:-len(Z)], "functions.get_weather:0", "get_weather",
     "was not closed with <|tool_calls_section_end|>"),
    (S + B + "functions.get_weather:0" + A + '{"city": "Tok', "functions.get_weather:0", "get_weather",
     "no <|tool_call_end|> after the arguments"),
    # malformed ids: synthesised functions.{registered name or unknown}:{idx}
    (section(("functions.get-weather:0", '{"city": "Tokyo"}')), "functions.unknown:0", "unknown",
     "malformed call id 'functions.get-weather:0'"),
    (section(("functions.get_weather", '{"city": "Tokyo"}')), "functions.get_weather:0", "get_weather",
     "malformed call id 'functions.get_weather'"),
    (S + B + 'functions.get_weather:0{"city": "Tokyo"}' + E + Z, "functions.get_weather:0", "get_weather",
     "no <|tool_call_argument_begin|>"),
    (S + Z, "functions.unknown:0", "unknown", "the tool-call section holds no call"),
    (S + "I will call get_weather" + Z, "functions.unknown:0", "unknown", "unexpected text inside"),
    # arguments that break the schema or the function's signature
    (section(("functions.get_weather:0", '{"city": 3}')), "functions.get_weather:0", "get_weather",
     "invalid arguments for get_weather: city: expected string, got 3 (integer)"),
    (section(("functions.get_weather:0", "{}")), "functions.get_weather:0", "get_weather",
     "invalid arguments for get_weather: missing a required argument: 'city'"),
    (section(("functions.get_weather:0", '{"city": "Tokyo", "unit": "C"}')), "functions.get_weather:0",
     "get_weather", "unexpected keyword argument 'unit'"),
    (section(("functions.calculator:0", '{"expr": "1+1"}')), "functions.calculator:0", "calculator",
     "missing required argument 'expression'"),
    # the tool itself refuses
    (section(("functions.get_weather:0", '{"city": " "}')), "functions.get_weather:0", "get_weather",
     "get_weather failed (ValueError): city is empty"),
    (section(("functions.calculator:0", '{"expression": "1/0"}')), "functions.calculator:0", "calculator",
     "calculator failed (CalculatorError): division by zero"),
    (section(("functions.calculator:0", '{"expression": "__import__(\'os\').getcwd()"}')), "functions.calculator:0",
     "calculator", "function call"),
])
def test_every_malformed_call_becomes_an_error_result_and_the_loop_goes_on(output, call_id, name, error):
    model = Script(output, OK)
    events = []
    out = T.run_agent(model, [user("Weather in Tokyo?")], T.default_registry(),
                      on_event=lambda kind, text: events.append(kind))
    assert [m["role"] for m in out] == ["user", "assistant", "tool", "assistant"]
    (entry,) = out[1]["tool_calls"]
    assert entry["id"] == call_id and entry["function"]["name"] == name and entry["type"] == "function"
    assert out[2]["tool_call_id"] == call_id and out[2]["name"] == name
    assert error in json.loads(out[2]["content"])["error"]
    assert out[3] == {"role": "assistant", "content": OK}
    assert events[-2:] == ["tool_call", "error"] and "tool_result" not in events
    # the history, error turn included, still renders, and the model was shown its error result
    assert len(model.prompts) == 2 and tool_turn(name, call_id, out[2]["content"]) + GEN in model.prompts[1]
    K.apply_chat_template(out, T.default_registry().schemas(), add_generation_prompt=False)


def test_malformed_and_valid_calls_in_one_turn_keep_order_and_distinct_ids():
    history = [user("first"),
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "functions.get_weather:0", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                   {"id": "functions.get_weather:1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
               {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "{}"},
               {"role": "tool", "tool_call_id": "functions.get_weather:1", "name": "get_weather", "content": "{}"},
               {"role": "assistant", "content": "Done."}, user("and now?")]
    # 2 calls so far: a broken id in this turn's position 1 gets idx 2 + 1 = 3, unless that is taken (here it is)
    output = section(("functions.get_weather:3", '{"city": "Paris"}'), ("functions.get_weather", '{"city": "Lima"}'),
                     ("bad id", "{}"), ("functions.calculator:5", '{"expression": "2*21"}'))
    out = T.run_agent(Script(output, OK), history, T.default_registry())
    assert out[:len(history)] == history
    ids = [c["id"] for c in out[len(history)]["tool_calls"]]
    assert ids == ["functions.get_weather:3", "functions.get_weather:4", "functions.unknown:4",
                   "functions.calculator:5"]
    results = out[len(history) + 1:len(history) + 5]
    assert [m["tool_call_id"] for m in results] == ids
    assert json.loads(results[0]["content"])["city"] == "Paris" and "error" in json.loads(results[1]["content"])
    assert "error" in json.loads(results[2]["content"]) and json.loads(results[3]["content"])["result"] == 42


def test_a_synthesised_id_avoids_an_id_written_later_in_the_turn():
    # cut off: the first call's id lacks its index, the second call lacks its end; neither may run, ids must differ
    output = S + B + "functions.get_weather" + A + '{"city": "Lima"}' + E + B + "functions.get_weather:0" + A + '{"ci'
    turn = T.parse_assistant(output, T.default_registry())
    assert [c.id for c in turn.calls] == ["functions.get_weather:1", "functions.get_weather:0"]
    assert all(T.CUT_OFF in c.error for c in turn.calls)
    assert "malformed call id" in turn.calls[0].error and "no <|tool_call_end|>" in turn.calls[1].error


def test_execute_accepts_the_tokenizers_parsed_calls():
    registry = T.default_registry()
    (good,) = K.parse_tool_calls(section(("functions.calculator:0", '{"expression": "391 / 23"}'))).calls
    (bad,) = K.parse_tool_calls(section(("no id", "{}"))).calls
    assert T.execute(registry, good) == '{"expression": "391 / 23", "result": 17}'
    assert "malformed call" in json.loads(T.execute(registry, bad))["error"]


def test_execute_never_raises():
    registry = T.ToolRegistry()
    registry.register(lambda: {1, 2}, {"name": "set_maker"})
    registry.register(lambda: float("nan"), {"name": "nan_maker"})
    registry.register(lambda: 1 / 0, {"name": "crasher"})

    def run(name: str, args: dict | None = None) -> dict:
        return json.loads(T.execute(registry, T.ToolCall(id=f"functions.{name}:0", name=name, raw_arguments="{}",
                                                          arguments={} if args is None else args)))

    assert "not JSON" in run("set_maker")["error"] and "not JSON" in run("nan_maker")["error"]
    assert run("crasher")["error"] == "crasher failed (ZeroDivisionError): division by zero"
    assert "unexpected keyword argument 'x'" in run("crasher", {"x": 1})["error"]
    assert "unknown tool 'nope'" in run("nope")["error"]


# ---------------------------------------------------------------------------------------------------------------
# The agent loop
# ---------------------------------------------------------------------------------------------------------------

def test_agent_loop_runs_parallel_calls_in_order_and_renders_each_step():
    registry = T.default_registry()
    schemas = registry.schemas()
    question = "What's the weather in Tokyo, and what is 17 * 23?"
    out0 = "Let me check." + section(("functions.get_weather:0", '{"city": "Tokyo"}'),
                                     ("functions.calculator:1", '{"expression": "17 * 23"}'))
    weather, temp = weather_rule("Tokyo")
    out1 = f"Tokyo: {weather}, {temp}°C. 17 * 23 = 391."
    model = Script(out0, out1)
    events = []
    messages = [user(question)]
    out = T.run_agent(model, messages, registry, on_event=lambda kind, text: events.append((kind, text)))
    assert messages == [user(question)]  # the caller's list is not modified
    c0 = json.dumps({"city": "Tokyo", "weather": weather, "temperature_c": temp}, ensure_ascii=False)
    c1 = '{"expression": "17 * 23", "result": 391}'
    assert out == [
        user(question),
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}},
            {"id": "functions.calculator:1", "type": "function",
             "function": {"name": "calculator", "arguments": '{"expression": "17 * 23"}'}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": c0},
        {"role": "tool", "tool_call_id": "functions.calculator:1", "name": "calculator", "content": c1},
        {"role": "assistant", "content": out1}]
    # what the model saw at each step, written out by hand from the 0905 chat_template.jinja
    prompt0 = tools_block(schemas) + SYSTEM + f"<|im_user|>user<|im_middle|>{question}<|im_end|>" + GEN
    prompt1 = (prompt0 + out0 + "<|im_end|>" + tool_turn("get_weather", "functions.get_weather:0", c0)
               + tool_turn("calculator", "functions.calculator:1", c1) + GEN)
    assert model.prompts == [prompt0, prompt1]  # the model's own output re-renders byte for byte
    assert K.apply_chat_template(out, schemas, add_generation_prompt=False) == prompt1 + out1
    # and the ids generate.py feeds the model spell the same text (specials by id, text through BPE)
    tok = K.Tokenizer.load()
    for msgs, prompt in zip(model.seen, model.prompts):
        ids, _ = tok.encode_chat(msgs, schemas, add_generation_prompt=True)
        assert tok.decode(ids) == prompt
    assert [kind for kind, _ in events] == ["tool_call", "tool_result", "tool_call", "tool_result"]
    assert events[0][1].startswith('get_weather({"city": "Tokyo"})') and events[3][1].endswith(c1)


def test_agent_loop_stops_at_the_step_limit():
    outputs = [section((f"functions.calculator:{k}", f'{{"expression": "{k} + 1"}}')) for k in range(3)]
    model = Script(*outputs)  # a fourth model call would fail the Script's assertion
    events = []
    out = T.run_agent(model, [user("count")], T.default_registry(), max_steps=3,
                      on_event=lambda kind, text: events.append((kind, text)))
    assert len(model.prompts) == 3 and [m["role"] for m in out] == ["user"] + ["assistant", "tool"] * 3
    assert [json.loads(m["content"])["result"] for m in out if m["role"] == "tool"] == [1, 2, 3]
    assert [k for k, _ in events].count("step_limit") == 1 and events[-1][0] == "step_limit"
    assert "3 model calls" in events[-1][1]
    with pytest.raises(ValueError, match="max_steps"):
        T.run_agent(Script(), [user("x")], T.default_registry(), max_steps=0)


def test_plain_answer_ends_the_loop_at_once():
    model = Script("Hello! How can I help?")
    out = T.run_agent(model, [user("hi")], T.default_registry())
    assert out == [user("hi"), {"role": "assistant", "content": "Hello! How can I help?"}]


def test_section_notes_are_reported_but_calls_still_run():
    events = []
    output = S + "stray" + B + "functions.calculator:0" + A + '{"expression": "1+1"}' + E + Z + " trailing"
    out = T.run_agent(Script(output, OK), [user("1+1?")], T.default_registry(),
                      on_event=lambda kind, text: events.append((kind, text)))
    assert json.loads(out[2]["content"]) == {"expression": "1+1", "result": 2}
    notes = [text for kind, text in events if kind == "error"]
    assert any("unexpected text" in n for n in notes) and any("after the tool-call section" in n for n in notes)


# ---------------------------------------------------------------------------------------------------------------
# Calculator
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expression, result", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("17 * 23", 391), ("-3 ** 2", -9), ("(-3) ** 2", 9), ("2 ** 3 ** 2", 512),
    ("7 // 2", 3), ("-7 // 2", -4), ("-7 % 3", 2), ("7 % -3", -2), ("1 / 4", 0.25), ("6 / 3", 2), ("2 ** -1", 0.5),
    ("0.1 + 0.2", 0.3), ("1 / 3", 0.333333333333), ("+-+5", -5), ("2 ** 0.5", 1.41421356237), ("0 ** 0", 1),
    ("  12.5 * 4  ", 50), ("1e3 + 1", 1001), ("10 ** 15", 10 ** 15), ("-(2 ** 49)", -(2 ** 49)),
    ("1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1", 30),  # long flat sums are not "nesting"
])
def test_calculator_hand_computed(expression, result):
    out = T.calculator(expression)
    assert out == {"expression": expression.strip(), "result": result}
    assert type(out["result"]) is type(result)


class OutOfRange(Exception):
    pass


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv,
       "%": operator.mod, "**": operator.pow}


def random_expression(rng: random.Random, depth: int):
    """(text, tree) for a random arithmetic expression; tree nodes are ('num', v), ('neg'|'pos', t), (op, l, r)."""
    if depth == 0 or rng.random() < 0.25:
        v = rng.randint(0, 99) if rng.random() < 0.7 else round(rng.uniform(0, 99), rng.randint(1, 3))
        return repr(v), ("num", v)
    r = rng.random()
    if r < 0.15:
        text, tree = random_expression(rng, depth - 1)
        op = rng.choice(["-", "+"])
        return f"({op}({text}))", ("neg" if op == "-" else "pos", tree)
    op = rng.choice(list(OPS))
    lt, ltree = random_expression(rng, depth - 1)
    if op == "**":  # small non-negative integer exponents: real results, no huge numbers
        e = rng.randint(0, 3)
        rt, rtree = str(e), ("num", e)
    else:
        rt, rtree = random_expression(rng, depth - 1)
    spaces = rng.choice(["", " "])
    return f"({lt}{spaces}{op}{spaces}{rt})", (op, ltree, rtree)


def reference_eval(tree):
    """Python's own arithmetic on the tree; OutOfRange when a value leaves the calculator's documented bounds."""
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind in ("neg", "pos"):
        v = reference_eval(tree[1])
        v = -v if kind == "neg" else +v
    else:
        v = OPS[kind](reference_eval(tree[1]), reference_eval(tree[2]))  # ZeroDivisionError propagates
    if not math.isfinite(v) or abs(v) > 10 ** 15:
        raise OutOfRange
    return v


def tidy(x):
    """The calculator's documented output rule: floats to 12 significant digits, whole floats as ints."""
    if isinstance(x, float):
        x = float(f"{x:.12g}")
        return int(x) if x.is_integer() else x
    return x


def test_calculator_matches_python_on_random_expressions():
    rng = random.Random(1234)
    checked = zero_div = 0
    while checked < 300:
        text, tree = random_expression(rng, rng.randint(1, 4))
        if len(text) > T.MAX_EXPRESSION_CHARS:
            continue
        try:
            expected = reference_eval(tree)
        except OutOfRange:
            continue
        except ZeroDivisionError:
            with pytest.raises(T.CalculatorError, match="division by zero"):
                T.calculator(text)
            zero_div += 1
            continue
        got = T.calculator(text)["result"]
        assert got == tidy(expected), text
        assert math.isclose(got, expected, rel_tol=1e-11, abs_tol=1e-11), text
        checked += 1
    assert zero_div > 0  # the generator does reach the division-by-zero path


@pytest.mark.parametrize("expression, match", [
    ("x + 1", "name 'x' is not allowed"),
    ("pi * 2", "name 'pi' is not allowed"),
    ("(1).real", "attribute access '(1).real' is not allowed"),
    ("abs(-1)", "function call 'abs(-1)' is not allowed"),
    ("__import__('os').system('echo hacked')", "function call"),
    ("[1, 2][0]", "subscript"),
    ("[x for x in (1, 2)]", "comprehension"),
    ("lambda: 1", "lambda"),
    ("'1' + '2'", "is not a number"),
    ("True + 1", "True is not a number"),
    ("1j * 2", "1j is not a number"),
    ("1, 2", "tuple"),
    ("1 < 2", "comparison"),
    ("1 and 2", "and/or"),
    ("2 ^ 3", "operator ^ (use ** for powers)"),
    ("1 << 40", "operator <<"),
    ("~1", "operator ~"),
    ("1 +", "not a valid arithmetic expression"),
    ("import os", "not a valid arithmetic expression"),
    ("x = 1", "not a valid arithmetic expression"),
    ("", "expression is empty"),
    ("2 ** 101", "exponent 101 is too large"),
    ("2 ** 1000000", "exponent 1000000 is too large"),
    ("9 ** 99", "9 ** 99 is too large"),
    ("0.001 ** -100", "is too large"),
    ("10 ** 16", "is too large"),
    ("99999999 * 99999999", "intermediate result is too large"),
    ("1 / 1e-300", "intermediate result is too large"),
    ("1e400", "the number 1e400 is too large"),
    ("10000000000000001", "is too large"),
    ("(-8) ** 0.5", "no real value"),
    ("0 ** -1", "division by zero"),
    ("5 // 0", "division by zero"),
    ("5 % 0.0", "division by zero"),
    ("1" * 201, "at most 200"),
    ("(" * 17 + "1" + ")" * 17, "nests parentheses 17 deep; at most 16"),
])
def test_calculator_rejects_with_a_clear_message(expression, match):
    with pytest.raises(T.CalculatorError, match=re.escape(match)):  # messages are matched literally
        T.calculator(expression)


def test_tools_module_never_runs_code():
    tree = ast.parse((ROOT / "tools.py").read_text(encoding="utf-8"))
    called = {node.func.id for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__", "getattr"}


# ---------------------------------------------------------------------------------------------------------------
# get_weather
# ---------------------------------------------------------------------------------------------------------------

CITIES = ["Tokyo", "Beijing", "São Paulo", "Saint-Étienne", "St. John's", "北京", "Reykjavík", "New York"]


def test_get_weather_follows_the_documented_rule():
    for city in CITIES:
        weather, temp = weather_rule(city)
        assert T.get_weather(city) == {"city": city, "weather": weather, "temperature_c": temp}
    assert T.get_weather("  new   YORK ")["temperature_c"] == T.get_weather("New York")["temperature_c"]
    assert T.get_weather(unicodedata.normalize("NFD", "São Paulo")) == T.get_weather("São Paulo")
    reports = {tuple(weather_rule(c)) for c in CITIES}
    assert len(reports) > 1  # not a constant


def test_get_weather_is_the_same_in_another_process():
    code = f"import json, tools; print(json.dumps([tools.get_weather(c) for c in {CITIES!r}]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str-hash salt than this process
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [T.get_weather(c) for c in CITIES]


@pytest.mark.parametrize("city, match", [
    ("", "city is empty"), ("   ", "city is empty"), ("12345", "not a city name"), ("x" * 65, "at most 64"),
    ("Tokyo; rm -rf /", "unexpected characters '/;'"), ("---", "no letters"), (3, "must be a string"),
])
def test_get_weather_refuses_what_is_not_a_city(city, match):
    with pytest.raises(ValueError, match=match):
        T.get_weather(city)
