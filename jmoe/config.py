"""Frozen, keyword-only model configs with named presets.

A config fully determines the model function; params live elsewhere. Every field
is checked in ``__post_init__`` and errors name the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

_DTYPES = ("float32", "bfloat16")
_QK_NORMS = ("whole", "per_head", "none")
MOE_BACKENDS = ("auto", "dense", "ragged", "bucketed", "pallas", "cpu_gmm")
ROUTINGS = ("token_choice", "expert_choice")


def _check(cond: bool, field: str, value: Any, expected: str) -> None:
    if not cond:
        raise ValueError(f"config field {field}={value!r}: expected {expected}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Fields shared by every jmoe model family (see the family configs)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    qk_norm: str = "whole"
    clip_qkv: float | None = None
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    causal: bool = True
    # None: attention as ``causal`` says; an int N: block-causal (a position in block j
    # sees blocks <= j, blocks of N aligned to absolute positions from 0; needs causal=False)
    attention_block_length: int | None = None
    # dense SwiGLU MLP (width ``intermediate_size``) instead of the MoE in the first layers
    first_k_dense_replace: int = 0
    intermediate_size: int | None = None
    # always-on SwiGLU experts beside the routed ones (width moe_intermediate_size * n)
    num_shared_experts: int = 0
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    router_aux_loss_coef: float = 0.01
    dtype: str = "float32"
    moe_backend: str = "auto"
    routing: str = "token_choice"
    capacity_factor: float = 1.0
    generation: Mapping[str, Any] | None = None
    # runtime placement, not saved: a jax Mesh (hashable, so the config stays a jit
    # static arg); an ``expert`` axis > 1 runs the MoE layers expert-parallel (jmoe.expert_parallel)
    mesh: Any = dataclasses.field(default=None, repr=False)
    # expert-parallel buffer policy: None = worst-case buffers (never drops); a float f =
    # f x the balanced load per buffer, overflow dropped and counted in aux["ep_dropped"]
    ep_capacity_factor: float | None = None

    family = "base"
    # the router kind (``jmoe.routing.ROUTERS``): a family's choice, not a field
    router = "softmax_topk"
    # the sampler convention a model of this family generates with by default
    default_convention = "llada"
    _positive_ints = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                      "max_position_embeddings")

    def __post_init__(self):
        for name in self._positive_ints:
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, v,
                   "a positive int")
        _check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
               f"a divisor of num_heads={self.num_heads}")
        _check(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
               self.num_experts_per_tok, f"<= num_experts={self.num_experts}")
        _check(self.qk_norm in _QK_NORMS, "qk_norm", self.qk_norm, f"one of {_QK_NORMS}")
        _check(self.dtype in _DTYPES, "dtype", self.dtype, f"one of {_DTYPES}")
        _check(self.moe_backend in MOE_BACKENDS, "moe_backend", self.moe_backend,
               f"one of {MOE_BACKENDS}")
        _check(self.routing in ROUTINGS, "routing", self.routing, f"one of {ROUTINGS}")
        _check(self.capacity_factor > 0, "capacity_factor", self.capacity_factor, "> 0")
        _check(0.0 < self.rotary_fraction <= 1.0, "rotary_fraction", self.rotary_fraction,
               "in (0, 1]")
        rot = int(self.head_dim * self.rotary_fraction)
        _check(rot % 2 == 0 and rot > 0, "rotary_fraction", self.rotary_fraction,
               f"a fraction giving an even rotary dim of head_dim={self.head_dim}")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "> 0")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and 0 <= v < self.vocab_size), name, v,
                   f"None or a token id in [0, {self.vocab_size})")
        _check(self.ep_capacity_factor is None or self.ep_capacity_factor > 0,
               "ep_capacity_factor", self.ep_capacity_factor, "None or > 0")
        _check(self.clip_qkv is None or self.clip_qkv > 0, "clip_qkv", self.clip_qkv,
               "None or > 0")
        self._check_stack()
        if self.mesh is not None:
            from jmoe.sharding import check_experts_divisible

            check_experts_divisible(self.num_experts, self.mesh)
        if self.generation is not None:
            # a read-only, hashable mapping so the config stays a valid jit static arg
            object.__setattr__(self, "generation", _FrozenDict(self.generation))

    def _check_stack(self) -> None:
        _check(self.attention_block_length is None or (
            isinstance(self.attention_block_length, int) and self.attention_block_length > 0),
            "attention_block_length", self.attention_block_length, "None or a positive int")
        _check(not (self.causal and self.attention_block_length), "causal", self.causal,
               f"False with attention_block_length={self.attention_block_length} (block-causal "
               "attention is bidirectional inside a block)")
        _check(isinstance(self.first_k_dense_replace, int)
               and 0 <= self.first_k_dense_replace <= self.num_layers, "first_k_dense_replace",
               self.first_k_dense_replace, f"an int in [0, num_layers={self.num_layers}]")
        if self.first_k_dense_replace:
            v = self.intermediate_size
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                   "intermediate_size", v, "a positive int (the dense first layers' MLP width)")
        _check(isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0,
               "num_shared_experts", self.num_shared_experts, "an int >= 0")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def mask_kind(self) -> str:
        """The attention mask: ``"block_causal"``, ``"causal"`` or ``"bidirectional"``."""
        if self.attention_block_length:
            return "block_causal"
        return "causal" if self.causal else "bidirectional"

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers (the first ``first_k_dense_replace`` are dense)."""
        return tuple(range(self.first_k_dense_replace, self.num_layers))

    def replace(self, **overrides):
        """A copy with fields replaced; an unknown field is a ValueError naming it."""
        return replace_fields(self, overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(dataclasses.replace(self, mesh=None))
        del d["mesh"]  # placement is chosen at load time, not stored
        d["generation"] = dict(self.generation) if self.generation is not None else None
        d["family"] = self.family
        return d


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
        (LLaDA-MoE). Example:
            cfg = OlmoeConfig.from_hf_config("path/to/hf_folder")
        """
        hf = read_hf_config(hf)
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


class _FrozenDict(dict):
    """A read-only, hashable dict for config sections (generation defaults)."""

    def __hash__(self):
        return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))

    def _readonly(self, *a, **k):
        raise TypeError("config sections are read-only; use config.replace(...)")

    __setitem__ = __delitem__ = update = pop = clear = setdefault = _readonly


def replace_fields(cfg, overrides: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(
            f"unknown config field(s) {unknown} for {type(cfg).__name__}; "
            f"known fields: {sorted(names)}")
    return dataclasses.replace(cfg, **overrides)


def read_hf_config(hf) -> dict:
    if isinstance(hf, Mapping):
        return dict(hf)
    path = os.fspath(hf)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HF config.json at {path!r}")
    with open(path) as f:
        return json.load(f)


def _token_id(hf, name):
    """An id from an HF config (an int or a list: jmoe keeps the first).

    Tiny test configs often keep the hub's ids past their small vocab; such an id
    is dropped with a warning rather than failing the whole config.
    """
    v = hf.get(name)
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    if v is None:
        return None
    if not 0 <= int(v) < hf["vocab_size"]:
        logging.getLogger("jmoe").warning(
            "config.json %s=%s is outside the vocabulary [0, %s); ignoring it", name, v,
            hf["vocab_size"])
        return None
    return int(v)


def _common_fields(hf: Mapping[str, Any]) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: expected 'silu'")
    if hf.get("attention_bias", False):
        raise ValueError("config.json attention_bias=True: jmoe's OLMoE has no attention bias")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                         else None)
    if scaling:
        raise ValueError(f"config.json rope scaling {scaling!r}: expected plain (default) RoPE")
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_experts=hf["num_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rotary_fraction=float(hf.get("partial_rotary_factor", 1.0) or 1.0),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_id=_token_id(hf, "eos_token_id"),
        pad_token_id=_token_id(hf, "pad_token_id"),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)),
    )


def _olmoe_fields(hf) -> dict:
    return dict(_common_fields(hf), moe_intermediate_size=hf["intermediate_size"],
                clip_qkv=hf.get("clip_qkv"),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), qk_norm="whole",
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
    hf = dict(hf)
    # LLaDA-MoE's tokenizer ids; its configs may omit them
    hf.setdefault("mask_token_id", 156895)
    hf.setdefault("eos_token_id", 156892)
    return dict(
        _common_fields(hf),
        clip_qkv=hf.get("clip_qkv"),
        moe_intermediate_size=hf.get("expert_intermediate_size") or hf["intermediate_size"],
        # the published modeling file hard-codes norm_topk_prob = False
        norm_topk_prob=False,
        qk_norm="per_head" if hf.get("qk_layernorm", True) else "none",
        causal=False,
        mask_token_id=_token_id(hf, "mask_token_id"),
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
        """Build from an HF ``config.json`` of ``model_type`` ``llada2_moe``."""
        hf = read_hf_config(hf)
        if hf.get("model_type") != "llada2_moe":
            raise ValueError(f"config.json model_type={hf.get('model_type')!r}: expected "
                             "'llada2_moe' for LLaDA2Config")
        if hf.get("score_function", "sigmoid") != "sigmoid":
            raise ValueError(f"config.json score_function={hf['score_function']!r}: expected "
                             "'sigmoid'")
        for flag in ("use_qkv_bias", "use_bias"):
            if hf.get(flag):
                raise ValueError(f"config.json {flag}=True: jmoe's LLaDA2 has no linear biases")
        hf = dict(hf)
        hf.setdefault("mask_token_id", 156895)  # LLaDA2's tokenizer; configs may omit it
        hf.setdefault("eos_token_id", 156892)
        fields = _common_fields(hf)
        fields.update(
            intermediate_size=hf["intermediate_size"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            num_shared_experts=hf.get("num_shared_experts") or 0,
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            qk_norm="per_head" if hf.get("use_qk_norm", True) else "none",
            mask_token_id=_token_id(hf, "mask_token_id"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
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


# model family -> its config class (the ``family`` key of a jmoe checkpoint's config.json)
CONFIG_CLASSES = {"olmoe": OlmoeConfig, "llada2": LLaDA2Config}
