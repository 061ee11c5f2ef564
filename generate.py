"""Text generation for Kimi K2: sampling, the cached decode loop, streaming, and the command line.

How generation works here (the same loop a serving engine runs, minus batching tricks):
1. Prefill: the whole prompt goes through the model in ONE forward pass, which fills MLA's latent cache
   (attention.KVCache: 576 numbers per token and layer for K2) and gives the logits of the next token.
2. Decode: one token at a time. Each step feeds only the newest token; attention reads the cached latents with the
   weight-absorbed formulation (no per-head keys or values are ever rebuilt). `use_cache=False` instead recomputes
   the whole sequence every step — the plain twin the tests compare against.
3. Sampling (`sample`): temperature (default 0.6, the value Moonshot recommends for Kimi-K2-Instruct; 0 = greedy),
   then top-k, then top-p, from fp32 logits, with an explicit torch.Generator so a seed reproduces a run.
   Optionally the first tokens are constrained to begin one of given id sequences (`constrain_start`).
4. Stop on <|im_end|> or [EOS] (K2's two stop tokens: the chat template ends turns with <|im_end|>, [EOS] is
   tokenizer_config.json's eos_token), on a user stop string, or at max_new_tokens.

`python generate.py` loads the shipped demo model (demo/: Hugging Face format + tiktoken.model) and, on a terminal,
opens a chat REPL with the chat template (`--tools` lets the model call the built-in tools); `--prompt TEXT` (or a
stdin that is not a terminal) answers one message. The command line samples greedily for the demo model, whose
accuracy figures are greedy, and at K2's 0.6 for other checkpoints; `--threads` (set_threads) keeps CPU decoding
from stalling beside other busy processes.
`torchrun --nproc-per-node W generate.py ...` runs the same loop with the model split over W processes
(parallel.py): every rank runs every step, rank 0's sampled token is broadcast so all ranks decode the same
sequence, only rank 0 prints, and a rank that fails ends the job with its error instead of leaving it hanging.
Shapes: B batch, T tokens, V vocab.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

import parallel
from model import Block, ModelArgs, Transformer
from tokenizer import Tokenizer

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEFAULT_TEMPERATURE = 0.6  # Kimi-K2-Instruct's recommended temperature (MoonshotAI/Kimi-K2 README)
# Prompts longer than this are prefilled in pieces through the cache: the activations of one forward grow with its
# token count (`python model.py --plan` estimates them), the cache does not care how it was filled.
PREFILL_CHUNK = 8192
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS, vllm/sampling_params.py): the distribution is a point
# mass anyway, and dividing fp32 logits by a tinier number overflows them to inf (then softmax gives NaN).
GREEDY_BELOW = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Sampling


class NonFiniteLogits(ValueError):
    """The model's logits are not numbers: a fault of the model, not of the request (serve.py answers it with 500)."""


def sample(logits: Tensor, temperature: float = DEFAULT_TEMPERATURE, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row. logits (B, V) -> ids (B,) int64.

    temperature 0 (or below GREEDY_BELOW) = argmax. Otherwise logits/temperature, keep the top_k largest (0 = all),
    then the smallest set of most likely tokens whose probability reaches top_p (1.0 = all; the most likely token is
    always kept).
    """
    if not 0 <= temperature < math.inf or not 0 < top_p <= 1 or top_k < 0:  # NaN fails every comparison
        raise ValueError(f"need a finite temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                         f"got {temperature}, {top_p}, {top_k}")
    logits = logits.float()  # fp32: sampling from bf16 logits would distort small probabilities
    # NaN or +inf: argmax would pick it silently, multinomial would fail deep inside torch (-inf is a masked token)
    if bool((logits.isnan() | logits.isposinf()).any()):
        raise NonFiniteLogits("the model produced NaN logits (or +inf ones), so no token can be sampled: its "
                              "weights hold NaN or inf values (a damaged or diverged checkpoint), or the dtype "
                              "overflowed (try --dtype fp32)")
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
        # drop a token if the tokens before it already reach top_p (so the first token is always kept)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False  # explicitly: a top_p below fp32's smallest number compares as 0 and would drop it too
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        # end exercise: top_p
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# The decode loop


@dataclass
class SamplingParams:
    """What a caller may ask of one generation (the OpenAI request fields map onto these)."""
    max_new_tokens: int = 64
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)  # stop strings (not included in the output)
    # the completion must begin with one of these id sequences (constrained decoding; empty = no constraint)
    allowed_starts: Sequence[Sequence[int]] = field(default_factory=tuple)


def check_context(model: Transformer, prompt_len: int, max_new_tokens: int) -> None:
    """A clear error when prompt + requested tokens do not fit the model's context."""
    limit = model.args.max_position_embeddings
    if prompt_len == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{prompt_len + max_new_tokens} exceeds the model's context of {limit} tokens; "
                         f"shorten the prompt or ask for at most {max(limit - prompt_len, 0)} new tokens")


def constrain_start(logits: Tensor, generated: Tensor, allowed_starts: Sequence[Sequence[int]]) -> Tensor:
    """Constrained decoding of the first tokens. logits (B, V), generated (B, t): the ids each row has produced so far.

    While a row's ids are a proper prefix of some of `allowed_starts`, only the tokens that continue one of them keep
    their logits (the rest become -inf), so the model still chooses among the allowed starts by its own probabilities;
    once one of them is complete the row is free. (serve.py uses it so that tool_choice "required" calls a declared
    tool: the starts are `functions.NAME:IDX<|tool_call_argument_begin|>`, one per tool.)
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


@torch.inference_mode()  # no autograd bookkeeping at all: ~8% faster decode than no_grad on CPU
def generate_tokens(model: Transformer, prompt: Tensor, max_new_tokens: int, temperature: float = DEFAULT_TEMPERATURE,
                    top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                    stop_ids: Sequence[int] = (), use_cache: bool = True,
                    prefill_chunk: int = PREFILL_CHUNK,
                    allowed_starts: Sequence[Sequence[int]] = ()) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,) per step, until max_new_tokens or every row has hit a stop id.

    prompt (B, T) int64 (rows of equal length). Rows that stopped keep yielding their stop id. With use_cache the
    prompt is prefilled once (in pieces of prefill_chunk tokens) and each step feeds one token; without, the whole
    sequence is recomputed every step. Under parallelism every rank continues with rank 0's token.
    allowed_starts: the rows' first tokens are constrained to begin one of these id sequences (constrain_start).
    """
    B, T = prompt.shape
    check_context(model, T, max_new_tokens)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=prompt.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    cache = model.new_cache(B, T + max_new_tokens) if use_cache else None
    seq = prompt
    if use_cache:  # prefill: the prompt through the model once, filling the latent cache
        for s in range(0, T, prefill_chunk):
            logits = model(prompt[:, s:s + prefill_chunk], cache, last_only=True)[:, -1]  # (B, V)
    else:
        logits = model(prompt, last_only=True)[:, -1]  # (B, V)
    for step in range(max_new_tokens):
        logits = constrain_start(logits, seq[:, T:], allowed_starts)
        # all ranks hold the same logits, but their generators may differ (an unseeded run): rank 0's token wins
        nxt = parallel.broadcast_(sample(logits, temperature, top_k, top_p, generator))  # (B,)
        nxt = torch.where(done, seq[:, -1] if step else nxt, nxt)  # finished rows repeat their stop token
        done |= torch.isin(nxt, stop)
        yield nxt
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        seq = torch.cat([seq, nxt[:, None]], dim=1)  # (B, T + step + 1)
        if use_cache:
            logits = model(nxt[:, None], cache)[:, -1]  # (B, V) decode: one token against the latent cache
        else:
            logits = model(seq, last_only=True)[:, -1]  # the plain twin: recompute everything


class TextStream:
    """Stream text from one prompt: iterate to get text pieces as they are produced.

    After iteration: `text` (the whole completion, stop string or stop token excluded), `finish_reason` ("stop" on a
    stop token or string, "length" at max_new_tokens), `prompt_tokens`, `completion_tokens`, `seconds`.
    Multi-byte characters split across tokens are held back until complete (tokenizer.StreamDecoder), and so is text
    that might be the start of a stop string. mask_pipes=True: the text of ordinary tokens has its '|' masked
    (tokenizer.PIPE_MASK), so K2's markers in it come only from special ids; stop strings are then matched against
    the masked text.
    """

    def __init__(self, model: Transformer, tok: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 mask_pipes: bool = False):
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
        for ids in generate_tokens(self.model, prompt, p.max_new_tokens, p.temperature, p.top_k, p.top_p, gen,
                                   stop_ids=tok.stop_ids, allowed_starts=p.allowed_starts):
            self.completion_tokens += 1
            token = int(ids[0])
            if token in tok.stop_ids:
                self.finish_reason = "stop"
                break
            pending += dec.feed(token)
            hit = min((i for i in (pending.find(s) for s in p.stop if s) if i >= 0), default=-1)
            if hit >= 0:  # a stop string appeared: emit what precedes it and end
                self.text += pending[:hit]
                yield pending[:hit]
                self.finish_reason, pending = "stop", ""
                break
            safe = len(pending) - _held_back(pending, p.stop)
            if safe:
                self.text += pending[:safe]
                yield pending[:safe]
                pending = pending[safe:]
        tail = pending + (dec.flush() if self.finish_reason == "length" else "")
        if tail:
            self.text += tail
            yield tail
        self.seconds = time.perf_counter() - t0


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string (it may still become one)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ----------------------------------------------------------------------------------------------------------------
# Loading and device choice


def pick_device(requested: str = "") -> tuple[torch.device, str]:
    """Empty = autodetect: cuda, then mps, then cpu. Returns (device, reason). A device that is not there, or a name
    torch does not know, is a ValueError saying what to pass (torch's own errors come later, from inside a kernel)."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ValueError(f"--device {requested!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"--device {requested}: this project runs on cpu, cuda or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested} asked for, but torch sees no CUDA device; use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}, but torch sees {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("--device mps, but torch sees no usable Apple GPU (MPS); use --device cpu")
        return device, "requested with --device"
    if torch.cuda.is_available():
        return torch.device("cuda"), f"CUDA device found ({torch.cuda.get_device_name()})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps"), "Apple GPU (MPS) found"
    return torch.device("cpu"), "no CUDA or MPS device found"


def pick_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """Empty = bf16 on a GPU that supports it, fp32 otherwise. Returns (dtype, reason)."""
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if requested:
        if requested not in names:
            raise ValueError(f"--dtype must be one of {sorted(names)}, got {requested!r}")
        return names[requested], "requested with --dtype"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "GPU supports bf16 (half the memory and bandwidth of fp32)"
    return torch.float32, f"{device.type}: bf16 matmuls are slow or unsupported there, fp32 is the safe choice"


def busy_cores(cpus: set[int], seconds: float = 0.2) -> tuple[float, str]:
    """How many of these CPUs other processes keep busy right now: (cores, how it was measured).

    Linux: the per-CPU counters of /proc/stat sampled `seconds` apart, minus this process's own CPU time. Elsewhere:
    the 1-minute load average (lags behind a process that just started), or 0 where there is none."""
    def ticks() -> dict[int, tuple[int, int]]:  # cpu -> (busy, total) jiffies since boot
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *vals = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                v = [int(x) for x in vals]
                idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
                out[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))  # user..steal; guest is counted in user
        return out

    try:
        before, own0 = ticks(), time.process_time()
        time.sleep(seconds)
        after, own = ticks(), time.process_time() - own0
        busy = sum((after[c][0] - before[c][0]) / max(after[c][1] - before[c][1], 1) for c in after)
        return max(busy - own / seconds, 0.0), f"/proc/stat over {seconds:g} s"
    except (OSError, ValueError, IndexError, KeyError):
        pass
    if hasattr(os, "getloadavg"):
        return min(os.getloadavg()[0], len(cpus)), "1-minute load average"
    return 0.0, "no load figure on this system"


def cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The CPUs a cgroup v2 quota lets this process use (`docker run --cpus 2` writes "200000 100000"), or None.
    The affinity mask does not show such a quota: a container would see all of the host's cores."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def set_threads(requested: int = 0) -> tuple[int, str]:
    """Set torch's CPU thread count and return (threads, reason). 0 = automatic: OMP_NUM_THREADS if it is set (torchrun
    sets it to 1 per rank), else the cores this process may run on (its CPU affinity) that no other process is busy
    on right now, at most a cgroup quota (cpu_quota), at least 1.

    Why it matters: every parallel CPU operator (torch's OpenMP loops and MKL's matmuls) hands its work to a fixed
    team of threads and returns only when ALL of them are done; in between, GNU OpenMP (torch's Linux builds) keeps
    idle teammates spinning for 300,000 rounds before they sleep (GOMP_SPINCOUNT, libgomp manual). It cuts that to 100
    only when its OWN threads outnumber the CPUs: another process does not count. So beside a busy process, with one
    thread per core, a teammate spins on the core the late one needs, and each operator waits for a scheduler time
    slice (milliseconds). Decode runs thousands of small operators per second: a 2-core machine decoded 5-100x slower
    with 2 threads than with 1 (bench/bench_threads.py). The same call in a second Python thread was fast by accident (its
    teammate used 0.15 of a core, not a whole one): with the main thread's idle team and the new one, libgomp manages
    more threads than the 2 CPUs and throttles the spinning."""
    if requested < 0:
        raise ValueError(f"--threads {requested}: give a thread count >= 1, or 0 for automatic")
    if requested:
        torch.set_num_threads(requested)
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        n = int(os.environ["OMP_NUM_THREADS"])
        torch.set_num_threads(n)
        return n, f"OMP_NUM_THREADS={n}"
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    busy, how = busy_cores(cpus)
    n = max(1, len(cpus) - round(busy))
    quota = cpu_quota()
    why = f"{len(cpus)} core(s) available, {busy:.1f} busy with other processes ({how})"
    if quota is not None and n > quota:
        n = max(1, math.floor(quota))
        why += f", a cgroup quota of {quota:g} CPUs"
    torch.set_num_threads(n)
    return n, why + "; --threads N to choose"


THREADS_HELP = ("CPU threads for torch. 0 (default) = automatic: the cores this process may use that no other process "
                "is busy on at start (OMP_NUM_THREADS wins if set). More threads than free cores make every operator "
                "wait for a descheduled thread: beside a busy process a 2-core machine can run 5-100x slower")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """The --threads flag of generate.py, serve.py and chat_data.py eval (train.py validates its own); apply it with
    set_threads."""
    p.add_argument("--threads", type=_number(int, 0), default=0, help=THREADS_HELP)


def parameter_count(args: ModelArgs) -> int:
    """Parameters (and routing-bias buffers) of this rank's share, from the shapes: one dense and one MoE block are
    built on the meta device and multiplied by their counts, so a config with a million layers is counted at once."""
    n_moe = sum(args.is_moe_layer(layer) for layer in range(args.num_hidden_layers))
    kinds = {True: n_moe, False: args.num_hidden_layers - n_moe}
    total = 0
    with torch.device("meta"):
        for moe, count in kinds.items():
            if count:
                layer = next(i for i in range(args.num_hidden_layers) if args.is_moe_layer(i) == moe)
                total += count * sum(t.numel() for t in Block(layer, args).state_dict().values())
    rows = parallel.split(args.vocab_size, "vocab_size")[0]
    return total + 2 * rows * args.hidden_size + args.hidden_size  # embedding, lm_head, final norm


def check_memory(args: ModelArgs, device: torch.device, bytes_per_param: int, what: str, use: str, fix: str) -> None:
    """Refuse a model that cannot fit this device before allocating it: `--config kimi-k2` (or a config.json with a
    billion-row vocabulary) on a laptop would otherwise fill the memory, and the swap, before failing.
    `use` says what the bytes are for ("training needs", "fp32 weights need"), `fix` what to do instead."""
    n = parameter_count(args)
    need = bytes_per_param * n
    try:
        if device.type == "cuda":
            have = torch.cuda.get_device_properties(device).total_memory
        elif device.type == "cpu":
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        else:
            return  # MPS shares the machine's memory with no simple query; let it try
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): no check
        return
    if need > have:
        raise ValueError(f"{what} has {n / 1e9:,.2f}B parameters: {use} about {need / 2**30:,.0f} GiB "
                         f"({bytes_per_param} bytes each) but this {device.type} has {have / 2**30:,.0f} GiB; {fix}")


def find_checkpoint(ckpt: str | Path) -> Path:
    """The folder itself, or RUN/ckpt when given a train.py run folder (as `train.py --resume RUN` takes one)."""
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").exists() and (ckpt / "ckpt" / "config.json").exists():
        return ckpt / "ckpt"
    return ckpt


def load(ckpt: str | Path = DEMO_DIR, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    """A Hugging Face-format directory with config.json, safetensors weights and tiktoken.model (or a train.py run
    folder, whose ckpt/ is loaded). The weights' size is checked against the device's memory before allocating."""
    given, ckpt = ckpt, find_checkpoint(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist; give a folder with config.json, "
                                f"*.safetensors and tiktoken.model (the shipped one: {DEMO_DIR})")
    if not (ckpt / "tiktoken.model").exists():
        raise FileNotFoundError(f"{ckpt} has no tiktoken.model; a checkpoint directory needs its tokenizer beside "
                                f"the weights (see README: 'The demo model')")
    device = torch.device(device)
    check_memory(ModelArgs.from_json(ckpt), device, dtype.itemsize, f"the checkpoint {given}",
                 f"its {str(dtype).removeprefix('torch.')} weights need",
                 "use a smaller checkpoint, --dtype bf16, or split it over more devices with torchrun")
    tok = Tokenizer.load(ckpt / "tiktoken.model")
    model = Transformer.from_pretrained(ckpt, device=device, dtype=dtype).eval()
    if tok.n_vocab > model.args.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} ids but the model only {model.args.vocab_size} rows")
    return model, tok


# ----------------------------------------------------------------------------------------------------------------
# Command line


DEFAULT_PROMPT = "Hello! Who are you?"


def _number(kind: type, low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] with low_open), else argparse's usage error
    naming the flag (NaN and inf included), instead of a traceback from inside the sampler later."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ((low < value if low_open else low <= value) and value <= high and math.isfinite(value)):
            rule = f"> {low:g}" if low_open else f">= {low:g}"
            rule += f" and <= {high:g}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(f"{text} is not {'an integer' if kind is int else 'a finite number'} "
                                             f"{rule}")
        return value
    return parse


def is_demo(ckpt: str | Path) -> bool:
    return find_checkpoint(ckpt).resolve() == DEMO_DIR.resolve()


def _print_stream(stream: TextStream) -> None:
    for piece in stream:  # every rank runs the loop (each step is a collective); rank 0 prints
        parallel.print0(piece, end="", flush=True)
    parallel.print0()


CHAT_BANNER = ("chat: type a message; /exit to quit, /tools to list the tools, /clear to start a fresh conversation "
               "(the small demo model answers best in a fresh one: it was fine-tuned on one-question conversations "
               "only)")


def chat_repl(model: Transformer, tok: Tokenizer, params: SamplingParams, use_tools: bool) -> None:
    """Read user turns from stdin; /exit, /clear (forget the conversation), /tools (list the tools)."""
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
            print("\n".join(f"  {s['function']['name']}: {s['function'].get('description', '')}"
                            for s in registry.schemas()) if registry else "  (no tools: start with --tools)")
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
            messages = T.run_agent(complete, messages, registry, on_event=lambda kind, text: print(
                f"[{kind}] {text}", flush=True))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Generate text with a Kimi K2 checkpoint (default: the shipped demo model). Without --prompt: "
                    "a chat on a terminal, one answer to a greeting when stdin is not a terminal.")
    # --- what to run
    p.add_argument("--ckpt", default=str(DEMO_DIR), help="Hugging Face-format checkpoint directory with "
                                                         "tiktoken.model, or a train.py run folder (its ckpt/); "
                                                         "default: the shipped demo model, demo/")
    p.add_argument("--prompt", default=None, help="answer this one user message (chat-formatted) and exit; without "
                                                  f"it: chat on a terminal, else the prompt {DEFAULT_PROMPT!r}")
    p.add_argument("--raw", action="store_true", help="complete --prompt as plain text, without the chat template")
    p.add_argument("--chat", action="store_true", help="interactive chat on stdin (/exit, /clear, /tools), "
                                                       "also when stdin is not a terminal")
    p.add_argument("--tools", action="store_true", help="in the chat, let the model call the built-in tools")
    # --- sampling
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate after the prompt, per answer "
                                                                         "(default: %(default)s)")
    p.add_argument("--temperature", type=_number(float, 0), default=None,
                   help=f"0 = greedy. Default: 0 for the shipped demo model (its accuracy figures are greedy; "
                        f"sampling costs the toy model right answers), {DEFAULT_TEMPERATURE} for other checkpoints "
                        f"(Kimi-K2-Instruct's recommendation)")
    p.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=1.0,
                   help="nucleus sampling mass (default: %(default)s = off)")
    p.add_argument("--top-k", type=_number(int, 0), default=0,
                   help="keep the k most likely tokens (default: %(default)s = off)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for reproducible sampling (default: a random one)")
    # --- hardware
    p.add_argument("--device", default="", help="cpu | cuda | mps; empty = pick the best available")
    p.add_argument("--dtype", default="", help="fp32 | bf16 | fp16; empty = bf16 on a capable GPU, else fp32")
    add_threads_argument(p)
    a = p.parse_args(argv)
    with parallel.abort_on_error():  # under torchrun: a rank that fails ends the job with its message, no hang
        try:
            _run(a)
        except (ValueError, OSError) as err:  # OSError: a missing or unreadable checkpoint file
            sys.exit(f"error: {err}")
    parallel.shutdown()


def _run(a: argparse.Namespace) -> None:
    say = parallel.print0  # under torchrun every rank runs this function; rank 0 speaks for all of them
    device, why_device = pick_device(a.device)
    if parallel.launched_by_torchrun():
        device = parallel.init(device.type)  # cuda:LOCAL_RANK with NCCL, or cpu with gloo
        why_device += f"; {parallel.world_size()} ranks under torchrun, tensor + expert parallel"
        if a.chat:
            raise ValueError("--chat reads stdin in one process; under torchrun pass the message with --prompt")
    dtype, why_dtype = pick_dtype(a.dtype, device)
    threads, why_threads = set_threads(a.threads)
    say(f"device: {device} ({why_device}); dtype: {str(dtype).removeprefix('torch.')} ({why_dtype}); "
        f"{threads} CPU thread(s) ({why_threads})")
    if find_checkpoint(a.ckpt) != Path(a.ckpt):
        say(f"checkpoint: {find_checkpoint(a.ckpt)} (the checkpoint of the train.py run folder {a.ckpt})")
    model, tok = load(a.ckpt, device, dtype)
    if parallel.world_size() > 1:
        r = model.load_report
        say(f"rank 0 holds its 1/{parallel.world_size()} share: read {r['bytes_read'] / 2**20:,.1f} MiB of the "
            f"checkpoint's {r['checkpoint_bytes'] / 2**20:,.1f} MiB")
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {a.max_new_tokens}: ask for at least 1 token")
    temperature = a.temperature
    if temperature is None:
        temperature = 0.0 if is_demo(a.ckpt) else DEFAULT_TEMPERATURE
        say(f"sampling: {'greedy, the demo model' if temperature == 0 else f'temperature {temperature}, K2'}'s "
            f"default (--temperature T to change)")
    params = SamplingParams(a.max_new_tokens, temperature, a.top_p, a.top_k, a.seed)
    check_context(model, 1, a.max_new_tokens)
    chat = a.chat or (a.prompt is None and not a.raw and sys.stdin.isatty() and not parallel.launched_by_torchrun())
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
    say(f"--- {stream.completion_tokens} tokens in {stream.seconds:.2f} s "
        f"({stream.completion_tokens / max(stream.seconds, 1e-9):.1f} tokens/s), finish: {stream.finish_reason}")


if __name__ == "__main__":
    main()
