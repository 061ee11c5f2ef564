"""Shared helpers for the test-suite: small configs of the three DeepSeek-V3-family models, and a bridge that builds
the same network in Hugging Face transformers (the independent reference) from a ModelArgs."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the modules are flat files at the repository root
DATA = Path(__file__).parent / "data"

import model as M  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))  # CI has 2 cores; more threads only add contention


def tiny_args(kind: str = "k2", **overrides) -> "M.ModelArgs":
    """Tiny configs of the three families, each with YaRN and a sequence limit of 64 original positions.

    k2:        n_group 1, one dense layer, 1 shared expert, beta_fast = beta_slow = 1 (a hard YaRN step)
    deepseek:  group-limited routing (4 groups of 4, keep 2), 2 dense layers, beta_fast 32 (a YaRN ramp)
    moonlight: q_lora_rank None (plain q_proj), 2 shared experts, rms_norm_eps 1e-5 (latent norms stay 1e-6)
    """
    base = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, intermediate_size=96, num_attention_heads=4,
                q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                max_position_embeddings=512, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                initializer_range=0.1, bos_token_id=None, eos_token_id=None,
                rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64,
                              "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    if kind == "deepseek":
        base.update(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=2,
                    num_hidden_layers=4, rope_theta=10000.0, routed_scaling_factor=2.5,
                    rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    elif kind == "moonlight":
        base.update(q_lora_rank=None, n_shared_experts=2, rms_norm_eps=1e-5, routed_scaling_factor=2.446,
                    num_experts_per_tok=3)
    elif kind != "k2":
        raise ValueError(kind)
    base.update(overrides)
    return M.ModelArgs(**base)


def hf_config(args: "M.ModelArgs"):
    """The same configuration as a transformers DeepseekV3Config (legacy rope_scaling form, which v5 converts)."""
    from transformers import DeepseekV3Config

    d = args.to_dict()
    for k in ("architectures", "torch_dtype", "model_type", "scoring_func", "topk_method", "moe_layer_freq",
              "aux_loss_alpha", "seq_aux", "quantization_config", "num_nextn_predict_layers"):
        d.pop(k, None)
    return DeepseekV3Config(**d, num_mtp_layers=0)


def random_hf_model(args: "M.ModelArgs", seed: int):
    """A random transformers DeepseekV3ForCausalLM in fp32 (eager attention) with a non-zero routing bias."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM._from_config(hf_config(args), attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):  # large enough to change which experts win
                m.e_score_correction_bias.copy_(torch.rand(m.e_score_correction_bias.shape, generator=g) * 0.6 - 0.3)
            if hasattr(m, "variance_epsilon"):  # non-trivial norm weights
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
    return hf


def random_model(args: "M.ModelArgs", seed: int = 0) -> "M.Transformer":
    """Our Transformer with random weights, random norm gains and a non-zero routing bias, in eval mode."""
    torch.manual_seed(seed)
    model = M.Transformer(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand_like(b) * 0.6 - 0.3)
    return model


hf_available = pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers") is None, reason="transformers not installed")


def run_torchrun(nproc: int, entry: list[str], timeout: float) -> tuple[int, str, float]:
    """`torchrun --standalone --nproc-per-node NPROC ENTRY...` from the repository root, one torch thread per rank;
    (exit code, stdout + stderr, seconds). The ranks run in their own process group, so a test that outlives its
    timeout kills them all and fails with their output instead of hanging."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *entry]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun {' '.join(entry)} on {nproc} ranks hung for {timeout:.0f} s:\n{out[-3000:]}")
    return proc.returncode, out, time.perf_counter() - t0
