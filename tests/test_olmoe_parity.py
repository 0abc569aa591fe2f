"""jmoe's OLMoE against transformers' OlmoeForCausalLM on tiny random checkpoints.

Each checkpoint goes through the real conversion CLI path (``checkpoints_convert``'s
``main``) and ``jmoe.load``; float32 logits must match torch's within 1e-4 of the
logit scale.
"""

import numpy as np
import pytest
import torch

import jmoe
from checkpoints_convert.cli import main as convert_main

RTOL = 1e-4  # float32: max |diff| relative to the largest |logit|

CONFIGS = {
    "gqa_raw_topk": dict(),
    "norm_topk_full_kv_clip": dict(norm_topk_prob=True, num_key_value_heads=4, clip_qkv=0.4),
    "odd_sizes_tied": dict(vocab_size=61, hidden_size=40, num_attention_heads=5,
                           num_key_value_heads=1, intermediate_size=12, num_experts=5,
                           num_experts_per_tok=3, num_hidden_layers=3, tie_word_embeddings=True),
}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def convert(hf_dir, out, **overrides):
    assert convert_main(["--hf-dir", str(hf_dir), "--out", str(out), "--quiet"]) == 0
    return jmoe.load(out, **overrides)


def torch_logits(model, tokens, **kw):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens)), **kw).logits.numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_causal_logits_match_transformers(hf_olmoe, tmp_path, name):
    hf_dir, tm = hf_olmoe(**CONFIGS[name])
    model = convert(hf_dir, tmp_path / "ck")
    tokens = np.random.default_rng(0).integers(0, tm.config.vocab_size, (2, 11))
    logits, _ = jmoe.forward(model, tokens)
    assert rel_err(logits, torch_logits(tm, tokens)) < RTOL


@pytest.mark.parametrize("name", ["gqa_raw_topk", "norm_topk_full_kv_clip"])
def test_bidirectional_matches_full_attention_mask(hf_olmoe, tmp_path, name):
    hf_dir, tm = hf_olmoe(**CONFIGS[name])
    model = convert(hf_dir, tmp_path / "ck", causal=False)
    assert model.config.causal is False
    tokens = np.random.default_rng(1).integers(0, tm.config.vocab_size, (2, 9))
    logits, _ = jmoe.forward(model, tokens)
    full = torch.zeros(2, 1, 9, 9)  # a 4-D additive mask of zeros: every position sees all
    ref = torch_logits(tm, tokens, attention_mask=full)
    assert rel_err(logits, ref) < RTOL
    # and it is really a different function from the causal one
    causal, _ = jmoe.forward(model.replace(config=model.config.replace(causal=True)), tokens)
    assert rel_err(causal, ref) > 1e-2


@pytest.mark.parametrize("causal", [True, False])
def test_left_padded_batch_equals_each_row_alone(hf_olmoe, tmp_path, causal):
    hf_dir, tm = hf_olmoe()
    model = convert(hf_dir, tmp_path / "ck", causal=causal)
    rng = np.random.default_rng(2)
    lengths = [10, 6, 3]
    rows = [rng.integers(2, 97, n) for n in lengths]
    width = max(lengths)
    tokens = np.full((3, width), 1)
    mask = np.zeros((3, width), int)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    logits, _ = jmoe.forward(model, tokens, attention_mask=mask)
    for i, r in enumerate(rows):
        kw = {} if causal else {"attention_mask": torch.zeros(1, 1, len(r), len(r))}
        ref = torch_logits(tm, r[None], **kw)[0]
        assert rel_err(logits[i, width - len(r):], ref) < RTOL


def test_load_reads_hf_folder_directly(hf_olmoe):
    hf_dir, tm = hf_olmoe(norm_topk_prob=True)
    model = jmoe.load(hf_dir)
    tokens = np.arange(12).reshape(2, 6) + 5
    logits, _ = jmoe.forward(model, tokens)
    assert rel_err(logits, torch_logits(tm, tokens)) < RTOL


def test_load_balancing_loss_matches_transformers(hf_olmoe):
    hf_dir, tm = hf_olmoe(num_experts=6, num_experts_per_tok=3)
    model = jmoe.load(hf_dir)
    tokens = np.random.default_rng(3).integers(0, 97, (2, 8))
    _, aux = jmoe.forward(model, tokens)
    with torch.no_grad():
        out = tm(torch.as_tensor(tokens), output_router_logits=True)
    ref = out.aux_loss.item()  # transformers reports it before the coefficient
    np.testing.assert_allclose(float(aux["load_balancing_loss"]), ref, rtol=1e-5)


def test_bfloat16_load_stays_close(hf_olmoe):
    hf_dir, tm = hf_olmoe()
    model = jmoe.load(hf_dir, dtype="bfloat16")
    leaf = model.params["layer_0"]["moe"]["w_gate"]
    assert leaf.dtype == jax_bf16()
    tokens = np.arange(16).reshape(2, 8) + 4
    logits, _ = jmoe.forward(model, tokens)
    assert logits.dtype == np.float32
    # bf16 has ~3 significant digits; routing may flip on near ties, so only a loose check
    assert rel_err(logits, torch_logits(tm, tokens)) < 0.1


def jax_bf16():
    import jax.numpy as jnp

    return jnp.bfloat16
