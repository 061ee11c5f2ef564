"""Protects: the whole network is the DeepSeek-V3-family function — logits equal Hugging Face transformers'
DeepseekV3ForCausalLM, loading its checkpoints (from_pretrained) and writing checkpoints it loads (save_pretrained).
Compares against: transformers' native DeepseekV3 (eager attention, fp32) with the same random weights, for a K2-like,
a DeepSeek-like (group-limited routing) and a Moonlight-like (q_lora_rank None, 2 shared experts) tiny config, each
with YaRN and a non-zero random routing bias; sequences shorter and longer than original_max_position_embeddings.
Tolerance: max |Δlogit| <= 1e-4 · max |logit| (fp32; observed ~1e-7 relative).
Run: pytest tests/test_hf_parity.py -q   (CPU, about 10 s)"""
import pytest
import torch

import model as M
from conftest import hf_available, random_hf_model, tiny_args

pytestmark = hf_available


def _hf_and_ours(args, seed: int, path):
    """A random transformers model saved to `path`, and our Transformer loaded from that checkpoint."""
    hf = random_hf_model(args, seed)
    hf.save_pretrained(path)
    return hf, M.Transformer.from_pretrained(path).eval()


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-4 * scale, f"max |diff| {err:.3e} vs logit scale {scale:.3e}"


@pytest.mark.parametrize("kind", ["k2", "deepseek", "moonlight"])
@pytest.mark.parametrize("seed", [0, 1])
def test_from_pretrained_matches_transformers(kind, seed, tmp_path):
    args = tiny_args(kind)
    hf, ours = _hf_and_ours(args, seed, tmp_path)
    assert ours.lm_head.weight.dtype == torch.float32
    g = torch.Generator().manual_seed(100 + seed)
    for T in (1, 17, 100):  # 100 > original_max_position_embeddings = 64: YaRN's long-range pairs are in play
        ids = torch.randint(0, args.vocab_size, (2, T), generator=g)
        with torch.no_grad():
            _close(ours(ids), hf(ids).logits)


@pytest.mark.parametrize("kind", ["k2", "deepseek", "moonlight"])
def test_save_pretrained_loads_in_transformers(kind, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    args = tiny_args(kind)
    hf, ours = _hf_and_ours(args, 7, tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=200_000)  # force several shards + an index
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids = torch.randint(0, args.vocab_size, (2, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        _close(back(ids).logits, ref)
        _close(ours(ids), ref)


@pytest.mark.parametrize("kind", ["k2", "moonlight"])
def test_fresh_model_saved_by_us_loads_in_transformers(kind, tmp_path):
    """A model created here (not first written by transformers) loads in DeepseekV3ForCausalLM unchanged."""
    from transformers import DeepseekV3ForCausalLM

    from conftest import random_model

    args = tiny_args(kind)
    ours = random_model(args, seed=12)
    ours.save_pretrained(tmp_path)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, args.vocab_size, (2, 90), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        _close(ours(ids), hf(ids).logits)


def test_routing_bias_is_loaded_and_matters(tmp_path):
    """Guards the test itself: with the bias zeroed the logits must change, so parity above covers the bias."""
    args = tiny_args("k2")
    hf, ours = _hf_and_ours(args, 3, tmp_path)
    ids = torch.randint(0, args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = ours(ids)
        for layer in ours.model.layers[args.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
        after = ours(ids)
    assert (before - after).abs().max() > 1e-3


def test_cached_decode_matches_transformers_generate(tmp_path):
    """Greedy decoding with our latent cache gives the same tokens as transformers' generate with its cache."""
    args = tiny_args("k2")
    hf, ours = _hf_and_ours(args, 11, tmp_path)
    prompt = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 12:].tolist()
        cache = ours.new_cache(1, 64)
        logits = ours(prompt, cache, last_only=True)
        out = []
        for _ in range(20):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt.item())
            logits = ours(nxt, cache)
    assert out == ref
