"""The demo model's recipe: every stage from the repository alone, one command.

`python train.py recipe --export demo` rebuilds the shipped demo model (demo/): a tokenizer
(tokenizer.py train), a short pretraining on the Python standard library's source and fine-tuning
on chat_data.py's conversations (both train.py runs), a bf16 export, and the held-out evaluation
(chat_data.py eval). Each stage is a run folder under --out; a finished stage is kept and an
interrupted one continues (`--resume`, runs.py), so the same command picks up where it stopped.
The figures it produced are in the README ("The demo model").

The recipe is the one place that strings the other entry points together, so it sits beside them
rather than inside train.py, which says how one run trains.
No tensors with shapes in this file, so no shape legend.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

import model as M
import parallel
import runs
import tokenizer as tk
from runtime import add_threads_argument
from train import SFT_SEQ_LEN, Trainer, TrainingError, fmt_time, make_parser, parse_args

# print() on rank 0 only, as in train.py
say = parallel.print0

# The stages of `python train.py recipe` (flags of tokenizer.py train and of train.py), sized to
# about 45 minutes on 2 idle CPU cores.
# tokenizer.py train: demo/tiktoken.model
RECIPE_TOKENIZER = ["--vocab-size", "4096", "--max-bytes", "8000000"]
RECIPE_PRETRAIN = ["--config", "cpu-small", "--steps", "250", "--batch-size", "8",
                   "--seq-len", "256", "--seed", "0"]
# seq-len: train.SFT_SEQ_LEN, which fits chat_data's conversations
RECIPE_SFT = ["--sft", "--steps", "2800", "--batch-size", "4", "--seq-len", str(SFT_SEQ_LEN),
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
        done = runs.read_trainer_state(ckpt, make_parser())["step"]
        if done >= steps:
            say(f"[recipe] {name}: finished earlier ({done} steps, {ckpt})")
            return
        say(f"[recipe] {name}: continuing {run_dir} from step {done}")
        argv = ["--resume", str(run_dir)]
    else:
        # stopped before its first checkpoint: nothing in it is worth keeping
        if run_dir.exists():
            shutil.rmtree(run_dir)
        argv = flags + ["--out", str(run_dir)] + (["--threads", str(threads)] if threads else [])
        say(f"[recipe] {name}: python train.py {' '.join(argv)}")
    args, given = parse_args(argv)
    code = Trainer(args, given).run()
    if code != 0:
        raise TrainingError(f"the {name} stage stopped (exit code {code}); run the same command "
                            "again to continue")


def main(argv: Sequence[str]) -> int:
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
    stages = ", ".join(f"{k} {fmt_time(v)}" for k, v in times.items())
    summary = (f"held-out evaluation of {export} ({a.eval_items} items, greedy):\n{table}\n"
               f"targets {'met' if ok else 'NOT met'}\n"
               f"stage times (this invocation): {stages}; total {fmt_time(total)}\n")
    (out / "eval.txt").write_text(summary, encoding="utf-8")
    say(summary + f"[recipe] done; written to {out / 'eval.txt'}")
    return 0
