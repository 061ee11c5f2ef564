"""Where and how the model runs: device, dtype, CPU threads, memory, and finding a checkpoint.

Every entry point (generate.py, serve.py, train.py, chat_data.py eval, bench/) makes the same
choices before it touches a weight, and states each with its reason on one start-up line:
- device (`pick_device`): the one asked for, checked to exist; else cuda, then mps, then cpu.
- dtype (`pick_dtype`): bf16 on a GPU that supports it, fp32 elsewhere.
- CPU threads (`set_threads`, the `--threads` flag): the cores no other process is busy on. One
  thread too many can make CPU decoding 5-100x slower (set_threads says why).
- memory (`check_memory`): a model that cannot fit this device is refused before it is allocated,
  counted from its config on the meta device (`parameter_count`).
- checkpoint (`find_checkpoint`): a Hugging Face-format folder, or a train.py run folder's ckpt/.
No shapes in this file, so no shape legend.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

import parallel
from model import Block, ModelArgs


# --------------------------------------------------------------------------------------------------
# Device and dtype


def pick_device(requested: str = "") -> tuple[torch.device, str]:
    """Empty = autodetect: cuda, then mps, then cpu. Returns (device, reason).

    A device that is not there, or a name torch does not know, is a ValueError saying what to pass
    (torch's own errors come later, from inside a kernel)."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ValueError(f"--device {requested!r} is not a device name; "
                             f"use cpu, cuda, cuda:N or mps") from None
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"--device {requested}: this project runs on cpu, cuda or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested} asked for, but torch sees no CUDA device; "
                             f"use --device cpu")
        count = torch.cuda.device_count() if device.type == "cuda" else 0
        if device.type == "cuda" and device.index is not None and device.index >= count:
            raise ValueError(f"--device {requested}, but torch sees {count} CUDA device(s); "
                             f"use cuda:0 .. cuda:{count - 1}")
        mps = getattr(torch.backends, "mps", None)
        if device.type == "mps" and not (mps and torch.backends.mps.is_available()):
            raise ValueError("--device mps, but torch sees no usable Apple GPU (MPS); "
                             "use --device cpu")
        return device, "requested with --device"
    if torch.cuda.is_available():
        return torch.device("cuda"), f"CUDA device found ({torch.cuda.get_device_name()})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps"), "Apple GPU (MPS) found"
    return torch.device("cpu"), "no CUDA or MPS device found"


def pick_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """Empty = bf16 on a GPU that supports it, fp32 otherwise. Returns (dtype, reason)."""
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if requested:
        if requested not in names:
            raise ValueError(f"--dtype must be one of {sorted(names)}, got {requested!r}")
        return names[requested], "requested with --dtype"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "GPU supports bf16 (half the memory and bandwidth of fp32)"
    return torch.float32, (f"{device.type}: bf16 matmuls are slow or unsupported there, "
                           f"fp32 is the safe choice")


# --------------------------------------------------------------------------------------------------
# CPU threads


def set_threads(requested: int = 0) -> tuple[int, str]:
    """Set torch's CPU thread count and return (threads, reason).

    0 = automatic: OMP_NUM_THREADS if it is set (torchrun sets it to 1 per rank), else the cores
    this process may run on (its CPU affinity) that no other process is busy on right now, at most
    a cgroup quota (cpu_quota), at least 1.

    Why it matters: every parallel CPU operator (torch's OpenMP loops and MKL's matmuls) hands its
    work to a fixed team of threads and returns only when ALL of them are done; in between, GNU
    OpenMP (torch's Linux builds) keeps idle teammates spinning for 300,000 rounds before they
    sleep (GOMP_SPINCOUNT, libgomp manual). It cuts that to 100 only when its OWN threads outnumber
    the CPUs: another process does not count. So beside a busy process, with one thread per core, a
    teammate spins on the core the late one needs, and each operator waits for a scheduler time
    slice (milliseconds). Decode runs thousands of small operators per second: a 2-core machine
    decoded 5-100x slower with 2 threads than with 1 (bench/bench_threads.py). The same call in a
    second Python thread was fast by accident (its teammate used 0.15 of a core, not a whole one):
    with the main thread's idle team and the new one, libgomp manages more threads than the 2 CPUs
    and throttles the spinning."""
    if requested < 0:
        raise ValueError(f"--threads {requested}: give a thread count >= 1, or 0 for automatic")
    if requested:
        torch.set_num_threads(requested)
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        n = int(os.environ["OMP_NUM_THREADS"])
        torch.set_num_threads(n)
        return n, f"OMP_NUM_THREADS={n}"
    if hasattr(os, "sched_getaffinity"):
        cpus = os.sched_getaffinity(0)
    else:
        cpus = set(range(os.cpu_count() or 1))
    busy, how = busy_cores(cpus)
    n = max(1, len(cpus) - round(busy))
    quota = cpu_quota()
    why = f"{len(cpus)} core(s) available, {busy:.1f} busy with other processes ({how})"
    if quota is not None and n > quota:
        n = max(1, math.floor(quota))
        why += f", a cgroup quota of {quota:g} CPUs"
    torch.set_num_threads(n)
    return n, why + "; --threads N to choose"


def busy_cores(cpus: set[int], seconds: float = 0.2) -> tuple[float, str]:
    """How many of these CPUs other processes keep busy right now: (cores, how it was measured).

    Linux: the per-CPU counters of /proc/stat sampled `seconds` apart, minus this process's own CPU
    time. Elsewhere: the 1-minute load average (lags behind a process that just started), or 0 where
    there is none."""
    def ticks() -> dict[int, tuple[int, int]]:  # cpu -> (busy, total) jiffies since boot
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *vals = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                v = [int(x) for x in vals]
                idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
                # user..steal; guest is counted in user
                out[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))
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
    """The CPUs a cgroup v2 quota lets this process use, or None.

    `docker run --cpus 2` writes "200000 100000". The affinity mask does not show such a quota: a
    container would see all of the host's cores."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


THREADS_HELP = ("CPU threads for torch. 0 (default) = automatic: the cores this process may use "
                "that no other process is busy on at start (OMP_NUM_THREADS wins if set). More "
                "threads than free cores make every operator wait for a descheduled thread: beside "
                "a busy process a 2-core machine can run 5-100x slower")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """The --threads flag: a count >= 0, anything else is argparse's usage error. Apply it with
    set_threads."""
    p.add_argument("--threads", type=number_arg(int, 0), default=0, help=THREADS_HELP)


def number_arg(kind: type, low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] with low_open).

    Anything else is argparse's usage error naming the flag (NaN and inf included), instead of a
    traceback from deep inside the sampler later."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        in_range = (low < value if low_open else low <= value) and value <= high
        if not (in_range and math.isfinite(value)):
            rule = f"> {low:g}" if low_open else f">= {low:g}"
            rule += f" and <= {high:g}" if high < math.inf else ""
            finite = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"{text} is not {finite} {rule}")
        return value
    return parse


# --------------------------------------------------------------------------------------------------
# Memory and checkpoints


def parameter_count(args: ModelArgs) -> int:
    """Parameters (and routing-bias buffers) of this rank's share, from the shapes.

    One dense and one MoE block are built on the meta device and multiplied by their counts, so a
    config with a million layers is counted at once."""
    n_moe = sum(args.is_moe_layer(layer) for layer in range(args.num_hidden_layers))
    kinds = {True: n_moe, False: args.num_hidden_layers - n_moe}
    total = 0
    with torch.device("meta"):
        for moe, count in kinds.items():
            if count:
                layer = next(i for i in range(args.num_hidden_layers)
                             if args.is_moe_layer(i) == moe)
                total += count * sum(t.numel() for t in Block(layer, args).state_dict().values())
    rows = parallel.split(args.vocab_size, "vocab_size")[0]
    # embedding, lm_head, final norm
    return total + 2 * rows * args.hidden_size + args.hidden_size


def check_memory(args: ModelArgs, device: torch.device, bytes_per_param: int, what: str, use: str,
                 fix: str) -> None:
    """Refuse a model that cannot fit this device before allocating it.

    `--config kimi-k2` (or a config.json with a billion-row vocabulary) on a laptop would otherwise
    fill the memory, and the swap, before failing. `use` says what the bytes are for ("training
    needs", "fp32 weights need"), `fix` what to do instead."""
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
        raise ValueError(f"{what} has {n / 1e9:,.2f}B parameters: {use} about "
                         f"{need / 2**30:,.0f} GiB ({bytes_per_param} bytes each) but this "
                         f"{device.type} has {have / 2**30:,.0f} GiB; {fix}")


def find_checkpoint(ckpt: str | Path) -> Path:
    """The folder itself, or RUN/ckpt when given a train.py run folder (as `train.py --resume RUN`
    takes one). It only reads: what a save cut short by a kill left is named by from_pretrained's
    error, and repaired by runs.find_checkpoint, which train.py calls before it writes the run."""
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").exists() and (ckpt / "ckpt" / "config.json").exists():
        return ckpt / "ckpt"
    return ckpt
