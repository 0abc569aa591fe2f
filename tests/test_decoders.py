"""The decoders (issue 15) against plain loops written from their published rules.

- dInfer's credit and hierarchy decoders (``CreditThresholdParallelDecoder``,
  ``HierarchyDecoder``): ``sampler_reference.reference_generate`` (LLaDA's loop) with
  ``credit_fuse`` / ``hierarchy_select``, on the same model calls and random draws.
- LLaDA2.1's joint threshold decoding: ``llada21_generate`` below, LLaDA2.1's
  ``generate`` (M2T above ``threshold``, at least one; T2T edits above
  ``edit_threshold``; ``max_post_steps`` edit-only steps; a step without edit settles
  the block), one prompt at a time on the PyTorch LLaDA2 reference model of a tiny
  random folder saved like LLaDA2.1-mini's.
- Top-k / top-p filters and the tempered confidence against NumPy; bad values refused
  in one line.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jmoe
from jmoe.sampling import decoders, generate
from jmoe.sampling.options import resolve_options

import llada2_reference as ref
from sampler_reference import _exponential, _position_draws, _softmax, filter_keep
from sampler_reference import reference_generate
from test_sampler import CONFIG, EOS, MASK, PAD, ROWS, model  # noqa: F401  (the fixture)


# ---------------------------------------------------------------- dInfer's decoders (llada)

DINFER_CASES = {
    "credit_greedy": dict(decoder="credit", threshold=0.6),
    "credit_sampled_top_k": dict(decoder="credit", threshold=0.5, temperature=0.8, top_k=5,
                                 seed=2, credit_alpha=1.5, credit_boost=0.5, credit_decay=0.6),
    "hierarchy_greedy": dict(decoder="hierarchy", low_threshold=0.3),
    "hierarchy_high_top_p": dict(decoder="hierarchy", low_threshold=0.2, threshold=0.7,
                                 temperature=0.6, top_p=0.8, seed=5),
    "threshold_top_k_top_p": dict(decoder="threshold", threshold=0.5, temperature=1.0,
                                  top_k=6, top_p=0.9, seed=4),
}


@pytest.mark.parametrize("name", list(DINFER_CASES))
def test_dinfer_decoders_match_reference(model, name):  # noqa: F811
    kw = dict(DINFER_CASES[name], gen_length=16, block_length=8, steps=8)
    out = generate(model, ROWS, mask_id=MASK, eos_id=EOS, return_trace=True, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "decoder" or v != "threshold"}
    want = reference_generate(model, ROWS, mask_id=MASK, eos_id=EOS, pad_id=PAD, **ref_kw)
    np.testing.assert_array_equal(out.tokens, want["tokens"])
    assert out.nfe == want["nfe"]
    np.testing.assert_array_equal(out.trace["committed"], want["trace"]["committed"])
    # the decoder decided: parallel commits happened and blocks emptied early
    assert out.trace["committed"].sum(-1).max() > 1
    assert out.nfe < 16


def test_credit_changes_commits(model):  # noqa: F811
    # the credit must matter: a strong credit commits differently from plain threshold
    kw = dict(gen_length=16, block_length=8, steps=8, threshold=0.6, mask_id=MASK,
              eos_id=EOS, return_trace=True)
    plain = generate(model, ROWS, decoder="threshold", **kw)
    credit = generate(model, ROWS, decoder="credit", credit_alpha=3.0, credit_boost=0.0,
                      **kw)
    assert credit.nfe < plain.nfe


# ---------------------------------------------------------------- LLaDA2.1 joint (llada2)

L21_MASK, L21_EOS, BLOCK = 70, 69, 4
L21_GENERATION = {"gen_length": 10, "block_length": BLOCK, "steps": BLOCK, "threshold": 0.7,
                  "editing_threshold": 0.5, "max_post_steps": 3, "temperature": 0.0}
L21_PROMPTS = {"fills_blocks": [5, 17, 42, 8, 9, 60, 11, 3],  # P = 8: whole blocks
               "prompt_tail_in_block": [23, 7, 4, 50, 2, 31]}  # P = 6: a block with its tail


@pytest.fixture(scope="module")
def llada21_folder(tmp_path_factory):
    """A tiny random HF folder saved as LLaDA2.1-mini's: model_type llada2_moe, the
    LLaDA2.1 architecture name, a generation config with LLaDA2.1's decoding keys."""
    folder = tmp_path_factory.mktemp("llada21") / "hf"
    sd = ref.random_checkpoint(ref.TINY, seed=5)
    sd["lm_head.weight"] = sd["lm_head.weight"] * 4  # confidences reach the thresholds
    sd["lm_head.weight"][L21_EOS] = sd["lm_head.weight"][L21_EOS] * 2.5
    cfg = dict(ref.TINY, architectures=["LLaDA2MoeModelLM"],
               auto_map={"AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"})
    ref.write_checkpoint(folder, cfg, sd)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(L21_GENERATION, f)
    return sd, folder


@pytest.fixture(scope="module")
def llada21(llada21_folder):
    sd, folder = llada21_folder
    return sd, jmoe.load(folder, moe_backend="dense")


def test_llada21_folder_loads(llada21_folder, caplog):
    _, folder = llada21_folder
    with caplog.at_level(logging.WARNING, logger="jmoe"):
        m = jmoe.load(folder, moe_backend="dense")
    assert "cannot honour" not in caplog.text  # LLaDA2.1's decoding keys are jmoe's
    assert m.config.family == "llada2"
    gen = m.config.generation
    assert gen["edit_threshold"] == 0.5 and gen["max_post_steps"] == 3
    opts, knobs = resolve_options(m.config, decoder="joint")
    assert opts.decoder == decoders.Joint(max_post_steps=3)
    assert float(knobs["edit_threshold"]) == 0.5 and float(knobs["threshold"]) == np.float32(0.7)
    assert opts.threshold_floor == "one" and opts.convention.name == "llada2"


def llada21_generate(sd, prompt, *, gen_length, block_length, threshold, edit_threshold,
                     max_post_steps, temperature=0.0, top_k=None, top_p=None, seed=0):
    """LLaDA2.1's generate for one prompt, jmoe's random stream: (answer ids, calls, edits)."""
    p = len(prompt)
    nb = -(-(p + gen_length) // block_length)
    total = nb * block_length
    first = p // block_length  # the loop's region starts at the prompt tail's block
    mask4d, pos = ref.block_mask(total, block_length), torch.arange(total)[None]
    x = np.full(total, L21_MASK)
    x[:p] = prompt
    key = jax.random.key(seed)
    nfe = edits = 0
    for blk in range(first, nb):
        lo, end = blk * block_length, (blk + 1) * block_length
        in_prompt = np.arange(lo, end) < p
        post = 0
        while True:
            old = x[lo:end].copy()
            active = old == L21_MASK
            if not active.any():
                post += 1
            if post > max_post_steps:
                break
            with torch.no_grad():
                lg = ref.forward(sd, ref.TINY, torch.as_tensor(x[None, :end]),
                                 mask4d[:, :, :end, :end], pos[:, :end])[0, lo:end]
            lg = lg.double().numpy()
            lg[:, L21_MASK] = -np.inf
            k_noise, _ = jax.random.split(jax.random.fold_in(key, nfe))
            nfe += 1
            if temperature > 0:
                e = _position_draws(k_noise, 0, lambda k: _exponential(k, lg.shape[-1]),
                                    range(lo - first * block_length, end - first * block_length))
                keep = filter_keep(lg, temperature, top_k, top_p)
                x0 = np.argmax(np.where(keep, np.exp(lg) / e ** temperature, -1.0), -1)
                probs = _softmax(np.where(keep, lg / temperature, -np.inf))
            else:
                x0, probs = lg.argmax(-1), _softmax(lg)
            conf = probs[np.arange(block_length), x0]
            m2t = np.zeros(block_length, bool)
            if active.any():
                mconf = np.where(active, conf, -np.inf)
                m2t = mconf > threshold
                if m2t.sum() < 1:
                    m2t[np.argmax(mconf)] = True
            t2t = ~active & ~in_prompt & (conf > edit_threshold) & (x0 != old)
            edits += int(t2t.sum())
            x[lo:end] = np.where(m2t | t2t, x0, old)
            if not active.any() and not t2t.any():
                break
        gen = x[p:end]
        if (gen == L21_EOS).any() and not (gen == L21_MASK).any():
            break
    answer = x[p:p + gen_length].tolist()
    if L21_EOS in answer:
        answer = answer[:answer.index(L21_EOS) + 1]
    return answer, nfe, edits


def _answer(row, p, gen_length):
    ids = list(row[p:p + gen_length])
    return ids[:ids.index(L21_EOS) + 1] if L21_EOS in ids else ids


JOINT_CASES = {
    "q_mode": dict(threshold=0.7, edit_threshold=0.5, max_post_steps=3),
    "s_mode": dict(threshold=0.5, edit_threshold=0.0, max_post_steps=3),
    "sampled_top_k_top_p": dict(threshold=0.6, edit_threshold=0.3, max_post_steps=3,
                                temperature=0.7, top_k=8, top_p=0.95, seed=3),
}


@pytest.mark.parametrize("name", list(JOINT_CASES))
def test_joint_matches_llada21_generate(llada21, name):
    sd, m = llada21
    kw = JOINT_CASES[name]
    total_edits = 0
    for pname, prompt in L21_PROMPTS.items():
        want, nfe, edits = llada21_generate(sd, prompt, gen_length=10, block_length=BLOCK, **kw)
        total_edits += edits
        # cached and uncached (max_post_steps is static: the modes share compilations)
        for cache in (False, True) if name != "sampled_top_k_top_p" else (True,):
            out = generate(m, [prompt], decoder="joint", cache=cache, **kw)
            assert _answer(out.tokens[0], len(prompt), 10) == want, (pname, cache)
            assert out.nfe == nfe, (pname, cache)
    assert total_edits > 0  # token-to-token edits were exercised


def test_joint_batch_rows_equal_each_alone(llada21):
    _, m = llada21
    kw = dict(decoder="joint", threshold=0.5, edit_threshold=0.0, max_post_steps=3)
    rows = list(L21_PROMPTS.values())
    both = generate(m, rows, **kw)
    for i, prompt in enumerate(rows):  # rows right-aligned: the last 10 columns generated
        alone = generate(m, [prompt], **kw)
        np.testing.assert_array_equal(both.tokens[i, -10:], alone.tokens[0, -10:])


@pytest.mark.parametrize("decoder", ["credit", "hierarchy"])
def test_dinfer_decoders_llada2_cached_and_batched(llada21, decoder):
    # under llada2 the decoders run on the exact K/V cache and per-row gating: cached
    # equals uncached (sampled too), and a batch of mixed prompt lengths equals each row
    # alone (greedy: a row's random stream is keyed by the batch's model calls)
    _, m = llada21
    kw = dict(decoder=decoder, threshold=0.6, temperature=0.5, top_k=10, seed=1)
    rows = list(L21_PROMPTS.values())
    cached = generate(m, rows, cache=True, return_trace=True, **kw)
    assert cached.trace["committed"].sum(-1).max() > 1  # parallel commits
    np.testing.assert_array_equal(cached.tokens, generate(m, rows, cache=False, **kw).tokens)
    if decoder != "credit":  # the per-row credit decay is what batching could break
        return
    kw = dict(decoder=decoder, threshold=0.6)
    both = generate(m, rows, **kw)
    for i, prompt in enumerate(rows):
        alone = generate(m, [prompt], **kw)
        np.testing.assert_array_equal(both.tokens[i, -10:], alone.tokens[0, -10:])


# ---------------------------------------------------------------- filters and confidence

def test_top_k_top_p_filters_match_numpy():
    rng = np.random.default_rng(0)
    lg = rng.normal(size=(4, 7, 50)).astype(np.float32) * 3
    for k in (1, 3, 17):
        got = np.asarray(decoders.top_k_keep(jnp.asarray(lg), k))
        np.testing.assert_array_equal(got, lg >= np.sort(lg, -1)[..., -k][..., None])
        assert (got.sum(-1) == k).all()  # no ties in random logits
    for t, p in ((1.0, 0.5), (0.5, 0.9), (2.0, 0.3), (1.0, 1e-6)):
        got = np.asarray(decoders.top_p_keep(jnp.asarray(lg / t), p))
        want = np.stack([filter_keep(lg[i].astype(np.float64), t, None, p) for i in range(4)])
        np.testing.assert_array_equal(got, want)
    assert (np.asarray(decoders.top_p_keep(jnp.asarray(lg), 1e-6)).sum(-1) == 1).all()


def _opts(convention, **kw):
    cfg = CONFIG.replace(vocab_size=8, mask_token_id=7, eos_token_id=None, pad_token_id=0)
    return resolve_options(cfg, convention=convention, gen_length=4, cache=False, **kw)


@pytest.mark.parametrize("convention, want", [("llada2", np.exp(6) / (np.exp(6) + 6)),
                                              ("llada", np.exp(3) / (np.exp(3) + 6))])
def test_tempered_confidence(convention, want):
    # logits [3, 0, ..., 0] over 8 tokens, the mask (id 7) forbidden, T = 0.5: llada2
    # reports softmax(l / T) = 0.985 (LLaDA2's reference), llada softmax(l) = 0.770
    opts, knobs = _opts(convention, temperature=0.5)
    lg = jnp.zeros((1, 1, 8)).at[..., 0].set(3.0).at[..., 7].set(-jnp.inf)
    keys = jax.random.split(jax.random.key(0), 2)
    for s in range(20):  # whichever token is drawn, its tempered / raw probability
        nk, rk = (jax.random.fold_in(k, s)[None, None] for k in keys)
        x0, conf = decoders.sample_confidence(lg, nk, rk, knobs, opts)
        p_lg = np.array([3.0] + [0.0] * 6) / (0.5 if convention == "llada2" else 1.0)
        p = np.exp(p_lg) / np.exp(p_lg).sum()
        np.testing.assert_allclose(float(conf[0, 0]), p[int(x0[0, 0])], rtol=1e-6)
        if int(x0[0, 0]) == 0:
            np.testing.assert_allclose(float(conf[0, 0]), want, rtol=1e-6)


def test_threshold_at_equality():
    # conf exactly at the threshold: llada's rule commits (>=), llada2's and LLaDA2.1's
    # (>) and dInfer's hierarchy (>) do not; the floor then takes the top one only
    conf = jnp.array([[0.5, 0.25, 0.5, 0.125]])
    cand = jnp.ones((1, 4), bool)
    st = decoders.Step(x0=jnp.zeros((1, 4), jnp.int32), conf=conf, cand=cand,
                       gen=jnp.full((1, 4), 7), window=jnp.ones(4, bool),
                       fixed=jnp.zeros((1, 4), bool), sched=jnp.ones(1, jnp.int32),
                       active=jnp.ones(1, bool))
    got = {}
    for conv, name, extra in (("llada", "threshold", {}), ("llada2", "threshold", {}),
                              ("llada2", "joint", {}), ("llada", "credit", {}),
                              ("llada", "hierarchy", dict(low_threshold=0.5))):
        opts, knobs = _opts(conv, decoder=name, threshold=0.5, threshold_floor="one", **extra)
        d = decoders.of(opts)
        commit, _, _ = d.select(st, knobs, opts, d.init_carry(1, 4, 8))
        got[(conv, name)] = np.asarray(commit[0]).tolist()
    assert got[("llada", "threshold")] == [True, False, True, False]
    assert got[("llada", "credit")] == [True, False, True, False]
    assert got[("llada2", "threshold")] == [True, False, False, False]
    assert got[("llada2", "joint")] == [True, False, False, False]
    # the run's maxima 0.5 are not > low_threshold 0.5: only the global top one
    assert got[("llada", "hierarchy")] == [True, False, False, False]


@pytest.mark.parametrize("kw, match", [
    (dict(decoder="greedy"), r"decoder='greedy': expected one of"),
    (dict(decoder="fixed", threshold=0.9), r"threshold=0.9 with decoder='fixed'"),
    (dict(decoder="threshold", edit_threshold=0.5), r"edit_threshold=0.5 is an option of "
                                                    r"decoder='joint'"),
    (dict(low_threshold=0.2), r"low_threshold=0.2 is an option of decoder='hierarchy'"),
    (dict(decoder="hierarchy", low_threshold=1.5), r"low_threshold=1.5: expected a number"),
    (dict(decoder="joint", edit_threshold=-0.1), r"edit_threshold=-0.1: expected"),
    (dict(decoder="joint", max_post_steps=-1), r"max_post_steps=-1: expected an int >= 0"),
    (dict(decoder="joint", max_post_steps=2.0), r"max_post_steps=2.0: expected an int"),
    (dict(decoder="credit", credit_decay=1.2), r"credit_decay=1.2: expected"),
    (dict(decoder="credit", credit_alpha=float("nan")), r"credit_alpha=nan: expected"),
    (dict(decoder="joint", remasking="random"), r"remasking='random' with decoder='joint'"),
    (dict(top_k=0), r"top_k=0: expected a positive int or None"),
    (dict(top_k=2.5), r"top_k=2.5: expected a positive int"),
    (dict(top_p=0.0), r"top_p=0.0: expected a probability in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5: expected"),
])
def test_bad_values_refused_in_one_line(model, kw, match):  # noqa: F811
    with pytest.raises(ValueError, match=match) as e:
        generate(model, ROWS[:1], gen_length=8, mask_id=MASK, **kw)
    assert "\n" not in str(e.value)
