"""``DiffusionGemmaConfig``: Google's DiffusionGemma (a Gemma-4 26B-A4B MoE block-diffusion
model) as a config of jmoe's one decoder stack. Re-exported by ``jmoe.config``.

Facts read in transformers' ``models/diffusion_gemma`` (configuration and modeling
files, transformers 5.25); where the issue's outline and transformers differ,
transformers is followed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jmoe.config_base import (MoEConfig, _bool, _check, _int, _number, _token_id,
                              _with_given_ids, read_hf_config, replace_fields)

SLIDING, FULL = "sliding_attention", "full_attention"
_LAYER_OVERRIDES = ("head_dim", "num_key_value_heads")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionGemmaConfig(MoEConfig):
    """DiffusionGemma: a causal encoder writes the K/V cache, a bidirectional decoder
    denoises a canvas over it; both are this one stack (shared weights, own
    ``layer_scalar``s).

    Layers are ``layer_types`` (``"sliding_attention"`` | ``"full_attention"``, the last
    full). Sliding layers: ``num_kv_heads`` heads of ``head_dim`` with a ``v_proj``, plain
    RoPE (``rope_theta``) and a causal window of ``sliding_window`` keys (the query's own
    included). Full layers: ``full_num_kv_heads`` heads of ``full_head_dim``, V = the
    scale-free RMSNorm of the raw K projection (no ``v_proj``), "proportional" RoPE
    (``full_rope_theta``; the first ``full_rotary_fraction * full_head_dim / 2``
    frequencies ``theta^(-2i/full_head_dim)``, the rest 0, pairs across the half).
    Every layer: q/k RMSNorm per head before RoPE, V's scale-free RMSNorm, attention
    scale 1.0, sandwich norms, a dense GeGLU MLP (``intermediate_size``) in parallel
    with the MoE (gelu-tanh experts of ``moe_intermediate_size``), each normalised
    before their sum, and the output times a learned ``layer_scalar``. Embeddings are
    scaled by sqrt(hidden_size), the tied LM head's logits soft-capped
    ``tanh(l / c) * c`` with ``c = final_logit_softcapping``. Router (``gemma_softmax_topk``):
    softmax over ``proj(RMSNorm_noscale(x) * scale * hidden_size^-0.5)`` in float32 of
    the residual stream (before the MoE's own pre-norm), top-k, renormalised, times
    ``per_expert_scale``. Token choice only; ``mask_token_id`` is None (the canvas is
    renoised with uniform random tokens). ``image_token_id``: prompts holding it are
    refused (text only).
    """

    intermediate_size: int
    layer_types: tuple = ()
    sliding_window: int = 1024
    full_head_dim: int = 512
    full_num_kv_heads: int = 2
    full_rope_theta: float = 1_000_000.0
    full_rotary_fraction: float = 0.25
    final_logit_softcapping: float = 30.0
    canvas_length: int = 256
    image_token_id: int | None = None
    qk_norm: str = "per_head"
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6

    family = "diffusion_gemma"
    router = "gemma_softmax_topk"
    default_convention = "diffusion_gemma"
    expert_activation = "gelu_tanh"
    _positive_ints = MoEConfig._positive_ints + (
        "intermediate_size", "sliding_window", "full_head_dim", "full_num_kv_heads",
        "canvas_length")

    def __post_init__(self):
        if not self.layer_types:  # transformers' default: 5 sliding, then 1 full
            kinds = tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_layers))
            object.__setattr__(self, "layer_types", kinds[:-1] + (FULL,))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        super().__post_init__()
        _check(len(self.layer_types) == self.num_layers, "layer_types", self.layer_types,
               f"num_layers={self.num_layers} entries")
        _check(all(t in (SLIDING, FULL) for t in self.layer_types), "layer_types",
               self.layer_types, f"entries {SLIDING!r} or {FULL!r}")
        _check(self.layer_types[-1] == FULL, "layer_types", self.layer_types,
               f"the last layer {FULL!r} (transformers forces it)")
        _check(self.num_heads % self.full_num_kv_heads == 0, "full_num_kv_heads",
               self.full_num_kv_heads, f"a divisor of num_heads={self.num_heads}")
        _check(self.head_dim % 2 == 0 and self.full_head_dim % 2 == 0, "head_dim",
               (self.head_dim, self.full_head_dim), "even head dims (rotary pairs)")
        _check(0.0 < self.full_rotary_fraction <= 1.0, "full_rotary_fraction",
               self.full_rotary_fraction, "in (0, 1]")
        _check(self.final_logit_softcapping > 0, "final_logit_softcapping",
               self.final_logit_softcapping, "> 0")
        _check(self.routing == "token_choice", "routing", self.routing,
               "'token_choice' (DiffusionGemma's expert choice is not supported)")
        _check(self.tie_word_embeddings, "tie_word_embeddings", self.tie_word_embeddings,
               "True (the LM head is the decoder embedding)")
        _check(self.qk_norm == "per_head", "qk_norm", self.qk_norm, "'per_head'")
        _check(self.clip_qkv is None, "clip_qkv", self.clip_qkv, "None")
        _check(self.mask_token_id is None, "mask_token_id", self.mask_token_id,
               "None (DiffusionGemma renoises with uniform tokens: no mask token)")
        _check(self.first_k_dense_replace == 0 and self.num_shared_experts == 0,
               "first_k_dense_replace", self.first_k_dense_replace,
               "0 with num_shared_experts=0 (every layer has the dense MLP beside the MoE)")
        _check(self.attention_block_length is None and self.causal, "causal", self.causal,
               "True with attention_block_length=None (the encoder is causal)")
        _check(self.image_token_id is None or self.image_token_id >= 0, "image_token_id",
               self.image_token_id, "None or a token id")

    def layer_geometry(self, i: int) -> tuple[int, int]:
        """``(kv heads, head dim)`` of layer ``i``."""
        if self.layer_types[i] == FULL:
            return self.full_num_kv_heads, self.full_head_dim
        return self.num_kv_heads, self.head_dim

    @classmethod
    def from_hf_config(cls, hf, **overrides) -> "DiffusionGemmaConfig":
        """Build from an HF ``config.json`` of ``model_type`` ``diffusion_gemma`` (its
        ``text_config``; the vision tower is not part of the jmoe model) or
        ``diffusion_gemma_text``. Every field read is applied exactly or refused with a
        ValueError naming it: RoPE other than the two published kinds, ``per_layer_config``
        overrides that differ between full layers or touch sliding layers, bidirectional
        text attention (``use_bidirectional_attention="all"``), attention biases, another
        activation. Example:
            cfg = DiffusionGemmaConfig.from_hf_config("path/to/diffusiongemma")
        """
        raw = read_hf_config(hf)
        top = raw
        if raw.get("model_type") == "diffusion_gemma":
            text = raw.get("text_config")
            if not isinstance(text, Mapping):
                raise ValueError(f"config.json text_config={text!r}: expected a JSON object")
        elif raw.get("model_type") == "diffusion_gemma_text":
            text, top = raw, {}
        else:
            raise ValueError(f"config.json model_type={raw.get('model_type')!r}: expected "
                             "'diffusion_gemma' for DiffusionGemmaConfig")
        t = _with_given_ids(dict(text), overrides)
        fields = _text_fields(t)
        fields["image_token_id"] = top.get("image_token_id")
        fields["canvas_length"] = _int(top, "canvas_length", 256) if top else 256
        if top and _bool(top, "tie_word_embeddings", True) is not True:
            raise ValueError("config.json tie_word_embeddings=False: jmoe's DiffusionGemma ties "
                             "the encoder to the decoder and the LM head to the embedding")
        return replace_fields(cls(**fields), overrides)


def _text_fields(t: Mapping[str, Any]) -> dict:
    for name, want in (("hidden_activation", "gelu_pytorch_tanh"), ("attention_bias", False)):
        if t.get(name, want) != want:
            raise ValueError(f"config.json text_config.{name}={t[name]!r}: expected {want!r}")
    if t.get("use_bidirectional_attention") not in (None, "vision"):
        raise ValueError("config.json text_config.use_bidirectional_attention="
                         f"{t['use_bidirectional_attention']!r}: expected null or 'vision' (text "
                         "attention of the encoder is causal)")
    for name in ("enable_moe_block",):
        if t.get(name) is False:
            raise ValueError(f"config.json text_config.{name}=false: expected the MoE block")
    if t.get("hidden_size_per_layer_input"):
        raise ValueError("config.json text_config.hidden_size_per_layer_input="
                         f"{t['hidden_size_per_layer_input']!r}: per-layer inputs are not "
                         "part of DiffusionGemma (expected 0 or none)")
    n_layers = _int(t, "num_hidden_layers")
    kinds = t.get("layer_types")
    if kinds is None:
        kinds = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
        kinds[-1] = FULL
    if not isinstance(kinds, (list, tuple)) or len(kinds) != n_layers or \
            any(k not in (SLIDING, FULL) for k in kinds) or kinds[-1] != FULL:
        raise ValueError(f"config.json text_config.layer_types={kinds!r}: expected "
                         f"num_hidden_layers={n_layers} entries of {SLIDING!r}/{FULL!r}, the "
                         "last full")
    heads, hidden = _int(t, "num_attention_heads"), _int(t, "hidden_size")
    head_dim = _int(t, "head_dim", 256)
    kv = _int(t, "num_key_value_heads", heads)
    full = _full_overrides(t, kinds, head_dim, kv)
    rope_s, rope_f = _gemma_rope(t)
    if t.get("final_logit_softcapping", 30.0) is None:
        raise ValueError("config.json text_config.final_logit_softcapping=null: expected a "
                         "number (transformers' DiffusionGemma always soft-caps)")
    return dict(
        vocab_size=_int(t, "vocab_size"), hidden_size=hidden, num_layers=n_layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        intermediate_size=_int(t, "intermediate_size"),
        moe_intermediate_size=_int(t, "moe_intermediate_size"),
        num_experts=_int(t, "num_experts"), num_experts_per_tok=_int(t, "top_k_experts"),
        layer_types=tuple(kinds), sliding_window=_int(t, "sliding_window", 512),
        full_head_dim=full["head_dim"], full_num_kv_heads=full["num_key_value_heads"],
        rope_theta=rope_s, full_rope_theta=rope_f[0], full_rotary_fraction=rope_f[1],
        final_logit_softcapping=_number(t, "final_logit_softcapping", 30.0),
        rms_norm_eps=_number(t, "rms_norm_eps", 1e-6),
        max_position_embeddings=_int(t, "max_position_embeddings", 131072),
        eos_token_id=_token_id(t, "eos_token_id"), pad_token_id=_token_id(t, "pad_token_id"))


def _full_overrides(t, kinds, head_dim: int, kv: int) -> dict:
    """The full layers' ``head_dim`` / ``num_key_value_heads`` from ``per_layer_config``
    (or transformers' ``global_head_dim`` / ``num_global_key_value_heads`` when absent)."""
    per = t.get("per_layer_config")
    if per is None:
        return {"head_dim": _int(t, "global_head_dim", 512),
                "num_key_value_heads": _int(t, "num_global_key_value_heads", kv)}
    if not isinstance(per, Mapping):
        raise ValueError(f"config.json text_config.per_layer_config={per!r}: expected an object")
    seen = set()
    for key, diff in per.items():
        idx = int(key)
        if not 0 <= idx < len(kinds) or not isinstance(diff, Mapping) or \
                set(diff) - set(_LAYER_OVERRIDES):
            raise ValueError(f"config.json text_config.per_layer_config[{key!r}]={diff!r}: "
                             f"expected a layer index with only {_LAYER_OVERRIDES}")
        if kinds[idx] == SLIDING:
            if any(diff.get(k, v) != v for k, v in zip(_LAYER_OVERRIDES, (head_dim, kv))):
                raise ValueError(f"config.json text_config.per_layer_config[{key!r}]={diff!r}: "
                                 "sliding layers must keep head_dim and num_key_value_heads")
            continue
        seen.add((diff.get("head_dim", head_dim), diff.get("num_key_value_heads", kv)))
    full_layers = [i for i, k in enumerate(kinds) if k == FULL]
    missing = [i for i in full_layers if str(i) not in per and i not in per]
    if missing:
        seen.add((head_dim, kv))
    if len(seen) != 1:
        raise ValueError(f"config.json text_config.per_layer_config={dict(per)!r}: expected one "
                         "(head_dim, num_key_value_heads) for every full layer")
    (hd, n), = seen
    return {"head_dim": hd, "num_key_value_heads": n}


def _gemma_rope(t) -> tuple[float, tuple[float, float]]:
    """``(sliding theta, (full theta, full rotary fraction))`` from ``rope_parameters``."""
    rp = t.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
               "rope_theta": 1_000_000.0}}
    if not isinstance(rp, Mapping) or set(rp) - {SLIDING, FULL}:
        raise ValueError(f"config.json text_config.rope_parameters={rp!r}: expected an object "
                         f"keyed by {SLIDING!r} and {FULL!r}")
    s = rp.get(SLIDING) or {"rope_type": "default", "rope_theta": 10000.0}
    f = rp.get(FULL) or {"rope_type": "proportional", "rope_theta": 1_000_000.0,
                         "partial_rotary_factor": 0.25}
    if s.get("rope_type", "default") != "default" or s.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json text_config.rope_parameters.{SLIDING}={dict(s)!r}: "
                         "expected rope_type 'default' over the whole head")
    if f.get("rope_type") != "proportional" or f.get("factor", 1.0) != 1.0:
        raise ValueError(f"config.json text_config.rope_parameters.{FULL}={dict(f)!r}: expected "
                         "rope_type 'proportional' without a scaling factor")
    return (float(s.get("rope_theta", 10000.0)),
            (float(f.get("rope_theta", 1_000_000.0)), float(f.get("partial_rotary_factor", 1.0))))


# google/diffusiongemma-26B-A4B-it: text_config of its config.json (the Gemma-4 26B-A4B
# text stack: hidden 2816, 30 layers = 5 x (5 sliding + 1 full), 16 heads; sliding layers
# 8 KV heads of 256, window 1024, theta 1e4; full layers 2 KV heads of 512 (K = V),
# proportional RoPE 0.25 at theta 1e6; dense GeGLU 2112 beside 128 experts top-8 of 704;
# vocab 262144, 262144 positions, eps 1e-6, softcap 30, canvas 256, pad 0, eos 1).
DIFFUSIONGEMMA_26B_A4B = DiffusionGemmaConfig(
    vocab_size=262144, hidden_size=2816, num_layers=30, num_heads=16, num_kv_heads=8,
    head_dim=256, intermediate_size=2112, moe_intermediate_size=704, num_experts=128,
    num_experts_per_tok=8, sliding_window=1024, full_head_dim=512, full_num_kv_heads=2,
    rope_theta=10000.0, full_rope_theta=1_000_000.0, full_rotary_fraction=0.25,
    final_logit_softcapping=30.0, rms_norm_eps=1e-6, max_position_embeddings=262144,
    canvas_length=256, image_token_id=258880, eos_token_id=1, pad_token_id=0,
    dtype="bfloat16")
