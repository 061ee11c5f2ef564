"""Kimi K2's configuration: one dataclass whose field names are the Hugging Face `config.json` keys.

A real config.json loads with a key filter, not a translation, so the same `ModelArgs` describes the
released Kimi K2, DeepSeek-V3 and Moonlight checkpoints and the scaled-down presets this repository
trains. Every rule a field must obey is checked once, in `__post_init__`, with an error that names
the field, its value, the rule and the fix, before any module is built.

This file imports nothing of the network: attention.py, moe.py and model.py import the config type
from here, and the network from model.py.

* `ModelArgs`: the fields (defaults = Kimi-K2-Instruct), validation, `from_dict` / `from_json` (Kimi
  K2, DeepSeek-V3, Moonlight, or a config.json written by transformers v5) and `to_dict`.
* `PRESETS`: the real models (kimi-k2, deepseek-v3, moonlight-16b-a3b) and scaled-down ones (tiny,
  cpu-small, gpu-small); `load_args` takes a preset name or a config.json path.
* `world_size_problems` / `valid_world_sizes`: which numbers of ranks split a config evenly
  (parallel.py).
* `kv_cache_bytes_per_token`: MLA's latent cache against the multi-head K/V cache it replaces.

References: Kimi-K2-Instruct config.json (Hugging Face, July 2025); DeepSeek-V3 config.json and
inference/configs/config_671B.json (arXiv 2412.19437); Moonlight-16B-A3B-Instruct config.json
(arXiv 2502.16982); transformers' DeepseekV3Config for the defaults of keys a file leaves out.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class ModelArgs:
    """Kimi K2's configuration. Defaults are the Kimi-K2-Instruct `config.json` (HF, July 2025)."""
    # --- trunk
    # 163,584 BPE ranks of the official tiktoken.model + 256 special/reserved ids
    # (tokenization_kimi.py)
    vocab_size: int = 163840
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 1  # layer 0 dense SwiGLU; layers 1..60 MoE (DeepSeek-V3: 3)
    # layer l is MoE iff l >= first_k_dense_replace and l % moe_layer_freq == 0
    moe_layer_freq: int = 1
    intermediate_size: int = 18432  # dense MLP width
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False  # untied lm_head
    # --- MLA attention
    # DeepSeek-V3 has 128; K2 halved them for long-context inference cost (Kimi K2 report §2.1)
    num_attention_heads: int = 64
    q_lora_rank: int | None = 1536  # None = plain q_proj (Moonlight)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_position_embeddings: int = 131072  # 128K context
    rope_theta: float = 50000.0
    # YaRN to 128K from a 4K pretraining context
    rope_scaling: dict | None = field(default_factory=lambda: {
        "type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
        "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    # --- MoE
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8  # sparsity 384 / 8 = 48
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 2.827
    n_group: int = 1  # one group = plain top-k (DeepSeek-V3: 8 groups, keep topk_group = 4)
    topk_group: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"  # sigmoid scores + correction bias for selection (aux-loss-free)
    # the config's value; DeepSeek-V3 §4.2 uses alpha = 1e-4 for its optional sequence-wise loss
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # --- bookkeeping kept for a faithful round trip of config.json
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 163584  # [BOS]
    eos_token_id: int | list | None = 163585  # [EOS]
    pad_token_id: int | None = None
    # MTP modules in the checkpoint (DeepSeek-V3: 1, ignored on load)
    num_nextn_predict_layers: int = 0
    model_type: str = "kimi_k2"
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None

    def __post_init__(self):
        def bad(name: str, rule: str, fix: str):
            raise ValueError(f"config: {name}={getattr(self, name)!r} {rule}; {fix}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "intermediate_size", "moe_intermediate_size", "n_routed_experts",
                     "num_experts_per_tok", "max_position_embeddings", "n_group", "topk_group",
                     "moe_layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, "must be a positive integer", "fix the value")
        q = self.q_lora_rank
        if q is not None and (not isinstance(q, int) or q < 1):
            bad("q_lora_rank", "must be a positive integer or null", "use null for a plain q_proj")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs of dimensions)",
                "use an even number")
        # first_k_dense_replace >= num_hidden_layers: every layer dense (HF: l is MoE iff l >= it)
        if not isinstance(self.first_k_dense_replace, int) or self.first_k_dense_replace < 0:
            bad("first_k_dense_replace", "must be an integer >= 0", "fix the value")
        # DeepSeek's remote modeling_deepseek.py: null = no shared expert
        if self.n_shared_experts is None:
            self.n_shared_experts = 0
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            bad("n_shared_experts", "must be an integer >= 0 (or null: none)", "fix the value")
        # routing settings matter only if some layer is MoE (an all-dense model builds no router,
        # as in HF)
        if any(self.is_moe_layer(layer) for layer in range(self.num_hidden_layers)):
            E, G = self.n_routed_experts, self.n_group
            if not self.num_experts_per_tok <= E:
                bad("num_experts_per_tok", f"must be <= n_routed_experts={E}",
                    "lower it or add experts")
            if E % G:
                bad("n_group", f"must divide n_routed_experts={E}", "use a divisor, or 1")
            if not self.topk_group <= G:
                bad("topk_group", f"must be <= n_group={G}", "lower it")
            if G > 1 and E // G < 2:
                bad("n_group", "leaves fewer than 2 experts per group (a group's score is its 2 "
                    "best experts)", "lower it")
            if self.num_experts_per_tok > self.topk_group * (E // G):
                bad("num_experts_per_tok", f"exceeds the experts in the kept groups "
                    f"({self.topk_group} x {E // G})", "raise topk_group or lower top-k")
        for name, allowed in (("hidden_act", "silu"), ("scoring_func", "sigmoid"),
                              ("topk_method", "noaux_tc")):
            if getattr(self, name) != allowed:
                bad(name, f"is not supported (this reference implements {allowed!r} only)",
                    f"use {allowed!r}")
        for name in ("tie_word_embeddings", "attention_bias"):
            if getattr(self, name):
                bad(name, "is not supported (Kimi K2 / DeepSeek-V3 have none)", "set it to false")
        if self.attention_dropout:
            bad("attention_dropout", "is not supported", "set it to 0.0")
        rs = self.rope_scaling
        # HF: a theta inside the RoPE dict wins
        if rs is not None and rs.get("rope_theta") is not None:
            self.rope_theta = rs["rope_theta"]
        # "default" is HF's name for plain RoPE
        if rs is not None and rs.get("type", rs.get("rope_type")) == "default":
            self.rope_scaling = rs = None
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            if kind != "yarn":
                bad("rope_scaling", "must be null or YaRN ({'type': 'yarn', ...})",
                    "use YaRN or remove it")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in rs:
                    bad("rope_scaling", f"lacks {key!r}",
                        f"add {key!r} (K2: factor 32, original 4096)")
        qc = self.quantization_config
        # what from_pretrained can read: DeepSeek-V3 / K2's block-scaled FP8 (DeepSeek-V3
        # README_WEIGHTS.md)
        if qc is not None:
            if qc.get("quant_method") != "fp8":
                bad("quantization_config", f"has quant_method={qc.get('quant_method')!r}, which "
                    "this reference cannot dequantize (supported: 'fp8' with per-block "
                    "weight_scale_inv, as DeepSeek-V3 / Kimi K2)", "dequantize the checkpoint to "
                    "bf16 first, or remove the key if its weights are not quantized")
            if not self.fp8_block_size():
                block = qc.get("weight_block_size")
                bad("quantization_config", f"has weight_block_size={block!r}; supported: two "
                    "positive integers (K2: [128, 128])", "fix the value")

    def fp8_block_size(self) -> tuple[int, int] | None:
        """(rows, columns) of one FP8 scale block: quantization_config's weight_block_size, default
        128 x 128 (the DeepSeek-V3 / K2 value, also used for FP8 tensors in a checkpoint without a
        quantization_config)."""
        block = (self.quantization_config or {}).get("weight_block_size", [128, 128])
        ok = isinstance(block, (list, tuple)) and len(block) == 2 and all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        return tuple(block) if ok else None

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    # keys a real or HF-written config.json carries that do not change the network (or are derived)
    IGNORED_KEYS = frozenset({
        "architectures", "auto_map", "transformers_version", "dtype", "use_cache", "pretraining_tp",
        "ep_size", "num_key_value_heads", "output_router_logits", "rope_interleave", "head_dim",
        "qk_head_dim", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
        "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder", "problem_type",
        "id2label", "label2id"})

    # transformers' DeepseekV3Config defaults, for keys a config.json may omit
    HF_DEFAULTS = dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, bos_token_id=0, eos_token_id=1,
        model_type="deepseek_v3")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        """Build from a config.json dict (Kimi K2, DeepSeek-V3, Moonlight, or one written by
        transformers v5). Unknown keys are an error that names them."""
        d = dict(d)
        # transformers v5 writes RoPE settings here (rope_theta inside)
        if "rope_parameters" in d:
            rp = dict(d.pop("rope_parameters") or {})
            if "rope_theta" in rp:
                d["rope_theta"] = rp.pop("rope_theta")
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            d["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
        if "num_mtp_layers" in d:  # transformers v5 alias
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        # DeepSeek-V3's inference/model.py apply_rotary_emb rotates interleaved pairs (x_2i, x_2i+1)
        if d.get("rope_interleave") is False:
            raise ValueError("config: rope_interleave=false is not supported; the released weights "
                             "use interleaved RoPE pairs (DeepSeek-V3 inference/model.py, "
                             "apply_rotary_emb)")
        qk = d.get("qk_nope_head_dim", 128) + d.get("qk_rope_head_dim", 64)
        if d.get("qk_head_dim") not in (None, qk):
            raise ValueError(f"config: qk_head_dim={d['qk_head_dim']} != qk_nope_head_dim + "
                             "qk_rope_head_dim")
        names = {f.name for f in dataclasses.fields(cls)}
        # a key the file leaves out means what transformers would assume, not K2's value (Moonlight
        # has no rope_scaling key: plain RoPE, not K2's YaRN)
        d = {**{k: v for k, v in cls.HF_DEFAULTS.items() if k not in d}, **d}
        # "_"-prefixed keys are transformers' own bookkeeping (`_attn_implementation_autoset`, which
        # 4.48-era save_pretrained wrote into config.json files, `_name_or_path`, `_commit_hash`):
        # never the network
        unknown = sorted(k for k in d
                         if k not in names and k not in cls.IGNORED_KEYS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; remove them or check their spelling "
                             f"(known keys: the fields of config.ModelArgs)")
        rs = d.get("rope_scaling")
        if isinstance(rs, dict) and "rope_type" in rs and "type" not in rs:
            rs = dict(rs)
            rs["type"] = rs.pop("rope_type")
            d["rope_scaling"] = rs
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelArgs":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}; pass a checkpoint directory or a "
                                    "config.json path")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not a JSON config ({err}); give a Hugging Face "
                             "config.json") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} holds a JSON {type(d).__name__}, not a config object; give a "
                             "config.json")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The HF config.json form (legacy rope_scaling + rope_theta, which transformers v4 and v5
        both read)."""
        d = {"architectures": ["DeepseekV3ForCausalLM"], **dataclasses.asdict(self)}
        # nominal under MLA; transformers' default 128 breaks eager attention
        d["num_key_value_heads"] = self.num_attention_heads
        # transformers has no "kimi_k2" model type (the real K2 repo ships remote code for it);
        # writing the architecture's own type lets DeepseekV3ForCausalLM load our checkpoints and
        # fuse the per-expert tensors
        d["model_type"] = "deepseek_v3"
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return d


# Small presets keep K2's structure (one dense layer first, one shared expert, sigmoid routing with
# scaling 2.827, YaRN factor 32 with beta 1/1, theta 50000, nope/rope/value = 2:1:2) at sizes that
# fit their purpose.
_SMALL = dict(rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64,
                            "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
                            "mscale_all_dim": 1.0},
              bos_token_id=None, eos_token_id=None, torch_dtype="float32")


def _small(**overrides) -> ModelArgs:
    return ModelArgs(**{**_SMALL, **overrides})


PRESETS: dict[str, Callable[[], ModelArgs]] = {
    # the real 1T model: the shapes for loading the official weights (about 2 TB in bf16)
    "kimi-k2": lambda: ModelArgs(),
    # DeepSeek-V3 (671B), config.json and inference/configs/config_671B.json: group-limited routing
    "deepseek-v3": lambda: ModelArgs(
        vocab_size=129280, num_attention_heads=128, first_k_dense_replace=3,
        max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        n_routed_experts=256, routed_scaling_factor=2.5, n_group=8, topk_group=4, bos_token_id=0,
        eos_token_id=1, num_nextn_predict_layers=1, model_type="deepseek_v3"),
    # Moonlight-16B-A3B-Instruct, its config.json: plain q_proj, 2 shared experts, no YaRN,
    # rms_norm_eps 1e-5
    "moonlight-16b-a3b": lambda: ModelArgs(
        hidden_size=2048, num_hidden_layers=27, intermediate_size=11264, num_attention_heads=16,
        q_lora_rank=None, max_position_embeddings=8192, rope_scaling=None, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=1408,
        routed_scaling_factor=2.446, rms_norm_eps=1e-5, eos_token_id=163586,
        model_type="deepseek_v3"),
    # one GPU (about 2.3B total / 0.83B active, 4.6 GB in bf16): exercises the CUDA expert kernel;
    # random init, no released weights. K2's head dims and vocab; 64 experts top-8.
    "gpu-small": lambda: _small(
        rope_scaling=dict(_SMALL["rope_scaling"], original_max_position_embeddings=4096),
        vocab_size=163840, hidden_size=1536, num_hidden_layers=12, intermediate_size=4608,
        num_attention_heads=12, q_lora_rank=512, kv_lora_rank=256, max_position_embeddings=131072,
        n_routed_experts=64, num_experts_per_tok=8, moe_intermediate_size=512,
        torch_dtype="bfloat16"),
    # laptop CPU (about 5M parameters): the shipped demo model is trained from this in minutes;
    # vocab fits the shipped 4,096-rank tokenizer (+256 specials)
    "cpu-small": lambda: _small(
        vocab_size=4352, hidden_size=192, num_hidden_layers=4, intermediate_size=512,
        num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=4096, n_routed_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=96),
    # tests only: 2 layers (1 dense + 1 MoE), 8 experts top-2; the whole CPU suite in seconds
    "tiny": lambda: _small(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=2048, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32),
}


def load_args(name_or_path: str) -> ModelArgs:
    """A preset name, a config.json path, or a checkpoint directory."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if os.path.exists(name_or_path):
        return ModelArgs.from_json(name_or_path)
    raise ValueError(f"unknown config {name_or_path!r}: use a preset ({', '.join(PRESETS)}) or a "
                     "config.json path")


def world_size_problems(args: ModelArgs, world_size: int) -> list[str]:
    """Why `world_size` ranks cannot split this config evenly (empty list: they can). See
    parallel.py for the split."""
    split = {"num_attention_heads": args.num_attention_heads,
             "n_routed_experts": args.n_routed_experts, "vocab_size": args.vocab_size,
             "intermediate_size": args.intermediate_size,
             "moe_intermediate_size * n_shared_experts":
                 args.moe_intermediate_size * args.n_shared_experts}
    return [f"{name}={n}" for name, n in split.items() if n % world_size]


def valid_world_sizes(args: ModelArgs, up_to: int = 1024) -> list[int]:
    return [w for w in range(1, up_to + 1) if not world_size_problems(args, w)]


def kv_cache_bytes_per_token(args: ModelArgs, bytes_per_value: int = 2) -> tuple[int, int]:
    """(MLA latent cache, equivalent multi-head K/V cache) bytes per token over all layers: the
    latent c_kv plus the shared rope key k_pe, against H·(Dn+Dr) keys + H·Dv values
    (DeepSeek-V2 §2.1.2)."""
    mla = (args.kv_lora_rank + args.qk_rope_head_dim) * args.num_hidden_layers * bytes_per_value
    head_dims = args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim  # Dn+Dr+Dv
    mha = args.num_attention_heads * head_dims * args.num_hidden_layers * bytes_per_value
    return mla, mha
