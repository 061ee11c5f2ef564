"""Protects: the whole network is the DeepSeek-V3-family function — logits equal Hugging Face transformers'
DeepseekV3ForCausalLM, loading its checkpoints (from_pretrained) and writing checkpoints it loads (save_pretrained).
Compares against: transformers' native DeepseekV3 (eager attention, fp32) with the same random weights, for a K2-like,
a DeepSeek-like (group-limited routing) and a Moonlight-like (q_lora_rank None, 2 shared experts) tiny config, each
with YaRN and a non-zero random routing bias; sequences shorter and longer than original_max_position_embeddings.
Beyond those three: YaRN settings they do not use (truncate, mscale, attention_factor, rope_type) against transformers'
rotary embedding, and a few unusual configs (plain q_proj with top-1 and no renormalisation, sizes no multiple of 4,
no shared expert, 8 groups, all layers dense) in both directions and with cached decode.
Tolerance: max |Δlogit| <= 1e-4 · max |logit| (fp32; observed ~1e-7 relative).
Run: pytest tests/test_hf_parity.py -q   (CPU, about 10 s)"""
import pytest
import torch

import attention as A
import model as M
from conftest import hf_available, hf_config, random_hf_model, tiny_args

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


# ---------------------------------------------------------------- configurations beyond the three released ones

def _yarn(**kw):
    return {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, **kw}


@pytest.mark.parametrize("rope_scaling,rope_theta", [
    (_yarn(truncate=False), 10000.0),  # HF's unrounded ramp ends (a key gpt-oss-style YaRN configs carry)
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2,
      "mscale": 1.0, "mscale_all_dim": 0.5}, 1e6),  # v5's key name; mscale != mscale_all_dim scales cos/sin
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707}, 50000.0),
    (_yarn(attention_factor=0.8), 50000.0),
    (None, 1e6),
])
def test_rope_settings_match_transformers(rope_scaling, rope_theta, tmp_path):
    """inv_freq, the cos/sin multiplier and the softmax scale equal transformers' for YaRN settings the released
    configs do not use, read through the config.json transformers writes (rope_parameters)."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_mod

    args = tiny_args("k2", qk_rope_head_dim=32, rope_scaling=rope_scaling, rope_theta=rope_theta)
    cfg = hf_config(args)
    cfg.save_pretrained(tmp_path)
    ours = M.ModelArgs.from_json(tmp_path)
    rotary = hf_mod.DeepseekV3RotaryEmbedding(cfg)
    inv_freq, mult = A.rope_parameters(ours)
    torch.testing.assert_close(inv_freq, rotary.inv_freq, rtol=1e-6, atol=0)
    assert abs(mult - rotary.attention_scaling) < 1e-7
    assert abs(A.MLA(ours).softmax_scale - hf_mod.DeepseekV3Attention(cfg, 0).scaling) < 1e-7


@pytest.mark.parametrize("overrides", [
    # plain q_proj, no renormalisation, scale 1, top-1, YaRN without rounded ramp ends
    dict(q_lora_rank=None, norm_topk_prob=False, routed_scaling_factor=1.0, num_experts_per_tok=1,
         rope_scaling=_yarn(truncate=False)),
    # sizes that are no multiple of 4 (torch._grouped_mm needs 16-byte rows), v wider than q/k, no shared expert,
    # no dense layer
    dict(hidden_size=45, num_attention_heads=3, q_lora_rank=11, kv_lora_rank=13, qk_nope_head_dim=7,
         qk_rope_head_dim=6, v_head_dim=17, intermediate_size=33, moe_intermediate_size=7, n_shared_experts=0,
         first_k_dense_replace=0),
    # 8 groups of 2 experts, keep 3; 2 shared experts; no YaRN
    dict(n_routed_experts=16, num_experts_per_tok=3, n_group=8, topk_group=3, n_shared_experts=2, rope_scaling=None,
         rope_theta=1e6, rms_norm_eps=1e-5),
    # every layer dense (first_k_dense_replace > num_hidden_layers, as HF allows); routing settings then unused
    dict(first_k_dense_replace=5, n_group=8, topk_group=4),
])
def test_unusual_configs_match_transformers_both_ways(overrides, tmp_path):
    """Beyond the three families: logits equal transformers' after from_pretrained, cached decode (both attention
    formulations, chunked prefill) equals the full forward, and save_pretrained loads back into transformers.
    Tolerance: 1e-4 of the logit scale (fp32; observed ~1e-6), cache 1e-5."""
    from transformers import DeepseekV3ForCausalLM

    args = tiny_args("k2", **overrides)
    hf, ours = _hf_and_ours(args, 5, tmp_path / "hf")
    hf.set_experts_implementation("eager")  # the expert loop: HF's grouped_mm path also needs 16-byte rows
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, args.vocab_size, (2, 70), generator=g)  # 70 > original_max_position_embeddings = 64
    with torch.no_grad():
        ref = hf(ids).logits
        full = ours(ids)
        _close(full, ref)
        for impl in ("naive", "absorb"):
            cache = ours.new_cache(2, 70)
            steps = [ours(ids[:, :40], cache, attn_impl=impl), ours(ids[:, 40:66], cache, attn_impl=impl)]
            steps += [ours(ids[:, t:t + 1], cache, attn_impl=impl) for t in range(66, 70)]
            torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5 * full.abs().max().item())
    ours.save_pretrained(tmp_path / "ours")
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager",
                                                 experts_implementation="eager").eval()
    with torch.no_grad():
        _close(back(ids).logits, ref)
