"""Protects kernels.cu, the fused routed-expert CUDA kernels, in two tiers.

Compile tier (every machine with nvcc, CI included; skipped cleanly without it): kernels.cu compiles for sm_80 and
sm_90; the SASS of every grouped-GEMM variant holds tensor-core HMMA.16816.F32.BF16 instructions fed by ldmatrix
(LDSM) and cp.async (LDGSTS); ptxas reports 0 spill bytes and no stack frame for every kernel.
Compares against: what the header comment of kernels.cu promises; the disassembler is nvdisasm or cuobjdump
(PATH, beside nvcc, or the PyPI wheel nvidia-cuda-nvdisasm that the cuda extra installs).

GPU tier (marked gpu; skipped without a CUDA device or without the built extension kimi_k2_kernels): the fused
output against moe.moe_reference run in float64, within 2x the error of PyTorch's own bf16 path (STYLE §5), for
T in {1, 7, 128, 1000, 4096}, E in {8, 64, 384}, top-k in {1, 2, 8}, every tile configuration, skewed routing where
some experts get no tokens; the workspace is poisoned with NaN so an unwritten row cannot hide; two runs are
bit-identical; the gradient through moe.py's autograd wrapper equals the reference's.

Run: pytest tests/test_kernels.py -q                      (compile tier, a few seconds per architecture)
     KIMI_BUILD_CUDA=1 pip install --no-build-isolation -e . && pytest -m gpu tests/test_kernels.py -q   (on a GPU)
"""
import copy
import importlib.metadata
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels.cu"
GEMM = "moe_gemm_kernel"  # substring of the six mangled GEMM instantiations (3 tile configs × gated/down)


# ----------------------------------------------------------------------------------------------------------------
# Compile tier


def find_cuda_tool(name: str) -> str | None:
    """Path of a CUDA binary tool: on PATH, beside nvcc, under CUDA_HOME, or inside its PyPI wheel
    (nvidia-cuda-<name> installs it as site-packages/nvidia/cu<major>/bin/<name>)."""
    found = shutil.which(name)
    if found:
        return found
    dirs = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(Path(nvcc).resolve().parent)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "bin")
    for d in dirs:
        if (d / name).is_file():
            return str(d / name)
    try:
        dist = importlib.metadata.distribution(f"nvidia-cuda-{name}")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == name and f.parent.name == "bin":
            path = Path(dist.locate_file(f))
            if path.is_file():
                if not os.access(path, os.X_OK):
                    path.chmod(path.stat().st_mode | 0o111)  # some installers drop the executable bit
                return str(path)
    return None


def pretty(mangled: str) -> str:
    """'_ZN..15moe_gemm_kernelINS_10TileConfigILi128ELi128ELi32E..ELb1E..' -> 'moe_gemm_kernel<128x128x32, gated>'."""
    kernel = re.search(r"moe_[a-z]+_kernel", mangled)
    name = kernel.group(0) if kernel else mangled
    if GEMM in mangled:
        bm, bn, bk = re.findall(r"Li(\d+)E", mangled)[:3]
        name += f"<{bm}x{bn}x{bk}, {'gated' if 'Lb1E' in mangled else 'down'}>"
    return name


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v output -> {mangled kernel name: {stack, spill_stores, spill_loads, registers}}."""
    out, name = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            name = m.group(1)
            out[name] = {}
        elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                      line)):
            out[name].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            out[name]["registers"] = int(m[1])
    return out


def split_sass(sass: str) -> dict[str, str]:
    """Disassembly (nvdisasm or cuobjdump -sass) -> {mangled function name: its SASS text}."""
    funcs, name = {}, None
    for line in sass.splitlines():
        if m := re.match(r"\s*(?:\.text\.(\S+?):|Function : (\S+))\s*$", line):
            name = m.group(1) or m.group(2)
            funcs[name] = ""
        elif name:
            funcs[name] += line + "\n"
    return funcs


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def compiled(request, tmp_path_factory):
    """Compile kernels.cu once per architecture: (arch, cubin path, ptxas log)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the compile checks of kernels.cu need a CUDA toolkit")
    arch = request.param
    cubin = tmp_path_factory.mktemp(arch) / "kernels.cubin"
    # the flags setup.py uses (-O3 --use_fast_math), one real architecture, cubin only: no host compiler pass
    cmd = [nvcc, "-cubin", "-O3", "--use_fast_math", f"-arch={arch}", "-Xptxas", "-v", str(KERNELS), "-o", str(cubin)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}"
    return arch, cubin, res.stdout + res.stderr


def test_compiles_without_spills(compiled):
    arch, _, log = compiled
    kernels = parse_ptxas(log)
    for name, info in sorted(kernels.items()):
        print(f"{arch} {info.get('registers', '?'):>4} regs, {info.get('stack', '?')} B stack, "
              f"{info.get('spill_stores', '?')}/{info.get('spill_loads', '?')} B spilled  {pretty(name)}")
    gemms = [n for n in kernels if GEMM in n]
    assert len(gemms) == 6, f"expected 6 GEMM instantiations (3 tile configs × gated/down), ptxas listed {gemms}"
    for name in ("moe_histogram_kernel", "moe_scan_kernel", "moe_scatter_kernel", "moe_combine_kernel"):
        assert any(name in n for n in kernels), f"{name} missing from the ptxas report for {arch}"
    for name, info in kernels.items():
        assert info.get("spill_stores") == 0 and info.get("spill_loads") == 0, f"{arch} {name} spills: {info}"
        # a stack frame means a register array indexed at run time went to local memory (HOPPER.md)
        assert info.get("stack") == 0, f"{arch} {name} has a {info.get('stack')}-byte stack frame"


def test_gemms_use_tensor_cores(compiled):
    arch, cubin, _ = compiled
    nvdisasm = find_cuda_tool("nvdisasm")
    cuobjdump = find_cuda_tool("cuobjdump")
    if nvdisasm:
        cmd = [nvdisasm, str(cubin)]
    elif cuobjdump:
        cmd = [cuobjdump, "-sass", str(cubin)]
    else:
        pytest.skip("no disassembler: pip install -e \".[dev,cuda]\" (the cuda extra brings nvidia-cuda-nvdisasm), "
                    "or put the CUDA toolkit's nvdisasm/cuobjdump on PATH")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}"
    funcs = split_sass(res.stdout)
    gemms = {n: s for n, s in funcs.items() if GEMM in n}
    assert len(gemms) == 6, f"expected 6 GEMM functions in the SASS, found {list(funcs)}"
    for name, sass in gemms.items():
        hmma = sass.count("HMMA.16816.F32.BF16")
        print(f"{arch}: {hmma:3d} HMMA.16816.F32.BF16, {sass.count('LDSM'):3d} LDSM, "
              f"{sass.count('LDGSTS'):3d} LDGSTS  {pretty(name)}")
        assert hmma > 0, f"{arch} {name}: no bf16 tensor-core MMA in the SASS"
        assert "LDSM" in sass, f"{arch} {name}: fragments are not loaded with ldmatrix"
        assert "LDGSTS" in sass, f"{arch} {name}: tiles are not copied with cp.async"
        assert not re.search(r"\b(LDL|STL)\b", sass), f"{arch} {name}: local-memory traffic (LDL/STL)"


# ----------------------------------------------------------------------------------------------------------------
# GPU tier

ROUTED_SCALING = 2.827  # Kimi K2 routed_scaling_factor (config.json): weights are O(1), as the router makes them
CONFIGS = {"auto": 0, "small": 1, "medium": 2, "large": 3}  # kernels_binding.cpp: moe_forward(config=...)


def kernels_or_skip():
    """The built extension, through moe.py's single import of it; skips cleanly where there is none."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import moe

    if moe._ext is None:
        pytest.skip(f"{moe._EXT_WHY}; build with KIMI_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    return moe, moe._ext


def make_case(T: int, E: int, K: int, D: int, I: int, seed: int):
    """Fresh random inputs on the GPU: x (T, D) bf16, weights (T, K) fp32, idx (T, K) int64, bf16 experts.
    Routing is skewed: a Zipf-like popularity over a random 3/4 of the experts (at least K), so some experts get
    no tokens, one gets many (more than a tile), and the others a few."""
    import moe

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    experts = moe.Experts(E, D, I)
    with torch.no_grad():  # std 1/sqrt(fan_in): every activation stays O(1), like a trained layer's
        experts.gate_proj.copy_(torch.randn(E, I, D, generator=g) / D**0.5)
        experts.up_proj.copy_(torch.randn(E, I, D, generator=g) / D**0.5)
        experts.down_proj.copy_(torch.randn(E, D, I, generator=g) / I**0.5)
    live = max(K, 3 * E // 4)
    popularity = torch.zeros(E)
    popularity[torch.randperm(E, generator=g)[:live]] = 1.0 / torch.arange(1, live + 1)
    idx = torch.multinomial(popularity.expand(T, E), K, replacement=False, generator=g)  # (T, K) distinct experts
    w = torch.rand(T, K, generator=g) + 0.1
    w = w / w.sum(-1, keepdim=True) * ROUTED_SCALING  # (T, K) fp32, normalised and scaled like moe.Gate's
    return x.cuda().bfloat16(), w.cuda(), idx.cuda(), experts.cuda().bfloat16()


def fused(ext, x, w, idx, ex, config=0, poison=True):
    return ext.moe_forward(x, idx, w, ex.gate_proj, ex.up_proj, ex.down_proj, config=config, poison=poison)


def reference64(moe, x, w, idx, ex):
    """moe_reference on the same (bf16-valued) inputs upcast to float64 (exact: every bf16 is a float64)."""
    return moe.moe_reference(x.double(), w.double(), idx, copy.deepcopy(ex).double())


@pytest.mark.gpu
@pytest.mark.parametrize("K", [1, 2, 8])
@pytest.mark.parametrize("E", [8, 64, 384])
@pytest.mark.parametrize("T", [1, 7, 128, 1000, 4096])
def test_fused_matches_reference(T, E, K):
    moe, ext = kernels_or_skip()
    if K > E:
        pytest.skip("top-k larger than the expert count")
    D, I = 200, 136  # multiples of 8 (the kernels' requirement) but of no tile size: partial tiles in n and k
    x, w, idx, ex = make_case(T, E, K, D, I, seed=1000 * T + 10 * E + K)
    with torch.no_grad():
        ref64 = reference64(moe, x, w, idx, ex)
        err_torch = (moe.moe_reference(x, w, idx, ex).double() - ref64).abs().max().item()  # PyTorch's own bf16 error
        counts = torch.bincount(idx.flatten(), minlength=E)
        for name, config in CONFIGS.items():
            out = fused(ext, x, w, idx, ex, config)
            assert out.shape == (T, D) and out.dtype == torch.bfloat16
            diff = (out.double() - ref64).abs()
            err, mean = diff.max().item(), diff.mean().item()
            rel = ((out.double() - ref64).norm() / ref64.norm()).item()
            print(f"T={T} E={E} K={K} {name:6s} ({ext.pick_config(T, K, E) if config == 0 else name}): "
                  f"max {err:.2e} mean {mean:.2e} rel {rel:.2e}; torch bf16 max {err_torch:.2e}; "
                  f"{int((counts == 0).sum())} empty experts, busiest {int(counts.max())} rows")
            assert not torch.isnan(out).any(), f"NaN in the output ({name}): a row of the workspace was never written"
            assert err <= 2 * err_torch + 1e-6, f"kernel {err:.2e} vs torch {err_torch:.2e} (T={T}, E={E}, K={K}, {name})"
            assert rel < 1e-2, f"relative error {rel:.2e} (bf16 operands should land near 1e-3)"


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 512])
def test_fused_matches_reference_gpu_small_shapes(T):
    """The gpu-small preset's expert sizes (D 1536, I 512, 64 experts top-8): long k loops, full tiles."""
    moe, ext = kernels_or_skip()
    x, w, idx, ex = make_case(T, 64, 8, 1536, 512, seed=T)
    with torch.no_grad():
        ref64 = reference64(moe, x, w, idx, ex)
        err_torch = (moe.moe_reference(x, w, idx, ex).double() - ref64).abs().max().item()
        for name, config in CONFIGS.items():
            err = (fused(ext, x, w, idx, ex, config).double() - ref64).abs().max().item()
            print(f"gpu-small T={T} {name}: max {err:.2e}, torch bf16 max {err_torch:.2e}")
            assert err <= 2 * err_torch + 1e-6, f"kernel {err:.2e} vs torch {err_torch:.2e} ({name})"


@pytest.mark.gpu
@pytest.mark.parametrize("T", [7, 4096])
def test_fused_is_deterministic(T):
    """Two runs, bit for bit: stable sort, no float atomics, fixed-order combine."""
    moe, ext = kernels_or_skip()
    x, w, idx, ex = make_case(T, 384, 8, 256, 128, seed=7)
    for config in CONFIGS.values():
        a, b = fused(ext, x, w, idx, ex, config), fused(ext, x, w, idx, ex, config)
        assert torch.equal(a, b), f"two runs differ (config {config}): {(a.float() - b.float()).abs().max():.2e}"


@pytest.mark.gpu
def test_fused_edge_cases_and_errors():
    moe, ext = kernels_or_skip()
    x, w, idx, ex = make_case(5, 8, 2, 64, 32, seed=3)
    assert fused(ext, x[:0], w[:0], idx[:0], ex).shape == (0, 64)  # no tokens: no launch, empty output
    same = idx.clone()
    same[:] = torch.tensor([3, 5], device=idx.device)  # every token on the same two experts; the other six empty
    with torch.no_grad():
        ref64 = reference64(moe, x, w, same, ex)
        err_torch = (moe.moe_reference(x, w, same, ex).double() - ref64).abs().max().item()
        err = (fused(ext, x, w, same, ex).double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, f"kernel {err:.2e} vs torch {err_torch:.2e} (all tokens on experts 3 and 5)"
    assert torch.equal(fused(ext, x, w, idx.int(), ex), fused(ext, x, w, idx, ex))  # int32 ids = int64 ids
    with pytest.raises(RuntimeError, match="D % 8"):
        bad = moe.Experts(8, 60, 32).cuda().bfloat16()
        ext.moe_forward(torch.zeros(5, 60, device="cuda", dtype=torch.bfloat16), idx, w,
                        bad.gate_proj, bad.up_proj, bad.down_proj)
    with pytest.raises(RuntimeError, match="weights must be"):
        fused(ext, x, w.double(), idx, ex)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.moe_forward(x, idx, w, ex.gate_proj.transpose(1, 2).contiguous().transpose(1, 2), ex.up_proj,
                        ex.down_proj)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 300])
def test_autograd_wrapper_gradient_matches_reference(T):
    """moe.run_experts("cuda", ...) runs the fused forward; its backward must give the reference's gradients."""
    moe, ext = kernels_or_skip()
    x0, w0, idx, ex_cuda = make_case(T, 64, 8, 256, 128, seed=11 + T)
    ex_ref = moe.Experts(64, 256, 128).cuda().bfloat16()
    ex_ref.load_state_dict(ex_cuda.state_dict())
    grads = {}
    for impl, ex in (("cuda", ex_cuda), ("reference", ex_ref)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = moe.run_experts(impl, x, w, idx, ex)
        g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
        out.backward(g_out)
        grads[impl] = {"x": x.grad, "weights": w.grad, **{n: p.grad for n, p in ex.named_parameters()}}
    for name, ref in grads["reference"].items():
        got = grads["cuda"][name]
        assert got is not None and got.shape == ref.shape, f"no gradient for {name} through the cuda path"
        rel = ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
        print(f"T={T} grad {name}: relative difference {rel:.2e}")
        assert rel < 1e-2, f"gradient of {name} differs from the reference's by {rel:.2e}"
