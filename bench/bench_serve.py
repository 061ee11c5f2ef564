"""Benchmark serve.py: requests/s, completion tokens/s and time to first token with 1 and 8
concurrent clients.

Starts the server in this process on a free loopback port (the HTTP, SSE and JSON work is all there,
as in production; only the process is shared with the clients), then each of C client threads sends
its requests one after another with the official `openai` client, streamed, so time to first token
(TTFT) is the moment the first content or tool-call delta arrives. The server runs one request at a
time (serve.py, docstring point 4), so with 8 clients requests/s stays that of one client and TTFT
grows with the queue: this table is the argument for continuous batching, which real engines (vLLM,
SGLang) do and this reference does not.

Model: --ckpt, else the shipped demo model (demo/), else a random-weight model of the demo's preset
(cpu-small), saved to a temporary directory with demo/tiktoken.model beside it: same shapes, so the
same cost per token.
Run: python bench/bench_serve.py  (CPU, about a minute; needs `pip install openai`)
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

# scripts named bench_* shadow no project module; import the project's modules from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import generate as G
import serve

ROOT = Path(__file__).resolve().parents[1]  # the repository root
DEMO = ROOT / "demo"


def random_checkpoint(preset: str, out: Path) -> Path:
    """A random-weight model of `preset`, saved like a real checkpoint, with the shipped tokenizer
    beside it."""
    import dataclasses

    import torch

    import model as M
    from tokenizer import Tokenizer

    tok = Tokenizer.load(DEMO / "tiktoken.model")
    torch.manual_seed(0)
    args = dataclasses.replace(M.PRESETS[preset](), vocab_size=tok.n_vocab)
    M.Transformer(args).eval().save_pretrained(out)
    shutil.copy(DEMO / "tiktoken.model", out / "tiktoken.model")
    return out


def one_request(client, i: int, max_tokens: int) -> dict:
    """One streamed request: seconds to the first content/tool-call delta, seconds in all,
    completion tokens."""
    t0 = time.perf_counter()
    ttft, usage = None, None
    stream = client.chat.completions.create(
        model=serve.DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "Tell me a story, "
                                                                              f"number {i}."}],
        max_tokens=max_tokens, seed=i, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        if ttft is None and delta is not None and (delta.content or delta.tool_calls):
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            usage = chunk.usage
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "total": total,
            "tokens": usage.completion_tokens}


def run(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """C threads, each sending per_client requests back to back. Returns the table row."""
    import openai

    results: list[dict] = []
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0)
        for k in range(per_client):
            r = one_request(client, 1000 * c + k, max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    return {"clients": clients, "requests": len(results), "wall": wall, "rps": len(results) / wall,
            "tok_s": sum(r["tokens"] for r in results) / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p90": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
            "latency_p50": statistics.median(r["total"] for r in results),
            "tokens_mean": statistics.mean(r["tokens"] for r in results)}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="requests/s and time to first token of serve.py, 1 and "
                                            "8 clients")
    # --- what to serve
    p.add_argument("--ckpt", default="",
                   help="checkpoint directory; default: demo/, else a random cpu-small model")
    p.add_argument("--device", default="", help="cpu | cuda | mps; empty = pick the best available")
    p.add_argument("--dtype", default="",
                   help="fp32 | bf16 | fp16; empty = bf16 on a capable GPU, else fp32")
    # --- the load
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8],
                   help="concurrent clients, one row each")
    p.add_argument("--requests", type=int, default=16,
                   help="requests per row (split evenly over the clients)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    G.add_threads_argument(p)
    a = p.parse_args(argv)
    G.set_threads(a.threads)  # before the server's worker thread starts: it inherits the count
    with tempfile.TemporaryDirectory() as tmp:
        if a.ckpt:
            ckpt, what = Path(a.ckpt), a.ckpt
        elif (DEMO / "config.json").exists():
            ckpt, what = DEMO, "demo/ (the shipped demo model)"
        else:
            ckpt = random_checkpoint("cpu-small", Path(tmp) / "ckpt")
            what = "random cpu-small (demo/ has no model)"
        engine = serve.ModelEngine.load(ckpt, a.device, a.dtype)
        server = serve.ChatServer(engine, "127.0.0.1", 0, log=lambda line: None)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        import torch

        print(f"model: {what}; {engine.description}")
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
              f"with {torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d')}")
        print(f"each request: streamed, max_tokens={a.max_tokens}, temperature 0.6, a different "
              "seed")
        run(server.url, 1, 2, a.max_tokens)  # warm-up: first-call allocations, connection setup
        rows = [run(server.url, c, max(1, a.requests // c), a.max_tokens) for c in a.clients]
        server.close()
    print("\n| clients | requests | req/s | completion tok/s | TTFT p50 | TTFT p90 | latency p50 | "
          "tokens/request |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['rps']:.2f} | {r['tok_s']:.0f} | "
              f"{r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p90'] * 1e3:.0f} ms | "
              f"{r['latency_p50'] * 1e3:.0f} ms | {r['tokens_mean']:.1f} |")


if __name__ == "__main__":
    main()
