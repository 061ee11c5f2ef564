"""Protects generation: sampling (seeded reproducibility, temperature 0 = argmax, the exact token sets top-k/top-p
keep), cached decode == recomputing the whole sequence, stop tokens / stop strings / length, streaming text equal to
decoding all ids, the context-length error, and constrained starts (constrain_start: only allowed first tokens);
the command line (chat on a terminal, greedy for the demo model, train.py run folders, non-finite temperatures),
NaN logits, and the memory check that refuses a too-large checkpoint before allocating it.
Compares against: hand-computed distributions and masks, argmax, and the cache-free twin (use_cache=False).
Run: pytest tests/test_generate.py -q   (CPU, seconds)"""

import pytest
import torch

import generate as G
from conftest import random_model, tiny_args
from tokenizer import Tokenizer

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.1])


def _freqs(n=20000, **kw):
    logits = PROBS.log().expand(n, 4)  # n independent draws from one distribution
    ids = G.sample(logits, generator=torch.Generator().manual_seed(0), **kw)
    return torch.bincount(ids, minlength=4).float() / n


@pytest.mark.parametrize("kw,keep", [
    (dict(temperature=1.0), [0, 1, 2, 3]),
    (dict(temperature=1.0, top_k=3), [0, 1, 2]),
    (dict(temperature=1.0, top_k=1), [0]),
    (dict(temperature=1.0, top_p=0.7), [0, 1]),  # 0.5 < 0.7, then 0.75 >= 0.7: stop after token 1
    (dict(temperature=1.0, top_p=0.75), [0, 1]),  # exactly reaching p is enough
    (dict(temperature=1.0, top_p=0.76), [0, 1, 2]),
    (dict(temperature=1.0, top_p=0.3), [0]),  # the most likely token is always kept
    # top-k first: {.5, .25, .15} renormalised -> .556, .278, .167; before token 2 the mass is .833
    (dict(temperature=1.0, top_k=3, top_p=0.9), [0, 1, 2]),
    (dict(temperature=1.0, top_k=3, top_p=0.8), [0, 1]),
])
def test_top_k_top_p_keep_exactly_the_right_tokens(kw, keep):
    f = _freqs(**kw)
    expect = torch.zeros(4)
    expect[keep] = PROBS[keep] / PROBS[keep].sum()
    assert set(f.nonzero().flatten().tolist()) == set(keep)
    torch.testing.assert_close(f, expect, rtol=0, atol=0.015)


def test_temperature_reshapes_and_zero_is_argmax():
    f = _freqs(temperature=0.5)  # p^(1/T) = p^2 renormalised
    expect = PROBS ** 2 / (PROBS ** 2).sum()
    torch.testing.assert_close(f, expect, rtol=0, atol=0.015)
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(G.sample(logits, temperature=0), logits.argmax(-1))


def test_seed_reproducibility():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    a = [G.sample(logits, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    b = G.sample(logits, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], b)


def test_extreme_temperature_and_top_p_are_greedy_not_nan():
    """A temperature below 1e-5 (vLLM's _SAMPLING_EPS) is greedy: dividing by 1e-300 used to overflow the logits to
    inf and softmax to NaN (multinomial raised); a top_p below fp32's smallest number used to drop every token."""
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(0)
    for kw in (dict(temperature=1e-300), dict(temperature=1e-40), dict(temperature=1.0, top_p=1e-300)):
        assert torch.equal(G.sample(logits, generator=g, **kw), logits.argmax(-1)), kw


def test_constrain_start_masks_until_an_allowed_start_is_complete():
    logits = torch.zeros(2, 6)
    starts = [[1, 2], [1, 3, 4], [5]]

    def kept(generated):  # the tokens a row may still pick, given what it generated
        out = G.constrain_start(logits, torch.tensor([generated], dtype=torch.long).reshape(1, -1), starts)
        return (out[0] > float("-inf")).nonzero().flatten().tolist()

    assert kept([]) == [1, 5] and kept([1]) == [2, 3] and kept([1, 3]) == [4]
    assert kept([1, 2]) == kept([5]) == kept([1, 3, 4, 0]) == list(range(6))  # a start is complete: free
    assert G.constrain_start(logits, torch.zeros(2, 0, dtype=torch.long), []) is logits  # no constraint: untouched
    # in the decode loop: a random model's greedy choices are forced onto one of the starts, then run free
    model = random_model(tiny_args("k2"), seed=4)
    prompt = torch.randint(0, 320, (2, 5), generator=torch.Generator().manual_seed(4))
    free = torch.stack(list(G.generate_tokens(model, prompt, 6, temperature=0)), 1).tolist()
    starts = [[7, 8, 9], [11, 12]]
    assert not any(row[:3] == starts[0] or row[:2] == starts[1] for row in free)  # the constraint does something
    for temperature in (0.0, 1.0):
        got = torch.stack(list(G.generate_tokens(model, prompt, 6, temperature=temperature, allowed_starts=starts,
                                                 generator=torch.Generator().manual_seed(1))), 1).tolist()
        assert all(row[:3] == starts[0] or row[:2] == starts[1] for row in got), got


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="top_p"):
        G.sample(torch.zeros(1, 4), top_p=0.0)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cached_generation_equals_recomputation(temperature):
    args = tiny_args("k2")
    model = random_model(args, seed=3)
    prompt = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(5)
        runs.append(torch.stack(list(G.generate_tokens(model, prompt, 40, temperature=temperature, generator=g,
                                                       use_cache=use_cache)), 1))
    assert runs[0].shape == (2, 40) and torch.equal(runs[0], runs[1])


def test_context_limit_is_a_clear_error():
    model = random_model(tiny_args("k2", max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(10\) = 70 exceeds .* 64"):
        next(G.generate_tokens(model, torch.zeros(1, 60, dtype=torch.long), 10))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


def _model_for(tok, seed=0):
    return random_model(tiny_args("k2", vocab_size=tok.n_vocab), seed=seed)


def test_stream_text_equals_decoded_ids_and_reports_length(tok):
    model = _model_for(tok)
    ids, _ = tok.encode_chat([{"role": "user", "content": "héllo ünïcode 你好"}])
    s = G.TextStream(model, tok, ids, G.SamplingParams(max_new_tokens=30, temperature=1.0, seed=4))
    pieces = list(s)
    raw = torch.stack(list(G.generate_tokens(model, torch.tensor([ids]), 30, temperature=1.0,
                                             generator=torch.Generator().manual_seed(4), stop_ids=tok.stop_ids)))
    raw = raw[:, 0].tolist()
    cut = next((i for i, t in enumerate(raw) if t in tok.stop_ids), len(raw))
    assert "".join(pieces) == s.text == tok.decode(raw[:cut])
    assert s.completion_tokens == min(cut + 1, 30)
    assert s.finish_reason == ("stop" if cut < len(raw) else "length")


def test_stop_token_and_stop_string(tok):
    model = _model_for(tok, seed=1)
    def favour_im_end(module, inputs, out):  # <|im_end|> becomes the most likely token: greedy stops at once
        out[..., tok.im_end_id] += 1e4
    model.lm_head.register_forward_hook(favour_im_end)
    s = G.TextStream(model, tok, [1, 2, 3], G.SamplingParams(max_new_tokens=10, temperature=0))
    assert list(s) == [] and s.finish_reason == "stop" and s.completion_tokens == 1
    model = _model_for(tok, seed=2)
    full = G.TextStream(model, tok, [5, 6, 7], G.SamplingParams(max_new_tokens=40, temperature=0))
    text = "".join(full)
    stop = text[10:13]
    assert len(stop) == 3 and stop not in text[:10]
    cut = G.TextStream(model, tok, [5, 6, 7], G.SamplingParams(max_new_tokens=40, temperature=0, stop=[stop]))
    assert "".join(cut) == text[:text.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("argv, message", [
    (["--device", "foo"], "not a device name"),
    (["--device", "mps"], "no usable Apple GPU"),
    (["--device", "cuda:0"], "no CUDA device"),
    (["--ckpt", "/nonexistent/ckpt"], "does not exist"),
])
def test_cli_bad_input_is_one_line_error(argv, message, capsys):
    """generate.py's command line: a bad device or checkpoint ends with `error: ...`, not a traceback."""
    if "cuda" in argv[-1] and torch.cuda.is_available() or "mps" in argv[-1] and torch.backends.mps.is_available():
        pytest.skip("that device exists here")
    with pytest.raises(SystemExit) as exit_info:
        G.main(argv + ["--prompt", "hi"])
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)


def test_max_new_tokens_below_one_is_an_argparse_error(capsys):
    """A flag out of range is argparse's usage error (exit 2), found before any model is loaded."""
    with pytest.raises(SystemExit) as exit_info:
        G.main(["--max-new-tokens", "0", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--max-new-tokens 0: ask for at least 1 token" in err, err


def test_damaged_checkpoint_is_one_line_error(tmp_path):
    """A *.safetensors file cut short or a config.json that is not JSON: model.from_pretrained names the problem, so
    generate.py (and train.py, serve.py) end with `error: ...` instead of the safetensors reader's traceback."""
    import os
    import shutil
    for name, damage, message in (("model.safetensors", lambda f: os.truncate(f, 1000), "damaged or incomplete"),
                                  ("config.json", lambda f: f.write_text("{"), "is not a JSON config")):
        ckpt = tmp_path / name
        shutil.copytree(G.DEMO_DIR, ckpt)
        damage(ckpt / name)
        with pytest.raises(SystemExit) as exit_info:
            G.main(["--ckpt", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1"])
        assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value), exit_info.value


# ----------------------------------------------------------------------------------------------------------------
# The command line a newcomer meets first, and bad numbers


class _Terminal:
    """A stdin that says it is a terminal and holds these lines."""

    def __init__(self, text: str):
        self.lines = iter(text.splitlines(keepends=True))

    def isatty(self) -> bool:
        return True

    def __iter__(self):
        return self.lines


def test_no_arguments_on_a_terminal_opens_the_chat(monkeypatch, capsys):
    """README: `python generate.py` is "chat with the shipped demo model"; it used to answer one fixed prompt."""
    monkeypatch.setattr("sys.stdin", _Terminal("Hello!\n/clear\n/exit\n"))
    G.main(["--max-new-tokens", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert G.CHAT_BANNER in out and "/clear to start a fresh conversation" in out
    assert out.count("assistant: ") == 1 and "(conversation cleared)" in out and "prompt: " not in out


def test_demo_samples_greedily_by_default_other_checkpoints_at_k2s_temperature(monkeypatch, tmp_path):
    """The demo's accuracy figures are greedy, so its command-line default is greedy; other checkpoints get 0.6."""
    import shutil
    used = []

    class Recorder:  # records the sampling parameters instead of generating
        completion_tokens, seconds, finish_reason = 0, 1.0, "length"

        def __init__(self, model, tok, ids, params):
            used.append(params.temperature)

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(G, "TextStream", Recorder)
    other = tmp_path / "other"
    shutil.copytree(G.DEMO_DIR, other)
    for argv in ([], ["--ckpt", str(other)], ["--temperature", "0.9"]):
        G.main(argv + ["--prompt", "hi", "--max-new-tokens", "1", "--threads", "1"])
    assert used == [0.0, G.DEFAULT_TEMPERATURE, 0.9]


def test_run_folder_loads_its_checkpoint(tmp_path, capsys):
    """`--ckpt runs/NAME` (what train.py --resume takes) used to say there is no tiktoken.model."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(G.DEMO_DIR, run / "ckpt")
    G.main(["--ckpt", str(run), "--prompt", "hi", "--max-new-tokens", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert f"checkpoint: {run / 'ckpt'}" in out and "tokens/s" in out


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5", "-inf"])
def test_bad_temperature_is_an_argparse_error(value, capsys):
    """--temperature nan used to reach torch.multinomial and end in its traceback."""
    with pytest.raises(SystemExit) as exit_info:
        G.main([f"--temperature={value}", "--prompt", "hi", "--max-new-tokens", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --temperature" in err and value in err, err
    with pytest.raises(ValueError, match="finite temperature"):
        G.sample(torch.zeros(1, 4), temperature=float(value))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_weights_are_a_clear_error(temperature):
    """NaN weights give NaN logits: sampling used to fail inside torch.multinomial, and greedy decoding silently
    returned the NaN's index as a token."""
    model = random_model(tiny_args(), seed=0)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN logits"):
        list(G.generate_tokens(model, torch.tensor([[1, 2, 3]]), 2, temperature=temperature,
                               generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("key, value", [("vocab_size", 10**9), ("num_hidden_layers", 10**6)])
def test_huge_config_is_refused_before_allocating(tmp_path, key, value):
    """A config too large for the device is one line naming the sizes, in about a second: it used to allocate for
    minutes (or die in the allocator). A subprocess, so that the old behaviour fails by its timeout, not by hanging."""
    import json
    import shutil
    import subprocess
    import sys
    from conftest import ROOT
    ckpt = tmp_path / "huge"
    shutil.copytree(G.DEMO_DIR, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, key: value}))
    r = subprocess.run([sys.executable, "generate.py", "--ckpt", str(ckpt), "--prompt", "hi"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: the checkpoint") and "Traceback" not in r.stderr
    assert "B parameters" in r.stderr and "GiB" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    if key == "vocab_size":  # serve.py loads through generate.load: the same refusal (it used to die in the allocator)
        import serve
        with pytest.raises(ValueError, match="B parameters: its float32 weights need about"):
            serve.ModelEngine.load(str(ckpt), "cpu", "fp32")
