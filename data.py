"""Where training tokens come from: a corpus becomes a token file, conversations become masked rows.

Pretraining tokenizes a corpus (default: the Python standard library's own source,
tokenizer.read_corpus; or any files and folders given with --data) ONCE into a flat binary token
file, cached under data/ and named by hashes of the tokenizer file and of the text, so changing
either re-tokenizes. TokenWindows draws training windows of --seq-len+1 tokens at random offsets
with a seeded NumPy generator and holds out the last --val-fraction of the tokens for validation.

Fine-tuning (`train.py --sft`) encodes conversations (chat_data.conversations, or a JSONL file) with
tokenizer.encode_chat, which also returns the loss mask: 1 on what the assistant wrote, 0 on the
rest. pack_conversations packs whole conversations into rows of --seq-len+1 tokens (the rest
padded), and ChatRows draws rows from them; the target of position t is token t+1, weighted by
mask[t+1].

Both samplers give the trainer the same three things: sample() -> one micro-batch (x, y, w),
val_batches() -> the fixed validation set, and state()/load_state() -> the sampler's RNG state,
which a checkpoint saves so that a resumed run draws the very batches an uninterrupted one would.

What is checked on the way in: a binary file inside a --data folder is skipped and a non-UTF-8 one
named (tokenizer.read_corpus would otherwise decode either into garbage without a word); a JSONL
line that is not a conversation is an error naming its line.

Shapes: B batch (sequences per micro-batch), T tokens per sequence (--seq-len), N tokens in the
corpus, R packed rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

import checkpoint
import parallel
import tokenizer as tk

ROOT = Path(__file__).resolve().parent
# the token cache; gitignored (/data/)
DATA_DIR = ROOT / "data"
# print() on rank 0 only: under torchrun every rank reads the data, one speaks for them all
say = parallel.print0


# --------------------------------------------------------------------------------------------------
# 1. Pretraining data: corpus -> cached token file -> random windows


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def token_dtype(n_vocab: int) -> np.dtype:
    """uint16 when every id fits (half the disk and memory), else uint32 (K2's 163,840 ids do not
    fit 16 bits)."""
    return np.dtype(np.uint16) if n_vocab <= 1 << 16 else np.dtype(np.uint32)


def corpus_files(paths: Sequence[str], max_bytes: int | None = None) -> list[Path]:
    """The files of --data, folders expanded as tokenizer.read_corpus does, checked before anything
    is tokenized.

    read_corpus decodes every file with errors="replace", so a .pyc or a PNG in a folder, or a
    Latin-1 text, would silently become training text. Here a binary file (a NUL byte, git's test;
    UTF-16 text has them too) named directly is an error, one found inside a folder is skipped with
    a note, and a file that is not valid UTF-8 gets a note naming it. With max_bytes, files past the
    first max_bytes are neither read nor reported.
    """
    named = {Path(p) for p in paths}
    keep, binary, not_utf8, total = [], [], [], 0
    for f in tk._expand(paths):  # raises FileNotFoundError naming a missing path
        if max_bytes is not None and total >= max_bytes:
            # the text before this file is already max_bytes long (U+FFFD only lengthens it):
            # none is read
            break
        data = f.read_bytes()
        if b"\0" in data:
            if f in named:
                raise ValueError(f"--data {f} is a binary file (it has NUL bytes; UTF-16 text has "
                                 "them too); give text files in UTF-8")
            binary.append(f)
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            not_utf8.append(f)
        total += len(data) + (1 if keep else 0)  # + the newline read_corpus puts between two files
        keep.append(f)
    if binary:
        say(f"note: skipped {len(binary)} binary file(s) under --data (NUL bytes), "
            f"e.g. {binary[0]}")
    if not_utf8:
        say(f"note: {len(not_utf8)} file(s) are not valid UTF-8, e.g. {not_utf8[0]}: their "
            "undecodable bytes become U+FFFD in the training text; convert them to UTF-8 first "
            "(e.g. `iconv -f latin1 -t utf-8`)")
    if not keep:
        skipped = f" ({len(binary)} binary file(s) skipped)" if binary else ""
        raise ValueError(f"corpus is empty: no text files under {', '.join(map(str, paths))}"
                         f"{skipped}; give files of text")
    return keep


def prepare_tokens(tokenizer_path: str | os.PathLike, data: Sequence[str] | None = None,
                   max_bytes: int | None = None,
                   cache_dir: str | os.PathLike = DATA_DIR) -> tuple[np.ndarray, dict]:
    """Tokenize the corpus once and cache it; returns (tokens (N,) uint16/uint32 memmap, info dict).

    The cache file's name holds hashes of the tokenizer file's bytes and of the corpus text, so any
    change to either re-tokenizes, and two corpora never share a file. The text is read every time
    (a few seconds for the default corpus) because hashing it is the only reliable way to notice an
    edit. Raises ValueError / FileNotFoundError naming the problem for a missing, empty or binary
    corpus (corpus_files).
    """
    tok_bytes = Path(tokenizer_path).read_bytes()
    # None: the standard library's *.py files
    files = None if data is None else corpus_files(data, max_bytes)
    try:
        # raises for missing paths and empty corpora
        text = tk.read_corpus(files, max_bytes=max_bytes)
    except ValueError:
        if data is None:
            raise
        within = f" within --data-max-bytes {max_bytes}" if max_bytes is not None else ""
        raise ValueError(f"corpus is empty: {len(files)} file(s) under "
                         f"{', '.join(map(str, data))} hold no text{within}") from None
    text_sha256 = _sha256(text.encode("utf-8", "surrogatepass"))
    tok_hash, text_hash = _sha256(tok_bytes)[:8], text_sha256[:12]
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"
    label = f"stdlib-{py}" if data is None else "custom"
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{label}-{Path(tokenizer_path).stem}{tok_hash}-{text_hash}"
    bin_path, meta_path = cache_dir / f"{stem}.bin", cache_dir / f"{stem}.json"
    if bin_path.exists() and meta_path.exists():
        try:
            info = json.loads(meta_path.read_text())
            dtype = np.dtype(info["dtype"])
            complete = bin_path.stat().st_size == info["n_tokens"] * dtype.itemsize
        except (ValueError, KeyError, TypeError):
            # a damaged metadata file: tokenize again and replace it
            complete = False
        if complete:
            info.update(path=str(bin_path), cached=True)
            return np.memmap(bin_path, dtype=dtype, mode="r"), info
    tok = tk.Tokenizer.load(tokenizer_path)
    t0 = time.perf_counter()
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    if ids.size == 0:
        raise ValueError("the corpus encodes to zero tokens; give files with text in them")
    dtype = token_dtype(tok.n_vocab)
    arr = ids.astype(dtype)
    # the data first, then the metadata that vouches for it
    checkpoint.write_atomically(bin_path, arr.tofile)
    info = dict(n_tokens=int(arr.size), dtype=dtype.name, n_vocab=tok.n_vocab,
                tokenizer=str(tokenizer_path), tokenizer_sha256=_sha256(tok_bytes),
                text_sha256=text_sha256, chars=len(text),
                corpus=label if data is None else [str(p) for p in data], max_bytes=max_bytes,
                python=sys.version.split()[0], seconds=round(time.perf_counter() - t0, 2))
    checkpoint.write_atomically(meta_path, lambda p: p.write_text(json.dumps(info, indent=1)))
    info.update(path=str(bin_path), cached=False)
    return np.memmap(bin_path, dtype=dtype, mode="r"), info


class TokenWindows:
    """Training windows from a flat token array: train split = all but the last val_fraction,
    sampled at uniformly random offsets by a seeded NumPy generator (its state is the sampler state
    a checkpoint saves); validation = fixed non-overlapping windows of the held-out tail, the same
    every time."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, val_fraction: float,
                 seed: int, val_batches: int):
        n, T = len(tokens), seq_len
        n_val = int(round(n * val_fraction))
        if n_val < T + 1 or n - n_val < T + 1:
            raise ValueError(
                f"--seq-len {T} needs at least {T + 1} tokens in each split, but the corpus has "
                f"{n:,} tokens: {n - n_val:,} for training and {n_val:,} for validation "
                f"(--val-fraction {val_fraction}); "
                "give more text (--data), lower --seq-len, or change --val-fraction")
        self.train, self.val = tokens[:n - n_val], tokens[n - n_val:]
        self.T, self.B = T, batch_size
        self.rng = np.random.default_rng(seed)
        n_windows = min((len(self.val) - 1) // T, val_batches * batch_size)
        # stride T: every validation target is scored once
        self.val_starts = np.arange(n_windows) * T

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One micro-batch: inputs x (B, T), targets y (B, T) = x shifted by one, weights w (B, T)
        all 1."""
        # (B,) last valid start: n - T - 1
        starts = self.rng.integers(0, len(self.train) - self.T, size=self.B)
        rows = np.stack([self.train[s:s + self.T + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:], torch.ones(self.B, self.T)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.val_starts), self.B):
            starts = self.val_starts[i:i + self.B]
            rows = np.stack([self.val[s:s + self.T + 1] for s in starts]).astype(np.int64)
            rows = torch.from_numpy(rows)  # (b, T+1)
            yield rows[:, :-1], rows[:, 1:], torch.ones(rows.shape[0], self.T)

    def state(self) -> dict:
        return {"kind": "windows", "rng": self.rng.bit_generator.state}

    def load_state(self, s: dict) -> None:
        self.rng.bit_generator.state = s["rng"]


# --------------------------------------------------------------------------------------------------
# 2. Supervised fine-tuning data: conversations -> packed rows with a loss mask


def load_conversations(path: str | None, n: int,
                       seed: int) -> list[tuple[list[dict], list[dict] | None]]:
    """(messages, tools-or-None) pairs: from a JSONL file of {"messages": [...], "tools": [...]} or,
    without a path, chat_data.conversations(n, seed) (the demo model's synthetic chats)."""
    if path is None:
        import chat_data
        return chat_data.conversations(n, seed)
    p = Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"--data {p} {what}; with --sft give one JSONL file of "
                                '{"messages": [...], "tools": [...]} lines, or no --data for the '
                                "built-in chats")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{p} is not UTF-8 text (byte {err.start}: {err.reason}); "
                         "JSONL files are UTF-8") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}:{i} is not JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
            raise ValueError(f'{p}:{i} needs an object with a "messages" list, got {line[:80]!r}')
        tools = rec.get("tools") or None
        # render it once here, so that a malformed message is reported with its line,
        # not as conversation #k
        try:
            tk.apply_chat_template(rec["messages"], tools, add_generation_prompt=True)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{p}:{i}: {err}") from None
        out.append((rec["messages"], tools))
    if not out:
        raise ValueError(f"{p} holds no conversations")
    return out


def pack_conversations(encoded: Sequence[tuple[list[int], list[int]]], row_len: int, pad_id: int,
                       pack: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Whole conversations into rows of row_len tokens, first fit in order; the rest of a row is
    pad_id with mask 0.

    Returns (ids (R, row_len) int64, mask (R, row_len) int8, dropped): conversations longer than a
    row are dropped (cutting one would train the model on answers without their question), and so
    are ones with no supervised token. Packing lets a conversation attend to the one before it in
    its row; each starts with its own system turn, which is the usual simplification (no
    per-document attention mask). pack=False: one conversation per row.
    """
    rows: list[tuple[list[int], list[int]]] = []
    dropped = 0
    for ids, mask in encoded:
        if len(ids) > row_len or not any(mask):
            dropped += 1
            continue
        target = next((r for r in rows if len(r[0]) + len(ids) <= row_len), None) if pack else None
        if target is None:
            target = ([], [])
            rows.append(target)
        target[0].extend(ids)
        target[1].extend(mask)
    out_ids = np.full((len(rows), row_len), pad_id, dtype=np.int64)
    out_mask = np.zeros((len(rows), row_len), dtype=np.int8)
    for r, (ids, mask) in enumerate(rows):
        out_ids[r, :len(ids)] = ids
        out_mask[r, :len(mask)] = mask
    return out_ids, out_mask, dropped


class ChatRows:
    """SFT batches: rows of packed conversations drawn with replacement by a seeded generator. The
    target of input position t is token t+1 and its weight is mask[t+1], so the loss covers exactly
    the assistant's tokens; padding has mask 0 and never counts."""

    def __init__(self, tok: tk.Tokenizer, convs: Sequence, seq_len: int, batch_size: int,
                 val_fraction: float, seed: int, pack: bool = True):
        n_val = max(1, int(round(len(convs) * val_fraction)))
        if len(convs) < 2:
            raise ValueError("--sft needs at least 2 conversations (one held out for validation), "
                             f"got {len(convs)}")
        encoded = [tok.encode_chat(m, t, add_generation_prompt=True) for m, t in convs]
        longest = max(len(ids) for ids, _ in encoded)
        row = seq_len + 1
        self.train_ids, self.train_mask, dropped = pack_conversations(encoded[:-n_val], row,
                                                                      tok.pad_id, pack)
        self.val_ids, self.val_mask, dropped_val = pack_conversations(encoded[-n_val:], row,
                                                                      tok.pad_id, pack)
        # no assistant turn: nothing to learn
        self.unsupervised = sum(1 for _, mask in encoded if not any(mask))
        self.dropped = dropped + dropped_val  # too long or unsupervised
        if (len(self.train_ids) == 0 or len(self.val_ids) == 0) and not self.unsupervised:
            raise ValueError(f"no conversation fits --seq-len {seq_len} (+1 for the shifted "
                             f"targets): the longest has {longest} tokens; raise --seq-len")
        # some had no reply: too short is not the only reason
        if len(self.train_ids) == 0 or len(self.val_ids) == 0:
            split = "training" if len(self.train_ids) == 0 else f"validation (the last {n_val})"
            why = [f"{self.unsupervised} have no assistant reply to train on: end each with an "
                   "assistant turn"]
            if self.dropped > self.unsupervised:
                why.append(f"{self.dropped - self.unsupervised} do not fit --seq-len {seq_len} "
                           f"(+1 for the shifted targets; the longest has {longest} tokens): "
                           "raise --seq-len")
            raise ValueError(f"no conversation is left for {split}: of {len(convs)}, "
                             + "; ".join(why))
        self.B, self.T = batch_size, seq_len
        self.rng = np.random.default_rng(seed)
        self.n_train_convs, self.n_val_convs = len(convs) - n_val, n_val
        self.fingerprint = _sha256(self.train_ids.tobytes() + self.train_mask.tobytes())[:16]

    @staticmethod
    def _split(ids: np.ndarray,
               mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)  # (b, T+1)
        # x, y, w: w[t] says whether y[t] is trained on
        return ids[:, :-1], ids[:, 1:], mask[:, 1:].float()

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.rng.integers(0, len(self.train_ids), size=self.B)  # (B,) rows, with replacement
        return self._split(self.train_ids[r], self.train_mask[r])

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.val_ids), self.B):
            yield self._split(self.val_ids[i:i + self.B], self.val_mask[i:i + self.B])

    def state(self) -> dict:
        return {"kind": "chat", "rng": self.rng.bit_generator.state}

    def load_state(self, s: dict) -> None:
        self.rng.bit_generator.state = s["rng"]
