"""Protects recipe.py, the demo model's recipe behind `python train.py recipe`: every stage runs
(tokenizer -> pretraining -> fine-tuning -> export -> held-out evaluation), and a second invocation
skips the finished stages and writes the same export again.
Compares against: the first invocation's files (the exported weights, bit for bit).
Everything runs at toy size (the `tiny` preset, a byte-level tokenizer and a ~120 KB corpus slice
from tests/test_train.py's fixture), so nothing is downloaded.
Run: pytest tests/test_recipe.py -q   (CPU, seconds)
"""
import pytest

import recipe
import train
# fixtures: the byte-level tokenizer and the corpus slice; the process-wide thread count given back
from test_train import _restore_threads, files  # noqa: F401


@pytest.mark.slow
def test_recipe_runs_every_stage_and_keeps_finished_ones(files, tmp_path, monkeypatch, capsys):
    """`train.py recipe` at toy size: tokenizer -> pretraining -> fine-tuning -> export -> eval;
    run again, every finished stage is skipped and the export and eval are written again from the
    same weights."""
    corpus = str(files["corpus"])
    monkeypatch.setattr(recipe, "RECIPE_TOKENIZER", ["--vocab-size", "256", "--corpus", corpus])
    monkeypatch.setattr(recipe, "RECIPE_PRETRAIN", [
        "--config", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
        "--data", corpus, "--data-cache", str(files["cache"])])
    # seq-len 2048: with byte-level tokens a conversation is several times longer than with the
    # recipe's 4,096-rank tokenizer (the longest composed weather results reach ~1,400 bytes)
    monkeypatch.setattr(recipe, "RECIPE_SFT", [
        "--sft", "--steps", "2", "--batch-size", "1", "--seq-len", "2048",
        "--sft-conversations", "20"])
    out = tmp_path / "recipe"
    argv = ["recipe", "--out", str(out), "--eval-items", "2", "--threads", "1"]
    assert train.main(argv) == 0
    first = capsys.readouterr().out
    for stage in ("tokenizer:", "pretraining:", "fine-tuning:", "export:", "evaluation:"):
        assert f"[recipe] {stage}" in first
    model_files = {p.name for p in (out / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tiktoken.model"} <= model_files
    assert (out / "model" / "tiktoken.model").read_bytes() == (out / "tiktoken.model").read_bytes()
    table = (out / "eval.txt").read_text()
    assert "right tool" in table and "stage times" in table
    weights = (out / "model" / "model.safetensors").read_bytes()
    assert train.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier") == 3 and "step " not in again
    assert (out / "model" / "model.safetensors").read_bytes() == weights
