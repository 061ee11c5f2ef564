"""Protects data.py: the cached token file (built once, keyed by the tokenizer's and the text's
content, uint16 when the vocabulary fits), the seeded training windows and their held-out tail, SFT
packing and its loss mask, and what a corpus on disk can hold: binary and non-UTF-8 files.
Compares against: tokenizer.encode on the same text; hand-computed window offsets; an SFT loss
recomputed here position by position, with the supervised spans found from the chat markers rather
than from encode_chat's mask.
Everything uses a byte-level tokenizer built here (256 ranks) on a ~120 KB slice of the default
corpus (the standard library's source), so nothing is downloaded.
Run: pytest tests/test_data.py -q   (CPU, a few seconds)
"""
import os

import numpy as np
import pytest
import torch

import data as D
import model as M
import tokenizer as tk
import train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    tok_path = d / "bytes.tiktoken"
    tk.save_ranks({bytes([i]): i for i in range(256)}, tok_path)  # byte-level: ids = bytes, no merges
    corpus = d / "slice.py"
    # the first files of the stdlib, sorted
    corpus.write_text(tk.read_corpus(max_bytes=120_000), encoding="utf-8")
    return dict(dir=d, tok=tok_path, corpus=corpus)


# --------------------------------------------------------------------------------------------------
# pretraining data: corpus -> token file -> windows


def test_token_cache_is_built_once_and_keyed_by_content(files, tmp_path):
    tok = tk.Tokenizer.load(files["tok"])
    arr, info = D.prepare_tokens(files["tok"], [str(files["corpus"])], cache_dir=tmp_path)
    assert not info["cached"] and arr.dtype == np.uint16  # 512 ids fit 16 bits
    assert np.array_equal(arr, tok.encode(files["corpus"].read_text(encoding="utf-8")))  # the same text, encoded
    again, info2 = D.prepare_tokens(files["tok"], [str(files["corpus"])], cache_dir=tmp_path)
    assert info2["cached"] and info2["path"] == info["path"] and np.array_equal(again, arr)
    edited = tmp_path / "edited.py"
    edited.write_text(files["corpus"].read_text(encoding="utf-8") + "\nx = 1\n", encoding="utf-8")
    _, info3 = D.prepare_tokens(files["tok"], [str(edited)], cache_dir=tmp_path)
    assert not info3["cached"] and info3["path"] != info["path"]  # a changed corpus re-tokenizes
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # atomic writes leave no temporaries
    assert D.token_dtype(163_840) == np.uint32 and D.token_dtype(65_536) == np.uint16


def test_corpus_skips_binary_files_and_names_non_utf8_text(files, tmp_path, capsys):
    folder = tmp_path / "src"
    (folder / "__pycache__").mkdir(parents=True)
    (folder / "a.py").write_text("def f():\n    return 1\n" * 50, encoding="utf-8")
    (folder / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0" + bytes(range(256)))
    latin = tmp_path / "notes.txt"
    latin.write_bytes("café résumé naïve\n".encode("latin-1") * 20)
    _, info = D.prepare_tokens(files["tok"], [str(folder), str(latin)], cache_dir=tmp_path / "cache")
    out = capsys.readouterr().out
    assert "skipped 1 binary file" in out and "a.cpython-311.pyc" in out  # the .pyc never became training text
    assert "not valid UTF-8" in out and "notes.txt" in out
    text = tk.read_corpus([folder / "a.py", latin])
    assert info["text_sha256"] == D._sha256(text.encode("utf-8", "surrogatepass"))
    with pytest.raises(ValueError, match="is a binary file"):  # named directly: an error, not a skip
        D.prepare_tokens(files["tok"], [str(folder / "__pycache__" / "a.cpython-311.pyc")], cache_dir=tmp_path)
    (folder / "a.py").unlink()
    with pytest.raises(ValueError, match=r"corpus is empty: no text files .*1 binary file\(s\) skipped"):
        D.prepare_tokens(files["tok"], [str(folder)], cache_dir=tmp_path)
    # --data-max-bytes: the files after the cut are not read, nor reported
    assert D.corpus_files([str(files["corpus"]), str(latin)], max_bytes=1000) == [files["corpus"]]


def test_windows_are_seeded_shifted_and_split():
    tokens = np.arange(1000, dtype=np.uint16)
    w = D.TokenWindows(tokens, seq_len=16, batch_size=4, val_fraction=0.1, seed=3, val_batches=2)
    assert len(w.val) == 100 and w.val[0] == 900  # the held-out tail
    x, y, m = w.sample()
    assert x.shape == (4, 16) and torch.equal(y[:, :-1], x[:, 1:]) and bool(m.all())
    assert int(y.max()) < 900  # training windows never reach into the validation tokens
    state = w.state()
    nxt = w.sample()
    w.load_state(state)
    assert all(torch.equal(a, b) for a, b in zip(nxt, w.sample()))  # the sampler state replays exactly
    vx = torch.cat([b[0] for b in w.val_batches()])
    assert vx.shape == (6, 16) and vx[1, 0] == 916  # (100-1)//16 = 6 non-overlapping windows, stride 16


# --------------------------------------------------------------------------------------------------
# fine-tuning data: conversations -> packed rows with a loss mask


CONVS = [
    ([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, I am Kimi."}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
      {"role": "assistant", "content": "6"}], None),
    ([{"role": "user", "content": "Weather in Oslo?"},
      {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
          "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
      {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "{\"temp_c\": 3}"},
      {"role": "assistant", "content": "It is 3 C in Oslo."}],
     [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {
         "type": "object", "properties": {"city": {"type": "string"}}}}}]),
] * 3  # 9 conversations: 8 train (packed several to a row), 1 held out


def assistant_spans(row: np.ndarray, tok: tk.Tokenizer) -> np.ndarray:
    """The mask, derived independently from the markers: after every `<|im_assistant|>NAME<|im_middle|>` header,
    every token up to and including the next <|im_end|> was written by the assistant. A header followed by another
    turn's header instead (the generation prompt that ends each conversation) supervises nothing."""
    headers = {tok.im_system_id, tok.im_user_id, tok.im_assistant_id}
    sup = np.zeros(len(row), dtype=bool)
    i = 0
    while i < len(row):
        if row[i] == tok.im_assistant_id:
            j = i + 1
            while j < len(row) and row[j] != tok.im_middle_id:
                j += 1
            k = j + 1
            while k < len(row) and row[k] != tok.im_end_id and row[k] not in headers:
                k += 1
            if k < len(row) and row[k] == tok.im_end_id:
                sup[j + 1:k + 1] = True
                i = k + 1
            else:
                i = k
            continue
        i += 1
    return sup


def test_sft_loss_counts_only_assistant_tokens(files):
    tok = tk.Tokenizer.load(files["tok"])
    data = D.ChatRows(tok, CONVS, seq_len=600, batch_size=4, val_fraction=0.1, seed=0)
    assert len(data.train_ids) < data.n_train_convs  # packed: several conversations share a row
    for ids, mask in zip(data.train_ids, data.train_mask):
        assert np.array_equal(mask.astype(bool), assistant_spans(ids, tok))
        assert not mask[ids == tok.pad_id].any()  # padding never counts
    torch.manual_seed(0)
    model = M.Transformer(M.PRESETS["tiny"]()).eval()
    x, y, w = data._split(data.train_ids, data.train_mask)  # the exact tensors the trainer feeds
    with torch.no_grad():
        logits = model(x)
        ours = (train.weighted_ce_sum(logits, y, w) / w.sum()).item()
        logp = torch.log_softmax(logits.double(), -1)
    total, count = 0.0, 0
    for r, row in enumerate(data.train_ids):  # reference: a plain loop over the positions the markers supervise
        sup = assistant_spans(row, tok)
        for t in range(len(row) - 1):
            if sup[t + 1]:
                total -= logp[r, t, row[t + 1]].item()
                count += 1
    assert count == int(data.train_mask[:, 1:].sum()) and count > 0
    assert ours == pytest.approx(total / count, rel=1e-6)  # fp32 sum of ~300 terms vs fp64
