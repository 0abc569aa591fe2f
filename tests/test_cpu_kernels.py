"""jmoe's compiled CPU kernels: the experts of ``moe_backend="cpu_gmm"`` against the
float64 spec oracle, and the router top-k against ``jax.lax.top_k``.

Shapes are picked to reach every path of the kernel: rows per expert past one task
(48) and below one register tile, model/ffn dims that are not multiples of the
vector tile (scalar tail columns), dropped assignments, empty experts, every token
on one expert, expert choice (not token-major). The AVX-512, AVX2 and plain-loop
tiles are each built (``-mno-...`` variants) and checked on this machine.
"""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import cpu_kernels, moe
from jmoe.platform import kernels
from test_attention import oracle_vec
from test_backends import make_routing, oracle_moe, reference_moe, weights

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or cpu_kernels.compiler() is None,
    reason="jmoe's CPU kernels need XLA:CPU and a C++ compiler")

# the tile each build uses: default (AVX-512 where the CPU has it), AVX2, plain loops
VARIANTS = {"native": (), "avx2": ("-mno-avx512f",), "plain": ("-mno-avx2", "-mno-avx512f",
                                                                "-mno-fma")}


def run(x, r, ws, variant):
    y_AD = cpu_kernels.grouped_swiglu(x, r.token_A, r.expert_A, r.weight_A, *ws,
                                      variant=variant)
    return jax.ops.segment_sum(y_AD, r.token_A, num_segments=x.shape[0])


CASES = {
    # name: (tokens, experts, k, d, f, routing kind, logit shape)
    "uneven_dims": (70, 5, 3, 40, 24, "token_choice", "random"),
    "masked_budgets": (64, 6, 3, 32, 16, "masked", "random"),
    "empty_experts": (40, 8, 2, 16, 16, "token_choice", "empty_experts"),
    "one_expert": (130, 4, 1, 24, 8, "token_choice", "one_expert"),  # 130 rows: 3 tasks
    "expert_choice": (48, 6, 2, 32, 40, "expert_choice", "random"),
    "single_token": (1, 4, 2, 8, 4, "token_choice", "random"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_oracle(case, variant):
    t, e, k, d, f, kind, shape = CASES[case]
    rng = np.random.default_rng(len(case))
    logits = rng.normal(size=(t, e)).astype(np.float32)
    if shape == "empty_experts":
        logits[:, : e // 2] -= 1e4
    elif shape == "one_expert":
        logits[:, 0] += 50.0
    valid = jnp.asarray(rng.random(t) < 0.9)
    budget = jnp.asarray(rng.integers(1, k + 1, t)) if kind == "masked" else None
    r = make_routing(kind, jnp.asarray(logits), k, budget, valid, batch=1)
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    ws = weights(rng, e, d, f)
    want = oracle_moe(x, r, *ws)
    got = jax.jit(run, static_argnums=3)(x, r, ws, VARIANTS[variant])
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    if r.token_major:  # the kernel's own combine over each token's K rows
        combined = cpu_kernels.grouped_swiglu(x, r.token_A, r.expert_A, r.weight_A, *ws,
                                              combine_k=k, variant=VARIANTS[variant])
        np.testing.assert_allclose(np.asarray(combined), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["token_choice", "masked", "expert_choice"])
def test_backend_matches_oracle_and_reference_gradients(kind):
    """Through ``expert_compute``: forward against the oracle; gradients in x, the expert
    weights and the router logits (through the combine weights) against the
    per-assignment jnp reference."""
    rng = np.random.default_rng(3)
    t, e, k, d, f = 60, 6, 3, 24, 20
    logits = jnp.asarray(rng.normal(size=(t, e)), jnp.float32)
    valid = jnp.asarray(np.arange(t) % 7 != 0)
    budget = jnp.asarray(rng.integers(1, k + 1, t)) if kind == "masked" else None
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    ws = weights(rng, e, d, f)
    ct = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)

    def loss(fn):
        def f_(logits, x, *w):
            r = make_routing(kind, logits, k, budget, valid, batch=2)
            return jnp.sum(fn(x, r, *w) * ct)
        return f_

    backend = lambda x, r, *w: moe.expert_compute("cpu_gmm", x, r, *w)
    r = make_routing(kind, logits, k, budget, valid, batch=2)
    y = jax.jit(backend)(x, r, *ws)
    np.testing.assert_allclose(np.asarray(y), oracle_moe(x, r, *ws), rtol=2e-5, atol=2e-5)
    grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3, 4)))(logits, x, *ws)
    for which, g, w in zip(("logits", "x", "w_gate", "w_up", "w_down"), grad(backend),
                           grad(reference_moe)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5,
                                   err_msg=f"d/d{which}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("t,e,k", [(1, 4, 1), (130, 64, 8), (70, 9, 9), (65, 16, 3)])
def test_top_k_ids_match_lax_top_k(t, e, k, variant):
    """Ties (values on a coarse grid), -inf and +inf entries, k = 1 and k = E, row
    counts that are not a multiple of the kernel's 64-row tasks."""
    rng = np.random.default_rng(t * e + k)
    x = np.round(rng.normal(size=(t, e)) * 2) / 2  # many exact ties
    x[rng.random((t, e)) < 0.1] = -np.inf
    x[rng.random((t, e)) < 0.02] = np.inf
    x = jnp.asarray(x, jnp.float32)
    got = jax.jit(cpu_kernels.top_k_ids, static_argnums=1,
                  static_argnames="variant")(x, k, variant=VARIANTS[variant])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.top_k(x, k)[1]))


def test_top_k_ids_rejects_bad_k():
    with pytest.raises(ValueError, match="k=5: expected 1 <= k <= 4"):
        cpu_kernels.top_k_ids(jnp.zeros((2, 4)), 5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bfloat16_kernel_matches_oracle(variant):
    """bfloat16 x and weights (the _bf16 kernel: widened exactly on load, float
    arithmetic, output rounded to bfloat16) against the float64 oracle on the same
    bfloat16 values; both output modes; tails and several tasks per expert."""
    rng = np.random.default_rng(8)
    t, e, k, d, f = 90, 3, 2, 40, 24
    r = make_routing("masked", jnp.asarray(rng.normal(size=(t, e)), jnp.float32), k,
                     jnp.asarray(rng.integers(1, k + 1, t)), jnp.asarray(rng.random(t) < 0.9))
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.bfloat16)
    ws = [w.astype(jnp.bfloat16) for w in weights(rng, e, d, f)]
    want = oracle_moe(x.astype(jnp.float32), r, *(w.astype(jnp.float32) for w in ws))
    args = (x, r.token_A, r.expert_A, r.weight_A, *ws)
    per_row = cpu_kernels.grouped_swiglu(*args, variant=VARIANTS[variant])
    combined = cpu_kernels.grouped_swiglu(*args, combine_k=k, variant=VARIANTS[variant])
    assert per_row.dtype == combined.dtype == jnp.bfloat16
    summed = jax.ops.segment_sum(per_row.astype(jnp.float32), r.token_A, num_segments=t)
    scale = np.abs(want).max()
    for got in (summed, combined):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2,
                                   atol=1e-2 * scale)


def test_backend_keeps_bfloat16_and_casts_other_mixes():
    rng = np.random.default_rng(5)
    r = make_routing("token_choice", jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), 2)
    ws32 = weights(rng, 4, 8, 8)
    x32 = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    want = oracle_moe(x32.astype(jnp.bfloat16).astype(jnp.float32), r,
                      *(w.astype(jnp.bfloat16).astype(jnp.float32) for w in ws32))
    y = moe.expert_compute("cpu_gmm", x32.astype(jnp.bfloat16), r,
                           *(w.astype(jnp.bfloat16) for w in ws32))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)
    # a float16 input with float32 weights computes in float32, returns float16
    y16 = moe.expert_compute("cpu_gmm", x32.astype(jnp.float16), r, *ws32)
    assert y16.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(y16, np.float32),
                               oracle_moe(x32.astype(jnp.float16).astype(jnp.float32), r, *ws32),
                               rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="must all be float32 or all bfloat16"):
        cpu_kernels.grouped_swiglu(x32, r.token_A, r.expert_A, r.weight_A, ws32[0],
                                   ws32[1].astype(jnp.bfloat16), ws32[2])


def test_auto_picks_the_kernel_on_cpu_for_float32_and_bfloat16(caplog):
    with caplog.at_level("INFO", logger="jmoe"):
        assert kernels("cpu").cpu_kernels and not kernels("tpu").cpu_kernels
        assert moe.resolve_backend("auto", platform="cpu") == "cpu_gmm"
        assert moe.resolve_backend("auto", "float32", "cpu") == "cpu_gmm"
        assert moe.resolve_backend("auto", "bfloat16", "cpu") == "cpu_gmm"
        assert moe.resolve_backend("auto", "float16", "cpu") == "bucketed"


def test_bad_kernel_inputs_are_errors_naming_the_problem():
    x = jnp.ones((4, 8), jnp.float32)
    w = jnp.ones((2, 8, 4), jnp.float32)
    w_down = jnp.ones((2, 4, 8), jnp.float32)
    idx = jnp.arange(4, dtype=jnp.int32)
    ones = jnp.ones((4,), jnp.float32)
    experts = jnp.asarray([0, 1, 2, 1], jnp.int32)  # 2 == E: dropped, its token unread
    cases = [((x, idx + 1, experts, ones, w, w, w_down), "token index out of range"),
             ((x, idx, experts - 1, ones, w, w, w_down), "expert id below 0"),
             ((x, idx, experts, ones, w, w, w), "expert weight shapes disagree")]
    for args, message in cases:
        with pytest.raises(Exception, match=message):
            cpu_kernels.grouped_swiglu(*args).block_until_ready()
    y = cpu_kernels.grouped_swiglu(x, idx.at[2].set(99), experts, ones, w, w, w_down)
    assert np.all(np.asarray(y)[2] == 0) and np.all(np.isfinite(np.asarray(y)))
    with pytest.raises(ValueError, match="combine_k=3: needs A == T\\*K, got A=4, T=4"):
        cpu_kernels.grouped_swiglu(x, idx, experts, ones, w, w, w_down, combine_k=3)


def test_build_is_cached_and_failures_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("JMOE_CACHE_DIR", str(tmp_path))
    path = cpu_kernels.build(("-DJMOE_CACHE_TEST",))
    stamp = path.stat().st_mtime_ns
    assert cpu_kernels.build(("-DJMOE_CACHE_TEST",)) == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(RuntimeError, match="building jmoe's CPU kernels failed"):
        cpu_kernels.build(("-fno-such-flag-for-jmoe",))
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no partial library left behind


def test_without_a_compiler_auto_falls_back_and_explicit_is_an_error(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "compiler", lambda: None)
    monkeypatch.setattr(cpu_kernels, "_TARGETS", {})
    monkeypatch.setattr(cpu_kernels, "_FAILED", {})
    with caplog.at_level(logging.WARNING, logger="jmoe"):
        assert moe.resolve_backend("auto", platform="cpu") == "bucketed"
    assert "compiled CPU kernels are unavailable" in caplog.text and "no C++ compiler" in caplog.text
    r = make_routing("token_choice", jnp.zeros((4, 2), jnp.float32), 1)
    ws = weights(np.random.default_rng(0), 2, 8, 4)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
        moe.expert_compute("cpu_gmm", jnp.ones((4, 8), jnp.float32), r, *ws)
    monkeypatch.setenv("JMOE_CPU_KERNELS", "0")
    assert not cpu_kernels.available()


def test_compiler_from_cxx(monkeypatch):
    monkeypatch.setenv("CXX", "g++" if shutil.which("g++") else "c++")
    assert cpu_kernels.compiler() == shutil.which(os.environ["CXX"])


ATTENTION_CASES = {
    # name: (B, L, S, H, N, head_dim, bias shape kind, causal)
    "causal_gqa_odd_sizes": (2, 70, 70, 4, 2, 24, "full", True),  # 3 query blocks, tails
    "bidirectional_padded": (3, 33, 33, 2, 2, 16, "full", False),
    "cache_shaped": (2, 5, 45, 4, 1, 8, "full", False),  # few queries over many keys
    "broadcast_bias": (1, 9, 40, 3, 3, 40, "one", False),  # bias [1, 1, 1, S]
    "single_query": (1, 1, 1, 1, 1, 4, "full", True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_kernel_matches_oracle(case, variant):
    b, l, s, h, n, d, bias_kind, causal = ATTENTION_CASES[case]
    rng = np.random.default_rng(l * s + d)
    q = rng.normal(size=(b, l, h, d))
    k, v = (rng.normal(size=(b, s, n, d)) for _ in range(2))
    valid = rng.random((b, s)) < 0.8
    valid[:, 0] = True  # every query sees at least key 0
    allowed = np.broadcast_to(valid[:, None, :], (b, l, s))
    if causal:
        allowed = allowed & np.tril(np.ones((l, s), bool))
    bias = np.where(allowed, 0.0, -1e30)[:, None]
    if bias_kind == "one":
        bias = np.zeros((1, 1, 1, s))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    got = cpu_kernels.attention(f32(q), f32(k), f32(v), f32(bias), causal=causal,
                                variant=VARIANTS[variant])
    allowed = np.broadcast_to(bias == 0, (b, 1, l, s))[:, 0]  # the bias is 0 or -1e30
    np.testing.assert_allclose(np.asarray(got), oracle_vec(q, k, v, allowed), rtol=2e-5,
                               atol=2e-5)


def test_attention_kernel_gradient_is_the_xla_paths():
    """``dot_attention`` on CPU runs the kernel forward and the XLA formulation's VJP."""
    from jmoe import layers

    rng = np.random.default_rng(9)
    b, l, h, n, d = 2, 40, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, l, hh, d)), jnp.float32) for hh in (h, n, n))
    valid = jnp.asarray(np.arange(l)[None, :] >= np.array([[0], [3]]))
    bias = layers.attention_bias(valid, True)
    ct = jnp.asarray(rng.normal(size=(b, l, h, d)), jnp.float32) * valid[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, bias, 16) * ct)

    got = jax.grad(loss(layers.dot_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(layers.xla_attention), argnums=(0, 1, 2))(q, k, v)
    for which, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                   err_msg=f"d/d{which}")


def test_attention_kernel_rejects_bad_shapes():
    q = jnp.ones((1, 4, 3, 8), jnp.float32)
    kv = jnp.ones((1, 4, 2, 8), jnp.float32)  # 2 kv heads do not divide 3 query heads
    with pytest.raises(Exception, match="N dividing q's H"):
        cpu_kernels.attention(q, kv, kv, jnp.zeros((1, 1, 4, 4))).block_until_ready()
    kv = jnp.ones((1, 5, 3, 8), jnp.float32)
    with pytest.raises(Exception, match="causal needs L == S"):
        cpu_kernels.attention(q, kv, kv, jnp.zeros((1, 1, 4, 5)), causal=True).block_until_ready()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("rotary_dim,head_dim", [(16, 16), (8, 24), (2, 2)])
def test_rotary_kernel_matches_oracle(rotary_dim, head_dim, variant):
    """NeoX rotary on the first R dims (LLaDA2 rotates part of each head), float64 oracle."""
    rng = np.random.default_rng(rotary_dim + head_dim)
    b, l, h = 2, 67, 3
    x = rng.normal(size=(b, l, h, head_dim))
    pos = rng.integers(0, 500, (b, l))
    half = rotary_dim // 2
    inv = 1.0 / 10000.0 ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    ang = np.concatenate([pos[..., None] * inv] * 2, -1)  # [B, L, R]
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    xr = x[..., :rotary_dim]
    rot = np.concatenate([-xr[..., half:], xr[..., :half]], -1)
    want = np.concatenate([xr * c + rot * s, x[..., rotary_dim:]], -1)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    got = cpu_kernels.rotary(f32(x), f32(np.cos(ang)), f32(np.sin(ang)), variant=VARIANTS[variant])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_rotary_kernel_gradient_is_the_xla_paths():
    from jmoe import layers

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 9, 3, 8)), jnp.float32)
    cos, sin = layers.rope_tables(jnp.asarray(rng.integers(0, 50, (2, 9))), 6, 1e4)
    ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    grad = lambda fn: jax.grad(lambda x: jnp.sum(fn(x, cos, sin) * ct))(x)
    np.testing.assert_allclose(np.asarray(grad(layers.apply_rope)),
                               np.asarray(grad(layers.xla_rope)), rtol=1e-6, atol=1e-6)


def test_all_assignments_dropped_give_zero_rows():
    """Every token padding: no expert work at all, zero outputs in both output modes."""
    rng = np.random.default_rng(6)
    t, e, k = 10, 4, 2
    r = make_routing("token_choice", jnp.asarray(rng.normal(size=(t, e)), jnp.float32), k,
                     valid=jnp.zeros((t,), bool))
    assert not bool(r.live_A.any())
    x = jnp.asarray(rng.normal(size=(t, 8)), jnp.float32)
    ws = weights(rng, e, 8, 4)
    per_row = cpu_kernels.grouped_swiglu(x, r.token_A, r.expert_A, r.weight_A, *ws)
    combined = cpu_kernels.grouped_swiglu(x, r.token_A, r.expert_A, r.weight_A, *ws,
                                          combine_k=k)
    assert per_row.shape == (t * k, 8) and combined.shape == (t, 8)
    assert not np.asarray(per_row).any() and not np.asarray(combined).any()
