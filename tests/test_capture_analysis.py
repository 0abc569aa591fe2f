"""Router-logit capture, router statistics and the load-balancing loss.

References: capture is checked against each sequence's own unpadded forward
(padding removal, merge order); the statistics against hand-computed values;
the load-balancing loss against transformers' ``load_balancing_loss_func``.
"""

import types
import warnings

import jax
import numpy as np
import pytest

import jmoe
from jmoe import analysis

TINY = jmoe.OlmoeConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=8,
                        num_experts_per_tok=2)


@pytest.fixture(scope="module")
def model():
    # jitted init: one compile instead of op-by-op dispatch of every initializer
    return jmoe.Model(TINY, jax.jit(jmoe.init_params, static_argnums=(0, 1))(TINY, 1))


def own_logits(model, seqs):
    """Per-layer router logits of each sequence run alone (no padding), concatenated."""
    out = {0: [], 1: []}
    for s in seqs:
        _, aux = jmoe.forward(model, np.asarray(s)[None], capture_router_logits=True)
        for layer in out:
            out[layer].append(np.asarray(aux["router_logits"])[layer, 0])
    return {k: np.concatenate(v) for k, v in out.items()}


def test_get_router_logits_removes_padding_and_merges(model):
    rng = np.random.default_rng(0)
    # two lengths and one padded batch shape [2, 8] keep the compiled shapes few
    seqs = [rng.integers(0, 97, n).tolist() for n in (5, 8, 8, 5)]
    batch_a = {"input_ids": np.array([[0, 0, 0] + seqs[0], seqs[1]]),
               "attention_mask": np.array([[0] * 3 + [1] * 5, [1] * 8])}
    batch_b = seqs[2:]  # token-id lists of different lengths
    got = jmoe.get_router_logits(model, [batch_a, batch_b])
    want = own_logits(model, seqs)
    assert sorted(got) == [0, 1]
    for layer in (0, 1):
        assert got[layer].dtype == np.float32 and got[layer].shape == (26, 8)
        np.testing.assert_allclose(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    only = jmoe.get_router_logits(model, np.asarray(seqs[1])[None], layers=[1])
    assert list(only) == [1]
    np.testing.assert_allclose(only[1], want[1][5:13], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"layers \[5\] are not MoE layers"):
        jmoe.get_router_logits(model, [seqs[0]], layers=[5])


class CharTokenizer:
    def encode(self, text):
        return [ord(c) % 97 for c in text]


def test_get_router_logits_from_texts(model):
    m = model.replace(tokenizer=CharTokenizer())
    texts = ["hello", "abcdefgh", "a text"]  # batches [2, 8] and [1, 8], as above
    got = jmoe.get_router_logits(m, texts, batch_size=2)
    want = own_logits(model, [CharTokenizer().encode(t) for t in texts])
    for layer in (0, 1):
        np.testing.assert_allclose(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokenizer"):
        jmoe.get_router_logits(model, texts)


def test_no_moe_layers_gives_empty_and_warning():
    dense = jmoe.Model(types.SimpleNamespace(moe_layers=(), num_experts=0), params={})
    with pytest.warns(UserWarning, match="no MoE layers"):
        assert jmoe.get_router_logits(dense, [[1, 2, 3]]) == {}


def test_forward_capture_matches_topk_oracle(model):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 97, (2, 8))
    _, aux = jmoe.forward(model, tokens, capture_router_logits=True)
    logits = np.asarray(aux["router_logits"], np.float64)
    assert aux["router_logits"].dtype == np.float32 and logits.shape == (2, 2, 8, 8)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-logits, axis=-1, kind="stable")[..., :2]
    np.testing.assert_array_equal(np.asarray(aux["expert_ids"]), top)
    np.testing.assert_allclose(np.asarray(aux["expert_weights"]),
                               np.take_along_axis(p, top, -1), rtol=1e-5)
    counts = np.stack([np.bincount(top[i].reshape(-1), minlength=8) for i in range(2)])
    np.testing.assert_array_equal(np.asarray(aux["expert_counts"]), counts)


def test_load_balancing_loss_matches_transformers(model):
    torch = pytest.importorskip("torch")
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 97, (3, 7))
    mask = np.ones((3, 7), np.int64)
    mask[0, :2] = 0
    mask[2, :5] = 0
    _, aux = jmoe.forward(model, tokens, attention_mask=mask, capture_router_logits=True)
    gate = tuple(torch.from_numpy(np.array(aux["router_logits"][i]).reshape(21, 8))
                 for i in range(2))
    want = load_balancing_loss_func(gate, 8, 2, torch.from_numpy(mask)).item()
    np.testing.assert_allclose(float(aux["load_balancing_loss"]), want, rtol=1e-5)


def test_analyze_expert_usage_by_hand():
    # 4 tokens x 4 experts, top-1: experts 0,0,1,2 -> counts [2, 1, 1, 0]
    logits = np.full((4, 4), -10.0, np.float32)
    logits[[0, 1, 2, 3], [0, 0, 1, 2]] = 10.0
    uniform = np.zeros((5, 4), np.float32)  # all ties: top-2 is experts 0 and 1
    stats = analysis.analyze_expert_usage({3: logits, 7: uniform}, top_k=1)
    s = stats[3]
    assert s["counts"].tolist() == [2, 1, 1, 0] and s["num_tokens"] == 4
    assert s["max_over_mean"] == pytest.approx(2.0)  # max 2, mean 1
    assert s["cv"] == pytest.approx(np.sqrt(0.5))  # population std of [2,1,1,0] / mean 1
    assert s["usage_entropy"] == pytest.approx(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)))
    assert s["entropy"] < 1e-6  # each token is (almost) one-hot
    u = stats[7]
    assert u["entropy"] == pytest.approx(np.log(4)) and u["counts"].tolist() == [5, 0, 0, 0]
    two = analysis.analyze_expert_usage({0: uniform}, top_k=2)[0]
    assert two["counts"].tolist() == [5, 5, 0, 0] and two["fraction"].sum() == pytest.approx(1)
    with pytest.raises(ValueError, match="top_k=5"):
        analysis.analyze_expert_usage({0: uniform}, top_k=5)


def test_print_router_summary(model, capsys):
    logits = jmoe.get_router_logits(model, [[1, 2, 3, 4, 5, 6, 7, 8]])
    text = analysis.print_router_summary(logits)
    assert capsys.readouterr().out.strip() == text
    assert text.splitlines() == ["Layer 0: 8 tokens x 8 experts, float32, cpu",
                                 "Layer 1: 8 tokens x 8 experts, float32, cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        line = analysis.print_router_summary({0: logits[0]}, top_k=2)
    assert line.startswith("Layer 0: 8 tokens x 8 experts, float32, cpu, top-2 load max/mean")


def test_get_routing_ids_give_the_softmax_topk_statistics(model):
    # OLMoE routes by softmax top-k: the captured ids and the rule applied to the raw
    # logits give the same statistics
    batch = {"input_ids": np.arange(16).reshape(2, 8),
             "attention_mask": np.array([[0] * 3 + [1] * 5, [1] * 8])}
    routing = jmoe.capture.get_routing(model, batch)
    logits = jmoe.get_router_logits(model, batch)
    assert sorted(routing) == [0, 1]
    by_ids = analysis.analyze_expert_usage(routing)
    by_rule = analysis.analyze_expert_usage(logits, top_k=2)
    for layer in (0, 1):
        np.testing.assert_array_equal(routing[layer][0], logits[layer])
        assert routing[layer][1].shape == (13, 2)
        for name in ("counts", "fraction", "entropy", "cv", "usage_entropy"):
            np.testing.assert_allclose(by_ids[layer][name], by_rule[layer][name])
    line = analysis.print_router_summary({0: routing[0]})
    assert line.startswith("Layer 0: 13 tokens x 8 experts, float32, cpu, routed load max/mean")
