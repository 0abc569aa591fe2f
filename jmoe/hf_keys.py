"""Declarative HF <-> jmoe key tables, one per model family.

A ``Rule`` maps one jmoe params leaf to one HF tensor, or to one HF tensor per
expert (``{e}`` in the HF key) stacked on a new leading axis ``[E, ...]``.
``transpose``: HF linear weights are ``[out, in]``; jmoe keeps ``[in, out]`` so
that activations multiply on the left (``x_BLD @ w_DF``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Rule:
    path: tuple[str, ...]  # jmoe params path
    hf_key: str            # may contain {e} for per-expert tensors
    transpose: bool = False
    # a row range of the HF tensor (fused projections: LLaDA2's query_key_value)
    rows: tuple[int, int] | None = None
    # kept float32 whatever the checkpoint dtype (LLaDA2's expert_bias)
    float32: bool = False
    # the HF tensor already stacks the experts ``[E, ...]`` (DiffusionGemma's fused
    # ``gate_up_proj [E, 2F, D]``): ``rows`` then slice axis 1, ``transpose`` swaps the
    # last two axes
    stacked: bool = False

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf_key

    def hf_keys(self, num_experts: int) -> list[str]:
        if self.per_expert:
            return [self.hf_key.format(e=e) for e in range(num_experts)]
        return [self.hf_key]


def olmoe_rules(config) -> list[Rule]:
    """OLMoE and LLaDA-MoE (same key names; q/k norm sizes differ by ``qk_norm``)."""
    rules = [Rule(("embed", "embedding"), "model.embed_tokens.weight")]
    for i in range(config.num_layers):
        hf, jm = f"model.layers.{i}", f"layer_{i}"
        rules += [
            Rule((jm, "input_norm", "scale"), f"{hf}.input_layernorm.weight"),
            Rule((jm, "attn", "wq"), f"{hf}.self_attn.q_proj.weight", True),
            Rule((jm, "attn", "wk"), f"{hf}.self_attn.k_proj.weight", True),
            Rule((jm, "attn", "wv"), f"{hf}.self_attn.v_proj.weight", True),
            Rule((jm, "attn", "wo"), f"{hf}.self_attn.o_proj.weight", True),
            Rule((jm, "post_attn_norm", "scale"), f"{hf}.post_attention_layernorm.weight"),
            Rule((jm, "moe", "router"), f"{hf}.mlp.gate.weight", True),
            Rule((jm, "moe", "w_gate"), f"{hf}.mlp.experts.{{e}}.gate_proj.weight", True),
            Rule((jm, "moe", "w_up"), f"{hf}.mlp.experts.{{e}}.up_proj.weight", True),
            Rule((jm, "moe", "w_down"), f"{hf}.mlp.experts.{{e}}.down_proj.weight", True),
        ]
        if config.qk_norm != "none":
            rules += [Rule((jm, "attn", "q_norm", "scale"), f"{hf}.self_attn.q_norm.weight"),
                      Rule((jm, "attn", "k_norm", "scale"), f"{hf}.self_attn.k_norm.weight")]
    rules.append(Rule(("final_norm", "scale"), "model.norm.weight"))
    if not config.tie_word_embeddings:
        rules.append(Rule(("lm_head",), "lm_head.weight", True))
    return rules


def llada2_rules(config) -> list[Rule]:
    """LLaDA2-MoE: fused Q|K|V rows, dense first layers, shared experts, expert bias."""
    h, n, k = config.num_heads, config.num_kv_heads, config.head_dim
    q_rows, kv_rows = h * k, n * k
    rules = [Rule(("embed", "embedding"), "model.word_embeddings.weight")]
    for i in range(config.num_layers):
        hf, jm = f"model.layers.{i}", f"layer_{i}"
        qkv = f"{hf}.attention.query_key_value.weight"
        rules += [
            Rule((jm, "input_norm", "scale"), f"{hf}.input_layernorm.weight"),
            Rule((jm, "attn", "wq"), qkv, True, (0, q_rows)),
            Rule((jm, "attn", "wk"), qkv, True, (q_rows, q_rows + kv_rows)),
            Rule((jm, "attn", "wv"), qkv, True, (q_rows + kv_rows, q_rows + 2 * kv_rows)),
            Rule((jm, "attn", "wo"), f"{hf}.attention.dense.weight", True),
            Rule((jm, "post_attn_norm", "scale"), f"{hf}.post_attention_layernorm.weight"),
        ]
        if config.qk_norm != "none":
            rules += [Rule((jm, "attn", "q_norm", "scale"), f"{hf}.attention.query_layernorm.weight"),
                      Rule((jm, "attn", "k_norm", "scale"), f"{hf}.attention.key_layernorm.weight")]
        if i < config.first_k_dense_replace:
            rules += [Rule((jm, "mlp", f"w_{p}"), f"{hf}.mlp.{p}_proj.weight", True)
                      for p in ("gate", "up", "down")]
            continue
        rules += [
            Rule((jm, "moe", "router"), f"{hf}.mlp.gate.weight", True),
            Rule((jm, "moe", "expert_bias"), f"{hf}.mlp.gate.expert_bias", float32=True),
        ]
        rules += [Rule((jm, "moe", f"w_{p}"), f"{hf}.mlp.experts.{{e}}.{p}_proj.weight", True)
                  for p in ("gate", "up", "down")]
        if config.num_shared_experts:
            rules += [Rule((jm, "moe", "shared", f"w_{p}"), f"{hf}.mlp.shared_experts.{p}_proj.weight",
                           True) for p in ("gate", "up", "down")]
    rules.append(Rule(("final_norm", "scale"), "model.norm.weight"))
    if not config.tie_word_embeddings:
        rules.append(Rule(("lm_head",), "lm_head.weight", True))
    return rules


def diffusion_gemma_rules(config) -> list[Rule]:
    """DiffusionGemma (``DiffusionGemmaForBlockDiffusion``): the decoder's text weights
    (``model.decoder.*``, which the encoder's are tied to), the encoder's own untied
    ``layer_scalar`` buffers, ``self_conditioning.*``; experts fused ``gate_up_proj
    [E, 2F, D]`` (gate rows first) and ``down_proj [E, D, F]``, stored split in jmoe. The
    LM head is tied to the embedding; the vision tower is not read (``ignored_keys``)."""
    f = config.moe_intermediate_size
    dec = "model.decoder"
    rules = [Rule(("embed", "embedding"), f"{dec}.embed_tokens.weight")]
    norms = (("input_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
             ("pre_mlp_norm", "pre_feedforward_layernorm"),
             ("post_mlp_norm", "post_feedforward_layernorm_1"),
             ("pre_moe_norm", "pre_feedforward_layernorm_2"),
             ("post_moe_norm", "post_feedforward_layernorm_2"),
             ("post_ffw_norm", "post_feedforward_layernorm"))
    for i, kind in enumerate(config.layer_types):
        hf, jm = f"{dec}.layers.{i}", f"layer_{i}"
        rules += [Rule((jm, n, "scale"), f"{hf}.{h}.weight") for n, h in norms]
        rules += [Rule((jm, "attn", f"w{p}"), f"{hf}.self_attn.{p}_proj.weight", True)
                  for p in ("q", "k", "o") + (("v",) if kind == "sliding_attention" else ())]
        rules += [Rule((jm, "attn", f"{p}_norm", "scale"), f"{hf}.self_attn.{p}_norm.weight")
                  for p in ("q", "k")]
        rules += [Rule((jm, "mlp", f"w_{p}"), f"{hf}.mlp.{p}_proj.weight", True)
                  for p in ("gate", "up", "down")]
        rules += [
            Rule((jm, "moe", "router"), f"{hf}.router.proj.weight", True),
            Rule((jm, "moe", "router_scale"), f"{hf}.router.scale"),
            Rule((jm, "moe", "per_expert_scale"), f"{hf}.router.per_expert_scale", float32=True),
            Rule((jm, "moe", "w_gate"), f"{hf}.experts.gate_up_proj", True, (0, f), stacked=True),
            Rule((jm, "moe", "w_up"), f"{hf}.experts.gate_up_proj", True, (f, 2 * f),
                 stacked=True),
            Rule((jm, "moe", "w_down"), f"{hf}.experts.down_proj", True, stacked=True),
            Rule((jm, "layer_scalar"), f"{hf}.layer_scalar"),
            Rule((jm, "encoder_layer_scalar"),
                 f"model.encoder.language_model.layers.{i}.layer_scalar"),
        ]
    sc = f"{dec}.self_conditioning"
    rules += [Rule(("self_cond", "pre_norm", "scale"), f"{sc}.pre_norm.weight")]
    rules += [Rule(("self_cond", f"w_{p}"), f"{sc}.{p}_proj.weight", True)
              for p in ("gate", "up", "down")]
    rules.append(Rule(("final_norm", "scale"), f"{dec}.norm.weight"))
    return rules


RULES = {"olmoe": olmoe_rules, "llada2": llada2_rules, "diffusion_gemma": diffusion_gemma_rules}

# HF tensors jmoe does not read: DiffusionGemma's vision tower and its projection
# (text only), and a tied LM head's copy
SKIPPED_PREFIXES = {"diffusion_gemma": ("model.encoder.vision_tower.",
                                        "model.encoder.embed_vision.")}


def ignored_keys(config, keys) -> set:
    """The HF tensors of ``keys`` that ``config``'s family does not read."""
    out = {"lm_head.weight"} if config.tie_word_embeddings else set()
    prefixes = SKIPPED_PREFIXES.get(config.family, ())
    return out | {k for k in keys if k.startswith(prefixes)} if prefixes else out


def rules_for(config) -> list[Rule]:
    if config.family not in RULES:
        raise ValueError(f"no conversion key table for model family {config.family!r}; "
                         f"known: {sorted(RULES)}")
    return RULES[config.family](config)


def hf_config_from(config, base: dict | None = None) -> dict:
    """An HF ``config.json`` dict for a jmoe config (updating ``base`` when given)."""
    out = dict(base or {})
    out.update({
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "num_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok, "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "silu", "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "router_aux_loss_coef": config.router_aux_loss_coef,
        "dtype": config.dtype,  # the exported weights' dtype (the reader checks they agree)
    })
    if "torch_dtype" in out:
        out["torch_dtype"] = config.dtype
    if config.family == "diffusion_gemma":
        return _diffusion_gemma_hf_config(config, base)
    if config.family == "llada2":
        out.update(
            model_type="llada2_moe", head_dim=config.head_dim,
            intermediate_size=config.intermediate_size,
            moe_intermediate_size=config.moe_intermediate_size,
            num_shared_experts=config.num_shared_experts,
            first_k_dense_replace=config.first_k_dense_replace, n_group=config.n_group,
            topk_group=config.topk_group, routed_scaling_factor=config.routed_scaling_factor,
            score_function="sigmoid", use_qk_norm=config.qk_norm != "none",
            rope_theta=config.rope_theta, partial_rotary_factor=config.rotary_fraction,
            mask_token_id=config.mask_token_id, norm_topk_prob=True)
        out.setdefault("architectures", ["LLaDA2MoeModelLM"])
        return out
    if config.family != "olmoe":
        raise ValueError(f"no HF config writer for model family {config.family!r}")
    llada = config.qk_norm == "per_head" or not config.causal
    out["model_type"] = out.get("model_type", "llada" if llada else "olmoe")
    out["clip_qkv"] = config.clip_qkv
    if out["model_type"] == "olmoe":
        if config.rotary_fraction != 1.0:
            raise ValueError(f"rotary_fraction={config.rotary_fraction!r}: transformers' OLMoE "
                             "rotates whole heads; expected 1.0 to export as model_type 'olmoe'")
        rope = {"rope_theta": config.rope_theta, "rope_type": "default"}
        out.update(intermediate_size=config.moe_intermediate_size,
                   norm_topk_prob=config.norm_topk_prob, rope_parameters=rope)
        for k in ("rope_theta", "partial_rotary_factor", "rope_scaling"):
            out.pop(k, None)  # one place for each RoPE setting: rope_parameters
        out.setdefault("architectures", ["OlmoeForCausalLM"])
    else:
        out.update(expert_intermediate_size=config.moe_intermediate_size,
                   qk_layernorm=config.qk_norm == "per_head", rope_theta=config.rope_theta,
                   partial_rotary_factor=config.rotary_fraction,
                   mask_token_id=config.mask_token_id)
    return out


def _diffusion_gemma_hf_config(config, base: dict | None) -> dict:
    """A ``diffusion_gemma`` config.json: ``base``'s (the converted folder's, vision config
    included) with the text config's fields set from ``config``."""
    out = dict(base or {})
    text = dict(out.get("text_config") or {})
    full = [i for i, k in enumerate(config.layer_types) if k == "full_attention"]
    text.update({
        "model_type": "diffusion_gemma_text", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "num_experts": config.num_experts, "top_k_experts": config.num_experts_per_tok,
        "layer_types": list(config.layer_types), "sliding_window": config.sliding_window,
        "per_layer_config": {str(i): {"head_dim": config.full_head_dim,
                                      "num_key_value_heads": config.full_num_kv_heads}
                             for i in full},
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
            "full_attention": {"rope_type": "proportional", "rope_theta": config.full_rope_theta,
                               "partial_rotary_factor": config.full_rotary_fraction}},
        "final_logit_softcapping": config.final_logit_softcapping,
        "rms_norm_eps": config.rms_norm_eps, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": config.max_position_embeddings,
        "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": True, "dtype": config.dtype,
    })
    for k in ("global_head_dim", "num_global_key_value_heads"):
        text.pop(k, None)  # per_layer_config says it
    out.update(model_type="diffusion_gemma", text_config=text, tie_word_embeddings=True,
               canvas_length=config.canvas_length, dtype=config.dtype)
    if config.image_token_id is not None:
        out["image_token_id"] = config.image_token_id
    out.setdefault("architectures", ["DiffusionGemmaForBlockDiffusion"])
    return out
