"""Tools for Kimi K2's agent loop: a registry, argument validation, two demo tools, the loop.

What is here, top to bottom:
  1. `ToolRegistry`: Python functions with their JSON schemas, in the flat form
     {"name", "description", "parameters"} or OpenAI's {"type": "function", "function": {...}};
     `schemas()` is the wrapped list the chat template declares to the model
     (tokenizer.normalize_tools). A schema is checked against its JSON Schema metaschema, and
     against the function's signature, when it is registered.
  2. `parse_assistant`: the model's text -> its content + `tokenizer.ToolCall`s, every attempt
     with a usable id. The wire format itself (markers, ids, the parser) lives in tokenizer.py.
  3. `execute`: one call -> the tool message's content, a JSON string. Never raises.
  4. `run_agent`: Moonshot's client loop (render -> complete -> run the calls -> append the
     results -> repeat).
  5. Demo tools, offline and deterministic: `get_weather` (made-up weather derived from a hash of
     the city name) and `calculator` (arithmetic through an AST whitelist; never eval).
  6. `validate`: the arguments against the tool's JSON Schema, by the `jsonschema` library, with
     messages that name the argument at fault.

Why it is not a textbook "function calling" helper: everything the model writes is untrusted text,
and a small model writes broken calls often. So no malformed call may end the conversation or
vanish: broken JSON, an unknown tool, a bad id, a section cut off by the token limit, arguments that
break the schema, a tool that raises — each becomes a `ToolCall` with an `error`, answered by a
tool message with that call's id, which the model reads on its next step like any other result. And
nothing the model writes is ever run as Python: arguments are JSON values passed to registered
functions, and the calculator walks a whitelisted AST itself.

The history keeps what the model wrote: the assistant message stores each call's native id
(`functions.NAME:IDX`) and its argument text byte for byte, so re-rendering the conversation
reproduces the model's own tokens. The one exception: arguments that are not a JSON object are
stored as "{}" (tokenizer.apply_chat_template rejects other strings), and the error message quotes
what the model wrote instead.

References: MoonshotAI/Kimi-K2 docs/tool_call_guidance.md (tool-call format, ids, schemas, client
loop) and the vLLM/SGLang kimi_k2 parsers; JSON Schema 2020-12 Validation §6.1.1 ("integer" matches
any number with a zero fractional part; NaN and Infinity are not JSON numbers) and §7 (`format` is
an annotation, not checked); Python's `ast` module documentation (the calculator's node types).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import operator
import re
import unicodedata
from typing import Any, Callable, Mapping, Sequence

import jsonschema
from jsonschema.validators import validator_for

import tokenizer
from tokenizer import (CALL_ARG_BEGIN, SECTION_NOT_CLOSED, TOOL_NAME, TOOL_NAME_RE, ToolCall,
                       ToolCallParse)
# re-exported: the raw parse; execute accepts its calls too
from tokenizer import parse_tool_calls  # noqa: F401

# --------------------------------------------------------------------------------------------------
# 1. The registry
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tool:
    """A registered tool: `schema` is the wrapped OpenAI form, exactly as declared to the model."""
    name: str
    fn: Callable[..., Any]
    schema: dict

    @property
    def parameters(self) -> dict:
        """The arguments' JSON Schema; a tool declared without one takes no constraints."""
        return self.schema["function"].get("parameters", {"type": "object"})


class ToolRegistry:
    """The functions the model may call, by name, with their JSON schemas, in registration order."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, fn: Callable[..., Any], schema: Mapping[str, Any]) -> Callable[..., Any]:
        """Add `fn` under the schema's name and return `fn`.

        `schema` is the flat {"name", "description", "parameters"} form or the OpenAI
        {"type": "function", "function": {...}} form. Raises ValueError on a duplicate name, a name
        the id format cannot carry, parameters that are not a valid JSON Schema (or that no call
        could satisfy), or a schema that disagrees with fn's signature (a property fn does not
        accept, or a parameter fn needs that the schema lacks)."""
        if not callable(fn):
            raise ValueError(f"register: fn must be callable, got {type(fn).__name__}")
        try:
            (wrapped,) = tokenizer.normalize_tools([schema])
        except ValueError as err:
            raise ValueError(f"register: invalid tool schema: {err}") from None
        spec = wrapped["function"]
        name = spec.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
            # the model names a tool only through its id functions.NAME:IDX (tokenizer.CALL_ID_RE)
            raise ValueError(f"register: tool name {name!r} must be letters, digits, '_' or '.' "
                             f"(the id functions.NAME:IDX could not carry it otherwise; "
                             f"Moonshot's tool-call guide)")
        if name in self._tools:
            raise ValueError(f"register: a tool named {name!r} is already registered")
        if "description" in spec and not isinstance(spec["description"], str):
            raise ValueError(f"register: {name}: description must be a string")
        params = spec.get("parameters", {"type": "object"})
        check_schema(params, f"{name}: parameters")
        if params.get("type") != "object":
            raise ValueError(f"register: {name}: parameters must have type 'object' (calls pass a "
                             f"JSON object of named arguments), got {params.get('type')!r}")
        _check_signature(name, fn, params)
        self._tools[name] = Tool(name=name, fn=fn, schema=copy.deepcopy(wrapped))
        return fn

    def tool(self, schema: Mapping[str, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of register: `@registry.tool({"name": "f", ...})` above `def f(...)`."""
        return lambda fn: self.register(fn, schema)

    def schemas(self) -> list[dict]:
        """The wrapped OpenAI-form schemas, in registration order: the chat template's `tools`."""
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
    """Registration-time agreement between schema and function, so a mismatch is the developer's
    error now, not a TypeError shown to the model later."""
    try:
        sig = inspect.signature(fn)
    # some builtins have no signature; calls are still checked by the call itself
    except (TypeError, ValueError):
        return
    kinds = {p.name: p.kind for p in sig.parameters.values()}
    var_kw = inspect.Parameter.VAR_KEYWORD in kinds.values()
    keyword_ok = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    properties = params.get("properties", {})
    for prop in properties:
        if not var_kw and kinds.get(prop) not in keyword_ok:
            raise ValueError(f"register: {name}: the schema has property {prop!r}, but "
                             f"{fn.__name__}() does not take a keyword argument of that name")
    for p in sig.parameters.values():
        required = p.default is inspect.Parameter.empty
        if p.kind in keyword_ok and required and p.name not in properties:
            raise ValueError(f"register: {name}: {fn.__name__}() requires {p.name!r}, but the "
                             f"schema has no such property, so the model could never pass it")
        if p.kind == inspect.Parameter.POSITIONAL_ONLY and required:
            raise ValueError(f"register: {name}: {fn.__name__}() has a positional-only parameter "
                             f"{p.name!r}; tools are called with keyword arguments only")


# --------------------------------------------------------------------------------------------------
# 2. Model text -> calls
# --------------------------------------------------------------------------------------------------

# a name at the start of a malformed id, if any
_HEAD_NAME_RE = re.compile(rf"(?:functions\.)?({TOOL_NAME})")
CUT_OFF = ("the tool-call section was not closed with <|tool_calls_section_end|> "
           "(output cut off?), so its calls were not run")


def parse_assistant(text: str, registry: ToolRegistry | None = None,
                    first_index: int = 0) -> ToolCallParse:
    """Split model output into content and calls; never raises, never drops a call attempt.

    tokenizer.parse_tool_calls finds the calls; here each gets an id it can be answered by. A call
    whose own id is unusable gets `functions.{name}:{idx}`: name = what the broken id starts with if
    that is a registered tool, else 'unknown'; idx = `first_index` (tool calls earlier in the
    conversation, vLLM's kimi_k2 parser) + its position in this turn, moved up past any id this turn
    already uses. If the section is not closed, every call in it gets an error (a cut-off turn is
    not acted on). A section with no call at all still yields one error call, so the model hears
    about it. `errors` of the result are notes about the section that concern no single call
    (reported to the user, not the model)."""
    parsed = tokenizer.parse_tool_calls(text)
    if not parsed.has_section:
        return parsed
    # the cut-off is attached to the calls instead
    notes = [e for e in parsed.errors if e != SECTION_NOT_CLOSED]
    if parsed.after.strip():
        notes.append(f"text after the tool-call section was ignored: {parsed.after.strip()[:80]!r}")
    if not parsed.calls:
        error = "the tool-call section holds no call" + (f" ({'; '.join(notes)})" if notes else "")
        parsed.calls = [ToolCall(id="", name=None, raw_arguments="", error=error)]
    # ids the model wrote usably, kept as written (duplicates included)
    taken = {c.id for c in parsed.calls if c.id}
    calls = []
    for j, call in enumerate(parsed.calls):
        if not call.id:
            head = _HEAD_NAME_RE.match(call.raw_arguments.split(CALL_ARG_BEGIN, 1)[0].strip())
            known = head and registry is not None and head.group(1) in registry
            name = head.group(1) if known else "unknown"
            idx = first_index + j
            while tokenizer.tool_call_id(name, idx) in taken:
                idx += 1
            call_id = tokenizer.tool_call_id(name, idx)
            call = dataclasses.replace(call, id=call_id, name=name, index=idx)
            taken.add(call.id)
        if not parsed.closed:
            call = dataclasses.replace(call, error=CUT_OFF if call.error is None
                                       else f"{call.error}; {CUT_OFF}")
        calls.append(call)
    return dataclasses.replace(parsed, calls=calls, errors=notes)


# --------------------------------------------------------------------------------------------------
# 3. Running one call
# --------------------------------------------------------------------------------------------------

def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


def run_call(registry: ToolRegistry, call: ToolCall) -> tuple[str, bool]:
    """execute, plus whether the result is an error: (content, ok)."""
    if call.error is not None:
        return _error(call.error), False
    tool = registry.get(call.name)
    if tool is None:
        available = ", ".join(registry.names()) or "none"
        return _error(f"unknown tool {call.name!r}; available tools: {available}"), False
    args = call.arguments if call.arguments is not None else {}
    problems = validate(args, tool.parameters)
    if problems:
        return _error(f"invalid arguments for {tool.name}: " + "; ".join(problems)), False
    try:
        signature = inspect.signature(tool.fn)
    # no signature to check against (some builtins); the call itself will tell
    except (TypeError, ValueError):
        signature = None
    try:
        if signature is not None:
            # e.g. a property the schema leaves optional but fn requires
            signature.bind(**args)
    except TypeError as err:
        return _error(f"invalid arguments for {tool.name}: {err}"), False
    try:
        result = tool.fn(**args)
    # the tool's own failure is a result the model can react to, not a crash
    except Exception as err:
        return _error(f"{tool.name} failed ({type(err).__name__}): {err}"), False
    # allow_nan=False: NaN/Infinity would make the content invalid JSON
    try:
        return json.dumps(result, ensure_ascii=False, allow_nan=False), True
    except (TypeError, ValueError) as err:
        return _error(f"{tool.name} returned a value that is not JSON ({err})"), False


def execute(registry: ToolRegistry, call: ToolCall) -> str:
    """Run one call and return the tool message's content: json.dumps(result), or {"error": "..."}
    when the call is malformed, names an unknown tool, breaks the schema or fn's signature, or fn
    raises. Never raises. `call` comes from parse_assistant or tokenizer.parse_tool_calls."""
    return run_call(registry, call)[0]


# --------------------------------------------------------------------------------------------------
# 4. The agent loop (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md)
# --------------------------------------------------------------------------------------------------

def count_tool_calls(messages: Sequence[Mapping[str, Any]]) -> int:
    """Tool calls already in the conversation: the base of the index for ids made up next turn."""
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def run_agent(complete: Callable[[list[dict], list[dict] | None], str],
              messages: Sequence[Mapping[str, Any]], registry: ToolRegistry, max_steps: int = 4,
              on_event: Callable[[str, str], None] | None = None) -> list[dict]:
    """Let the model answer, running its tool calls, until it answers without calls or made
    `max_steps` calls.

    complete(messages, tool_schemas) -> the assistant's raw text (tool-call markers included, final
    <|im_end|> excluded). Each turn with calls appends {"role": "assistant", "content",
    "tool_calls"} (OpenAI form, native ids), then per call, in order, {"role": "tool",
    "tool_call_id", "name", "content"}; a turn without calls is appended as {"role": "assistant",
    "content"} and ends the loop. on_event(kind, text) reports "tool_call", "tool_result", "error"
    and "step_limit". Returns a new list; `messages` itself is not modified."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1 (model calls per user turn), "
                         f"got {max_steps}")
    emit = on_event or (lambda kind, text: None)
    messages = [dict(m) for m in messages]
    schemas = registry.schemas()
    for _ in range(max_steps):
        text = complete(list(messages), schemas)
        turn = parse_assistant(text, registry, first_index=count_tool_calls(messages))
        for note in turn.errors:
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
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                             "content": content})
    emit("step_limit", f"stopped after {max_steps} model calls (max_steps) without an answer free "
                       f"of tool calls")
    return messages


# --------------------------------------------------------------------------------------------------
# 5. Demo tools: offline, deterministic
# --------------------------------------------------------------------------------------------------

# The flat-form get_weather schema that chat_data.py and the tests also use. It marks nothing
# required; a call without `city` is still refused, by get_weather's signature (execute binds the
# arguments before calling).
GET_WEATHER_SCHEMA = {
    "name": "get_weather",
    "description": "Retrieve current weather for a given city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
# Made-up weather (there is no network): the rule below maps every city name to one fixed
# report. These conditions and ranges are ours, chosen to read plausibly.
WEATHER_CONDITIONS = ("Sunny", "Partly cloudy", "Cloudy", "Rainy", "Windy")
MIN_TEMPERATURE_C, MAX_TEMPERATURE_C = -5, 35
# longer than any real city name in common use; keeps error messages and prompts short
MAX_CITY_CHARS = 64
CITY_PUNCTUATION = set(" -'’.,()")  # St. John's, Saint-Étienne, Washington, D.C.


def city_key(city: str) -> str:
    """The normalised name the weather is derived from: NFC, whitespace runs collapsed to one space,
    casefolded ("  new   YORK " and "New York" get the same weather)."""
    return " ".join(unicodedata.normalize("NFC", city).split()).casefold()


def get_weather(city: str) -> dict:
    """Deterministic fake weather for any city name. The rule:
        d = sha256(city_key(city).encode('utf-8')).digest()
        weather = WEATHER_CONDITIONS[d[0] % 5]; temperature_c = -5 + d[1] % 41
    sha256, not hash(): Python salts str hashes per process (PYTHONHASHSEED), and the answer must
    be the same in every process. Raises ValueError for something that is not a city name (empty,
    too long, digits or symbols, no letter)."""
    if not isinstance(city, str):
        raise ValueError(f"city must be a string, got {json_type(city)}")
    shown = " ".join(unicodedata.normalize("NFC", city).split())
    if not shown:
        raise ValueError("city is empty; pass a city name such as \"Tokyo\"")
    if len(shown) > MAX_CITY_CHARS:
        raise ValueError(f"city is {len(shown)} characters long; a city name has at most "
                         f"{MAX_CITY_CHARS}")
    bad = sorted({ch for ch in shown
                  if ch not in CITY_PUNCTUATION and unicodedata.category(ch)[0] not in "LM"})
    if bad:
        raise ValueError(f"{shown!r} is not a city name (unexpected characters {''.join(bad)!r})")
    if not any(ch.isalpha() for ch in shown):
        raise ValueError(f"{shown!r} is not a city name (it has no letters)")
    d = hashlib.sha256(city_key(shown).encode("utf-8")).digest()
    span = MAX_TEMPERATURE_C - MIN_TEMPERATURE_C + 1
    return {"city": shown, "weather": WEATHER_CONDITIONS[d[0] % len(WEATHER_CONDITIONS)],
            "temperature_c": MIN_TEMPERATURE_C + d[1] % span}


CALCULATOR_SCHEMA = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression with numbers, + - * / // % ** and "
                   "parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]},
}
# Bounds (ours): they keep every step cheap and every result printable. 1e15 < 2**53, so every
# integer the calculator can produce converts to a float exactly; 200 characters is ample for a
# question's arithmetic.
MAX_EXPRESSION_CHARS = 200
# parentheses inside parentheses; the length bound alone already keeps the tree < 200 deep
MAX_NESTING = 16
MAX_MAGNITUDE = 10 ** 15  # for every number written and every intermediate result
# |b| in a ** b; with the magnitude check, a ** b is refused before it is computed
MAX_EXPONENT = 100
# float results are rounded to 12 significant digits: 0.1 + 0.2 -> 0.3, 6 / 3 -> 2
RESULT_DIGITS = 12


class CalculatorError(ValueError):
    """An expression the calculator refuses, with the reason in words."""


# ast.Pow goes through _power, with its checks
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: None}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_OPERATOR_TEXT = {ast.BitXor: "^ (use ** for powers)", ast.BitAnd: "&", ast.BitOr: "|",
                  ast.LShift: "<<", ast.RShift: ">>", ast.MatMult: "@", ast.Invert: "~",
                  ast.Not: "not"}
_KIND = {ast.Name: "name", ast.Attribute: "attribute access", ast.Call: "function call",
         ast.Subscript: "subscript", ast.Lambda: "lambda", ast.ListComp: "comprehension",
         ast.SetComp: "comprehension", ast.DictComp: "comprehension",
         ast.GeneratorExp: "comprehension", ast.Compare: "comparison", ast.BoolOp: "and/or",
         ast.IfExp: "conditional expression", ast.NamedExpr: "assignment",
         ast.Tuple: "tuple (a comma)", ast.List: "list", ast.Dict: "dict", ast.Set: "set",
         ast.JoinedStr: "f-string", ast.Starred: "starred expression", ast.Await: "await",
         ast.Yield: "yield", ast.YieldFrom: "yield"}
MAGNITUDES = "the calculator works with magnitudes up to 1e15"
ALLOWED = "only numbers, + - * / // % **, unary + and -, and parentheses are allowed"


def _check_tree(node: ast.AST, source: str) -> None:
    """Refuse anything that is not whitelisted arithmetic, before a single operation is evaluated.
    Recursive: the tree is at most ~MAX_EXPRESSION_CHARS deep (each level costs a character), far
    below Python's recursion limit."""
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):  # True, 'text', 1j, None, ...
            shown = _show(v) if isinstance(v, str) else repr(v)
            raise CalculatorError(f"{shown} is not a number; {ALLOWED}")
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
        text = _OPERATOR_TEXT.get(op, op.__name__)
        raise CalculatorError(f"operator {text} is not allowed; {ALLOWED}")
    segment = ast.get_source_segment(source, node) or ""
    kind = _KIND.get(type(node), type(node).__name__)
    raise CalculatorError(f"{kind} {segment[:40]!r} is not allowed; {ALLOWED}")


def _bounded(value: int | float, what: str) -> int | float:
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"{what} is too large: {MAGNITUDES}")
    return value


def _power(a: int | float, b: int | float) -> int | float:
    if abs(b) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {b} is too large: at most {MAX_EXPONENT} in size")
    if a == 0 and b < 0:
        raise CalculatorError("division by zero (0 raised to a negative power)")
    if a < 0 and b != int(b):
        raise CalculatorError(f"({a}) ** {b}: a negative number to a fractional power has no "
                              f"real value")
    # b·log10|a| is the result's order of magnitude: refuse 9 ** 99 before computing its 95 digits
    if a != 0 and b * math.log10(abs(a)) > math.log10(MAX_MAGNITUDE) + 1e-9:
        raise CalculatorError(f"{a} ** {b} is too large: {MAGNITUDES}")
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
    """The result as the calculator reports it: ints exact; floats rounded to RESULT_DIGITS
    significant digits, and written as ints when whole (6 / 3 -> 2)."""
    if isinstance(x, float):
        x = float(f"{x:.{RESULT_DIGITS}g}")
        if x.is_integer():
            return int(x)
    return x


def calculator(expression: str) -> dict:
    """Evaluate arithmetic safely: parse with ast, refuse every node outside the whitelist, then
    compute with Python's own operators (so // floors and % takes the divisor's sign, as in Python),
    checking the bounds at every step. Returns {"expression", "result"}. Raises CalculatorError (a
    ValueError) with the reason."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a string, got {json_type(expression)}")
    text = expression.strip()
    if not text:
        raise CalculatorError("expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression is {len(text)} characters long; "
                              f"at most {MAX_EXPRESSION_CHARS}")
    # parsing only builds a tree; nothing is compiled or run
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise CalculatorError(f"not a valid arithmetic expression ({err.msg}): "
                              f"{text[:60]!r}") from None
    except (ValueError, RecursionError, MemoryError) as err:  # null bytes; pathological nesting
        raise CalculatorError(f"not a valid arithmetic expression ({type(err).__name__})") from None
    _check_tree(tree.body, text)
    depth = _paren_depth(text)  # only numbers, operators and parentheses are left to count
    if depth > MAX_NESTING:
        raise CalculatorError(f"expression nests parentheses {depth} deep; at most {MAX_NESTING}")
    return {"expression": text, "result": tidy_number(_evaluate(tree.body))}


def default_registry() -> ToolRegistry:
    """The built-in demo tools, get_weather then calculator (both offline and deterministic)."""
    registry = ToolRegistry()
    registry.register(get_weather, GET_WEATHER_SCHEMA)
    registry.register(calculator, CALCULATOR_SCHEMA)
    return registry


# --------------------------------------------------------------------------------------------------
# 6. Argument validation: JSON Schema by the `jsonschema` library, in words the model can act on
# --------------------------------------------------------------------------------------------------

# JSON Schema 2020-12 Validation §6.1.1
JSON_TYPES = ("null", "boolean", "object", "array", "number", "string", "integer")
_A_TYPE = {"null": "null", "boolean": "true or false", "object": "an object (a dict)",
           "array": "a list", "number": "a number", "string": "a string", "integer": "an integer"}


def json_type(value: Any) -> str:
    """The JSON type of a parsed value: null, boolean, integer, number, string, array or object."""
    if value is None:
        return "null"
    # before int: in Python bool is a subclass of int, in JSON it is not a number
    if isinstance(value, bool):
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


def _is_json_number(checker: Any, value: Any) -> bool:
    # json.loads accepts NaN and Infinity, which are not JSON numbers (RFC 8259 §6)
    return json_type(value) in ("integer", "number") and math.isfinite(value)


@functools.lru_cache(maxsize=None)
def _validator_class(cls: type) -> type:
    """The schema's validator class (its $schema; 2020-12 by default), with NaN and Infinity refused
    as numbers. "integer" stays jsonschema's: an int, or a float with no fractional part."""
    return jsonschema.validators.extend(
        cls, type_checker=cls.TYPE_CHECKER.redefine("number", _is_json_number))


def _schema_class(schema: Mapping[str, Any]) -> type:
    return _validator_class(validator_for(schema, default=jsonschema.Draft202012Validator))


def _path(where: str, parts: Sequence[str | int]) -> str:
    """`where` then the JSON path in the form the messages use: city, options.unit, cities[2]."""
    for p in parts:
        where = f"{where}[{p}]" if isinstance(p, int) else (f"{where}.{p}" if where else str(p))
    return where


# What a failed keyword says, given (label, the keyword's value in the schema, the value at fault)
_BOUNDS = {
    "minimum": lambda s, v: f"must be at least {s}, got {_show(v)}",
    "maximum": lambda s, v: f"must be at most {s}, got {_show(v)}",
    "exclusiveMinimum": lambda s, v: f"must be more than {s}, got {_show(v)}",
    "exclusiveMaximum": lambda s, v: f"must be less than {s}, got {_show(v)}",
    "minLength": lambda s, v: f"must have at least {s} characters, got {_show(v)}",
    "maxLength": lambda s, v: f"must have at most {s} characters, got {len(v)}",
    "pattern": lambda s, v: f"must match the pattern {s!r}, got {_show(v)}",
    "minItems": lambda s, v: f"must have at least {s} items, got {len(v)}",
    "maxItems": lambda s, v: f"must have at most {s} items, got {len(v)}",
    "enum": lambda s, v: f"expected one of {_show(s, 120)}, got {_describe(v)}",
    "const": lambda s, v: f"expected {_show(s)}, got {_describe(v)}",
}


def _messages(err: jsonschema.ValidationError, where: str) -> list[str]:
    """One jsonschema error -> messages that name the argument at fault (several for `required` and
    `additionalProperties`, which jsonschema reports once per object)."""
    at = _path(where, list(err.absolute_path))
    label = at or "arguments"
    value, expected = err.instance, err.validator_value
    if err.validator == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        return [f"{label}: expected {' or '.join(types)}, got {_describe(value)}"]
    if err.validator in _BOUNDS:
        return [f"{label}: {_BOUNDS[err.validator](expected, value)}"]
    noun = "argument" if not at else "property"
    inside = f" in {at}" if at else ""
    if err.validator == "required":
        return [f"missing required {noun} {key!r}{inside}" for key in expected if key not in value]
    if err.validator == "additionalProperties" and expected is False:
        props = err.schema.get("properties", {})
        patterns = err.schema.get("patternProperties", {})
        allowed = ", ".join(props) or "none"
        return [f"unexpected {noun} {key!r}{inside} (allowed: {allowed})" for key in value
                if key not in props and not any(re.search(p, key) for p in patterns)]
    return [f"{label}: {err.message}"]


def validate(value: Any, schema: Mapping[str, Any], where: str = "") -> list[str]:
    """Check a JSON value against a JSON Schema; every problem as a readable message ([] if valid).

    `where` prefixes the path shown in messages: "" for the arguments object itself, then `city`,
    `options.unit`, `cities[2]`. Missing required arguments come first; once a value's type is
    wrong its other keywords are not reported (they would only repeat the problem)."""
    errors = sorted(_schema_class(schema)(schema).iter_errors(value),
                    key=lambda e: e.validator != "required")
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    messages: list[str] = []
    for err in errors:
        if err.validator == "type" or tuple(err.absolute_path) not in mistyped:
            messages += [m for m in _messages(err, where) if m not in messages]
    return messages


def _schema_error(err: jsonschema.SchemaError, where: str) -> str:
    """A metaschema violation -> what is wrong in the declaration, at which key."""
    at = _path(where, list(err.absolute_path))
    if err.absolute_path and err.absolute_path[-1] == "type":
        return (f"{at} is {err.instance!r}; expected one of {', '.join(JSON_TYPES)} "
                f"or a list of them")
    if err.validator == "type" and isinstance(err.validator_value, str):
        return f"{at} must be {_A_TYPE[err.validator_value]}, got {err.instance!r}"
    if err.validator == "format" and err.validator_value == "regex":
        try:
            re.compile(err.instance)
            reason = "Python's re refuses it"
        except (re.error, TypeError) as problem:
            reason = str(problem)
        return f"{at} {err.instance!r} is not a valid regular expression ({reason})"
    return f"{at}: {err.message}"


def check_schema(schema: Any, where: str = "parameters") -> None:
    """Raise ValueError unless `schema` is a valid JSON Schema (jsonschema's check_schema against
    its metaschema, `pattern`s compiled) that some value could satisfy: an empty `enum`, or a
    `required` property absent from `properties` when additionalProperties is false, is refused
    as a declaration mistake (JSON Schema allows both)."""
    if not isinstance(schema, Mapping):
        raise ValueError(f"{where} must be a JSON Schema object (a dict), "
                         f"got {type(schema).__name__}")
    try:
        validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ValueError(_schema_error(err, where)) from None
    _check_satisfiable(schema, where)


def _check_satisfiable(schema: Any, where: str) -> None:
    """The two declaration mistakes that leave no valid value, through properties, items and
    additionalProperties (the keywords tool schemas nest with)."""
    if not isinstance(schema, Mapping):
        return
    if "enum" in schema and not schema["enum"]:
        raise ValueError(f"{where}.enum must be a non-empty list, got {schema['enum']!r}")
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in props]
    if missing and schema.get("additionalProperties", True) is False:
        raise ValueError(f"{where}: required {missing} are not in properties and "
                         f"additionalProperties is false, so no value could ever be valid")
    for key, sub in props.items():
        _check_satisfiable(sub, f"{where}.properties.{key}")
    for key in ("items", "additionalProperties"):
        _check_satisfiable(schema.get(key), f"{where}.{key}")
