"""Benchmark of tokenizer.py: how long the BPE trainer takes, and how fast and how well the result
encodes.

Target: 8,192 ranks learned from 10 MB of text in under 60 s on 2 CPU cores. The trainer is
single-threaded pure Python (pre-tokenization with `regex`, merges with incremental pair counts);
encoding is tiktoken's Rust BPE on one thread. Prints one table; nothing is asserted
(tests/test_tokenizer.py checks correctness, this checks speed).

Run:
    # 8,192 ranks on the first 10 MB of the default corpus
    python bench/bench_tokenizer.py
    # the shipped demo/tiktoken.model setting
    python bench/bench_tokenizer.py --vocab-size 4096 --max-bytes 8000000
"""
import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import tiktoken

# scripts named bench_* shadow no project module; import the project's modules from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenizer as T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab-size", type=int, default=8192,
                   help="BPE ranks to learn (including the 256 bytes)")
    p.add_argument("--max-bytes", type=int, default=10_000_000,
                   help="corpus size in bytes (default corpus: stdlib)")
    p.add_argument("--corpus", nargs="+", default=None,
                   help="files or folders instead of the default corpus")
    args = p.parse_args()

    rows = []
    t0 = time.perf_counter()
    text = T.read_corpus(args.corpus, args.max_bytes)
    n_bytes = len(text.encode("utf-8"))
    t1 = time.perf_counter()
    chunks = T.count_chunks(text)
    t2 = time.perf_counter()
    ranks = T.learn_bpe(chunks, args.vocab_size)
    t3 = time.perf_counter()
    rows += [("read corpus", f"{t1 - t0:.2f} s", f"{n_bytes / 1e6:.2f} MB"),
             ("pre-tokenize (regex V1) + count", f"{t2 - t1:.2f} s",
              f"{sum(chunks.values()):,} chunks, {len(chunks):,} distinct"),
             (f"learn {len(ranks) - 256:,} merges", f"{t3 - t2:.2f} s", f"{len(ranks):,} ranks"),
             ("train total", f"{t3 - t0:.2f} s", "target < 60 s")]

    tok = T.Tokenizer(ranks)
    t4 = time.perf_counter()
    ids = tok.encode(text)
    t5 = time.perf_counter()
    assert tok.decode(ids) == text  # a benchmark of a wrong encoder is worthless
    rows += [("encode the same text (tiktoken, 1 thread)", f"{t5 - t4:.2f} s",
              f"{n_bytes / 1e6 / (t5 - t4):.1f} MB/s, {n_bytes / len(ids):.2f} bytes/token")]
    demo = T.Tokenizer.load(T.DEMO_RANK_FILE)
    t6 = time.perf_counter()
    demo_ids = demo.encode(text)
    t7 = time.perf_counter()
    rows += [(f"encode with demo/tiktoken.model ({demo.n_ranks:,} ranks)", f"{t7 - t6:.2f} s",
              f"{n_bytes / 1e6 / (t7 - t6):.1f} MB/s, {n_bytes / len(demo_ids):.2f} bytes/token")]

    print(f"# {datetime.date.today()}  Python {sys.version.split()[0]}  tiktoken "
          f"{tiktoken.__version__}  {platform.processor() or platform.machine()}  {os.cpu_count()} "
          "CPUs visible")
    print(f"# python {' '.join(sys.argv)}")
    w = max(len(r[0]) for r in rows)
    print(f"| {'step':<{w}} | {'time':>8} | notes")
    print(f"|{'-' * (w + 2)}|{'-' * 10}|{'-' * 40}")
    for name, secs, note in rows:
        print(f"| {name:<{w}} | {secs:>8} | {note}")


if __name__ == "__main__":
    main()
