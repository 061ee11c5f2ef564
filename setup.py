"""Install the Kimi K2 reference's dependencies and its optional fused CUDA kernel, none of its modules.

Safe install: none of the project's modules goes into site-packages, where their generic flat names (model,
tools, tokenizer, train, ...) would answer another project's `import model`; they run from the checkout, where
`python X.py` and `python -m pytest` find them, and code elsewhere that imports them puts the checkout on its
path (`PYTHONPATH=/path/to/checkout`). The compiled kernel keeps its own name, `kimi_k2_kernels`.

    python3 -m venv .venv && . .venv/bin/activate             # stock Linux Pythons refuse pip outside one (PEP 668)
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # CPU-only torch, a small download
    pip install -e ".[dev]"                                   # CPU: pure Python, always works
    KIMI_BUILD_CUDA=1 pip install --no-build-isolation -e ".[dev,cuda]"   # GPU: also build and inspect kernels.cu

KIMI_BUILD_CUDA = "1" (must build), "0" (skip), unset/"auto" (build only if nvcc and a CUDA build of torch are both
present). The kernel is optional at build time and obvious at run time: moe.pick_expert_impl says which path runs.
"""
import os
import sys

from setuptools import setup


def cuda_extension():
    """Return ([ext_modules], {cmdclass}) for kernels.cu, or empty ones, and print one line saying why."""
    mode = os.environ.get("KIMI_BUILD_CUDA", "auto")
    try:  # pip's isolated build env has no torch: then nothing can be built, which is fine on CPU
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda, CUDA_HOME = None, None
    can = CUDA_HOME is not None and torch_cuda is not None and os.path.exists("kernels.cu")
    if mode == "1" and not can:
        sys.exit("KIMI_BUILD_CUDA=1 but nvcc or a CUDA build of torch is missing "
                 f"(CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch_cuda}); install them, or unset the variable")
    build = mode == "1" or (mode == "auto" and can)
    print(f"kimi-k2: CUDA kernels {'ON' if build else 'OFF'} (KIMI_BUILD_CUDA={mode}, "
          f"nvcc {'found' if CUDA_HOME else 'missing'}, torch CUDA {torch_cuda or 'absent'})")
    if not build:
        return [], {}
    ext = CUDAExtension(
        name="kimi_k2_kernels",
        sources=["kernels_binding.cpp", "kernels.cu"],
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--use_fast_math", "-gencode=arch=compute_80,code=sm_80",
                                     "-gencode=arch=compute_90,code=sm_90"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="kimi-k2-reference",
    version="0.1.0",
    description="Educational reference implementation of Kimi K2 (MLA + MoE + MuonClip) in PyTorch",
    python_requires=">=3.10",
    # none, stated rather than left to setuptools' discovery: the modules run from the checkout (see above)
    py_modules=[],
    packages=[],
    # torch: a range that 2.13.0 satisfies and that stops there, so a fresh CPU machine takes the local CPU wheel
    # instead of downloading a several-GB CUDA build of a newer release.
    # regex: the BPE trainer's pre-tokenizer needs \p{..} classes and && intersections (tiktoken depends on it too)
    # jsonschema: tools.py validates tool schemas and the model's call arguments with it (full JSON Schema)
    install_requires=["torch>=2.6,<=2.13.0", "numpy", "tiktoken>=0.7", "safetensors>=0.4", "regex>=2023.0",
                      "jsonschema>=4.18"],
    extras_require={
        "dev": [
            "pytest>=8",
            "transformers>=5.0,<6",      # the independent DeepseekV3 reference for parity tests
            "hypothesis>=6",             # property tests of the tokenizer round trip
            "jinja2>=3.1",               # renders the official chat template in tests
            "openai>=1.0",               # the official client, driven against serve.py in tests/test_serve.py
            "matplotlib>=3.5",           # train.py's loss / max-logit plots (imported only when plotting)
        ],
        # CUDA machines only: disassembles the compiled kernels to check for tensor-core instructions
        # (tests/test_kernels.py skips that check without it); a separate extra, so CPU machines never download it
        "cuda": ["nvidia-cuda-nvdisasm>=13.0,<14; platform_system == 'Linux'"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
