"""Router capture and statistics of a family with dense first layers, an expert bias
and a group limit (LLaDA2), issue 14 (c) and (g).

References: the router logits against the PyTorch LLaDA2 reference
(tests/llada2_reference.py, run layer by layer on the same converted checkpoint);
the experts used against a NumPy oracle of the sigmoid group-limited routing with
bias, written from ``jmoe.routing.sigmoid_group_topk``'s spec; the entropy against
the normalised sigmoid scores computed here.
"""

import numpy as np
import pytest
import torch

import jmoe
from checkpoints_convert.cli import main as convert_main
from jmoe import analysis

import llada2_reference as ref

CFG = ref.TINY  # 3 layers, the first dense: MoE layers 1 and 2; E=8 in 4 groups, k=3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing_stats")
    sd = ref.random_checkpoint(CFG, seed=4)
    for i in (1, 2):  # a bias large enough to change which experts win
        sd[f"model.layers.{i}.mlp.gate.expert_bias"] = torch.linspace(-0.3, 0.3, 8).roll(i)
    ref.write_checkpoint(tmp / "hf", CFG, sd)
    assert convert_main(["--hf-dir", str(tmp / "hf"), "--out", str(tmp / "ck"), "--quiet"]) == 0
    return sd, jmoe.load(tmp / "ck", moe_backend="dense")


def reference_router_logits(sd, ids):
    """``{layer: [L, E]}`` router logits of one unpadded sequence, the reference's layers."""
    x = sd["model.word_embeddings.weight"][torch.as_tensor(ids)][None]
    n, eps = len(ids), CFG["rms_norm_eps"]
    mask4d, pos = torch.zeros(1, 1, n, n), torch.arange(n)[None]
    out = {}
    with torch.no_grad():
        for i in range(CFG["num_hidden_layers"]):
            pre = f"model.layers.{i}"
            h = ref.rms(x, sd[f"{pre}.input_layernorm.weight"], eps)
            x = x + ref.attention(sd, pre, h, mask4d, pos, CFG)
            hs = ref.rms(x, sd[f"{pre}.post_attention_layernorm.weight"], eps)
            if i < CFG["first_k_dense_replace"]:
                x = x + ref.mlp(sd, f"{pre}.mlp", hs)
            else:
                out[i] = (hs[0] @ sd[f"{pre}.mlp.gate.weight"].T).numpy()
                x = x + ref.moe(sd, pre, hs, CFG)
    return out


def oracle_expert_ids(logits_NE, bias_E, *, n_group, topk_group, k):
    """LLaDA2 token choice in float64: rank ``sigmoid(x) + bias``; only experts of the
    ``topk_group`` groups with the largest sum of their two best biased scores compete;
    the k best competitors, ties to the lower index."""
    n, e = logits_NE.shape
    biased = 1.0 / (1.0 + np.exp(-logits_NE.astype(np.float64))) + np.asarray(bias_E, np.float64)
    group_score = np.sort(biased.reshape(n, n_group, e // n_group), -1)[..., -2:].sum(-1)
    kept = np.argsort(-group_score, -1, kind="stable")[:, :topk_group]
    live = np.zeros((n, n_group), bool)
    np.put_along_axis(live, kept, True, -1)
    masked = np.where(np.repeat(live, e // n_group, -1), biased, -np.inf)
    return np.argsort(-masked, -1, kind="stable")[:, :k]


def batch():
    """2 rows of 12 tokens, the second left-padded by 3."""
    rng = np.random.default_rng(7)
    mask = np.ones((2, 12), np.int32)
    mask[1, :3] = 0
    return {"input_ids": rng.integers(0, 69, (2, 12)), "attention_mask": mask}


def test_router_logits_keys_values_and_layer_selection(checkpoint):
    sd, model = checkpoint
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 69, 10).tolist(), rng.integers(0, 69, 7).tolist()]
    got = jmoe.get_router_logits(model, seqs)  # right-padded to [2, 16]
    assert sorted(got) == [1, 2]  # MoE layer ids, after the dense layer 0
    want = [reference_router_logits(sd, s) for s in seqs]
    for layer in (1, 2):
        w = np.concatenate([r[layer] for r in want])
        assert got[layer].shape == (17, 8)
        np.testing.assert_allclose(got[layer], w, rtol=1e-4, atol=1e-4)
    only = jmoe.get_router_logits(model, seqs, layers=[2])
    assert list(only) == [2]
    np.testing.assert_array_equal(only[2], got[2])
    with pytest.raises(ValueError, match=r"layers \[0\] are not MoE layers"):
        jmoe.get_router_logits(model, seqs, layers=[0])


def test_usage_counts_are_the_routing_used(checkpoint):
    sd, model = checkpoint
    routing = jmoe.capture.get_routing(model, batch())
    assert sorted(routing) == [1, 2]
    stats = analysis.analyze_expert_usage(routing, router=model.config.router)
    old_rule = analysis.analyze_expert_usage({i: lg for i, (lg, _) in routing.items()}, 3)
    differs = False
    for layer, (logits, ids) in routing.items():
        assert logits.shape == (21, 8) and ids.shape == (21, 3)
        bias = sd[f"model.layers.{layer}.mlp.gate.expert_bias"].numpy()
        want = oracle_expert_ids(logits, bias, n_group=4, topk_group=2, k=3)
        np.testing.assert_array_equal(ids, want)
        counts = np.bincount(want.reshape(-1), minlength=8)
        np.testing.assert_array_equal(stats[layer]["counts"], counts)
        np.testing.assert_allclose(stats[layer]["fraction"], counts / 63)
        s = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        p = s / s.sum(-1, keepdims=True)
        assert stats[layer]["entropy"] == pytest.approx(-(p * np.log(p)).sum(-1).mean())
        differs |= not np.array_equal(old_rule[layer]["counts"], counts)
    assert differs  # softmax top-k of the raw logits is not this family's routing
    with pytest.raises(ValueError, match="get_routing"):
        analysis.analyze_expert_usage({1: routing[1][0]}, 3, router="sigmoid_group_topk")
    with pytest.raises(ValueError, match="top_k=3 with expert ids"):
        analysis.analyze_expert_usage(routing, 3, router="sigmoid_group_topk")


def test_routing_with_another_top_k(checkpoint):
    sd, model = checkpoint
    routing = jmoe.capture.get_routing(model, batch(), layers=[2], experts_per_token=2)
    logits, ids = routing[2]
    bias = sd["model.layers.2.mlp.gate.expert_bias"].numpy()
    np.testing.assert_array_equal(
        ids, oracle_expert_ids(logits, bias, n_group=4, topk_group=2, k=2))
    with pytest.raises(ValueError, match="experts_per_token"):
        jmoe.capture.get_routing(model, batch(), experts_per_token=np.ones((2, 12), int))
