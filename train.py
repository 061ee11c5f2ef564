"""Training Kimi K2 on one machine: pretraining on real text, supervised fine-tuning on chats,
MuonClip, resumable.

What one run does:
1. Data (data.py): pretraining draws windows of a tokenized corpus, `--sft` draws packed
   conversations whose loss mask keeps only what the assistant wrote.
2. The loop. LR: linear warmup, constant, then cosine decay to 10% of the peak, the shape of K2's
   schedule (2e-4 constant for 10T tokens, cosine to 2e-5 over 5.5T; K2 report) given as fractions
   of the run's steps. Gradient accumulation; bf16 autocast on a GPU (fp32 on CPU, and the reason is
   printed); optional gradient clipping; MuonClip / Muon / AdamW (muonclip.build_optimizer), whose
   step also moves the routing bias and applies QK-Clip; the optional sequence-wise balance loss.
   Every step appends one JSON line to log.jsonl: loss, lr, grad norm, per-layer max attention
   logit, clipped heads, per-layer expert-load imbalance (MaxVio), tokens/s, and the validation loss
   when measured.
3. Checkpoints (runs.py: the run folder on disk): the Hugging Face layout of model.save_pretrained
   (so transformers' DeepseekV3ForCausalLM and `python generate.py --ckpt DIR` load it) plus
   optimizer.pt, trainer_state.json (step, data-sampler and torch RNG states, log position, the
   run's flags) and a copy of tiktoken.model. Ctrl-C (or SIGTERM) saves and exits, even when pressed
   again during that save; `--resume` reproduces the uninterrupted run's losses bit for bit (same
   device and thread count: CPU kernels are deterministic, GPU ones need not be). What is never
   lost: a new run refuses an --out that holds an unfinished run or that another run is using, a
   step whose loss, validation loss or weights are not finite stops the run before anything of it
   is logged or saved over the last good checkpoint, and a kill at any moment of a save leaves the
   last complete checkpoint (runs.py says how).
4. `python train.py plot LOG... --out curves.png` (or --plot) draws loss and max-logit curves of
   several runs (runs.plot_logs).
5. Under torchrun (`torchrun --nproc-per-node 2 train.py --init CKPT ...`): tensor + expert
   parallelism (parallel.py) splits the weights, not the tokens, so every rank draws the same
   batches from the same seed and computes the same loss; rank 0 alone prints and writes log.jsonl;
   the gradient norm sums split parameters over ranks and counts replicated ones once; MuonClip
   gathers split matrices for Newton-Schulz; checkpoints gather weights and optimizer state into the
   one-process files (so --resume and generate.py work at any world size). Start from a one-process
   checkpoint (--init) to reproduce a one-process run: a random init under W ranks is a different
   draw.
6. `python train.py recipe --export demo` (recipe.py) rebuilds the demo model (demo/) from the
   repository alone: tokenizer, a short pretraining, fine-tuning on chat_data.py's conversations,
   bf16 export and the held-out evaluation, keeping finished stages so that the same command
   continues after an interruption (README "The demo model").

How this differs from a textbook training loop: the optimizer step is three things in a fixed order
(Muon/AdamW update -> routing-bias update from the step's expert loads -> QK-Clip of the heads whose
logits exceeded tau; K2 report), which is why the attention layers record their max logits during
training forwards and the MoE layers count tokens per expert; and the loss of a step is normalised
by the number of target tokens of the WHOLE step (all micro-batches), so gradient accumulation and
SFT masks weigh every supervised token equally.

The paper's comparison at toy scale (a few minutes each on a laptop CPU; add --threads 1 on a busy
machine):
    python train.py --optimizer adamw --lr 2e-3 --out runs/adamw  # at its best lr (DEFAULT_LR)
    python train.py --optimizer muon            --out runs/muon   # Muon, no QK-Clip
    python train.py --optimizer muonclip --qk-clip-tau 5 --out runs/muonclip
    python train.py plot runs/adamw runs/muon runs/muonclip --out runs/compare.png
At this scale the max logits stay far below K2's tau = 100 (the logit growth in the K2 report
appears in large models trained long; here they reach ~5-15), so a low tau shows the clip acting;
`python bench/bench_train.py` runs a shorter version of the same comparison.

Reading order: the LR schedule and the loss (the math), then the Trainer: __init__ (the run in
named steps), one training step, evaluation, the loop, saving and resuming, and last the steps that
build the run (folders, hardware, model, tokenizer, data, optimizer); then the command line. The
run folder's plumbing (lock, log, trainer_state.json and
its checks, interrupts, plots) is runs.py.

References: Kimi K2 (arXiv 2507.20534) §2.1 (MuonClip), §2.4-2.5 (schedule); Moonlight
(arXiv 2502.16982) for Muon's lr and weight decay; DeepSeek-V3 (arXiv 2412.19437) §2.1.2
(balancing), §4.2 (gradient clipping 1.0).
Shapes: B batch (sequences per micro-batch), T tokens per sequence (--seq-len), V vocab.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import model as M
import parallel
import runs
import tokenizer as tk
from data import DATA_DIR, ChatRows, TokenWindows, load_conversations, prepare_tokens
from runtime import THREADS_HELP, pick_device, pick_dtype, set_threads
from runtime import check_memory as runtime_check_memory
from muonclip import BIAS_UPDATE_SPEED, QK_CLIP_TAU, SEQ_AUX_ALPHA, _moe_modules, build_optimizer

# K2's schedule (Kimi K2 report): 2e-4 constant for 10T of 15.5T tokens, then cosine to 2e-5 over
# the last 5.5T
K2_DECAY_FRAC = 5.5 / 15.5  # = 0.355 of the run decays
K2_FINAL_LR_FRAC = 2e-5 / 2e-4  # = 0.1: decay ends at 10% of the peak
# DeepSeek-V3 §4.2: "the gradient clipping norm is set to 1.0"; K2's value is not published
GRAD_CLIP = 1.0
# Toy-scale peak lr. K2's 2e-4 goes with 67M-token batches; a 5M-parameter model on 1K-token batches
# learns far too slowly with it. Measured on cpu-small, 150 steps of 8x128 tokens, val loss:
# MuonClip 5.77 / 5.54 / 5.47 / 5.46 at lr 1e-3 / 2e-3 / 4e-3 / 8e-3; AdamW 5.85 / 5.84 / 5.92 /
# 6.23 (max logit 177!) at the same four. 4e-3 is near Muon's best (one seed; 8e-3 is no better);
# AdamW prefers 1e-3-2e-3: compare each at its own best (commands above).
DEFAULT_LR = 4e-3
# --sft's default --seq-len: the longest chat_data conversation (two tool rounds, extra tools
# declared) has about 760 tokens with the demo tokenizer (tests/test_chat_data.py holds them to it)
SFT_SEQ_LEN = 768
# print() on rank 0 only: under torchrun every rank runs this file, one speaks for them all
say = parallel.print0


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss); the message says at which step and what to try."""


# --------------------------------------------------------------------------------------------------
# 1. Learning-rate schedule and loss


def lr_at(step: int, total: int, peak: float, warmup_frac: float, decay_frac: float = K2_DECAY_FRAC,
          final_frac: float = K2_FINAL_LR_FRAC) -> float:
    """LR of update `step` (0-based) of `total`: linear warmup to `peak` over the first warmup_frac
    of the steps, constant, then cosine from peak to final_frac·peak over the last decay_frac (K2's
    shape, K2 report). The first update uses peak/warmup_steps (never 0) and the last one exactly
    final_frac·peak."""
    warmup = round(warmup_frac * total)
    decay = round(decay_frac * total)
    decay_start = total - decay
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < decay_start:
        return peak
    progress = (step - decay_start + 1) / decay  # (0, 1], 1 at the last step
    final = final_frac * peak
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def weighted_ce_sum(logits: torch.Tensor, targets: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t · CE(logits_t, y_t): logits (B, T, V) fp32, targets (B, T), weights (B, T) ->
    scalar fp32. The caller divides by the number of target tokens of the whole step."""
    # (B·T,) fp32 loss
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * weights.flatten().to(ce.device)).sum()


# --------------------------------------------------------------------------------------------------
# 2. The trainer


class Trainer:
    """Everything a run needs, built from parsed flags: `Trainer(args).run()`. Split from main() so
    tests can build one, look at its optimizer, and stop it at a chosen step (on_step)."""

    def __init__(self, args: argparse.Namespace, given: set[str] | None = None):
        given = set() if given is None else given
        # under torchrun: join the job first (once per process), so that only rank 0 prints below
        joined = None
        if parallel.launched_by_torchrun() and parallel.world_size() == 1:
            # cuda:LOCAL_RANK with NCCL, or cpu+gloo
            joined = parallel.init(pick_device(args.device)[0].type)
        resume_dir = saved = None
        if args.resume:
            resume_dir = runs.find_checkpoint(args.resume)
            saved = runs.read_trainer_state(resume_dir, make_parser())
            args = _resumed_args(args, saved, given, resume_dir)
        self.args = args
        self.out = Path(args.out)
        self.log_path = self.out / "log.jsonl"
        self.ckpt_dir = self.out / "ckpt"
        # the steps that build the run, in this order, are at the end of the class
        self._check_folders(new_run=resume_dir is None)
        self._pick_hardware(joined)
        self.model = self._build_model(resume_dir)
        self.tokenizer_path, self.tok = self._load_tokenizer(resume_dir, given)
        self.data, self.data_id = self._build_data()
        self._build_optimizer()
        self.step = 0
        self.tokens_seen = 0
        self.last_val: float | None = None
        # training seconds of the run before a resume (for the ETA and the log)
        self.elapsed_before = 0.0
        self._t_start = self._t_step = time.perf_counter()
        # the step of this run's latest checkpoint (None: none saved yet)
        self.saved_step: int | None = None
        # (checkpoint, log bytes): the log is cut back in run()
        self._resume_log: tuple[Path, int] | None = None
        # run() has (re)started the log: a second run() call only appends
        self._log_started = False

        self.out.mkdir(parents=True, exist_ok=True)
        if resume_dir is not None:
            self._load_state(resume_dir, saved)

    # -- one step
    def _set_lr(self) -> float:
        a = self.args
        lr = lr_at(self.step, a.steps, a.lr, a.warmup_frac, a.decay_frac, a.final_lr_frac)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def train_step(self) -> dict:
        """Forward/backward over grad_accum micro-batches (interruptible), then the update and its
        log line (not)."""
        a = self.args
        lr = self._set_lr()
        batches = [self.data.sample() for _ in range(a.grad_accum)]
        # every supervised target of the step weighs the same
        n_targets = float(sum(w.sum() for _, _, w in batches))
        loss_sum, aux_sum = 0.0, 0.0
        for x, y, w in batches:
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast:
                logits = self.model(x)  # (B, T, V) fp32
            loss = weighted_ce_sum(logits, y, w) / n_targets
            aux = None
            if a.seq_aux_alpha > 0:
                aux = sum(m.aux_loss for m in self.moes if m.aux_loss is not None)
            if not torch.isfinite(loss):
                raise TrainingError(self._nonfinite_message(f"loss is {loss.item()}",
                                                            self.step + 1))
            # balance loss: mean over micro-batches
            total = loss if aux is None else loss + aux / a.grad_accum
            total.backward()
            loss_sum += loss.item()
            if aux is not None:
                aux_sum += aux.item() / a.grad_accum
        gnorm_t = self.grad_norm()
        # what clip_grad_norm_ does, with the norm of the whole model
        if a.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, a.grad_clip, gnorm_t)
        gnorm = gnorm_t.item()
        if not math.isfinite(gnorm):
            raise TrainingError(self._nonfinite_message(f"the gradient norm is {gnorm}",
                                                        self.step + 1))
        # from here the step either completes (update + log line) or has not started
        with runs.defer_sigint():
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens_seen += a.grad_accum * a.batch_size * a.seq_len
            st = self.opt.last_stats
            rec = dict(step=self.step, loss=loss_sum, lr=lr, grad_norm=gnorm,
                       max_logit=st.get("max_logit", []), clipped_heads=st.get("clipped_heads", 0),
                       clipped_per_layer=st.get("clipped_per_layer", []),
                       load_maxvio=st.get("load_maxvio", []),
                       tokens=self.tokens_seen, target_tokens=int(n_targets))
            if a.seq_aux_alpha > 0:
                rec["aux_loss"] = aux_sum
            # throughput of the training step itself (validation and saving below are not counted)
            step_tokens = a.grad_accum * a.batch_size * a.seq_len
            rec["tokens_per_s"] = step_tokens / (time.perf_counter() - self._t_step)
            rec["elapsed_s"] = self.elapsed()
            if self.step % a.eval_every == 0 or self.step == a.steps:
                rec["val_loss"] = self.last_val = self.evaluate()
                # and never write NaN into the log: it is not JSON
                if not math.isfinite(rec["val_loss"]):
                    raise TrainingError(self._nonfinite_message(
                        f"the validation loss is {rec['val_loss']}", self.step))
            runs.append_log(self.log_path, rec)
            if self.step % a.save_every == 0 or self.step == a.steps:
                self.save()
        return rec

    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the whole model's gradient (a 0-dim tensor), the same on every rank. Under
        parallelism a split parameter's gradient is this rank's slice, so its squares are summed
        over ranks; a replicated parameter's gradient is full and the same on every rank
        (parallel.py's f/g operators), so it is counted once."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if parallel.world_size() == 1:
            return torch.nn.utils.get_total_norm(grads)  # exactly clip_grad_norm_'s norm
        split = self.opt.shard_dims
        # [replicated, split] sums of squares, fp32
        sq = [torch.zeros((), device=self.device) for _ in range(2)]
        for p in self.params:
            if p.grad is not None:
                sq[p in split] += p.grad.float().square().sum()
        return (sq[0] + parallel.all_reduce_(sq[1])).sqrt()

    def _nonfinite_message(self, what: str, step: int) -> str:
        a = self.args
        hints = [f"lower --lr (now {a.lr:g})"]
        if a.optimizer != "muonclip":
            hints.append("use --optimizer muonclip (QK-Clip caps attention logits)")
        elif a.qk_clip_tau > 30:
            hints.append(f"a lower --qk-clip-tau (now {a.qk_clip_tau:g})")
        if a.grad_clip <= 0 or a.grad_clip > 1:
            hints.append("clip gradients with --grad-clip 1.0")
        if self.amp_dtype != torch.float32:
            hints.append("--dtype fp32")
        if self.saved_step is not None:
            hints.append(f"restart from the last good checkpoint, step {self.saved_step} in "
                         f"{self.ckpt_dir}, with those changes: --init {self.ckpt_dir} (--resume "
                         "keeps the old flags)")
        else:
            hints.append(f"no checkpoint of this run was saved yet (--save-every {a.save_every}): "
                         "start it again with those changes")
        return f"step {step}: {what}; training stopped. Try: " + "; ".join(hints)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean CE over the fixed validation windows/rows (supervised targets only). Eval mode: no
        max-logit recording, no expert-load counting, so validation never changes QK-Clip or the
        routing bias."""
        self.model.eval()
        total, count = 0.0, 0.0
        for x, y, w in self.data.val_batches():
            with self.autocast:
                logits = self.model(x.to(self.device))
            total += weighted_ce_sum(logits, y.to(self.device), w).item()
            count += float(w.sum())
        self.model.train()
        return total / count

    # -- the loop
    def run(self, on_step: Callable[["Trainer", dict], None] | None = None) -> int:
        """Train until --steps; returns 0, or 130 after a Ctrl-C or SIGTERM (a checkpoint of the
        last completed step is saved). The --out folder is locked meanwhile: a second run writing
        the same log and checkpoint is refused."""
        lock = runs.lock_out(self.out) if parallel.rank() == 0 else None
        try:
            with runs.sigterm_as_interrupt():
                return self._run(on_step)
        finally:
            if lock is not None:
                lock.close()  # releases the flock

    def _run(self, on_step: Callable[["Trainer", dict], None] | None) -> int:
        a = self.args
        # this log already has a config line
        resumed = self._resume_log is not None or self._log_started
        if parallel.rank() == 0 and not self._log_started:
            if self._resume_log is not None:
                runs.continue_log(self.log_path, *self._resume_log, self.step)
            else:
                self.log_path.write_text("")  # a fresh run starts a fresh log
        self._log_started = True
        first = dict(event="resume" if resumed else "config", step=self.step, args=vars(a),
                     model=self.model.args.to_dict(), device=str(self.device),
                     dtype=str(self.amp_dtype).removeprefix("torch."), data=self.data_id)
        runs.append_log(self.log_path, first)
        self._t_start = time.perf_counter()
        step0, t_print, tok_print = self.step, time.perf_counter(), self.tokens_seen
        try:
            while self.step < a.steps:
                snapshot = (self.data.state(), torch.get_rng_state(), self.step)
                self._t_step = time.perf_counter()
                try:
                    rec = self.train_step()
                except KeyboardInterrupt:
                    # interrupted in forward/backward: the step never happened
                    if self.step == snapshot[2]:
                        self.data.load_state(snapshot[0])
                        torch.set_rng_state(snapshot[1])
                        self.opt.zero_grad(set_to_none=True)
                    raise
                if self.step % a.log_every == 0 or self.step in (step0 + 1, a.steps):
                    now = time.perf_counter()
                    tps = (self.tokens_seen - tok_print) / max(now - t_print, 1e-9)
                    eta = (now - self._t_start) / (self.step - step0) * (a.steps - self.step)
                    ml = max(rec["max_logit"]) if rec["max_logit"] else float("nan")
                    val = f" | val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
                    say(f"step {self.step:>5}/{a.steps} | loss {rec['loss']:.4f}{val} | lr "
                        f"{rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | max logit {ml:6.2f} | "
                        f"clipped {rec['clipped_heads']} "
                        f"| {tps:,.0f} tok/s | ETA {fmt_time(eta)}", flush=True)
                    t_print, tok_print = now, self.tokens_seen
                if on_step is not None:
                    on_step(self, rec)
        except KeyboardInterrupt:
            try:
                if self.saved_step != self.step:
                    self.save()
            except KeyboardInterrupt:
                # pressed again: save() finished the checkpoint before letting it through
                pass
            if self.saved_step == self.step:
                where = f"saved step {self.step} to {self.ckpt_dir}"
            elif self.saved_step is not None:
                # only a Ctrl-C in the instant before save() began lands here
                where = (f"step {self.step} was not saved; the last checkpoint is step "
                         f"{self.saved_step} in {self.ckpt_dir}")
            else:
                say("\ninterrupted before any checkpoint was saved; start the run again",
                    flush=True)
                return 130
            later = f"; --export {a.export} is written when the run completes" if a.export else ""
            say(f"\ninterrupted: {where}; continue with `python train.py --resume "
                f"{self.out}`{later}", flush=True)
            return 130
        try_cmd = f"python generate.py --ckpt {self.ckpt_dir}"
        if not a.sft:
            try_cmd += ' --raw --prompt "def "'
        val = "n/a" if self.last_val is None else f"{self.last_val:.4f}"
        say(f"done: {self.step} steps, {self.tokens_seen:,} tokens in "
            f"{fmt_time(self.elapsed())}; final val loss {val}; checkpoint {self.ckpt_dir} "
            f"(try: {try_cmd})")
        if a.export:
            self.export(Path(a.export), a.export_dtype)
        if a.plot and parallel.rank() == 0:
            runs.plot_logs([self.log_path], self.out / "curves.png")
        return 0

    # -- checkpoints
    def save(self) -> None:
        """model.save_pretrained with everything else written inside its atomic `extra` hook. Under
        parallelism every rank calls it: the weights and the optimizer state are gathered, and rank
        0 writes the one-process files. Weights that are not finite are never saved over the last
        good checkpoint (TrainingError instead)."""
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        # an update that overflowed: the next loss would say so, but only after this save had
        # replaced the good checkpoint with a useless one
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise TrainingError(self._nonfinite_message(
                f"the update made {bad[0]}{more} non-finite", self.step))

        def extra(tmp: Path) -> None:  # rank 0 only
            torch.save(opt_state, tmp / "optimizer.pt")
            # generate.py --ckpt reads it from here
            shutil.copyfile(self.tokenizer_path, tmp / "tiktoken.model")
            runs.write_trainer_state(tmp, self.device, step=self.step,
                                     tokens_seen=self.tokens_seen, data_id=self.data_id,
                                     data_state=self.data.state(), log_bytes=self.log_bytes(),
                                     val_loss=self.last_val, elapsed_s=self.elapsed(),
                                     args=vars(self.args))

        # gathering the optimizer state too: a Ctrl-C never leaves save() before the files exist
        with runs.defer_sigint():
            # collective; the same checkpoint whatever the world size
            opt_state = self.opt.full_state_dict()
            try:
                self.model.save_pretrained(self.ckpt_dir, extra=extra)
            except OSError as err:
                # a full disk: write_atomically's one line, plus what the run can do next
                then = "start the run again"
                if self.saved_step is not None:
                    then = (f"continue from step {self.saved_step} with "
                            f"`python train.py --resume {self.out}`")
                raise OSError(f"{err}; step {self.step} was not saved: once that is fixed, "
                              f"{then}") from None
            self.saved_step = self.step

    def export(self, path: Path, dtype: str = "fp32") -> None:
        """The model alone, for generate.py and transformers: config + safetensors + tiktoken.model,
        no optimizer or trainer state (the demo/ folder). Atomic like every save; other files
        already in `path` are kept."""
        model = self.model
        # half the file; the routing bias stays fp32 (moe.Gate._apply)
        if dtype == "bf16":
            model = copy.deepcopy(self.model).to(torch.bfloat16)
        with runs.defer_sigint():
            model.save_pretrained(path, extra=lambda tmp: shutil.copyfile(self.tokenizer_path,
                                                                          tmp / "tiktoken.model"))
        say(f"exported the model ({dtype}) to {path}")

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._t_start

    # -- resume
    def _load_state(self, ckpt: Path, saved: dict) -> None:
        runs.restore(ckpt, saved, self.data_id, self.opt, self.data, self.device)
        self.step, self.tokens_seen = saved["step"], saved["tokens_seen"]
        self.last_val, self.elapsed_before = saved.get("val_loss"), saved.get("elapsed_s", 0.0)
        self.saved_step = self.step
        self._resume_log = (ckpt, saved["log_bytes"])
        say(f"resumed at step {self.step}/{self.args.steps} from {ckpt}")

    # -- the steps of __init__: the run's folders, hardware, model, tokenizer, data, optimizer
    def _check_folders(self, new_run: bool) -> None:
        a = self.args
        folders = (("--out", a.out), ("--data-cache", a.data_cache), ("--export", a.export))
        for flag, path in folders:
            if path and Path(path).exists() and not Path(path).is_dir():
                raise ValueError(f"{flag} {path} is a file; give a folder "
                                 "(it is created if missing)")
        if a.export and Path(a.export).resolve() == self.ckpt_dir.resolve():
            raise ValueError(f"--export {a.export} is this run's own checkpoint folder: the export "
                             "would replace its fp32 weights and make it unresumable; export to "
                             "another folder")
        if new_run:
            runs.check_out_is_free(self.out)
        if a.plot and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib, which is not installed: pip install "
                             "matplotlib (or drop --plot and run `python train.py plot` later)")

    def _pick_hardware(self, joined: torch.device | None) -> None:
        a = self.args
        threads, why_threads = set_threads(a.threads)
        # saved with the run: a resume keeps the count (bit-identical losses) unless told otherwise
        a.threads = threads
        self.device, why_device = pick_device(a.device)
        if joined is not None:
            if joined.type != self.device.type:
                raise ValueError(f"the ranks joined on {joined.type} but the run's device is "
                                 f"{self.device}; give --device {self.device.type}")
            self.device = joined
            why_device += (f"; {parallel.world_size()} ranks under torchrun, "
                           "tensor + expert parallel")
        amp_dtype, why_dtype = pick_dtype(a.dtype, self.device)
        if amp_dtype == torch.float16:
            raise ValueError("fp16 training needs loss scaling, which train.py does not do; use "
                             "--dtype bf16 or fp32")
        self.amp_dtype = amp_dtype
        amp = amp_dtype != torch.float32
        self.autocast = torch.autocast(self.device.type, dtype=amp_dtype) if amp else nullcontext()
        amp_note = "; autocast, weights and optimizer state stay fp32" if amp else ""
        say(f"device: {self.device} ({why_device}); compute dtype: "
            f"{str(amp_dtype).removeprefix('torch.')} ({why_dtype}){amp_note}; {threads} CPU "
            f"thread(s) ({why_threads})")

    def _build_model(self, resume_dir: Path | None) -> M.Transformer:
        """A preset/config, a checkpoint to start from (--init), or the one to resume."""
        a = self.args
        torch.manual_seed(a.seed)
        if resume_dir is not None or a.init:
            src = resume_dir or runs.find_checkpoint(a.init)
            # before allocating
            check_memory(M.ModelArgs.from_json(src), self.device, f"the checkpoint {src}")
            # a damaged checkpoint (config.json not JSON, a *.safetensors file cut short) is a
            # ValueError naming it
            model = M.Transformer.from_pretrained(src, device=self.device, dtype=torch.float32)
            say(f"model: {'resumed' if resume_dir else 'initialised'} from {src}")
        else:
            try:
                margs = M.load_args(a.config)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"--config {a.config} is not a JSON config file ({err}); give a "
                                 "preset name or a Hugging Face config.json") from None
            # master weights in fp32; autocast supplies bf16 compute
            margs.torch_dtype = "float32"
            check_memory(margs, self.device, f"--config {a.config}")
            with torch.device(self.device):
                model = M.Transformer(margs)
        model.train()
        margs = model.args
        dims = model.shard_dims()
        # the whole model's, not this rank's share
        n_params = sum(p.numel() * (parallel.world_size() if n in dims else 1)
                       for n, p in model.named_parameters())
        say(f"model: {n_params / 1e6:.2f}M parameters, {margs.num_hidden_layers} layers, "
            f"{margs.n_routed_experts} experts top-{margs.num_experts_per_tok}; experts: "
            f"{model.set_expert_impl('auto')}")
        if a.seq_len > margs.max_position_embeddings:
            raise ValueError(f"--seq-len {a.seq_len} exceeds the model's "
                             f"max_position_embeddings={margs.max_position_embeddings}; lower "
                             "--seq-len or use a config with a longer context")
        return model

    def _load_tokenizer(self, resume_dir: Path | None,
                        given: set[str]) -> tuple[Path, tk.Tokenizer]:
        """--tokenizer, else the one inside --init/--resume, else the demo one."""
        a = self.args
        tok_path = a.tokenizer
        if tok_path is None:
            inside = (resume_dir or (runs.find_checkpoint(a.init) if a.init else None))
            has_own = inside is not None and (inside / "tiktoken.model").exists()
            tok_path = inside / "tiktoken.model" if has_own else tk.DEMO_RANK_FILE
        elif (resume_dir is not None and "tokenizer" not in given
              and (resume_dir / "tiktoken.model").exists()):
            # the run's --tokenizer file may since have moved, changed or be relative to another
            # folder: the copy saved with the checkpoint is the one it was trained with (data_id
            # checks it matches the data)
            inside = resume_dir / "tiktoken.model"
            if not Path(tok_path).is_file() or Path(tok_path).read_bytes() != inside.read_bytes():
                tok_path = inside
        tok_path = Path(tok_path)
        tok = tk.Tokenizer.load(tok_path)
        if tok.n_vocab > self.model.args.vocab_size:
            raise ValueError(f"the tokenizer {tok_path} has {tok.n_vocab} ids but the model only "
                             f"vocab_size={self.model.args.vocab_size} embedding rows; use a "
                             f"config with vocab_size >= {tok.n_vocab} or a smaller tokenizer")
        return tok_path, tok

    def _build_data(self) -> tuple[ChatRows | TokenWindows, str]:
        """(sampler, data_id): data_id names the corpus and tokenizer, so a resume on other data
        is refused."""
        a = self.args
        if a.sft:
            convs = load_conversations(a.data[0] if a.data else None, a.sft_conversations, a.seed)
            data = ChatRows(self.tok, convs, a.seq_len, a.batch_size, a.val_fraction, a.seed,
                            pack=not a.no_pack)
            fill = data.train_mask.mean()
            too_long, no_reply = data.dropped - data.unsupervised, data.unsupervised
            say(f"data: {data.n_train_convs} training / {data.n_val_convs} held-out "
                f"conversations in {len(data.train_ids)} + {len(data.val_ids)} rows of "
                f"{a.seq_len + 1} tokens ({fill:.1%} of positions supervised; "
                f"{too_long} dropped as longer than a row"
                + (f", {no_reply} as having no assistant reply" if no_reply else "") + ")")
            if too_long > 0.1 * len(convs):
                say(f"note: {too_long} of {len(convs)} conversations do not fit --seq-len "
                    f"{a.seq_len} and are never trained on; raise --seq-len to keep them")
            return data, f"sft:{data.fingerprint}"
        if parallel.rank() != 0:
            # rank 0 tokenizes and writes the cache; the others then read it
            parallel.barrier()
        tokens, info = prepare_tokens(self.tokenizer_path, a.data, a.data_max_bytes, a.data_cache)
        if parallel.rank() == 0:
            parallel.barrier()
        data = TokenWindows(tokens, a.seq_len, a.batch_size, a.val_fraction, a.seed,
                            a.val_batches)
        corpus = info["corpus"] if isinstance(info["corpus"], str) else "custom"
        say(f"data: {info['n_tokens']:,} tokens ({corpus}; "
            f"{'cached' if info['cached'] else 'tokenized now'}: {info['path']}); "
            f"{len(data.train):,} train / {len(data.val):,} validation")
        return data, f"tokens:{info['tokenizer_sha256'][:8]}-{info['text_sha256'][:12]}"

    def _build_optimizer(self) -> None:
        """The optimizer and the training-time pieces of the MoE."""
        a = self.args
        kw = dict(weight_decay=a.weight_decay, bias_update_speed=a.bias_update_speed,
                  bias_update_rule=a.bias_update_rule)
        if a.optimizer == "muonclip":
            kw["qk_clip_tau"] = a.qk_clip_tau
        self.opt = build_optimizer(a.optimizer, self.model, a.lr, **kw)
        self.moes = _moe_modules(self.model)
        for m in self.moes:
            m.seq_aux_alpha = a.seq_aux_alpha
        self.params = [p for p in self.model.parameters() if p.requires_grad]


def fmt_time(s: float) -> str:
    """Seconds as 4m05s, or 1h02m from an hour on (progress lines, the recipe's stage times)."""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def check_memory(margs: M.ModelArgs, device: torch.device, what: str) -> None:
    """Refuse a model whose training state cannot fit this machine before allocating it
    (runtime.check_memory). Training holds ~16 bytes per parameter: fp32 weights, gradients and two
    AdamW moments (Muon keeps one)."""
    runtime_check_memory(margs, device, 16, what, "training needs",
                         "use a smaller preset (cpu-small on a CPU, gpu-small on one GPU)")


# --------------------------------------------------------------------------------------------------
# 3. Command line


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a Kimi K2-architecture model (pretraining or --sft) with MuonClip; "
                    "`python train.py plot LOG... --out FILE.png` draws curves of finished runs.")
    # --- model
    p.add_argument("--config", default="cpu-small",
                   help=f"a preset ({', '.join(M.PRESETS)}) or a config.json path")
    p.add_argument("--init", default=None,
                   help="start from the weights of this checkpoint (new optimizer and schedule); "
                        "the config comes from it")
    p.add_argument("--tokenizer", default=None,
                   help="tiktoken.model rank file; default: the one in --init/--resume, else "
                        "demo/tiktoken.model")
    # --- data
    p.add_argument("--data", nargs="+", default=None,
                   help="text files/folders to pretrain on (default: the Python standard library "
                        "source); with --sft, one JSONL file")
    p.add_argument("--data-max-bytes", type=int, default=None,
                   help="use only the first N bytes of the corpus")
    p.add_argument("--data-cache", default=str(DATA_DIR),
                   help="folder for the tokenized corpus (gitignored data/)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="held-out fraction: the last tokens of the corpus, or the last "
                        "conversations with --sft")
    p.add_argument("--val-batches", type=int, default=8,
                   help="validation windows = this many batches (pretraining)")
    # --- supervised fine-tuning
    p.add_argument("--sft", action="store_true",
                   help="fine-tune on conversations; loss only on assistant tokens")
    p.add_argument("--sft-conversations", type=int, default=4000,
                   help="how many chat_data conversations to generate")
    p.add_argument("--no-pack", action="store_true",
                   help="one conversation per row (padded) instead of packing")
    # --- schedule
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (the training context); default 128, or "
                        f"{SFT_SEQ_LEN} with --sft (fits chat_data's conversations with the "
                        "demo tokenizer; longer ones are dropped and counted)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR,
                   help="peak learning rate (K2: 2e-4 at 67M-token batches)")
    p.add_argument("--warmup-frac", type=float, default=0.05,
                   help="fraction of steps of linear warmup")
    p.add_argument("--decay-frac", type=float, default=round(K2_DECAY_FRAC, 3),
                   help="fraction of steps of cosine decay at the end (K2: 5.5T of 15.5T tokens)")
    p.add_argument("--final-lr-frac", type=float, default=K2_FINAL_LR_FRAC,
                   help="decay ends at this times the peak (K2: 2e-5 / 2e-4 = 0.1)")
    # --- optimizer
    p.add_argument("--optimizer", choices=("muonclip", "muon", "adamw"), default="muonclip",
                   help="muonclip (K2), muon (no QK-Clip), adamw (every parameter on AdamW, no "
                        "QK-Clip)")
    p.add_argument("--qk-clip-tau", type=float, default=QK_CLIP_TAU,
                   help="QK-Clip threshold tau (K2: 100)")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="decoupled weight decay (K2, Moonlight: 0.1)")
    p.add_argument("--grad-clip", type=float, default=GRAD_CLIP,
                   help="clip the global grad norm (0 = off)")
    p.add_argument("--bias-update-speed", type=float, default=BIAS_UPDATE_SPEED,
                   help="routing-bias step per update (DeepSeek-V3: 0.001; 0 = frozen)")
    p.add_argument("--bias-update-rule", choices=("deepseek", "moonlight"), default="deepseek",
                   help="sign rule of DeepSeek-V3, or Moonlight's mean-centred variant")
    p.add_argument("--seq-aux-alpha", type=float, default=0.0,
                   help="sequence-wise balance loss weight (0 = off; DeepSeek-V3 uses "
                        f"{SEQ_AUX_ALPHA:g})")
    # --- run, logging, checkpoints
    p.add_argument("--out", default="runs/train",
                   help="run directory: log.jsonl, ckpt/, curves.png")
    p.add_argument("--resume", default=None,
                   help="continue the run in this directory (or checkpoint) exactly")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights and of the data sampler")
    p.add_argument("--eval-every", type=int, default=50,
                   help="validation loss every N steps (and at the end)")
    p.add_argument("--save-every", type=int, default=100,
                   help="checkpoint every N steps (and at the end, and on Ctrl-C)")
    p.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    p.add_argument("--plot", action="store_true",
                   help="write OUT/curves.png at the end (needs matplotlib)")
    p.add_argument("--export", default=None,
                   help="at the end, also write the model alone (config, weights, tiktoken.model; "
                        "no optimizer state) to this folder, e.g. demo")
    p.add_argument("--export-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights dtype of --export")
    # --- hardware
    p.add_argument("--device", default="", help="cpu | cuda | mps; empty = pick the best available")
    p.add_argument("--dtype", default="",
                   help="fp32 | bf16 compute (autocast); empty = bf16 on a capable GPU, else fp32")
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """(flags, names of the flags given explicitly): a resumed run needs to know which ones the user
    typed."""
    parser = make_parser()
    args = parser.parse_args(argv)
    probe = make_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(probe.parse_args(argv)))
    if args.seq_len is None:
        args.seq_len = SFT_SEQ_LEN if args.sft else 128
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.init and "config" in given:
        parser.error("--init takes the model config from the checkpoint; drop --config")
    if args.sft and args.data and len(args.data) != 1:
        parser.error("with --sft, --data is one JSONL file of conversations")
    return args, given


def check_args(args: argparse.Namespace, saved_in: Path | None = None) -> None:
    """The range rules of the flags. saved_in: the trainer_state.json a resumed run's flags were
    read from (those given on the command line were checked when parsed), so that an edited or
    damaged value names the file."""
    def fail(message: str) -> None:
        if saved_in is None:
            raise ValueError(message)
        raise ValueError(f"{saved_in}: its saved {message}; the file was edited or damaged, so the "
                         "run cannot continue from it: start a new run, or from its weights with "
                         f"--init {saved_in.parent}")
    positive, fraction = "must be > 0", "a fraction in [0, 1]"
    for name, ok, rule in (
            ("steps", args.steps > 0, positive), ("batch_size", args.batch_size > 0, positive),
            ("grad_accum", args.grad_accum > 0, positive), ("seq_len", args.seq_len > 0, positive),
            ("lr", 0 < args.lr < math.inf, "must be > 0 and finite"),
            ("eval_every", args.eval_every > 0, positive),
            ("save_every", args.save_every > 0, positive),
            ("log_every", args.log_every > 0, positive),
            ("val_fraction", 0 < args.val_fraction < 1, "a fraction in (0, 1)"),
            # 0 windows: a validation loss of 0/0
            ("val_batches", args.val_batches > 0, positive),
            ("data_max_bytes", args.data_max_bytes is None or args.data_max_bytes > 0, positive),
            ("sft_conversations", args.sft_conversations >= 2,
             "must be >= 2: one is held out for validation"),
            ("warmup_frac", 0 <= args.warmup_frac <= 1, fraction),
            ("decay_frac", 0 <= args.decay_frac <= 1, fraction),
            ("final_lr_frac", 0 <= args.final_lr_frac <= 1,
             fraction + ": a negative lr would climb the loss"),
            ("weight_decay", 0 <= args.weight_decay < math.inf, "must be >= 0"),
            ("grad_clip", 0 <= args.grad_clip < math.inf, "must be >= 0, 0 = off"),
            ("qk_clip_tau", args.qk_clip_tau > 0, "must be > 0; K2 uses 100"),
            ("bias_update_speed", 0 <= args.bias_update_speed < math.inf,
             "must be >= 0, 0 = frozen"),
            ("seq_aux_alpha", 0 <= args.seq_aux_alpha < math.inf, "must be >= 0, 0 = off"),
            ("threads", args.threads >= 0, "must be >= 0, 0 = automatic")):
        # NaN fails every comparison, so it lands here too
        if not ok:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range ({rule})")
    if args.warmup_frac + args.decay_frac > 1:
        fail(f"--warmup-frac {args.warmup_frac} + --decay-frac {args.decay_frac} > 1; they are "
             "fractions of the same run")


def _resumed_args(cli: argparse.Namespace, saved: dict, given: set[str],
                  ckpt: Path) -> argparse.Namespace:
    """The flags of a --resume: the checkpoint's, merged with those given (runs.merge_resume_args)
    and checked as strictly as a command line."""
    args = runs.merge_resume_args(cli, saved["args"], given)
    # the flags given here were checked already
    check_args(args, saved_in=ckpt / "trainer_state.json")
    if args.steps < saved["step"]:
        raise ValueError(f"--steps {args.steps} is below the checkpoint's step "
                         f"{saved['step']}: a resumed run can only go on; give --steps "
                         f"{saved['step']} or more")
    if not given & {"out"}:
        args.out = str(ckpt.parent)
    return args


def plot_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="train.py plot",
                                description="Loss and max-logit curves of training logs.")
    p.add_argument("logs", nargs="+",
                   help="log.jsonl files (or run directories) written by train.py")
    p.add_argument("--out", default="runs/curves.png", help="PNG to write")
    a = p.parse_args(argv)
    logs = [Path(x) / "log.jsonl" if Path(x).is_dir() else Path(x) for x in a.logs]
    runs.plot_logs(logs, a.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Under torchrun every rank runs it: the same batches and seed on every rank
    (tensor + expert parallelism splits the weights, not the tokens), rank 0 prints, logs and writes
    checkpoints, and a rank that fails ends the job with its message (parallel.abort_on_error)
    instead of leaving the others waiting."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with parallel.abort_on_error():
        try:
            if argv[:1] == ["plot"]:
                return plot_main(argv[1:])
            if argv[:1] == ["recipe"]:
                # recipe.py imports this file: imported here, not at the top
                import recipe
                return recipe.main(argv[1:])
            args, given = parse_args(argv)
            code = Trainer(args, given).run()
        except (ValueError, OSError, TrainingError) as err:
            # OSError: a folder not writable, a disk full, ... Exit status 1 with this one line;
            # under torchrun abort_on_error prints it with the rank and ends the job
            raise SystemExit(f"error: {err}") from None
        except KeyboardInterrupt:
            # outside the training loop (setup, or a second Ctrl-C): nothing half-written
            print("\ninterrupted", file=sys.stderr)
            return 130
    parallel.shutdown()
    return code


if __name__ == "__main__":
    # `python train.py recipe`: recipe.py's `import train` then finds this module instead of loading
    # a second copy, whose TrainingError main() would not catch
    sys.modules.setdefault("train", sys.modules[__name__])
    sys.exit(main())
