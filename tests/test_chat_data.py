"""Protects the demo model's synthetic data and its held-out evaluation: the held-out split shares no place name,
expression, request template, small-talk prompt, weather condition or result key name with training (checked by
chat_data.split_overlaps and again here by hand for names and expressions); tool results in the conversations carry
what the real tools compute and the final answers state them; the faithfulness rule of the eval counts numbers as
whole numbers; the basic get_weather example's cities and questions are trained on; generation is deterministic and fits the recipe's
rows; `show` prints exactly the text --sft trains on; the CLI turns bad values into usage errors.
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
    assert set(overlaps) >= {"arguments", "templates", "small talk", "conditions", "result keys"}
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
        leaves = []  # (key, value) of every leaf, nested or not

        def walk(x, key=None):
            if isinstance(x, dict):
                for k, v in x.items():
                    walk(v, k if not isinstance(v, dict) or k not in C.TEMP_KEYS else k)
            elif isinstance(x, list):
                for v in x:
                    walk(v, key)
            else:
                leaves.append((key, x))
        walk(result)
        cond = [v for k, v in leaves if k in C.COND_KEYS or k == "text"] if not isinstance(result, str) else []
        temps = [str(v) for k, v in leaves if k in C.TEMP_KEYS]
        for c in cond:
            if re.search(r"-?\d", str(c)):  # the basic example's "Sunny, 25°C": condition and degrees in one string
                c, t = str(c).rsplit(", ", 1)
                temps.append(t)
            assert c.lower() in answer.lower(), (content, answer)
        for t in temps:
            assert re.search(rf"(?<![\d.]){re.escape(_number(t))}(?![\d])", answer), (content, answer)
        if isinstance(result, str):
            assert _number(result) in answer
        assert city in answer
    assert n > 400


def test_faithfulness_rule_counts_whole_numbers_and_ignores_case():
    assert C.states("It is 7°C.", "7") and C.states("Light Rain, 7 C", "light rain")
    assert not C.states("It is 17°C.", "7") and not C.states("It is 7.5°C.", "7")
    assert not C.states("It is 3°C.", "-3") and not C.states("It is -3°C.", "3")
    assert C.states("-3.5 degrees", "-3.5") and not C.states("rain", "light rain")


def test_eval_results_use_only_held_out_shapes():
    train_keys = set(C.PLACE_KEYS + C.COND_KEYS + C.TEMP_KEYS + C.WRAPPERS) | set(C.EXTRAS)
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
