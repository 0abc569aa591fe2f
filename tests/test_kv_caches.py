"""Approximate K/V caches of bidirectional models (issue 15): Fast-dLLM's prefix and dual
caches, ``cache_refresh`` and dInfer's ``cache_window``.

- With ``cache_refresh=1`` every step runs the whole canvas: the tokens are exactly the
  uncached run's (greedy and sampled, mixed prompt lengths, guidance, adaptive budgets).
- Without refresh, the jitted sampler equals a plain Python loop written from Fast-dLLM's
  rule whose model is a float64 NumPy forward of the same weights, in which every
  position outside the step's window keeps the keys/values of the block's first step.
- Block-causal models: ``"exact"`` is ``True`` is the uncached run. A batch equals each
  row alone. Expert choice and non-bidirectional models are refused in one line (the
  other bad values: tests/test_bad_inputs.py's GENERATE_ROWS).
"""

from __future__ import annotations

import numpy as np
import pytest

import jmoe
from jmoe.sampling.options import resolve_options

MASK, EOS, PAD = 96, 3, 1
# LLaDA-MoE's layout (bidirectional, q/k norm per head) at test size
CONFIG = jmoe.OlmoeConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=8,
                          num_experts_per_tok=2, causal=False, qk_norm="per_head",
                          rope_theta=50000.0, mask_token_id=MASK, eos_token_id=EOS,
                          pad_token_id=PAD, moe_backend="dense")
ROWS = [[5, 17, 42, 8, 9, 60, 11], [23, 7, 4], [70, 71, 72, 73, 74]]
LENGTHS = dict(gen_length=12, block_length=4, steps=12, early_stop=False)


@pytest.fixture(scope="module")
def model():
    return jmoe.random_model(CONFIG, seed=1)


# ---- a float64 NumPy forward with stale keys/values (the reference's model) ----

def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _rope(x_LHK, pos_L, theta):
    k = x_LHK.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, k, 2) / k)
    ang = pos_L[:, None] * inv[None]
    cos, sin = (np.concatenate([f(ang)] * 2, -1)[:, None] for f in (np.cos, np.sin))
    rot = np.concatenate([-x_LHK[..., k // 2:], x_LHK[..., :k // 2]], -1)
    return x_LHK * cos + rot * sin


def numpy_forward(params, cfg, tokens_L, valid_L, stale=None, fresh_L=None):
    """One row's logits ``[L, V]`` and per-layer ``(k, v)`` ``[L, N, K]``, float64.

    With ``stale`` (per-layer keys/values of an earlier call), every position outside
    ``fresh_L`` attends with those instead of its own: what a cached call computes for
    its fresh positions. Written from the published architecture (OLMoE / LLaDA-MoE:
    RMSNorm, per-head q/k norm, NeoX rotary, GQA, softmax top-k router, SwiGLU experts).
    """
    p = lambda *path: np.asarray(_get(params, path), np.float64)
    h, n, k, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    pos = np.maximum(np.cumsum(valid_L) - 1, 0).astype(np.float64)
    x = p("embed", "embedding")[tokens_L]
    kvs = []
    for i in range(cfg.num_layers):
        a = lambda *s: p(f"layer_{i}", *s)
        y = _rms(x, a("input_norm", "scale"), eps)
        q, kk, v = (y @ a("attn", w) for w in ("wq", "wk", "wv"))
        q, kk, v = q.reshape(-1, h, k), kk.reshape(-1, n, k), v.reshape(-1, n, k)
        q, kk = _rms(q, a("attn", "q_norm", "scale"), eps), _rms(kk, a("attn", "k_norm", "scale"), eps)
        q, kk = _rope(q, pos, cfg.rope_theta), _rope(kk, pos, cfg.rope_theta)
        if stale is not None:
            kk = np.where(fresh_L[:, None, None], kk, stale[i][0])
            v = np.where(fresh_L[:, None, None], v, stale[i][1])
        kvs.append((kk, v))
        kh, vh = np.repeat(kk, h // n, 1), np.repeat(v, h // n, 1)
        s = np.einsum("qhk,shk->hqs", q, kh) / np.sqrt(k) + np.where(valid_L, 0, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        att = np.einsum("hqs,shk->qhk", w / w.sum(-1, keepdims=True), vh)
        x = x + att.reshape(len(x), h * k) @ a("attn", "wo")
        y = _rms(x, a("post_attn_norm", "scale"), eps)
        logits = y @ a("moe", "router")
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.zeros_like(x)
        for t in range(len(x)):
            for e in np.argsort(-probs[t], kind="stable")[:cfg.num_experts_per_tok]:
                g = y[t] @ a("moe", "w_gate")[e]
                up = y[t] @ a("moe", "w_up")[e]
                out[t] += probs[t, e] * ((g / (1 + np.exp(-g)) * up) @ a("moe", "w_down")[e])
        x = x + out
    return _rms(x, p("final_norm", "scale"), eps) @ p("lm_head"), kvs


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def reference_generate(model, rows, cache, window=(0, 0), *, gen_length, block_length, steps,
                       early_stop=False):
    """Fast-dLLM's cached LLaDA loop, greedy, fixed schedule, one row at a time: a block's
    first step runs the whole canvas and keeps every position's K/V; each later step
    recomputes the block and (prefix) everything after it, or (dual) the block and
    ``after`` positions, plus ``before`` positions before the block; every other
    position's K/V stay those of the block's first step."""
    cfg, before, after = model.config, *window
    out = []
    for r in rows:
        p = len(r)
        x = np.array(list(r) + [MASK] * gen_length)
        valid = np.ones(len(x), bool)
        spb = steps // (gen_length // block_length)
        for blk in range(gen_length // block_length):
            lo, hi = p + blk * block_length, p + (blk + 1) * block_length
            stale = None
            for i in range(spb):
                if i == 0:
                    logits, stale = numpy_forward(model.params, cfg, x, valid)
                else:
                    end = len(x) if cache == "prefix" else hi + after
                    cols = np.arange(len(x))
                    fresh = (cols >= lo - before) & (cols < end)
                    logits, _ = numpy_forward(model.params, cfg, x, valid, stale, fresh)
                logits[:, MASK] = -np.inf
                x0 = logits.argmax(-1)
                z = np.exp(logits - logits.max(-1, keepdims=True))
                conf = (z / z.sum(-1, keepdims=True))[np.arange(len(x)), x0]
                masked = np.zeros(len(x), bool)
                masked[lo:hi] = x[lo:hi] == MASK
                conf = np.where(masked, conf, -np.inf)
                n = block_length // spb + (i < block_length % spb)
                for j in np.argsort(-conf, kind="stable")[:min(n, masked.sum())]:
                    x[j] = x0[j]
        out.append(x)
    return out


def _rows_of(out, rows):
    """Each row's prompt + generation from ``generate``'s left-padded output."""
    return [np.asarray(out.tokens)[i, out.tokens.shape[1] - len(r) - LENGTHS["gen_length"]:]
            for i, r in enumerate(rows)]


def test_numpy_forward_is_the_model(model):
    """The oracle itself: its uncached logits are jmoe's (float32 vs float64)."""
    x = np.array([[5, 17, 42, 8, MASK, MASK, MASK]])
    valid = np.array([[0, 1, 1, 1, 1, 1, 1]], bool)
    got, _ = jmoe.forward(model, x, attention_mask=valid)
    want, _ = numpy_forward(model.params, CONFIG, x[0], valid[0])
    np.testing.assert_allclose(np.asarray(got)[0, 1:], want[1:], rtol=0, atol=2e-5)


@pytest.mark.parametrize("cache, window", [("prefix", (0, 0)), ("dual", (0, 0)),
                                           ("dual", (2, 3)), ("prefix", (3, 0))])
def test_stale_caches_equal_the_reference_loop(model, cache, window):
    got = jmoe.generate(model, ROWS, cache=cache, cache_window=window, **LENGTHS)
    want = reference_generate(model, ROWS, cache, window, **LENGTHS)
    for g, w in zip(_rows_of(got, ROWS), want):
        np.testing.assert_array_equal(g, w)


def test_stale_caches_change_tokens(model):
    """Stale K/V matter on this model (else the test above could not fail): dual without
    refresh differs from the uncached run somewhere, and the reference agrees."""
    base = jmoe.generate(model, ROWS, cache=False, **LENGTHS)
    dual = jmoe.generate(model, ROWS, cache="dual", **LENGTHS)
    assert (np.asarray(dual.tokens) != np.asarray(base.tokens)).any()


@pytest.mark.parametrize("cache, kw", [
    ("prefix", dict(adaptive=jmoe.AdaptiveExperts(growth="linear", initial=1, maximum=2))),
    ("dual", dict(adaptive=jmoe.AdaptiveExperts(growth="linear", initial=1, maximum=2),
                  cache_window=(2, 2))),
    ("prefix", dict(cfg_scale=1.5)),
    ("dual", dict(cfg_scale=1.5, temperature=0.7, seed=11)),
    ("dual", dict(temperature=0.9, remasking="random", seed=5)),
])
def test_refresh_every_step_gives_the_uncached_tokens(model, cache, kw):
    """``cache_refresh=1``: every step runs the whole canvas, so tokens, budgets and remask
    counts are the uncached run's, and every call is a full one (same NFE and work)."""
    kw = dict(kw)
    window = kw.pop("cache_window", None)
    base = jmoe.generate(model, ROWS, cache=False, **LENGTHS, **kw)
    got = jmoe.generate(model, ROWS, cache=cache, cache_refresh=1, cache_window=window,
                        **LENGTHS, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(base.tokens))
    np.testing.assert_array_equal(got.experts_per_token, base.experts_per_token)
    np.testing.assert_array_equal(got.remask_count, base.remask_count)
    assert (got.nfe, got.expert_work) == (base.nfe, base.expert_work)


def test_cached_steps_do_less_expert_work(model):
    """Non-refresh steps route only their window: dual < prefix < uncached work."""
    work = {c: jmoe.generate(model, ROWS, cache=c, **LENGTHS).expert_work
            for c in (False, "prefix", "dual")}
    assert work["dual"] < work["prefix"] < work[False]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_batch_equals_each_row_alone(model, cache):
    kw = dict(LENGTHS, cache=cache, cache_window=(2, 1), cache_refresh=3)
    batch = _rows_of(jmoe.generate(model, ROWS, **kw), ROWS)
    for r, got in zip(ROWS, batch):
        np.testing.assert_array_equal(got, np.asarray(jmoe.generate(model, [r], **kw).tokens)[0])


def test_block_causal_exact_cache_unchanged():
    """``"exact"`` is ``True``: the same static options, so the same compiled loop as the
    exact cache that tests/test_llada2_sampler.py checks against the uncached run and
    LLaDA2's reference (``None`` is it too, the llada2 default)."""
    cfg = jmoe.LLaDA2Config(
        vocab_size=71, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=64, mask_token_id=70, eos_token_id=69, pad_token_id=69)
    kw = dict(gen_length=8, block_length=4, steps=4)
    opts = [resolve_options(cfg, cache=c, **kw)[0] for c in (True, "exact", None, False)]
    assert opts[0] == opts[1] == opts[2] != opts[3]
    assert opts[0].cached and opts[0].approx_cache is None and not opts[3].cached


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_expert_choice_and_non_bidirectional_models_are_refused(cache):
    """Expert choice: each expert picks among the whole sequence's tokens, which a window
    call does not see, so the approximate caches are refused (use cache=False)."""
    with pytest.raises(ValueError, match="expert_choice.*cache=False") as e:
        resolve_options(CONFIG.replace(routing="expert_choice"), cache=cache, **LENGTHS)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="needs a bidirectional model") as e:
        resolve_options(CONFIG.replace(causal=True), cache=cache, **LENGTHS)
    with pytest.raises(ValueError, match="needs a bidirectional model"):
        resolve_options(CONFIG.replace(attention_block_length=4), cache=cache,
                        convention="llada", **LENGTHS)
