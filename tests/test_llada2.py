"""LLaDA2-MoE: model parity with a PyTorch reference written from the published
modeling file (tests/llada2_reference.py), router against a NumPy oracle, and the
conversion of the real checkpoint layout (fused qkv, expert bias, shared experts)."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import jmoe
from checkpoints_convert.cli import main as convert_main
from jmoe import routing
import llada2_reference as ref

TINY = ref.TINY
VARIANTS = {
    "tiny": {},
    "no_shared_all_moe_mha": dict(num_shared_experts=0, first_k_dense_replace=0,
                                  num_key_value_heads=4, n_group=2, topk_group=1,
                                  num_experts_per_tok=2),
}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(params=sorted(VARIANTS))
def checkpoint(request, tmp_path):
    cfg = dict(TINY, **VARIANTS[request.param])
    sd = ref.random_checkpoint(cfg)
    ref.write_checkpoint(tmp_path / "hf", cfg, sd)
    assert convert_main(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ck"),
                         "--quiet"]) == 0
    return cfg, sd, tmp_path


def test_full_attention_logits_match_reference(checkpoint):
    cfg, sd, tmp = checkpoint
    model = jmoe.load(tmp / "ck")
    assert model.config.family == "llada2" and model.config.attention_block_length is None
    tokens = np.random.default_rng(0).integers(0, 71, (2, 10))
    logits, aux = jmoe.forward(model, tokens)
    pos = torch.arange(10)[None].expand(2, 10)
    with torch.no_grad():
        want = ref.forward(sd, cfg, torch.as_tensor(tokens), torch.zeros(2, 1, 10, 10), pos)
    assert rel_err(logits, want.numpy()) < 1e-4
    assert aux["expert_counts"].shape[0] == 3 - cfg["first_k_dense_replace"]


def test_block_causal_logits_match_reference(checkpoint):
    cfg, sd, tmp = checkpoint
    model = jmoe.load(tmp / "ck", attention_block_length=4)
    tokens = np.random.default_rng(1).integers(0, 71, (1, 11))
    logits, _ = jmoe.forward(model, tokens)
    with torch.no_grad():
        want = ref.forward(sd, cfg, torch.as_tensor(tokens), ref.block_mask(11, 4),
                           torch.arange(11)[None])
    assert rel_err(logits, want.numpy()) < 1e-4
    # block-causal really differs from full attention
    full, _ = jmoe.forward(model.replace(config=model.config.replace(attention_block_length=None)),
                           tokens)
    assert rel_err(full, want.numpy()) > 1e-3


def test_round_trip_fused_qkv_is_bit_exact(checkpoint):
    cfg, sd, tmp = checkpoint
    assert convert_main(["--to-hf", str(tmp / "ck"), "--out", str(tmp / "back"), "--quiet"]) == 0
    back = load_file(tmp / "back" / "model.safetensors")
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].tobytes() == v.numpy().tobytes(), k
    model = jmoe.load(tmp / "back", dtype="bfloat16")
    bias = model.params[f"layer_{cfg['first_k_dense_replace']}"]["moe"]["expert_bias"]
    assert bias.dtype == np.float32  # the selection bias stays float32 in a bf16 model


def test_family_generation_defaults_and_preset():
    c = jmoe.LLADA2_MINI
    assert (c.num_layers, c.num_experts, c.n_group, c.topk_group, c.rotary_dim) == (20, 256, 8, 4, 64)
    assert c.moe_layers[0] == 1 and c.mask_token_id == 156895 and c.eos_token_id == 156892
    assert dict(c.generation) == {"block_length": 32, "steps": 32, "threshold": 0.95,
                                  "temperature": 0.0}
    with pytest.raises(ValueError, match="n_group=3"):
        c.replace(n_group=3)


# ---- router: NumPy oracle written from the spec ----

def router_oracle(logits, bias, k_i, k_max, n_group, topk_group, scale, normalize=True):
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    biased = scores + bias
    t, e = logits.shape
    ids = np.full((t, k_max), e)
    w = np.zeros((t, k_max))
    for tok in range(t):
        groups = biased[tok].reshape(n_group, -1)
        gscore = np.sort(groups, axis=1)[:, -2:].sum(1)
        keep = np.argsort(-gscore, kind="stable")[:topk_group]
        cand = [ex for ex in np.argsort(-biased[tok], kind="stable") if ex // (e // n_group) in keep]
        chosen = cand[: k_i[tok]]
        s = scores[tok, chosen]
        ids[tok, : len(chosen)] = chosen
        w[tok, : len(chosen)] = (s / s.sum() if normalize else s) * scale
    return ids, w


@pytest.mark.parametrize("seed", range(4))
def test_sigmoid_group_router_matches_oracle(seed):
    rng = np.random.default_rng(seed)
    t, e, n_group, topk_group, k_max = 13, 16, 4, 2, 5
    logits = rng.standard_normal((t, e)).astype(np.float32)
    bias = (0.3 * rng.standard_normal(e)).astype(np.float32)
    k_i = rng.integers(1, k_max + 1, t)
    r = routing.sigmoid_group_topk(logits, bias, bound=k_max, n_group=n_group,
                                   topk_group=topk_group, scaling=2.5, budget_T=k_i)
    ids, w = router_oracle(logits, bias, k_i, k_max, n_group, topk_group, 2.5)
    np.testing.assert_array_equal(np.asarray(r.expert_A).reshape(t, k_max), ids)
    np.testing.assert_allclose(np.asarray(r.weight_A).reshape(t, k_max), w, rtol=1e-5, atol=1e-7)
    # the bias steers selection only: with a huge bias on expert 0 it is always picked in a
    # kept group, but its weight is its unbiased score
    big = bias.copy()
    big[0] = 10.0
    r2 = routing.sigmoid_group_topk(logits, big, bound=k_max, n_group=n_group,
                                    topk_group=topk_group, scaling=1.0, normalize=False)
    first = np.asarray(r2.expert_A).reshape(t, k_max)[:, 0]
    assert (first == 0).all()
    np.testing.assert_allclose(np.asarray(r2.weight_A).reshape(t, k_max)[:, 0],
                               1 / (1 + np.exp(-logits[:, 0])), rtol=1e-6)


def test_llada2_budgets_keep_shared_expert(checkpoint):
    cfg, sd, tmp = checkpoint
    model = jmoe.load(tmp / "ck")
    tokens = np.random.default_rng(2).integers(0, 71, (1, 6))
    k = cfg["num_experts_per_tok"]
    full, _ = jmoe.forward(model, tokens, experts_per_token=np.full((1, 6), k))
    plain, _ = jmoe.forward(model, tokens)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(plain))
    one, aux = jmoe.forward(model, tokens, experts_per_token=np.ones((1, 6), int))
    assert int(aux["routed_pairs"]) == 6 * len(model.config.moe_layers)
    assert rel_err(one, plain) > 1e-4
