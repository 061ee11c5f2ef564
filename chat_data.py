"""Synthetic conversations that teach the demo model to COPY, and the held-out evaluation of its
tool use.

The shipped demo model (demo/) is pretrained on the Python standard library's source and then
fine-tuned on the conversations generated here, in Kimi K2's chat format (tokenizer.encode_chat). A
5 M-parameter model cannot learn the world's city names or arithmetic; what it can learn is to copy
a span of the prompt into the call's JSON and to read values back out of a tool result (induction
heads). So the data is built to make memorising useless:
* places are arbitrary strings: real cities, made-up pronounceable names, multi-word, lower-case,
  accented Latin, Cyrillic, Greek, CJK and Arabic names (the 4,096-rank tokenizer spells the last
  four in byte tokens);
* expressions are random (operators, spacing, parentheses, decimals) and copied exactly;
* user requests are built from templates x slots (prefix, request, suffix);
* tools are declared in the flat and OpenAI forms, sometimes with unrelated tools beside them,
  sometimes with the argument called `location` instead of `city` (the model must read the schema);
* weather conditions in training results are arbitrary strings (1-4 words from weather words,
  unrelated words and made-up ones, in any case, sometimes with punctuation; thousands of them),
  temperatures negative or with decimals, so the answer is right only by copying;
* tool results are composed at random (key names from pools in several languages or made up, in
  snake/camel/Pascal/kebab/upper case; nesting 0-3 deep, lists, {amount, unit} objects, distractor
  fields with numbers and strings, shuffled order, plain text; the basic example's
  {"weather": "Sunny, 25°C"}, the real tools' output), and the final answer restates the result's
  values verbatim;
* no call where none is needed (greetings, identity, chit-chat, weather asked without a weather
  tool);
* follow-up turns that depend on the previous one ("And in Paris?", "What about 3*7?", also
  the other tool's) in about half of the tool conversations.

Held out, and checked disjoint by `split_overlaps()` (tests/test_chat_data.py): place names (a crc32
split of every generated name, plus a fixed part of the real cities), expressions (crc32), request
templates, follow-up templates, small-talk prompts, weather conditions, and result shapes (held-out
key names, wrappers and plain-text templates; every generated training string is checked against
them, so they stay unseen by construction). `python chat_data.py eval --ckpt demo` runs held-out
prompts through generate + tools.run_agent (greedy) and reports each figure: right tool with
schema-valid arguments (no call for small talk), exact arguments by kind of name, faithful answers
for unseen result formats, exact calculator results, and follow-up turns.

Everything is deterministic given the seed: `conversations(n, seed)` always returns the same list.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import zlib
from typing import Any

import tools as T


def _held_out(key: str, fraction: int = 4) -> bool:
    """Stable split (crc32, not Python's salted hash): about 1 in `fraction` keys is held out."""
    return zlib.crc32(key.encode()) % fraction == 0


def _split(items: list[str], keep: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(training part, held-out part) of a fixed list; `keep` stays in training."""
    held = [x for x in items if x not in keep and _held_out(x)]
    return [x for x in items if x not in held], held


# --- places ---------------------------------------------------------------------------------------
CITIES = """Tokyo Beijing Shanghai Paris London Berlin Madrid Rome Lisbon Dublin Oslo Stockholm
Helsinki Copenhagen Amsterdam Brussels Vienna Prague Warsaw Budapest Athens Istanbul Cairo Nairobi
Lagos Accra Dakar Casablanca Tunis Johannesburg Cape_Town Moscow Kyiv Minsk Riga Vilnius Tallinn
Reykjavik Toronto Montreal Vancouver Chicago Boston Seattle Denver Houston Dallas Miami Atlanta
Phoenix Detroit Mexico_City Havana Lima Bogota Quito Santiago Caracas Buenos_Aires Montevideo
Sao_Paulo Rio_de_Janeiro Brasilia Sydney Melbourne Brisbane Perth Auckland Wellington Singapore
Jakarta Manila Bangkok Hanoi Seoul Busan Osaka Kyoto Sapporo Taipei Hong_Kong Shenzhen Chengdu Wuhan
Xian Hangzhou Nanjing Delhi Mumbai Chennai Kolkata Bangalore Karachi Lahore Dhaka Kathmandu Colombo
Tehran Baghdad Riyadh Dubai Doha Amman Beirut Jerusalem Ankara Tbilisi Yerevan Baku Tashkent Almaty
Ulaanbaatar Vladivostok Anchorage Honolulu Edinburgh Glasgow Manchester Liverpool Bristol Lyon
Marseille Nice Munich Hamburg Frankfurt Cologne Zurich Geneva Milan Naples Venice Florence Barcelona
Valencia Seville Porto Krakow Gdansk Bergen Gothenburg Marrakesh Addis_Ababa Kampala Kigali Lusaka
Harare Luanda Kinshasa Abuja Khartoum Tripoli Algiers Nouakchott Bamako Niamey Ottawa Calgary
Winnipeg Halifax Quebec Portland Austin Nashville Memphis Orlando Tampa Pittsburgh Cleveland
Minneapolis Kansas_City Salt_Lake_City Las_Vegas San_Diego San_Francisco Los_Angeles Sacramento
Guadalajara Monterrey Panama_City San_Jose Managua Tegucigalpa Kingston Santo_Domingo San_Juan
La_Paz Asuncion Cusco Medellin Cali Recife Salvador Fortaleza Manaus Hobart Adelaide Darwin Canberra
Christchurch Suva Apia Ouagadougou Valparaiso Tromso Kaunas Ushuaia Windhoek""".split()
CITIES = [c.replace("_", " ") for c in CITIES]
# the basic get_weather example's and its follow-up's: trained on
EXAMPLE_CITIES = ("Tokyo", "Beijing", "Paris")
# cities a user tried that the first demo model could not copy: always held out, so the eval
# measures them
USER_REPORTED_CITIES = ("Reykjavik", "Ouagadougou", "Valparaiso", "Tromso", "Hobart", "Kaunas",
                        "Ushuaia", "Windhoek")


def city_held_out(name: str) -> bool:
    """Whether a place name (real or generated) belongs to the held-out split."""
    if name in EXAMPLE_CITIES:
        return False
    return name in USER_REPORTED_CITIES or _held_out(name)


TRAIN_CITIES = [c for c in CITIES if not city_held_out(c)]
HELD_OUT_CITIES = [c for c in CITIES if city_held_out(c)]
_REAL_LOWER = [c.lower() for c in CITIES]

SYLLABLES = ("ka ri to ma vel lo sen dra mi no bar ta fen ul qui ros an tev il mor ga pe lin su "
             "dor e ha zu ko bo ne wa ji tsu gu ran ot es").split()
NAME_PREFIXES = ["San", "Saint", "New", "Port", "Lake", "El", "Los", "Fort", "Bad", "Mount", "Novo",
                 "Puerto"]
ACCENTED = {"a": "áàâãäå", "e": "éèêë", "i": "íìîï", "o": "óòôõöø",
            "u": "úùûü", "n": "ñ", "s": "šș", "z": "žź"}
SCRIPTS = {  # (consonants, vowels) for syllables, or a character pool for CJK
    "cyrillic": ("бвгдзклмнпрстфхчшж", "аеиоуыяю"),
    "greek": ("βγδζθκλμνξπρστφχ", "αεηιουω"),
    "arabic": ("بتثجحخدذرزسشصضطظعغفقكلمنهي", "اوي"),
}
CJK = ("東京西南北山川海港島城州安平陽河湖津都福岡広大新上天長春江台"
       "崎松田原宮名古屋浜沢野金銀石水林森花月光明華清")
PLACE_KINDS = ("real", "invented", "multi-word", "lower-case", "accented", "cyrillic", "greek",
               "cjk", "arabic")


def _word(rng: random.Random, lo: int = 2, hi: int = 4) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(lo, hi))).capitalize()


def _make_place(kind: str, rng: random.Random) -> str:
    """A generated place name of the given kind (not yet checked against the split)."""
    if kind == "invented":
        return _word(rng)
    if kind == "multi-word":
        form = rng.randrange(4)
        if form == 0:
            return f"{rng.choice(NAME_PREFIXES)} {_word(rng)}"
        if form == 1:
            return f"{_word(rng)} {_word(rng, 1, 3)}"
        if form == 2:
            return f"{_word(rng)}-{_word(rng, 1, 2)}"
        return f"{_word(rng)} de {_word(rng, 1, 3)}"
    if kind == "lower-case":
        return (_word(rng) if rng.random() < 0.6 else f"{_word(rng)} {_word(rng, 1, 2)}").lower()
    if kind == "accented":
        letters = list(_word(rng, 2, 4))
        spots = [i for i, ch in enumerate(letters) if ch.lower() in ACCENTED]
        for i in rng.sample(spots, min(len(spots), rng.randint(1, 2))):
            accented = rng.choice(ACCENTED[letters[i].lower()])
            letters[i] = accented.upper() if letters[i].isupper() else accented
        return "".join(letters)
    if kind == "cjk":
        return "".join(rng.choice(CJK) for _ in range(rng.randint(2, 3)))
    consonants, vowels = SCRIPTS[kind]
    name = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))
    if kind == "arabic":
        return ("ال" if rng.random() < 0.4 else "") + name
    return name.capitalize()


def place(kind: str, rng: random.Random, held_out: bool = False) -> str:
    """A place name of `kind` from the training or the held-out split. Generated names never contain
    a real city's name (so a held-out city cannot leak into training inside an invented one)."""
    cities = HELD_OUT_CITIES if held_out else TRAIN_CITIES
    if kind == "real":
        return rng.choice(cities)
    if kind == "lower-case" and rng.random() < 0.4:
        return rng.choice(cities).lower()
    while True:
        name = _make_place(kind, rng)
        low = name.lower()
        if city_held_out(low if kind == "lower-case" else name) == held_out \
                and not any(c in low for c in _REAL_LOWER):
            return name


# --- arithmetic -----------------------------------------------------------------------------------
def random_expression(rng: random.Random) -> str:
    """Random arithmetic the calculator accepts: 2-4 numbers (integers, sometimes decimals), + - * /
    and sometimes // % **, maybe parentheses, spaced around the operators or not."""
    while True:
        n = rng.choice((2, 2, 2, 3, 3, 4))
        nums = []
        for _ in range(n):
            r = rng.random()
            if r < 0.6:
                nums.append(str(rng.randint(0, 99)))
            elif r < 0.88:
                nums.append(str(rng.randint(100, 9999)))
            else:
                nums.append(f"{rng.randint(0, 99)}.{rng.randint(1, 9)}")
        ops = [rng.choice("+ - * / + - * + * // % **".split()) for _ in range(n - 1)]
        for i, op in enumerate(ops):
            if op == "**":
                nums[i + 1] = str(rng.randint(0, 3))
        if rng.random() < 0.1:
            nums[0] = "-" + nums[0]
        if n >= 3 and rng.random() < 0.45:
            i = rng.randrange(n - 1)
            nums[i], nums[i + 1] = "(" + nums[i], nums[i + 1] + ")"
        spacing = rng.random()
        parts = [nums[0]]
        for op, num in zip(ops, nums[1:]):
            space = " " if spacing < 0.5 or (spacing < 0.65 and rng.random() < 0.5) else ""
            parts.append(f"{space}{op}{space}{num}")
        expr = "".join(parts)
        try:
            T.calculator(expr)
        except ValueError:  # division by zero, a power too large: draw again
            continue
        return expr


def expression(rng: random.Random, held_out: bool = False) -> str:
    while True:
        e = random_expression(rng)
        if _held_out(e) == held_out:
            return e


# --- what users say: templates x slots; a held-out template never appears in training -------------
WEATHER_ASKS, HELD_OUT_WEATHER_ASKS = _split([
    "What's the weather like in {city}?", "What's the current weather in {city}?",
    "How is the weather in {city} today?", "Tell me the weather in {city}.", "Weather in {city}?",
    "Is it sunny in {city} right now?", "Can you check the weather for {city}?",
    "I'm going to {city}. What's the weather there?", "How warm is it in {city}?",
    "Check weather in {city}", "What is the temperature in {city}?", "Is it raining in {city}?",
    "Do I need an umbrella in {city} today?", "What's it like outside in {city}?",
    "Give me the weather report for {city}.", "How cold is it in {city}?", "weather {city}",
    "{city} weather?", "Could you look up the weather in {city}?",
    "I'm flying to {city} tomorrow, how's the weather?",
    "What are the conditions in {city} right now?", "Should I wear a jacket in {city}?",
    "Current temperature in {city}, please.", "How's the weather over in {city}?",
    "Tell me about the weather in {city} today.", "Is it hot in {city}?",
    "Any idea what the weather is in {city}?", "What's the forecast for {city}?",
    "Look up the weather for {city} for me.", "My friend lives in {city}. Is it nice there today?",
    "Get the weather for {city}", "What's the temperature like in {city} at the moment?",
    "Weather report: {city}", "How's {city} looking weather-wise?",
    "Please check the current conditions in {city}.", "Is it snowing in {city}?",
    "I'd like to know the weather in {city}.", "What is the weather in {city}?"],
    # the basic get_weather example's question (README)
    keep=("What's the current weather in {city}?",))
CALC_ASKS, HELD_OUT_CALC_ASKS = _split([
    "What is {expr}?", "Calculate {expr}.", "Compute {expr}", "How much is {expr}?", "{expr} = ?",
    "Please work out {expr}.", "Can you calculate {expr} for me?", "What does {expr} equal?",
    "What's {expr}?", "Solve {expr}", "Evaluate {expr}.", "{expr}", "{expr}=?",
    "Quick math: {expr}", "I need the result of {expr}.", "Work out {expr}, please.",
    "Use the calculator for {expr}.", "What do you get for {expr}?", "Find {expr}.",
    "Help me compute {expr}.", "{expr} is what?", "Tell me what {expr} is.", "calc {expr}",
    "What is the value of {expr}?", "Could you compute {expr}?", "Result of {expr}?",
    "How much does {expr} come to?", "Do the math: {expr}"])
ASK_PREFIXES = ["", "", "", "", "Hi! ", "Hey, ", "Quick question: ", "Kimi, ", "Hello. ",
                "One more thing: ", "OK. "]
WEATHER_FOLLOW_UPS, HELD_OUT_WEATHER_FOLLOW_UPS = _split([
    "And in {city}?", "What about {city}?", "How about {city}?", "And {city}?",
    "Same question for {city}.", "Now {city}, please.", "And what about {city} then?",
    "Ok, and {city}?", "Also check {city}.", "What about in {city}?", "And the weather in {city}?",
    "Now do {city}.", "How about in {city}?", "And for {city}?", "Great. {city}?",
    "Can you do {city} too?"], keep=("And in {city}?",))
CALC_FOLLOW_UPS, HELD_OUT_CALC_FOLLOW_UPS = _split([
    "What about {expr}?", "And {expr}?", "Now {expr}.", "How about {expr}?", "And what is {expr}?",
    "Next: {expr}", "Same for {expr}.", "Then {expr}?", "Also {expr}, please.", "Ok, and {expr}?",
    "And now {expr}?", "One more: {expr}"],
    # the second is also a training weather follow-up's wording
    keep=("What about {expr}?", "And {expr}?"))

# more follow-up wordings, training only (a follow-up of either tool may follow either tool's turn)
TRAIN_WEATHER_FOLLOW_UPS = [
    "and {city}?", "what about {city}", "And in {city} then?", "{city} too?", "Also {city}?",
    "OK now {city}.", "And for {city}, please?", "What's it like in {city}?", "Try {city}.",
    "And {city} please", "Same thing for {city}?", "Then {city}?", "Next one: {city}",
    "and in {city}", "Ok and {city}", "What about the weather in {city}?",
    "And the weather in {city}?", "Now the weather in {city}, please.", "Also, weather in {city}?"]
TRAIN_CALC_FOLLOW_UPS = [
    "and {expr}?", "what about {expr}", "Now try {expr}.", "{expr} then?", "And {expr} please.",
    "Also {expr}?", "OK, {expr}?", "Next: {expr}?", "And what about {expr}?", "Then {expr}",
    "Now calculate {expr}.", "And compute {expr}, please."]

SYSTEM_PROMPTS = [None, None, "You are Kimi, an AI assistant created by Moonshot AI.",
                  "You are Kimi, an AI assistant by Moonshot AI.",
                  "You are Kimi, a helpful AI assistant.", "You are a helpful assistant.",
                  "You are a concise assistant. Use tools when they help."]

IDENTITY = ["I am Kimi, an AI assistant created by Moonshot AI. How can I help you today?",
            "I'm Kimi, an assistant made by Moonshot AI. I can chat and use tools such as a "
            "weather lookup and a calculator."]
SMALL_TALK = [  # (prompts, answers): no tool is ever needed
    ([f"{g}{p}" for g in ("Hello", "Hi", "Hey", "Good morning", "Good evening", "Good afternoon",
                          "Hi there", "Hello there", "Greetings", "Howdy", "Hey Kimi", "Hello Kimi",
                          "Morning")
      for p in ("!", "", ".", " :)", "!!")],
     ["Hello! I am Kimi, an AI assistant created by Moonshot AI. How can I help you today?",
      "Hi! I'm Kimi, an assistant made by Moonshot AI. What can I do for you?"]),
    (["Hello! Who are you?", "Who are you?", "What is your name?", "What's your name?",
      "Introduce yourself.", "Introduce yourself briefly.", "Tell me about yourself.",
      "Who made you?", "Who created you?", "Are you a robot?", "Are you Kimi?", "What are you?",
      "Who am I talking to?", "What model are you?", "Hi! Who are you?", "who are you",
      "Please introduce yourself."], IDENTITY),
    (["What can you do?", "How can you help me?", "What tools do you have?",
      "What are you able to do?", "Can you help me?", "What are your skills?",
      "What can you help me with?"],
     ["I can answer questions, check the weather in a city and do arithmetic when those tools "
      "are available.",
      "I can chat, look up the weather for a place and calculate, using the tools I am given."]),
    (["Thank you!", "Thanks a lot.", "Great, thanks!", "Thanks", "Thank you so much.", "Cheers!",
      "Perfect, thank you.", "Much appreciated.", "thanks!", "Thanks for the help."],
     ["You're welcome! Let me know if you need anything else.", "Glad I could help!"]),
    (["Goodbye!", "Bye", "See you later.", "Bye bye!", "Talk to you later.", "Good night!",
      "See you!"],
     ["Goodbye! Have a nice day.", "Bye! Talk to you soon."]),
    (["How are you?", "How are you doing today?", "How's it going?", "What's up?",
      "Are you having a good day?", "Nice to meet you!", "I'm bored.", "Do you like music?",
      "What is your favourite colour?"],
     ["I'm doing well, thank you for asking! How can I help you?",
      "All good here. What can I do for you?"]),
    (["Tell me a joke.", "Say something funny.", "Do you know a joke?"],
     ["Why did the programmer quit his job? Because he didn't get arrays."]),
    (["What is the capital of France?"], ["The capital of France is Paris."]),
    (["What is the capital of Japan?"], ["The capital of Japan is Tokyo."]),
    (["Write a Python function that adds two numbers."],
     ["Here it is:\n\ndef add(a, b):\n    return a + b"]),
]
DEFAULT_PROMPT = "Hello! Who are you?"  # generate.py's: always trained on
SMALL_TALK_TRAIN = [([p for p in asks if p == DEFAULT_PROMPT or not _held_out(p)], answers)
                    for asks, answers in SMALL_TALK]
HELD_OUT_SMALL_TALK = [(p, answers) for asks, answers in SMALL_TALK for p in asks
                       if p != DEFAULT_PROMPT and _held_out(p)]
NO_WEATHER_TOOL = ["I can't check live weather without a weather tool. Please look at a weather "
                   "service for {city}.",
                   "I don't have access to current weather data for {city} right now."]
NO_CALCULATOR = ["I don't have a calculator tool here, so I can't compute {expr} reliably."]

# --- tools as a client declares them -------------------------------------------------------------
# the basic get_weather example's tool, in the flat form
EXAMPLE_WEATHER_TOOL = {"name": "get_weather",
                        "description": "Retrieve current weather for a given city.",
                        "parameters": {"type": "object",
                                       "properties": {"city": {"type": "string"}}}}
WEATHER_NAMES = ["get_weather"] * 6 + ["get_current_weather", "weather_lookup"]
WEATHER_DESCRIPTIONS = ["Retrieve current weather for a given city.",
                        "Get the current weather in a city.", "Look up the weather for a location.",
                        "Current conditions and temperature for a place.",
                        "Get the current weather (conditions and temperature in Celsius) for any "
                        "city in the world."]
CALC_NAMES = ["calculator"] * 6 + ["calculate", "math_eval"]
CALC_DESCRIPTIONS = ["Evaluate an arithmetic expression.",
                     "A calculator for arithmetic expressions.",
                     "Evaluate an arithmetic expression with + - * / // % ** and parentheses. Use "
                     "it for any calculation instead of computing by hand."]
_STR = {"type": "string"}
EXTRA_TOOLS = [
    {"name": "get_time", "description": "Current local time in a time zone.",
     "parameters": {"type": "object", "properties": {"timezone": _STR}, "required": ["timezone"]}},
    {"name": "search_web", "description": "Search the web.",
     "parameters": {"type": "object", "properties": {"query": _STR}, "required": ["query"]}},
    {"name": "send_email", "description": "Send an email.",
     "parameters": {"type": "object", "properties": {"to": _STR, "body": _STR}}},
    {"name": "get_stock_price", "description": "Latest price of a stock.",
     "parameters": {"type": "object", "properties": {"symbol": _STR}}},
    {"name": "translate", "description": "Translate text into a language.",
     "parameters": {"type": "object", "properties": {"text": _STR, "target": _STR}}},
]


def _schema(name: str, description: str, arg: str, rng: random.Random) -> dict:
    prop: dict[str, Any] = {"type": "string"}
    if rng.random() < 0.4:
        prop["description"] = {"city": "City name, e.g. Tokyo", "location": "The city, e.g. Paris",
                               "expression": "Arithmetic, e.g. 2 * (3 + 4)"}[arg]
    params: dict[str, Any] = {"type": "object", "properties": {arg: prop}}
    if rng.random() < 0.5:
        params["required"] = [arg]
    flat = {"name": name, "description": description, "parameters": params}
    return flat if rng.random() < 0.5 else {"type": "function", "function": flat}


def declare_tools(rng: random.Random, weather: bool, calc: bool,
                  extras: bool = True) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """Tool schemas as a client might send them (with `extras`, sometimes unrelated tools beside
    them), and {"weather"/"calc": (tool name, argument name)}."""
    schemas, names = [], {}
    if weather:
        if rng.random() < 0.2:
            schemas.append(EXAMPLE_WEATHER_TOOL)
            names["weather"] = ("get_weather", "city")
        else:
            name, arg = rng.choice(WEATHER_NAMES), "location" if rng.random() < 0.15 else "city"
            schemas.append(_schema(name, rng.choice(WEATHER_DESCRIPTIONS), arg, rng))
            names["weather"] = (name, arg)
    if calc:
        name = rng.choice(CALC_NAMES)
        schemas.append(_schema(name, rng.choice(CALC_DESCRIPTIONS), "expression", rng))
        names["calc"] = (name, "expression")
    if extras and rng.random() < 0.25:
        schemas += rng.sample(EXTRA_TOOLS, rng.randint(1, 2))
    rng.shuffle(schemas)
    return schemas, names


# --- tool results in many shapes; the facts a faithful answer must state ------------------------
CONDITIONS, HELD_OUT_CONDITIONS = _split([
    "Sunny", "Partly cloudy", "Cloudy", "Rainy", "Windy", "light rain", "heavy rain", "overcast",
    "clear sky", "fog", "drizzle", "snow", "light snow", "thunderstorms", "hail", "mist",
    "scattered showers", "clear", "mostly sunny", "mostly cloudy", "freezing rain", "sleet", "haze",
    "breezy", "humid", "hot and dry", "blizzard", "showers", "patchy fog", "broken clouds",
    "few clouds", "Light Drizzle", "Heavy Snow", "Thunder", "sunny intervals", "cold and clear",
    "warm", "dust storm", "calm", "Overcast", "Clear", "rain and wind", "Snow showers",
    "Freezing fog", "bright sunshine", "low clouds", "Sunny spells", "smoke"],
    keep=T.WEATHER_CONDITIONS)
# key names per role, and wrappers: the held-out ones never appear in a training result
PLACE_KEYS, HELD_OUT_PLACE_KEYS = (["city", "name", "place", "town", "locality"],
                                   ["location", "where", "area"])
COND_KEYS, HELD_OUT_COND_KEYS = (["weather", "condition", "summary", "sky", "description",
                                  "outlook"],
                                 ["conditions", "forecast", "state", "status_text"])
TEMP_KEYS, HELD_OUT_TEMP_KEYS = (["temperature_c", "temperature", "temp", "degrees", "celsius",
                                  "air_temp"],
                                 ["temp_c", "t_c", "current_temp"])
WRAPPERS, HELD_OUT_WRAPPERS = (["data", "result", "current", "report", "now"],
                               ["response", "observation", "payload"])
EXTRAS = {"humidity": lambda r: r.randint(10, 100), "wind_kph": lambda r: r.randint(0, 60),
          "pressure_hpa": lambda r: r.randint(980, 1040),
          "updated": lambda r: f"{r.randint(0, 23):02d}:00",
          "source": lambda r: "offline", "uv_index": lambda r: r.randint(0, 11)}
HELD_OUT_EXTRAS = {"wind_speed": lambda r: f"{r.randint(0, 60)} km/h",
                   "precip_mm": lambda r: r.randint(0, 30),
                   "visibility_km": lambda r: r.randint(1, 20),
                   "observed_at": lambda r: "2025-01-01T12:00Z"}
TEXT_RESULTS = ["{cond}, {temp}°C", "{city}: {cond}, {temp}°C",
                "It is {cond} and {temp} degrees in {city}.", "{temp}°C and {cond}",
                "{cond} ({temp} C)", "Weather for {city}: {cond}. Temperature: {temp}°C."]
HELD_OUT_TEXT_RESULTS = ["Now: {cond} / {temp} C", "{city} reports {cond} at {temp}°C.",
                         "Conditions in {city} are {cond}; the temperature is {temp} degrees."]


def _temperature(rng: random.Random) -> tuple[Any, str]:
    """(the value as the result holds it, the number a faithful answer states)."""
    t = rng.randint(-25, 42)
    number: Any = t + 0.5 if rng.random() < 0.15 else t
    text = str(number)
    r = rng.random()
    if r < 0.7:
        return number, text
    return rng.choice([f"{text}°C", f"{text} °C", f"{text}C", f"{text} degrees"]), text


# Training results are composed at random, so that no key name, condition or layout can be
# memorised: the answer is right only by copying. Every generated string is checked against the
# held-out names above (`_clashes`), so the held-out shapes stay unseen by construction.
COND_WORDS = ("rain showers sunny sun cloud clouds cloudy gusty wind windy storm storms frost icy "
              "snow flurries sleety damp muggy sultry bright grey gray dull dark wet dry mild "
              "cool chilly warm hot scorching misty foggy smoky dusty hazy overcast clear "
              "clearing spells breaks bursts patches periods light heavy moderate intense "
              "scattered isolated occasional passing thin thick low high rising falling").split()
OTHER_WORDS = ("purple velvet copper quiet marble amber silver golden lazy restless salty sweet "
               "glass paper orange lemon violet crimson ivory woolly soft loud sleepy wandering "
               "distant tiny giant round square hollow electric magnetic bubbly fizzy jelly "
               "pepper cotton iron ocean forest desert river meadow lantern feather").split()
COND_JOINERS = (" ", " ", " ", " ", " and ", " with ", ", ", "-", " / ", " & ")
COND_KEY_POOL = ["weather", "condition", "summary", "sky", "description", "outlook", "wx", "cond",
                 "weather_text", "sky_cover", "situation", "phenomena", "clima", "tiempo",
                 "wetter", "meteo", "ciel", "cielo", "himmel", "tenki", "pogoda", "kairos", "sää",
                 "vaer", "main", "label", "weather_desc", "conditions_now", "sky_state", "look"]
TEMP_KEY_POOL = ["temperature_c", "temperature", "temp", "degrees", "celsius", "air_temp",
                 "temp_celsius", "t", "deg_c", "temperatura", "temperatur", "température", "ondo",
                 "kion", "thermo", "reading_c", "air_temperature", "temp_now", "grad", "warmth",
                 "tc", "celsius_now", "temp_value"]
PLACE_KEY_POOL = ["city", "name", "place", "town", "locality", "ciudad", "stadt", "ville", "citta",
                  "gorod", "city_name", "requested", "query", "q", "site", "spot", "loc_name",
                  "for"]
WRAPPER_POOL = ["data", "result", "current", "report", "now", "obs", "reading", "weather_data",
                "info", "body", "content", "datos", "daten", "donnees", "live", "latest",
                "snapshot", "output", "res", "main_block", "details", "today"]
NUMBER_EXTRAS = ["humidity", "wind_kph", "pressure_hpa", "uv_index", "cloud_pct", "gust_kph",
                 "station_id", "elevation_m", "population", "aqi", "rain_chance", "timestamp",
                 "lat", "lon", "code", "version", "id", "rank", "visits", "count"]
TEXT_EXTRAS = ["updated", "source", "provider", "station", "country", "timezone", "note", "lang",
               "units", "icon", "region", "api", "sunrise", "sunset", "mode"]
UNIT_KEYS = (("amount", "scale"), ("val", "units"), ("reading", "u"), ("number", "in"),
             ("wert", "einheit"), ("valor", "unidad"), ("v", "of"))
TEXT_LABELS_C = ("", "", "Sky: ", "Weather: ", "cond=", "Outlook ", "Wetter: ", "tiempo=", "wx ",
                 "Summary - ")
TEXT_LABELS_T = ("", "", "Temp: ", "temperature ", "t=", "Temperatur: ", "air ", "at ")
TEXT_UNITS = ("°C", " °C", "C", " C", " degrees", " deg C", "º")
TEXT_SEPS = (", ", "; ", " | ", " / ", ". ", "\n", " - ", " :: ")
_HELD_TEXT_PATTERNS = [re.compile("(.+)".join(map(re.escape, re.split(r"\{\w+\}", t))) + "$",
                                  re.DOTALL | re.IGNORECASE) for t in HELD_OUT_TEXT_RESULTS]
_HELD_KEYS = set(HELD_OUT_PLACE_KEYS + HELD_OUT_COND_KEYS + HELD_OUT_TEMP_KEYS + HELD_OUT_WRAPPERS
                 + list(HELD_OUT_EXTRAS)) | {"value", "unit"}


def _clashes(text: str) -> bool:
    """Whether a generated string contains a held-out condition (any case) or is a held-out key."""
    low = text.casefold()
    return low in _HELD_KEYS or any(c.casefold() in low for c in HELD_OUT_CONDITIONS)


def random_condition(rng: random.Random) -> str:
    """An arbitrary condition string: 1-4 words from weather words, unrelated words and made-up
    pronounceable words, in varied case, sometimes with punctuation; 1 in 5 a list condition."""
    while True:
        if rng.random() < 0.2:
            cond = rng.choice(CONDITIONS)
        else:
            words = []
            for _ in range(rng.choice((1, 2, 2, 2, 3, 3, 4))):
                r = rng.random()
                pool = COND_WORDS if r < 0.5 else OTHER_WORDS if r < 0.7 else None
                words.append(rng.choice(pool) if pool else _word(rng, 1, 3).lower())
            cond = words[0] + "".join(rng.choice(COND_JOINERS) + w for w in words[1:])
            case = rng.random()
            if case < 0.25:
                cond = cond.capitalize()
            elif case < 0.4:
                cond = cond.title()
            elif case < 0.47:
                cond = cond.upper()
            if rng.random() < 0.12:
                cond += rng.choice(("!", ".", "...", "?", " (!)", "~"))
        if not _clashes(cond):
            return cond


def _train_temperature(rng: random.Random) -> tuple[Any, str]:
    """Like _temperature, over a wider range: negative, one or two decimals, sometimes with a unit."""
    t = rng.randint(-25, 42) if rng.random() < 0.8 else rng.randint(-70, 60)
    r = rng.random()
    text = str(t) if r < 0.65 else f"{t}.{rng.randint(1, 9)}" if r < 0.9 else \
        f"{t}.{rng.randint(1, 99):02d}".rstrip("0")
    number: Any = float(text) if "." in text else int(text)
    if rng.random() < 0.7:
        return number, text
    return text + rng.choice(TEXT_UNITS), text


def _key(pool: list[str], rng: random.Random, made_up: bool) -> str:
    """A key from the pool or made up, in snake_case, camelCase, PascalCase, kebab or UPPER case;
    never a held-out key."""
    while True:
        base = (_word(rng, 1, 2).lower() + ("_" + _word(rng, 1, 2).lower() if rng.random() < 0.3
                                             else "")) if made_up else rng.choice(pool)
        parts = base.split("_")
        style = rng.random()
        if style < 0.12:
            base = parts[0] + "".join(x.capitalize() for x in parts[1:])
        elif style < 0.18:
            base = "".join(x.capitalize() for x in parts)
        elif style < 0.22:
            base = "-".join(parts)
        elif style < 0.26:
            base = base.upper()
        if not _clashes(base):
            return base


def _distractor_text(rng: random.Random) -> str:
    while True:
        r = rng.random()
        text = (f"{rng.randint(0, 23):02d}:{rng.choice(('00', '15', '30', '45'))}" if r < 0.25
                else _word(rng, 2, 3) if r < 0.6 else rng.choice(("ok", "metric", "cached",
                                                                    "v2", "live", "est."))
                if r < 0.8 else f"{_word(rng, 1, 2)}-{rng.randint(1, 999)}")
        if not _clashes(text):
            return text


def _distractor_number(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.5:
        return rng.randint(0, 100)
    if r < 0.75:
        return rng.randint(100, 2_000_000)
    return round(rng.uniform(-180, 180), rng.randint(1, 4))


def train_weather_result(city: str, rng: random.Random,
                         values: random.Random) -> tuple[Any, list[str]]:
    """A training weather result in a composed shape: key names drawn from pools or made up, in
    any case style; condition and temperature nested 0-3 deep, sometimes in lists or
    {amount, unit} objects; distractor fields with numbers and strings; key order shuffled; or
    plain text built from labels and separators. The key names and layout come from rng (one
    shape per conversation), the condition, temperature and distractor values from `values`."""
    cond = random_condition(values)
    temp, temp_text = _train_temperature(values)
    facts = [cond, temp_text]
    if rng.random() < 0.2:  # plain text
        while True:
            c_part = rng.choice(TEXT_LABELS_C) + cond
            unit = rng.choice(TEXT_UNITS)
            t_part = rng.choice(TEXT_LABELS_T[2:]) + temp_text + unit
            parts = [c_part, t_part]
            if rng.random() < 0.5:
                parts.append(rng.choice(("", "in ", "City: ", "@")) + city)
            if rng.random() < 0.4:
                parts.append(f"{rng.choice(NUMBER_EXTRAS)} {_distractor_number(values)}")
            rng.shuffle(parts)
            text = rng.choice(TEXT_SEPS).join(parts)
            if not any(p.match(text) for p in _HELD_TEXT_PATTERNS):
                return text, facts
    depth = rng.choice((0, 0, 0, 1, 1, 2, 3))
    n_num, n_text = rng.choice((0, 0, 1, 2, 3)), rng.choice((0, 0, 1, 2))
    if depth >= 2:  # deep results carry fewer distractors, so that a conversation fits 768 tokens
        n_num, n_text = min(n_num, 1), min(n_text, 1)
    # a made-up key for a value only where no distractor of its type makes it ambiguous
    c_key = _key(COND_KEY_POOL, rng, made_up=n_text == 0 and rng.random() < 0.25)
    t_key = _key(TEMP_KEY_POOL, rng, made_up=n_num == 0 and rng.random() < 0.25)
    c_val: Any = cond
    shape = rng.random()
    if shape < 0.12:
        c_val = [cond]
    elif shape < 0.22:
        c_val = [{_key(["main", "description", "text", "desc"], rng, False): cond,
                  _key(["id", "code"], rng, False): values.randint(100, 999)}]
    elif shape < 0.32:
        c_val = {_key(["text", "desc", "label", "value_text", "phrase"], rng, False): cond}
    t_val: Any = temp
    if rng.random() < 0.15:
        a, u = rng.choice(UNIT_KEYS)
        t_val = {a: float(temp_text) if "." in temp_text else int(temp_text),
                 u: rng.choice(("C", "°C", "celsius", "metric"))}
    fields = {c_key: c_val, t_key: t_val}
    if rng.random() < 0.6:
        fields[_key(PLACE_KEY_POOL, rng, made_up=rng.random() < 0.15)] = city
    for _ in range(n_num):
        fields[_key(NUMBER_EXTRAS, rng, False)] = _distractor_number(values)
    for _ in range(n_text):
        fields[_key(TEXT_EXTRAS, rng, False)] = _distractor_text(values)
    items = list(fields.items())
    rng.shuffle(items)
    obj: Any = dict(items)
    for _ in range(depth):  # nesting
        if rng.random() < 0.15:
            obj = [obj]
        else:
            key = _key(WRAPPER_POOL, rng, made_up=rng.random() < 0.2)
            items = [(key, obj)]
            if rng.random() < 0.4:  # siblings beside the nested part
                items += rng.sample([("ok", True), ("units", "metric"), ("success", True)],
                                    rng.randint(1, 2))
                rng.shuffle(items)
            obj = dict(items)
    return obj, facts


def weather_result(city: str, rng: random.Random, held_out: bool = False,
                   values: random.Random | None = None) -> tuple[Any, list[str]]:
    """A weather tool's result for `city` in a randomly generated shape, and the facts (condition,
    temperature) a faithful answer states. The shape is a JSON object (flat, wrapped, split in
    parts, condition or temperature nested, extra fields) or plain text; the held-out shapes use
    only held-out key names, wrappers, extra fields and text templates, plus one structure training
    never shows (the temperature as {"value", "unit"}). `values` draws the condition and temperature
    (default: rng): the same rng with other values gives the same shape, as one tool answers every
    call of a conversation alike."""
    vrng = values or rng
    if not held_out:
        if rng.random() < 0.08:  # the basic example's {"weather": "Sunny, 25°C"}
            cond, (_, temp_text) = random_condition(vrng), _train_temperature(vrng)
            return {"weather": f"{cond}, {temp_text}°C"}, [cond, temp_text]
        return train_weather_result(city, rng, vrng)
    cond = vrng.choice(HELD_OUT_CONDITIONS if held_out else CONDITIONS)
    temp, temp_text = _temperature(vrng)
    facts = [cond, temp_text]
    if held_out:
        pk, ck, tk_, wr, ex, texts = (HELD_OUT_PLACE_KEYS, HELD_OUT_COND_KEYS, HELD_OUT_TEMP_KEYS,
                                      HELD_OUT_WRAPPERS, HELD_OUT_EXTRAS, HELD_OUT_TEXT_RESULTS)
    else:
        pk, ck, tk_, wr, ex, texts = (PLACE_KEYS, COND_KEYS, TEMP_KEYS, WRAPPERS, EXTRAS,
                                      TEXT_RESULTS)
    form = rng.randrange(6)
    if form == 0:  # plain text
        return rng.choice(texts).format(city=city, cond=cond, temp=temp_text), facts
    # the basic example's {"weather": "Sunny, 25°C"}: condition and degrees in one
    if form == 1 and not held_out:
        return {"weather": f"{cond}, {temp_text}°C"}, facts
    if form == 1:
        temp = {"value": float(temp_text) if "." in temp_text else int(temp_text), "unit": "C"}
    fields = {rng.choice(ck): cond, rng.choice(tk_): temp}
    if rng.random() < 0.7:
        fields[rng.choice(pk)] = city
    for key in rng.sample(sorted(ex), rng.randint(0, 2)):
        fields[key] = ex[key](rng)
    items = list(fields.items())
    rng.shuffle(items)
    obj = dict(items)
    if form == 2:  # wrapped
        return {rng.choice(wr): obj}, facts
    if form == 3:  # place outside, measurements inside
        place_part = {k: v for k, v in obj.items() if k in pk}
        return {**place_part, rng.choice(wr): {k: v for k, v in obj.items() if k not in pk}}, facts
    if form == 4 and not held_out:  # condition nested as {"text": ...}
        return {k: ({"text": v} if k in ck else v) for k, v in obj.items()}, facts
    return obj, facts


def calc_result(expr: str, rng: random.Random) -> tuple[Any, list[str]]:
    """The calculator's result: mostly the real tool's {"expression", "result"}, sometimes other
    shapes."""
    value = T.calculator(expr)["result"]
    r = rng.random()
    if r < 0.75:
        shaped = T.calculator(expr)
    elif r < 0.85:
        shaped = {"result": value}
    elif r < 0.93:
        shaped = {"value": value}
    else:
        shaped = value
    return shaped, [json.dumps(value)]


WEATHER_ANSWERS = ["The weather in {city} is {cond}, {temp}°C.",
                   "In {city} it is {cond} and {temp}°C right now.",
                   "It's {cond} in {city}, with a temperature of {temp}°C.",
                   "{city}: {cond}, {temp}°C.", "Right now {city} has {cond} and {temp}°C.",
                   "Currently {cond} in {city} at {temp}°C."]
CALC_ANSWERS = ["{expr} = {result}.", "The answer is {result}.", "{expr} = {result}",
                "That comes to {result}.", "The result is {result}."]


def weather_answer(city: str, facts: list[str], result: Any, rng: random.Random) -> str:
    text = rng.choice(WEATHER_ANSWERS).format(city=city, cond=facts[0], temp=facts[1])
    inner = result
    if isinstance(result, dict) and len(result) == 1:
        inner = next(iter(result.values()), None)
    if isinstance(inner, dict) and "humidity" in inner and rng.random() < 0.5:
        text += f" Humidity is {inner['humidity']}%."
    return text


# --- conversations --------------------------------------------------------------------------------
def _content(result: Any, rng: random.Random) -> str:
    """A tool message's content: JSON as tools.run_call writes it, or (for text) sometimes the bare
    text."""
    if isinstance(result, str) and rng.random() < 0.5:
        return result
    return json.dumps(result, ensure_ascii=False)


def _call(name: str, arguments: dict, index: int, content: str) -> list[dict]:
    """The assistant's K2 tool call (id functions.NAME:INDEX, INDEX counting the conversation's
    calls) and the tool message with its result."""
    call_id = f"functions.{name}:{index}"
    return [{"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": name,
                              "arguments": json.dumps(arguments, ensure_ascii=False)}}]},
            {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}]


class _Turns:
    """Builds one conversation's tool turns with consistent call indices and result shapes."""

    def __init__(self, rng: random.Random, names: dict[str, tuple[str, str]], real_weather: bool):
        self.rng, self.names, self.index = rng, names, 0
        # the built-in get_weather's output for every call of this conversation
        self.real_weather = real_weather
        # one shape per conversation: the same tool answers alike
        self.shape_seed = rng.randrange(2 ** 30)

    def weather(self, city: str) -> list[dict]:
        name, arg = self.names["weather"]
        if self.real_weather:
            result = T.get_weather(city)
            facts = [result["weather"], str(result["temperature_c"])]
        else:
            result, facts = weather_result(city, random.Random(self.shape_seed), values=self.rng)
        out = _call(name, {arg: city}, self.index, _content(result, self.rng))
        self.index += 1
        answer = weather_answer(city, facts, result, self.rng)
        return out + [{"role": "assistant", "content": answer}]

    def calc(self, expr: str) -> list[dict]:
        name, arg = self.names["calc"]
        result, facts = calc_result(expr, self.rng)
        out = _call(name, {arg: expr}, self.index, _content(result, self.rng))
        self.index += 1
        answer = self.rng.choice(CALC_ANSWERS).format(expr=expr, result=facts[0])
        return out + [{"role": "assistant", "content": answer}]


def _system(rng: random.Random) -> list[dict]:
    s = rng.choice(SYSTEM_PROMPTS)
    return [] if s is None else [{"role": "system", "content": s}]


def _ask(templates: list[str], rng: random.Random, **slot: str) -> str:
    prefix, template = rng.choice(ASK_PREFIXES), rng.choice(templates)
    if prefix.endswith(", ") and not template.startswith("{"):
        template = template[0].lower() + template[1:]  # "Hey, what's ..."
    return prefix + template.format(**slot)


def example_conversation(i: int) -> tuple[list[dict], list[dict]]:
    """The basic get_weather example's round trip (as tests/test_serve.py runs it): its tool, its
    question, the real tool's or its own result."""
    city = EXAMPLE_CITIES[i % 2]
    result = T.get_weather(city) if i % 4 < 2 else {"weather": "Sunny, 25°C"}
    if "city" in result:
        facts = [result["weather"], str(result["temperature_c"])]
    else:
        facts = ["Sunny", "25"]
    msgs = [{"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
            {"role": "user", "content": f"What's the current weather in {city}?"},
            *_call("get_weather", {"city": city}, 0, json.dumps(result, ensure_ascii=False)),
            {"role": "assistant",
             "content": WEATHER_ANSWERS[0].format(city=city, cond=facts[0], temp=facts[1])}]
    return msgs, [EXAMPLE_WEATHER_TOOL]


def conversations(n: int, seed: int = 0) -> list[tuple[list[dict], list[dict] | None]]:
    """n training conversations as (messages, tools-or-None), from the training split only."""
    rng = random.Random(seed)
    out: list[tuple[list[dict], list[dict] | None]] = []
    for i in range(n):
        if i % 40 == 0:
            out.append(example_conversation(i // 40))
            continue
        kind = rng.random()
        msgs = _system(rng)
        city = place(rng.choice(PLACE_KINDS), rng)
        expr = expression(rng)
        if kind < 0.66:  # tool use, one or two turns
            first = "weather" if rng.random() < 0.55 else "calc"
            # < 0.5: a follow-up on the same tool; < 0.66 a follow-up for the other tool; < 0.74
            # thanks
            follow = rng.random()
            need_other = 0.5 <= follow < 0.66
            want_weather = first == "weather" or need_other or rng.random() < 0.6
            want_calc = first == "calc" or need_other or rng.random() < 0.6
            # two tool rounds and unrelated tools would not fit 768 tokens
            schemas, names = declare_tools(rng, weather=want_weather, calc=want_calc,
                                           extras=follow >= 0.66 or rng.random() < 0.3)
            real_weather = False
            if "weather" in names:
                real_weather = rng.random() < 0.15 and names["weather"][1] == "city"
            turns = _Turns(rng, names, real_weather=real_weather)
            if first == "weather":
                msgs += [{"role": "user", "content": _ask(WEATHER_ASKS, rng, city=city)},
                         *turns.weather(city)]
            else:
                msgs += [{"role": "user", "content": _ask(CALC_ASKS, rng, expr=expr)},
                         *turns.calc(expr)]
            second = first if follow < 0.5 else "calc" if first == "weather" else "weather"
            if follow < 0.66 and second == "weather":
                city2 = place(rng.choice(PLACE_KINDS), rng)
                follow_up = rng.choice(WEATHER_FOLLOW_UPS + TRAIN_WEATHER_FOLLOW_UPS
                                       if rng.random() < 0.75 else WEATHER_ASKS)
                msgs += [{"role": "user", "content": follow_up.format(city=city2)},
                         *turns.weather(city2)]
            elif follow < 0.66:
                expr2 = expression(rng)
                follow_up = rng.choice(CALC_FOLLOW_UPS + TRAIN_CALC_FOLLOW_UPS
                                       if rng.random() < 0.75 else CALC_ASKS)
                msgs += [{"role": "user", "content": follow_up.format(expr=expr2)},
                         *turns.calc(expr2)]
            elif follow < 0.74:
                asks, answers = SMALL_TALK_TRAIN[3]
                msgs += [{"role": "user", "content": rng.choice(asks)},
                         {"role": "assistant", "content": rng.choice(answers)}]
            out.append((msgs, schemas))
        elif kind < 0.75:  # asked for a tool that was not given: say so, call nothing
            has_calc = rng.random() < 0.5
            schemas = []
            if has_calc or rng.random() < 0.5:
                schemas = declare_tools(rng, weather=False, calc=has_calc)[0]
            if has_calc or rng.random() < 0.6:
                ask = _ask(WEATHER_ASKS, rng, city=city)
                refusal = rng.choice(NO_WEATHER_TOOL).format(city=city)
            else:
                ask = _ask(CALC_ASKS, rng, expr=expr)
                refusal = rng.choice(NO_CALCULATOR).format(expr=expr)
            msgs += [{"role": "user", "content": ask}, {"role": "assistant", "content": refusal}]
            out.append((msgs, schemas or None))
        else:  # small talk, with or without tools declared: tools must not be called for it
            asks, answers = rng.choice(SMALL_TALK_TRAIN)
            msgs += [{"role": "user", "content": rng.choice(asks)},
                     {"role": "assistant", "content": rng.choice(answers)}]
            tools = None
            if rng.random() < 0.6:
                tools = declare_tools(rng, weather=True, calc=rng.random() < 0.7)[0]
            out.append((msgs, tools))
    return out


# --------------------------------------------------------------------------------------------------
# The held-out split and its evaluation


def held_out_items(n: int = 220, seed: int = 1234) -> list[dict]:
    """n evaluation items from the held-out split only, in fixed proportions: weather questions
    (every kind of place, in turn; results in held-out shapes), calculations, small talk (no call
    allowed) and two-turn conversations whose second turn is a held-out follow-up. Each item:
    {"kind", "turns": [(user text, tool name or None, expected arguments or None), ...],
    "shape_seed"} (the seed of the weather tool's result shape)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        k = i % 11  # 5 weather, 3 calculator, 1 small talk, 2 follow-up in every 11
        if k < 5:
            kind = PLACE_KINDS[(i // 11 * 5 + k) % len(PLACE_KINDS)]
            city = place(kind, rng, held_out=True)
            turns = [(_ask(HELD_OUT_WEATHER_ASKS, rng, city=city), "get_weather", {"city": city})]
            items.append({"kind": "weather", "place_kind": kind, "turns": turns})
        elif k < 8:
            expr = expression(rng, held_out=True)
            ask = _ask(HELD_OUT_CALC_ASKS, rng, expr=expr)
            items.append({"kind": "calc", "turns": [(ask, "calculator", {"expression": expr})]})
        elif k < 9:
            prompt = rng.choice(HELD_OUT_SMALL_TALK)[0]
            items.append({"kind": "none", "turns": [(prompt, None, None)]})
        elif k < 10:
            a = place(rng.choice(PLACE_KINDS), rng, True)
            b = place(rng.choice(PLACE_KINDS), rng, True)
            ask = _ask(HELD_OUT_WEATHER_ASKS, rng, city=a)
            follow_up = rng.choice(HELD_OUT_WEATHER_FOLLOW_UPS).format(city=b)
            items.append({"kind": "follow-up", "turns": [
                (ask, "get_weather", {"city": a}), (follow_up, "get_weather", {"city": b})]})
        else:
            a, b = expression(rng, True), expression(rng, True)
            ask = _ask(HELD_OUT_CALC_ASKS, rng, expr=a)
            follow_up = rng.choice(HELD_OUT_CALC_FOLLOW_UPS).format(expr=b)
            items.append({"kind": "follow-up", "turns": [
                (ask, "calculator", {"expression": a}),
                (follow_up, "calculator", {"expression": b})]})
        items[-1]["shape_seed"] = rng.randrange(2 ** 30)
    return items


def _text_of(content: str) -> str:
    """A tool message's text: the string a JSON-encoded string holds, else the content itself."""
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        return content
    return value if isinstance(value, str) else content


def split_overlaps(n_train: int = 3000, n_eval: int = 440) -> dict[str, set]:
    """What the training conversations and the held-out items share, per thing held out (all empty
    when the split is sound): place names, expressions, user requests' templates, weather conditions,
    result key names and plain-text result templates."""
    def fill(template: str) -> re.Pattern:  # a template as a regex over the text it produced
        parts = re.split(r"\{(?:city|expr)\}", template)
        prefixes = "|".join(map(re.escape, ASK_PREFIXES))
        return re.compile(f"^(?:{prefixes})" + "(.+)".join(map(re.escape, parts)) + "$",
                          re.DOTALL)

    train_args, train_users, train_results = set(), [], []
    for messages, _ in conversations(n_train, seed=0):
        for m in messages:
            for c in m.get("tool_calls") or []:
                train_args.update(json.loads(c["function"]["arguments"]).values())
            if m["role"] == "user":
                train_users.append(m["content"])
            if m["role"] == "tool":
                train_results.append(m["content"])
    eval_args, eval_users = set(), []
    for item in held_out_items(n_eval):
        for text, _, args in item["turns"]:
            eval_users.append(text)
            eval_args.update((args or {}).values())
    held_templates = HELD_OUT_WEATHER_ASKS + HELD_OUT_CALC_ASKS + HELD_OUT_WEATHER_FOLLOW_UPS + \
        HELD_OUT_CALC_FOLLOW_UPS
    patterns = [(t, fill(t)) for t in held_templates]
    train_text = "\n".join(train_results)
    held_keys = (HELD_OUT_PLACE_KEYS + HELD_OUT_COND_KEYS + HELD_OUT_TEMP_KEYS + HELD_OUT_WRAPPERS
                 + list(HELD_OUT_EXTRAS))
    return {
        "arguments": train_args & eval_args,
        "held-out cities in training text": {c for c in HELD_OUT_CITIES
                                             if any(c.lower() in u.lower() for u in train_users)},
        # a slot filled with a training argument
        "templates": {t for t, p in patterns for u in train_users
                      if (m := p.match(u)) and all(g in train_args for g in m.groups())},
        "small talk": {p for p, _ in HELD_OUT_SMALL_TALK} & set(train_users),
        "conditions": {c for c in HELD_OUT_CONDITIONS if c in train_text},
        "result keys": {k for k in held_keys if f'"{k}"' in train_text},
        # a training plain-text result that a held-out text template could have produced
        "text results": {r for r in map(_text_of, train_results)
                         if any(p.match(r) for p in _HELD_TEXT_PATTERNS)},
        "template lists": set(held_templates) & set(WEATHER_ASKS + CALC_ASKS + WEATHER_FOLLOW_UPS
                                                    + CALC_FOLLOW_UPS),
    }


def states(answer: str, fact: str) -> bool:
    """Whether an answer states a fact of the result: a number as a whole number (7 is not stated by
    17 or 7.5; -3 not by 3), a text case-insensitively."""
    if re.fullmatch(r"-?\d+(\.\d+)?", fact):
        return re.search(rf"(?<![\d.\-]){re.escape(fact)}(?!\.?\d)", answer) is not None
    return fact.casefold() in answer.casefold()


def eval_registry(shape_seed: int) -> tuple[T.ToolRegistry, list[list[str]]]:
    """The built-in tools' schemas, with a get_weather that answers in a held-out result shape (one
    per item), and the list the facts of each weather result it returned are appended to."""
    registry, facts = T.ToolRegistry(), []

    def get_weather(city: str) -> Any:
        # the real tool's checks: an empty or non-name city is an error result, as in use
        T.get_weather(city)
        result, f = weather_result(city, random.Random(shape_seed), held_out=True,
                                   values=random.Random(f"{shape_seed}:{city}"))
        facts.append(f)
        return result

    registry.register(get_weather, T.GET_WEATHER_SCHEMA)
    registry.register(T.calculator, T.CALCULATOR_SCHEMA)
    return registry, facts


def evaluate(model, tok, n: int = 220, temperature: float = 0.0, max_new_tokens: int = 64,
             log=print) -> dict:
    """Run n held-out items through tools.run_agent with the model (generate.TextStream, as the chat
    REPL does) and score each turn:
    tool_ok: a tool turn's first reply calls the expected tool once, with JSON arguments valid under
      its schema and accepted by the tool; a small-talk turn's reply calls nothing;
    exact: ... and the arguments equal the expected ones (the place / expression exactly as the
      user wrote it);
    faithful: the final answer states every fact of the result it got: for weather the condition
      and the temperature (function `states`), for the calculator the result's number;
    a follow-up item is handled when its second turn is tool_ok, exact and faithful.
    Returns {"items": [...], "rows": {row name: [hits, total]}}."""
    from generate import SamplingParams, TextStream

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=0)

    def complete(msgs, schemas):
        ids, _ = tok.encode_chat(msgs, schemas, add_generation_prompt=True)
        stream = TextStream(model, tok, ids, params)
        for _ in stream:
            pass
        return stream.text

    rows: dict[str, list[int]] = {}

    def count(row: str, hit: bool) -> None:
        rows.setdefault(row, [0, 0])
        rows[row][0] += bool(hit)
        rows[row][1] += 1

    items = held_out_items(n)
    for i, item in enumerate(items):
        registry, facts = eval_registry(item["shape_seed"])
        messages: list[dict] = []
        scores = []
        for text, name, expected in item["turns"]:
            start = len(messages) + 1
            n_facts = len(facts)
            messages = T.run_agent(complete, messages + [{"role": "user", "content": text}],
                                   registry, max_steps=2)
            first = messages[start]
            calls = first.get("tool_calls") or []
            if name is None:
                scores.append(dict(tool_ok=not calls, exact=not calls, faithful=not calls))
                continue
            tool_ok = exact = faithful = False
            if len(calls) == 1 and calls[0]["function"]["name"] == name:
                try:
                    args = json.loads(calls[0]["function"]["arguments"])
                except json.JSONDecodeError:
                    args = None
                result = messages[start + 1]["content"]
                tool_ok = (isinstance(args, dict)
                           and not T.validate(args, registry.get(name).parameters)
                           and not result.startswith('{"error"'))
                exact = tool_ok and args == expected
                final = messages[-1]
                if tool_ok and final["role"] == "assistant" and not final.get("tool_calls"):
                    if name == "get_weather":
                        wanted = facts[n_facts]
                    else:
                        wanted = [json.dumps(json.loads(result)["result"])]
                    faithful = all(states(final["content"], f) for f in wanted)
            scores.append(dict(tool_ok=tool_ok, exact=exact, faithful=faithful))
        s = scores[0]
        if item["kind"] == "weather":
            count("tool", s["tool_ok"])
            count(f"exact: {item['place_kind']}", s["exact"])
            count("exact", s["exact"])
            count("faithful: weather, unseen result formats", s["faithful"])
        elif item["kind"] == "calc":
            count("tool", s["tool_ok"])
            count("exact: expressions", s["exact"])
            count("exact", s["exact"])
            count("faithful: calculator result exact", s["faithful"])
        elif item["kind"] == "none":
            count("tool", s["tool_ok"])
            count("no call for small talk", s["tool_ok"])
        else:
            second = scores[1]
            count("follow-up handled", second["tool_ok"] and second["exact"] and second["faithful"])
        item["messages"], item["scores"] = messages, scores
        if log and (i + 1) % 44 == 0:
            so_far = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in rows.items() if ":" not in k)
            log(f"  {i + 1}/{n}: {so_far}")
    return {"items": items, "rows": rows}


ROWS = [  # (row, what it measures, target)
    ("tool", "right tool + schema-valid arguments; no call for small talk", 95),
    ("no call for small talk", "  of which: no call for small talk", None),
    ("exact", "exact argument (places and expressions)", 90),
    *[(f"exact: {k}", f"  places: {k}", None) for k in PLACE_KINDS],
    ("exact: expressions", "  expressions", None),
    ("faithful: weather, unseen result formats",
     "faithful answer, unseen weather result formats", 90),
    ("faithful: calculator result exact", "calculator result stated exactly", 90),
    ("follow-up handled", "follow-up turn: right tool, exact argument, faithful", None),
]


def report(rows: dict[str, list[int]]) -> tuple[str, bool]:
    """The figures as a table, and whether every target is met."""
    lines, ok = [], True
    for key, what, target in ROWS:
        if key not in rows:
            continue
        hit, total = rows[key]
        pct = 100 * hit / total
        missed = "" if target is None or pct >= target else ": MISSED"
        mark = "" if target is None else f"  (target >= {target} %{missed})"
        ok &= target is None or pct >= target
        lines.append(f"  {what:<60} {hit:>4}/{total:<4} {pct:5.1f} %{mark}")
    return "\n".join(lines), ok


def _at_least(low: int | float, kind: type = int):
    """An argparse type: a number >= low, else argparse's own usage error (not a traceback, or 0/0
    later)."""
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
    p = argparse.ArgumentParser(description="Show synthetic conversations, or evaluate a "
                                            "checkpoint's tool use on held-out prompts.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="print a few training conversations exactly as train.py --sft "
                                    "renders them (the trailing assistant header is context only, "
                                    "never trained on)")
    s.add_argument("-n", type=_at_least(1), default=3, help="how many")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    e = sub.add_parser("eval", help="tool use on held-out places, expressions, phrasings and "
                                    "result formats")
    e.add_argument("--ckpt", default="demo", help="checkpoint directory (with tiktoken.model)")
    e.add_argument("-n", type=_at_least(1), default=220,
                   help="number of held-out items (default: %(default)s)")
    e.add_argument("--temperature", type=_at_least(0.0, float), default=0.0,
                   help="sampling temperature (0 = greedy)")
    e.add_argument("--show-failures", type=_at_least(0), default=0,
                   help="print up to N failed items")
    from runtime import add_threads_argument
    add_threads_argument(e)
    a = p.parse_args(argv)
    if a.command == "show":
        from tokenizer import apply_chat_template
        for messages, tools in conversations(a.n, a.seed):
            # add_generation_prompt=True as in training: without it the template drops the
            # last <|im_end|>
            print(apply_chat_template(messages, tools, add_generation_prompt=True), end="\n\n")
        return 0
    from generate import load
    from runtime import set_threads
    threads, why = set_threads(a.threads)
    print(f"{threads} CPU thread(s) ({why})", flush=True)
    try:
        model, tok = load(a.ckpt)
    except (ValueError, OSError) as err:
        # no such folder, no tiktoken.model, damaged weights
        raise SystemExit(f"error: {err}") from None
    t0 = time.perf_counter()
    out = evaluate(model, tok, a.n, a.temperature)
    shown = 0
    for item in out["items"]:
        if shown < a.show_failures and not all(all(s.values()) for s in item["scores"]):
            shown += 1
            print(json.dumps(item["messages"], ensure_ascii=False))
    table, ok = report(out["rows"])
    print(f"held-out items: {a.n} (places, expressions, phrasings and result formats never seen in "
          f"training; greedy={a.temperature == 0}), {time.perf_counter() - t0:.0f} "
          f"s\n{table}\ntargets {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
