"""Kimi K2: the configuration, the whole network, and Hugging Face checkpoint I/O.

Kimi K2 is architecturally DeepSeek-V3 (`architectures: ["DeepseekV3ForCausalLM"]`, SPEC §1): a pre-norm decoder
of 61 blocks, each Multi-head Latent Attention (attention.py) followed by an FFN that is a dense SwiGLU MLP for the
first `first_k_dense_replace` = 1 layer and a Mixture-of-Experts (moe.py: 384 routed experts, 8 per token, plus 1
shared) for the other 60. Then a final RMSNorm and an untied lm_head. No biases, no dropout, no embedding scaling.
What differs from DeepSeek-V3 is configuration only: 64 heads instead of 128, 384 experts instead of 256, one
dense layer instead of three, a single expert group, rope_theta 50000, YaRN factor 32, vocab 163,840.

This file:
* `ModelArgs`: the config, field names = the HF `config.json` keys, so a real config loads directly.
  `PRESETS`: the real models (kimi-k2, deepseek-v3, moonlight-16b-a3b) and scaled-down ones (tiny, cpu-small, gpu-small).
* `Transformer`: embedding -> blocks -> norm -> head; `model(tokens)` gives fp32 logits, `model(tokens, cache)`
  decodes incrementally against MLA's latent cache (attention.KVCache).
* `Transformer.from_pretrained` / `save_pretrained`: the HF safetensors layout (sharded, with an index; FP8 block-scaled
  weights are dequantized on load). Module names ARE the checkpoint names, except that the routed experts are stored
  stacked (E, ·, ·) here and one by one on disk: `mlp.experts.{e}.gate_proj.weight` is row e of `mlp.experts.gate_proj`.
* `write_atomically` / `recover_interrupted_save`: crash-safe writes (write -> fsync -> rename -> clean up) for
  save_pretrained and train.py: a kill or a power loss at any moment leaves the old version or the complete new one.
* `python model.py --config kimi-k2` prints parameter counts and KV-cache sizes, on the meta device (no memory);
  `--plan --world-size 16` prints the memory each of 16 GPUs needs (weights, latent KV cache, activations).
* Tensor + expert parallelism (parallel.py) lives inside these same modules: under `torchrun` each rank builds
  only its share (`Transformer.shard_dims()` says which tensors are split and along which dim), `from_pretrained`
  reads only that share from the checkpoint, and the logits are the full (B, T, V) on every rank.

References: DeepSeek-V3 (arXiv 2412.19437), Kimi K2 (arXiv 2507.20534), Kimi-K2-Instruct config.json (SPEC §1).
Shapes: B batch, T tokens, D hidden, V vocab, L layers, E routed experts, K experts per token.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import parallel
from attention import MLA, KVCache, RMSNorm, apply_rope, rope_cos_sin, rope_parameters  # noqa: F401 (re-exported)
from moe import MLP, Experts, MoE, pick_expert_impl


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    """Kimi K2's configuration. Defaults are the Kimi-K2-Instruct `config.json` (HF, July 2025; SPEC §1.1)."""
    # --- trunk
    vocab_size: int = 163840  # 163,584 BPE ranks + 256 special/reserved ids (SPEC §5)
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 1  # layer 0 is a dense SwiGLU MLP; layers 1..60 are MoE (DeepSeek-V3: 3)
    moe_layer_freq: int = 1  # layer l is MoE iff l >= first_k_dense_replace and l % moe_layer_freq == 0
    intermediate_size: int = 18432  # dense MLP width
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False  # untied lm_head
    # --- MLA attention
    num_attention_heads: int = 64  # DeepSeek-V3 has 128; K2 halved them for long-context inference cost (report §2.1)
    q_lora_rank: int | None = 1536  # None = plain q_proj (Moonlight)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_position_embeddings: int = 131072  # 128K context
    rope_theta: float = 50000.0
    rope_scaling: dict | None = field(default_factory=lambda: {  # YaRN to 128K from a 4K pretraining context
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
    aux_loss_alpha: float = 0.001  # config value; the reference's optional sequence loss uses 1e-4 (SPEC §3.2)
    seq_aux: bool = True
    # --- bookkeeping kept for a faithful round trip of config.json
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 163584  # [BOS]
    eos_token_id: int | list | None = 163585  # [EOS]
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 0  # MTP modules in the checkpoint (DeepSeek-V3: 1, ignored on load)
    model_type: str = "kimi_k2"
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None

    def __post_init__(self):
        def bad(name: str, rule: str, fix: str):
            raise ValueError(f"config: {name}={getattr(self, name)!r} {rule}; {fix}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
                     "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "max_position_embeddings",
                     "n_group", "topk_group", "moe_layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, "must be a positive integer", "fix the value")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            bad("q_lora_rank", "must be a positive integer or null", "use null for a plain q_proj")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs of dimensions)", "use an even number")
        # first_k_dense_replace >= num_hidden_layers: every layer dense (HF: layer l is MoE iff l >= it)
        if not isinstance(self.first_k_dense_replace, int) or self.first_k_dense_replace < 0:
            bad("first_k_dense_replace", "must be an integer >= 0", "fix the value")
        if self.n_shared_experts is None:  # DeepSeek's remote modeling_deepseek.py: null = no shared expert
            self.n_shared_experts = 0
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            bad("n_shared_experts", "must be an integer >= 0 (or null: none)", "fix the value")
        # routing settings matter only if some layer is MoE (an all-dense model builds no router, as in HF)
        if any(self.is_moe_layer(layer) for layer in range(self.num_hidden_layers)):
            E, G = self.n_routed_experts, self.n_group
            if not self.num_experts_per_tok <= E:
                bad("num_experts_per_tok", f"must be <= n_routed_experts={E}", "lower it or add experts")
            if E % G:
                bad("n_group", f"must divide n_routed_experts={E}", "use a divisor, or 1")
            if not self.topk_group <= G:
                bad("topk_group", f"must be <= n_group={G}", "lower it")
            if G > 1 and E // G < 2:
                bad("n_group", "leaves fewer than 2 experts per group (a group's score is its 2 best experts)",
                    "lower it")
            if self.num_experts_per_tok > self.topk_group * (E // G):
                bad("num_experts_per_tok", f"exceeds the experts in the kept groups ({self.topk_group} x {E // G})",
                    "raise topk_group or lower top-k")
        for name, allowed in (("hidden_act", "silu"), ("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if getattr(self, name) != allowed:
                bad(name, f"is not supported (this reference implements {allowed!r} only)", f"use {allowed!r}")
        for name in ("tie_word_embeddings", "attention_bias"):
            if getattr(self, name):
                bad(name, "is not supported (Kimi K2 / DeepSeek-V3 have none)", "set it to false")
        if self.attention_dropout:
            bad("attention_dropout", "is not supported", "set it to 0.0")
        rs = self.rope_scaling
        if rs is not None and rs.get("rope_theta") is not None:  # HF: a theta inside the RoPE dict wins
            self.rope_theta = rs["rope_theta"]
        if rs is not None and rs.get("type", rs.get("rope_type")) == "default":  # HF's name for plain RoPE
            self.rope_scaling = rs = None
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            if kind != "yarn":
                bad("rope_scaling", "must be null or YaRN ({'type': 'yarn', ...})", "use YaRN or remove it")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in rs:
                    bad("rope_scaling", f"lacks {key!r}", f"add {key!r} (K2: factor 32, original 4096)")
        qc = self.quantization_config
        if qc is not None:  # what from_pretrained can read: DeepSeek-V3 / K2's block-scaled FP8 (SPEC §7.2)
            if qc.get("quant_method") != "fp8":
                bad("quantization_config", f"has quant_method={qc.get('quant_method')!r}, which this reference cannot "
                    "dequantize (supported: 'fp8' with per-block weight_scale_inv, as DeepSeek-V3 / Kimi K2)",
                    "dequantize the checkpoint to bf16 first, or remove the key if its weights are not quantized")
            if not self.fp8_block_size():
                bad("quantization_config", f"has weight_block_size={qc.get('weight_block_size')!r}; supported: two "
                    "positive integers (K2: [128, 128])", "fix the value")

    def fp8_block_size(self) -> tuple[int, int] | None:
        """(rows, columns) of one FP8 scale block: quantization_config's weight_block_size, default 128 x 128 (the
        DeepSeek-V3 / K2 value, also used for FP8 tensors in a checkpoint without a quantization_config)."""
        block = (self.quantization_config or {}).get("weight_block_size", [128, 128])
        ok = isinstance(block, (list, tuple)) and len(block) == 2 and all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        return tuple(block) if ok else None

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    # keys a real or HF-written config.json carries that do not change the network (or are derived from fields)
    IGNORED_KEYS = frozenset({
        "architectures", "auto_map", "transformers_version", "dtype", "use_cache", "pretraining_tp", "ep_size",
        "num_key_value_heads", "output_router_logits", "rope_interleave", "head_dim", "qk_head_dim",
        "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
        "is_encoder_decoder", "tie_encoder_decoder", "problem_type", "id2label", "label2id"})

    # transformers' DeepseekV3Config defaults, for keys a config.json may omit
    HF_DEFAULTS = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                       num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
                       routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                       v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                       first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
                       rope_theta=10000.0, rope_scaling=None, bos_token_id=0, eos_token_id=1, model_type="deepseek_v3")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        """Build from a config.json dict (Kimi K2, DeepSeek-V3, Moonlight, or one written by transformers v5).
        Unknown keys are an error that names them."""
        d = dict(d)
        if "rope_parameters" in d:  # transformers v5 writes RoPE settings here (rope_theta inside)
            rp = dict(d.pop("rope_parameters") or {})
            if "rope_theta" in rp:
                d["rope_theta"] = rp.pop("rope_theta")
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            d["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
        if "num_mtp_layers" in d:  # transformers v5 alias
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        if d.get("rope_interleave") is False:
            raise ValueError("config: rope_interleave=false is not supported; the released weights use interleaved "
                             "RoPE pairs (SPEC §2.5)")
        if d.get("qk_head_dim") not in (None, d.get("qk_nope_head_dim", 128) + d.get("qk_rope_head_dim", 64)):
            raise ValueError(f"config: qk_head_dim={d['qk_head_dim']} != qk_nope_head_dim + qk_rope_head_dim")
        names = {f.name for f in dataclasses.fields(cls)}
        # a key the file leaves out means what transformers would assume, not K2's value (Moonlight has no
        # rope_scaling key: plain RoPE, not K2's YaRN)
        d = {**{k: v for k, v in cls.HF_DEFAULTS.items() if k not in d}, **d}
        # "_"-prefixed keys are transformers' own bookkeeping (`_attn_implementation_autoset`, which 4.48-era
        # save_pretrained wrote into config.json files, `_name_or_path`, `_commit_hash`): never the network
        unknown = sorted(k for k in d if k not in names and k not in cls.IGNORED_KEYS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; remove them or check their spelling "
                             f"(known keys: the fields of model.ModelArgs)")
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
            raise FileNotFoundError(f"no config.json at {path}; pass a checkpoint directory or a config.json path")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not a JSON config ({err}); give a Hugging Face config.json") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} holds a JSON {type(d).__name__}, not a config object; give a config.json")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The HF config.json form (legacy rope_scaling + rope_theta, which transformers v4 and v5 both read)."""
        d = {"architectures": ["DeepseekV3ForCausalLM"], **dataclasses.asdict(self)}
        d["num_key_value_heads"] = self.num_attention_heads  # nominal under MLA; transformers' default 128 breaks eager
        # transformers has no "kimi_k2" model type (the real K2 repo ships remote code for it); writing the
        # architecture's own type lets DeepseekV3ForCausalLM load our checkpoints and fuse the per-expert tensors
        d["model_type"] = "deepseek_v3"
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return d


# Small presets keep K2's structure (one dense layer first, one shared expert, sigmoid routing with scaling 2.827,
# YaRN factor 32 with beta 1/1, theta 50000, nope/rope/value = 2:1:2) at sizes that fit their purpose.
_SMALL = dict(rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64, "beta_fast": 1.0,
                            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}, bos_token_id=None,
              eos_token_id=None, torch_dtype="float32")


def _small(**overrides) -> ModelArgs:
    return ModelArgs(**{**_SMALL, **overrides})

PRESETS: dict[str, Callable[[], ModelArgs]] = {
    # the real 1T model: the shapes for loading the official weights (about 2 TB in bf16)
    "kimi-k2": lambda: ModelArgs(),
    # DeepSeek-V3 (671B), config.json / inference/configs/config_671B.json (SPEC §1.1): group-limited routing
    "deepseek-v3": lambda: ModelArgs(
        vocab_size=129280, num_attention_heads=128, first_k_dense_replace=3, max_position_embeddings=163840,
        rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        n_routed_experts=256, routed_scaling_factor=2.5, n_group=8, topk_group=4, bos_token_id=0, eos_token_id=1,
        num_nextn_predict_layers=1, model_type="deepseek_v3"),
    # Moonlight-16B-A3B-Instruct (SPEC §1.1): plain q_proj, 2 shared experts, no YaRN, rms_norm_eps 1e-5
    "moonlight-16b-a3b": lambda: ModelArgs(
        hidden_size=2048, num_hidden_layers=27, intermediate_size=11264, num_attention_heads=16, q_lora_rank=None,
        max_position_embeddings=8192, rope_scaling=None, n_routed_experts=64, num_experts_per_tok=6,
        n_shared_experts=2, moe_intermediate_size=1408, routed_scaling_factor=2.446, rms_norm_eps=1e-5,
        eos_token_id=163586, model_type="deepseek_v3"),
    # one GPU (about 2.3B total / 0.83B active, 4.6 GB in bf16): exercises the CUDA expert kernel; random init, no
    # released weights. K2's head dims and vocab; 64 experts top-8.
    "gpu-small": lambda: _small(rope_scaling=dict(_SMALL["rope_scaling"], original_max_position_embeddings=4096),
                                 vocab_size=163840, hidden_size=1536, num_hidden_layers=12, intermediate_size=4608,
                                 num_attention_heads=12, q_lora_rank=512, kv_lora_rank=256,
                                 max_position_embeddings=131072, n_routed_experts=64, num_experts_per_tok=8,
                                 moe_intermediate_size=512, torch_dtype="bfloat16"),
    # laptop CPU (about 5M parameters): the shipped demo model is trained from this in minutes; vocab fits the
    # shipped 4,096-rank tokenizer (+256 specials)
    "cpu-small": lambda: _small(vocab_size=4352, hidden_size=192, num_hidden_layers=4,
                                 intermediate_size=512, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64,
                                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=4096,
                                 n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=96),
    # tests only: 2 layers (1 dense + 1 MoE), 8 experts top-2; the whole CPU suite in seconds
    "tiny": lambda: _small(vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                            num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                            qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=2048, n_routed_experts=8,
                            num_experts_per_tok=2, moe_intermediate_size=32),
}


def world_size_problems(args: ModelArgs, world_size: int) -> list[str]:
    """Why `world_size` ranks cannot split this config evenly (empty list: they can). See parallel.py for the split."""
    split = {"num_attention_heads": args.num_attention_heads, "n_routed_experts": args.n_routed_experts,
             "vocab_size": args.vocab_size, "intermediate_size": args.intermediate_size,
             "moe_intermediate_size * n_shared_experts": args.moe_intermediate_size * args.n_shared_experts}
    return [f"{name}={n}" for name, n in split.items() if n % world_size]


def valid_world_sizes(args: ModelArgs, up_to: int = 1024) -> list[int]:
    return [w for w in range(1, up_to + 1) if not world_size_problems(args, w)]


def load_args(name_or_path: str) -> ModelArgs:
    """A preset name, a config.json path, or a checkpoint directory."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if os.path.exists(name_or_path):
        return ModelArgs.from_json(name_or_path)
    raise ValueError(f"unknown config {name_or_path!r}: use a preset ({', '.join(PRESETS)}) or a config.json path")


# ----------------------------------------------------------------------------------------------------------------
# The network


class ParallelEmbedding(nn.Module):
    """Token embedding whose vocabulary rows are split across ranks (DeepSeek-V3 inference/model.py). ids (B, T) ->
    (B, T, D). Each rank looks up the ids it owns, writes zeros for the others, and an all-reduce fills them in."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.num_rows, self.first_row = parallel.split(vocab_size, "vocab_size")  # this rank's vocabulary rows
        self.weight = nn.Parameter(torch.empty(self.num_rows, dim))  # (V/W, D)
        nn.init.normal_(self.weight)  # as nn.Embedding does, so a seed gives the same random model as before

    def forward(self, ids: Tensor) -> Tensor:
        if parallel.world_size() == 1:
            return F.embedding(ids, self.weight)  # (B, T, D), what nn.Embedding does
        mine = (ids >= self.first_row) & (ids < self.first_row + self.num_rows)  # (B, T) ids this rank owns
        h = F.embedding(torch.where(mine, ids - self.first_row, 0), self.weight)  # (B, T, D)
        return parallel.reduce_from_ranks(h.masked_fill(~mine[..., None], 0.0))  # each id's row from its owner


class Block(nn.Module):
    """Pre-norm residual block: x + MLA(norm(x)), then x + FFN(norm(x)); FFN is a dense MLP or the MoE."""

    def __init__(self, layer: int, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MoE(args) if args.is_moe_layer(layer) else MLP(args.hidden_size, args.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int, attn_impl: str) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, attn_impl)  # (B, T, D)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, D)


class Transformer(nn.Module):
    """Kimi K2 / DeepSeek-V3 decoder. State-dict names are the HF checkpoint's (`model.layers.3.self_attn.q_a_proj.weight`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        problems = world_size_problems(args, parallel.world_size())
        if problems:  # one message naming every field, before any module raises about just one of them
            raise ValueError(f"world size {parallel.world_size()} does not divide {', '.join(problems)}; world sizes "
                             f"that work for this config: {valid_world_sizes(args, 64)}")
        self.model = nn.ModuleDict(dict(
            embed_tokens=ParallelEmbedding(args.vocab_size, args.hidden_size),
            layers=nn.ModuleList(Block(i, args) for i in range(args.num_hidden_layers)),
            norm=RMSNorm(args.hidden_size, args.rms_norm_eps),
        ))
        # untied from embed_tokens; under TP each rank holds V/W rows and the logits are all-gathered in forward
        self.lm_head = nn.Linear(args.hidden_size, parallel.split(args.vocab_size, "vocab_size")[0], bias=False)
        inv_freq, self.rope_mult = rope_parameters(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (Dr/2,) recomputed, never loaded
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as HF DeepseekV3: N(0, initializer_range) for every matrix, norms 1, routing bias 0.

        Under parallelism every rank draws each FULL matrix from the same stream and keeps its slice (seed every rank
        alike), so replicated tensors agree across ranks and split ones are slices of one N(0, std) draw. It is not
        the one-device model of the same seed (module constructors draw from the stream for their own, smaller
        shapes first); to start W ranks from a one-device model, save it and load it with from_pretrained.
        """
        std = self.args.initializer_range
        dims = self.shard_dims()
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            full_shape = list(p.shape)
            if name in dims:
                full_shape[dims[name]] *= parallel.world_size()
            full = torch.empty(full_shape, device=p.device, dtype=p.dtype).normal_(0.0, std)
            p.copy_(parallel.local_slice(full, dims.get(name)))
        self.reset_buffers()

    def shard_dims(self) -> dict[str, int]:
        """State-dict names of the tensors split across ranks -> the dim they are split along; every other tensor is
        replicated (the same on every rank). Expert stacks are split along dim 0, the expert dim. Read by loading,
        saving, the memory plan, and optimizers that need whole matrices (Muon: parallel.gather_full)."""
        dims = {"model.embed_tokens.weight": 0, "lm_head.weight": 0}
        names = set(self.state_dict())
        for prefix, m in self.named_modules():
            for local, dim in getattr(m, "SHARD_DIMS", {}).items():
                if f"{prefix}.{local}" in names:
                    dims[f"{prefix}.{local}"] = dim
        return dims

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the RoPE frequencies: angles reach 128K·inv_freq radians, and a
        # bf16 inv_freq (8 mantissa bits) would misplace every position beyond a few hundred. Recomputed in fp32.
        super()._apply(fn, recurse)
        self.inv_freq.data = rope_parameters(self.args)[0].to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the buffers that are never stored in a checkpoint (RoPE frequencies, training statistics)."""
        self.inv_freq.copy_(rope_parameters(self.args)[0])
        for m in self.modules():
            if isinstance(m, MLA):
                m.max_logits.fill_(float("-inf"))
            elif isinstance(m, MoE):
                m.expert_load.zero_()

    def set_expert_impl(self, impl: str) -> str:
        """Choose the routed-expert path for every MoE layer ("auto" | "reference" | "grouped" | "cuda"); returns why."""
        p = self.lm_head.weight
        impl, why = pick_expert_impl(impl, p.device, p.dtype)
        for m in self.modules():
            if isinstance(m, MoE):
                m.impl = impl
        return f"{impl} ({why})"

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, attn_impl: str | None = None,
                last_only: bool = False) -> Tensor:
        """input_ids (B, T) int -> logits (B, T, V) fp32 (or (B, 1, V) with last_only).

        Without a cache the T tokens sit at positions 0..T-1. With a cache they continue it at cache.pos.., their
        latents are appended and cache.pos advances by T. attn_impl: "naive" | "absorb"; default absorbed for
        single-token decode against a cache (reads only the latent), naive otherwise (cheaper for many queries).
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be a (batch, seq) integer tensor, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids is empty: pass at least one token")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.args.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={self.args.vocab_size}), got [{lo}, {hi}]; "
                             "is the tokenizer the one this model was trained with?")
        start = 0 if cache is None else cache.pos
        if start + T > self.args.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_position_embeddings="
                             f"{self.args.max_position_embeddings}; shorten the input")
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds batch {cache.batch_size}, input has batch {B}")
            if start + T > cache.max_len:
                raise ValueError(f"cache is full: {start} cached + {T} new > max_len {cache.max_len}; "
                                 "allocate a longer KVCache")
        if attn_impl is None:
            attn_impl = "absorb" if cache is not None and T == 1 else "naive"
        positions = torch.arange(start, start + T, device=input_ids.device)  # absolute positions
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_mult)  # (T, Dr/2) fp32
        h = self.model.embed_tokens(input_ids)  # (B, T, D), no sqrt(D) scaling
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, cache, i, attn_impl)
        if cache is not None:
            cache.pos += T
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(parallel.copy_to_ranks(self.model.norm(h)))  # (B, T, V/W) this rank's vocabulary
        return parallel.gather_from_ranks(logits, dim=-1).float()  # (B, T, V) fp32, on every rank: loss, sampling

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty latent cache on this model's device and dtype (default length: the whole context)."""
        p = self.lm_head.weight
        return KVCache(self.args, batch_size, max_len or self.args.max_position_embeddings, p.device, p.dtype)

    # ------------------------------------------------------------------------------------------------------------
    # Hugging Face checkpoint I/O

    def checkpoint_names(self) -> dict[str, tuple[str, int | None]]:
        """Map every checkpoint tensor name of the FULL model to (our state-dict name, expert index or None).

        Expert indices are global (0..E-1); under expert parallelism this rank's stack holds rows for experts
        `first_expert` onward only (moe.Experts), and `_owned_row` maps a global index to one of them.
        """
        names = {}
        for name in self.state_dict():
            if ".mlp.experts." in name:  # stacked here, one tensor per expert on disk
                prefix, proj = name.rsplit(".", 1)
                for e in range(self.args.n_routed_experts):
                    names[f"{prefix}.{e}.{proj}.weight"] = (name, e)
            else:
                names[name] = (name, None)
        return names

    def _owned_row(self, name: str, e: int) -> int | None:
        """Row of expert e in this rank's stack `name`, or None if another rank owns expert e."""
        stack: Experts = self.get_submodule(name.rsplit(".", 1)[0])
        row = e - stack.first_expert
        return row if 0 <= row < stack.num_experts else None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "Transformer":
        """Load a HF-format directory: config.json + model.safetensors, or shards with model.safetensors.index.json.

        Tensors are read one at a time (never the whole file), FP8 weights (e4m3; e5m2 too) are dequantized with
        their block `weight_scale_inv` (128x128, or quantization_config's weight_block_size), `*.rotary_emb.inv_freq`
        and MTP layers (index >= num_hidden_layers) are ignored.
        Any missing, unexpected or mis-shaped tensor is an error that names all of them. dtype: default = the
        checkpoint's embedding dtype.

        Under parallelism (parallel.init, e.g. from torchrun) each rank allocates only its share and reads only that
        from disk: its own experts' tensors and its rows/columns of the split matrices (safetensors slices; an FP8
        slice is dequantized with the scale blocks it overlaps). `model.load_report` holds the bytes this rank read.
        If loading fails on any rank, every rank raises (parallel.check_all_ok) instead of waiting for the others.
        """
        from safetensors import SafetensorError

        model, err = None, None
        try:
            model = cls._load(Path(path), device, dtype)
        except SafetensorError as e:  # the reader's own words ("incomplete metadata, file not fully covered")
            err = ValueError(f"cannot read the checkpoint {path}: {e}; a *.safetensors file is damaged or "
                             "incomplete (a copy cut short?)")
        except Exception as e:  # handed to check_all_ok, which re-raises it (on every rank, if any failed)
            err = e
        parallel.check_all_ok(err, f"loading {path}")
        return model

    @classmethod
    def _load(cls, path: Path, device: str | torch.device, dtype: torch.dtype | None) -> "Transformer":
        from safetensors import safe_open

        files = _checkpoint_files(path)
        args = ModelArgs.from_json(path)
        with torch.device("meta"):
            model = cls(args)  # this rank's shapes, no memory yet
        expected = model.checkpoint_names()
        located: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    located[key] = f
        if dtype is None:
            with safe_open(str(located.get("model.embed_tokens.weight", files[0])), framework="pt") as sf:
                dtype = sf.get_slice("model.embed_tokens.weight").get_dtype() if "model.embed_tokens.weight" in \
                    sf.keys() else "F32"
            dtype = _SAFETENSORS_DTYPES.get(dtype, torch.float32)
        problems = []
        sizes = {name: t.numel() for name, t in model.state_dict().items()}
        # a zero-width tensor (n_shared_experts 0 or null) holds nothing: a checkpoint may leave it out
        missing = sorted(k for k, (name, _) in expected.items() if k not in located and sizes[name])
        unexpected = sorted(k for k in located if k not in expected and not _ignorable(k, located, args))
        if missing:
            problems.append(f"missing tensors: {missing}")
        if unexpected:
            problems.append(f"unexpected tensors: {unexpected}")
        if (missing or unexpected) and args.moe_layer_freq != 1:
            problems.append(f"note: moe_layer_freq={args.moe_layer_freq} makes layer l MoE only if l % "
                            f"{args.moe_layer_freq} == 0 (DeepSeek's modeling_deepseek.py); transformers' DeepseekV3 "
                            "ignores the key and writes experts in every layer >= first_k_dense_replace")
        block = args.fp8_block_size()  # (rows, columns) per FP8 scale
        model = model.to(dtype).to_empty(device=device)  # allocate this rank's share once, in the final dtype
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
                        row = model._owned_row(name, e)
                        if row is None:
                            continue
                        target, dim = target[row], None
                    full_shape = list(target.shape)
                    if dim is not None:
                        full_shape[dim] *= world
                    on_disk = list(sf.get_slice(key).get_shape())
                    if on_disk != full_shape:
                        shape_errors.append(f"{key}: checkpoint {tuple(on_disk)} vs model {tuple(full_shape)}")
                        continue
                    t, start = _read_share(sf, key, dim)  # this rank's rows/columns from `start` (or all of it)
                    bytes_read += t.nbytes
                    if not t.dtype.is_floating_point:  # int8/uint8/packed-int weights need a quantizer we lack
                        problems.append(f"{key} is stored as {t.dtype}; only float weights and block-scaled FP8 "
                                        "can be loaded (see quantization_config)")
                        continue
                    if t.dtype.itemsize == 1:  # FP8, e4m3 (K2, DeepSeek-V3) or e5m2: always with its block scales
                        scale_key = key + "_scale_inv"
                        if scale_key not in located:
                            problems.append(f"{key} is FP8 but {scale_key} is missing")
                            continue
                        with safe_open(str(located[scale_key]), framework="pt") as sf2:
                            scale = sf2.get_tensor(scale_key)  # small: one number per block
                        bytes_read += scale.nbytes
                        blocks = [math.ceil(n / b) for n, b in zip(on_disk, block)]
                        if list(scale.shape) != blocks:
                            problems.append(f"{scale_key}: shape {tuple(scale.shape)}, expected {tuple(blocks)} "
                                            f"(one scale per {block[0]}x{block[1]} block of {tuple(on_disk)}; "
                                            "quantization_config.weight_block_size sets the block)")
                            continue
                        offset = (start, 0) if dim == 0 else (0, start)
                        t = dequantize_fp8(t.to(device), scale.to(device), block, offset)  # dequantize on device
                    with torch.no_grad():
                        target.copy_(t)
        if shape_errors:
            problems.append("shape mismatches: " + "; ".join(shape_errors))
        if problems:
            raise ValueError(f"cannot load {path}: " + " | ".join(problems))
        model.reset_buffers()
        for m in model.modules():  # the routing bias stays fp32 whatever the model dtype (see moe.Gate._apply)
            if isinstance(m, MoE):
                m.gate.e_score_correction_bias.data = m.gate.e_score_correction_bias.data.float()
        model.load_report = dict(bytes_read=bytes_read, checkpoint_bytes=sum(f.stat().st_size for f in files))
        return model

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 2 << 30,
                        extra: Callable[[Path], None] | None = None) -> None:
        """Write config.json + safetensors (sharded with an index above max_shard_bytes), atomically.

        Everything is written into a temporary sibling directory first (`extra(tmp_dir)` may add files, e.g. the
        optimizer state), then swapped in with renames, so an interrupted save never leaves a half-written
        checkpoint at `path`. Files already in `path` that this call does not write (a tokenizer) are carried over.
        Under parallelism every rank calls it: the split tensors are gathered (one at a time, but rank 0 then holds
        the whole model in CPU memory: fine for small models, not for K2) and rank 0 writes the usual HF layout.
        """
        dims, rank0 = self.shard_dims(), parallel.rank() == 0
        full = {}
        for name, t in self.state_dict().items():  # every rank joins each gather; rank 0 keeps the result
            t = parallel.gather_full(t.detach(), dims.get(name))
            if rank0:
                full[name] = t.to("cpu")
        err = None
        if rank0:
            try:
                self._write_hf(Path(path), full, max_shard_bytes, extra)
            except Exception as e:  # re-raised by check_all_ok, on every rank
                err = e
        parallel.check_all_ok(err, f"saving {path}")  # also a barrier: no rank returns before the files exist

    def _write_hf(self, path: Path, state: dict[str, Tensor], max_shard_bytes: int,
                  extra: Callable[[Path], None] | None) -> None:
        def write(tmp: Path) -> None:
            tmp.mkdir()
            self._write_files(tmp, path, state, max_shard_bytes, extra)
        write_atomically(path, write)

    def _write_files(self, tmp: Path, path: Path, state: dict[str, Tensor], max_shard_bytes: int,
                     extra: Callable[[Path], None] | None) -> None:
        """Everything a checkpoint holds, into `tmp`; files of `path` that we do not write are copied over."""
        from safetensors.torch import save_file

        tensors = {}
        for key, (name, e) in self.checkpoint_names().items():
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
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        cfg = self.args.to_dict()
        cfg["torch_dtype"] = str(self.lm_head.weight.dtype).removeprefix("torch.")
        cfg.pop("quantization_config", None)  # the weights written here are never quantized (FP8 was dequantized)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in tmp.glob("*.safetensors"):
            os.chmod(f, 0o644)  # safetensors writes 0600; a checkpoint is meant to be shared
        if extra is not None:
            extra(tmp)
        if path.exists():
            for f in path.iterdir():  # carry over files we do not own (tokenizer, README, ...)
                if not (tmp / f.name).exists() and not _is_weight_file(f.name):
                    if f.is_dir():
                        shutil.copytree(f, tmp / f.name)
                    else:
                        shutil.copy2(f, tmp / f.name)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name in ("model.safetensors.index.json", "config.json")


def _checkpoint_files(path: Path) -> list[Path]:
    if not path.is_dir():
        left = sorted(p.name for kind in ("tmp", "old") for p in path.parent.glob(f".{path.name}.{kind}-*"))
        hint = (f"; a save was interrupted and left {', '.join(left)} beside it: train.py --resume (or "
                "model.recover_interrupted_save) puts the newest complete version back") if left else ""
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
    """Checkpoint tensors that are legitimately not loaded (SPEC §7.3)."""
    if key.endswith("rotary_emb.inv_freq") or key.endswith(".weight_scale_inv"):
        return True
    parts = key.split(".")
    if parts[:2] == ["model", "layers"] and int(parts[2]) >= args.num_hidden_layers:
        return args.num_nextn_predict_layers > 0  # DeepSeek-V3's MTP module (model.layers.61.*)
    return False


def _read_share(sf, key: str, dim: int | None) -> tuple[Tensor, int]:
    """This rank's share of one checkpoint tensor, as stored (FP8 stays FP8): the whole tensor if dim is None, else
    its rows (dim 0) or columns (dim 1) for this rank. Returns (tensor, index of its first row/column). A safetensors
    slice reads only those bytes from the memory-mapped file."""
    if dim is None:
        return sf.get_tensor(key), 0
    sl = sf.get_slice(key)
    n, start = parallel.split(sl.get_shape()[dim], key)
    return (sl[start:start + n] if dim == 0 else sl[:, start:start + n]), start


def dequantize_fp8(w: Tensor, scale_inv: Tensor, block: int | tuple[int, int] = 128,
                   offset: tuple[int, int] = (0, 0)) -> Tensor:
    """W = float(W_fp8) · scale_inv[i // 128, j // 128] (DeepSeek `weight_dequant`, SPEC §7.2). -> fp32 (out, in).

    block: the (rows, columns) of one scale block, 128 x 128 for K2 / DeepSeek-V3 (quantization_config's
    weight_block_size). w may be a slice of the full matrix whose first element is at (row, column) `offset` (a
    rank's share under tensor parallelism); scale_inv is always the FULL matrix's (ceil(rows/br), ceil(cols/bc))
    block scales. A slice need not start on a block boundary: it takes the scales of the blocks it overlaps.
    """
    br, bc = (block, block) if isinstance(block, int) else block
    out, inp = w.shape
    r0, c0 = offset
    rows, cols = slice(r0 // br, (r0 + out - 1) // br + 1), slice(c0 // bc, (c0 + inp - 1) // bc + 1)
    s = scale_inv.float()[rows, cols]  # the scales of the blocks this slice overlaps
    s = s.repeat_interleave(br, 0).repeat_interleave(bc, 1)  # one scale per element of those blocks
    s = s[r0 % br:r0 % br + out, c0 % bc:c0 % bc + inp]  # (out, in)
    return w.float() * s


# ----------------------------------------------------------------------------------------------------------------
# Crash-safe writes (checkpoints, train.py's token cache): write -> fsync -> rename -> clean up


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Replace `path` (a file, or a folder that write() creates) so that after a kill -9 or a power loss at any
    instant it is the previous version or the complete new one, never a mix, and nothing is left behind for good:
      1. recover_interrupted_save(path): finish (or undo) a save that a kill interrupted, remove what it left;
      2. write(tmp) into the sibling `.NAME.tmp-PID`, then fsync every file in it and the folder itself: the data is
         on the disk before any name points at it (without that a power loss after the rename can leave `path`
         naming empty files: ext4 and XFS allocate data blocks late);
      3. a file is renamed over `path` (atomic). A folder cannot be renamed over a non-empty one, so `path` is first
         renamed to `.NAME.old-PID`, then tmp to `path`, the parent folder fsynced after each rename (the renames
         themselves reach the disk in that order), and the old copy deleted last.
    A write that fails (a full disk, a folder not writable) removes tmp and raises one OSError that names `path`
    and says the previous version is intact; any other exception (Ctrl-C, a bug) also removes tmp and goes through."""
    from safetensors import SafetensorError

    recover_interrupted_save(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync_tree(tmp)
    except (OSError, RuntimeError, SafetensorError) as err:  # torch.save reports a full disk as a RuntimeError
        message = _write_failure(path, err)  # before tmp is removed: the free space at the moment of failure
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
    """Bring `path` back to a complete version after write_atomically was killed, and delete what the kill left.
    Returns the leftover folder that became `path` (None if `path` needed nothing). The states a kill leaves, by the
    step of write_atomically it interrupted (P: the killed process's id, which its leftovers carry in their names):
        on disk                    interrupted                        newest complete version -> action
        NAME                       nothing                            NAME
        NAME + .tmp-P              2, or 3 before the first rename    NAME; delete tmp-P (maybe partial)
        .tmp-P alone               2: writing the first version       none; delete tmp-P
        .old-P + .tmp-P, no NAME   3: between the two renames         tmp-P: fsynced before the first rename, so
                                                                      complete and newer -> NAME; delete old-P
        NAME + .old-P              3: deleting old-P (the last step)  NAME; delete old-P (maybe partial)
        .old-* without its .tmp-*  never left by a kill (moved by     the one whose config.json is newest -> NAME
        and no NAME                hand)
    A kill during this recovery (step 1) leaves one of these states again. Only a .tmp-P beside its own .old-P is
    known to be complete: the number is a process id, not a step, and says nothing about which leftover is newer
    (sorting them as text once restored a copy 20 steps old). A leftover is deleted only when its process is gone (or
    is this one): a live process may be writing it. Restoring needs no such check: a live save is between its
    renames for an instant only, and if two processes rename the same tmp-P the second rename fails and that save
    reports it."""
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
            restored = max(complete, key=lambda p: (p / "config.json").stat().st_mtime_ns, default=None)
        if restored is not None:
            os.rename(restored, path)
            _fsync(parent)
    for kind in left.values():
        for pid, p in kind.items():
            if p != restored and not _pid_alive(pid):
                _remove(p)
    return restored


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (this process counts as gone: it is not saving while it cleans up)."""
    if pid == os.getpid():
        return False
    if os.name == "nt":  # os.kill(pid, 0) would end the process there; never delete another process's files
        return True
    try:
        os.kill(pid, 0)  # signal 0: only the existence check
    except (ProcessLookupError, OverflowError):  # no such process; a number too large to be a process id
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk. Windows flushes only files opened for writing, and
    no folders."""
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
    """One line for a failed write: what failed, whether the disk is full, and that the previous version is kept."""
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


# ----------------------------------------------------------------------------------------------------------------
# Parameter and cache accounting (python model.py --config kimi-k2)


def param_report(args: ModelArgs) -> dict[str, int]:
    """Count parameters by kind on the meta device (no memory). Includes the routing-bias buffers (SPEC §1.3)."""
    with torch.device("meta"):
        model = Transformer(args)
    kinds = dict(embedding=0, attention=0, norms=0, dense_mlp=0, router=0, routed_experts=0, shared_experts=0, head=0)
    for name, t in model.state_dict().items():
        n = t.numel()
        if name.startswith("model.embed_tokens"):
            kinds["embedding"] += n
        elif name.startswith("lm_head"):
            kinds["head"] += n
        elif ".self_attn." in name:
            kinds["attention"] += n  # includes the two latent norms
        elif ".mlp.experts." in name:
            kinds["routed_experts"] += n
        elif ".mlp.shared_experts." in name:
            kinds["shared_experts"] += n
        elif ".mlp.gate." in name:
            kinds["router"] += n
        elif ".mlp." in name:
            kinds["dense_mlp"] += n
        else:
            kinds["norms"] += n  # input/post-attention norms and the final norm
    total = sum(kinds.values())
    # a token uses K of the E routed experts in each MoE layer; everything else is always active
    active_experts = kinds["routed_experts"] * args.num_experts_per_tok // args.n_routed_experts
    return dict(kinds, total=total, active=total - kinds["routed_experts"] + active_experts,
                active_routed_experts=active_experts)


def kv_cache_bytes_per_token(args: ModelArgs, bytes_per_value: int = 2) -> tuple[int, int]:
    """(MLA latent cache, equivalent multi-head K/V cache) bytes per token over all layers (SPEC §1.4)."""
    mla = (args.kv_lora_rank + args.qk_rope_head_dim) * args.num_hidden_layers * bytes_per_value
    mha = (args.num_attention_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim)
           * args.num_hidden_layers * bytes_per_value)
    return mla, mha


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.2f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return ""


# ----------------------------------------------------------------------------------------------------------------
# Memory plan per rank (python model.py --config kimi-k2 --plan --world-size 16)

# H200: "141 GB" (NVIDIA datasheet); nvidia-smi on an H200 reports 143,771 MiB = 140.4 GiB, which is what we count
H200_GIB = 143_771 / 1024
# CUDA context, cuBLAS workspace, NCCL buffers and allocator fragmentation: a rough allowance, UNVERIFIED (measure
# torch.cuda.mem_get_info() after the first forward on the real machine)
RESERVE_GIB = 4.0


def _stored_fp8(name: str) -> bool:
    """Is this tensor FP8 in the released checkpoint? Every projection matrix of attention, MLPs and experts; not the
    router, norms, embedding or lm_head (SPEC §7.1-7.2)."""
    return name.endswith(("_proj.weight", "_proj_with_mqa.weight")) or ".mlp.experts." in name


def memory_plan(args: ModelArgs, world_size: int, batch: int = 1, context: int = 131072,
                prefill_chunk: int = 8192) -> dict[str, float]:
    """Bytes ONE of world_size ranks needs, from the shapes alone (meta device, nothing allocated).

    weights_*: the split tensors (1/W each, `shard_dims`) and the replicated ones, in bf16 (what this reference runs:
    FP8 checkpoints are dequantized at load) and with FP8 kept (1 byte + one fp32 scale per 128x128 block, what
    vLLM/SGLang run). kv_cache: the MLA latent cache in bf16, replicated on every rank (every head reads all of it).
    workspace: an ESTIMATE of the largest activations of one forward over batch x prefill_chunk tokens with
    `context` keys (prefill is the peak; decode needs far less), counted from the tensors the code creates:
      residual stream h, its normed copy, a partial output and its fp32 all-reduce copy: N·D·(2+2+2+4)
      + the larger of: attention (this rank's heads; naive prefill up-projects K/V of all S keys; the T x S scores
        are not counted, a fused SDPA kernel never materializes them), the MoE layer (router scores; this rank's
        M = N·K/W (token, expert) pairs at perfect balance through moe_grouped; the fp32 per-token accumulator),
        the dense MLP
      + the last position's logits (fp32, full vocabulary on every rank).
    """
    problems = world_size_problems(args, world_size)
    if problems:
        raise ValueError(f"world size {world_size} does not divide {', '.join(problems)}; world sizes that work: "
                         f"{valid_world_sizes(args, 64)}")
    with torch.device("meta"):
        model = Transformer(args)  # shard_dims says which tensors W ranks split
    dims, W = model.shard_dims(), world_size
    out = dict(weights_split_bf16=0, weights_replicated_bf16=0, weights_split_fp8=0, weights_replicated_fp8=0)
    for name, t in model.state_dict().items():
        shape = list(t.shape)
        if name in dims:  # this process's shape is already 1/parallel.world_size() of the full one
            shape[dims[name]] = shape[dims[name]] * parallel.world_size() // W
        n = math.prod(shape)
        bf16 = n * (4 if name.endswith("e_score_correction_bias") else 2)  # the routing bias stays fp32 (moe.Gate)
        fp8 = bf16
        if _stored_fp8(name):  # one byte per weight + an fp32 scale per 128x128 block of each matrix
            *stack, rows, cols = shape
            fp8 = n + 4 * math.prod(stack) * math.ceil(rows / 128) * math.ceil(cols / 128)
        where = "split" if name in dims else "replicated"
        out[f"weights_{where}_bf16"] += bf16
        out[f"weights_{where}_fp8"] += fp8
    out["kv_cache"] = batch * context * kv_cache_bytes_per_token(args)[0]
    # activation workspace of one forward (bf16 activations = 2 bytes), see the docstring
    N, S, D, V = batch * prefill_chunk, batch * context, args.hidden_size, args.vocab_size
    Hl = args.num_attention_heads // W
    Dn, Dr, Dv = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    residual = N * D * (2 + 2 + 2 + 4)
    attention = 2 * (N * Hl * (Dn + Dr) + S * Hl * (Dn + Dv) + S * Hl * (Dn + Dr) + N * Hl * Dv)
    E, K, Ie = args.n_routed_experts, args.num_experts_per_tok, args.moe_intermediate_size
    M = N * K // W
    moe = N * E * 4 * 2 + M * D * 2 + M * Ie * 2 * 3 + M * D * (2 + 4 + 4) + N * D * 4
    moe += N * (Ie * args.n_shared_experts // W) * 2 * 3
    dense = N * (args.intermediate_size // W) * 2 * 3
    logits = batch * V * 4 + batch * (V // W) * 2
    out["workspace"] = residual + max(attention, moe, dense) + logits
    for kind in ("bf16", "fp8"):
        out[f"total_{kind}"] = (out[f"weights_split_{kind}"] + out[f"weights_replicated_{kind}"] + out["kv_cache"]
                                + out["workspace"])
    return out


def print_memory_plan(args: ModelArgs, name: str, world_size: int, batch: int, context: int, prefill_chunk: int,
                      gpu_gib: float = H200_GIB, reserve_gib: float = RESERVE_GIB) -> None:
    plan = memory_plan(args, world_size, batch, context, prefill_chunk)
    usable = (gpu_gib - reserve_gib) * 2**30
    W = world_size
    print(f"memory plan: {name} on {W} ranks, per rank (from the shapes; nothing is allocated)")
    print(f"  each rank: {args.num_attention_heads // W} of {args.num_attention_heads} heads, "
          f"{args.n_routed_experts // W} of {args.n_routed_experts} experts, {args.vocab_size // W:,} of "
          f"{args.vocab_size:,} vocabulary rows, 1/{W} of the dense and shared MLP units")
    print(f"  {'':<56}{'bf16':>12}{'FP8 kept':>12}")
    rows = [("weights split across ranks (1/%d each)" % W, "weights_split_bf16", "weights_split_fp8"),
            ("weights replicated (latent path, norms, router)", "weights_replicated_bf16", "weights_replicated_fp8"),
            (f"MLA latent KV cache, {batch} x {context:,} tokens (replicated)", "kv_cache", "kv_cache"),
            (f"activation workspace, {prefill_chunk:,}-token prefill (estimate)", "workspace", "workspace"),
            ("TOTAL", "total_bf16", "total_fp8")]
    for label, a, b in rows:
        print(f"  {label:<56}{plan[a] / 2**30:>8.1f} GiB{plan[b] / 2**30:>8.1f} GiB")
    verdict = {True: "fits", False: "does NOT fit"}
    print(f"  H200: {gpu_gib:.1f} GiB ('141 GB') - {reserve_gib:.1f} GiB reserve = {usable / 2**30:.1f} GiB usable: "
          f"bf16 {verdict[plan['total_bf16'] <= usable]}, FP8 kept {verdict[plan['total_fp8'] <= usable]}")
    print("  bf16 = what this reference runs (the FP8 checkpoint is dequantized to bf16 at load);")
    print("  FP8 kept = what vLLM/SGLang run with FP8 matmul kernels; this reference does not implement it.")
    print(f"world sizes that split {name} evenly; 'seqs' = how many {context:,}-token caches fit beside the weights:")
    print(f"  {'W':>4}{'bf16 / rank':>15}{'seqs':>7}{'FP8 kept / rank':>19}{'seqs':>7}")
    for w in valid_world_sizes(args, 64):
        p = memory_plan(args, w, 1, context, prefill_chunk)
        row = f"  {w:>4}"
        for kind in ("bf16", "fp8"):
            free = usable - (p["total_" + kind] - p["kv_cache"])  # room left for latent caches
            row += f"{p['total_' + kind] / 2**30:>11.1f} GiB{max(int(free // p['kv_cache']), 0):>7}"
        print(row)
    print("  (a rank that fits 0 sequences cannot run at this context; Moonshot's deployment guide names 16 GPUs "
          "as the smallest FP8 unit at 128K, which leaves room to batch)")


def main() -> None:
    p = argparse.ArgumentParser(description="Print a Kimi K2 config's parameter counts and KV-cache sizes, or with "
                                            "--plan the memory per GPU (meta device: no memory is allocated).")
    p.add_argument("--config", default="kimi-k2", help=f"a preset ({', '.join(PRESETS)}) or a config.json path")
    p.add_argument("--context", type=int, default=131072, help="context length for the KV-cache sizes")
    # --- memory plan for tensor + expert parallelism (parallel.py)
    p.add_argument("--plan", action="store_true", help="print the memory one rank needs instead of the counts")
    p.add_argument("--world-size", type=int, default=16, help="ranks (GPUs) the model is split over, for --plan")
    p.add_argument("--batch", type=int, default=1, help="sequences in flight, each with a --context cache (--plan)")
    p.add_argument("--prefill-chunk", type=int, default=8192,
                   help="tokens per prefill forward, as generate.PREFILL_CHUNK (--plan's activation estimate)")
    p.add_argument("--gpu-gib", type=float, default=H200_GIB, help="memory per GPU (default: an H200)")
    a = p.parse_args()
    args = load_args(a.config)
    if a.plan:
        return print_memory_plan(args, a.config, a.world_size, a.batch, a.context, a.prefill_chunk, a.gpu_gib)
    r = param_report(args)
    print(f"config: {a.config}  ({args.num_hidden_layers} layers, hidden {args.hidden_size}, "
          f"{args.num_attention_heads} heads, {args.n_routed_experts} experts top-{args.num_experts_per_tok} "
          f"+ {args.n_shared_experts} shared, vocab {args.vocab_size})")
    print(f"{'parameters':<34}{'total':>20}{'activated per token':>22}")
    rows = [("embedding", r["embedding"], r["embedding"]), ("attention (MLA, incl. latent norms)", r["attention"],
            r["attention"]), ("block + final norms", r["norms"], r["norms"]),
            ("dense MLP", r["dense_mlp"], r["dense_mlp"]), ("router (weight + bias)", r["router"], r["router"]),
            ("routed experts", r["routed_experts"], r["active_routed_experts"]),
            ("shared experts", r["shared_experts"], r["shared_experts"]), ("lm_head", r["head"], r["head"])]
    for name, tot, act in rows:
        print(f"  {name:<32}{tot:>20,}{act:>22,}")
    print(f"  {'TOTAL':<32}{r['total']:>20,}{r['active']:>22,}")
    emb = r["embedding"] + r["head"]
    print(f"  {'excluding embedding + head':<32}{r['total'] - emb:>20,}{r['active'] - emb:>22,}")
    print(f"weights in bf16: {_fmt_bytes(2 * r['total'])}  (FP8 e4m3: about {_fmt_bytes(r['total'])} + block scales)")
    mla, mha = kv_cache_bytes_per_token(args)
    print(f"KV cache, bf16, all layers:    per token         at {a.context:,} tokens")
    print(f"  MLA latent (c_kv + k_pe)     {_fmt_bytes(mla):>14}   {_fmt_bytes(mla * a.context):>14}")
    print(f"  multi-head K/V equivalent    {_fmt_bytes(mha):>14}   {_fmt_bytes(mha * a.context):>14}"
          f"   ({mha / mla:.1f}x the latent)")
    if a.config == "kimi-k2":
        print(f"Moonshot's README states 1T total / 32B activated: these counts rounded down "
              f"({r['total'] / 1e12:.3f}T / {r['active'] / 1e9:.2f}B). The tech report's 1.04T / 32.6B does not "
              "reproduce from the released config.json under any embedding/head convention (README, 'Parameter "
              "counts').")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # a bad config or path: say what is wrong, no traceback
        raise SystemExit(f"error: {err}")
