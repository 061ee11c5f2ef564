"""Protects the project's main job on a fresh machine: the shipped demo model (demo/) loads, `python generate.py`
completes the default prompt when stdin is not a terminal (on a terminal it opens the chat: tests/test_generate.py),
and `python generate.py --chat --tools` answers the README's
"What's the current weather in Tokyo?" with a get_weather tool call, the tool's result, and an answer.
Compares against: tools.get_weather (the answer must carry its result) and the chat template's stop rules.
Run: pytest tests/test_demo.py -q   (CPU, about 20 s; marked slow: end-to-end subprocesses)"""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

import tools as T

pytestmark = pytest.mark.slow


def run(*args, stdin=""):
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_demo_checkpoint_is_small_and_complete():
    demo = ROOT / "demo"
    for name in ("config.json", "model.safetensors", "tiktoken.model"):
        assert (demo / name).exists(), name
    assert (demo / "model.safetensors").stat().st_size < 16 * 2 ** 20
    cfg = json.loads((demo / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["n_routed_experts"] >= 8


def test_generate_without_arguments():
    r = run()
    assert r.returncode == 0, r.stderr
    assert "device: cpu" in r.stdout and "tokens/s" in r.stdout
    body = r.stdout.split("---")[1]
    assert len(body.strip()) > 0


def test_chat_with_tools_answers_the_seed_question():
    r = run("--chat", "--tools", "--seed", "0", "--temperature", "0",
            stdin="What's the current weather in Tokyo?\n/tools\n/exit\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "[tool_call] get_weather(" in out and '"city": "Tokyo"' in out
    assert "[tool_result]" in out
    expect = T.get_weather("Tokyo")
    answer = out.split("[tool_result]")[1]
    assert expect["weather"] in answer and str(expect["temperature_c"]) in answer
    assert "calculator" in out  # /tools lists both built-in tools


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    r = run("--ckpt", str(tmp_path / "nowhere"))
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr
