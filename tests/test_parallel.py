"""Protects tensor + expert parallelism (parallel.py, inside model.py / attention.py / moe.py) and sharded loading.

* W = 2 and 4 ranks give the one-process logits (fp32, max abs diff <= 1e-5) for prefill and for cached decode with
  the naive and the absorbed attention, greedy generation picks the same tokens, a sampled token is the same on every
  rank, each rank's gradients are the slices of the one-process gradients (the Megatron f/g operators), and
  save_pretrained on W ranks writes back the checkpoint they loaded.
* A synthetic FP8 block-quantized checkpoint (torch.float8_e4m3fn, 128x128 weight_scale_inv, several safetensors
  files + index, matrices that are not multiples of 128 and rank slices that start inside a block) dequantizes to an
  independent float64 computation, and loads on 2 ranks with each rank holding only its part (parameter bytes
  computed here from the config; slices compared with the one-process weights).
* Bad input ends in a clear error, never a hang: a world size that does not divide the heads / experts, a missing
  shard file, a rank that raises while the other waits in a collective.
Compares against: the same checkpoint run in this (single) test process, a float64 dequantization and a parameter
count written here.
How: each case starts `python -m torch.distributed.run --standalone --nproc-per-node W tests/test_parallel.py JOB
DIR` (torchrun, gloo on CPU) under a timeout; the ranks run `_job_JOB` below and write their results into DIR.
Run: pytest tests/test_parallel.py -q   (CPU; each torchrun start costs a few seconds, about a minute in all)"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # started by torchrun: the modules are flat files at the repository root
    sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

import pytest  # noqa: E402

import model as M  # noqa: E402
import parallel  # noqa: E402
from conftest import random_model, run_torchrun, tiny_args  # noqa: E402

# 2 ranks: K2 and Moonlight (its plain q_proj takes another path into the split heads); 4 ranks: K2 (1 head and
# 2 experts per rank). Kept small: every forward is several gloo collectives, slow on a busy 2-core machine.
KINDS = {2: ("k2", "moonlight"), 4: ("k2",)}
TOL = 1e-5  # fp32: the same sums in a different order (split matmuls + an fp32 all-reduce)
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


# ------------------------------------------------------------------------------------------------ the computation
# Run in the test process (one device) and on every rank; the test compares the two.

def _compute(model: "M.Transformer", ids: torch.Tensor) -> dict:
    import generate as G

    out = {}
    with torch.no_grad():
        out["prefill"] = model(ids)  # (B, T, V)
        for impl in ("naive", "absorb"):  # 6 prompt tokens, then 2 single-token steps against the latent cache
            cache = model.new_cache(ids.shape[0], ids.shape[1])
            steps = [model(ids[:, :6], cache)] + [model(ids[:, t:t + 1], cache, attn_impl=impl) for t in (6, 7)]
            out[f"decode_{impl}"] = torch.cat(steps, dim=1)  # (B, 8, V)
        out["greedy"] = torch.stack(list(G.generate_tokens(model, ids[:, :4], 4, temperature=0.0)), dim=1)
        # as if unseeded: each rank's generator differs, and the broadcast of rank 0's token must make them agree
        gen = torch.Generator().manual_seed(1000 + parallel.rank())
        out["sampled"] = torch.stack(list(G.generate_tokens(model, ids[:, :4], 3, temperature=1.0,
                                                            generator=gen)), dim=1)
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    out["loss"] = loss.detach()
    out["grads"] = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return out


def _job_equivalence(work: Path) -> None:
    ids = torch.load(work / "ids.pt")
    results = {}
    for kind in KINDS[parallel.world_size()]:
        model = M.Transformer.from_pretrained(work / kind).eval()
        model.save_pretrained(work / f"{kind}-resaved")  # every rank calls it; the pieces are gathered to rank 0
        results[kind] = _compute(model, ids)
        results[kind]["param_bytes"] = sum(p.nbytes for p in model.parameters())
    torch.save(results, work / f"rank{parallel.rank()}.pt")


def _job_fp8(work: Path) -> None:
    try:
        M.Transformer.from_pretrained(work / "missing")
        result = "loaded"
    except FileNotFoundError as err:
        result = str(err)
    model = M.Transformer.from_pretrained(work / "fp8", dtype=torch.float32)
    torch.save(dict(missing=result, state=model.state_dict(), param_bytes=sum(p.nbytes for p in model.parameters()),
                    report=model.load_report), work / f"rank{parallel.rank()}.pt")


def _job_raise(work: Path) -> None:
    if parallel.rank() == 1:
        raise RuntimeError("injected failure on rank 1")
    parallel.all_reduce_(torch.ones(1))  # rank 0 waits here for a rank that will never arrive


def _job_build(work: Path) -> None:
    M.Transformer(tiny_args("k2"))  # 4 heads, 8 experts: 3 ranks cannot split them


# ------------------------------------------------------------------------------------------------ launching

def _torchrun(nproc: int, job: str, work: Path, timeout: float = 300.0) -> tuple[int, str, float]:
    """Run JOB on nproc ranks; (exit code, stdout + stderr, seconds). Fails the test if it outlives the timeout."""
    return run_torchrun(nproc, [str(Path(__file__).resolve()), job, str(work)], timeout)


def _ok(nproc: int, job: str, work: Path) -> float:
    code, out, seconds = _torchrun(nproc, job, work)
    assert code == 0, f"torchrun {job} on {nproc} ranks failed:\n{out[-5000:]}"
    print(f"{job} on {nproc} ranks: {seconds:.1f} s (torchrun start included)")
    return seconds


# ------------------------------------------------------------------------------------------------ equivalence

@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_logits_generation_and_gradients_equal_one_process(world, tmp_path):
    ids = torch.randint(0, 320, (2, 8), generator=torch.Generator().manual_seed(world))
    torch.save(ids, tmp_path / "ids.pt")
    ref = {}
    for i, kind in enumerate(KINDS[world]):
        random_model(tiny_args(kind), seed=10 + i).save_pretrained(tmp_path / kind)
        model = M.Transformer.from_pretrained(tmp_path / kind).eval()
        ref[kind] = _compute(model, ids), model.shard_dims(), dict(model.named_parameters())
    _ok(world, "equivalence", tmp_path)
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for kind in KINDS[world]:
            want, dims, params = ref[kind]
            g = got[kind]
            for key in ("prefill", "decode_naive", "decode_absorb"):
                diff = (g[key] - want[key]).abs().max().item()
                print(f"W={world} rank {r} {kind} {key}: max |diff| {diff:.2e}")
                assert diff <= TOL, f"{kind} {key} on rank {r} of {world}: max |diff| {diff:.2e}"
            assert torch.equal(g["greedy"], want["greedy"]), f"{kind}: greedy tokens differ on rank {r}"
            rank0 = torch.load(tmp_path / "rank0.pt")[kind]["sampled"]
            assert torch.equal(g["sampled"], rank0), f"{kind}: rank {r} sampled other tokens than rank 0"
            torch.testing.assert_close(g["loss"], want["loss"], rtol=0, atol=TOL)
            for name, grad in g["grads"].items():  # each rank's gradient is its slice of the one-process gradient
                full = want["grads"][name]
                if name in dims:
                    n = full.shape[dims[name]] // world
                    full = full.narrow(dims[name], r * n, n)
                torch.testing.assert_close(grad, full, rtol=1e-4, atol=TOL, msg=lambda m: f"{kind} {name}: {m}")
            assert g["param_bytes"] < sum(p.nbytes for p in params.values())
    for kind in KINDS[world]:  # saved on W ranks = the checkpoint they loaded, tensor for tensor
        a = load_file(str(tmp_path / kind / "model.safetensors"))
        b = load_file(str(tmp_path / f"{kind}-resaved" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


@pytest.mark.slow
def test_generate_py_under_torchrun_prints_the_same_text(tmp_path):
    """The user's path: `torchrun --nproc-per-node 2 generate.py` prints (once) what one process prints."""
    import shutil

    ck = tmp_path / "ck"
    random_model(tiny_args("k2", vocab_size=4352), seed=3).save_pretrained(ck)  # the demo tokenizer's 4,096 + 256 ids
    shutil.copy(ROOT / "demo" / "tiktoken.model", ck / "tiktoken.model")
    argv = ["generate.py", "--ckpt", str(ck), "--raw", "--prompt", "The model is split", "--temperature", "0",
            "--max-new-tokens", "8"]
    one = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *argv]
    two = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]

    def text(out: str) -> str:  # the completion: between the '---' after the prompt and the '--- N tokens' line
        return out.split("\n---\n", 1)[1].rsplit("\n--- ", 1)[0]

    assert text(two.stdout) == text(one.stdout) and two.stdout.count("prompt:") == 1, (one.stdout, two.stdout)
    assert "2 ranks under torchrun" in two.stdout and "rank 0 holds its 1/2 share" in two.stdout


# ------------------------------------------------------------------------------------------------ FP8 checkpoint

def _fp8_args():
    """Sizes that cross 128-element blocks without filling them: 160 = 128 + 32, 320 = 2·128 + 64, and 2-way rank
    slices that start inside a block (q_b rows at 48, dense gate rows at 160, shared-expert rows at 20)."""
    return tiny_args("k2", hidden_size=160, intermediate_size=320, q_lora_rank=144, kv_lora_rank=32, vocab_size=256,
                     n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, num_hidden_layers=2)


def _is_fp8(name: str) -> bool:
    """Which tensors the released checkpoint stores in FP8 (DeepSeek-V3 README_WEIGHTS.md): every projection
    matrix; not the router, the norms, the embedding or lm_head."""
    return name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")


def _quantize(w: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 quantization written for this test: per 128x128 block, scale = amax/448 times a random factor in
    [1, 8) (so blocks differ a lot and a wrong block index shows). -> (fp8 weight, fp32 scale_inv)."""
    rows, cols = w.shape
    scale = torch.empty(math.ceil(rows / 128), math.ceil(cols / 128))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            scale[i, j] = blk.abs().max() / E4M3_MAX * (1 + 7 * torch.rand((), generator=g))
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def _dequantize64(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The independent reference: element (i, j) times the scale of block (i // 128, j // 128), in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            out[sl] = q[sl].double() * scale[i, j].double()
    return out.float()


def _write_fp8_checkpoint(path: Path, args: "M.ModelArgs") -> dict[str, torch.Tensor]:
    """An HF-layout FP8 checkpoint in 3 files + index, every scale in the file AFTER its weight's (the loader must
    find it through the index). Returns the expected fp32 weights by checkpoint name."""
    model = random_model(args, seed=5)
    model.save_pretrained(path, max_shard_bytes=1 << 40)  # config.json + one bf16-free file; rewritten below
    from safetensors.torch import save_file

    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    g, expected, files = torch.Generator().manual_seed(6), {}, [{}, {}, {}]
    for i, (key, t) in enumerate(sorted(tensors.items())):
        if _is_fp8(key):
            q, scale = _quantize(t.float(), g)
            files[i % 3][key], files[(i + 1) % 3][key + "_scale_inv"] = q, scale
            expected[key] = _dequantize64(q, scale)
        else:
            files[i % 3][key] = t
            expected[key] = t
    weight_map = {}
    for n, content in enumerate(files):
        fname = f"model-{n + 1:05d}-of-00003.safetensors"
        save_file(content, str(path / fname))
        weight_map.update({k: fname for k in content})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return expected


def _param_bytes_per_rank(a: "M.ModelArgs", world: int, nbytes: int = 4) -> int:
    """Parameters one rank holds, counted here from the config: replicated = the latent path, norms and router;
    split W ways = embedding, head, per-head projections, dense MLP, shared expert, routed experts."""
    D, L, V, E = a.hidden_size, a.num_hidden_layers, a.vocab_size, a.n_routed_experts
    qk, Cq, Ckv, H = a.qk_nope_head_dim + a.qk_rope_head_dim, a.q_lora_rank, a.kv_lora_rank, a.num_attention_heads
    n_moe = sum(a.is_moe_layer(i) for i in range(L))
    replicated = L * (D * Cq + Cq + D * (Ckv + a.qk_rope_head_dim) + Ckv + 2 * D) + D + n_moe * E * D
    split = 2 * V * D + L * (Cq * H * qk + Ckv * H * (a.qk_nope_head_dim + a.v_head_dim) + H * a.v_head_dim * D)
    split += (L - n_moe) * 3 * D * a.intermediate_size
    split += n_moe * 3 * D * a.moe_intermediate_size * (E + a.n_shared_experts)
    assert split % world == 0
    return nbytes * (replicated + split // world)


@pytest.mark.slow
def test_fp8_sharded_checkpoint_dequantizes_and_loads_split(tmp_path):
    args = _fp8_args()
    expected = _write_fp8_checkpoint(tmp_path / "fp8", args)
    one = M.Transformer.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    state = one.state_dict()
    for key, (name, e) in one.checkpoint_names().items():  # one process: the same numbers as the float64 reference
        t = state[name] if e is None else state[name][e]
        assert torch.equal(t, expected[key]), key
    assert sum(p.nbytes for p in one.parameters()) == _param_bytes_per_rank(args, 1)
    (tmp_path / "missing").mkdir()
    for f in (tmp_path / "fp8").iterdir():
        if f.name != "model-00002-of-00003.safetensors":
            os.symlink(f, tmp_path / "missing" / f.name)

    _ok(2, "fp8", tmp_path)
    dims, total = one.shard_dims(), sum(f.stat().st_size for f in (tmp_path / "fp8").glob("*.safetensors"))
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert "model-00002-of-00003.safetensors" in got["missing"], got["missing"]
        assert got["param_bytes"] == _param_bytes_per_rank(args, 2)  # each rank allocated only its part
        assert got["report"]["bytes_read"] < 0.75 * total  # ...and read little more than its part from disk
        for name, t in got["state"].items():  # its part is the matching slice of the one-process weights
            full = state[name]
            if name in dims:
                n = full.shape[dims[name]] // 2
                full = full.narrow(dims[name], r * n, n)
            assert torch.equal(t, full), f"rank {r}: {name}"


# ------------------------------------------------------------------------------------------------ bad input

def test_world_size_that_does_not_divide_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(parallel, "_WORLD_SIZE", 3)  # what init() would set on 3 ranks; no process group needed
    with pytest.raises(ValueError, match=r"world size 3 does not divide num_attention_heads=4, n_routed_experts=8"
                                         r".*world sizes that work for this config: \[1, 2, 4\]"):
        M.Transformer(tiny_args("k2"))
    assert M.world_size_problems(M.PRESETS["kimi-k2"](), 16) == []
    assert M.valid_world_sizes(M.PRESETS["kimi-k2"](), 64) == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.slow
def test_bad_world_size_and_failing_rank_end_with_clear_errors(tmp_path):
    code, out, seconds = _torchrun(3, "build", tmp_path)
    assert code != 0 and "world size 3 does not divide num_attention_heads=4" in out, out[-3000:]
    code, out, seconds = _torchrun(2, "raise", tmp_path, timeout=90)
    assert code != 0 and "[rank 1/2] failed: RuntimeError: injected failure on rank 1" in out, out[-3000:]
    print(f"failing rank: the job ended in {seconds:.1f} s")


# ------------------------------------------------------------------------------------------------ memory plan

def test_k2_memory_plan_on_16_ranks(capsys, monkeypatch):
    """Per-rank bytes of the real config, recounted here from config.json (per-module counts, MLA's
    576-value cache)."""
    with torch.device("meta"):
        k2 = M.Transformer(M.PRESETS["kimi-k2"]())  # shapes only
    plan = parallel.memory_plan(k2, 16, batch=1, context=131072)
    # replicated on every rank: q_a_proj, q_a_layernorm, kv_a_proj_with_mqa, kv_a_layernorm, 2 block norms (61
    # layers), the final norm, 60 routers; the 60 routing biases are fp32
    replicated = 61 * (11_010_048 + 1_536 + 4_128_768 + 512 + 14_336) + 7_168 + 60 * 2_752_512
    split = 1_026_408_232_448 - replicated - 60 * 384
    assert plan["weights_replicated_bf16"] == 2 * replicated + 4 * 60 * 384
    assert plan["weights_split_bf16"] == 2 * split // 16
    assert plan["kv_cache"] == 9_210_691_584  # 70,272 B/token x 131,072 tokens: the latent cache, on every rank
    assert 0.49 < plan["weights_split_fp8"] / plan["weights_split_bf16"] < 0.52  # 1 byte + block scales
    monkeypatch.setattr("sys.argv", ["model.py", "--config", "kimi-k2", "--plan", "--world-size", "16"])
    M.main()
    out = capsys.readouterr().out
    assert "bf16 fits, FP8 kept fits" in out and "4 of 64 heads, 24 of 384 experts" in out
    table = {int(line.split()[0]): line.split() for line in out.splitlines() if line[:6].strip().isdigit()}
    assert table[8][3] == "0" and table[16][3] == "1" and table[16][6] == "8"  # 128K sequences that fit


# ------------------------------------------------------------------------------------------------ worker entry

if __name__ == "__main__":
    job, work = sys.argv[1], Path(sys.argv[2])
    # one thread per rank, as torchrun's OMP_NUM_THREADS=1 asks (conftest sets 2 for the single test process): W
    # ranks with 2 spinning OpenMP threads each on a 2-core machine run 100x slower
    torch.set_num_threads(1)
    with parallel.abort_on_error():
        parallel.init("cpu")
        torch.manual_seed(0)
        globals()[f"_job_{job}"](work)
    parallel.shutdown()
