"""Protects the configuration (config.py): the three official config.json files load and equal the presets,
configs transformers accepts beyond them load, and every bad config is a clear error that names the field.
Compares against: the official config.json files (copied into tests/data/configs) and transformers' rules.
Run: pytest tests/test_config.py -q   (CPU, seconds)"""
import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
from conftest import DATA, random_model, tiny_args


# ---------------------------------------------------------------- the real configurations

@pytest.mark.parametrize("fname,preset", [("kimi_k2_instruct_config.json", "kimi-k2"),
                                          ("deepseek_v3_config.json", "deepseek-v3"),
                                          ("moonlight_16b_a3b_instruct_config.json", "moonlight-16b-a3b")])
def test_official_configs_load_and_equal_presets(fname, preset):
    a = M.ModelArgs.from_json(DATA / "configs" / fname)
    b = M.PRESETS[preset]()
    a.quantization_config = None  # a property of the released files, not of the network
    assert a == b


# ---------------------------------------------------------------- bad configurations

@pytest.mark.parametrize("change,match", [
    (dict(hidden_sise=64), r"unknown keys \['hidden_sise'\]"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9 must be <= n_routed_experts=8"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
    (dict(n_group=3), "n_group=3 must divide n_routed_experts=8"),
    (dict(topk_group=2), "topk_group=2 must be <= n_group=1"),
    (dict(scoring_func="softmax"), "scoring_func='softmax' is not supported"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(num_hidden_layers=True), "num_hidden_layers=True must be a positive integer"),
    (dict(n_shared_experts=-1), "n_shared_experts=-1 must be an integer >= 0"),
    (dict(quantization_config={"quant_method": "awq", "bits": 4}), "quant_method='awq'.*supported: 'fp8'"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128]}), "weight_block_size=\\[128\\]"),
])
def test_bad_config_is_a_clear_error(change, match):
    d = tiny_args("k2").to_dict()
    d.update(change)
    with pytest.raises(ValueError, match=match):
        M.ModelArgs.from_dict(d)


def test_configs_transformers_accepts_beyond_the_released_ones(tmp_path):
    """n_shared_experts null (DeepSeek's remote code: no shared expert, no tensors), first_k_dense_replace above
    num_hidden_layers (every layer dense; HF: layer l is MoE iff l >= it, and the routing settings are then unused),
    rope_scaling of type "default" (plain RoPE)."""
    args = M.ModelArgs.from_dict({**tiny_args("k2").to_dict(), "n_shared_experts": None})
    assert args.n_shared_experts == 0
    model = random_model(args, seed=4)
    model.save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    t = load_file(f)
    assert t["model.layers.1.mlp.shared_experts.gate_proj.weight"].numel() == 0
    save_file({k: v for k, v in t.items() if v.numel()}, str(f))  # as a checkpoint without shared experts has it
    ids = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(M.Transformer.from_pretrained(tmp_path / "ck")(ids), model(ids), rtol=0, atol=0)
    dense = tiny_args("k2", first_k_dense_replace=5, n_group=8, topk_group=4)  # 8 groups of 1 expert: unused
    assert not any(dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))
    assert not any(isinstance(m, M.MoE) for m in M.Transformer(dense).modules())
    assert tiny_args("k2", rope_scaling={"rope_type": "default"}).rope_scaling is None
    # a rope_theta inside the RoPE dict wins over the top-level key, as in transformers' standardize_rope_params
    assert tiny_args("k2", rope_theta=5e4, rope_scaling={"rope_type": "default", "rope_theta": 1e6}).rope_theta == 1e6
    inner = dict(tiny_args("k2").rope_scaling, rope_theta=1e6)
    assert tiny_args("k2", rope_theta=5e4, rope_scaling=inner).rope_theta == 1e6
    # transformers' private bookkeeping keys (written by 4.48-era save_pretrained) are not typos
    d = tiny_args("k2").to_dict()
    assert M.ModelArgs.from_dict({**d, "_attn_implementation_autoset": True}) == M.ModelArgs.from_dict(d)


def test_unknown_preset_and_missing_config(tmp_path):
    with pytest.raises(ValueError, match="unknown config 'kimi-k3'"):
        M.load_args("kimi-k3")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.ModelArgs.from_json(tmp_path)
