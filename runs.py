"""A training run on disk: its folder, lock, log, trainer_state.json, resume and its checks,
interrupt-safe saving, plots of its log.

train.py's Trainer says what a step computes; this file keeps what it leaves on disk safe and
resumable. A run folder (--out) holds:
    log.jsonl    one JSON line per optimizer step (loss, lr, grad norm, max logits, ...), after a
                 first line with the run's flags, model config, device and data (event "config",
                 or "resume" when a run continues)
    ckpt/        model.save_pretrained's Hugging Face layout, plus optimizer.pt,
                 trainer_state.json (step, sampler and torch RNG states, log position, the run's
                 flags) and a copy of tiktoken.model, all written inside its atomic `extra=` hook
    .lock        held (flock) while a run writes the folder
    curves.png   `--plot`, or `python train.py plot RUN...`

What is never lost: a new run refuses a folder that holds an unfinished run (the user forgot
--resume: check_out_is_free) or one that another run is using (lock_out); a resume keeps the log
lines up to its checkpoint (continue_log) and re-checks the saved flags and state as strictly as
the command line (read_trainer_state); Ctrl-C and SIGTERM wait until an optimizer step, a log line
or a checkpoint is complete (defer_sigint). A kill -9, a power loss or a full disk at any moment
of a save leaves the last complete checkpoint: checkpoint.write_atomically fsyncs before it renames,
and find_checkpoint finishes or undoes a save that was cut short before a run uses the folder.

Reading order: the run folder (a new run, the lock, the log), trainer_state.json (write, find,
read and check, resume), interrupts, then plots of a log.
No tensors with shapes in this file, so no shape legend.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

try:
    # POSIX advisory locks: one run per --out folder at a time
    import fcntl
except ImportError:
    # Windows: no flock; two runs sharing an --out are then not detected
    fcntl = None

import checkpoint
import parallel

STATE_VERSION = 1  # trainer_state.json format
# all a resume reads
STATE_KEYS = ("step", "tokens_seen", "data_id", "data_state", "log_bytes", "args", "torch_rng")
# print() on rank 0 only: under torchrun every rank runs train.py, one speaks for them all
say = parallel.print0


# --------------------------------------------------------------------------------------------------
# The run folder: a new run, the lock, the log


def check_out_is_free(out: Path) -> None:
    """A new run in a folder that holds an unfinished one would replace its log now and its
    checkpoint at the first save: the classic loss after a Ctrl-C is retyping the first command
    instead of adding --resume."""
    # a save killed between its renames leaves no ckpt/
    checkpoint.recover_interrupted_save(out / "ckpt")
    state = out / "ckpt" / "trainer_state.json"
    if not state.exists():
        return
    try:
        prev = json.loads(state.read_text())
        step, steps = int(prev["step"]), int(prev["args"]["steps"])
    except (ValueError, KeyError, TypeError):
        step = steps = None
    if step is None or step < steps:
        at = "" if step is None else f" (saved at step {step} of {steps})"
        raise ValueError(f"{out} holds an unfinished run{at}; continue it with `python "
                         f"train.py --resume {out}`, or give this new run another --out "
                         f"(or delete {out / 'ckpt'})")
    say(f"note: {out} holds a finished run ({steps} steps); this new run replaces its "
        "log.jsonl now and its checkpoint at the first save")


def lock_out(out: Path):
    """An exclusive advisory lock on OUT/.lock, held until the returned file is closed: two runs
    writing one log.jsonl and one ckpt/ would interleave their lines and overwrite each other's
    checkpoints. None where flock does not exist."""
    if fcntl is None:
        return None
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{out} is in use by another train.py run ({holder}); wait for "
                         "it to finish, or give this run its own --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def append_log(log_path: Path, record: dict) -> None:
    """One JSON line. Every rank computes the same record; rank 0 writes it."""
    if parallel.rank() != 0:
        return
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def continue_log(log_path: Path, ckpt: Path, n: int, step: int) -> None:
    """A resumed run's log keeps exactly the first n bytes, the lines written up to its checkpoint
    `ckpt` of step `step` (later ones belong to the steps that are done again), and goes on from
    there. Call it once the folder is locked, so that a second resume of a run that is still going
    cannot cut its live log."""
    old_log = ckpt.parent / "log.jsonl"
    if old_log.exists() and old_log.resolve() != log_path.resolve():
        # resumed into another --out: the log so far comes along
        with open(old_log, "rb") as f:
            log_path.write_bytes(f.read(n))
    elif log_path.exists():
        size = log_path.stat().st_size
        if size >= n:
            with open(log_path, "r+b") as f:
                f.truncate(n)
        else:
            # truncate() would pad it with NUL bytes, and every reader of the log would fail
            # on them
            say(f"note: {log_path} is shorter than when step {step} was saved "
                f"({size:,} < {n:,} bytes): it was edited or replaced; the new lines are "
                "appended to it as it is")
            with open(log_path, "rb+") as f:
                if size and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                    # end a cut-off line, so that the next record starts a line of its own
                    f.write(b"\n")


# --------------------------------------------------------------------------------------------------
# trainer_state.json: write, find, read and check, resume


def write_trainer_state(folder: Path, device: torch.device, **fields) -> None:
    """folder/trainer_state.json: the format version, `fields` (step, tokens_seen, data_id,
    data_state, log_bytes, val_loss, elapsed_s, args) and this process's torch RNG states, so that
    a resumed run draws the very numbers an uninterrupted one would."""
    cuda_rng = None
    if device.type == "cuda":
        cuda_rng = [_rng_to_text(s) for s in torch.cuda.get_rng_state_all()]
    state = dict(version=STATE_VERSION, **fields, torch_rng=_rng_to_text(torch.get_rng_state()),
                 cuda_rng=cuda_rng)
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))


def _rng_to_text(state: torch.Tensor) -> str:
    """A torch RNG state (uint8 tensor) as base64 text for trainer_state.json."""
    return base64.b64encode(state.numpy().tobytes()).decode()


def _rng_from_text(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for --resume/--init: PATH itself, or PATH/ckpt for a run directory
    (runtime.find_checkpoint's rule). A save that a kill interrupted is first finished or undone
    by checkpoint.recover_interrupted_save (its docstring lists every state a kill can leave and
    which folder is then the newest complete checkpoint), and its leftovers are deleted: train.py is
    about to write the folder, while generate.py and serve.py only read it (runtime's lookup) and
    leave the leftovers for from_pretrained's error to name."""
    p = Path(path)
    for cand in (p, p / "ckpt"):
        restored = checkpoint.recover_interrupted_save(cand)
        if restored is not None:
            say(f"recovered {cand} from {restored.name}, left by a save that was interrupted "
                "between its renames")
        if (cand / "config.json").exists():
            return cand
    raise FileNotFoundError(f"no checkpoint at {p} (looked for config.json in {p} and "
                            f"{p / 'ckpt'})")


def read_trainer_state(ckpt: Path, parser: argparse.ArgumentParser) -> dict:
    """The checkpoint's trainer_state.json, checked, so that a damaged or foreign file is a clear
    error naming it rather than a KeyError or a JSON message without a file name. `parser`:
    train.py's, whose flags say what type and choices each saved flag must have."""
    path = ckpt / "trainer_state.json"
    if not path.exists():
        raise FileNotFoundError(f"{ckpt} has no trainer_state.json: it holds a model, not a "
                                "training run train.py saved; start from its weights with --init "
                                "instead")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}); the run cannot continue from it: start a new "
                         f"run, or from its weights with --init {ckpt}") from None
    if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
        found = saved.get("version") if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{path} has format {found}, expected {STATE_VERSION}: it was not written "
                         f"by this train.py; start from its weights with --init {ckpt}")
    missing = [k for k in STATE_KEYS if k not in saved]
    if missing or not isinstance(saved["args"], dict):
        raise ValueError(f"{path} lacks {', '.join(missing) or 'its args'}: it is damaged; the run "
                         "cannot continue from it: start a new run, or from its weights with "
                         f"--init {ckpt}")
    problems = _state_field_problems(saved, parser)
    if problems:
        key, value, want = problems[0]
        raise ValueError(f"{path}: {key} is {repr(value)[:60]}, expected {want}; the file was "
                         "edited or damaged, so the run cannot continue from it: start a new run, "
                         f"or from its weights with --init {ckpt}")
    return saved


def _state_field_problems(saved: dict,
                          parser: argparse.ArgumentParser) -> list[tuple[str, object, str]]:
    """(field, value, what it should be) for each trainer_state.json field of the wrong type, the
    saved flags included: those get the types and choices argparse gives them (their ranges are
    checked by train.check_args)."""
    def count(v):
        # type(), not isinstance: True is an int too
        return type(v) is int and v >= 0

    def number(v):
        return type(v) in (int, float)
    fields = dict(step=(count, "a whole number >= 0"), tokens_seen=(count, "a whole number >= 0"),
                  log_bytes=(count, "a whole number >= 0"),
                  data_id=(lambda v: type(v) is str, "a string"),
                  torch_rng=(lambda v: type(v) is str, "a string"),
                  data_state=(lambda v: type(v) is dict, "an object"),
                  val_loss=(lambda v: v is None or number(v), "a number or null"),
                  elapsed_s=(lambda v: number(v) and v >= 0, "a number >= 0"))
    problems = [(k, saved[k], want) for k, (ok, want) in fields.items()
                if k in saved and not ok(saved[k])]
    args = saved["args"]
    for action in parser._actions:
        k = action.dest
        if k not in args or k == "help":
            continue
        v = args[k]
        if action.nargs == 0:  # store_true
            ok, want = type(v) is bool, "true or false"
        elif v is None:  # parse_args fills in --seq-len's default
            ok, want = action.default is None and k != "seq_len", "a value"
        elif action.nargs == "+":
            ok, want = type(v) is list and all(type(x) is str for x in v), "a list of strings"
        elif action.type in (int, float):
            ok = type(v) is int or (action.type is float and type(v) is float)
            want = "a whole number" if action.type is int else "a number"
        else:
            ok, want = type(v) is str, "a string"
        if ok and action.choices is not None and v not in action.choices:
            ok, want = False, f"one of {', '.join(action.choices)}"
        if not ok:
            problems.append((f"args.{k}", v, want))
    return problems


# Flags that do not change what is computed, so a resumed run may change them; every other flag
# comes from the checkpoint. Changing device, dtype or thread count is allowed but breaks
# bit-identity (a note is printed).
FREE_ON_RESUME = {"out", "resume", "log_every", "save_every", "eval_every", "plot", "device",
                  "dtype", "threads", "data_cache", "steps", "export", "export_dtype"}


def merge_resume_args(cli: argparse.Namespace, saved: dict, given: set[str]) -> argparse.Namespace:
    """The checkpoint's flags, except the FREE_ON_RESUME ones given on this command line. Giving a
    flag that would change the computation is an error rather than silently ignored."""
    conflicts = [k for k in given - FREE_ON_RESUME if k in saved and getattr(cli, k) != saved[k]]
    if conflicts:
        differ = ", ".join(f"--{k.replace('_', '-')} {getattr(cli, k)} (saved: {saved[k]})"
                           for k in conflicts)
        raise ValueError(f"--resume continues the saved run with its own settings, but {differ} "
                         "differ; drop them, or start a new run from the checkpoint with --init")
    merged = argparse.Namespace(**{**vars(cli), **saved})
    for k in given & FREE_ON_RESUME:
        setattr(merged, k, getattr(cli, k))
    changed = sorted(k for k in given & {"device", "dtype", "threads", "steps"}
                     if getattr(cli, k) != saved.get(k))
    if changed:
        rescaled = " (--steps rescales the lr schedule)" if "steps" in changed else ""
        say(f"note: {', '.join('--' + k for k in changed)} changed on resume; the losses will not "
            f"be bit-identical to an uninterrupted run{rescaled}")
    merged.resume = cli.resume
    return merged


def restore(ckpt: Path, saved: dict, data_id: str, opt: torch.optim.Optimizer, data,
            device: torch.device) -> None:
    """Put a checkpoint's optimizer state, data-sampler state and RNG states back, after checking
    that the run's data is the checkpoint's (`data_id`). Each damaged piece is a ValueError naming
    the file and offering --init."""
    if saved["data_id"] != data_id:
        raise ValueError(f"the data differs from the checkpoint's ({data_id} vs "
                         f"{saved['data_id']}): the corpus or tokenizer changed, so the run "
                         "cannot continue identically; use --init to start a new run from this "
                         "checkpoint instead")
    opt_path = ckpt / "optimizer.pt"
    if not opt_path.exists():
        raise FileNotFoundError(f"{ckpt} is incomplete: it has no optimizer.pt, so the run "
                                "cannot continue exactly; start a new run from its weights "
                                f"with --init {ckpt}")
    # the one-process state whatever the world size (full_state_dict); each rank keeps its
    # slices
    try:
        opt_state = torch.load(opt_path, map_location=device, weights_only=True)
        opt.load_full_state_dict(opt_state)
    except Exception as err:  # noqa: BLE001
        # a truncated zip, a foreign pickle, another model's shapes
        raise ValueError(f"{opt_path} is damaged or belongs to another model "
                         f"({type(err).__name__}: {str(err)[:200]}); start a new run from the "
                         f"weights with --init {ckpt}") from None
    try:
        data.load_state(saved["data_state"])
        torch.set_rng_state(_rng_from_text(saved["torch_rng"]))
        if saved.get("cuda_rng") and device.type == "cuda":
            torch.cuda.set_rng_state_all([_rng_from_text(s) for s in saved["cuda_rng"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{ckpt}/trainer_state.json holds a damaged sampler or RNG state "
                         f"({err}); start a new run from the weights with "
                         f"--init {ckpt}") from None


# --------------------------------------------------------------------------------------------------
# Interrupts: Ctrl-C and SIGTERM never leave a step, a log line or a checkpoint half done


def _interrupt_signals() -> list[int]:
    """Ctrl-C, and in one process also SIGTERM (`kill`, `timeout`, a cluster's preemption): both
    save and stop. Under torchrun SIGTERM keeps its default: torchrun sends it to end the other
    ranks when one fails, and a save (a collective) would wait for the rank that is gone."""
    return [signal.SIGINT] + ([signal.SIGTERM] if parallel.world_size() == 1 else [])


@contextmanager
def defer_sigint():
    """Hold Ctrl-C (and SIGTERM, see _interrupt_signals) until the block ends, then deliver it: an
    optimizer step, a log line or a checkpoint is never left half done. (Signals can only be caught
    in the main thread; elsewhere the block runs unprotected.)"""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit = []
    old = {s: signal.signal(s, lambda sig, _frame: hit.append(sig)) for s in _interrupt_signals()}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if signal.SIGINT in hit:
        raise KeyboardInterrupt
    if hit:
        # SIGTERM, to the handler it had before: inside Trainer.run, sigterm_as_interrupt makes
        # that an interrupt
        signal.raise_signal(hit[0])


@contextmanager
def sigterm_as_interrupt():
    """Inside the training loop SIGTERM does what Ctrl-C does: save the step and stop (one process,
    main thread)."""
    import threading

    def interrupt(sig, frame):
        raise KeyboardInterrupt
    main_thread = threading.current_thread() is threading.main_thread()
    if signal.SIGTERM not in _interrupt_signals() or not main_thread:
        yield
        return
    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# --------------------------------------------------------------------------------------------------
# Plots of a log (matplotlib is imported only here)


def read_log(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(config record, step records) of a log.jsonl; a resumed run's later records replace earlier
    same-step ones. A last line without its newline (a run writing it right now, or killed
    mid-write) is skipped; any other line that is not JSON is an error naming the file and line."""
    config, steps = {}, {}
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or ("event" not in rec and "step" not in rec):
                raise ValueError("not a train.py record")
        except ValueError as err:
            if i == len(lines) and not text.endswith("\n"):
                # cut off mid-write
                break
            raise ValueError(f"{path}:{i} is not a train.py log line ({err}): "
                             f"{line[:80]!r}") from None
        if rec.get("event") == "config":
            config = rec
        elif "event" not in rec:
            steps[rec["step"]] = rec
    return config, [steps[k] for k in sorted(steps)]


def plot_logs(paths: Sequence[str | os.PathLike], out: str | os.PathLike,
              smooth: float = 0.9) -> Path:
    """Training loss (EMA-smoothed, raw faint), validation loss, and the max attention logit over
    all layers per step, one curve per log, with QK-Clip's tau drawn for runs that used it. Writes a
    PNG and returns its path."""
    import matplotlib
    # files only; no display needed
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_logit) = plt.subplots(1, 2, figsize=(12, 4.5))
    taus, top = [], 0.0
    for i, path in enumerate(paths):
        config, recs = read_log(path)
        if not recs:
            raise ValueError(f"{path} has no step records")
        args = config.get("args", {})
        name = args.get("optimizer", Path(path).parent.name)
        tau = args.get("qk_clip_tau") if name == "muonclip" else None
        label = f"{name} (tau {tau:g})" if tau else name
        color = f"C{i}"
        steps = [r["step"] for r in recs]
        loss = [r["loss"] for r in recs]
        ema, s = [], loss[0]
        # exponential moving average: the per-step loss is noisy at batch sizes this small
        for v in loss:
            s = smooth * s + (1 - smooth) * v
            ema.append(s)
        ax_loss.plot(steps, loss, color=color, alpha=0.2, lw=0.8)
        ax_loss.plot(steps, ema, color=color, label=f"{label} train")
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        if val:
            ax_loss.plot(*zip(*val), "o--", color=color, ms=4, label=f"{label} val")
        logit = [(r["step"], max(r["max_logit"])) for r in recs if r.get("max_logit")]
        if logit:
            ax_logit.plot(*zip(*logit), color=color, label=label)
            top = max(top, max(v for _, v in logit))
        if tau:
            taus.append((tau, color))
    # a tau far above every curve would flatten them: name it in the title instead
    for tau, color in taus:
        if tau <= 1.5 * top:
            ax_logit.axhline(tau, color=color, ls=":", lw=1, label=f"tau = {tau:g}")
    off = sorted({t for t, _ in taus if t > 1.5 * top})
    off_note = f" (tau {', '.join(f'{t:g}' for t in off)} is off the chart)" if off else ""
    ax_logit.set_title("max attention logit" + off_note)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax_logit.set(xlabel="step", ylabel="max pre-softmax logit (all layers, heads)")
    for ax in (ax_loss, ax_logit):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return out
