"""Kimi K2's tokenizer and chat format: tiktoken byte-level BPE, 256 special ids, the 0905 chat
template, tool calls.

What is here, top to bottom:
  1. Constants: the exact K2 pre-tokenization pattern, the special-token layout, the long-input
     limits.
  2. `Tokenizer`: a `tiktoken.Encoding` with K2's pattern and K2's special ids at K2's offsets, so
     the real 163,584-rank `tiktoken.model` would give K2's real ids and a small trained file keeps
     the same layout. `encode` never produces special ids (user text stays text); `decode` renders
     them as text; `encode_chat` renders a conversation straight to ids plus a loss mask.
  3. Rank files: load (with clear errors) and save (atomically) the tiktoken format
     `base64(token) rank`.
  4. A BPE trainer written to be read: byte-level, same pattern, incremental pair counts.
  5. The default corpus of the project (the Python standard library's own source) and a reader.
  6. The chat template in plain Python (no Jinja at run time), byte for byte the official 0905
     template.
  7. Tool calls, K2's wire format in one place: the one `ToolCall` type, the section as the
     template renders it, and a parser that reads it out of generated text without raising.
  Then the command line (train a rank file, encode a text).

How it differs from a textbook tokenizer: the pattern splits Han runs apart and needs `&&` class
intersection (o200k-style), the special tokens are not part of BPE at all (ids n_ranks ..
n_ranks+255), and the chat renderer emits special tokens by id instead of writing their text and
parsing it back, so nothing a user types can become a control token.

References: Kimi-K2-Instruct `tokenization_kimi.py` and `tokenizer_config.json`,
Kimi-K2-Instruct-0905 `chat_template.jinja` (tests/data/k2_instruct_0905.jinja), MoonshotAI/Kimi-K2
`docs/tool_call_guidance.md`, SGLang `kimik2_detector.py`, tiktoken `_educational.py` (the trainer's
reference) and tiktoken issue #195 (long inputs). BPE itself: Sennrich et al., arXiv 1508.07909,
§3.1 (merge the most frequent pair); byte-level BPE: GPT-2 (Radford et al. 2019, §2.2).

Terms: a *rank* is a BPE token's id and merge priority (lower merges first); a *chunk* is one piece
of text cut out by the pre-tokenization pattern (BPE never merges across chunks); a *piece* is a
slice of a long input that is encoded on its own; a *special* is one of the 256 ids after the ranks.
Fast/reference pairs: the trainer `learn_bpe` and tiktoken's `_educational.bpe_train`
(tests/test_tokenizer.py holds them equal), the Python renderer `apply_chat_template` and the Jinja
template, the linear-time `CALL_RE` and the guide's `OFFICIAL_CALL_RE`.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import codecs
import functools
import heapq
import json
import operator
import os
import pathlib
import re
import sys
import sysconfig
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

# `regex` (not `re`) because the pattern needs \p{...} classes and `&&` intersection. It is a
# dependency of tiktoken itself, so it costs nothing extra at run time; only the trainer and the
# tests use it directly.
import regex
import tiktoken

# --------------------------------------------------------------------------------------------------
# 1. Constants
# --------------------------------------------------------------------------------------------------

# Kimi K2's pre-tokenization pattern, exactly as `tokenization_kimi.py` passes it to tiktoken. Eight
# alternatives: Han runs | [prefix] Upper* lower+ ['s...] | [prefix] Upper+ lower* ['s...] | 1-3
# digits | [space] punctuation run + CR/LF | whitespace ending in newlines | whitespace not before
# non-space | whitespace.
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# The same pattern for Python's `regex`: `&&` is class intersection only in V1 mode. In the default
# V0 mode the pattern still compiles but silently drops every Latin word (`regex` module docs,
# V0/V1). tiktoken rejects the (?V1) prefix, so the flag is passed here instead of being written
# into PAT_STR.
PRETOKENIZE_V1 = regex.compile(PAT_STR, flags=regex.V1)

# special/reserved ids after the BPE ranks: K2 has 163,584 ranks + 256 = vocab_size 163,840
# (config.json)
N_SPECIAL = 256

# Offset (id - n_ranks) -> name, from `added_tokens_decoder` in Kimi-K2-Instruct
# tokenizer_config.json. Every other offset below 256 is `<|reserved_token_{absolute id}|>`.
NAMED_SPECIALS: dict[int, str] = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
    254: "[UNK]", 255: "[PAD]",
}
IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>")
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_ARG_BEGIN, CALL_END = (
    "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>")

# Long inputs (`tokenization_kimi.py`): tiktoken can panic on very long texts and is quadratic on
# very long runs without whitespace (tiktoken issue #195), so encode slices of at most 400,000
# characters, each cut further so that no run of whitespace or of non-whitespace exceeds 25,000
# characters.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# 4,096 ranks, see README
DEMO_RANK_FILE = pathlib.Path(__file__).resolve().parent / "demo" / "tiktoken.model"


def special_token_table(n_ranks: int) -> dict[str, int]:
    """The 256 special tokens for a vocabulary of `n_ranks` BPE ranks: name -> id, ids n_ranks ..
    n_ranks+255.

    K2's own tokenization_kimi.py builds names over range(n_ranks, n_ranks + 256 + 2), so tiktoken's
    n_vocab there is 163,842 while the model has 163,840 rows; the two extra ids are unused reserved
    names. We use exactly 256, so n_vocab equals the model's vocab_size.
    """
    return {NAMED_SPECIALS.get(off, f"<|reserved_token_{n_ranks + off}|>"): n_ranks + off
            for off in range(N_SPECIAL)}


# --------------------------------------------------------------------------------------------------
# 2. The tokenizer
# --------------------------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


@functools.lru_cache(maxsize=None)
def _long_run_re(max_run: int) -> re.Pattern:
    """Matches a whole run of whitespace or of non-whitespace longer than max_run. Each alternative
    starts only at a run's first character (the look-behind fails at once inside a run), so the scan
    stays linear instead of retrying a long run from every position. `re`'s \\s is str.isspace(),
    the test tokenization_kimi.py uses."""
    return re.compile(rf"(?<!\S)\S{{{max_run + 1},}}|(?<!\s)\s{{{max_run + 1},}}")


def _valid_unicode(text: str) -> str:
    """Make `text` encodable as UTF-8 the way tiktoken does: a high+low surrogate pair becomes the
    character it encodes, a lone surrogate becomes U+FFFD. Python strings may hold surrogates (e.g.
    from `surrogateescape`); UTF-8 cannot, so this is the one documented place where
    decode(encode(s)) != s."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def split_long_input(text: str, max_chars: int = MAX_ENCODE_CHARS,
                     max_run: int = MAX_RUN_CHARS) -> list[str]:
    """Cut `text` into pieces that tiktoken encodes safely (as tokenization_kimi.py does): slices of
    <= max_chars characters, each cut inside any run of whitespace / non-whitespace longer than
    max_run, every max_run characters from the run's start. Same cuts as
    `_split_whitespaces_or_nonwhitespaces` in tokenization_kimi.py; "".join(pieces) == text."""
    pieces = []
    for start in range(0, len(text), max_chars):
        s = text[start:start + max_chars]
        cuts = [c for m in _long_run_re(max_run).finditer(s)
                for c in range(m.start() + max_run, m.end(), max_run)]
        bounds = [0, *cuts, len(s)]
        pieces.extend(s[a:b] for a, b in zip(bounds, bounds[1:]))
    return pieces


# Every K2 marker is spelled `<|...|>`. A model can also spell one with ordinary byte tokens, and
# then it is text, not structure: with the '|' of ordinary tokens replaced by PIPE_MASK, a marker in
# decoded text can only come from its special id. U+FDD0 is a Unicode noncharacter, a code point set
# aside for a program's internal use and never assigned (Unicode Standard, §23.7 Noncharacters):
# like '|' it is neither \s nor \w in a regex and may stand inside a JSON string, so masked text
# parses as the original would; a U+FDD0 the model writes becomes U+FFFD.
PIPE_MASK = "\ufdd0"


def mask_pipes(text: str) -> str:
    """Ordinary text -> text in which no K2 marker can appear (see PIPE_MASK); unmask_pipes undoes
    it."""
    return text.replace(PIPE_MASK, "\ufffd").replace("|", PIPE_MASK)


def unmask_pipes(text: str) -> str:
    return text.replace(PIPE_MASK, "|")


class StreamDecoder:
    """Turns ids into text as they arrive, for streaming output. Bytes of a character split across
    tokens are held back until the character is complete, so a stream never shows U+FFFD for valid
    text; the concatenation of all `feed` results and `flush()` equals `Tokenizer.decode` of all
    ids. With masked=True the text of ordinary ids goes through mask_pipes, so that markers come
    only from special ids (serve.py parses tool calls that way)."""

    def __init__(self, tokenizer: "Tokenizer", masked: bool = False) -> None:
        self._tok, self._masked = tokenizer, masked
        # buffers an incomplete sequence
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add one id or several (ints, a list, a 1-D tensor); return the text that is now complete
        (may be "")."""
        try:
            ids = [operator.index(ids)]  # a Python, NumPy or 0-d torch integer
        except TypeError:
            pass
        if not self._masked:
            return self._utf8.decode(self._tok.decode_bytes(ids))
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        # a special id's text is its name, after any U+FFFD for bytes left incomplete before it:
        # never a '|' to mask
        return "".join(self._utf8.decode(self._tok.decode_bytes([i])) if i >= self._tok.n_ranks else
                       mask_pipes(self._utf8.decode(self._tok.decode_bytes([i]))) for i in ids)

    def flush(self) -> str:
        """End of stream: return what is left (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Kimi K2's tokenizer: tiktoken BPE with K2's pattern, plus 256 special ids at K2's offsets.

    Attributes: n_ranks (BPE ranks), n_vocab (= n_ranks + 256, the model's vocab_size),
    special_tokens (name -> id), stop_ids ({<|im_end|>, [EOS]}: generation stops on either), and one
    `*_id` attribute per named special token. Nothing adds [BOS] automatically: K2 chat prompts do
    not start with it (chat_template.jinja has no [BOS]).
    """

    def __init__(self, mergeable_ranks: Mapping[bytes, int], name: str = "kimi-k2") -> None:
        _check_ranks(mergeable_ranks, source="mergeable_ranks")
        self._ranks = dict(mergeable_ranks)
        self.n_ranks = len(self._ranks)
        self.n_vocab = self.n_ranks + N_SPECIAL
        self.special_tokens = special_token_table(self.n_ranks)
        self._enc = tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=self._ranks,
                                      special_tokens=self.special_tokens,
                                      explicit_n_vocab=self.n_vocab)
        st = self.special_tokens
        self.bos_id, self.eos_id = st["[BOS]"], st["[EOS]"]
        self.unk_id, self.pad_id = st["[UNK]"], st["[PAD]"]
        self.im_end_id, self.im_user_id = st[IM_END], st[IM_USER]
        self.im_assistant_id, self.im_system_id, self.im_middle_id = (
            st[IM_ASSISTANT], st[IM_SYSTEM], st[IM_MIDDLE])
        self.tool_calls_section_begin_id = st[SECTION_BEGIN]
        self.tool_calls_section_end_id = st[SECTION_END]
        self.tool_call_begin_id = st[CALL_BEGIN]
        self.tool_call_argument_begin_id = st[CALL_ARG_BEGIN]
        self.tool_call_end_id = st[CALL_END]
        self.stop_ids = frozenset({self.im_end_id, self.eos_id})

    def __repr__(self) -> str:
        return f"Tokenizer({self._enc.name!r}, n_ranks={self.n_ranks}, n_vocab={self.n_vocab})"

    @classmethod
    def load(cls, path: str | os.PathLike = DEMO_RANK_FILE) -> "Tokenizer":
        """Read a tiktoken rank file (one `base64(token) rank` per line, as K2's tiktoken.model) and
        build the tokenizer. Raises FileNotFoundError / ValueError saying what is wrong with the
        file."""
        return cls(load_ranks(path), name=f"kimi-k2:{pathlib.Path(path).name}")

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """The BPE table, token bytes -> rank (a copy)."""
        return dict(self._ranks)

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids. Never returns a special id: `<|im_end|>` typed by a user becomes
        ordinary tokens.

        Surrogates are repaired first (see `_valid_unicode`); inputs over 400,000 characters or with
        runs over 25,000 characters are encoded piece by piece (as tokenization_kimi.py does), so
        tokens never merge across those cuts."""
        # otherwise the first regex call fails with "cannot use a string pattern ..."
        if not isinstance(text, str):
            hint = ("decode the bytes first, e.g. data.decode('utf-8')"
                    if isinstance(text, (bytes, bytearray)) else "pass the text as a str")
            raise TypeError(f"encode expects a str, got {type(text).__name__}; {hint}")
        text = _valid_unicode(text)
        if len(text) <= MAX_RUN_CHARS:  # the common case: nothing to cut
            return self._enc.encode_ordinary(text)
        return [i for piece in split_long_input(text) for i in self._enc.encode_ordinary(piece)]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids -> the raw bytes they stand for; special ids give their UTF-8 name, e.g.
        b"<|im_end|>". Accepts a list of ints or a 1-D NumPy array / torch tensor. Raises TypeError
        for anything else (text, a single int, a batch, floats) and ValueError for an id outside the
        vocabulary, each saying what to pass."""
        # NumPy / torch -> Python ints (a 2-D one: nested)
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable):
            raise TypeError(f"decode expects a sequence of token ids (a list of ints or a 1-D "
                            f"array), got {type(ids).__name__} {ids!r:.40}; wrap a single id as "
                            f"[id], and encode text instead")
        ids = list(ids)
        try:
            # ints and NumPy/torch integer scalars; floats and lists fail
            ids = [operator.index(i) for i in ids]
        except TypeError:
            k, bad = next((k, i) for k, i in enumerate(ids) if not hasattr(type(i), "__index__"))
            hint = "decode a batch one row at a time" if isinstance(bad, (list, tuple)) else \
                "token ids are integers (cast a float tensor with .long())"
            raise TypeError(f"token id at position {k} is a {type(bad).__name__} ({bad!r:.40}); "
                            f"{hint}") from None
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this vocabulary [0, {self.n_vocab}); "
                             f"was it produced with a different rank file?")
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Special ids are rendered as their names (the tool-call parser needs
        `<|tool_call_begin|>` etc. in the text); byte sequences that are not valid UTF-8 become
        U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self, masked: bool = False) -> StreamDecoder:
        """A fresh incremental decoder for streaming generation (see StreamDecoder)."""
        return StreamDecoder(self, masked)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> tuple[list[int], list[int]]:
        """Render a conversation straight to ids, with a loss mask. Returns (ids, mask), two lists
        of equal length.

        Special tokens are emitted by id, never by parsing rendered text; all content goes through
        `encode`, one call per stretch of text between two special tokens (what a tokenizer that
        splits the rendered string on special tokens would produce). decode(ids) ==
        apply_chat_template(...) for the same arguments. mask[i] = 1 on what an assistant wrote: its
        content, its tool-call section (markers included) and its closing <|im_end|>; 0 on its
        `<|im_assistant|>assistant<|im_middle|>` header and on every other turn. For supervised
        fine-tuning keep add_generation_prompt=True: the template omits the last turn's <|im_end|>
        otherwise, and the model would never learn to stop; the trailing prompt it adds is masked
        out.
        """
        ids: list[int] = []
        mask: list[int] = []
        for segment in _chat_segments(messages, tools, add_generation_prompt):
            piece = self.encode_segments([segment])
            ids.extend(piece)
            mask.extend([int(segment[2])] * len(piece))
        return ids, mask

    def encode_segments(self, segments: Iterable[Segment]) -> list[int]:
        """(text, is_special, supervised) segments -> ids: a special token by its id, a text through
        `encode`. How encode_chat and serve.py's tool-call prefill (tool_call_opening) are encoded.
        """
        return [i for text, is_special, _ in segments
                for i in ([self.special_tokens[text]] if is_special else self.encode(text))]


# --------------------------------------------------------------------------------------------------
# 3. Rank files
# --------------------------------------------------------------------------------------------------

def _check_ranks(ranks: Mapping[bytes, int], source: str) -> None:
    """Raise ValueError unless ranks are exactly 0..n-1 and every single byte is a token (byte-level
    BPE must be able to spell any input; tiktoken would panic on a missing byte)."""
    if not isinstance(ranks, Mapping):
        raise ValueError(f"{source}: expected a dict {{token bytes: rank}}, "
                         f"got {type(ranks).__name__}")
    bad = next(((t, r) for t, r in ranks.items()
                if not isinstance(t, bytes) or type(r) is not int), None)
    # str keys (text instead of bytes) would otherwise surface as "byte b'\x00' has no rank"
    if bad is not None:
        raise ValueError(f"{source}: every entry must be token bytes -> int rank, got "
                         f"{bad[0]!r:.40} -> {bad[1]!r:.40} ({type(bad[0]).__name__} -> "
                         f"{type(bad[1]).__name__}); read rank files with load_ranks")
    if not ranks:
        raise ValueError(f"{source}: no BPE ranks; train a rank file with "
                         f"`python tokenizer.py train ...`")
    if len(set(ranks.values())) != len(ranks):
        dup = next(r for r, c in Counter(ranks.values()).items() if c > 1)
        raise ValueError(f"{source}: rank {dup} is used by more than one token; "
                         f"each rank must be unique")
    if set(ranks.values()) != set(range(len(ranks))):
        missing = min(set(range(len(ranks))) - set(ranks.values()))
        raise ValueError(f"{source}: ranks must be contiguous 0..{len(ranks) - 1} so the special "
                         f"ids can follow them, but rank {missing} is missing "
                         f"(max rank {max(ranks.values())})")
    absent = [b for b in range(256) if bytes([b]) not in ranks]
    if absent:
        raise ValueError(f"{source}: the single byte {bytes([absent[0]])!r} has no rank "
                         f"({len(absent)} bytes missing); a byte-level BPE table needs all 256 so "
                         f"that any text can be encoded")


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken rank file into {token bytes: rank}, checking every line. Blank lines are
    skipped."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder; give the rank file itself, "
                                f"e.g. {path / 'tiktoken.model'}")
    if not path.is_file():
        raise FileNotFoundError(f"rank file {path} does not exist; train one with "
                                f"`python tokenizer.py train --vocab-size 4096 --out {path}`")
    ranks: dict[bytes, int] = {}
    # rank -> line where it first appeared, to name both lines of a duplicate
    first_line: dict[int, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError(f"expected 2 fields, got {len(fields)}")
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
                if rank < 0 or not token:
                    raise ValueError("empty token or negative rank")
            except (ValueError, binascii.Error) as err:
                raise ValueError(f"{path}:{lineno}: corrupt rank file line {line[:60]!r} ({err}); "
                                 f"each line must be `base64(token bytes) rank`, as written by "
                                 f"`python tokenizer.py train`") from None
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} appears twice "
                                 f"(first with rank {ranks[token]})")
            if rank in first_line:
                raise ValueError(f"{path}:{lineno}: duplicate rank {rank} (also on line "
                                 f"{first_line[rank]}); each rank must be unique")
            ranks[token] = rank
            first_line[rank] = lineno
    _check_ranks(ranks, source=str(path))
    return ranks


def save_ranks(ranks: Mapping[bytes, int], path: str | os.PathLike) -> None:
    """Write {token bytes: rank} as a tiktoken rank file, in rank order, atomically
    (checkpoint.write_atomically: an interrupted run never leaves a half-written file behind)."""
    # imported here: checkpoint imports torch, which encoding and decoding text never need
    from checkpoint import write_atomically

    _check_ranks(ranks, source="ranks to save")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    text = "".join(f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in by_rank)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="ascii"))


# --------------------------------------------------------------------------------------------------
# 4. The BPE trainer
# --------------------------------------------------------------------------------------------------
# Byte-level BPE (Sennrich et al. §3.1; GPT-2 §2.2): start from the 256 single bytes (ranks 0..255,
# in byte order, as K2's file reportedly does), then repeatedly merge the most frequent adjacent
# pair of tokens into a new token.
#
# Counting: BPE never merges across chunks, so a chunk that occurs f times contributes each of its
# pairs f times. We keep one token list per *distinct* chunk with its frequency, the total count of
# every pair, and for every pair the set of chunks that contain it. A merge then touches only those
# chunks: it recounts each one's pairs before and after merging and applies the difference. A heap,
# with stale entries skipped when popped, finds the top pair.
#
# Tie-break (deterministic, documented): among pairs with the same count, the pair whose first
# occurrence in the training text comes first. That is exactly what tiktoken._educational.bpe_train
# picks (it takes the first maximum of a Counter filled in text order), so the two trainers agree
# merge for merge. Chunks are numbered in order of first appearance, so "first occurrence" = (lowest
# chunk number containing the pair, position in that chunk).
#
# Duplicates: could two different pairs spell the same bytes (ab+c and a+bc)? We never saw it happen
# (none in 8,192 merges on 10 MB of standard-library source, none in thousands of random small
# corpora), but nothing relies on it: such a merge would be applied to the training data (tiktoken
# merges those tokens at encode time too, since the bytes are in the table) and reuse the existing
# rank, so ranks stay unique and contiguous.

def count_chunks(text: str) -> Counter[str]:
    """Pre-tokenize `text` with K2's pattern (regex, V1 mode) and count each distinct chunk.
    The Counter's order is the order of first appearance, which the tie-break relies on."""
    return Counter(PRETOKENIZE_V1.findall(text))


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of `pair` in `word` by `new_id`, left to right, non-overlapping."""
    a, b = pair
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _pop_most_frequent(heap: list, counts: dict, where: dict,
                       words: list[list[int]]) -> tuple[int, int] | None:
    """Pop the pair to merge next: highest count, ties to the earliest first occurrence (see the
    note above). Heap entries are (-count, pair); an entry whose count is no longer current is stale
    and dropped."""
    while heap and counts.get(heap[0][1]) != -heap[0][0]:
        heapq.heappop(heap)
    if not heap:
        return None
    best = -heap[0][0]
    tied = set()
    while heap and heap[0][0] == -best:
        _, pair = heapq.heappop(heap)
        if counts.get(pair) == best:
            tied.add(pair)

    def first_occurrence(pair: tuple[int, int]) -> tuple[int, int]:
        w = min(where[pair])
        word = words[w]
        return w, next(i for i in range(len(word) - 1) if (word[i], word[i + 1]) == pair)

    winner = min(tied, key=first_occurrence) if len(tied) > 1 else tied.pop()
    for pair in tied - {winner}:  # the others stay candidates for the next merges
        heapq.heappush(heap, (-best, pair))
    return winner


def learn_bpe(chunk_counts: Mapping[str, int], n_ranks: int,
              verbose: bool = False) -> dict[bytes, int]:
    """Learn BPE ranks from distinct chunks and their counts (in first-appearance order, as from
    count_chunks). Returns {token bytes: rank} with n_ranks entries (256 single bytes + merges), or
    fewer if the text runs out of pairs first (every chunk already one token)."""
    if n_ranks < 256:
        raise ValueError(f"n_ranks={n_ranks} must be at least 256: the single bytes come first")
    # exercise: bpe_merge
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # token ids per distinct chunk
    freqs = list(chunk_counts.values())
    # rank -> bytes; ranks 0..255 are the bytes in byte order
    token_bytes = [bytes([b]) for b in range(256)]
    ranks = {t: r for r, t in enumerate(token_bytes)}
    counts: dict[tuple[int, int], int] = defaultdict(int)  # pair -> occurrences in the whole text
    # pair -> indices of the chunks containing it
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            counts[pair] += f
            where[pair].add(w)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    t0 = time.perf_counter()
    while len(token_bytes) < n_ranks:
        pair = _pop_most_frequent(heap, counts, where, words)
        if pair is None:
            break  # nothing left to merge
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        # not None: a duplicate spelling (see the note above); merge, make no new rank
        new_id = ranks.get(merged)
        if new_id is None:
            new_id = len(token_bytes)
            token_bytes.append(merged)
            ranks[merged] = new_id
        # pair -> change of its count caused by this merge
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for w in where.pop(pair):
            word, f = words[w], freqs[w]
            new_word = _merge_word(word, pair, new_id)
            old_pairs, new_pairs = list(zip(word, word[1:])), list(zip(new_word, new_word[1:]))
            for p in old_pairs:
                delta[p] -= f
            for p in new_pairs:
                delta[p] += f
            old_set, new_set = set(old_pairs), set(new_pairs)
            for p in old_set - new_set - {pair}:  # `pair` itself was popped from `where` above
                where[p].discard(w)
            for p in new_set - old_set:
                where[p].add(w)
            words[w] = new_word
        for p, d in delta.items():
            if d:
                c = counts[p] + d
                if c:
                    counts[p] = c
                    heapq.heappush(heap, (-c, p))
                else:  # gone from the text: `where[p]` is empty too
                    del counts[p]
                    where.pop(p, None)
        if verbose and len(token_bytes) % 1000 == 0:
            seconds = time.perf_counter() - t0
            print(f"  {len(token_bytes):6d} ranks  {seconds:6.1f}s  last {merged!r}", flush=True)
    return ranks
    # end exercise: bpe_merge


def train_bpe(text: str, n_ranks: int, verbose: bool = False) -> dict[bytes, int]:
    """Train byte-level BPE on `text` with K2's pre-tokenization: {token bytes: rank}, ranks
    0..n_ranks-1."""
    return learn_bpe(count_chunks(text), n_ranks, verbose=verbose)


# --------------------------------------------------------------------------------------------------
# 5. Corpus
# --------------------------------------------------------------------------------------------------

def default_corpus_files() -> list[pathlib.Path]:
    """The project's default corpus: every `*.py` file of the running Python's standard library,
    sorted by path.

    Real text (code, docstrings, comments) that exists on every fresh machine without a download;
    the tokenizer trainer and pretraining both use it. Excludes site-packages (installed third-party
    code varies per machine). Its content varies with the Python version: record the version next to
    anything trained on it."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    third_party = {"site-packages", "dist-packages"}
    files = [p for p in stdlib.rglob("*.py")
             if p.is_file() and not third_party & set(p.relative_to(stdlib).parts)]
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def _expand(paths: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    """Files as given; folders -> every non-hidden file below them, sorted. Raises for a missing
    path."""
    files = []
    for p in map(pathlib.Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(
                f for f in p.rglob("*")
                if f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)))
        else:
            raise FileNotFoundError(f"corpus path {p} does not exist "
                                    f"(give files or folders of text)")
    return files


def read_corpus(paths: Iterable[str | os.PathLike] | None = None,
                max_bytes: int | None = None) -> str:
    """Read files and folders (default: default_corpus_files()) into one text, files joined by a
    newline.

    Files are decoded as UTF-8 with errors="replace". With `max_bytes`, the text (as UTF-8) is at
    most that long: files are taken in order and the last one is cut at a character boundary. Raises
    FileNotFoundError for a missing path, ValueError if the corpus is empty."""
    files = default_corpus_files() if paths is None else _expand(paths)
    texts, total = [], 0
    for f in files:
        piece = ("\n" if texts else "") + f.read_bytes().decode("utf-8", errors="replace")
        data = piece.encode("utf-8")
        if max_bytes is not None and total + len(data) > max_bytes:
            # an incremental decoder without final=True drops an incomplete trailing character
            # instead of U+FFFD
            texts.append(codecs.getincrementaldecoder("utf-8")().decode(data[:max_bytes - total]))
            break
        texts.append(piece)
        total += len(data)
    text = "".join(texts)
    if not text.strip():
        source = ("the default corpus (standard library sources)" if paths is None
                  else ", ".join(map(str, paths)))
        raise ValueError(f"corpus is empty: {len(files)} file(s) under {source} hold no text"
                         + (f" within max_bytes={max_bytes}" if max_bytes is not None else ""))
    return text


# --------------------------------------------------------------------------------------------------
# 6. Chat template (Kimi-K2-Instruct-0905 chat_template.jinja, rendered in Python)
# --------------------------------------------------------------------------------------------------

# 0905 template, verbatim
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLES = ("system", "user", "assistant", "tool")
# every other role: <|im_system|> (0905 template)
_HEADER = {"user": IM_USER, "assistant": IM_ASSISTANT}


def _tojson(x: Any, at: str = "value") -> str:
    """The template's `tojson` as Hugging Face defines it: json.dumps, non-ASCII kept, keys in given
    order. `at` names the value in the error raised for what JSON cannot hold (a set, an object, a
    cycle, deep nesting)."""
    try:
        return json.dumps(x, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"{at} cannot be written as JSON ({type(err).__name__}: "
                         f"{str(err)[:80]}); use only dicts, lists, strings, numbers, booleans "
                         f"and None") from None


def _check_list(x: Any, what: str, item: str) -> None:
    """Raise ValueError unless x is a list/tuple. A lone dict or a string is iterable too, and would
    otherwise be read key by key (or character by character) into a confusing error about its first
    key."""
    if isinstance(x, (str, bytes, Mapping)) or not isinstance(x, Sequence):
        hint = "; wrap a single one in a list" if isinstance(x, Mapping) else ""
        raise ValueError(f"{what} must be a list of {item}s, got {type(x).__name__}{hint}")


def normalize_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Tool schemas -> the official wrapped form {"type": "function", "function": {...}}
    (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md). Accepts that form and the flat {"name",
    "description", "parameters"} form; keys keep their given order."""
    _check_list(tools, "tools", "tool schema")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}] is a {type(tool).__name__}, expected a dict")
        if tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] has type {tool['type']!r}; only 'function' tools exist "
                             f"in K2's format")
        if isinstance(tool.get("function"), Mapping) and "name" in tool["function"]:
            out.append(dict(tool) if "type" in tool else {"type": "function", **tool})
        elif "name" in tool and "function" not in tool:
            # the flat form; a "type" key beside it stays outside
            spec = {k: v for k, v in tool.items() if k != "type"}
            out.append({"type": "function", "function": spec})
        else:
            raise ValueError(f"tools[{i}] has keys {sorted(tool)}: expected the flat form "
                             f"{{'name', 'description', 'parameters'}} or the OpenAI form "
                             f"{{'type': 'function', 'function': {{'name', ...}}}}")
    return out


def _normalize_tool_calls(calls: Sequence[Mapping[str, Any]], at: str,
                          first_index: int) -> list[tuple[str, str]]:
    """OpenAI tool_calls -> [(id, arguments JSON text)]. A missing id becomes
    functions.{name}:{idx}, idx counting every tool call of the conversation so far (vLLM's kimi_k2
    tool parser). String arguments must be JSON objects and are kept byte for byte; dict arguments
    go through tojson, as in the template."""
    _check_list(calls, f"{at}.tool_calls", "tool call")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{at}.tool_calls[{j}] must look like {{'id': ..., 'type': "
                             f"'function', 'function': {{'name': str, 'arguments': str | dict}}}}, "
                             f"got {call!r:.120}")
        args = fn.get("arguments", {})
        here = f"{at}.tool_calls[{j}] ({fn['name']})"
        if isinstance(args, str):
            # JSONDecodeError; also an int over 4,300 digits, deep nesting
            try:
                parsed = json.loads(args)
            except (ValueError, RecursionError) as err:
                raise ValueError(f"{here}: arguments are not valid JSON ({err}): {args!r:.120}; "
                                 f"pass a JSON object string or a dict") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"{here}: arguments must be a JSON object, got {args!r:.120}")
        elif isinstance(args, Mapping):
            args = _tojson(args, f"{here}: arguments")
        else:
            raise ValueError(f"{here}: arguments must be a JSON string or a dict, "
                             f"got {type(args).__name__}")
        call_id = call.get("id") or tool_call_id(fn["name"], first_index + j)
        out.append((str(call_id), args))
    return out


def _content_text(content: Any, at: str) -> str:
    """Message content -> text: a string as is, None as "", a list of text parts concatenated (0905
    template)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, (list, tuple)):
        texts = []
        for k, part in enumerate(content):
            is_image = isinstance(part, Mapping) and (
                part.get("type") == "image" or "image" in part or "image_url" in part)
            if is_image:
                raise ValueError(f"{at}.content[{k}] is an image; K2-Instruct has no vision input "
                                 f"(the template's <|media_start|> strings are not K2 tokens), so "
                                 f"only text parts are supported")
            if not isinstance(part, Mapping) or not isinstance(part.get("text"), str):
                raise ValueError(f"{at}.content[{k}] must be {{'type': 'text', 'text': str}}, "
                                 f"got {part!r:.120}")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{at}.content must be a string, None or a list of text parts, "
                     f"got {type(content).__name__}")


Segment = tuple[str, bool, bool]  # (text, is_special, supervised)


def _chat_segments(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                   add_generation_prompt: bool) -> list[Segment]:
    """The conversation as the 0905 template lays it out, as a list of segments; adjacent texts with
    the same supervision are joined (one `encode` per stretch between special tokens). The single
    source for both apply_chat_template (join the texts) and Tokenizer.encode_chat (specials by id,
    texts through encode)."""
    _check_list(messages, "messages", "message dict")
    segs: list[Segment] = []

    def add(text: str, is_special: bool = False, supervised: bool = False) -> None:
        if not is_special and not text:
            return
        if not is_special and segs and not segs[-1][1] and segs[-1][2] == supervised:
            segs[-1] = (segs[-1][0] + text, False, supervised)
        else:
            segs.append((text, is_special, supervised))

    def header(special: str, role_name: str) -> None:
        add(special, True)
        add(role_name)
        add(IM_MIDDLE, True)

    # rule 1: the whitespace after <|im_middle|> is the template's own indentation, kept on purpose
    if tools:
        header(IM_SYSTEM, "tool_declare")
        add("\n  # Tools\n  " + _tojson(normalize_tools(tools), "tools"))
        add(IM_END, True)
    n_calls = 0  # tool calls so far in the conversation, for ids that have to be made up
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"{at} must be a dict with a 'role', got {m!r:.120}")
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"{at} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if i == 0 and role != "system":  # rule 2: default system prompt
            header(IM_SYSTEM, "system")
            add(DEFAULT_SYSTEM_PROMPT)
            add(IM_END, True)
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"{at}.name must be a string, got {type(name).__name__}")
        # rule 3: `name` replaces the role in the header
        header(_HEADER.get(role, IM_SYSTEM), name or role)
        sup = role == "assistant"
        if role == "assistant" and m.get("tool_calls"):  # rule 4
            # exercise: render_tool_call
            content = m.get("content")
            # The template's `{% if message['content'] %}`: empty content of any kind ("", None,
            # []) prints nothing
            if content and not isinstance(content, str):
                raise ValueError(f"{at}: content next to tool_calls must be a string (the template "
                                 f"would print the Python repr of a {type(content).__name__})")
            add(content or "", supervised=sup)
            calls = _normalize_tool_calls(m["tool_calls"], at, n_calls)
            n_calls += len(calls)
            for seg in _tool_call_segments(calls, sup):
                add(*seg)
            # end exercise: render_tool_call
        elif role == "tool":
            call_id, content = m.get("tool_call_id"), m.get("content")
            if not isinstance(call_id, str) or not call_id:
                got = "" if call_id is None else f" (got {type(call_id).__name__} {call_id!r:.40})"
                raise ValueError(f"{at}: a tool message needs 'tool_call_id', the id string of the "
                                 f"call it answers (e.g. 'functions.get_weather:0'){got}")
            if not isinstance(content, str):
                raise ValueError(f"{at}: tool content must be a string, "
                                 f"got {type(content).__name__}; pass json.dumps(result)")
            add(f"## Return of {call_id}\n    {content}")
        else:
            add(_content_text(m.get("content"), at), supervised=sup)
        # rule 5: no <|im_end|> after the last message otherwise
        if i < len(messages) - 1 or add_generation_prompt:
            add(IM_END, True, sup)
    if add_generation_prompt:  # rule 6
        header(IM_ASSISTANT, "assistant")
    return segs


def apply_chat_template(messages: Sequence[Mapping[str, Any]],
                        tools: Sequence[Mapping[str, Any]] | None = None,
                        add_generation_prompt: bool = True) -> str:
    """Render OpenAI-style messages exactly as Kimi-K2-Instruct-0905's chat_template.jinja does.

    messages: dicts with role system | user | assistant | tool; optional `name` (replaces the role
    in the header); assistant `tool_calls` in OpenAI form (missing ids become
    functions.{name}:{idx}); tool messages need `tool_call_id`. tools: flat or OpenAI-wrapped
    schemas, normalised to the wrapped form. Raises ValueError on input the template would render
    wrongly or silently (unknown role, non-JSON arguments, images, ...)."""
    return join_segments(_chat_segments(messages, tools, add_generation_prompt))


# --------------------------------------------------------------------------------------------------
# 7. Tool calls: K2's wire format, rendered and parsed (Moonshot's docs/tool_call_guidance.md)
# --------------------------------------------------------------------------------------------------
# An assistant turn writes its calls as one section after its content, one call after another:
#   <|tool_calls_section_begin|>
#     <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>
#   <|tool_calls_section_end|>
# The chat template renders it with `_tool_call_segments` (also `format_tool_calls`), serve.py
# prefills its opening with `tool_call_opening`, and `parse_tool_calls` reads model output back
# into `ToolCall`s; tools.py, serve.py and generate.py use these and state none of its rules again.

# A tool's name: the name part of the guide's id regex `[\w\.]+:\d+`.
TOOL_NAME = r"[\w.]+"
TOOL_NAME_RE = re.compile(TOOL_NAME)
# Official reference parser regexes (tool_call_guidance.md), DOTALL, verbatim.
SECTION_RE = re.compile(r"<\|tool_calls_section_begin\|>(.*?)<\|tool_calls_section_end\|>",
                        re.DOTALL)
OFFICIAL_CALL_RE = re.compile(
    r"<\|tool_call_begin\|>\s*(?P<tool_call_id>[\w\.]+:\d+)\s*<\|tool_call_argument_begin\|>"
    r"\s*(?P<function_arguments>.*?)\s*<\|tool_call_end\|>", re.DOTALL)
# The same call regex, rewritten so that it cannot backtrack catastrophically;
# tests/test_tokenizer.py holds the two equal (same match or no match, same groups). In the official
# one, `\s*(.*?)\s*` can split a run of whitespace in every possible way: on a call cut off inside
# whitespace (no <|tool_call_end|>; a small model can emit a few thousand blank tokens before
# max_tokens) it takes O(n^3) steps: 2,000 spaces 5 s, 8,000 spaces 270 s. Here every whitespace run
# has one way to match: the leading `\s*(?!\s)` takes all of it, and the arguments are non-space
# characters joined by whitespace runs (`\s*` before `\S` must take the whole run), none starting
# the end marker, so the arguments are still "up to the first <|tool_call_end|>, whitespace
# stripped", and the scan is linear.
_CALL_END_RE = r"<\|tool_call_end\|>"
_ARG_CHAR = rf"(?!{_CALL_END_RE})\S"  # a non-space character that does not start the end marker
CALL_RE = re.compile(
    rf"<\|tool_call_begin\|>\s*(?P<tool_call_id>{TOOL_NAME}:\d+)\s*<\|tool_call_argument_begin\|>"
    rf"\s*(?!\s)(?P<function_arguments>(?:{_ARG_CHAR}(?:\s*{_ARG_CHAR})*)?)\s*{_CALL_END_RE}")
# Name and index from an id: SGLang's kimik2_detector.py pattern; unlike the guide's split('.')[1],
# it keeps dotted names whole.
CALL_ID_RE = re.compile(rf"^(?:functions\.)?(?P<name>{TOOL_NAME}):(?P<index>\d+)$")
SECTION_NOT_CLOSED = "tool-call section has no <|tool_calls_section_end|> (output truncated?)"


@dataclass
class ToolCall:
    """One call the model attempted (or a caller wrote), the one call type of the project.

    `id` is the model's own `[functions.]NAME:IDX` when it wrote a well-formed one, with `name` read
    from it (and `index`, when the whole call matched); otherwise "" and None
    (tools.parse_assistant makes one up).
    `raw_arguments` is the argument text as written; for a call that does not match the official
    regex, everything after its <|tool_call_begin|>. `error` is None when the call is usable: its
    arguments are a JSON object, held parsed in `arguments`."""
    id: str
    name: str | None
    raw_arguments: str
    arguments: dict | None = None
    error: str | None = None
    index: int | None = None

    def to_openai(self) -> dict:
        """The OpenAI `tool_calls` entry. Arguments are the model's text byte for byte when they
        parsed to a JSON object, otherwise "{}" (the chat template accepts only JSON objects)."""
        args = self.raw_arguments if self.arguments is not None else "{}"
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": args}}


@dataclass
class ToolCallParse:
    """What parse_tool_calls found: `content` is the text before the tool-call section (all of it
    when there is none), `calls` every call attempt in order, `errors` problems of the section
    itself. `has_section`: a section was opened; `closed`: and ended by <|tool_calls_section_end|>;
    `after`: the text after its end (K2 writes none; it is not part of `content`)."""
    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    has_section: bool = False
    closed: bool = False
    after: str = ""


def tool_call_id(name: str, index: int) -> str:
    """K2's tool-call id, `functions.{name}:{index}` (tool_call_guidance.md)."""
    return f"functions.{name}:{index}"


def join_segments(segments: Iterable[Segment]) -> str:
    """Segments -> the text they spell (special tokens as their names)."""
    return "".join(text for text, _, _ in segments)


def tool_call_head(call_id: str, supervised: bool = True) -> list[Segment]:
    """A call's id and the marker after it: `functions.NAME:IDX<|tool_call_argument_begin|>`."""
    return [(call_id, False, supervised), (CALL_ARG_BEGIN, True, supervised)]


def _tool_call_segments(calls: Sequence[tuple[str, str]], supervised: bool) -> list[Segment]:
    """The tool-call section for [(id, arguments)]: the layout the template renders and the model
    writes."""
    segs: list[Segment] = [(SECTION_BEGIN, True, supervised)]
    for call_id, args in calls:
        segs += [(CALL_BEGIN, True, supervised), *tool_call_head(call_id, supervised),
                 (args, False, supervised), (CALL_END, True, supervised)]
    return segs + [(SECTION_END, True, supervised)]


def tool_call_opening(call_id: str | None = None) -> list[Segment]:
    """The start of a section that forces a call (serve.py's tool_choice prefill):
    `<|tool_calls_section_begin|><|tool_call_begin|>`, then, given call_id, its head, so that the
    model writes only the arguments."""
    segs: list[Segment] = [(SECTION_BEGIN, True, True), (CALL_BEGIN, True, True)]
    return segs + (tool_call_head(call_id) if call_id is not None else [])


def format_tool_calls(tool_calls: Sequence[Mapping[str, Any]], first_index: int = 0) -> str:
    """OpenAI-form tool calls -> K2's tool-call section text, as the template renders it (and the
    model writes it). Missing ids become functions.{name}:{first_index + j}."""
    calls = _normalize_tool_calls(tool_calls, "format_tool_calls", first_index)
    return join_segments(_tool_call_segments(calls, supervised=True))


def find_section(text: str) -> tuple[int, int]:
    """(start of the first <|tool_calls_section_begin|>, start of the <|tool_calls_section_end|>
    after it); -1 for a marker that is not there. What SECTION_RE.search finds, without its cost:
    when no end marker follows, search() rescans the rest of the text from every later begin marker,
    O(n^2) on a model repeating that token."""
    start = text.find(SECTION_BEGIN)
    if start < 0:
        return -1, -1
    return start, text.find(SECTION_END, start + len(SECTION_BEGIN))


def parse_arguments(call_id: str, raw: str) -> tuple[dict | None, str | None]:
    """A call's argument text -> (the JSON object, None), or (None, what is wrong with it)."""
    try:
        args = json.loads(raw)
    # JSONDecodeError; ValueError for an int over 4,300 digits; RecursionError for deep nesting
    except (ValueError, RecursionError) as err:
        return None, (f"arguments of {call_id} are not valid JSON ({type(err).__name__}: "
                      f"{str(err)[:80]}): {raw[:80]!r}")
    if not isinstance(args, dict):
        return None, f"arguments of {call_id} must be a JSON object, got {raw[:80]!r}"
    return args, None


def _diagnose(part: str) -> str:
    """Why the text after a <|tool_call_begin|> did not match the official call regex."""
    shown = part.replace(CALL_ARG_BEGIN, " <|tool_call_argument_begin|> ").strip()[:80]
    if CALL_ARG_BEGIN not in part:
        return ("malformed call: no <|tool_call_argument_begin|> between the id and the arguments "
                f"in {shown!r}")
    head = part.split(CALL_ARG_BEGIN, 1)[0].strip()
    if not CALL_ID_RE.match(head):
        return (f"malformed call id {head[:60]!r}: expected functions.NAME:IDX "
                f"(NAME of letters, digits, _ or .)")
    if CALL_END not in part:
        return "malformed call: no <|tool_call_end|> after the arguments (output cut off?)"
    return f"malformed call: {shown!r}"


def read_call(call_id: str, raw: str) -> ToolCall:
    """A call whose id matched the official regex and its argument text -> a ToolCall: name and
    index read from the id, the arguments parsed; never raises. (serve.py's streamer builds each
    call with it too, so streamed and whole answers agree.)"""
    idm = CALL_ID_RE.match(call_id)
    if idm is None:
        return ToolCall(id="", name=None, raw_arguments=raw,
                        error=f"malformed call id {call_id[:60]!r}: expected functions.NAME:IDX")
    call = ToolCall(id=call_id, name=idm.group("name"), raw_arguments=raw)
    # int() refuses over 4,300 digits (Python's int_max_str_digits): a runaway index is an error
    try:
        call.index = int(idm.group("index"))
    except ValueError:
        digits = len(idm.group("index"))
        call.error = (f"call id {call_id[:40]}... has a {digits}-digit index; "
                      f"expected a small integer")
        return call
    call.arguments, call.error = parse_arguments(call_id, raw)
    return call


def _parse_call(part: str) -> ToolCall:
    """The text after one <|tool_call_begin|> (up to the next) -> a ToolCall; never raises."""
    match = CALL_RE.match(CALL_BEGIN + part)
    if match is not None:
        return read_call(match.group("tool_call_id"), match.group("function_arguments"))
    call = ToolCall(id="", name=None, raw_arguments=part, error=_diagnose(part))
    head = part.split(CALL_ARG_BEGIN, 1)[0].strip() if CALL_ARG_BEGIN in part else ""
    idm = CALL_ID_RE.match(head)
    if idm:  # the id is well formed (e.g. the call lacks its end marker): keep it
        call.id, call.name = head, idm.group("name")
    return call


def parse_tool_calls(text: str) -> ToolCallParse:
    """Find K2 tool calls in generated text; never raises on a str (TypeError for anything else).

    Uses the official regexes, applied to each stretch from one <|tool_call_begin|> to the next, so
    one malformed call is reported on its own instead of swallowing the next one (the official
    `finditer` over the whole section would skip or merge it silently). A section that is opened but
    never closed (output cut off) is parsed to its end and reported in `errors`. Only the first
    section is parsed: K2 writes one per turn."""
    if not isinstance(text, str):
        raise TypeError(f"parse_tool_calls expects the decoded model output (a str), got "
                        f"{type(text).__name__}; decode ids with Tokenizer.decode first")
    # exercise: parse_tool_calls
    start, end = find_section(text)
    if start < 0:
        return ToolCallParse(content=text)
    result = ToolCallParse(content=text[:start], has_section=True, closed=end >= 0)
    if end >= 0:
        body = text[start + len(SECTION_BEGIN):end]
        result.after = text[end + len(SECTION_END):]
    else:
        body = text[start + len(SECTION_BEGIN):]
        result.errors.append(SECTION_NOT_CLOSED)
    parts = body.split(CALL_BEGIN)
    if parts[0].strip():
        stray = parts[0].strip()[:80]
        result.errors.append(f"unexpected text inside the tool-call section: {stray!r}")
    result.calls = [_parse_call(part) for part in parts[1:]]
    return result
    # end exercise: parse_tool_calls


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    """`train` a rank file, or `encode` a text with one and show the pieces."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    # --- train
    t = sub.add_parser("train", help="train a byte-level BPE rank file (tiktoken format)")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="BPE ranks to learn, including the 256 single bytes; the model vocab adds "
                        "256 special ids")
    t.add_argument("--out", required=True,
                   help="rank file to write (atomically), e.g. demo/tiktoken.model")
    t.add_argument("--corpus", nargs="+", default=None,
                   help="files or folders of UTF-8 text; default: the Python standard library's "
                        "*.py sources")
    t.add_argument("--max-bytes", type=int, default=None,
                   help="read at most this many bytes of the corpus")
    # --- encode
    e = sub.add_parser("encode", help="encode a text and print each token with its bytes")
    e.add_argument("text", help="text to encode (special-token names stay ordinary text)")
    e.add_argument("--model", default=str(DEMO_RANK_FILE), help="rank file to load")
    args = p.parse_args(argv)
    if args.command == "train" and args.vocab_size < 256:
        p.error(f"--vocab-size {args.vocab_size} is below 256: the 256 single bytes come first")
    if args.command == "train" and args.max_bytes is not None and args.max_bytes <= 0:
        p.error(f"--max-bytes must be positive, got {args.max_bytes}")

    if args.command == "train":
        t0 = time.perf_counter()
        text = read_corpus(args.corpus, args.max_bytes)
        t1 = time.perf_counter()
        chunks = count_chunks(text)
        t2 = time.perf_counter()
        print(f"corpus: {len(text.encode('utf-8')):,} bytes ({t1 - t0:.1f}s to read), "
              f"{sum(chunks.values()):,} chunks, {len(chunks):,} distinct ({t2 - t1:.1f}s to "
              f"pre-tokenize); Python {sys.version.split()[0]}")
        ranks = learn_bpe(chunks, args.vocab_size, verbose=True)
        t3 = time.perf_counter()
        save_ranks(ranks, args.out)
        if len(ranks) < args.vocab_size:
            print(f"note: the corpus ran out of pairs after {len(ranks)} ranks "
                  f"(asked for {args.vocab_size})")
        print(f"wrote {args.out}: {len(ranks):,} ranks -> model vocab_size "
              f"{len(ranks) + N_SPECIAL:,} ({t3 - t2:.1f}s merging, {t3 - t0:.1f}s total)")
    else:
        tok = Tokenizer.load(args.model)
        ids = tok.encode(args.text)
        print(f"{len(ids)} tokens for {len(args.text.encode('utf-8'))} bytes ({tok.n_ranks} ranks)")
        for i in ids:
            print(f"{i:6d}  {tok.decode_bytes([i])!r}")


if __name__ == "__main__":
    try:
        main()
    # a missing or bad file, found after parsing: one line saying what is wrong, no traceback
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
