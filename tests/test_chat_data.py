"""Protects the demo model's synthetic data and its held-out evaluation: the held-out split shares no place name,
expression, request template, small-talk prompt, weather condition or result key name with training (checked by
chat_data.split_overlaps and again here by hand for names and expressions); tool results in the conversations carry
what the real tools compute and the final answers state them; the faithfulness rule of the eval counts numbers as
whole numbers; the basic get_weather example's cities and questions are trained on; generation is deterministic and fits the recipe's
rows; training weather conditions are thousands of arbitrary strings that the answers copy verbatim; training result
formats are composed (key names, nesting, lists, distractors, plain text) and never a held-out key, key set or text
template; a third or more of the conversations have a dependent follow-up turn; `show` prints exactly the text --sft
trains on; the CLI turns bad values into usage errors.
Compares against: tools.get_weather / tools.calculator called directly, hand-written regexes and key lists, the
held-out lists, and tokenizer.encode_chat with add_generation_prompt=True (what data.ChatRows trains on).
Run: pytest tests/test_chat_data.py -q   (CPU, a few seconds)"""
import json
import re

import pytest

import chat_data as C
import recipe
import tools as T
from tokenizer import Tokenizer


def _calls(convs):
    """(tool name, arguments, tool message content, the assistant message after the tool message) of every call."""
    for messages, _ in convs:
        for i, m in enumerate(messages):
            for c in m.get("tool_calls") or []:
                yield (c["function"]["name"], json.loads(c["function"]["arguments"]), messages[i + 1]["content"],
                       messages[i + 2]["content"])


def test_split_overlaps_is_empty_and_every_part_is_held_out():
    overlaps = C.split_overlaps()
    assert set(overlaps) >= {"arguments", "templates", "small talk", "conditions", "result keys", "text results"}
    assert all(not v for v in overlaps.values()), {k: sorted(v)[:5] for k, v in overlaps.items() if v}
    for held in (C.HELD_OUT_CITIES, C.HELD_OUT_WEATHER_ASKS, C.HELD_OUT_CALC_ASKS, C.HELD_OUT_WEATHER_FOLLOW_UPS,
                 C.HELD_OUT_CALC_FOLLOW_UPS, C.HELD_OUT_SMALL_TALK, C.HELD_OUT_CONDITIONS, C.HELD_OUT_TEXT_RESULTS):
        assert len(held) >= 2
    assert set(C.USER_REPORTED_CITIES) <= set(C.HELD_OUT_CITIES)


def test_train_and_held_out_never_overlap():
    convs = C.conversations(3000, seed=0)
    seen_args = [args for _, args, _, _ in _calls(convs)]
    seen_cities = {v for a in seen_args for k, v in a.items() if k in ("city", "location")}
    seen_exprs = {a["expression"] for a in seen_args if "expression" in a}
    user_text = "\n".join(m["content"] for messages, _ in convs for m in messages if m["role"] == "user")
    assert set(C.TRAIN_CITIES).isdisjoint(C.HELD_OUT_CITIES) and len(C.HELD_OUT_CITIES) >= 40
    leaked = [c for c in C.HELD_OUT_CITIES if c in seen_cities or c.lower() in user_text.lower()]
    assert not leaked, f"held-out cities in training: {leaked}"
    items = C.held_out_items(440)
    held_args = {v for item in items for _, _, args in item["turns"] for v in (args or {}).values()}
    held_exprs = {a["expression"] for item in items for _, _, a in item["turns"] if a and "expression" in a}
    assert len(held_exprs) > 100 and not held_exprs & seen_exprs, sorted(held_exprs & seen_exprs)[:5]
    assert not held_args & seen_cities, sorted(held_args & seen_cities)[:5]
    assert {"Tokyo", "Beijing"} <= seen_cities
    assert "What's the current weather in Tokyo?" in user_text  # the README's example question
    kinds = {item.get("place_kind") for item in items}
    assert set(C.PLACE_KINDS) <= kinds  # every kind of name is evaluated


def _number(text):
    return re.search(r"-?\d+(?:\.\d+)?", text).group()


def _answer_facts(answer, city):
    """(condition, temperature) read back out of a weather answer by inverting the answer templates."""
    first = answer.split("°C", 1)[0] + "°C"
    for template in C.WEATHER_ANSWERS:
        head = template.split("{temp}°C", 1)[0] + "{temp}°C"
        pattern = re.escape(head).replace(re.escape("{city}"), re.escape(city))
        pattern = pattern.replace(re.escape("{cond}"), "(?P<cond>.+)")
        pattern = pattern.replace(re.escape("{temp}"), r"(?P<temp>-?\d+(?:\.\d+)?)")
        if m := re.fullmatch(pattern, first, re.DOTALL):
            return m["cond"], m["temp"]
    raise AssertionError(f"no answer template matches {answer!r}")


def _leaves(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, list):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


def _weather_calls(convs):
    for name, args, content, answer in _calls(convs):
        if name not in ("calculator", "calculate", "math_eval"):
            yield args.get("city", args.get("location")), content, answer


def test_tool_results_are_the_real_tools_and_answers_state_them():
    n = 0
    for name, args, content, answer in _calls(C.conversations(600, seed=1)):
        n += 1
        try:
            result = json.loads(content)
        except json.JSONDecodeError:
            result = content  # a plain-text result
        if name in ("calculator", "calculate", "math_eval"):
            expect = T.calculator(args["expression"])["result"]
            got = result if not isinstance(result, dict) else result.get("result", result.get("value"))
            assert got == expect and json.dumps(expect) in answer, (args, content, answer)
            if isinstance(result, dict) and "expression" in result:
                assert result == T.calculator(args["expression"])
            continue
        city = args.get("city", args.get("location"))
        if isinstance(result, dict) and set(result) == {"city", "weather", "temperature_c"}:
            assert result == T.get_weather(city)  # the built-in tool's own shape carries its real values
        assert city in answer
        cond, temp = _answer_facts(answer, city)
        # the answer copies the condition verbatim (a whole string value, the text before the basic example's
        # ", 25°C", or a span of a plain-text result) and the temperature's number
        strings = [v for v in _leaves(result) if isinstance(v, str)]
        assert any(v == cond or v.startswith(cond + ", ") or (isinstance(result, str) and cond in v)
                   for v in strings), (content, answer)
        numbers = {str(v) for v in _leaves(result) if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numbers |= set(re.findall(r"-?\d+(?:\.\d+)?", " ".join(strings)))
        assert temp in numbers, (content, answer)
    assert n > 400


def test_training_conditions_are_thousands_of_arbitrary_strings_copied_exactly():
    import random
    drawn = {C.random_condition(random.Random(i)) for i in range(5000)}
    assert len(drawn) > 3000
    assert any(c.isupper() for c in drawn) and any(c.islower() for c in drawn)
    assert any(not re.fullmatch(r"[\w ]+", c) for c in drawn)  # punctuation, joiners
    assert {len(c.split()) for c in drawn} >= {1, 2, 3, 4}
    held = [h.casefold() for h in C.HELD_OUT_CONDITIONS]
    assert not [c for c in drawn if any(h in c.casefold() for h in held)]
    convs = C.conversations(3000, seed=0)
    conds = {_answer_facts(answer, city)[0] for city, _, answer in _weather_calls(convs)}
    assert len(conds) > 1000  # far more than a list the model could recall
    for i in range(300):  # the answer holds the exact condition string (same case) and temperature
        result, facts = C.weather_result("Oslo", random.Random(i), values=random.Random(-i))
        answer = C.weather_answer("Oslo", facts, result, random.Random(i))
        assert facts[0] in answer and C.states(answer, facts[1]), (facts, answer)
        assert all(C.states(json.dumps(result, ensure_ascii=False), f) for f in facts), (result, facts)


def _keys(x):
    if isinstance(x, dict):
        for k, v in x.items():
            yield k
            yield from _keys(v)
    elif isinstance(x, list):
        for v in x:
            yield from _keys(v)


def test_training_result_formats_are_composed_and_never_the_held_out_ones():
    train_sets, train_keys, depths, texts = set(), set(), set(), 0
    for _, content, _ in _weather_calls(C.conversations(3000, seed=0)):
        try:
            result = json.loads(content)
        except json.JSONDecodeError:
            result = content
        if isinstance(result, str):
            texts += 1
            assert not any(re.fullmatch(p, result) for p in C._HELD_TEXT_PATTERNS), result
            continue
        keys = set(_keys(result))
        train_sets.add(frozenset(keys))
        train_keys |= keys
        depth, x = 0, result
        while isinstance(x, (dict, list)) and len(x) and not any(isinstance(v, str) for v in
                                                                    (x.values() if isinstance(x, dict) else x)):
            x = next(iter(x.values())) if isinstance(x, dict) else x[0]
            depth += 1
        depths.add(depth)
    assert len(train_keys) > 500 and len(train_sets) > 500 and texts > 100
    assert {0, 1, 2} <= depths
    assert any("_" in k for k in train_keys) and any(re.search(r"[a-z][A-Z]", k) for k in train_keys)
    held_keys = set(C.HELD_OUT_PLACE_KEYS + C.HELD_OUT_COND_KEYS + C.HELD_OUT_TEMP_KEYS + C.HELD_OUT_WRAPPERS) | set(
        C.HELD_OUT_EXTRAS)
    assert not train_keys & held_keys, sorted(train_keys & held_keys)
    import random
    for item in C.held_out_items(110):  # each held-out item's result shape, as eval_registry draws it
        result, _ = C.weather_result("Oslo", random.Random(item["shape_seed"]), held_out=True)
        if not isinstance(result, str):
            assert frozenset(_keys(result)) not in train_sets and not set(_keys(result)) & train_keys, result


def test_many_conversations_have_a_dependent_follow_up_turn():
    convs = C.conversations(2000, seed=2)
    follow, after_calc = 0, 0
    for messages, _ in convs:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(users) < 2 or not messages[users[1] + 1].get("tool_calls"):
            continue
        first = messages[users[0] + 1]["tool_calls"][0]["function"]
        second = messages[users[1] + 1]["tool_calls"][0]["function"]
        new_arg = next(iter(json.loads(second["arguments"]).values()))
        assert new_arg in messages[users[1]]["content"]  # the new argument is the second turn's
        follow += 1
        after_calc += first["name"] in ("calculator", "calculate", "math_eval") and "weather" in second["name"]
    assert follow > 0.3 * len(convs) and after_calc > 0.02 * len(convs), (follow, after_calc)


def test_faithfulness_rule_counts_whole_numbers_and_ignores_case():
    assert C.states("It is 7°C.", "7") and C.states("Light Rain, 7 C", "light rain")
    assert not C.states("It is 17°C.", "7") and not C.states("It is 7.5°C.", "7")
    assert not C.states("It is 3°C.", "-3") and not C.states("It is -3°C.", "3")
    assert C.states("-3.5 degrees", "-3.5") and not C.states("rain", "light rain")


def test_eval_results_use_only_held_out_shapes():
    train_keys = set(C.PLACE_KEYS + C.COND_KEYS + C.TEMP_KEYS + C.WRAPPERS) | set(C.EXTRAS) | set(
        C.COND_KEY_POOL + C.TEMP_KEY_POOL + C.PLACE_KEY_POOL + C.WRAPPER_POOL + C.NUMBER_EXTRAS + C.TEXT_EXTRAS)
    for item in C.held_out_items(110):
        registry, facts = C.eval_registry(item["shape_seed"])
        for _, name, args in item["turns"]:
            if name == "get_weather":
                content, ok = T.run_call(registry, T.ToolCall(id="functions.get_weather:0", name=name,
                                                              raw_arguments=json.dumps(args), arguments=args))
                assert ok, content
                keys = set(re.findall(r'"(\w+)":', content))
                assert not keys & train_keys, (content, keys & train_keys)
                assert all(C.states(content, f) for f in facts[-1])  # the facts are in the result


def test_deterministic_renderable_and_fit_the_recipe_rows():
    a, b = C.conversations(300, seed=3), C.conversations(300, seed=3)
    assert a == b and a != C.conversations(300, seed=4)
    assert C.held_out_items(44) == C.held_out_items(44)
    tok = Tokenizer.load()
    row = int(recipe.RECIPE_SFT[recipe.RECIPE_SFT.index("--seq-len") + 1])
    lengths = []
    for messages, tools in a:
        ids, mask = tok.encode_chat(messages, tools, add_generation_prompt=True)
        assert any(mask)
        lengths.append(len(ids))
    assert sum(n > row for n in lengths) <= 0.01 * len(lengths), max(lengths)  # almost none dropped in training


def test_cli_rejects_bad_values_and_missing_checkpoints(tmp_path, capsys):
    for argv in (["eval", "-n", "0"], ["eval", "-n", "-3"], ["show", "-n", "-1"], ["eval", "--temperature", "-1"],
                 ["eval", "--temperature", "inf"]):  # inf: a ValueError traceback from generate.sample
        with pytest.raises(SystemExit) as exc:  # argparse's usage error, not a ZeroDivisionError after loading
            C.main(argv)
        assert exc.value.code == 2, argv
    with pytest.raises(SystemExit) as exc:  # was a FileNotFoundError traceback
        C.main(["eval", "--ckpt", str(tmp_path / "missing"), "-n", "1"])
    # SystemExit("error: ..."): that one line on stderr, exit status 1
    assert isinstance(exc.value.code, str) and exc.value.code.startswith("error: "), exc.value.code


def test_show_prints_what_sft_trains_on(capsys):
    assert C.main(["show", "-n", "2", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    tok = Tokenizer.load()
    for (messages, tools), shown in zip(C.conversations(2, seed=5), out.split("\n\n")):
        ids, _ = tok.encode_chat(messages, tools, add_generation_prompt=True)  # data.ChatRows' call
        assert shown == tok.decode(ids)  # including the last turn's <|im_end|>, which the model learns to stop with
