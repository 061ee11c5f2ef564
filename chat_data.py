"""Synthetic conversations for the demo model's supervised stage, and the held-out tool-use evaluation.

The shipped demo model (demo/) is pretrained on the Python standard library's source (train.py, default corpus) and
then fine-tuned on conversations generated here, in Kimi K2's chat format (tokenizer.encode_chat):
* ordinary chat: greetings, who-are-you, a few fixed facts, and weather questions asked WITHOUT tools (answered
  with "I can't check" — the seed document's simple-chat example sends exactly that);
* tool use: the user asks for the weather in a city or for a calculation, the assistant emits a K2 tool call
  (`functions.get_weather:0` with {"city": ...} / `functions.calculator:0` with {"expression": ...}), the tool
  result comes back (computed by the real tools in tools.py), and the assistant answers using it.
Cities and expressions are split into a training part and a HELD-OUT part that never appears in training;
`python chat_data.py eval --ckpt demo` runs the held-out prompts through the agent loop and reports how often the
model calls the right tool with schema-valid arguments and how often its answer contains the tool's result.

Everything is deterministic given the seed: `conversations(n, seed)` always returns the same list.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import zlib
from typing import Iterator

import tools as T

# --- cities: a fixed list, split by a stable hash so train and held-out never overlap --------------------------------
CITIES = """Tokyo Beijing Shanghai Paris London Berlin Madrid Rome Lisbon Dublin Oslo Stockholm Helsinki Copenhagen
Amsterdam Brussels Vienna Prague Warsaw Budapest Athens Istanbul Cairo Nairobi Lagos Accra Dakar Casablanca Tunis
Johannesburg Cape_Town Moscow Kyiv Minsk Riga Vilnius Tallinn Reykjavik Toronto Montreal Vancouver Chicago Boston
Seattle Denver Houston Dallas Miami Atlanta Phoenix Detroit Mexico_City Havana Lima Bogota Quito Santiago Caracas
Buenos_Aires Montevideo Sao_Paulo Rio_de_Janeiro Brasilia Sydney Melbourne Brisbane Perth Auckland Wellington
Singapore Jakarta Manila Bangkok Hanoi Seoul Busan Osaka Kyoto Sapporo Taipei Hong_Kong Shenzhen Chengdu Wuhan
Xian Hangzhou Nanjing Delhi Mumbai Chennai Kolkata Bangalore Karachi Lahore Dhaka Kathmandu Colombo Tehran Baghdad
Riyadh Dubai Doha Amman Beirut Jerusalem Ankara Tbilisi Yerevan Baku Tashkent Almaty Ulaanbaatar Vladivostok
Anchorage Honolulu Edinburgh Glasgow Manchester Liverpool Bristol Lyon Marseille Nice Munich Hamburg Frankfurt
Cologne Zurich Geneva Milan Naples Venice Florence Barcelona Valencia Seville Porto Krakow Gdansk Bergen Gothenburg
Marrakesh Addis_Ababa Kampala Kigali Lusaka Harare Luanda Kinshasa Abuja Khartoum Tripoli Algiers Nouakchott
Bamako Niamey Ottawa Calgary Winnipeg Halifax Quebec Portland Austin Nashville Memphis Orlando Tampa Pittsburgh
Cleveland Minneapolis Kansas_City Salt_Lake_City Las_Vegas San_Diego San_Francisco Los_Angeles Sacramento
Guadalajara Monterrey Panama_City San_Jose Managua Tegucigalpa Kingston Santo_Domingo San_Juan La_Paz Asuncion
Cusco Medellin Cali Recife Salvador Fortaleza Manaus Hobart Adelaide Darwin Canberra Christchurch Suva Apia""".split()
CITIES = [c.replace("_", " ") for c in CITIES]


SEED_CITIES = ("Tokyo", "Beijing")  # the seed document's and SPEC's examples are always in the training part


def _held_out(key: str, fraction: int = 4) -> bool:
    """Stable split (crc32, not Python's salted hash): about 1 in `fraction` keys is held out."""
    return key not in SEED_CITIES and zlib.crc32(key.encode()) % fraction == 0


TRAIN_CITIES = [c for c in CITIES if not _held_out(c)]
HELD_OUT_CITIES = [c for c in CITIES if _held_out(c)]
SYLLABLES = "ka ri to ma vel lo sen dra mi no bar ta fen ul qui ros an tev il mor ga pe lin su dor e ha zu".split()


def invented_city(rng: random.Random) -> str:
    """A made-up place name ("Velmora", "Sendrati"): half of the weather lessons use one, so the model has to COPY
    the city from the question into the call instead of recalling one of the training cities."""
    name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
    clash = any(name.startswith(c) or c.startswith(name) for c in CITIES)  # never a real city, nor a prefix of one
    return invented_city(rng) if clash else name

# --- phrasings --------------------------------------------------------------------------------------------------------
WEATHER_ASKS = ["What's the weather like in {city}?", "What's the current weather in {city}?",
                "How is the weather in {city} today?", "Tell me the weather in {city}.", "Weather in {city}?",
                "Is it sunny in {city} right now?", "Can you check the weather for {city}?",
                "I'm going to {city}. What's the weather there?", "How warm is it in {city}?",
                "Check weather in {city}", "What is the temperature in {city}?"]
CALC_ASKS = ["What is {expr}?", "Calculate {expr}.", "Compute {expr}", "How much is {expr}?", "{expr} = ?",
             "Please work out {expr}.", "Can you calculate {expr} for me?", "What does {expr} equal?"]
SYSTEM_PROMPTS = [None, "You are Kimi, an AI assistant created by Moonshot AI.",
                  "You are Kimi, an AI assistant by Moonshot AI.", "You are Kimi, a helpful AI assistant.",
                  "You are a helpful assistant."]
SMALL_TALK = [
    (["Hello!", "Hi", "Hello! Who are you?", "Hey there", "Good morning!"],
     ["Hello! I am Kimi, an AI assistant created by Moonshot AI. How can I help you today?",
      "Hi! I'm Kimi, an assistant made by Moonshot AI. What can I do for you?"]),
    (["Introduce yourself briefly.", "Who are you?", "What is your name?", "Tell me about yourself."],
     ["I am Kimi, an AI assistant created by Moonshot AI. I can chat, answer questions and use tools such as a "
      "weather lookup and a calculator.", "I'm Kimi, a large language model assistant from Moonshot AI. I can "
      "answer questions and call tools when they help."]),
    (["What can you do?", "How can you help me?"],
     ["I can answer questions, check the weather in a city and do arithmetic when those tools are available."]),
    (["Thank you!", "Thanks a lot.", "Great, thanks!"],
     ["You're welcome! Let me know if you need anything else.", "Glad I could help!"]),
    (["Goodbye!", "Bye", "See you later."], ["Goodbye! Have a nice day.", "Bye! Talk to you soon."]),
    (["What is the capital of France?"], ["The capital of France is Paris."]),
    (["What is the capital of Japan?"], ["The capital of Japan is Tokyo."]),
    (["What language is this code written in: def f(x): return x"], ["That is Python."]),
    (["Write a Python function that adds two numbers."],
     ["Here it is:\n\ndef add(a, b):\n    return a + b"]),
]
NO_TOOL_WEATHER = ["I can't check live weather without a weather tool. Please look at a weather service for {city}.",
                   "I don't have access to current weather data for {city} right now."]

WEATHER_TOOL_OPENAI = T.default_registry().schemas()  # both built-in tools, OpenAI form
SEED_WEATHER_TOOL = {"name": "get_weather", "description": "Retrieve current weather for a given city.",  # seed form
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def random_expression(rng: random.Random) -> str:
    """Small integer arithmetic: `a op b` or `a op b op c`, with + - * and exact division."""
    ops = ["+", "-", "*"]
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    if rng.random() < 0.15:  # exact division
        return f"{a * b} / {b}"
    expr = f"{a} {rng.choice(ops)} {b}"
    if rng.random() < 0.3:
        expr = f"{expr} {rng.choice(ops)} {rng.randint(1, 20)}"
    return expr


def expressions(held_out: bool, rng: random.Random) -> Iterator[str]:
    while True:
        e = random_expression(rng)
        if _held_out(e) == held_out:
            yield e


def _tool_schemas(rng: random.Random) -> list[dict]:
    choice = rng.random()
    if choice < 0.25:
        return [SEED_WEATHER_TOOL]  # the seed document's flat form
    if choice < 0.4:
        return list(reversed(WEATHER_TOOL_OPENAI))
    return list(WEATHER_TOOL_OPENAI)


def _system(rng: random.Random) -> list[dict]:
    s = rng.choice(SYSTEM_PROMPTS)
    return [] if s is None else [{"role": "system", "content": s}]


def tool_round(name: str, arguments: dict, registry: "T.ToolRegistry") -> tuple[dict, dict, str]:
    """The assistant tool-call message, the tool message with the REAL tool's result, and that result."""
    call = T.ToolCall(id=f"functions.{name}:0", name=name, raw_arguments=json.dumps(arguments, ensure_ascii=False),
                      arguments=arguments)
    result = T.execute(registry, call)
    return ({"role": "assistant", "content": "", "tool_calls": [call.to_openai()]},
            {"role": "tool", "tool_call_id": call.id, "name": name, "content": result}, result)


def answer_from_result(name: str, arguments: dict, result: str) -> str:
    """The final answer, written from the tool's JSON result (so it always contains the result's values)."""
    r = json.loads(result)
    if name == "get_weather":
        return f"The weather in {r['city']} is {r['weather']}, {r['temperature_c']}°C."
    return f"The answer is {r['result']}."


def weather_prompt(city: str, rng: random.Random) -> str:
    return rng.choice(WEATHER_ASKS).format(city=city)


def calc_prompt(expr: str, rng: random.Random) -> str:
    return rng.choice(CALC_ASKS).format(expr=expr)


def conversations(n: int, seed: int = 0) -> list[tuple[list[dict], list[dict] | None]]:
    """n training conversations as (messages, tools-or-None); only TRAIN cities and expressions appear."""
    rng = random.Random(seed)
    registry = T.default_registry()
    exprs = expressions(held_out=False, rng=random.Random(seed + 1))
    out = []
    for _ in range(n):
        kind = rng.random()
        msgs = _system(rng)
        if kind < 0.4:  # weather, with tools; half the time in an invented city
            city = rng.choice(TRAIN_CITIES) if rng.random() < 0.5 else invented_city(rng)
            msgs.append({"role": "user", "content": weather_prompt(city, rng)})
            call, tool_msg, result = tool_round("get_weather", {"city": city}, registry)
            msgs += [call, tool_msg, {"role": "assistant",
                                      "content": answer_from_result("get_weather", {"city": city}, result)}]
            out.append((msgs, _tool_schemas(rng)))
        elif kind < 0.75:  # arithmetic, with tools
            expr = next(exprs)
            msgs.append({"role": "user", "content": calc_prompt(expr, rng)})
            call, tool_msg, result = tool_round("calculator", {"expression": expr}, registry)
            msgs += [call, tool_msg, {"role": "assistant",
                                      "content": answer_from_result("calculator", {"expression": expr}, result)}]
            out.append((msgs, list(WEATHER_TOOL_OPENAI)))
        elif kind < 0.85:  # weather asked without tools: no call possible
            city = rng.choice(TRAIN_CITIES)
            msgs += [{"role": "user", "content": weather_prompt(city, rng)},
                     {"role": "assistant", "content": rng.choice(NO_TOOL_WEATHER).format(city=city)}]
            out.append((msgs, None))
        else:  # small talk, with or without tools declared (tools must not be called for it)
            asks, answers = rng.choice(SMALL_TALK)
            msgs += [{"role": "user", "content": rng.choice(asks)}, {"role": "assistant", "content": rng.choice(answers)}]
            out.append((msgs, _tool_schemas(rng) if rng.random() < 0.5 else None))
    return out


def held_out_prompts(n: int = 200, seed: int = 1234) -> list[tuple[str, str, dict]]:
    """n evaluation prompts (half weather, half arithmetic) over HELD-OUT cities and expressions:
    (user text, expected tool name, expected arguments)."""
    rng = random.Random(seed)
    exprs = expressions(held_out=True, rng=random.Random(seed + 1))
    out = []
    for i in range(n):
        if i % 2 == 0:
            city = HELD_OUT_CITIES[(i // 2) % len(HELD_OUT_CITIES)]
            out.append((weather_prompt(city, rng), "get_weather", {"city": city}))
        else:
            expr = next(exprs)
            out.append((calc_prompt(expr, rng), "calculator", {"expression": expr}))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on held-out prompts


def evaluate(model, tok, n: int = 200, temperature: float = 0.0, max_new_tokens: int = 64,
             log=print) -> dict:
    """Run n held-out prompts through tools.run_agent with the model; count
    tool_ok: the first reply calls the expected tool once, with JSON arguments valid under its schema;
    args_exact: ... and the arguments equal the expected ones (the city / expression of the prompt);
    answer_ok: the final answer contains the tool's result (weather and temperature, or the number)."""
    from generate import SamplingParams, TextStream

    registry = T.default_registry()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=0)
    counts = dict(n=0, tool_ok=0, args_exact=0, answer_ok=0)
    for i, (prompt, name, expected) in enumerate(held_out_prompts(n)):
        def complete(msgs, schemas):
            ids, _ = tok.encode_chat(msgs, schemas, add_generation_prompt=True)
            stream = TextStream(model, tok, ids, params)
            for _ in stream:
                pass
            return stream.text

        messages = T.run_agent(complete, [{"role": "user", "content": prompt}], registry, max_steps=2)
        first = messages[1]
        calls = first.get("tool_calls") or []
        tool_ok = args_exact = answer_ok = False
        if len(calls) == 1 and calls[0]["function"]["name"] == name:
            try:
                args = json.loads(calls[0]["function"]["arguments"])
            except json.JSONDecodeError:
                args = None
            schema = registry.get(name).parameters
            tool_ok = isinstance(args, dict) and not T.validate(args, schema) and messages[2]["role"] == "tool" \
                and '"error"' not in messages[2]["content"]
            args_exact = tool_ok and args == expected
            if tool_ok and len(messages) > 3 and messages[-1]["role"] == "assistant":
                result = json.loads(messages[2]["content"])
                wanted = [str(result["weather"]), str(result["temperature_c"])] if name == "get_weather" \
                    else [str(result["result"])]
                answer_ok = all(w in messages[-1]["content"] for w in wanted)
        counts["n"] += 1
        counts["tool_ok"] += tool_ok
        counts["args_exact"] += args_exact
        counts["answer_ok"] += answer_ok
        if log and (i + 1) % 50 == 0:
            log(f"  {i + 1}/{n}: tool {counts['tool_ok']}, exact args {counts['args_exact']}, "
                f"answer {counts['answer_ok']}")
    return counts


def _at_least(low: int | float, kind: type = int):
    """An argparse type: a number >= low, else argparse's own usage error (not a traceback, or 0/0 later)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value < float("inf"):  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text} must be a finite number >= {low}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Show synthetic conversations, or evaluate a checkpoint's tool use on "
                                            "held-out prompts.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="print a few training conversations exactly as train.py --sft renders them "
                                    "(the trailing assistant header is context only, never trained on)")
    s.add_argument("-n", type=_at_least(1), default=3, help="how many")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    e = sub.add_parser("eval", help="tool-call and answer accuracy on held-out cities and expressions")
    e.add_argument("--ckpt", default="demo", help="checkpoint directory (with tiktoken.model)")
    e.add_argument("-n", type=_at_least(1), default=200, help="number of held-out prompts")
    e.add_argument("--temperature", type=_at_least(0.0, float), default=0.0, help="sampling temperature (0 = greedy)")
    from generate import add_threads_argument
    add_threads_argument(e)
    a = p.parse_args(argv)
    if a.command == "show":
        from tokenizer import apply_chat_template
        for messages, tools in conversations(a.n, a.seed):
            # add_generation_prompt=True as in training: without it the template drops the last <|im_end|>
            print(apply_chat_template(messages, tools, add_generation_prompt=True), end="\n\n")
        return 0
    from generate import load, set_threads
    threads, why = set_threads(a.threads)
    print(f"{threads} CPU thread(s) ({why})", flush=True)
    try:
        model, tok = load(a.ckpt)
    except (ValueError, OSError) as err:  # no such folder, no tiktoken.model, damaged weights
        print(f"error: {err}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    c = evaluate(model, tok, a.n, a.temperature)
    print(f"held-out prompts: {c['n']} (over {len(HELD_OUT_CITIES)} held-out cities and expressions never seen in "
          f"training), {time.perf_counter() - t0:.0f} s")
    for key, what in (("tool_ok", "right tool, schema-valid JSON arguments"), ("args_exact", "... and exact arguments"),
                      ("answer_ok", "final answer contains the tool's result")):
        print(f"  {what:<42} {c[key]:>4}/{c['n']}  ({100 * c[key] / c['n']:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
