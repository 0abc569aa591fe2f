"""The base of jmoe's configs: ``MoEConfig`` (fields every family shares) and the helpers
that read HF ``config.json`` fields. ``jmoe.config`` re-exports all of it; family configs
import it from here (``jmoe.config_diffusion_gemma`` too, without a cycle through
``jmoe.config``).
"""

from __future__ import annotations

import dataclasses
import json
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
    # runtime, not saved: the platform of the devices the model's programs target
    # ("cpu" | "gpu" | "tpu" | None), which picks every kernel (``jmoe.platform``)
    platform: str | None = dataclasses.field(default=None, repr=False)
    # expert-parallel buffer policy: None = worst-case buffers (never drops); a float f =
    # f x the balanced load per buffer, overflow dropped and counted in aux["ep_dropped"]
    ep_capacity_factor: float | None = None

    family = "base"
    # the routed experts' activation (``jmoe.moe.ACTIVATIONS``): a family's choice
    expert_activation = "silu"
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
        _check(self.platform in (None, "cpu", "gpu", "tpu"), "platform", self.platform,
               "None, 'cpu', 'gpu' or 'tpu' (set from the target devices)")
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
        del d["mesh"], d["platform"]  # placement is chosen at load time, not stored
        d["generation"] = dict(self.generation) if self.generation is not None else None
        d["family"] = self.family
        return d

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


# the token ids jmoe reads from config.json (jmoe's config fields have the same names)
TOKEN_ID_FIELDS = ("mask_token_id", "eos_token_id", "pad_token_id")


def read_json(path: str) -> Any:
    """A JSON file's content; invalid JSON is a ValueError naming the file and the place."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}: line {e.lineno}, column "
                         f"{e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text: {e.reason})") from None


def read_hf_config(hf) -> dict:
    """An HF ``config.json`` as a dict: given a dict, the file, or its folder."""
    if isinstance(hf, Mapping):
        return dict(hf)
    path = os.fspath(hf)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HF config.json at {path!r}")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields, got a JSON "
                         f"{type(raw).__name__}")
    return raw


def _int(hf, name: str, default=None):
    """A positive int field of config.json (required when ``default`` is None)."""
    v = hf.get(name)
    if v is None and default is not None:
        return default
    if v is None:
        raise ValueError(f"config.json has no {name!r}: expected a positive int")
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"config.json {name}={v!r}: expected a positive int")
    return v


def _number(hf, name: str, default):
    v = hf.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"config.json {name}={v!r}: expected a number")
    return float(v)


def _bool(hf, name: str, default: bool) -> bool:
    v = hf.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ValueError(f"config.json {name}={v!r}: expected true or false")
    return v


def _token_id(hf, name):
    """An id from an HF config: an int, or a list whose entries are all that int.

    Applied exactly or refused: an id outside ``[0, vocab_size)``, several different
    ids (jmoe keeps one EOS / pad / mask id) or a non-integer is a ValueError naming
    it; pass the field as an override (``eos_token_id=None`` or an id) to
    ``from_hf_config`` / ``jmoe.load`` / ``hf_to_jmoe`` to replace it.
    """
    v = hf.get(name)
    if isinstance(v, (list, tuple)):
        if len(set(v)) > 1:
            raise ValueError(f"config.json {name}={v!r}: jmoe uses one {name}; pass {name}=<id> "
                             "to choose one")
        v = v[0] if v else None
    if v is None:
        return None
    vocab = _int(hf, "vocab_size")
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
        raise ValueError(f"config.json {name}={v!r}: expected a token id in [0, vocab_size="
                         f"{vocab}); pass {name}=None (or an id) to replace it")
    return v


def _family_id(hf, name, default: int):
    """``name`` from config.json, or when absent the family tokenizer's id ``default``
    (None if the vocabulary is too small to hold it: a tiny test model)."""
    if name in hf:
        return _token_id(hf, name)
    return default if default < _int(hf, "vocab_size") else None


def _with_given_ids(hf: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    # token ids given as overrides replace config.json's before they are checked
    return {**hf, **{k: overrides[k] for k in TOKEN_ID_FIELDS if k in overrides}}
