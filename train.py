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
3. Checkpoints: the Hugging Face layout of model.save_pretrained (so transformers'
   DeepseekV3ForCausalLM and `python generate.py --ckpt DIR` load it) plus optimizer.pt,
   trainer_state.json (step, data-sampler and torch RNG states, log position, the run's flags) and a
   copy of tiktoken.model, all written through save_pretrained's atomic `extra=` hook. Ctrl-C (or
   SIGTERM) saves and exits, even when pressed again during that save; `--resume` reproduces the
   uninterrupted run's losses bit for bit (same device and thread count: CPU kernels are
   deterministic, GPU ones need not be). What is never lost: a new run refuses an --out that holds
   an unfinished run (the user forgot --resume) or that another run is using (a lock), and a step
   whose loss, validation loss or weights are not finite stops the run before anything of it is
   logged or saved over the last good checkpoint. A kill -9, a power loss or a full disk at any
   moment of a save leaves the last complete checkpoint (model.write_atomically fsyncs before it
   renames; --resume finishes or undoes a save that was cut short), and a resume re-checks the
   saved flags and state as strictly as the command line.
4. `python train.py plot LOG... --out curves.png` (or --plot) draws loss and max-logit curves of
   several runs.
5. Under torchrun (`torchrun --nproc-per-node 2 train.py --init CKPT ...`): tensor + expert
   parallelism (parallel.py) splits the weights, not the tokens, so every rank draws the same
   batches from the same seed and computes the same loss; rank 0 alone prints and writes log.jsonl;
   the gradient norm sums split parameters over ranks and counts replicated ones once; MuonClip
   gathers split matrices for Newton-Schulz; checkpoints gather weights and optimizer state into the
   one-process files (so --resume and generate.py work at any world size). Start from a one-process
   checkpoint (--init) to reproduce a one-process run: a random init under W ranks is a different
   draw.
6. `python train.py recipe --export demo` rebuilds the demo model (demo/) from the repository
   alone: tokenizer, a short pretraining, fine-tuning on chat_data.py's conversations, bf16 export
   and the held-out evaluation, keeping finished stages so that the same command continues after an
   interruption (README "The demo model").

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

Reading order: the LR schedule and the loss (the math), the Trainer (one step, the loop, saving),
then the plumbing: checkpoint and resume checks, plots, the command line, the recipe.

References: Kimi K2 (arXiv 2507.20534) §2.1 (MuonClip), §2.4-2.5 (schedule); Moonlight
(arXiv 2502.16982) for Muon's lr and weight decay; DeepSeek-V3 (arXiv 2412.19437) §2.1.2
(balancing), §4.2 (gradient clipping 1.0).
Shapes: B batch (sequences per micro-batch), T tokens per sequence (--seq-len), V vocab.
"""
from __future__ import annotations

import argparse
import base64
import copy
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

try:
    # POSIX advisory locks: one run per --out folder at a time
    import fcntl
except ImportError:
    # Windows: no flock; two runs sharing an --out are then not detected
    fcntl = None

import model as M
import parallel
import tokenizer as tk
from data import DATA_DIR, ChatRows, TokenWindows, load_conversations, prepare_tokens
from runtime import THREADS_HELP, add_threads_argument, pick_device, pick_dtype, set_threads
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
STATE_VERSION = 1  # trainer_state.json format
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
        resume_dir = None
        if args.resume:
            resume_dir = find_checkpoint(args.resume)
            saved = read_trainer_state(resume_dir)
            args = _merge_resume_args(args, saved["args"], given)
            # the flags given here were checked already
            check_args(args, saved_in=resume_dir / "trainer_state.json")
            if args.steps < saved["step"]:
                raise ValueError(f"--steps {args.steps} is below the checkpoint's step "
                                 f"{saved['step']}: a resumed run can only go on; give --steps "
                                 f"{saved['step']} or more")
            if not given & {"out"}:
                args.out = str(resume_dir.parent)
        self.args = a = args
        self.out = Path(a.out)
        folders = (("--out", a.out), ("--data-cache", a.data_cache), ("--export", a.export))
        for flag, path in folders:
            if path and Path(path).exists() and not Path(path).is_dir():
                raise ValueError(f"{flag} {path} is a file; give a folder "
                                 "(it is created if missing)")
        if a.export and Path(a.export).resolve() == (self.out / "ckpt").resolve():
            raise ValueError(f"--export {a.export} is this run's own checkpoint folder: the export "
                             "would replace its fp32 weights and make it unresumable; export to "
                             "another folder")
        if resume_dir is None:
            self._check_out_is_free()
        if a.plot and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib, which is not installed: pip install "
                             "matplotlib (or drop --plot and run `python train.py plot` later)")
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

        # --- the model: a preset/config, a checkpoint to start from (--init), or the one to resume
        torch.manual_seed(a.seed)
        if resume_dir is not None or a.init:
            src = resume_dir or find_checkpoint(a.init)
            # before allocating
            check_memory(M.ModelArgs.from_json(src), self.device, f"the checkpoint {src}")
            # a damaged checkpoint (config.json not JSON, a *.safetensors file cut short) is a
            # ValueError naming it
            self.model = M.Transformer.from_pretrained(src, device=self.device, dtype=torch.float32)
            say(f"model: {'resumed' if resume_dir else 'initialised'} from {src}")
        else:
            try:
                margs = M.load_args(a.config)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"--config {a.config} is not a JSON config file ({err}); give a "
                                 "preset name or a Hugging Face config.json") from None
            margs.torch_dtype = "float32"  # master weights in fp32; autocast supplies bf16 compute
            check_memory(margs, self.device, f"--config {a.config}")
            with torch.device(self.device):
                self.model = M.Transformer(margs)
        self.model.train()
        margs = self.model.args
        dims = self.model.shard_dims()
        # the whole model's, not this rank's share
        n_params = sum(p.numel() * (parallel.world_size() if n in dims else 1)
                       for n, p in self.model.named_parameters())
        say(f"model: {n_params / 1e6:.2f}M parameters, {margs.num_hidden_layers} layers, "
            f"{margs.n_routed_experts} experts top-{margs.num_experts_per_tok}; experts: "
            f"{self.model.set_expert_impl('auto')}")
        if a.seq_len > margs.max_position_embeddings:
            raise ValueError(f"--seq-len {a.seq_len} exceeds the model's "
                             f"max_position_embeddings={margs.max_position_embeddings}; lower "
                             "--seq-len or use a config with a longer context")

        # --- the tokenizer: --tokenizer, else the one inside --init/--resume, else the demo one
        tok_path = a.tokenizer
        if tok_path is None:
            inside = (resume_dir or (find_checkpoint(a.init) if a.init else None))
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
        self.tokenizer_path = Path(tok_path)
        self.tok = tk.Tokenizer.load(self.tokenizer_path)
        if self.tok.n_vocab > margs.vocab_size:
            raise ValueError(f"the tokenizer {self.tokenizer_path} has {self.tok.n_vocab} ids but "
                             f"the model only vocab_size={margs.vocab_size} embedding rows; use a "
                             f"config with vocab_size >= {self.tok.n_vocab} or a smaller tokenizer")

        # --- data
        if a.sft:
            convs = load_conversations(a.data[0] if a.data else None, a.sft_conversations, a.seed)
            self.data = ChatRows(self.tok, convs, a.seq_len, a.batch_size, a.val_fraction, a.seed,
                                 pack=not a.no_pack)
            fill = self.data.train_mask.mean()
            self.data_id = f"sft:{self.data.fingerprint}"
            too_long, no_reply = self.data.dropped - self.data.unsupervised, self.data.unsupervised
            say(f"data: {self.data.n_train_convs} training / {self.data.n_val_convs} held-out "
                f"conversations in {len(self.data.train_ids)} + {len(self.data.val_ids)} rows of "
                f"{a.seq_len + 1} tokens ({fill:.1%} of positions supervised; "
                f"{too_long} dropped as longer than a row"
                + (f", {no_reply} as having no assistant reply" if no_reply else "") + ")")
            if too_long > 0.1 * len(convs):
                say(f"note: {too_long} of {len(convs)} conversations do not fit --seq-len "
                    f"{a.seq_len} and are never trained on; raise --seq-len to keep them")
        else:
            if parallel.rank() != 0:
                parallel.barrier()  # rank 0 tokenizes and writes the cache; the others then read it
            tokens, info = prepare_tokens(self.tokenizer_path, a.data, a.data_max_bytes,
                                          a.data_cache)
            if parallel.rank() == 0:
                parallel.barrier()
            self.data = TokenWindows(tokens, a.seq_len, a.batch_size, a.val_fraction, a.seed,
                                     a.val_batches)
            self.data_id = f"tokens:{info['tokenizer_sha256'][:8]}-{info['text_sha256'][:12]}"
            corpus = info["corpus"] if isinstance(info["corpus"], str) else "custom"
            say(f"data: {info['n_tokens']:,} tokens ({corpus}; "
                f"{'cached' if info['cached'] else 'tokenized now'}: {info['path']}); "
                f"{len(self.data.train):,} train / {len(self.data.val):,} validation")

        # --- the optimizer and the training-time pieces of the MoE
        kw = dict(weight_decay=a.weight_decay, bias_update_speed=a.bias_update_speed,
                  bias_update_rule=a.bias_update_rule)
        if a.optimizer == "muonclip":
            kw["qk_clip_tau"] = a.qk_clip_tau
        self.opt = build_optimizer(a.optimizer, self.model, a.lr, **kw)
        self.moes = _moe_modules(self.model)
        for m in self.moes:
            m.seq_aux_alpha = a.seq_aux_alpha
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step = 0
        self.tokens_seen = 0
        self.log_path = self.out / "log.jsonl"
        self.ckpt_dir = self.out / "ckpt"
        self.last_val: float | None = None
        # training seconds of the run before a resume (for the ETA and the log)
        self.elapsed_before = 0.0
        self._t_start = self._t_step = time.perf_counter()
        # the step of this run's latest checkpoint (None: none saved yet)
        self.saved_step: int | None = None
        # (checkpoint, log bytes): the log is cut back in run()
        self._resume_log: tuple[Path, int] | None = None
        self._log_started = False  # run() has (re)started the log: a second run() call only appends

        self.out.mkdir(parents=True, exist_ok=True)
        if resume_dir is not None:
            self._load_state(resume_dir, saved)

    def _check_out_is_free(self) -> None:
        """A new run in a folder that holds an unfinished one would replace its log now and its
        checkpoint at the first save: the classic loss after a Ctrl-C is retyping the first command
        instead of adding --resume."""
        # a save killed between its renames leaves no ckpt/
        M.recover_interrupted_save(self.out / "ckpt")
        state = self.out / "ckpt" / "trainer_state.json"
        if not state.exists():
            return
        try:
            prev = json.loads(state.read_text())
            step, steps = int(prev["step"]), int(prev["args"]["steps"])
        except (ValueError, KeyError, TypeError):
            step = steps = None
        if step is None or step < steps:
            at = "" if step is None else f" (saved at step {step} of {steps})"
            raise ValueError(f"{self.out} holds an unfinished run{at}; continue it with `python "
                             f"train.py --resume {self.out}`, or give this new run another --out "
                             f"(or delete {self.out / 'ckpt'})")
        say(f"note: {self.out} holds a finished run ({steps} steps); this new run replaces its "
            "log.jsonl now and its checkpoint at the first save")

    # -- resume
    def _load_state(self, ckpt: Path, saved: dict) -> None:
        if saved["data_id"] != self.data_id:
            raise ValueError(f"the data differs from the checkpoint's ({self.data_id} vs "
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
            opt_state = torch.load(opt_path, map_location=self.device, weights_only=True)
            self.opt.load_full_state_dict(opt_state)
        except Exception as err:  # noqa: BLE001
            # a truncated zip, a foreign pickle, another model's shapes
            raise ValueError(f"{opt_path} is damaged or belongs to another model "
                             f"({type(err).__name__}: {str(err)[:200]}); start a new run from the "
                             f"weights with --init {ckpt}") from None
        try:
            self.data.load_state(saved["data_state"])
            torch.set_rng_state(_rng_from_text(saved["torch_rng"]))
            if saved.get("cuda_rng") and self.device.type == "cuda":
                torch.cuda.set_rng_state_all([_rng_from_text(s) for s in saved["cuda_rng"]])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{ckpt}/trainer_state.json holds a damaged sampler or RNG state "
                             f"({err}); start a new run from the weights with "
                             f"--init {ckpt}") from None
        self.step, self.tokens_seen = saved["step"], saved["tokens_seen"]
        self.last_val, self.elapsed_before = saved.get("val_loss"), saved.get("elapsed_s", 0.0)
        self.saved_step = self.step
        self._resume_log = (ckpt, saved["log_bytes"])
        say(f"resumed at step {self.step}/{self.args.steps} from {ckpt}")

    def _continue_log(self) -> None:
        """A resumed run's log keeps exactly the lines written up to its checkpoint (later ones
        belong to the steps that are done again) and goes on from there. Run once the folder is
        locked, so that a second resume of a run that is still going cannot cut its live log."""
        ckpt, n = self._resume_log
        old_log = ckpt.parent / "log.jsonl"
        if old_log.exists() and old_log.resolve() != self.log_path.resolve():
            with open(old_log, "rb") as f:  # resumed into another --out: the log so far comes along
                self.log_path.write_bytes(f.read(n))
        elif self.log_path.exists():
            size = self.log_path.stat().st_size
            if size >= n:
                with open(self.log_path, "r+b") as f:
                    f.truncate(n)
            else:
                # truncate() would pad it with NUL bytes, and every reader of the log would fail
                # on them
                say(f"note: {self.log_path} is shorter than when step {self.step} was saved "
                    f"({size:,} < {n:,} bytes): it was edited or replaced; the new lines are "
                    "appended to it as it is")
                with open(self.log_path, "rb+") as f:
                    if size and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                        # end a cut-off line, so that the next record starts a line of its own
                        f.write(b"\n")

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
            cuda_rng = None
            if self.device.type == "cuda":
                cuda_rng = [_rng_to_text(s) for s in torch.cuda.get_rng_state_all()]
            state = dict(version=STATE_VERSION, step=self.step, tokens_seen=self.tokens_seen,
                         data_id=self.data_id, data_state=self.data.state(),
                         log_bytes=self.log_bytes(), val_loss=self.last_val,
                         elapsed_s=self.elapsed(), args=vars(self.args),
                         torch_rng=_rng_to_text(torch.get_rng_state()), cuda_rng=cuda_rng)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))

        # gathering the optimizer state too: a Ctrl-C never leaves save() before the files exist
        with defer_sigint():
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
        if dtype == "bf16":  # half the file; the routing bias stays fp32 (moe.Gate._apply)
            model = copy.deepcopy(self.model).to(torch.bfloat16)
        with defer_sigint():
            model.save_pretrained(path, extra=lambda tmp: shutil.copyfile(self.tokenizer_path,
                                                                          tmp / "tiktoken.model"))
        say(f"exported the model ({dtype}) to {path}")

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._t_start

    def _log(self, record: dict) -> None:
        if parallel.rank() != 0:  # every rank computes the same record; one writes it
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

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
        if a.grad_clip > 0:  # what clip_grad_norm_ does, with the norm of the whole model
            torch.nn.utils.clip_grads_with_norm_(self.params, a.grad_clip, gnorm_t)
        gnorm = gnorm_t.item()
        if not math.isfinite(gnorm):
            raise TrainingError(self._nonfinite_message(f"the gradient norm is {gnorm}",
                                                        self.step + 1))
        # from here the step either completes (update + log line) or has not started
        with defer_sigint():
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
            self._log(rec)
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
        lock = self._lock_out() if parallel.rank() == 0 else None
        try:
            with sigterm_as_interrupt():
                return self._run(on_step)
        finally:
            if lock is not None:
                lock.close()  # releases the flock

    def _lock_out(self):
        """An exclusive advisory lock on OUT/.lock for the length of run(): two runs writing one
        log.jsonl and one ckpt/ would interleave their lines and overwrite each other's checkpoints.
        None where flock does not exist."""
        if fcntl is None:
            return None
        f = open(self.out / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(f"{self.out} is in use by another train.py run ({holder}); wait for "
                             "it to finish, or give this run its own --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        return f

    def _run(self, on_step: Callable[["Trainer", dict], None] | None) -> int:
        a = self.args
        # this log already has a config line
        resumed = self._resume_log is not None or self._log_started
        if parallel.rank() == 0 and not self._log_started:
            if self._resume_log is not None:
                self._continue_log()
            else:
                self.log_path.write_text("")  # a fresh run starts a fresh log
        self._log_started = True
        self._log(dict(event="resume" if resumed else "config", step=self.step, args=vars(a),
                       model=self.model.args.to_dict(), device=str(self.device),
                       dtype=str(self.amp_dtype).removeprefix("torch."), data=self.data_id))
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
                        f"| {tps:,.0f} tok/s | ETA {_fmt_time(eta)}", flush=True)
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
        say(f"done: {self.step} steps, {self.tokens_seen:,} tokens in {_fmt_time(self.elapsed())}; "
            f"final val loss {val}; checkpoint {self.ckpt_dir} (try: {try_cmd})")
        if a.export:
            self.export(Path(a.export), a.export_dtype)
        if a.plot and parallel.rank() == 0:
            plot_logs([self.log_path], self.out / "curves.png")
        return 0


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------------------------------------
# 3. Checkpoints, resume and interrupts


def _rng_to_text(state: torch.Tensor) -> str:
    """A torch RNG state (uint8 tensor) as base64 text for trainer_state.json."""
    return base64.b64encode(state.numpy().tobytes()).decode()


def _rng_from_text(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for --resume/--init: PATH itself, or PATH/ckpt for a run directory.
    A save that a kill interrupted is first finished or undone by model.recover_interrupted_save
    (its docstring lists every state a kill can leave and which folder is then the newest complete
    checkpoint), and its leftovers are deleted."""
    p = Path(path)
    for cand in (p, p / "ckpt"):
        restored = M.recover_interrupted_save(cand)
        if restored is not None:
            say(f"recovered {cand} from {restored.name}, left by a save that was interrupted "
                "between its renames")
        if (cand / "config.json").exists():
            return cand
    raise FileNotFoundError(f"no checkpoint at {p} (looked for config.json in {p} and "
                            f"{p / 'ckpt'})")


# all a resume reads
STATE_KEYS = ("step", "tokens_seen", "data_id", "data_state", "log_bytes", "args", "torch_rng")


def read_trainer_state(ckpt: Path) -> dict:
    """The checkpoint's trainer_state.json, checked, so that a damaged or foreign file is a clear
    error naming it rather than a KeyError or a JSON message without a file name."""
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
    problems = _state_field_problems(saved)
    if problems:
        key, value, want = problems[0]
        raise ValueError(f"{path}: {key} is {repr(value)[:60]}, expected {want}; the file was "
                         "edited or damaged, so the run cannot continue from it: start a new run, "
                         f"or from its weights with --init {ckpt}")
    return saved


def _state_field_problems(saved: dict) -> list[tuple[str, object, str]]:
    """(field, value, what it should be) for each trainer_state.json field of the wrong type, the
    saved flags included: those get the types and choices argparse gives them (their ranges are
    checked by check_args)."""
    def count(v):
        return type(v) is int and v >= 0  # type(), not isinstance: True is an int too

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
    for action in make_parser()._actions:
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
        # SIGTERM, to the handler it had before: Trainer.run makes that an interrupt
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


def check_memory(margs: M.ModelArgs, device: torch.device, what: str) -> None:
    """Refuse a model whose training state cannot fit this machine before allocating it
    (runtime.check_memory). Training holds ~16 bytes per parameter: fp32 weights, gradients and two
    AdamW moments (Muon keeps one)."""
    runtime_check_memory(margs, device, 16, what, "training needs",
                         "use a smaller preset (cpu-small on a CPU, gpu-small on one GPU)")


# Flags that do not change what is computed, so a resumed run may change them; every other flag
# comes from the checkpoint. Changing device, dtype or thread count is allowed but breaks
# bit-identity (a note is printed).
FREE_ON_RESUME = {"out", "resume", "log_every", "save_every", "eval_every", "plot", "device",
                  "dtype", "threads", "data_cache", "steps", "export", "export_dtype"}


def _merge_resume_args(cli: argparse.Namespace, saved: dict, given: set[str]) -> argparse.Namespace:
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


# --------------------------------------------------------------------------------------------------
# 4. Plots (matplotlib is imported only here)


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
                break  # cut off mid-write
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
    matplotlib.use("Agg")  # files only; no display needed
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


# --------------------------------------------------------------------------------------------------
# 5. Command line


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
                   help="tokens per sequence (the training context); default 128, or 512 with "
                        "--sft (the longest chat_data conversation is 377 tokens with the demo "
                        "tokenizer)")
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
        args.seq_len = 512 if args.sft else 128
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
            ("val_batches", args.val_batches > 0, positive),  # 0 windows: a validation loss of 0/0
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
        if not ok:  # NaN fails every comparison, so it lands here too
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range ({rule})")
    if args.warmup_frac + args.decay_frac > 1:
        fail(f"--warmup-frac {args.warmup_frac} + --decay-frac {args.decay_frac} > 1; they are "
             "fractions of the same run")


def plot_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="train.py plot",
                                description="Loss and max-logit curves of training logs.")
    p.add_argument("logs", nargs="+",
                   help="log.jsonl files (or run directories) written by train.py")
    p.add_argument("--out", default="runs/curves.png", help="PNG to write")
    a = p.parse_args(argv)
    logs = [Path(x) / "log.jsonl" if Path(x).is_dir() else Path(x) for x in a.logs]
    plot_logs(logs, a.out)
    return 0


# --------------------------------------------------------------------------------------------------
# 6. The demo model's recipe: every stage from the repository alone, one command

# The stages of `python train.py recipe` (flags of this file), sized to about 45 minutes on 2 idle
# CPU cores.
# tokenizer.py train: demo/tiktoken.model
RECIPE_TOKENIZER = ["--vocab-size", "4096", "--max-bytes", "8000000"]
RECIPE_PRETRAIN = ["--config", "cpu-small", "--steps", "250", "--batch-size", "8",
                   "--seq-len", "256", "--seed", "0"]
# seq-len 768: the longest chat_data conversation (two tool rounds, extra tools declared) has about
# 750 tokens
RECIPE_SFT = ["--sft", "--steps", "2800", "--batch-size", "4", "--seq-len", "768",
              "--sft-conversations", "20000", "--seed", "0", "--eval-every", "200",
              "--save-every", "200"]


def _flag(flags: list[str], name: str, value: str) -> list[str]:
    """flags with --name set to value (replaced if present)."""
    flags = list(flags)
    if name in flags:
        flags[flags.index(name) + 1] = value
        return flags
    return flags + [name, value]


def _recipe_stage(name: str, run_dir: Path, flags: list[str], threads: int) -> None:
    """Run one training stage in run_dir, or continue it (--resume) if it was interrupted, or skip
    it if finished."""
    steps = int(flags[flags.index("--steps") + 1])
    ckpt = run_dir / "ckpt"
    if (ckpt / "trainer_state.json").exists():
        done = read_trainer_state(ckpt)["step"]
        if done >= steps:
            say(f"[recipe] {name}: finished earlier ({done} steps, {ckpt})")
            return
        say(f"[recipe] {name}: continuing {run_dir} from step {done}")
        argv = ["--resume", str(run_dir)]
    else:
        if run_dir.exists():  # stopped before its first checkpoint: nothing in it is worth keeping
            shutil.rmtree(run_dir)
        argv = flags + ["--out", str(run_dir)] + (["--threads", str(threads)] if threads else [])
        say(f"[recipe] {name}: python train.py {' '.join(argv)}")
    args, given = parse_args(argv)
    code = Trainer(args, given).run()
    if code != 0:
        raise TrainingError(f"the {name} stage stopped (exit code {code}); run the same command "
                            "again to continue")


def recipe_main(argv: Sequence[str]) -> int:
    """`python train.py recipe`: the shipped demo model from scratch, tokenizer -> pretraining ->
    fine-tuning -> export -> held-out evaluation, each stage printing its progress. Finished stages
    are kept in --out; after an interruption the same command continues where it stopped."""
    p = argparse.ArgumentParser(prog="train.py recipe",
                                description="The shipped demo model from scratch, tokenizer -> "
                                "pretraining -> fine-tuning -> export -> held-out evaluation.")
    p.add_argument("--out", default="runs/recipe",
                   help="folder of the stages (tokenizer, pretrain/, sft/, eval.txt)")
    p.add_argument("--export", default=None,
                   help="folder the finished model is written to (default: OUT/model); `--export "
                        "demo` replaces the shipped demo model")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="override the recipe's pretraining steps")
    p.add_argument("--sft-steps", type=int, default=None,
                   help="override the recipe's fine-tuning steps")
    p.add_argument("--eval-items", type=int, default=220,
                   help="held-out items of the final evaluation")
    add_threads_argument(p)
    a = p.parse_args(argv)
    out = Path(a.out)
    export = Path(a.export) if a.export else out / "model"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    times = {}

    rank_file = out / "tiktoken.model"
    if rank_file.exists():
        say(f"[recipe] tokenizer: finished earlier ({rank_file})")
    else:
        tok_flags = " ".join(RECIPE_TOKENIZER)
        say(f"[recipe] tokenizer: python tokenizer.py train {tok_flags} --out {rank_file}")
        tk.main(["train", *RECIPE_TOKENIZER, "--out", str(rank_file)])
    times["tokenizer"] = time.perf_counter() - t0

    pretrain = _flag(RECIPE_PRETRAIN, "--tokenizer", str(rank_file))
    if a.pretrain_steps:
        pretrain = _flag(pretrain, "--steps", str(a.pretrain_steps))
    _recipe_stage("pretraining", out / "pretrain", pretrain, a.threads)
    times["pretraining"] = time.perf_counter() - t0 - sum(times.values())

    sft = _flag(RECIPE_SFT, "--init", str(out / "pretrain" / "ckpt"))
    if a.sft_steps:
        sft = _flag(sft, "--steps", str(a.sft_steps))
    _recipe_stage("fine-tuning", out / "sft", sft, a.threads)
    times["fine-tuning"] = time.perf_counter() - t0 - sum(times.values())

    model = M.Transformer.from_pretrained(out / "sft" / "ckpt", dtype=torch.float32)
    model = model.to(torch.bfloat16)
    model.save_pretrained(export,
                          extra=lambda tmp: shutil.copyfile(rank_file, tmp / "tiktoken.model"))
    say(f"[recipe] export: {export} (bf16 weights, config.json, tiktoken.model)")

    import chat_data
    from generate import load
    say(f"[recipe] evaluation: python chat_data.py eval --ckpt {export} -n {a.eval_items}")
    t_eval = time.perf_counter()
    model, tok = load(export)
    table, ok = chat_data.report(chat_data.evaluate(model, tok, a.eval_items, log=say)["rows"])
    times["evaluation"] = time.perf_counter() - t_eval
    total = time.perf_counter() - t0
    stages = ", ".join(f"{k} {_fmt_time(v)}" for k, v in times.items())
    summary = (f"held-out evaluation of {export} ({a.eval_items} items, greedy):\n{table}\n"
               f"targets {'met' if ok else 'NOT met'}\n"
               f"stage times (this invocation): {stages}; total {_fmt_time(total)}\n")
    (out / "eval.txt").write_text(summary, encoding="utf-8")
    say(summary + f"[recipe] done; written to {out / 'eval.txt'}")
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
                return recipe_main(argv[1:])
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
    sys.exit(main())
