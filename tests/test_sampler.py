"""The jitted diffusion sampler against a plain Python-loop reference (issue 4).

``sampler_reference.reference_generate`` is written from the LLaDA spec (SEEDS.md
§3) and the adaptive-budget rule (§1); it calls the model once per step through
``jmoe.forward`` on the unbucketed batch. Tokens must agree exactly; budgets,
remask counts and expert work too.
"""

import jax
import numpy as np
import pytest

import jmoe
from jmoe.sampling import AdaptiveExperts, GenerateOutput, generate
from jmoe.sampling import loop
from jmoe.sampling.generate import resolve_options

from sampler_reference import reference_generate

MASK, EOS, PAD = 96, 3, 1
CONFIG = jmoe.OlmoeConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=8,
                          num_experts_per_tok=2, causal=False, mask_token_id=MASK,
                          eos_token_id=EOS, pad_token_id=PAD,
                          # the sampler is backend-agnostic; dense compiles fastest on CPU
                          moe_backend="dense")
ROWS = [[5, 17, 42, 8, 9, 60, 11], [23, 7, 4], [70, 71, 72, 73, 74]]


@pytest.fixture(scope="module")
def model():
    m = jmoe.random_model(CONFIG, seed=0)
    # std 0.15 instead of 0.02 (LM head 0.75): peaked predictions, so confidences reach
    # the thresholds below and experts are well separated
    params = dict(jax.tree.map(lambda p: p * 7.5 if p.ndim >= 2 else p, m.params))
    params["lm_head"] = params["lm_head"] * 5
    return m.replace(params=params)


def _check_same(out: GenerateOutput, ref: dict, trace=False):
    np.testing.assert_array_equal(out.tokens, ref["tokens"])
    assert out.nfe == ref["nfe"]
    assert out.expert_work == ref["expert_work"]
    np.testing.assert_array_equal(out.experts_per_token, ref["experts_per_token"])
    np.testing.assert_array_equal(out.remask_count, ref["remask_count"])
    if trace:
        for name in ("committed", "experts_per_token", "remask_count", "block"):
            np.testing.assert_array_equal(out.trace[name], ref["trace"][name], err_msg=name)


CASES = {
    # the schedule 16 / 6 is uneven: remainder to the first steps
    "greedy_one_block_uneven": dict(gen_length=16, block_length=16, steps=6),
    "greedy_blocks": dict(gen_length=16, block_length=8, steps=8),
    "sampled_blocks": dict(gen_length=16, block_length=8, steps=8, temperature=0.9, seed=3),
    "random_remasking": dict(gen_length=16, block_length=8, steps=4, temperature=0.5,
                             remasking="random", seed=1),
    "cfg_eos_inf": dict(gen_length=16, block_length=8, steps=8, cfg_scale=1.5, temperature=0.7,
                        logits_eos_inf=True),
    "threshold_floor_one": dict(gen_length=16, block_length=8, steps=8, threshold=0.5,
                                confidence_eos_eot_inf=True),
    "threshold_floor_schedule": dict(gen_length=16, block_length=8, steps=4, threshold=0.5,
                                     threshold_floor="schedule", temperature=0.5),
    "adaptive_linear": dict(gen_length=16, block_length=8, steps=8,
                            adaptive=AdaptiveExperts(growth="linear", initial=1, maximum=6,
                                                     update_interval=2)),
    "adaptive_exp_threshold_cfg": dict(gen_length=16, block_length=8, steps=8, threshold=0.5,
                                       cfg_scale=0.5,
                                       adaptive=AdaptiveExperts(growth="exponential", initial=1,
                                                                maximum=8, update_interval=1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(model, name):
    kw = CASES[name]
    out = generate(model, ROWS, return_trace=True, **kw)
    ref = reference_generate(model, ROWS, mask_id=MASK, eos_id=EOS, pad_id=PAD, **kw)
    _check_same(out, ref, trace=True)
    if "threshold" in kw:  # the threshold, not only the floor, decided some commits
        steps_per_block = kw["steps"] // (kw["gen_length"] // kw["block_length"])
        floor = kw["block_length"] // steps_per_block if kw.get("threshold_floor") else 1
        assert (out.trace["committed"].sum(-1) > floor).any()
    assert out.tokens.shape == (3, 7 + kw["gen_length"])
    assert (out.tokens[1, :4] == PAD).all() and (out.tokens[2, :2] == PAD).all()


def test_early_stop_matches_reference(model):
    kw = dict(gen_length=16, block_length=8, steps=8)
    free = reference_generate(model, ROWS, mask_id=MASK, eos_id=EOS, pad_id=PAD,
                              early_stop=False, **kw)
    t = free["tokens"]
    # an EOS id rows 1 and 2 commit in their first block and row 0 never generates
    eos = min(set(t[1, 7:15]) & set(t[2, 7:15]) - set(t[0, 7:]))
    out = generate(model, ROWS, eos_id=int(eos), **kw)
    ref = reference_generate(model, ROWS, mask_id=MASK, eos_id=int(eos), pad_id=PAD, **kw)
    _check_same(out, ref)
    assert (out.tokens[1:, 15:] == eos).all()  # rows 1, 2 stopped after the first block
    np.testing.assert_array_equal(out.tokens[0], t[0])  # row 0 went on, unaffected
    assert out.nfe == 8 and out.expert_work < free["expert_work"]


def test_padding_and_bucketing_never_show(model):
    model = model.replace(config=CONFIG.replace(moe_backend="auto"))  # the default backend
    alone = generate(model, [ROWS[1]], gen_length=16, block_length=8, steps=8)
    batch = generate(model, ROWS, gen_length=16, block_length=8, steps=8)
    assert alone.tokens.shape == (1, 3 + 16)
    np.testing.assert_array_equal(batch.tokens[1, 4:], alone.tokens[0])
    # a new prompt of another length in the same bucket reuses the compiled loop
    before = loop.run._cache_size()
    generate(model, [[9, 9, 9, 9, 9, 9]], gen_length=16, block_length=8, steps=8)
    assert loop.run._cache_size() == before


class ToyTokenizer:
    """One id per character (ids 10..35 for a..z); decode writes ids as text."""

    def encode(self, text):
        return [10 + ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def test_string_prompts_and_texts(model):
    tok = ToyTokenizer()
    texts = ["hello", "ab", "abcdefg"]
    kw = dict(gen_length=16, block_length=8, steps=8, eos_id=36)
    out = generate(model.replace(tokenizer=tok), texts, **kw)
    ids = generate(model, [tok.encode(t) for t in texts], **kw)
    np.testing.assert_array_equal(out.tokens, ids.tokens)
    assert ids.texts is None
    for text, row in zip(out.texts, out.tokens[:, 7:].tolist()):
        cut = row[:row.index(36)] if 36 in row else row
        assert text == " ".join(map(str, cut))
    single = generate(model.replace(tokenizer=tok), "hello", **kw)
    np.testing.assert_array_equal(single.tokens[0], out.tokens[0, 2:])


def test_generation_defaults():
    opts, _ = resolve_options(CONFIG, **_NONE_OPTIONS)
    assert (opts.gen_length, opts.block_length, opts.steps) == (128, 32, 128)
    gen = CONFIG.replace(generation={"gen_length": 32, "block_length": 8, "steps": 16,
                                     "threshold": 0.7})
    opts, knobs = resolve_options(gen, **_NONE_OPTIONS)
    assert (opts.gen_length, opts.block_length, opts.steps, opts.thresholded) == (32, 8, 16, True)
    assert float(knobs["threshold"]) == np.float32(0.7)  # the traced knob too
    opts, _ = resolve_options(gen, **dict(_NONE_OPTIONS, gen_length=16, block_length=16))
    assert (opts.gen_length, opts.block_length, opts.steps) == (16, 16, 16)
    opts, _ = resolve_options(CONFIG, **dict(_NONE_OPTIONS, gen_length=16))
    assert (opts.block_length, opts.steps, opts.mask_id, opts.eos_id) == (16, 16, MASK, EOS)


_NONE_OPTIONS = dict(gen_length=None, block_length=None, steps=None, temperature=0.0,
                     cfg_scale=0.0, remasking="low_confidence", threshold=None,
                     threshold_floor="one", adaptive=None, mask_id=None, eos_id=None,
                     logits_eos_inf=False, confidence_eos_eot_inf=False, early_stop=True,
                     return_trace=False)


def test_library_defaults_fill_what_caller_and_model_leave():
    opts, knobs = resolve_options(CONFIG)  # every option None: the library's defaults
    assert (opts.sampled, opts.guided, opts.remasking, opts.thresholded) == (
        False, False, "low_confidence", False)
    assert (opts.threshold_floor, opts.convention.name, opts.cached) == ("one", "llada", False)
    assert {k: float(v) for k, v in knobs.items()} == {
        "temperature": 0.0, "cfg_scale": 0.0, "threshold": 1.0, "top_p": 1.0,
        "low_threshold": np.float32(0.4), "edit_threshold": 0.5,
        "credit_alpha": np.float32(0.7), "credit_boost": np.float32(0.2),
        "credit_decay": np.float32(0.8)}  # decoders' knobs: traced, unused by this decoder
    assert (opts.decoder.name, opts.top_k, opts.top_p) == ("fixed", None, False)
    gen = CONFIG.replace(generation={"temperature": 0.8, "cfg_scale": 0.5,
                                     "remasking": "random"})
    opts, knobs = resolve_options(gen)
    assert (opts.sampled, opts.guided, opts.remasking) == (True, True, "random")
    assert float(knobs["temperature"]) == np.float32(0.8)
    assert float(knobs["cfg_scale"]) == 0.5
    opts, knobs = resolve_options(gen, temperature=0.0, remasking="low_confidence")
    assert (opts.sampled, opts.remasking, float(knobs["temperature"])) == (
        False, "low_confidence", 0.0)  # the caller wins
    with pytest.raises(ValueError, match="remasking='lowest'"):
        resolve_options(CONFIG.replace(generation={"remasking": "lowest"}))


def test_generation_threshold_is_the_threshold_used(model):
    """A model whose generation config sets ``threshold`` generates exactly as passing
    it (before: thresholding compiled on, but the traced threshold was 1.0)."""
    kw = dict(gen_length=16, block_length=8, steps=8, return_trace=True)
    t = 0.5
    with_gen = model.replace(config=CONFIG.replace(generation={"threshold": t}))
    out = generate(with_gen, ROWS, **kw)
    explicit = generate(model, ROWS, threshold=t, **kw)
    np.testing.assert_array_equal(out.tokens, explicit.tokens)
    assert out.nfe == explicit.nfe
    np.testing.assert_array_equal(out.trace["committed"], explicit.trace["committed"])
    # and the threshold mattered: at 0.5 some step commits more than the floor of one,
    # so the run takes fewer calls than a threshold no confidence reaches, and it is not
    # the fixed schedule of threshold=None either
    never = generate(model, ROWS, threshold=1.0, **kw)
    assert (out.trace["committed"].sum(-1) > 1).any()
    assert out.nfe < never.nfe
    plain = generate(model, ROWS, threshold=None, **kw)
    assert out.nfe != plain.nfe and (out.tokens != plain.tokens).any()


def test_generation_sampling_options_are_used(model):
    """``temperature``, ``cfg_scale`` and ``remasking`` from the generation config are
    the ones used (before: ignored, every seed gave the greedy tokens)."""
    kw = dict(gen_length=16, block_length=8, steps=8)
    sampling = {"temperature": 1.0, "cfg_scale": 0.5, "remasking": "random"}
    with_gen = model.replace(config=CONFIG.replace(generation=sampling))
    outs = [generate(with_gen, ROWS, seed=seed, **kw) for seed in (0, 1)]
    for seed, out in enumerate(outs):
        explicit = generate(model, ROWS, seed=seed, **sampling, **kw)
        np.testing.assert_array_equal(out.tokens, explicit.tokens)
        assert out.expert_work == explicit.expert_work  # guidance: both halves computed
    assert (outs[0].tokens != outs[1].tokens).any()  # sampled: the seed matters
    greedy = generate(model, ROWS, **kw)
    assert (outs[0].tokens != greedy.tokens).any()
    assert outs[0].expert_work == 2 * greedy.expert_work  # cfg_scale > 0 doubles the batch


def _replay_rule(trace, adaptive, gen_length, block_length):
    """The §1 rule from the trace's commits alone: remask counts and budgets per call."""
    n, b, g = trace["committed"].shape
    masked = np.ones((b, g), bool)
    remask = np.zeros((b, g), int)
    budget = np.full((b, g), adaptive.initial)
    budgets, remasks = [], []
    for call in range(n):
        budgets.append(budget.copy())
        masked &= ~trace["committed"][call]
        blk = trace["block"][call]
        in_block = (np.arange(g) // block_length) == blk
        if (call + 1) % adaptive.update_interval == 0:
            grow = masked & in_block
            remask = remask + grow
            k = (adaptive.initial + remask if adaptive.growth == "linear"
                 else adaptive.initial * 2 ** remask)
            budget = np.where(grow, np.minimum(k, adaptive.maximum), budget)
        remasks.append(remask.copy())
    return np.stack(budgets), np.stack(remasks)


def test_adaptive_rule_and_expert_work(model):
    ad = AdaptiveExperts(growth="exponential", initial=1, maximum=7, update_interval=3)
    out = generate(model, ROWS, gen_length=16, block_length=8, steps=16, adaptive=ad,
                   early_stop=False, cfg_scale=1.0, return_trace=True)
    budgets, remasks = _replay_rule(out.trace, ad, 16, 8)
    np.testing.assert_array_equal(out.trace["experts_per_token"], budgets)
    np.testing.assert_array_equal(out.trace["remask_count"], remasks)
    np.testing.assert_array_equal(out.remask_count[:, 7:], remasks[-1])
    assert remasks.max() > 0
    # expert work: (prompt tokens at maximum + generated budgets) x layers x 2 CFG halves
    prompt_pairs = sum(len(r) for r in ROWS) * ad.maximum
    per_call = prompt_pairs + budgets.sum(axis=(1, 2))
    assert out.expert_work == int(per_call.sum()) * CONFIG.num_layers * 2
    np.testing.assert_array_equal(out.trace["work"], per_call * CONFIG.num_layers * 2)


def test_adaptive_at_top_k_is_fixed_top_k(model):
    kw = dict(gen_length=16, block_length=8, steps=8, temperature=0.6)
    fixed = generate(model, ROWS, **kw)
    k = CONFIG.num_experts_per_tok
    same = generate(model, ROWS, adaptive=AdaptiveExperts(initial=k, maximum=k), **kw)
    np.testing.assert_array_equal(fixed.tokens, same.tokens)
    assert fixed.expert_work == same.expert_work
    # new temperature / seed values are traced arguments: no recompilation
    before = loop.run._cache_size()
    other = generate(model, ROWS, **dict(kw, temperature=1.3, seed=7))
    assert loop.run._cache_size() == before
    assert (other.tokens != fixed.tokens).any()


@pytest.mark.parametrize("kw, match", [
    (dict(gen_length=10, block_length=4), "not a multiple of block_length"),
    (dict(gen_length=16, block_length=4, steps=6), "not a multiple of the number of blocks"),
    (dict(gen_length=0), "gen_length=0"),
    (dict(remasking="lowest"), "remasking='lowest'"),
    (dict(threshold=1.5), "threshold=1.5"),
    (dict(threshold=0.5, threshold_floor="two"), "threshold_floor='two'"),
    (dict(adaptive=AdaptiveExperts(maximum=9)), "maximum=9"),
    (dict(gen_length=4096), "max_position_embeddings"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_inputs(model, kw, match):
    with pytest.raises(ValueError, match=match):
        generate(model, ROWS, **kw)


def test_bad_inputs_elsewhere(model):
    with pytest.raises(ValueError, match="initial=0"):
        AdaptiveExperts(initial=0)
    with pytest.raises(ValueError, match="growth='cubic'"):
        AdaptiveExperts(growth="cubic")
    with pytest.raises(ValueError, match="maximum=2"):
        AdaptiveExperts(initial=3, maximum=2)
    with pytest.raises(ValueError, match="no mask token"):
        generate(model.replace(config=CONFIG.replace(mask_token_id=None)), ROWS)
    with pytest.raises(ValueError, match="token id 97"):
        generate(model, [[1, 97]])
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, "hello")
