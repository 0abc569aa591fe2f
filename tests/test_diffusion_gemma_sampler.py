"""DiffusionGemma's sampler (``convention="diffusion_gemma"``, ``entropy_bound``) against
references written from transformers' ``generation_diffusion_gemma.py``.

Two references, both independent of the code under test:

- transformers' own rule classes (``LinearTemperatureScheduleLogitsProcessor``,
  ``EntropyBoundSampler``, ``StableAndConfidentStoppingCriteria``: plain torch, no
  model) on the same logits: the temperature schedule, acceptance and stopping;
- a plain Python/NumPy loop of the published ``generate``
  (``diffusion_gemma_reference``) on a fake model of the model/sampler contract
  (``dgemma_fake``: deterministic, peaked, position-dependent logits of the cache, the
  canvas and the self-conditioning logits), fed the same random draws: tokens, steps
  per canvas, model calls, renoise counts and adaptive budgets equal exactly.

The PyPI ``gemma`` package (3.3.0) has no diffusion module, so there is no second,
JAX reference for the rules. The real model arrives with the model branch; these
tests need only the contract.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import jmoe
from jmoe.sampling import entropy_bound as eb
from jmoe.sampling.options import resolve_options

import dgemma_fake as fake
import diffusion_gemma_reference as ref
from transformers.models.diffusion_gemma import generation_diffusion_gemma as hf_gen


@pytest.fixture
def model(monkeypatch):
    fake.install(monkeypatch)
    cfg = fake.make_config()
    return fake.FakeModel(cfg, fake.make_params(cfg))


# ---------------------------------------------------------------- rules vs transformers

def test_temperature_schedule_equals_transformers():
    n_steps, t_min, t_max = 7, 0.4, 0.8
    proc = hf_gen.LinearTemperatureScheduleLogitsProcessor(t_min, t_max, n_steps)
    scores = torch.ones(1, 3)
    # the reference loop's cur_step runs N .. 1; the library's step 0 .. N - 1
    for step, cur in enumerate(range(n_steps, 0, -1)):
        want = float(1.0 / proc(None, scores, torch.tensor(cur, dtype=torch.int32))[0, 0])
        got = float(eb.temperature(step, n_steps, np.float32(t_min), np.float32(t_max)))
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got > t_min  # the last step is one step above t_min


@pytest.mark.parametrize("bound", [0.1, 0.5, 3.0])
def test_acceptance_equals_transformers(bound):
    rng = np.random.default_rng(int(bound * 10))
    logits = rng.normal(size=(3, 16, 11)) * rng.uniform(0.5, 8.0, size=(3, 16, 1))
    sampler = hf_gen.EntropyBoundSampler(hf_gen.EntropyBoundSamplerConfig(entropy_bound=bound),
                                         canvas_length=16, vocab_size=11, max_denoising_steps=4)
    cur = torch.zeros(3, 16, dtype=torch.long)
    den = torch.ones(3, 16, dtype=torch.long)
    accepted = sampler.accept_canvas(cur, den, torch.tensor(logits, dtype=torch.float32), 1)
    want = sampler.accepted_token_mask.numpy()
    assert (accepted.numpy() == want).all()
    h = eb.entropy(np.float32(logits))
    got = np.asarray(eb.accept(h, np.ones((3, 16), bool), np.float32(bound)))
    np.testing.assert_array_equal(got, want)
    assert got.any(-1).all()  # at least one per row
    # candidates only: a row's non-candidates are never accepted nor counted
    cand = rng.uniform(size=(3, 16)) < 0.5
    cand[:, 0] = True
    got = np.asarray(eb.accept(h, cand, np.float32(bound)))
    sub = [hf_gen.EntropyBoundSampler(hf_gen.EntropyBoundSamplerConfig(entropy_bound=bound),
                                      int(c.sum()), 11, 4) for c in cand]
    for i, s in enumerate(sub):
        lg = torch.tensor(logits[i][cand[i]][None], dtype=torch.float32)
        s.accept_canvas(cur[:1, :cand[i].sum()], den[:1, :cand[i].sum()], lg, 1)
        np.testing.assert_array_equal(got[i][cand[i]], s.accepted_token_mask.numpy()[0])
        assert not got[i][~cand[i]].any()


@pytest.mark.parametrize("stability", [0, 1, 2])
def test_stopping_equals_transformers(stability):
    rng = np.random.default_rng(stability)
    crit = hf_gen.StableAndConfidentStoppingCriteria(stability, 0.3)
    hist = np.full((stability, 4, 6), -1, np.int32)
    canvases = [rng.integers(0, 3, size=(4, 6)) for _ in range(3)]
    for t in range(8):
        am = canvases[min(t // 3, 2)] if t % 2 else canvases[0]
        logits = rng.normal(size=(4, 6, 5)) * rng.choice([0.1, 30.0], size=(4, 1, 1))
        want = crit(torch.tensor(am), torch.tensor(logits, dtype=torch.float32)).numpy()
        got = np.asarray(eb.stopped(hist, np.int32(am), eb.entropy(np.float32(logits)),
                                    np.float32(0.3)))
        if stability:
            hist = np.concatenate([hist[1:], np.int32(am)[None]], 0)
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- the loop vs the reference

_LOGITS = jax.jit(fake.logits_of, static_argnums=(6,))  # the fake, as the reference calls it


def _both(model, prompts, **kw):
    opts = dict(gen_length=20, canvas_length=8, max_denoising_steps=10, entropy_bound=0.6,
                t_min=0.4, t_max=0.9, stability_threshold=1, confidence_threshold=0.3, seed=3)
    opts.update(kw)
    ad = opts.pop("adaptive", None)
    out = jmoe.generate(model, prompts, adaptive=ad, **opts)
    cfg = model.config
    want = ref.generate(
        _LOGITS, model.params, prompts, vocab=cfg.vocab_size,
        gen_length=opts["gen_length"], canvas_length=opts["canvas_length"],
        steps=opts["max_denoising_steps"], bound=opts["entropy_bound"], t_min=opts["t_min"],
        t_max=opts["t_max"], stability=opts["stability_threshold"],
        confidence=opts["confidence_threshold"], eos_id=cfg.eos_token_id,
        pad_id=cfg.pad_token_id, seed=opts["seed"], initial=ad.initial if ad else None,
        maximum=ad.maximum if ad else None)
    return out, want


@pytest.mark.parametrize("stability,seed", [(1, 3), (0, 5), (2, 7)])
def test_loop_equals_reference(model, stability, seed):
    """Three canvases of 8 (gen_length 20 rounded up), at most 10 steps each, three rows
    of different prompt lengths; adaptive budgets grow once per renoise."""
    ad = jmoe.AdaptiveExperts(initial=1, maximum=4, update_interval=1)
    prompts = [[5, 6, 7], [9], [4, 11, 3, 8, 1]]
    out, want = _both(model, prompts, stability_threshold=stability, seed=seed, adaptive=ad)
    np.testing.assert_array_equal(out.tokens, want["tokens"])
    np.testing.assert_array_equal(out.block_steps, want["steps"])
    assert out.nfe == want["nfe"]
    g = want["renoise"].shape[1]
    np.testing.assert_array_equal(out.remask_count[:, -g:], want["renoise"])
    np.testing.assert_array_equal(out.experts_per_token[:, -g:], want["budget"])
    # the cases the comparison covers: renoising, rows stopping at different steps of a
    # canvas, a canvas run to max_denoising_steps, a row ending at EOS
    steps = want["steps"]
    assert want["renoise"].sum() > 0 and (steps == 10).any()
    assert any(len(set(col[col > 0])) > 1 for col in steps.T)
    gen = out.tokens[:, -g:]
    ended = (gen == 2).any(-1)
    assert ended.any()
    for row, k in zip(gen[ended], np.nonzero(ended)[0]):
        first = int(np.argmax(row == 2))  # EOS kept, the pad id after it
        assert (row[first + 1:] == 0).all()
        assert (steps[k, first // 8 + 1:] == 0).all()  # no canvas after the EOS one
    assert out.tokens.shape == (3, 5 + 24)  # whole canvases, as transformers keeps them


def test_expert_sets_per_canvas(model):
    """``expert_set="first_step"``: each canvas's first denoising call picks the sets,
    its later calls reuse them."""
    fake.REFRESHES.clear()
    ad = jmoe.AdaptiveExperts(initial=2, maximum=4, experts_per_block=6,
                              expert_set="first_step")
    out = jmoe.generate(model, [[5, 6, 7]], gen_length=8, canvas_length=4,
                        max_denoising_steps=3, adaptive=ad, early_stop=False, seed=1)
    want = [s == 0 for n in out.block_steps[0] for s in range(n)]
    assert fake.REFRESHES == want and want.count(True) == 2


def test_generation_defaults_honoured(monkeypatch):
    fake.install(monkeypatch)
    gen = {"max_new_tokens": 12, "max_denoising_steps": 5, "t_min": 0.3, "t_max": 0.7,
           "stability_threshold": 2, "confidence_threshold": 0.05,
           "sampler_config": {"entropy_bound": 0.4, "_cls_name": "EntropyBoundSamplerConfig"}}
    cfg = fake.make_config(canvas_length=4, generation=gen)
    opts, knobs = resolve_options(cfg)
    assert (opts.gen_length, opts.block_length, opts.steps) == (12, 4, 5)
    assert opts.convention.name == "diffusion_gemma" and opts.cached and opts.mask_id is None
    assert opts.decoder.stability_threshold == 2
    for k, v in (("t_min", 0.3), ("t_max", 0.7), ("entropy_bound", 0.4),
                 ("confidence_threshold", 0.05)):
        assert float(knobs[k]) == pytest.approx(v)
    opts, knobs = resolve_options(cfg, gen_length=10, canvas_length=8,
                                                         t_max=0.9)
    assert (opts.gen_length, opts.block_length) == (16, 8)  # whole canvases
    assert float(knobs["t_max"]) == pytest.approx(0.9)
    opts, knobs = resolve_options(fake.make_config())
    assert (opts.gen_length, opts.block_length, opts.steps) == (256, 8, 48)
    assert float(knobs["entropy_bound"]) == pytest.approx(0.1)


@pytest.mark.parametrize("kw,match", [
    (dict(max_denoising_steps=0), "max_denoising_steps=0"),
    (dict(canvas_length=2.0), "canvas_length=2.0"),
    (dict(entropy_bound=0.0), "entropy_bound=0.0"),
    (dict(t_min=-0.1), "t_min=-0.1"),
    (dict(t_min=0.8, t_max=0.8), "t_max=0.8 <= t_min=0.8"),
    (dict(stability_threshold=-1), "stability_threshold=-1"),
    (dict(confidence_threshold=float("nan")), "confidence_threshold=nan"),
    (dict(steps=4), r"steps=4 is not an option of convention='diffusion_gemma' \(use "
                    r"max_denoising_steps\)"),
    (dict(temperature=0.5), "temperature=0.5 is not an option"),
    (dict(threshold=0.9), "threshold=0.9 is not an option"),
    (dict(cache=False), "cache=False"),
    (dict(convention="llada"), "convention='llada' on a DiffusionGemma model"),
])
def test_bad_options_refused_in_one_line(monkeypatch, kw, match):
    fake.install(monkeypatch)
    with pytest.raises(ValueError, match=match) as e:
        resolve_options(fake.make_config(), **kw)
    assert "\n" not in str(e.value)


def test_options_refused_on_other_models():
    from jmoe.config import OlmoeConfig

    cfg = OlmoeConfig(vocab_size=32, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                      head_dim=8, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                      mask_token_id=31, causal=False)
    with pytest.raises(ValueError, match="entropy_bound=0.2 is an option of convention="):
        resolve_options(cfg, entropy_bound=0.2)
    with pytest.raises(ValueError, match="needs a DiffusionGemma model"):
        resolve_options(cfg, convention="diffusion_gemma")


def test_cli_flags(model, monkeypatch, capsys):
    """``jmoe generate`` passes the diffusion_gemma flags through; bad ones fail in one
    line."""
    import json

    from jmoe import cli

    monkeypatch.setattr(cli, "_load", lambda path: model)
    args = ["generate", "5 6 7", "--canvas-length", "8", "--max-denoising-steps", "3",
            "--gen-length", "8", "--entropy-bound", "0.5", "--t-min", "0.3", "--t-max",
            "0.9", "--stability-threshold", "1", "--confidence-threshold", "0.2", "--json"]
    assert cli.main(args) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got["tokens"][0]) == 3 + 8 and 1 <= got["block_steps"][0][0] <= 3
    assert cli.main(args[:-1] + ["--steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: steps=4 is not an option of convention='diffusion_gemma'")
    assert "\n" not in err
