"""The LLaDA2 generation convention and the exact K/V cache of finished blocks (issue 5).

``reference_generate`` below is a plain Python loop written from LLaDA2's published
``generate`` (issue 5 text): a canvas of whole blocks aligned to position 0, generation
from block ``P // block_length``, block-causal attention, ``steps`` per block, an even
schedule over ``block_length`` with ``steps`` first capped at ``gen_length`` (its
``steps = min(steps, gen_length // minimal_topk)``, ``minimal_topk`` 1), threshold
strictly greater with the schedule count as floor, early block end, stop after a block
holding EOS, output cut after the first EOS. It runs the PyTorch reference model
(``tests/llada2_reference.py``) on the same tiny random checkpoint that jmoe loads
after conversion through the real CLI path.

One deliberate difference, shared by the reference below and jmoe: the mask token is
never a prediction (its logit is -inf), so a block always empties.
"""


import jax
import numpy as np
import pytest
import torch

import jmoe
import jmoe.models.decoder as llada2_model  # the one decoder stack
from checkpoints_convert.cli import main as convert_main
from jmoe.sampling import AdaptiveExperts, generate
from jmoe.sampling.conventions import CONVENTIONS
from jmoe.sampling.options import resolve_convention

import llada2_reference as ref

MASK, EOS = 70, 69
CFG = ref.TINY
BLOCK = 4
PROMPTS = {"fills_blocks": [5, 17, 42, 8, 9, 60, 11, 3],  # P = 8: two whole blocks
           "prompt_tail_in_block": [23, 7, 4, 50, 2, 31]}  # P = 6: block 1 holds the tail


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llada2_sampler")
    sd = ref.random_checkpoint(CFG, seed=3)
    # sharper predictions (confidences reach the threshold) and EOS within reach
    sd["lm_head.weight"] = sd["lm_head.weight"] * 4
    sd["lm_head.weight"][EOS] = sd["lm_head.weight"][EOS] * 2.5
    ref.write_checkpoint(tmp / "hf", CFG, sd)
    assert convert_main(["--hf-dir", str(tmp / "hf"), "--out", str(tmp / "ck"), "--quiet"]) == 0
    # the sampler is backend-agnostic; dense compiles fastest on CPU
    return sd, jmoe.load(tmp / "ck", moe_backend="dense")


def reference_generate(sd, prompt, *, gen_length, block_length, steps, threshold):
    """LLaDA2's generate at temperature 0 for one prompt: (answer ids, model calls, stats)."""
    steps = min(steps, gen_length // 1)  # LLaDA2: steps = min(steps, gen_length // minimal_topk)
    p = len(prompt)
    nb = -(-(p + gen_length) // block_length)
    total = nb * block_length
    mask4d, pos = ref.block_mask(total, block_length), torch.arange(total)[None]
    x = torch.full((total,), MASK, dtype=torch.long)
    x[:p] = torch.as_tensor(prompt)
    sched = [block_length // steps + (i < block_length % steps) for i in range(steps)]
    nfe, above_floor = 0, 0
    for blk in range(p // block_length, nb):
        lo, end = blk * block_length, (blk + 1) * block_length
        for st in range(steps):
            active = x[lo:end] == MASK
            if not active.any():
                break
            with torch.no_grad():
                logits = ref.forward(sd, CFG, x[None, :end], mask4d[:, :, :end, :end],
                                     pos[:, :end])[0, lo:end]
            nfe += 1
            logits[:, MASK] = -torch.inf
            probs = torch.softmax(logits.double(), -1)
            x0 = probs.argmax(-1)
            conf = torch.where(active, probs.gather(-1, x0[:, None])[:, 0], -torch.inf)
            n = sched[st]
            high = conf > threshold if threshold is not None else torch.zeros_like(active)
            if int(high.sum()) >= n:
                transfer = high
                above_floor += int(high.sum()) > n
            else:
                transfer = torch.zeros_like(active)
                transfer[torch.topk(conf, min(n, int(active.sum()))).indices] = True
            x[lo:end] = torch.where(transfer, x0, x[lo:end])
        if (x[p:end] == EOS).any():
            break
    answer = x[p:p + gen_length].tolist()
    if EOS in answer:
        answer = answer[:answer.index(EOS) + 1]
    return answer, nfe, above_floor


def _answer(row, p, gen_length):
    ids = list(row[p:p + gen_length])
    return ids[:ids.index(EOS) + 1] if EOS in ids else ids


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_matches_reference_generate(checkpoint, threshold):
    sd, model = checkpoint
    assert model.config.family == "llada2"
    kw = dict(gen_length=10, block_length=BLOCK, steps=3)  # uneven schedule 2, 1, 1
    stats = []
    for name, prompt in PROMPTS.items():
        want, nfe, above = reference_generate(sd, prompt, threshold=threshold, **kw)
        # threshold 1.0 under the strict rule never fires: the plain schedule
        out = generate(model, [prompt], threshold=threshold or 1.0, cache=False, **kw)
        assert _answer(out.tokens[0], len(prompt), 10) == want, name
        assert out.nfe == nfe, name
        assert out.tokens.shape == (1, len(prompt) + 10)
        np.testing.assert_array_equal(out.tokens[0, :len(prompt)], prompt)
        stats.append((want, above))
    if threshold is not None:  # the threshold, not only the floor, decided some commits
        assert sum(a for _, a in stats) > 0
    assert any(EOS in w for w, _ in stats)  # the EOS stop and cut were exercised


def test_cached_equals_uncached_and_runs_on_blocks(checkpoint, monkeypatch):
    _, model = checkpoint
    prompts = [PROMPTS["fills_blocks"] + [1], [9, 8, 7, 6, 5, 4, 3, 2, 1]]  # P = 9
    kw = dict(gen_length=14, block_length=BLOCK, steps=4, threshold=0.3, return_trace=True)
    seen = []
    real = llada2_model.rope_tables
    monkeypatch.setattr(llada2_model, "rope_tables",
                        lambda pos, *a: seen.append(pos.shape) or real(pos, *a))
    jax.clear_caches()  # trace afresh so the shapes are recorded
    plain = generate(model, prompts, cache=False, **kw)
    uncached_shapes, seen[:] = list(seen), []
    cached = generate(model, prompts, **kw)  # cache defaults on for LLaDA2
    # canvas 9 + 14 -> 24; the cached loop's calls: the prompt's two whole blocks once
    # (prefill), then block-sized steps and block fills
    assert set(uncached_shapes) == {(2, 24)}
    assert set(seen) == {(2, BLOCK), (2, 2 * BLOCK)}
    np.testing.assert_array_equal(cached.tokens, plain.tokens)
    assert cached.nfe == plain.nfe
    np.testing.assert_array_equal(cached.trace["committed"], plain.trace["committed"])
    assert 0 < cached.expert_work < plain.expert_work


def test_batch_rows_match_single_prompts(checkpoint):
    _, model = checkpoint
    prompts = [PROMPTS["prompt_tail_in_block"], [9, 8, 7, 6, 5, 4]]
    kw = dict(gen_length=10, block_length=BLOCK, steps=3, threshold=0.3)
    both = generate(model, prompts, **kw)
    for i, p in enumerate(prompts):
        one = generate(model, [p], **kw)
        assert _answer(both.tokens[i], 6, 10) == _answer(one.tokens[0], 6, 10)


def test_mixed_prompt_lengths_match_each_prompt_alone(checkpoint):
    """Rows of different lengths in one batch: each row as LLaDA2's generate alone.

    P = 3 (tail in block 0, stops at an EOS in block 1), 8 (fills blocks 0-1), 21 (tail in
    block 5): the rows' regions start in blocks 0, 2 and 5, the long prompt's blocks 0-4
    are prompt only (cached: stored by block fills, not the prefill) and block 4 holds no
    row's masks at all.
    """
    sd, model = checkpoint
    prompts = [[1, 2, 3], PROMPTS["fills_blocks"], list(range(30, 51))]
    g, pmax = 6, 21
    kw = dict(gen_length=g, block_length=BLOCK, steps=3)
    for threshold in (None, 0.3):
        want = [reference_generate(sd, p, threshold=threshold, **kw)[0] for p in prompts]
        outs = {c: generate(model, prompts, threshold=threshold or 1.0, cache=c,
                            return_trace=True, **kw) for c in (False, True)}
        for cache, out in outs.items():
            assert out.tokens.shape == (3, pmax + g)
            for i, p in enumerate(prompts):  # left-padded to the longest prompt
                np.testing.assert_array_equal(out.tokens[i, :pmax - len(p)], EOS)  # pad id
                np.testing.assert_array_equal(out.tokens[i, pmax - len(p):pmax], p)
                assert _answer(out.tokens[i], pmax, g) == want[i], (threshold, cache, i)
            assert 4 not in out.trace["block"]  # the empty block made no model call
            assert not out.trace["committed"][:, :, :pmax].any()  # prompts never change
        assert EOS in want[0] and EOS not in want[1] + want[2]
        np.testing.assert_array_equal(outs[True].trace["committed"],
                                      outs[False].trace["committed"])
        assert outs[True].nfe == outs[False].nfe


def test_cached_guidance_and_sampling_equal_uncached(checkpoint, monkeypatch):
    """Cached CFG (the prompt-masked copies in their own K/V rows) and sampled runs give
    the uncached tokens; the random stream does not depend on the call's shape."""
    _, model = checkpoint
    prompts = [PROMPTS["prompt_tail_in_block"], [9, 8, 7, 6, 5, 4, 3, 2, 1]]  # P = 6, 9
    seen = []
    real = llada2_model.rope_tables
    monkeypatch.setattr(llada2_model, "rope_tables",
                        lambda pos, *a: seen.append(pos.shape) or real(pos, *a))
    jax.clear_caches()  # trace afresh so the shapes are recorded
    kw = dict(gen_length=10, block_length=BLOCK, steps=3, threshold=0.3)
    # sampled: Gumbel noise and random confidences, both drawn per position
    cases = {"cfg": dict(cfg_scale=1.5),
             "sampled": dict(temperature=1.0, remasking="random", seed=5)}
    for name, extra in cases.items():
        seen[:] = []
        plain = generate(model, prompts, cache=False, **kw, **extra)
        uncached_shapes, seen[:] = set(seen), []
        cached = generate(model, prompts, cache=True, **kw, **extra)
        b = 4 if name == "cfg" else 2  # guidance: both halves in one call, 2B rows
        # canvas 20; cached: block 0 (prefill: the prompts share no more), then blocks
        assert uncached_shapes == {(b, 20)} and set(seen) == {(b, BLOCK)}, name
        np.testing.assert_array_equal(cached.tokens, plain.tokens, err_msg=name)
        assert cached.nfe == plain.nfe, name
    other = generate(model, prompts, cache=True, **kw, **dict(extra, seed=6))
    assert not np.array_equal(other.tokens, cached.tokens)  # the key matters


def test_convention_defaults_and_errors(checkpoint):
    _, model = checkpoint
    llada, llada2 = CONVENTIONS["llada"], CONVENTIONS["llada2"]
    assert resolve_convention(model.config, None, None) == (llada2, True)
    assert resolve_convention(model.config, "llada", None) == (llada, False)
    olmoe = jmoe.OlmoeConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8, moe_intermediate_size=16,
                             num_experts=8, num_experts_per_tok=2)
    assert resolve_convention(olmoe, None, None) == (llada, False)
    with pytest.raises(ValueError, match="block-causal"):
        resolve_convention(olmoe, "llada2", None)
    with pytest.raises(ValueError, match="convention="):
        resolve_convention(olmoe, "dream", None)
    with pytest.raises(ValueError, match="cache=True"):
        generate(model, [[1, 2]], gen_length=8, block_length=BLOCK, convention="llada",
                 cache=True)


def test_adaptive_budgets_llada2(checkpoint):
    _, model = checkpoint
    ad = AdaptiveExperts(growth="linear", initial=1, maximum=3, update_interval=2)
    prompt = PROMPTS["prompt_tail_in_block"]
    kw = dict(gen_length=10, block_length=BLOCK, steps=4, threshold=1.0, adaptive=ad,
              return_trace=True, early_stop=False)
    cached = generate(model, [prompt], **kw)
    plain = generate(model, [prompt], cache=False, **kw)
    np.testing.assert_array_equal(cached.tokens, plain.tokens)
    np.testing.assert_array_equal(cached.experts_per_token, plain.experts_per_token)
    np.testing.assert_array_equal(cached.remask_count, plain.remask_count)
    t = cached.trace
    used, remask, committed = t["experts_per_token"], t["remask_count"], t["committed"]
    p = len(prompt)
    # prompt positions (the tail inside the first generated block too) keep the maximum
    assert (cached.experts_per_token[0, :p] == 3).all()
    assert (used[0, 0, p:] == 1).all()  # masked positions start at initial
    masked = np.ones(used.shape[-1], bool)
    masked[:p] = False
    for s in range(len(used)):
        masked &= ~committed[s, 0]
        blk = (p // BLOCK + t["block"][s]) * BLOCK
        in_block = (np.arange(masked.size) >= blk) & (np.arange(masked.size) < blk + BLOCK)
        grew = masked & in_block if (s + 1) % 2 == 0 else np.zeros_like(masked)
        before = remask[s - 1, 0] if s else np.zeros_like(remask[0, 0])
        np.testing.assert_array_equal(remask[s, 0], before + grew, err_msg=f"call {s}")
        if s + 1 < len(used):  # the next call uses the grown budgets
            want = np.where(grew, np.minimum(1 + remask[s, 0], 3), used[s, 0])
            np.testing.assert_array_equal(used[s + 1, 0], want, err_msg=f"call {s + 1}")
    assert remask.max() > 0  # some positions did grow


@pytest.mark.parametrize("cache", [False, True])
def test_steps_capped_at_gen_length_as_published(checkpoint, cache):
    """gen_length 4 < steps 8: LLaDA2 runs min(8, 4) = 4 steps, a schedule of 2 commits a
    step over the 8-block, so the 5 masks after a 3-token prompt take 3 model calls."""
    sd, model = checkpoint
    prompt, kw = [23, 7, 4], dict(gen_length=4, block_length=8, steps=8)
    want, nfe, _ = reference_generate(sd, prompt, threshold=None, **kw)
    assert nfe == 3
    out = generate(model, [prompt], threshold=1.0, cache=cache, return_trace=True, **kw)
    assert _answer(out.tokens[0], len(prompt), 4) == want
    assert out.nfe == 3
    # the trace shows the output's columns, P + G = 7 of the block's 8: 2, 2, 1 commits
    # over the block, one of them possibly past G
    commits = np.asarray(out.trace["committed"])[:, 0].sum(-1)
    assert commits.sum() == 4 and commits.max() == 2


@pytest.mark.parametrize("cache", [False, True])
def test_empty_prompt_generates_from_position_zero(checkpoint, cache):
    """P = 0: generation starts at block 0 and fills every position.

    With no prompt the first block is all masks; its value rows are identical, so
    every position's logits are the same up to float rounding and which positions the
    first step commits is a tie (broken by rounding noise, in the reference's
    torch.topk as in jmoe). So this checks what the tie cannot change: the shape, no
    mask left, the schedule's model calls, and that the first call commits the
    reference's first prediction (the same token at every position)."""
    sd, model = checkpoint
    kw = dict(gen_length=7, block_length=BLOCK, steps=2)
    _, nfe, _ = reference_generate(sd, [], threshold=None, **kw)
    masks = torch.full((1, BLOCK), MASK)
    with torch.no_grad():
        logits = ref.forward(sd, CFG, masks, ref.block_mask(BLOCK, BLOCK),
                             torch.arange(BLOCK)[None])[0]
    logits[:, MASK] = -torch.inf
    first = logits.argmax(-1)
    assert (first == first[0]).all()  # the tie: one prediction everywhere
    out = generate(model, [[]], threshold=1.0, cache=cache, return_trace=True, **kw)
    assert out.tokens.shape == (1, 7)
    assert MASK not in out.tokens[0].tolist()
    assert out.nfe == nfe
    committed = np.asarray(out.trace["committed"])[0, 0]  # first call, row 0: [7]
    assert committed.sum() == BLOCK // 2  # the schedule: 2 of the block's 4 positions
    assert (out.tokens[0][committed] == int(first[0])).all()


@pytest.mark.parametrize("cache", [True, False])
def test_floor_one_runs_each_block_until_empty(checkpoint, cache):
    # threshold_floor="one" commits at least one position per step and no schedule: with
    # fewer steps than block positions a block must go on until it has no mask (dInfer,
    # Fast-dLLM), so `steps` does not change the tokens and no mask is left
    _, model = checkpoint
    prompt = PROMPTS["prompt_tail_in_block"]
    kw = dict(gen_length=8, block_length=BLOCK, threshold=0.999, threshold_floor="one",
              cache=cache)
    few = generate(model, [prompt], steps=1, **kw)
    full = generate(model, [prompt], steps=BLOCK, **kw)
    assert MASK not in np.asarray(few.tokens).tolist()[0]
    np.testing.assert_array_equal(np.asarray(few.tokens), np.asarray(full.tokens))
    assert int(few.nfe) == int(full.nfe) > 2  # more calls than the 1 step x 2 blocks asked
