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


RULES = {"olmoe": olmoe_rules, "llada2": llada2_rules}


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
