"""The Hugging Face checkpoint format of Kimi K2: reading it, writing it, never leaving half of one.

A checkpoint is a directory: config.json plus model.safetensors, or shards named by
model.safetensors.index.json (`{"metadata": {"total_size": ...}, "weight_map": {tensor: shard
file}}`). The network's module names ARE the checkpoint names, with one exception, the name table
here:
* the routed experts are stored stacked (E, ·, ·) in the model (moe.Experts) and one by one on disk,
  so `mlp.experts.{e}.gate_proj.weight` is row e of `mlp.experts.gate_proj` (`checkpoint_names`).
Reading (`from_pretrained`) goes tensor by tensor, never the whole file, and under tensor + expert
parallelism (parallel.py) each rank reads only its share: its own experts and its rows/columns of
the split matrices (`_read_share`, a safetensors slice). The released K2 and DeepSeek-V3 weights are
FP8 (e4m3) with one fp32 `weight_scale_inv` per 128 x 128 block; `dequantize_fp8` turns them into
floats as they are read. Writing (`save_pretrained`) gathers the split tensors to rank 0 and writes
the usual layout through `write_atomically`: write -> fsync -> rename -> clean up, so a kill or a
power loss at any moment leaves the old version or the complete new one (`recover_interrupted_save`
finishes or undoes what a kill interrupted). data.py saves its token cache, and train.py its
training checkpoints, the same way.

References: DeepSeek-V3 README_WEIGHTS.md (FP8 blocks; the MTP layer model.layers.61.*, not loaded)
and inference/kernel.py `weight_dequant`; the safetensors format (huggingface/safetensors);
Kimi-K2-Instruct's model.safetensors.index.json (the sharded layout).
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

import parallel
from config import ModelArgs
from moe import Experts, MoE


# --------------------------------------------------------------------------------------------------
# The name table: checkpoint tensors <-> the model's state dict


def checkpoint_names(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """Map every checkpoint tensor name of the FULL model to (our state-dict name, expert index or
    None).

    Expert indices are global (0..E-1); under expert parallelism this rank's stack holds rows for
    experts `first_expert` onward only (moe.Experts), and `_owned_row` maps a global index to one of
    them.
    """
    names = {}
    for name in model.state_dict():
        if ".mlp.experts." in name:  # stacked here, one tensor per expert on disk
            prefix, proj = name.rsplit(".", 1)
            for e in range(model.args.n_routed_experts):
                names[f"{prefix}.{e}.{proj}.weight"] = (name, e)
        else:
            names[name] = (name, None)
    return names


def _owned_row(model: nn.Module, name: str, e: int) -> int | None:
    """Row of expert e in this rank's stack `name`, or None if another rank owns expert e."""
    stack: Experts = model.get_submodule(name.rsplit(".", 1)[0])
    row = e - stack.first_expert
    return row if 0 <= row < stack.num_experts else None


# --------------------------------------------------------------------------------------------------
# Reading: sharded, per rank, FP8 dequantized on the way in


def from_pretrained(build: Callable[[ModelArgs], nn.Module], path: str | os.PathLike,
                    device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Transformer.from_pretrained: `build(args)` makes the network (on the meta device, then
    allocated in `dtype` on `device`); see its docstring for the contract. If loading fails on any
    rank, every rank raises (parallel.check_all_ok) instead of waiting for the others."""
    from safetensors import SafetensorError

    model, err = None, None
    try:
        model = _load(build, Path(path), device, dtype)
    # the reader's own words ("incomplete metadata, file not fully covered")
    except SafetensorError as e:
        err = ValueError(f"cannot read the checkpoint {path}: {e}; a *.safetensors file is damaged "
                         "or incomplete (a copy cut short?)")
    # handed to check_all_ok, which re-raises it (on every rank, if any failed)
    except Exception as e:
        err = e
    parallel.check_all_ok(err, f"loading {path}")
    return model


def _load(build: Callable[[ModelArgs], nn.Module], path: Path, device: str | torch.device,
          dtype: torch.dtype | None) -> nn.Module:
    from safetensors import safe_open

    files = _checkpoint_files(path)
    args = ModelArgs.from_json(path)
    with torch.device("meta"):
        model = build(args)  # this rank's shapes, no memory yet
    expected = checkpoint_names(model)
    located: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                located[key] = f
    if dtype is None:
        emb = "model.embed_tokens.weight"
        with safe_open(str(located.get(emb, files[0])), framework="pt") as sf:
            dtype = sf.get_slice(emb).get_dtype() if emb in sf.keys() else "F32"
        dtype = _SAFETENSORS_DTYPES.get(dtype, torch.float32)
    problems = []
    sizes = {name: t.numel() for name, t in model.state_dict().items()}
    # a zero-width tensor (n_shared_experts 0 or null) holds nothing: a checkpoint may leave it out
    missing = sorted(k for k, (name, _) in expected.items() if k not in located and sizes[name])
    unexpected = sorted(k for k in located
                        if k not in expected and not _ignorable(k, located, args))
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if (missing or unexpected) and args.moe_layer_freq != 1:
        problems.append(f"note: moe_layer_freq={args.moe_layer_freq} makes layer l MoE only if "
                        f"l % {args.moe_layer_freq} == 0 (DeepSeek's modeling_deepseek.py); "
                        "transformers' DeepseekV3 ignores the key and writes experts in every "
                        "layer >= first_k_dense_replace")
    block = args.fp8_block_size()  # (rows, columns) per FP8 scale
    # allocate this rank's share once, in the final dtype
    model = model.to(dtype).to_empty(device=device)
    state, dims, world = model.state_dict(), model.shard_dims(), parallel.world_size()
    by_file: dict[Path, list[str]] = {}
    for key in expected:
        if key in located:
            by_file.setdefault(located[key], []).append(key)
    shape_errors, bytes_read = [], 0
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for key in keys:
                name, e = expected[key]
                target, dim = state[name], dims.get(name)
                if e is not None:  # one expert of a stack: read only by the rank that owns it
                    row = _owned_row(model, name, e)
                    if row is None:
                        continue
                    target, dim = target[row], None
                full_shape = list(target.shape)
                if dim is not None:
                    full_shape[dim] *= world
                on_disk = list(sf.get_slice(key).get_shape())
                if on_disk != full_shape:
                    shape_errors.append(f"{key}: checkpoint {tuple(on_disk)} vs model "
                                        f"{tuple(full_shape)}")
                    continue
                # this rank's rows/columns from `start` (or all of it)
                t, start = _read_share(sf, key, dim)
                bytes_read += t.nbytes
                # int8/uint8/packed-int weights need a quantizer we lack
                if not t.dtype.is_floating_point:
                    problems.append(f"{key} is stored as {t.dtype}; only float weights and "
                                    "block-scaled FP8 can be loaded (see quantization_config)")
                    continue
                # FP8, e4m3 (K2, DeepSeek-V3) or e5m2: always with its block scales
                if t.dtype.itemsize == 1:
                    scale_key = key + "_scale_inv"
                    if scale_key not in located:
                        problems.append(f"{key} is FP8 but {scale_key} is missing")
                        continue
                    with safe_open(str(located[scale_key]), framework="pt") as sf2:
                        scale = sf2.get_tensor(scale_key)  # small: one number per block
                    bytes_read += scale.nbytes
                    blocks = [math.ceil(n / b) for n, b in zip(on_disk, block)]
                    if list(scale.shape) != blocks:
                        problems.append(
                            f"{scale_key}: shape {tuple(scale.shape)}, expected {tuple(blocks)} "
                            f"(one scale per {block[0]}x{block[1]} block of {tuple(on_disk)}; "
                            "quantization_config.weight_block_size sets the block)")
                        continue
                    offset = (start, 0) if dim == 0 else (0, start)
                    # dequantize on the device
                    t = dequantize_fp8(t.to(device), scale.to(device), block, offset)
                with torch.no_grad():
                    target.copy_(t)
    if shape_errors:
        problems.append("shape mismatches: " + "; ".join(shape_errors))
    if problems:
        raise ValueError(f"cannot load {path}: " + " | ".join(problems))
    model.reset_buffers()
    # the routing bias stays fp32 whatever the model dtype (see moe.Gate._apply)
    for m in model.modules():
        if isinstance(m, MoE):
            m.gate.e_score_correction_bias.data = m.gate.e_score_correction_bias.data.float()
    model.load_report = dict(bytes_read=bytes_read,
                             checkpoint_bytes=sum(f.stat().st_size for f in files))
    return model


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "F64": torch.float64}


def _checkpoint_files(path: Path) -> list[Path]:
    if not path.is_dir():
        left = sorted(p.name for kind in ("tmp", "old")
                      for p in path.parent.glob(f".{path.name}.{kind}-*"))
        hint = (f"; a save was interrupted and left {', '.join(left)} beside it: train.py --resume "
                "(or checkpoint.recover_interrupted_save) puts the newest complete version back"
                ) if left else ""
        raise FileNotFoundError(f"checkpoint directory {path} does not exist{hint}")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index} names shard files that are missing: {absent}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def _ignorable(key: str, located: dict, args: ModelArgs) -> bool:
    """Checkpoint tensors that are legitimately not loaded: the RoPE frequencies (recomputed from
    the config), the FP8 scales (read beside their weights) and DeepSeek-V3's multi-token-prediction
    layer (DeepSeek-V3 README_WEIGHTS.md: model.layers.61.*)."""
    if key.endswith("rotary_emb.inv_freq") or key.endswith(".weight_scale_inv"):
        return True
    parts = key.split(".")
    if parts[:2] == ["model", "layers"] and int(parts[2]) >= args.num_hidden_layers:
        return args.num_nextn_predict_layers > 0  # DeepSeek-V3's MTP module (model.layers.61.*)
    return False


def _read_share(sf, key: str, dim: int | None) -> tuple[Tensor, int]:
    """This rank's share of one checkpoint tensor, as stored (FP8 stays FP8): the whole tensor if
    dim is None, else its rows (dim 0) or columns (dim 1) for this rank. Returns (tensor, index of
    its first row/column). A safetensors slice reads only those bytes from the memory-mapped file.
    """
    if dim is None:
        return sf.get_tensor(key), 0
    sl = sf.get_slice(key)
    n, start = parallel.split(sl.get_shape()[dim], key)
    return (sl[start:start + n] if dim == 0 else sl[:, start:start + n]), start


def dequantize_fp8(w: Tensor, scale_inv: Tensor, block: int | tuple[int, int] = 128,
                   offset: tuple[int, int] = (0, 0)) -> Tensor:
    """W = float(W_fp8) · scale_inv[i // 128, j // 128] -> fp32 (out, in). DeepSeek-V3
    inference/kernel.py `weight_dequant`, README_WEIGHTS.md.

    block: the (rows, columns) of one scale block, 128 x 128 for K2 / DeepSeek-V3
    (quantization_config's weight_block_size). w may be a slice of the full matrix whose first
    element is at (row, column) `offset` (a rank's share under tensor parallelism); scale_inv is
    always the FULL matrix's (ceil(rows/br), ceil(cols/bc)) block scales. A slice need not start on
    a block boundary: it takes the scales of the blocks it overlaps.
    """
    br, bc = (block, block) if isinstance(block, int) else block
    out, inp = w.shape
    r0, c0 = offset
    rows = slice(r0 // br, (r0 + out - 1) // br + 1)
    cols = slice(c0 // bc, (c0 + inp - 1) // bc + 1)
    s = scale_inv.float()[rows, cols]  # the scales of the blocks this slice overlaps
    s = s.repeat_interleave(br, 0).repeat_interleave(bc, 1)  # one scale per element of those blocks
    s = s[r0 % br:r0 % br + out, c0 % bc:c0 % bc + inp]  # (out, in)
    return w.float() * s


# --------------------------------------------------------------------------------------------------
# Writing: gathered to rank 0, sharded, atomic


def save_pretrained(model: nn.Module, path: str | os.PathLike, max_shard_bytes: int = 2 << 30,
                    extra: Callable[[Path], None] | None = None) -> None:
    """Transformer.save_pretrained (see its docstring): every rank joins the gathers, rank 0 writes.
    """
    dims, rank0 = model.shard_dims(), parallel.rank() == 0
    full = {}
    # every rank joins each gather; rank 0 keeps the result
    for name, t in model.state_dict().items():
        t = parallel.gather_full(t.detach(), dims.get(name))
        if rank0:
            full[name] = t.to("cpu")
    err = None
    if rank0:
        try:
            _write_hf(model, Path(path), full, max_shard_bytes, extra)
        except Exception as e:  # re-raised by check_all_ok, on every rank
            err = e
    # also a barrier: no rank returns before the files exist
    parallel.check_all_ok(err, f"saving {path}")


def _write_hf(model: nn.Module, path: Path, state: dict[str, Tensor], max_shard_bytes: int,
              extra: Callable[[Path], None] | None) -> None:
    def write(tmp: Path) -> None:
        tmp.mkdir()
        _write_files(model, tmp, path, state, max_shard_bytes, extra)
    write_atomically(path, write)


def _write_files(model: nn.Module, tmp: Path, path: Path, state: dict[str, Tensor],
                 max_shard_bytes: int, extra: Callable[[Path], None] | None) -> None:
    """Everything a checkpoint holds, into `tmp`; files of `path` that we do not write are copied
    over."""
    from safetensors.torch import save_file

    tensors = {}
    for key, (name, e) in checkpoint_names(model).items():
        t = state[name] if e is None else state[name][e]
        tensors[key] = t.detach().to("cpu").contiguous()
    shards, size = [[]], 0
    for key in tensors:
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, keys in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in keys}, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in keys})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = model.args.to_dict()
    cfg["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    # the weights written here are never quantized (FP8 was dequantized)
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in tmp.glob("*.safetensors"):
        os.chmod(f, 0o644)  # safetensors writes 0600; a checkpoint is meant to be shared
    if extra is not None:
        extra(tmp)
    if path.exists():
        # carry over files we do not own (tokenizer, README, ...)
        for f in path.iterdir():
            if not (tmp / f.name).exists() and not _is_weight_file(f.name):
                if f.is_dir():
                    shutil.copytree(f, tmp / f.name)
                else:
                    shutil.copy2(f, tmp / f.name)


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name in ("model.safetensors.index.json", "config.json")


# --------------------------------------------------------------------------------------------------
# Crash-safe writes (checkpoints, data.py's token cache): write -> fsync -> rename -> clean up


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Replace `path` (a file, or a folder that write() creates) so that after a kill -9 or a power
    loss at any instant it is the previous version or the complete new one, never a mix, and nothing
    is left behind for good:
      1. recover_interrupted_save(path): finish (or undo) a save that a kill interrupted, remove
         what it left;
      2. write(tmp) into the sibling `.NAME.tmp-PID`, then fsync every file in it and the folder
         itself: the data is on the disk before any name points at it (without that a power loss
         after the rename can leave `path` naming empty files: ext4 and XFS allocate data blocks
         late);
      3. a file is renamed over `path` (atomic). A folder cannot be renamed over a non-empty one, so
         `path` is first renamed to `.NAME.old-PID`, then tmp to `path`, the parent folder fsynced
         after each rename (the renames themselves reach the disk in that order), and the old copy
         deleted last.
    A write that fails (a full disk, a folder not writable) removes tmp and raises one OSError that
    names `path` and says the previous version is intact; any other exception (Ctrl-C, a bug) also
    removes tmp and goes through."""
    from safetensors import SafetensorError

    recover_interrupted_save(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync_tree(tmp)
    # torch.save reports a full disk as a RuntimeError
    except (OSError, RuntimeError, SafetensorError) as err:
        # before tmp is removed: the free space at the moment of failure
        message = _write_failure(path, err)
        _remove(tmp)
        raise OSError(message) from None
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        _fsync(path.parent)
        os.rename(tmp, path)  # from here on `path` is the new, complete version
        _fsync(path.parent)
        _remove(old)
    else:
        os.replace(tmp, path)
        _fsync(path.parent)


def recover_interrupted_save(path: Path) -> Path | None:
    """Bring `path` back to a complete version after write_atomically was killed, and delete what
    the kill left. Returns the leftover folder that became `path` (None if `path` needed nothing).
    The states a kill leaves, by the step of write_atomically it interrupted (P: the killed
    process's id, which its leftovers carry in their names):
        on disk                    interrupted                  newest complete version -> action
        NAME                       nothing                      NAME
        NAME + .tmp-P              2, or 3 before the first     NAME; delete tmp-P (maybe partial)
                                   rename
        .tmp-P alone               2: writing the first version none; delete tmp-P
        .old-P + .tmp-P, no NAME   3: between the two renames   tmp-P: fsynced before the first
                                                                rename, so complete and newer
                                                                -> NAME; delete old-P
        NAME + .old-P              3: deleting old-P (the last  NAME; delete old-P (maybe partial)
                                   step)
        .old-* without its .tmp-*  never left by a kill (moved  the one whose config.json is newest
        and no NAME                by hand)                     -> NAME
    A kill during this recovery (step 1) leaves one of these states again. Only a .tmp-P beside its
    own .old-P is known to be complete: the number is a process id, not a step, and says nothing
    about which leftover is newer (sorting them as text once restored a copy 20 steps old). A
    leftover is deleted only when its process is gone (or is this one): a live process may be
    writing it. Restoring needs no such check: a live save is between its renames for an instant
    only, and if two processes rename the same tmp-P the second rename fails and that save reports
    it."""
    path = Path(path).resolve()
    parent = path.parent
    if not path.name or not parent.is_dir():
        return None
    left: dict[str, dict[int, Path]] = {"tmp": {}, "old": {}}
    for p in parent.iterdir():
        kind, _, pid = p.name.removeprefix(f".{path.name}.").rpartition("-")
        if p.name.startswith(f".{path.name}.") and kind in left and pid.isdigit():
            left[kind][int(pid)] = p
    if not left["tmp"] and not left["old"]:
        return None
    restored = None
    if not path.exists():
        paired = [pid for pid in left["old"] if pid in left["tmp"]]
        if paired:
            restored = max((left["tmp"][pid] for pid in paired), key=lambda p: p.stat().st_mtime_ns)
        else:
            complete = [p for p in left["old"].values() if (p / "config.json").exists()]
            restored = max(complete, key=lambda p: (p / "config.json").stat().st_mtime_ns,
                           default=None)
        if restored is not None:
            os.rename(restored, path)
            _fsync(parent)
    for kind in left.values():
        for pid, p in kind.items():
            if p != restored and not _pid_alive(pid):
                _remove(p)
    return restored


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (this process counts as gone: it is not saving while it cleans
    up)."""
    if pid == os.getpid():
        return False
    # os.kill(pid, 0) would end the process there; never delete another process's files
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)  # signal 0: only the existence check
    # no such process; a number too large to be a process id
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk. Windows flushes only files opened
    for writing, and no folders."""
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under root, then each folder (deepest first), then root itself."""
    if root.is_dir():
        for folder, _, names in os.walk(root, topdown=False):
            for name in names:
                _fsync(Path(folder) / name)
            _fsync(Path(folder))
    else:
        _fsync(root)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _write_failure(path: Path, err: BaseException) -> str:
    """One line for a failed write: what failed, whether the disk is full, and that the previous
    version is kept."""
    text = str(err)
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in text \
        or "No space left" in text
    try:
        free = shutil.disk_usage(path.parent).free
        full = full or free == 0
        free_text = f"; {free:,} bytes free on its disk"
    except OSError:
        free_text = ""
    what = "the disk is full" if full else "the write failed"
    kept = "the previous version there is intact" if path.exists() else "nothing was written there"
    return f"cannot save {path}: {what} ({type(err).__name__}: {text}{free_text}); {kept}"
