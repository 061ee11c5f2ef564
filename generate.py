"""Text generation for Kimi K2: sampling, the cached decode loop, streaming, and the command line.

How generation works here (the same loop a serving engine runs, minus batching tricks):
1. Prefill: the whole prompt goes through the model in ONE forward pass, which fills MLA's latent
   cache (attention.KVCache: 576 numbers per token and layer for K2) and gives the logits of the
   next token.
2. Decode: one token at a time. Each step feeds only the newest token; attention reads the cached
   latents with the weight-absorbed formulation (no per-head keys or values are ever rebuilt).
   `use_cache=False` instead recomputes the whole sequence every step: the plain twin the tests
   compare against.
3. Sampling (`sample`): temperature (default 0.6, the value Moonshot recommends for
   Kimi-K2-Instruct; 0 = greedy), then top-k, then top-p, from fp32 logits, with an explicit
   torch.Generator so a seed reproduces a run. Optionally the first tokens are constrained to begin
   one of given id sequences (`constrain_start`).
4. Stop on <|im_end|> or [EOS] (K2's two stop tokens: the chat template ends turns with <|im_end|>,
   [EOS] is tokenizer_config.json's eos_token), on a user stop string, or at max_new_tokens. Text
   that may still become a stop string is held back until it is known (`held_back`).

`python generate.py` loads the shipped demo model (demo/: Hugging Face format + tiktoken.model)
and, on a terminal, opens a chat REPL with the chat template (`--tools` lets the model call the
built-in tools); `--prompt TEXT` (or a stdin that is not a terminal) answers one message. The
command line samples greedily for the demo model, whose accuracy figures are greedy, and at K2's
0.6 for other checkpoints. Device, dtype, CPU threads and the memory check come from runtime.py.
`torchrun --nproc-per-node W generate.py ...` runs the same loop with the model split over W
processes (parallel.py): every rank runs every step, rank 0's sampled token is broadcast so all
ranks decode the same sequence, only rank 0 prints, and a rank that fails ends the job with its
error instead of leaving it hanging.
Shapes: B batch, T tokens, V vocab.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

import parallel
from model import ModelArgs, Transformer
from runtime import (add_threads_argument, check_memory, find_checkpoint, number_arg, pick_device,
                     pick_dtype, set_threads)
from tokenizer import Tokenizer

DEMO_DIR = Path(__file__).resolve().parent / "demo"
# Kimi-K2-Instruct's recommended temperature (MoonshotAI/Kimi-K2 README)
DEFAULT_TEMPERATURE = 0.6
# Prompts longer than this are prefilled in pieces through the cache: the activations of one
# forward grow with its token count (`python model.py --plan` estimates them), the cache does not
# care how it was filled.
PREFILL_CHUNK = 8192
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS, vllm/sampling_params.py): the
# distribution is a point mass anyway, and dividing fp32 logits by a tinier number overflows them
# to inf (then softmax gives NaN).
GREEDY_BELOW = 1e-5


# --------------------------------------------------------------------------------------------------
# Sampling


class NonFiniteLogits(ValueError):
    """The model's logits are not numbers: a fault of the model, not of the request (serve.py
    answers it with 500)."""


def sample(logits: Tensor, temperature: float = DEFAULT_TEMPERATURE, top_k: int = 0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row. logits (B, V) -> ids (B,) int64.

    temperature 0 (or below GREEDY_BELOW) = argmax. Otherwise logits/temperature, keep the top_k
    largest (0 = all), then the smallest set of most likely tokens whose probability reaches top_p
    (1.0 = all; the most likely token is always kept).
    """
    # NaN fails every comparison
    if not 0 <= temperature < math.inf or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need a finite temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                         f"got {temperature}, {top_p}, {top_k}")
    # fp32: sampling from bf16 logits would distort small probabilities
    logits = logits.float()
    # NaN or +inf: argmax would pick it silently, multinomial would fail deep inside torch
    # (-inf is a masked token)
    if bool((logits.isnan() | logits.isposinf()).any()):
        raise NonFiniteLogits("the model produced NaN logits (or +inf ones), so no token can be "
                              "sampled: its weights hold NaN or inf values (a damaged or diverged "
                              "checkpoint), or the dtype overflowed (try --dtype fp32)")
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # exercise: top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token if the tokens before it already reach top_p (so the first token is always
        # kept)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        # explicitly: a top_p below fp32's smallest number compares as 0 and would drop it too
        drop[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        # end exercise: top_p
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# The decode loop


@dataclass
class SamplingParams:
    """What a caller may ask of one generation (the OpenAI request fields map onto these)."""
    max_new_tokens: int = 64
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # stop strings (not included in the output)
    stop: Sequence[str] = field(default_factory=tuple)
    # the completion must begin with one of these id sequences (constrained decoding; empty = no
    # constraint)
    allowed_starts: Sequence[Sequence[int]] = field(default_factory=tuple)


def check_context(model: Transformer, prompt_len: int, max_new_tokens: int) -> None:
    """A clear error when prompt + requested tokens do not fit the model's context."""
    limit = model.args.max_position_embeddings
    if prompt_len == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{prompt_len + max_new_tokens} exceeds the model's context of {limit} "
                         f"tokens; shorten the prompt or ask for at most "
                         f"{max(limit - prompt_len, 0)} new tokens")


def constrain_start(logits: Tensor, generated: Tensor,
                    allowed_starts: Sequence[Sequence[int]]) -> Tensor:
    """Constrained decoding of the first tokens. logits (B, V), generated (B, t): the ids each row
    has produced so far.

    While a row's ids are a proper prefix of some of `allowed_starts`, only the tokens that continue
    one of them keep their logits (the rest become -inf), so the model still chooses among the
    allowed starts by its own probabilities; once one of them is complete the row is free.
    (serve.py uses it so that tool_choice "required" calls a declared tool: the starts are
    `functions.NAME:IDX<|tool_call_argument_begin|>`, one per tool.)
    """
    t = generated.shape[1]
    if not allowed_starts or t >= max(len(s) for s in allowed_starts):
        return logits
    out = logits.clone()
    for b, done in enumerate(generated.tolist()):
        if any(list(s) == done for s in allowed_starts):
            continue  # an allowed start is complete: free from here on
        nxt = sorted({s[t] for s in allowed_starts if len(s) > t and list(s[:t]) == done})
        if nxt:
            keep = out[b, nxt].clone()
            out[b] = float("-inf")
            out[b, nxt] = keep
    return out


# no autograd bookkeeping at all: ~8% faster decode than no_grad on CPU
@torch.inference_mode()
def generate_tokens(model: Transformer, prompt: Tensor, max_new_tokens: int,
                    temperature: float = DEFAULT_TEMPERATURE, top_k: int = 0, top_p: float = 1.0,
                    generator: torch.Generator | None = None, stop_ids: Sequence[int] = (),
                    use_cache: bool = True, prefill_chunk: int = PREFILL_CHUNK,
                    allowed_starts: Sequence[Sequence[int]] = ()) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,) per step, until max_new_tokens or every row has hit
    a stop id.

    prompt (B, T) int64 (rows of equal length). Rows that stopped keep yielding their stop id. With
    use_cache the prompt is prefilled once (in pieces of prefill_chunk tokens) and each step feeds
    one token; without, the whole sequence is recomputed every step. Under parallelism every rank
    continues with rank 0's token. allowed_starts: the rows' first tokens are constrained to begin
    one of these id sequences (constrain_start).
    """
    B, T = prompt.shape
    check_context(model, T, max_new_tokens)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=prompt.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    cache = model.new_cache(B, T + max_new_tokens) if use_cache else None
    seq = prompt
    # prefill: the prompt through the model once, filling the latent cache
    if use_cache:
        for s in range(0, T, prefill_chunk):
            logits = model(prompt[:, s:s + prefill_chunk], cache, last_only=True)[:, -1]  # (B, V)
    else:
        logits = model(prompt, last_only=True)[:, -1]  # (B, V)
    for step in range(max_new_tokens):
        logits = constrain_start(logits, seq[:, T:], allowed_starts)
        # all ranks hold the same logits, but their generators may differ (an unseeded run):
        # rank 0's token wins
        nxt = parallel.broadcast_(sample(logits, temperature, top_k, top_p, generator))  # (B,)
        # finished rows repeat their stop token
        nxt = torch.where(done, seq[:, -1] if step else nxt, nxt)
        done |= torch.isin(nxt, stop)
        yield nxt
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        seq = torch.cat([seq, nxt[:, None]], dim=1)  # (B, T + step + 1)
        if use_cache:
            # decode: one token against the latent cache
            logits = model(nxt[:, None], cache)[:, -1]  # (B, V)
        else:
            # the plain twin: recompute everything
            logits = model(seq, last_only=True)[:, -1]  # (B, V)


class TextStream:
    """Stream text from one prompt: iterate to get text pieces as they are produced.

    After iteration: `text` (the whole completion, stop string or stop token excluded),
    `finish_reason` ("stop" on a stop token or string, "length" at max_new_tokens),
    `prompt_tokens`, `completion_tokens`, `seconds`. Multi-byte characters split across tokens are
    held back until complete (tokenizer.StreamDecoder), and so is text that might be the start of a
    stop string (held_back). mask_pipes=True: the text of ordinary tokens has its '|' masked
    (tokenizer.PIPE_MASK), so K2's markers in it come only from special ids; stop strings are then
    matched against the masked text.
    """

    def __init__(self, model: Transformer, tok: Tokenizer, prompt_ids: Sequence[int],
                 params: SamplingParams, mask_pipes: bool = False):
        check_context(model, len(prompt_ids), params.max_new_tokens)
        self.model, self.tok, self.prompt_ids, self.params = model, tok, list(prompt_ids), params
        self.mask_pipes = mask_pipes
        self.text, self.finish_reason = "", None
        self.prompt_tokens, self.completion_tokens, self.seconds = len(self.prompt_ids), 0, 0.0

    def __iter__(self) -> Iterator[str]:
        p, tok = self.params, self.tok
        device = self.model.lm_head.weight.device
        gen = torch.Generator(device=device)
        gen.manual_seed(p.seed if p.seed is not None else torch.seed())
        prompt = torch.tensor([self.prompt_ids], dtype=torch.long, device=device)
        dec, pending, t0 = tok.stream_decoder(self.mask_pipes), "", time.perf_counter()
        self.finish_reason = "length"
        tokens = generate_tokens(self.model, prompt, p.max_new_tokens, p.temperature, p.top_k,
                                 p.top_p, gen, stop_ids=tok.stop_ids,
                                 allowed_starts=p.allowed_starts)
        for ids in tokens:
            self.completion_tokens += 1
            token = int(ids[0])
            if token in tok.stop_ids:
                self.finish_reason = "stop"
                break
            pending += dec.feed(token)
            hits = (i for i in (pending.find(s) for s in p.stop if s) if i >= 0)
            hit = min(hits, default=-1)
            if hit >= 0:  # a stop string appeared: emit what precedes it and end
                self.text += pending[:hit]
                yield pending[:hit]
                self.finish_reason, pending = "stop", ""
                break
            safe = len(pending) - held_back(pending, p.stop)
            if safe:
                self.text += pending[:safe]
                yield pending[:safe]
                pending = pending[safe:]
        tail = pending + (dec.flush() if self.finish_reason == "length" else "")
        if tail:
            self.text += tail
            yield tail
        self.seconds = time.perf_counter() - t0


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of stops: text a stream
    must hold back, since it may still become that stop string (or marker)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# --------------------------------------------------------------------------------------------------
# Loading


def load(ckpt: str | Path = DEMO_DIR, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    """A Hugging Face-format directory with config.json, safetensors weights and tiktoken.model (or
    a train.py run folder, whose ckpt/ is loaded). The weights' size is checked against the
    device's memory before allocating."""
    given, ckpt = ckpt, find_checkpoint(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist; give a folder with "
                                f"config.json, *.safetensors and tiktoken.model "
                                f"(the shipped one: {DEMO_DIR})")
    if not (ckpt / "tiktoken.model").exists():
        raise FileNotFoundError(f"{ckpt} has no tiktoken.model; a checkpoint directory needs its "
                                f"tokenizer beside the weights (see README: 'The demo model')")
    device = torch.device(device)
    check_memory(ModelArgs.from_json(ckpt), device, dtype.itemsize, f"the checkpoint {given}",
                 f"its {str(dtype).removeprefix('torch.')} weights need",
                 "use a smaller checkpoint, --dtype bf16, or split it over more devices with "
                 "torchrun")
    tok = Tokenizer.load(ckpt / "tiktoken.model")
    model = Transformer.from_pretrained(ckpt, device=device, dtype=dtype).eval()
    if tok.n_vocab > model.args.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} ids but the model only "
                         f"{model.args.vocab_size} rows")
    return model, tok


# --------------------------------------------------------------------------------------------------
# Command line


DEFAULT_PROMPT = "Hello! Who are you?"


def is_demo(ckpt: str | Path) -> bool:
    return find_checkpoint(ckpt).resolve() == DEMO_DIR.resolve()


def _print_stream(stream: TextStream) -> None:
    # every rank runs the loop (each step is a collective); rank 0 prints
    for piece in stream:
        parallel.print0(piece, end="", flush=True)
    parallel.print0()


CHAT_BANNER = ("chat: type a message; /exit to quit, /tools to list the tools, /clear to start a "
               "fresh conversation (the small demo model answers best in a fresh one: it was "
               "fine-tuned on one-question conversations only)")


def chat_repl(model: Transformer, tok: Tokenizer, params: SamplingParams, use_tools: bool) -> None:
    """Read user turns from stdin; /exit, /clear (forget the conversation), /tools (list the
    tools)."""
    import tools as T

    registry = T.default_registry() if use_tools else None
    messages: list[dict] = []
    print(CHAT_BANNER, flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/clear":
            messages = []
            print("(conversation cleared)", flush=True)
            continue
        if line == "/tools":
            if registry is None:
                print("  (no tools: start with --tools)", flush=True)
            else:
                print("\n".join(f"  {s['function']['name']}: {s['function'].get('description', '')}"
                                for s in registry.schemas()), flush=True)
            continue
        messages.append({"role": "user", "content": line})

        def complete(msgs: list[dict], tool_schemas: list[dict] | None) -> str:
            ids, _ = tok.encode_chat(msgs, tool_schemas, add_generation_prompt=True)
            stream = TextStream(model, tok, ids, params)
            print("assistant: ", end="", flush=True)
            _print_stream(stream)
            return stream.text

        if registry is None:
            messages.append({"role": "assistant", "content": complete(messages, None)})
        else:
            def on_event(kind: str, text: str) -> None:
                print(f"[{kind}] {text}", flush=True)

            messages = T.run_agent(complete, messages, registry, on_event=on_event)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Generate text with a Kimi K2 checkpoint (default: the shipped demo model). "
                    "Without --prompt: a chat on a terminal, one answer to a greeting when stdin "
                    "is not a terminal.")
    # --- what to run
    p.add_argument("--ckpt", default=str(DEMO_DIR),
                   help="Hugging Face-format checkpoint directory with tiktoken.model, or a "
                        "train.py run folder (its ckpt/); default: the shipped demo model, demo/")
    p.add_argument("--prompt", default=None,
                   help=f"answer this one user message (chat-formatted) and exit; without it: chat "
                        f"on a terminal, else the prompt {DEFAULT_PROMPT!r}")
    p.add_argument("--raw", action="store_true",
                   help="complete --prompt as plain text, without the chat template")
    p.add_argument("--chat", action="store_true",
                   help="interactive chat on stdin (/exit, /clear, /tools), also when stdin is not "
                        "a terminal")
    p.add_argument("--tools", action="store_true",
                   help="in the chat, let the model call the built-in tools")
    # --- sampling
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate after the prompt, per answer (default: %(default)s)")
    p.add_argument("--temperature", type=number_arg(float, 0), default=None,
                   help=f"0 = greedy. Default: 0 for the shipped demo model (its accuracy figures "
                        f"are greedy; sampling costs the toy model right answers), "
                        f"{DEFAULT_TEMPERATURE} for other checkpoints (Kimi-K2-Instruct's "
                        f"recommendation)")
    p.add_argument("--top-p", type=number_arg(float, 0, 1, low_open=True), default=1.0,
                   help="nucleus sampling mass (default: %(default)s = off)")
    p.add_argument("--top-k", type=number_arg(int, 0), default=0,
                   help="keep the k most likely tokens (default: %(default)s = off)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for reproducible sampling (default: a random one)")
    # --- hardware
    p.add_argument("--device", default="",
                   help="cpu | cuda | mps; empty = pick the best available")
    p.add_argument("--dtype", default="",
                   help="fp32 | bf16 | fp16; empty = bf16 on a capable GPU, else fp32")
    add_threads_argument(p)
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        p.error(f"--max-new-tokens {a.max_new_tokens}: ask for at least 1 token")
    # under torchrun: a rank that fails ends the job with its message, no hang
    with parallel.abort_on_error():
        try:
            _run(a)
        except (ValueError, OSError) as err:  # OSError: a missing or unreadable checkpoint file
            raise SystemExit(f"error: {err}") from None
    parallel.shutdown()


def _run(a: argparse.Namespace) -> None:
    # under torchrun every rank runs this function; rank 0 speaks for all of them
    say = parallel.print0
    device, why_device = pick_device(a.device)
    if parallel.launched_by_torchrun():
        device = parallel.init(device.type)  # cuda:LOCAL_RANK with NCCL, or cpu with gloo
        why_device += f"; {parallel.world_size()} ranks under torchrun, tensor + expert parallel"
        if a.chat:
            raise ValueError("--chat reads stdin in one process; under torchrun pass the message "
                             "with --prompt")
    dtype, why_dtype = pick_dtype(a.dtype, device)
    threads, why_threads = set_threads(a.threads)
    say(f"device: {device} ({why_device}); dtype: {str(dtype).removeprefix('torch.')} "
        f"({why_dtype}); {threads} CPU thread(s) ({why_threads})")
    if find_checkpoint(a.ckpt) != Path(a.ckpt):
        say(f"checkpoint: {find_checkpoint(a.ckpt)} (the checkpoint of the train.py run folder "
            f"{a.ckpt})")
    model, tok = load(a.ckpt, device, dtype)
    if parallel.world_size() > 1:
        r = model.load_report
        say(f"rank 0 holds its 1/{parallel.world_size()} share: read "
            f"{r['bytes_read'] / 2**20:,.1f} MiB of the checkpoint's "
            f"{r['checkpoint_bytes'] / 2**20:,.1f} MiB")
    temperature = a.temperature
    if temperature is None:
        temperature = 0.0 if is_demo(a.ckpt) else DEFAULT_TEMPERATURE
        which = "greedy, the demo model" if temperature == 0 else f"temperature {temperature}, K2"
        say(f"sampling: {which}'s default (--temperature T to change)")
    params = SamplingParams(a.max_new_tokens, temperature, a.top_p, a.top_k, a.seed)
    check_context(model, 1, a.max_new_tokens)
    chat = a.chat or (a.prompt is None and not a.raw and sys.stdin.isatty()
                      and not parallel.launched_by_torchrun())
    if chat:
        return chat_repl(model, tok, params, a.tools)
    if a.tools:
        say("--tools applies to the chat; generating without tools")
    prompt = a.prompt if a.prompt is not None else DEFAULT_PROMPT
    if a.raw:
        ids = tok.encode(prompt)
    else:
        ids, _ = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    stream = TextStream(model, tok, ids, params)
    say(f"prompt: {prompt!r}\n---")
    _print_stream(stream)
    rate = stream.completion_tokens / max(stream.seconds, 1e-9)
    say(f"--- {stream.completion_tokens} tokens in {stream.seconds:.2f} s ({rate:.1f} tokens/s), "
        f"finish: {stream.finish_reason}")


if __name__ == "__main__":
    main()
