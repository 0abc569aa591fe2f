"""Frozen, keyword-only model configs with named presets.

A config fully determines the model function; params live elsewhere. Every field
is checked in ``__post_init__`` and errors name the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from jmoe.config_base import (  # noqa: F401  (re-exported: jmoe.config is the public home)
    MOE_BACKENDS, ROUTINGS, TOKEN_ID_FIELDS, MoEConfig, _DTYPES, _FrozenDict, _QK_NORMS, _bool,
    _check, _family_id, _int, _number, _token_id, _with_given_ids, read_hf_config, read_json,
    replace_fields)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OlmoeConfig(MoEConfig):
    """The OLMoE architecture: causal OLMoE-1B-7B, or bidirectional LLaDA-MoE-7B.

    Every layer is attention + a sparse MoE of SwiGLU experts with a softmax router.
    ``qk_norm`` says where the q/k RMSNorm acts: ``"whole"`` normalises the full
    q and k projections before the head split (OLMoE; norm weights of size
    ``num_heads*head_dim`` and ``num_kv_heads*head_dim``), ``"per_head"``
    normalises each head (LLaDA-MoE; weights of size ``head_dim``).
    """

    norm_topk_prob: bool = False

    family = "olmoe"

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | str | os.PathLike, **overrides) -> "OlmoeConfig":
        """Build from an HF ``config.json`` (a dict, the file, or its folder).

        Understands ``model_type`` ``olmoe`` (OLMoE) and ``llada``/``lladamoe``
        (LLaDA-MoE). Every field read is applied exactly or refused with a ValueError
        naming it: a missing required field, RoPE scaling, two different RoPE values
        (top level and ``rope_parameters``), a token id outside the vocabulary or a
        list of different ids (give the id as an override, e.g. ``eos_token_id=None``,
        to replace it). Example:
            cfg = OlmoeConfig.from_hf_config("path/to/hf_folder")
        """
        hf = _with_given_ids(read_hf_config(hf), overrides)
        model_type = hf.get("model_type")
        if model_type == "olmoe":
            fields = _olmoe_fields(hf)
        elif model_type in ("llada", "lladamoe", "llada_moe"):
            fields = _llada_moe_fields(hf)
        else:
            raise ValueError(
                f"config.json model_type={model_type!r}: expected 'olmoe', 'llada' or 'lladamoe' "
                "for OlmoeConfig")
        return replace_fields(cls(**fields), overrides)




_ROPE_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def _rope_fields(hf) -> dict:
    """``rope_theta`` and ``rotary_fraction`` wherever transformers writes them: top level,
    ``rope_parameters`` (transformers 5) or a legacy ``rope_scaling``. RoPE scaling, keys
    of other RoPE types and two different values for one setting are refused."""
    found: dict[str, list] = {"rope_theta": [], "partial_rotary_factor": []}
    for k in found:
        if hf.get(k) is not None:
            found[k].append((k, hf[k]))
    for where in ("rope_parameters", "rope_scaling"):
        sec = hf.get(where)
        if sec is None:
            continue
        if not isinstance(sec, Mapping):
            raise ValueError(f"config.json {where}={sec!r}: expected a JSON object")
        kind = sec.get("rope_type", sec.get("type", "default"))
        if kind != "default":
            raise ValueError(f"config.json {where}={dict(sec)!r}: rope_type {kind!r} is RoPE "
                             "scaling; expected plain RoPE (rope_type 'default')")
        unknown = sorted(set(sec) - set(_ROPE_KEYS))
        if unknown:
            raise ValueError(f"config.json {where} has {unknown}: expected only {_ROPE_KEYS} "
                             "(plain RoPE)")
        for k in found:
            if sec.get(k) is not None:
                found[k].append((f"{where}.{k}", sec[k]))
    out = {}
    for k, default in (("rope_theta", 10000.0), ("partial_rotary_factor", 1.0)):
        for where, v in found[k]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"config.json {where}={v!r}: expected a number")
        if len({float(v) for _, v in found[k]}) > 1:
            both = " and ".join(f"{w}={v!r}" for w, v in found[k])
            raise ValueError(f"config.json sets {both}: expected one value")
        out[k] = float(found[k][0][1]) if found[k] else default
    return dict(rope_theta=out["rope_theta"], rotary_fraction=out["partial_rotary_factor"])


def _common_fields(hf: Mapping[str, Any]) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: expected 'silu'")
    if hf.get("attention_bias", False):
        raise ValueError("config.json attention_bias=True: jmoe's OLMoE has no attention bias")
    heads, hidden = _int(hf, "num_attention_heads"), _int(hf, "hidden_size")
    _int(hf, "vocab_size")
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=_int(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_int(hf, "num_key_value_heads", heads),
        head_dim=_int(hf, "head_dim", hidden // heads),
        num_experts=_int(hf, "num_experts"),
        num_experts_per_tok=_int(hf, "num_experts_per_tok"),
        **_rope_fields(hf),
        rms_norm_eps=_number(hf, "rms_norm_eps", 1e-5),
        max_position_embeddings=_int(hf, "max_position_embeddings", 4096),
        tie_word_embeddings=_bool(hf, "tie_word_embeddings", False),
        eos_token_id=_token_id(hf, "eos_token_id"),
        pad_token_id=_token_id(hf, "pad_token_id"),
        router_aux_loss_coef=_number(hf, "router_aux_loss_coef", 0.01),
    )


def _olmoe_fields(hf) -> dict:
    common = _common_fields(hf)
    if common["rotary_fraction"] != 1.0:
        raise ValueError(f"config.json partial_rotary_factor={common['rotary_fraction']!r} with "
                         "model_type 'olmoe': transformers' OLMoE ignores it and rotates whole "
                         "heads; expected 1.0 or none")
    return dict(common, moe_intermediate_size=_int(hf, "intermediate_size"),
                clip_qkv=_number(hf, "clip_qkv", None),
                norm_topk_prob=_bool(hf, "norm_topk_prob", False), qk_norm="whole",
                causal=True)


def _llada_moe_fields(hf) -> dict:
    freq = hf.get("moe_layer_freq")
    if freq is not None and not all(int(f) == 1 for f in freq):
        raise ValueError(f"config.json moe_layer_freq={freq!r}: expected every layer MoE (all 1)")
    if hf.get("shared_expert_intermediate_size"):
        raise ValueError("config.json shared_expert_intermediate_size="
                         f"{hf['shared_expert_intermediate_size']!r}: expected none for LLaDA-MoE")
    if hf.get("moe_router_enable_expert_bias"):
        raise ValueError("config.json moe_router_enable_expert_bias=True: expected False for LLaDA-MoE")
    # LLaDA-MoE's tokenizer ids where its config.json omits them
    common = _common_fields(dict(hf, eos_token_id=_family_id(hf, "eos_token_id", 156892)))
    return dict(
        common,
        clip_qkv=_number(hf, "clip_qkv", None),
        moe_intermediate_size=_int(hf, "expert_intermediate_size", 0) or _int(hf, "intermediate_size"),
        # the published modeling file hard-codes norm_topk_prob = False
        norm_topk_prob=False,
        qk_norm="per_head" if _bool(hf, "qk_layernorm", True) else "none",
        causal=False,
        mask_token_id=_family_id(hf, "mask_token_id", 156895),
    )


# allenai/OLMoE-1B-7B-0924, config.json as published on the hub.
OLMOE_1B_7B = OlmoeConfig(
    vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
    head_dim=128, moe_intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
    norm_topk_prob=False, qk_norm="whole", clip_qkv=None, rope_theta=10000.0,
    rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
    causal=True, eos_token_id=50279, pad_token_id=1, router_aux_loss_coef=0.01,
    dtype="bfloat16")

# inclusionAI/LLaDA-MoE-7B-A1B: config.json (hidden 2048, 16 layers/heads, 64 experts
# top-8 of size 1024, rope_theta 50000, 8192 positions, qk_layernorm per head); the
# vocab (157184) and mask/EOS ids (156895/156892) are its tokenizer's, shared with LLaDA2.
LLADA_MOE_7B = OlmoeConfig(
    vocab_size=157184, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
    head_dim=128, moe_intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
    norm_topk_prob=False, qk_norm="per_head", clip_qkv=None, rope_theta=50000.0,
    rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
    causal=False, mask_token_id=156895, eos_token_id=156892, pad_token_id=156892,
    router_aux_loss_coef=0.01, dtype="bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LLaDA2Config(MoEConfig):
    """LLaDA2-MoE (LLaDA2.0-mini / -flash): a block-diffusion MoE language model.

    Differences from OLMoE: the first ``first_k_dense_replace`` layers use a dense
    SwiGLU MLP (``intermediate_size``); MoE layers add ``num_shared_experts``
    always-on SwiGLU experts; the router is sigmoid, group-limited (``n_group``
    groups, the ``topk_group`` best by the sum of their top-2 biased scores), selects
    by ``score + expert_bias`` and weights by the unbiased scores, normalised over
    the kept experts and scaled by ``routed_scaling_factor``; q/k RMSNorm is per
    head and rotary covers ``rotary_fraction`` of each head.
    ``routing="expert_choice"`` instead has each expert pick its top
    ``ceil(capacity_factor * L * k / E)`` tokens of each sequence by sigmoid score,
    weighted as token choice weights its kept experts; the group limit and the
    selection bias do not apply (``routing.sigmoid_expert_choice``).
    ``attention_block_length``: None is full bidirectional attention; an int makes
    attention block-causal (a position in block j sees blocks <= j, blocks aligned
    to absolute positions from 0), as the reference ``generate`` runs it.
    """

    intermediate_size: int
    num_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    qk_norm: str = "per_head"
    causal: bool = False

    family = "llada2"
    router = "sigmoid_group_topk"
    default_convention = "llada2"
    _positive_ints = MoEConfig._positive_ints + ("intermediate_size", "n_group", "topk_group")

    def __post_init__(self):
        super().__post_init__()
        _check(self.first_k_dense_replace < self.num_layers, "first_k_dense_replace",
               self.first_k_dense_replace, f"< num_layers={self.num_layers} (a model needs an "
               "MoE layer)")
        _check(self.num_experts % self.n_group == 0, "n_group", self.n_group,
               f"a divisor of num_experts={self.num_experts}")
        _check(self.num_experts // self.n_group >= 2, "n_group", self.n_group,
               "at most num_experts/2 (a group's score sums its top-2 experts)")
        _check(self.topk_group <= self.n_group, "topk_group", self.topk_group,
               f"<= n_group={self.n_group}")
        _check(self.num_experts_per_tok <= self.topk_group * self.num_experts // self.n_group,
               "num_experts_per_tok", self.num_experts_per_tok,
               "<= the experts in the topk_group kept groups")
        _check(not self.causal, "causal", self.causal,
               "False (LLaDA2 is bidirectional or block-causal: set attention_block_length)")

    @classmethod
    def from_hf_config(cls, hf, **overrides) -> "LLaDA2Config":
        """Build from an HF ``config.json`` of ``model_type`` ``llada2_moe`` (see
        ``OlmoeConfig.from_hf_config``)."""
        hf = _with_given_ids(read_hf_config(hf), overrides)
        if hf.get("model_type") != "llada2_moe":
            raise ValueError(f"config.json model_type={hf.get('model_type')!r}: expected "
                             "'llada2_moe' for LLaDA2Config")
        if hf.get("score_function", "sigmoid") != "sigmoid":
            raise ValueError(f"config.json score_function={hf['score_function']!r}: expected "
                             "'sigmoid'")
        for flag in ("use_qkv_bias", "use_bias"):
            if hf.get(flag):
                raise ValueError(f"config.json {flag}=True: jmoe's LLaDA2 has no linear biases")
        if _bool(hf, "norm_topk_prob", True) is not True:
            raise ValueError("config.json norm_topk_prob=False: jmoe's LLaDA2 router always "
                             "normalises the kept experts' weights (expected true)")
        # LLaDA2's tokenizer ids where its config.json omits them
        fields = _common_fields(dict(hf, eos_token_id=_family_id(hf, "eos_token_id", 156892)))
        fields.update(
            intermediate_size=_int(hf, "intermediate_size"),
            moe_intermediate_size=_int(hf, "moe_intermediate_size"),
            num_shared_experts=hf.get("num_shared_experts") or 0,
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            n_group=_int(hf, "n_group", 1), topk_group=_int(hf, "topk_group", 1),
            routed_scaling_factor=_number(hf, "routed_scaling_factor", 1.0),
            qk_norm="per_head" if _bool(hf, "use_qk_norm", True) else "none",
            mask_token_id=_family_id(hf, "mask_token_id", 156895),
            rms_norm_eps=_number(hf, "rms_norm_eps", 1e-6),
            generation=dict(LLADA2_GENERATION),
        )
        return replace_fields(cls(**fields), overrides)


# The reference ``generate`` defaults of LLaDA2 (modeling_llada2_moe.py).
LLADA2_GENERATION = {"block_length": 32, "steps": 32, "threshold": 0.95, "temperature": 0.0}

# inclusionAI/LLaDA2.0-mini, config.json as published (model_type llada2_moe).
LLADA2_MINI = LLaDA2Config(
    vocab_size=157184, hidden_size=2048, num_layers=20, num_heads=16, num_kv_heads=4,
    head_dim=128, intermediate_size=5120, moe_intermediate_size=512, num_experts=256,
    num_experts_per_tok=8, num_shared_experts=1, first_k_dense_replace=1, n_group=8,
    topk_group=4, routed_scaling_factor=2.5, rotary_fraction=0.5, rope_theta=600000.0,
    rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
    mask_token_id=156895, eos_token_id=156892, pad_token_id=156892, dtype="bfloat16",
    generation=LLADA2_GENERATION)


# DiffusionGemma lives in its own module (on jmoe.config_base)
from jmoe.config_diffusion_gemma import (DIFFUSIONGEMMA_26B_A4B,  # noqa: E402
                                         DiffusionGemmaConfig)

# model family -> its config class (the ``family`` key of a jmoe checkpoint's config.json)
CONFIG_CLASSES = {"olmoe": OlmoeConfig, "llada2": LLaDA2Config,
                  "diffusion_gemma": DiffusionGemmaConfig}

# named presets, as ``jmoe.aot.plan`` and ``jmoe plan --model`` take them
PRESETS = {"olmoe-1b-7b": OLMOE_1B_7B, "llada-moe-7b": LLADA_MOE_7B, "llada2-mini": LLADA2_MINI,
           "diffusiongemma-26b-a4b": DIFFUSIONGEMMA_26B_A4B}
