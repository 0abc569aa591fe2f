"""A PyTorch reference of LLaDA2-MoE, written here from the published modeling file's
semantics (``modeling_llada2_moe.py``) for parity tests: float32, eager attention,
a state dict with the checkpoint's real key names. Not imported from anywhere.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F


def rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(q, k, pos, rot_dim, theta):  # q/k [B, H, L, K]; NeoX on the first rot_dim dims
    inv = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    ang = pos[:, :, None].double() * inv[None, None]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().float()[:, None], emb.sin().float()[:, None]

    def apply(x):
        xr, xp = x[..., :rot_dim], x[..., rot_dim:]
        return torch.cat([xr * cos + rotate_half(xr) * sin, xp], -1)

    return apply(q), apply(k)


def gate(sd, pre, x, cfg):
    """The router: sigmoid scores, group-limited top-k on biased scores."""
    logits = x.float() @ sd[f"{pre}.mlp.gate.weight"].float().T
    scores = torch.sigmoid(logits)
    biased = scores + sd[f"{pre}.mlp.gate.expert_bias"].float()
    t, e = biased.shape
    g = cfg["n_group"]
    group_scores = biased.view(t, g, -1).topk(2, dim=-1)[0].sum(-1)
    group_idx = group_scores.topk(cfg["topk_group"], dim=-1)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask[:, :, None].expand(t, g, e // g).reshape(t, e)
    masked = biased.masked_fill(~score_mask.bool(), float("-inf"))
    idx = masked.topk(cfg["num_experts_per_tok"], dim=-1)[1]
    w = scores.gather(1, idx)
    if cfg["num_experts_per_tok"] > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * cfg["routed_scaling_factor"]


def expert_choice_gate(sd, pre, x, valid, cfg, capacity_factor):
    """Expert-choice combine weights ``[B, L, E]``, written from jmoe's spec (issue 5).

    Scores ``sigmoid(logits)``; in sequence b of real length n, expert e picks the
    ``min(n, ceil(cf * n * k / E))`` real tokens of highest ``score + expert_bias``
    (stable: the earlier position wins a tie). A token's weights are the unbiased
    scores of the experts that picked it, normalised over them when k > 1, times
    ``routed_scaling_factor``. float64: the bias is a constant per expert here, so
    this ranks exactly as the scores do (jmoe leaves the bias out).
    """
    logits = x.double() @ sd[f"{pre}.mlp.gate.weight"].double().T
    scores = torch.sigmoid(logits)
    biased = scores + sd[f"{pre}.mlp.gate.expert_bias"].double()
    b, l, e = scores.shape
    k = cfg["num_experts_per_tok"]
    picked = torch.zeros(b, l, e, dtype=torch.bool)
    for i in range(b):
        real = torch.nonzero(valid[i])[:, 0]
        n = len(real)
        cap = min(n, math.ceil(capacity_factor * n * k / e))
        for ex in range(e):
            order = torch.sort(biased[i, real, ex], descending=True, stable=True).indices
            picked[i, real[order[:cap]], ex] = True
    w = torch.where(picked, scores, 0.0)
    if k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return (w * cfg["routed_scaling_factor"]).float()


def mlp(sd, pre, x):
    g = x @ sd[f"{pre}.gate_proj.weight"].T
    u = x @ sd[f"{pre}.up_proj.weight"].T
    return (F.silu(g) * u) @ sd[f"{pre}.down_proj.weight"].T


def moe(sd, pre, x, cfg, expert_choice=None):
    """``expert_choice``: None (token choice) or ``(valid [B, L], capacity_factor)``."""
    b, l, d = x.shape
    flat = x.reshape(-1, d)
    if expert_choice is not None:
        w = expert_choice_gate(sd, pre, x, expert_choice[0], cfg, expert_choice[1])
        y = sum(w[..., ex, None] * mlp(sd, f"{pre}.mlp.experts.{ex}", x)
                for ex in range(cfg["num_experts"]))
    else:
        idx, w = gate(sd, pre, flat, cfg)
        out = torch.zeros_like(flat)
        for tok in range(flat.shape[0]):
            for j in range(idx.shape[1]):
                out[tok] += w[tok, j] * mlp(sd, f"{pre}.mlp.experts.{int(idx[tok, j])}", flat[tok])
        y = out.view(b, l, d)
    if cfg.get("num_shared_experts"):
        y = y + mlp(sd, f"{pre}.mlp.shared_experts", x)
    return y


def attention(sd, pre, x, mask4d, pos, cfg):
    b, l, _ = x.shape
    h, n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    qkv = (x @ sd[f"{pre}.attention.query_key_value.weight"].T).view(b, l, h + 2 * n, k)
    q, kk, v = qkv.split([h, n, n], dim=-2)
    q, kk, v = q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2)
    eps = cfg["rms_norm_eps"]
    q = rms(q, sd[f"{pre}.attention.query_layernorm.weight"], eps)
    kk = rms(kk, sd[f"{pre}.attention.key_layernorm.weight"], eps)
    q, kk = rope(q, kk, pos, int(k * cfg["partial_rotary_factor"]), cfg["rope_theta"])
    kk = kk.repeat_interleave(h // n, dim=1)
    v = v.repeat_interleave(h // n, dim=1)
    s = q @ kk.transpose(2, 3) / math.sqrt(k) + mask4d
    a = torch.softmax(s.float(), dim=-1)
    o = (a @ v).transpose(1, 2).reshape(b, l, h * k)
    return o @ sd[f"{pre}.attention.dense.weight"].T


def forward(sd, cfg, input_ids, mask4d, pos, expert_choice=None):
    """logits ``[B, L, V]``; ``mask4d`` additive ``[B, 1, L, L]``; ``pos`` ``[B, L]``.

    ``expert_choice``: None (the published token choice) or ``(valid [B, L] bool,
    capacity_factor)`` to route every MoE layer by ``expert_choice_gate``.
    """
    x = sd["model.word_embeddings.weight"][input_ids]
    eps = cfg["rms_norm_eps"]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        x = x + attention(sd, pre, rms(x, sd[f"{pre}.input_layernorm.weight"], eps), mask4d, pos, cfg)
        hs = rms(x, sd[f"{pre}.post_attention_layernorm.weight"], eps)
        if i < cfg["first_k_dense_replace"]:
            x = x + mlp(sd, f"{pre}.mlp", hs)
        else:
            x = x + moe(sd, pre, hs, cfg, expert_choice)
    x = rms(x, sd["model.norm.weight"], eps)
    return x @ sd["lm_head.weight"].T


def block_mask(total, block_length):
    """The reference generate's additive block-causal mask ``[1, 1, L, L]``."""
    nb = (total + block_length - 1) // block_length
    m = torch.tril(torch.ones(nb, nb)).repeat_interleave(block_length, 0)
    m = m.repeat_interleave(block_length, 1)[:total, :total]
    return torch.where(m.bool(), 0.0, float("-inf"))[None, None]


def random_checkpoint(cfg, seed=0):
    """A random state dict in the real checkpoint layout (float32)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)
    d, h, n, k = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    v, e, f, fd = cfg["vocab_size"], cfg["num_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    sd = {"model.word_embeddings.weight": r(v, d), "model.norm.weight": 1 + r(d),
          "lm_head.weight": r(v, d)}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        sd.update({f"{pre}.input_layernorm.weight": 1 + r(d),
                   f"{pre}.post_attention_layernorm.weight": 1 + r(d),
                   f"{pre}.attention.query_key_value.weight": r((h + 2 * n) * k, d),
                   f"{pre}.attention.query_layernorm.weight": 1 + r(k),
                   f"{pre}.attention.key_layernorm.weight": 1 + r(k),
                   f"{pre}.attention.dense.weight": r(d, h * k)})
        if i < cfg["first_k_dense_replace"]:
            sd.update({f"{pre}.mlp.gate_proj.weight": r(fd, d), f"{pre}.mlp.up_proj.weight": r(fd, d),
                       f"{pre}.mlp.down_proj.weight": r(d, fd)})
            continue
        sd[f"{pre}.mlp.gate.weight"] = r(e, d)
        sd[f"{pre}.mlp.gate.expert_bias"] = 0.5 * r(e)
        for ex in range(e):
            sd.update({f"{pre}.mlp.experts.{ex}.gate_proj.weight": r(f, d),
                       f"{pre}.mlp.experts.{ex}.up_proj.weight": r(f, d),
                       f"{pre}.mlp.experts.{ex}.down_proj.weight": r(d, f)})
        if cfg.get("num_shared_experts"):
            fs = f * cfg["num_shared_experts"]
            sd.update({f"{pre}.mlp.shared_experts.gate_proj.weight": r(fs, d),
                       f"{pre}.mlp.shared_experts.up_proj.weight": r(fs, d),
                       f"{pre}.mlp.shared_experts.down_proj.weight": r(d, fs)})
    return sd


# A tiny config exercising every branch: groups, bias, shared expert, dense first layer,
# partial rotary, GQA (mask 70, EOS 69).
TINY = dict(model_type="llada2_moe", vocab_size=71, hidden_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=40,
            moe_intermediate_size=12, num_experts=8, num_experts_per_tok=3, n_group=4,
            topk_group=2, num_shared_experts=1, first_k_dense_replace=1,
            routed_scaling_factor=2.5, partial_rotary_factor=0.5, rope_theta=600000.0,
            rms_norm_eps=1e-6, max_position_embeddings=64, score_function="sigmoid",
            use_qk_norm=True, tie_word_embeddings=False, mask_token_id=70, eos_token_id=69,
            pad_token_id=69)


def write_checkpoint(folder, cfg, sd):
    """Save ``sd`` and ``cfg`` as an HF folder in the real layout (safetensors + config.json)."""
    from safetensors.torch import save_file

    os.makedirs(folder)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
