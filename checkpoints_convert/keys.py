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


RULES = {"olmoe": olmoe_rules}


def rules_for(config) -> list[Rule]:
    if config.family not in RULES:
        raise ValueError(f"no conversion key table for model family {config.family!r}; "
                         f"known: {sorted(RULES)}")
    return RULES[config.family](config)


def hf_config_from(config, base: dict | None = None) -> dict:
    """An HF ``config.json`` dict for a jmoe config (updating ``base`` when given)."""
    out = dict(base or {})
    if config.family != "olmoe":
        raise ValueError(f"no HF config writer for model family {config.family!r}")
    llada = config.qk_norm == "per_head" or not config.causal
    out.update({
        "model_type": out.get("model_type", "llada" if llada else "olmoe"),
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "num_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok, "clip_qkv": config.clip_qkv,
        "rms_norm_eps": config.rms_norm_eps, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "router_aux_loss_coef": config.router_aux_loss_coef,
    })
    if out["model_type"] == "olmoe":
        out.update(intermediate_size=config.moe_intermediate_size,
                   norm_topk_prob=config.norm_topk_prob,
                   rope_parameters={"rope_theta": config.rope_theta, "rope_type": "default"})
        out.setdefault("architectures", ["OlmoeForCausalLM"])
    else:
        out.update(expert_intermediate_size=config.moe_intermediate_size,
                   qk_layernorm=config.qk_norm == "per_head", rope_theta=config.rope_theta,
                   partial_rotary_factor=config.rotary_fraction,
                   mask_token_id=config.mask_token_id)
    return out
