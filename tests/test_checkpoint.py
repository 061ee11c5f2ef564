"""Protects the Hugging Face checkpoint format (checkpoint.py, through Transformer.from_pretrained /
save_pretrained): sharded round trips, clear errors that name every missing, unexpected or mis-shaped tensor,
keys that are ignored on purpose, atomic saving, FP8 block dequantization (e4m3 and e5m2, any
weight_block_size), and integer weights refused.
Compares against: the saved model itself (bit for bit) and a float64 re-computation of FP8 dequantization
written here.
Run: pytest tests/test_checkpoint.py -q   (CPU, seconds)"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import model as M
from conftest import random_model, tiny_args


# ---------------------------------------------------------------- checkpoints

def test_save_load_round_trip_sharded(tmp_path):
    model = random_model(tiny_args("deepseek"), seed=2)
    model.save_pretrained(tmp_path / "ck", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.2.mlp.experts.15.down_proj.weight" in index["weight_map"]  # one tensor per expert on disk
    back = M.Transformer.from_pretrained(tmp_path / "ck")
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def _saved(tmp_path, seed=0):
    model = random_model(tiny_args("k2"), seed=seed)
    model.save_pretrained(tmp_path / "ck")
    return model, tmp_path / "ck" / "model.safetensors"


def test_missing_unexpected_and_misshaped_tensors_named_together(tmp_path):
    _, f = _saved(tmp_path)
    t = load_file(f)
    del t["model.layers.1.mlp.experts.3.up_proj.weight"]
    del t["lm_head.weight"]
    t["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(7, 16)
    t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(t, str(f))
    with pytest.raises(ValueError) as e:
        M.Transformer.from_pretrained(tmp_path / "ck")
    msg = str(e.value)
    for name in ("model.layers.1.mlp.experts.3.up_proj.weight", "lm_head.weight",
                 "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert name in msg
    assert "(7, 16)" in msg


def test_missing_shard_and_directory(tmp_path):
    model = random_model(tiny_args("k2"))
    model.save_pretrained(tmp_path / "ck", max_shard_bytes=50_000)
    shard = sorted((tmp_path / "ck").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        M.Transformer.from_pretrained(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.Transformer.from_pretrained(tmp_path / "nowhere")


def test_ignored_keys_rotary_and_mtp(tmp_path):
    model = random_model(tiny_args("k2", num_nextn_predict_layers=1), seed=1)
    model.save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    t["model.layers.3.eh_proj.weight"] = torch.zeros(2, 2)  # an MTP module after the last layer (DeepSeek-V3)
    save_file(t, str(f))
    back = M.Transformer.from_pretrained(tmp_path / "ck")
    assert torch.equal(back.inv_freq, model.inv_freq)


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path):
    model, _ = _saved(tmp_path, seed=0)
    (tmp_path / "ck" / "tiktoken.model").write_text("kept")

    def crash(tmp_dir):
        raise KeyboardInterrupt  # Ctrl-C after the weights were written to the temporary directory

    other = random_model(tiny_args("k2"), seed=1)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(tmp_path / "ck", extra=crash)
    back = M.Transformer.from_pretrained(tmp_path / "ck")
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the partial temporary copy was removed
    other.save_pretrained(tmp_path / "ck")  # a later save succeeds and carries the tokenizer over
    assert (tmp_path / "ck" / "tiktoken.model").read_text() == "kept"
    assert torch.equal(M.Transformer.from_pretrained(tmp_path / "ck").lm_head.weight, other.lm_head.weight)


def test_fp8_block_dequantization(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g, dtype=torch.float64)
    scale = torch.rand(3, 2, generator=g, dtype=torch.float64) + 0.5  # ceil(300/128) x ceil(200/128) blocks
    q = (w / 4).to(torch.float8_e4m3fn)
    ref = torch.empty_like(w)
    for i in range(300):  # the definition, element by element per block row: W[i, j] = q[i, j] * s[i//128, j//128]
        ref[i] = q[i].double() * scale[i // 128].repeat_interleave(128)[:200]
    torch.testing.assert_close(checkpoint.dequantize_fp8(q, scale.float()).double(), ref, rtol=1e-7, atol=0)


def test_fp8_checkpoint_loads(tmp_path):
    args = tiny_args("k2")
    model = random_model(args, seed=3)
    model.save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    t = load_file(f)
    key = "model.layers.0.self_attn.o_proj.weight"
    scale = torch.full((1, 1), 0.01)
    t[key] = (t[key] / 0.01).to(torch.float8_e4m3fn)
    t[key + "_scale_inv"] = scale
    save_file(t, str(f))
    back = M.Transformer.from_pretrained(tmp_path / "ck")
    expect = t[key].float() * 0.01
    assert torch.equal(back.state_dict()[key], expect)


def _quantize_blocks(w: torch.Tensor, dtype: torch.dtype, block: tuple[int, int]):
    """Per-block FP8 quantization written for the test: scale = block absmax / (largest finite value / 2)."""
    br, bc = block
    R, C = w.shape
    scale = torch.empty(-(-R // br), -(-C // bc))
    q = torch.empty(R, C, dtype=dtype)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            scale[i, j] = blk.abs().max() / (torch.finfo(dtype).max / 2)
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk / scale[i, j]).to(dtype)
    return q, scale


@pytest.mark.parametrize("dtype,block", [(torch.float8_e4m3fn, (16, 32)), (torch.float8_e5m2, (128, 128))])
def test_fp8_formats_and_block_sizes_load(dtype, block, tmp_path):
    """Any FP8 format is dequantized with its scales (an e5m2 weight copied as is would silently drop them), with the
    block of quantization_config.weight_block_size. Expected values: element by element in float64, here.
    A checkpoint written after loading holds plain weights, so its config.json names no quantization."""
    model = random_model(tiny_args("k2"), seed=5)
    model.save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    t = load_file(f)
    keys = ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight"]
    expect = {}
    for key in keys:
        t[key], t[key + "_scale_inv"] = _quantize_blocks(t[key], dtype, block)
        s = t[key + "_scale_inv"].double()
        expect[key] = torch.tensor([[t[key][i, j].double().item() * s[i // block[0], j // block[1]].item()
                                     for j in range(t[key].shape[1])] for i in range(t[key].shape[0])],
                                   dtype=torch.float64)
    save_file(t, str(f))
    cfg = tmp_path / "ck" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "quantization_config": {
        "activation_scheme": "dynamic", "quant_method": "fp8", "weight_block_size": list(block)}}))
    back = M.Transformer.from_pretrained(tmp_path / "ck")
    sd = back.state_dict()
    torch.testing.assert_close(sd[keys[0]].double(), expect[keys[0]], rtol=1e-6, atol=0)
    torch.testing.assert_close(sd["model.layers.1.mlp.experts.down_proj"][3].double(), expect[keys[1]], rtol=1e-6,
                               atol=0)
    back.save_pretrained(tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_integer_weights_are_a_clear_error(tmp_path):
    _, f = _saved(tmp_path)
    t = load_file(f)
    t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(t["model.layers.0.self_attn.o_proj.weight"].shape,
                                                              dtype=torch.int8)
    save_file(t, str(f))
    with pytest.raises(ValueError, match="o_proj.weight is stored as torch.int8"):
        M.Transformer.from_pretrained(tmp_path / "ck")


def test_moe_layer_freq_mismatch_is_explained(tmp_path):
    """transformers' DeepseekV3 ignores moe_layer_freq; DeepSeek's own code (and this reference) honours it. A
    checkpoint whose experts disagree with the key gets an error that names the key, not only the tensors."""
    random_model(tiny_args("k2"), seed=0).save_pretrained(tmp_path / "ck")
    cfg = tmp_path / "ck" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "moe_layer_freq": 2}))
    with pytest.raises(ValueError, match="moe_layer_freq=2 makes layer l MoE only if"):
        M.Transformer.from_pretrained(tmp_path / "ck")
