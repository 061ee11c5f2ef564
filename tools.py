"""Tools for Kimi K2's agent loop: a registry, argument validation, two offline demo tools, and the client loop.

What is here, top to bottom:
  1. `ToolRegistry`: Python functions with their JSON schemas, in the flat form
     {"name", "description", "parameters"} or OpenAI's {"type": "function", "function": {...}}; `schemas()` is the
     wrapped list the chat template declares to the model (tokenizer.normalize_tools).
  2. `validate`: the part of JSON Schema that tool schemas use (type, enum, const, properties, required,
     additionalProperties, items, and the min/max/length/pattern bounds), written out here, no dependency.
  3. `parse_assistant`: the model's text -> its content + `ToolCall`s, through tokenizer.parse_tool_calls.
  4. `execute`: one call -> the tool message's content, a JSON string. Never raises.
  5. `run_agent`: Moonshot's client loop (render -> complete -> run the calls -> append the results -> repeat).
  6. Demo tools, offline and deterministic: `get_weather` (made-up weather derived from a hash of the city name)
     and `calculator` (arithmetic through an AST whitelist; never eval).

Why it is not a textbook "function calling" helper: everything the model writes is untrusted text, and a small
model writes broken calls often. So no malformed call may end the conversation or vanish: broken JSON, an unknown
tool, a bad id, a section cut off by the token limit, arguments that break the schema, a tool that raises — each
becomes a `ToolCall` with an `error`, answered by a tool message with that call's id, which the model reads on its
next step like any other result. And nothing the model writes is ever run as Python: arguments are JSON values
passed to registered functions, and the calculator walks a whitelisted AST itself.

The history keeps what the model wrote: the assistant message stores each call's native id (`functions.NAME:IDX`)
and its argument text byte for byte, so re-rendering the conversation reproduces the model's own tokens. The one
exception: arguments that are not a JSON object are stored as "{}" (tokenizer.apply_chat_template rejects other
strings), and the error message quotes what the model wrote instead.

References: MoonshotAI/Kimi-K2 docs/tool_call_guidance.md (tool-call format, ids, schemas, client loop) and the
vLLM/SGLang kimi_k2 parsers; JSON Schema 2020-12: Validation §6.1-6.5 (type, enum, const,
numeric/string/array/object bounds; §6.1.1: "integer" matches any number with a zero fractional part) and Core
§10.3 (properties, additionalProperties, items); `format` is an annotation only (Validation §7), so it is not
checked. Python's `ast` module documentation (the calculator's node types).
"""
from __future__ import annotations

import ast
import copy
import hashlib
import inspect
import json
import math
import operator
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import tokenizer
from tokenizer import CALL_ARG_BEGIN, CALL_END, CALL_ID_RE, SECTION_BEGIN, SECTION_END
from tokenizer import parse_tool_calls  # noqa: F401  re-exported: the raw parse; execute accepts its calls too

# ---------------------------------------------------------------------------------------------------------------
# 1. JSON Schema, the subset tool schemas use
# ---------------------------------------------------------------------------------------------------------------

JSON_TYPES = ("null", "boolean", "object", "array", "number", "string", "integer")  # Validation §6.1.1
# Keywords `validate` enforces. Any other keyword is refused at registration, so no constraint is silently skipped.
KEYWORDS = frozenset({"type", "enum", "const", "properties", "required", "additionalProperties", "items",
                      "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
                      "pattern", "minItems", "maxItems"})
# Keywords that constrain nothing (JSON Schema 2020-12 Meta-Data vocabulary, Validation §9; `format` §7).
ANNOTATIONS = frozenset({"description", "title", "default", "examples", "format", "deprecated", "readOnly",
                         "writeOnly", "$schema", "$id", "$comment"})
TOOL_NAME_RE = re.compile(r"[\w.]+")  # the name part of the official id regex `[\w\.]+:\d+` (Moonshot's guide)


def json_type(value: Any) -> str:
    """The JSON type of a parsed JSON value: null, boolean, integer, number, string, array or object."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: in Python bool is a subclass of int, in JSON it is not a number
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return f"non-JSON {type(value).__name__}"


def _has_type(value: Any, t: str) -> bool:
    actual = json_type(value)
    if t == "number":  # json.loads accepts NaN and Infinity, which are not JSON numbers
        return actual in ("integer", "number") and math.isfinite(value)
    if t == "integer":  # 1.0 is an integer (Validation §6.1.1); it reaches the tool as the float 1.0
        return actual == "integer" or (actual == "number" and math.isfinite(value) and value.is_integer())
    return actual == t


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON Schema defines it for enum/const: 1 == 1.0, but true != 1 (Python says True == 1)."""
    ta, tb = json_type(a), json_type(b)
    if ta in ("integer", "number") and tb in ("integer", "number"):
        return a == b
    if ta != tb:
        return False
    if ta == "array":
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if ta == "object":
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def _show(value: Any, limit: int = 60) -> str:
    """A short JSON rendering of a value for error messages."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(value: Any) -> str:
    if json_type(value) in ("integer", "number") and not math.isfinite(value):
        return f"{value} (not a JSON number)"
    return f"{_show(value)} ({json_type(value)})"


def validate(value: Any, schema: Mapping[str, Any], where: str = "") -> list[str]:
    """Check a JSON value against a schema; returns every problem as a readable message ([] when valid).

    `where` is the path shown in messages: "" for the arguments object itself, then `city`, `options.unit`,
    `cities[2]`. Once the type is wrong the other keywords are not checked (they would only repeat the problem)."""
    label = where or "arguments"
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else list(types)
        if not any(_has_type(value, t) for t in allowed):
            return [f"{label}: expected {' or '.join(allowed)}, got {_describe(value)}"]
    errors = []
    if "enum" in schema and not any(_json_equal(value, e) for e in schema["enum"]):
        errors.append(f"{label}: expected one of {_show(schema['enum'], 120)}, got {_describe(value)}")
    if "const" in schema and not _json_equal(value, schema["const"]):
        errors.append(f"{label}: expected {_show(schema['const'])}, got {_describe(value)}")
    kind = json_type(value)
    if kind in ("integer", "number"):
        for key, ok, words in (("minimum", operator.ge, "at least"), ("maximum", operator.le, "at most"),
                               ("exclusiveMinimum", operator.gt, "more than"),
                               ("exclusiveMaximum", operator.lt, "less than")):
            if key in schema and not ok(value, schema[key]):
                errors.append(f"{label}: must be {words} {schema[key]}, got {_show(value)}")
    elif kind == "string":
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{label}: must have at least {schema['minLength']} characters, got {_show(value)}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{label}: must have at most {schema['maxLength']} characters, got {len(value)}")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:  # unanchored, as in §6.3.3
            errors.append(f"{label}: must match the pattern {schema['pattern']!r}, got {_show(value)}")
    elif kind == "array":
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{label}: must have at least {schema['minItems']} items, got {len(value)}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{label}: must have at most {schema['maxItems']} items, got {len(value)}")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += validate(item, schema["items"], f"{where}[{i}]" if where else f"[{i}]")
    elif kind == "object":
        props = schema.get("properties", {})
        noun = "argument" if not where else "property"
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"missing required {noun} {key!r}" + (f" in {where}" if where else ""))
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            path = f"{where}.{key}" if where else key
            if key in props:
                errors += validate(item, props[key], path)
            elif extra is False:
                allowed = ", ".join(props) or "none"
                errors.append(f"unexpected {noun} {key!r}" + (f" in {where}" if where else "")
                              + f" (allowed: {allowed})")
            elif isinstance(extra, Mapping):
                errors += validate(item, extra, path)
    return errors


def check_schema(schema: Any, where: str = "parameters") -> None:
    """Raise ValueError if `schema` is not a schema `validate` can enforce completely (unknown type names,
    malformed keywords, or keywords it does not implement, such as anyOf or $ref)."""
    if not isinstance(schema, Mapping):
        raise ValueError(f"{where} must be a JSON Schema object (a dict), got {type(schema).__name__}")
    unknown = set(schema) - KEYWORDS - ANNOTATIONS
    if unknown:
        raise ValueError(f"{where}: keyword(s) {sorted(unknown)} are not supported by tools.validate; supported: "
                         f"{sorted(KEYWORDS)} (plus annotations such as description)")
    types = schema.get("type")
    if types is not None:
        listed = [types] if isinstance(types, str) else types
        if not isinstance(listed, list) or not listed or any(t not in JSON_TYPES for t in listed):
            raise ValueError(f"{where}.type is {types!r}; expected one of {', '.join(JSON_TYPES)} or a list of them")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise ValueError(f"{where}.enum must be a non-empty list, got {schema['enum']!r}")
    props = schema.get("properties", {})
    if not isinstance(props, Mapping):
        raise ValueError(f"{where}.properties must be a dict of name -> schema, got {type(props).__name__}")
    for key, sub in props.items():
        check_schema(sub, f"{where}.properties.{key}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
        raise ValueError(f"{where}.required must be a list of property names, got {required!r}")
    missing = [k for k in required if k not in props]
    if missing and schema.get("additionalProperties", True) is False:
        raise ValueError(f"{where}: required {missing} are not in properties and additionalProperties is false, "
                         f"so no value could ever be valid")
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, (bool, Mapping)):
        raise ValueError(f"{where}.additionalProperties must be true, false or a schema, got {extra!r}")
    if isinstance(extra, Mapping):
        check_schema(extra, f"{where}.additionalProperties")
    if "items" in schema:  # the list (tuple) form of draft 4-2019 is prefixItems in 2020-12; not supported
        check_schema(schema["items"], f"{where}.items")
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and json_type(schema[key]) not in ("integer", "number"):
            raise ValueError(f"{where}.{key} must be a number, got {schema[key]!r}")
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        if key in schema and (json_type(schema[key]) != "integer" or schema[key] < 0):
            raise ValueError(f"{where}.{key} must be a non-negative integer, got {schema[key]!r}")
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except (re.error, TypeError) as err:
            raise ValueError(f"{where}.pattern {schema['pattern']!r} is not a valid regular expression ({err})")


# ---------------------------------------------------------------------------------------------------------------
# 2. The registry
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    """A registered tool: `schema` is the wrapped OpenAI form, exactly as declared to the model."""
    name: str
    fn: Callable[..., Any]
    schema: dict

    @property
    def parameters(self) -> dict:
        """The JSON Schema of the arguments object; a tool declared without one takes no constraints."""
        return self.schema["function"].get("parameters", {"type": "object"})


class ToolRegistry:
    """Python functions the model may call, by name, with their JSON schemas (in registration order)."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, fn: Callable[..., Any], schema: Mapping[str, Any]) -> Callable[..., Any]:
        """Add `fn` under the schema's name. `schema` is the flat {"name", "description", "parameters"} form or the
        OpenAI {"type": "function", "function": {...}} form. Returns `fn`. Raises ValueError on a duplicate name,
        a name the id format cannot carry, a schema `validate` cannot enforce, or a schema that disagrees with
        fn's signature (a property fn does not accept, or a parameter fn needs that the schema lacks)."""
        if not callable(fn):
            raise ValueError(f"register: fn must be callable, got {type(fn).__name__}")
        try:
            (wrapped,) = tokenizer.normalize_tools([schema])
        except ValueError as err:
            raise ValueError(f"register: invalid tool schema: {err}") from None
        spec = wrapped["function"]
        name = spec.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
            # the model names a tool only through its id functions.NAME:IDX, and the official regex allows [\w.]
            raise ValueError(f"register: tool name {name!r} must be letters, digits, '_' or '.' (the id "
                             f"functions.NAME:IDX could not carry it otherwise; Moonshot's tool-call guide)")
        if name in self._tools:
            raise ValueError(f"register: a tool named {name!r} is already registered")
        if "description" in spec and not isinstance(spec["description"], str):
            raise ValueError(f"register: {name}: description must be a string")
        params = spec.get("parameters", {"type": "object"})
        check_schema(params, f"{name}: parameters")
        if params.get("type") != "object":
            raise ValueError(f"register: {name}: parameters must have type 'object' (calls pass a JSON object "
                             f"of named arguments), got {params.get('type')!r}")
        _check_signature(name, fn, params)
        self._tools[name] = Tool(name=name, fn=fn, schema=copy.deepcopy(wrapped))
        return fn

    def tool(self, schema: Mapping[str, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of register: `@registry.tool({"name": "f", ...})` above `def f(...)`."""
        return lambda fn: self.register(fn, schema)

    def schemas(self) -> list[dict]:
        """The wrapped OpenAI-form schemas, in registration order: the `tools` argument of the chat template."""
        return [copy.deepcopy(t.schema) for t in self._tools.values()]

    def get(self, name: str | None) -> Tool | None:
        return self._tools.get(name) if isinstance(name, str) else None

    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)


def _check_signature(name: str, fn: Callable[..., Any], params: Mapping[str, Any]) -> None:
    """Registration-time agreement between schema and function, so a mismatch is the developer's error now,
    not a TypeError shown to the model later."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; calls are still checked by the call itself
        return
    kinds = {p.name: p.kind for p in sig.parameters.values()}
    var_kw = inspect.Parameter.VAR_KEYWORD in kinds.values()
    keyword_ok = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for prop in params.get("properties", {}):
        if not var_kw and kinds.get(prop) not in keyword_ok:
            raise ValueError(f"register: {name}: the schema has property {prop!r}, but {fn.__name__}() does not "
                             f"take a keyword argument of that name")
    for p in sig.parameters.values():
        if p.kind in keyword_ok and p.default is inspect.Parameter.empty and p.name not in params.get(
                "properties", {}):
            raise ValueError(f"register: {name}: {fn.__name__}() requires {p.name!r}, but the schema has no such "
                             f"property, so the model could never pass it")
        if p.kind == inspect.Parameter.POSITIONAL_ONLY and p.default is inspect.Parameter.empty:
            raise ValueError(f"register: {name}: {fn.__name__}() has a positional-only parameter {p.name!r}; "
                             f"tools are called with keyword arguments only")


# ---------------------------------------------------------------------------------------------------------------
# 3. Model text -> calls
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ToolCall:
    """One call the model attempted. `id` is the model's own `functions.NAME:IDX` when it wrote a usable one, else
    synthesised (see parse_assistant). `error` set means the call must not run: it is the tool result instead."""
    id: str
    name: str
    raw_arguments: str
    arguments: dict | None = None
    error: str | None = None

    def to_openai(self) -> dict:
        """The OpenAI `tool_calls` entry for the assistant message. Arguments are the model's text byte for byte
        when they parsed to an object; otherwise "{}" (the chat template accepts only JSON objects)."""
        args = self.raw_arguments if self.arguments is not None else "{}"
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": args}}


@dataclass
class AssistantTurn:
    """What one model output holds: `content` (text before the tool-call section), `calls` in the order written,
    `notes` about the section that concern no single call (reported to the user, not the model)."""
    content: str
    calls: list[ToolCall] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_HEAD_NAME_RE = re.compile(r"(?:functions\.)?([\w.]+)")  # a name at the start of a malformed id, if any
CUT_OFF = "the tool-call section was not closed with <|tool_calls_section_end|> (output cut off?), so its calls " \
          "were not run"


def _diagnose(part: str) -> str:
    """Why a call between <|tool_call_begin|> and the next one did not match the official call regex."""
    shown = part.replace(CALL_ARG_BEGIN, " <|tool_call_argument_begin|> ").strip()[:80]
    if CALL_ARG_BEGIN not in part:
        return f"malformed call: no <|tool_call_argument_begin|> between the id and the arguments in {shown!r}"
    head = part.split(CALL_ARG_BEGIN, 1)[0].strip()
    if not CALL_ID_RE.match(head):
        return f"malformed call id {head[:60]!r}: expected functions.NAME:IDX (NAME of letters, digits, _ or .)"
    if CALL_END not in part:
        return "malformed call: no <|tool_call_end|> after the arguments (output cut off?)"
    return f"malformed call: {shown!r}"


def _usable_id(pc: tokenizer.ParsedToolCall | None) -> tuple[str, str] | None:
    """(id, name) when the model wrote a well-formed id for this call, even if the rest of the call is broken."""
    if pc is None:
        return None
    if pc.id:
        return pc.id, pc.name
    if CALL_ARG_BEGIN in pc.raw_arguments:
        head = pc.raw_arguments.split(CALL_ARG_BEGIN, 1)[0].strip()
        idm = CALL_ID_RE.match(head)
        if idm:
            return head, idm.group("name")
    return None


def parse_assistant(text: str, registry: ToolRegistry | None = None, first_index: int = 0) -> AssistantTurn:
    """Split model output into content and calls; never raises, never drops a call attempt.

    Every call the tokenizer's parser finds becomes a ToolCall; malformed ones carry `error`. A call whose own id
    is unusable gets `functions.{name}:{idx}`: name = what the broken id starts with if that is a registered tool,
    else 'unknown'; idx = `first_index` (tool calls earlier in the conversation, vLLM's kimi_k2 parser) + its
    position in this turn, moved up past any id this turn already uses. If the section is not closed, every call in
    it gets an error (a cut-off turn is not acted on). A section with no call at all still yields one error call,
    so the model hears about it."""
    parsed = tokenizer.parse_tool_calls(text)
    turn = AssistantTurn(content=parsed.content)
    start = text.find(SECTION_BEGIN)
    if start < 0:
        return turn
    end = text.find(SECTION_END, start)  # str.find, not SECTION_RE: linear even on a model repeating the marker
    closed = end >= 0
    after = text[end + len(SECTION_END):].strip() if closed else ""
    notes = [e for e in parsed.errors if "tool_calls_section_end" not in e]  # the cut-off is attached to calls
    if after:
        notes.append(f"text after the tool-call section was ignored: {after[:80]!r}")
    turn.notes = notes
    attempts: list[tokenizer.ParsedToolCall | None] = list(parsed.calls) or [None]
    native = [_usable_id(pc) for pc in attempts]
    taken = {n[0] for n in native if n}  # ids the model wrote usably, kept as written (duplicates included)
    for j, (pc, nid) in enumerate(zip(attempts, native)):
        if pc is not None and pc.id:  # the official regex matched
            call = ToolCall(id=pc.id, name=pc.name, raw_arguments=pc.raw_arguments, arguments=pc.arguments,
                            error=pc.error)
        else:
            raw = pc.raw_arguments if pc is not None else ""
            if pc is None:
                error = "the tool-call section holds no call" + (f" ({'; '.join(notes)})" if notes else "")
            else:
                error = _diagnose(raw)
            if nid:  # the id itself is fine (e.g. the call lacks its end marker): keep it
                call_id, name = nid
            else:
                guess = _HEAD_NAME_RE.match(raw.split(CALL_ARG_BEGIN, 1)[0].strip())
                name = guess.group(1) if guess and registry is not None and guess.group(1) in registry else "unknown"
                idx = first_index + j
                while tokenizer.tool_call_id(name, idx) in taken:
                    idx += 1
                call_id = tokenizer.tool_call_id(name, idx)
                taken.add(call_id)
            call = ToolCall(id=call_id, name=name, raw_arguments=raw, arguments=None, error=error)
        if not closed:
            call.error = CUT_OFF if call.error is None else f"{call.error}; {CUT_OFF}"
        turn.calls.append(call)
    return turn


# ---------------------------------------------------------------------------------------------------------------
# 4. Running one call
# ---------------------------------------------------------------------------------------------------------------

def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


def run_call(registry: ToolRegistry, call: ToolCall | tokenizer.ParsedToolCall) -> tuple[str, bool]:
    """execute, plus whether the result is an error: (content, ok)."""
    if call.error is not None:
        return _error(call.error), False
    tool = registry.get(call.name)
    if tool is None:
        return _error(f"unknown tool {call.name!r}; available tools: {', '.join(registry.names()) or 'none'}"), False
    args = call.arguments if call.arguments is not None else {}
    problems = validate(args, tool.parameters)
    if problems:
        return _error(f"invalid arguments for {tool.name}: " + "; ".join(problems)), False
    try:
        signature = inspect.signature(tool.fn)
    except (TypeError, ValueError):  # no signature to check against (some builtins); the call itself will tell
        signature = None
    try:
        if signature is not None:
            signature.bind(**args)  # e.g. a property the schema leaves optional but fn requires
    except TypeError as err:
        return _error(f"invalid arguments for {tool.name}: {err}"), False
    try:
        result = tool.fn(**args)
    except Exception as err:  # the tool's own failure is a result the model can react to, not a crash
        return _error(f"{tool.name} failed ({type(err).__name__}): {err}"), False
    try:  # allow_nan=False: NaN/Infinity would make the content invalid JSON
        return json.dumps(result, ensure_ascii=False, allow_nan=False), True
    except (TypeError, ValueError) as err:
        return _error(f"{tool.name} returned a value that is not JSON ({err})"), False


def execute(registry: ToolRegistry, call: ToolCall | tokenizer.ParsedToolCall) -> str:
    """Run one call and return the tool message's content: json.dumps(result), or {"error": "..."} when the call
    is malformed, names an unknown tool, breaks the schema or fn's signature, or fn raises. Never raises.
    `call` is a ToolCall from parse_assistant or a tokenizer.ParsedToolCall (same fields: name, arguments, error)."""
    return run_call(registry, call)[0]


# ---------------------------------------------------------------------------------------------------------------
# 5. The agent loop (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md)
# ---------------------------------------------------------------------------------------------------------------

def count_tool_calls(messages: Sequence[Mapping[str, Any]]) -> int:
    """Tool calls already in the conversation: the base of the index for ids made up in the next turn."""
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def run_agent(complete: Callable[[list[dict], list[dict] | None], str], messages: Sequence[Mapping[str, Any]],
              registry: ToolRegistry, max_steps: int = 4,
              on_event: Callable[[str, str], None] | None = None) -> list[dict]:
    """Let the model answer, running its tool calls, until it answers without calls or made `max_steps` calls.

    complete(messages, tool_schemas) -> the assistant's raw text (tool-call markers included, final <|im_end|>
    excluded). Each turn with calls appends {"role": "assistant", "content", "tool_calls"} (OpenAI form, native
    ids), then per call, in order, {"role": "tool", "tool_call_id", "name", "content"}; a turn without calls is
    appended as {"role": "assistant", "content"} and ends the loop. on_event(kind, text) reports "tool_call",
    "tool_result", "error" and "step_limit". Returns a new list; `messages` itself is not modified."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1 (model calls per user turn), got {max_steps}")
    emit = on_event or (lambda kind, text: None)
    messages = [dict(m) for m in messages]
    schemas = registry.schemas()
    for _ in range(max_steps):
        text = complete(list(messages), schemas)
        turn = parse_assistant(text, registry, first_index=count_tool_calls(messages))
        for note in turn.notes:
            emit("error", note)
        if not turn.calls:
            messages.append({"role": "assistant", "content": turn.content})
            return messages
        messages.append({"role": "assistant", "content": turn.content,
                         "tool_calls": [c.to_openai() for c in turn.calls]})
        for call in turn.calls:
            emit("tool_call", f"{call.name}({call.raw_arguments.strip()[:200]})  [{call.id}]")
            content, ok = run_call(registry, call)
            emit("tool_result" if ok else "error", f"{call.id} -> {content}")
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content})
    emit("step_limit", f"stopped after {max_steps} model calls (max_steps) without an answer free of tool calls")
    return messages


# ---------------------------------------------------------------------------------------------------------------
# 6. Demo tools: offline, deterministic
# ---------------------------------------------------------------------------------------------------------------

# The flat-form get_weather schema that chat_data.py and the tests also use. It marks nothing required; a call
# without `city` is still refused, by get_weather's signature (execute binds the arguments before calling).
GET_WEATHER_SCHEMA = {
    "name": "get_weather",
    "description": "Retrieve current weather for a given city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
# Made-up weather (there is no network): the rule below maps every city name to one fixed report. The seed's own
# example returns "Sunny, 25°C"; these ranges are ours, chosen to read plausibly.
WEATHER_CONDITIONS = ("Sunny", "Partly cloudy", "Cloudy", "Rainy", "Windy")
MIN_TEMPERATURE_C, MAX_TEMPERATURE_C = -5, 35
MAX_CITY_CHARS = 64  # longer than any real city name in common use; keeps error messages and prompts short
CITY_PUNCTUATION = set(" -'’.,()")  # St. John's, Saint-Étienne, Washington, D.C.


def city_key(city: str) -> str:
    """The normalised name the weather is derived from: NFC, whitespace runs collapsed to one space, casefolded
    ("  new   YORK " and "New York" get the same weather)."""
    return " ".join(unicodedata.normalize("NFC", city).split()).casefold()


def get_weather(city: str) -> dict:
    """Deterministic fake weather for any city name. Rule: d = sha256(city_key(city).encode('utf-8')).digest();
    weather = WEATHER_CONDITIONS[d[0] % 5]; temperature_c = -5 + d[1] % 41. sha256, not hash(): Python salts
    str hashes per process (PYTHONHASHSEED), and the answer must be the same in every process.
    Raises ValueError for something that is not a city name (empty, too long, digits or symbols, no letter)."""
    if not isinstance(city, str):
        raise ValueError(f"city must be a string, got {json_type(city)}")
    shown = " ".join(unicodedata.normalize("NFC", city).split())
    if not shown:
        raise ValueError("city is empty; pass a city name such as \"Tokyo\"")
    if len(shown) > MAX_CITY_CHARS:
        raise ValueError(f"city is {len(shown)} characters long; a city name has at most {MAX_CITY_CHARS}")
    bad = sorted({ch for ch in shown if ch not in CITY_PUNCTUATION and unicodedata.category(ch)[0] not in "LM"})
    if bad or not any(ch.isalpha() for ch in shown):
        raise ValueError(f"{shown!r} is not a city name" + (f" (unexpected characters {''.join(bad)!r})" if bad
                                                              else " (it has no letters)"))
    d = hashlib.sha256(city_key(shown).encode("utf-8")).digest()
    span = MAX_TEMPERATURE_C - MIN_TEMPERATURE_C + 1
    return {"city": shown, "weather": WEATHER_CONDITIONS[d[0] % len(WEATHER_CONDITIONS)],
            "temperature_c": MIN_TEMPERATURE_C + d[1] % span}


CALCULATOR_SCHEMA = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression with numbers, + - * / // % ** and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}
# Bounds (ours): they keep every step cheap and every result printable. 1e15 < 2**53, so every integer the
# calculator can produce converts to a float exactly; 200 characters is ample for a question's arithmetic.
MAX_EXPRESSION_CHARS = 200
MAX_NESTING = 16  # parentheses inside parentheses; the length bound alone already keeps the tree < 200 deep
MAX_MAGNITUDE = 10 ** 15  # for every number written and every intermediate result
MAX_EXPONENT = 100  # |b| in a ** b; with the magnitude check, a ** b is refused before it is computed
RESULT_DIGITS = 12  # float results are rounded to 12 significant digits: 0.1 + 0.2 -> 0.3, 6 / 3 -> 2


class CalculatorError(ValueError):
    """An expression the calculator refuses, with the reason in words."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: None}  # Pow: _power, with checks
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_OPERATOR_TEXT = {ast.BitXor: "^ (use ** for powers)", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<",
                  ast.RShift: ">>", ast.MatMult: "@", ast.Invert: "~", ast.Not: "not"}
_KIND = {ast.Name: "name", ast.Attribute: "attribute access", ast.Call: "function call", ast.Subscript: "subscript",
         ast.Lambda: "lambda", ast.ListComp: "comprehension", ast.SetComp: "comprehension",
         ast.DictComp: "comprehension", ast.GeneratorExp: "comprehension", ast.Compare: "comparison",
         ast.BoolOp: "and/or", ast.IfExp: "conditional expression", ast.NamedExpr: "assignment",
         ast.Tuple: "tuple (a comma)", ast.List: "list", ast.Dict: "dict", ast.Set: "set", ast.JoinedStr: "f-string",
         ast.Starred: "starred expression", ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield"}
ALLOWED = "only numbers, + - * / // % **, unary + and -, and parentheses are allowed"


def _check_tree(node: ast.AST, source: str) -> None:
    """Refuse anything that is not whitelisted arithmetic, before a single operation is evaluated. Recursive: the
    tree is at most ~MAX_EXPRESSION_CHARS deep (each level costs a character), far below Python's recursion limit."""
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):  # True, 'text', 1j, None, ...
            raise CalculatorError(f"{_show(v) if isinstance(v, str) else repr(v)} is not a number; {ALLOWED}")
        _bounded(v, f"the number {ast.get_source_segment(source, node) or v}")
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check_tree(node.left, source)
        _check_tree(node.right, source)
        return
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check_tree(node.operand, source)
        return
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        op = type(node.op)
        raise CalculatorError(f"operator {_OPERATOR_TEXT.get(op, op.__name__)} is not allowed; {ALLOWED}")
    segment = ast.get_source_segment(source, node) or ""
    kind = _KIND.get(type(node), type(node).__name__)
    raise CalculatorError(f"{kind} {segment[:40]!r} is not allowed; {ALLOWED}")


def _bounded(value: int | float, what: str) -> int | float:
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"{what} is too large: the calculator works with magnitudes up to 1e15")
    return value


def _power(a: int | float, b: int | float) -> int | float:
    if abs(b) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {b} is too large: at most {MAX_EXPONENT} in size")
    if a == 0 and b < 0:
        raise CalculatorError("division by zero (0 raised to a negative power)")
    if a < 0 and b != int(b):
        raise CalculatorError(f"({a}) ** {b}: a negative number to a fractional power has no real value")
    # b·log10|a| is the result's order of magnitude: refuse 9 ** 99 before computing a 95-digit number
    if a != 0 and b * math.log10(abs(a)) > math.log10(MAX_MAGNITUDE) + 1e-9:
        raise CalculatorError(f"{a} ** {b} is too large: the calculator works with magnitudes up to 1e15")
    return a ** b


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand))
    a, b = _evaluate(node.left), _evaluate(node.right)
    op = type(node.op)
    try:
        value = _power(a, b) if op is ast.Pow else _BINARY[op](a, b)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    return _bounded(value, "an intermediate result")


def _paren_depth(text: str) -> int:
    """The deepest parenthesis nesting in text (already known to be balanced arithmetic)."""
    depth = deepest = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        deepest = max(deepest, depth)
    return deepest


def tidy_number(x: int | float) -> int | float:
    """The result as the calculator reports it: ints exact; floats rounded to RESULT_DIGITS significant digits,
    and written as ints when whole (6 / 3 -> 2)."""
    if isinstance(x, float):
        x = float(f"{x:.{RESULT_DIGITS}g}")
        if x.is_integer():
            return int(x)
    return x


def calculator(expression: str) -> dict:
    """Evaluate arithmetic safely: parse with ast, refuse every node outside the whitelist, then compute with
    Python's own operators (so // floors and % takes the divisor's sign, as in Python), checking the bounds at
    every step. Returns {"expression", "result"}. Raises CalculatorError (a ValueError) with the reason."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a string, got {json_type(expression)}")
    text = expression.strip()
    if not text:
        raise CalculatorError("expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression is {len(text)} characters long; at most {MAX_EXPRESSION_CHARS}")
    try:  # parsing only builds a tree; nothing is compiled or run
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise CalculatorError(f"not a valid arithmetic expression ({err.msg}): {text[:60]!r}") from None
    except (ValueError, RecursionError, MemoryError) as err:  # null bytes; pathological nesting
        raise CalculatorError(f"not a valid arithmetic expression ({type(err).__name__})") from None
    _check_tree(tree.body, text)
    depth = _paren_depth(text)  # only numbers, operators and parentheses are left to count
    if depth > MAX_NESTING:
        raise CalculatorError(f"expression nests parentheses {depth} deep; at most {MAX_NESTING}")
    return {"expression": text, "result": tidy_number(_evaluate(tree.body))}


def default_registry() -> ToolRegistry:
    """The built-in demo tools, get_weather and calculator, in that order (both offline and deterministic)."""
    registry = ToolRegistry()
    registry.register(get_weather, GET_WEATHER_SCHEMA)
    registry.register(calculator, CALCULATOR_SCHEMA)
    return registry
