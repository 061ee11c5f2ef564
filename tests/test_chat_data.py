"""Protects the demo model's synthetic data: held-out cities and expressions never appear in training, tool results
in the conversations are what the real tools return, the seed's cities are trained on, generation is deterministic,
`show` prints exactly the text --sft trains on, and the CLI turns bad values into usage errors.
Compares against: tools.get_weather / tools.calculator called directly, the held-out lists, and
tokenizer.encode_chat with add_generation_prompt=True (what train.ChatRows trains on).
Run: pytest tests/test_chat_data.py -q   (CPU, about a second)"""
import json

import pytest

import chat_data as C
import tools as T
from tokenizer import Tokenizer


def test_train_and_held_out_never_overlap():
    convs = C.conversations(3000, seed=0)
    seen_args = [json.loads(m["tool_calls"][0]["function"]["arguments"])
                 for messages, _ in convs for m in messages if m.get("tool_calls")]
    seen_cities = {a["city"] for a in seen_args if "city" in a}
    seen_exprs = {a["expression"] for a in seen_args if "expression" in a}
    user_text = "\n".join(m["content"] for messages, _ in convs for m in messages if m["role"] == "user")
    assert set(C.TRAIN_CITIES).isdisjoint(C.HELD_OUT_CITIES) and len(C.HELD_OUT_CITIES) >= 40
    leaked = [c for c in C.HELD_OUT_CITIES if c in seen_cities or f" {c}" in user_text]
    assert not leaked, f"held-out cities in training: {leaked}"
    held_exprs = {a["expression"] for _, name, a in C.held_out_prompts(200) if name == "calculator"}
    assert len(held_exprs) > 50 and not held_exprs & seen_exprs, sorted(held_exprs & seen_exprs)[:5]
    assert {"Tokyo", "Beijing"} <= seen_cities


def test_tool_results_are_the_real_tools_and_answers_contain_them():
    for messages, tools in C.conversations(300, seed=1):
        calls = [m for m in messages if m.get("tool_calls")]
        for call in calls:
            i = messages.index(call)
            fn = call["tool_calls"][0]["function"]
            args = json.loads(fn["arguments"])
            expect = T.get_weather(**args) if fn["name"] == "get_weather" else T.calculator(**args)
            assert json.loads(messages[i + 1]["content"]) == expect
            final = messages[-1]["content"]
            values = [expect["weather"], str(expect["temperature_c"])] if fn["name"] == "get_weather" \
                else [str(expect["result"])]
            assert all(v in final for v in values)


def test_deterministic_and_renderable():
    a, b = C.conversations(50, seed=3), C.conversations(50, seed=3)
    assert a == b and a != C.conversations(50, seed=4)
    tok = Tokenizer.load()
    for messages, tools in a:
        ids, mask = tok.encode_chat(messages, tools)
        assert any(mask) and len(ids) < 512


def test_cli_rejects_bad_values_and_missing_checkpoints(tmp_path, capsys):
    for argv in (["eval", "-n", "0"], ["eval", "-n", "-3"], ["show", "-n", "-1"], ["eval", "--temperature", "-1"],
                 ["eval", "--temperature", "inf"]):  # inf: a ValueError traceback from generate.sample
        with pytest.raises(SystemExit) as exc:  # argparse's usage error, not a ZeroDivisionError after loading
            C.main(argv)
        assert exc.value.code == 2, argv
    capsys.readouterr()
    assert C.main(["eval", "--ckpt", str(tmp_path / "missing"), "-n", "1"]) == 1  # was a FileNotFoundError traceback
    assert capsys.readouterr().err.startswith("error: ")


def test_show_prints_what_sft_trains_on(capsys):
    assert C.main(["show", "-n", "2", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    tok = Tokenizer.load()
    for (messages, tools), shown in zip(C.conversations(2, seed=5), out.split("\n\n")):
        ids, _ = tok.encode_chat(messages, tools, add_generation_prompt=True)  # train.ChatRows' call
        assert shown == tok.decode(ids)  # including the last turn's <|im_end|>, which the model learns to stop with
