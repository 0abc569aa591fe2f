"""jmoe's jit wrapper: per-platform compiler options, applied to jmoe's compilations only."""

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import xla_options


def _batched_dot(a, b):
    return jnp.einsum("ECD,EDF->ECF", a, b)


def _hlo(fn, *args):
    return fn.lower(*args).compile().as_text()


def test_cpu_options_turn_off_ynn_dot_fusion_for_jmoe_only():
    if jax.devices()[0].platform != "cpu":
        return
    a, b = jnp.ones((4, 8, 16)), jnp.ones((4, 16, 8))
    assert xla_options.compiler_options("cpu") == xla_options.CPU_OPTIONS
    ours = _hlo(xla_options.jit(_batched_dot), a, b)
    theirs = _hlo(jax.jit(_batched_dot), a, b)
    assert "ynn_fusion" not in ours
    # plain jax.jit keeps XLA's defaults (if this XLA still fuses dots into YNN at all)
    assert "ynn_fusion" in theirs or "ynn" not in theirs


def test_jit_wrapper_keeps_jax_jit_semantics():
    f = xla_options.jit(lambda x, *, n: x * n, static_argnames=("n",))
    np.testing.assert_array_equal(np.asarray(f(jnp.arange(3.0), n=2)), [0.0, 2.0, 4.0])
    assert f.__name__ == "<lambda>"
    assert xla_options.compiler_options("gpu") is None


def test_jit_wrapper_exposes_the_jitted_function():
    f = xla_options.jit(lambda x: x + 1)
    f(jnp.zeros(2))
    assert f._cache_size() == 1
    assert "add" in f.lower(jnp.zeros(2)).as_text()


def test_env_var_keeps_xla_defaults():
    import os
    import subprocess
    import sys

    code = "from jmoe import xla_options; print(xla_options.compiler_options('cpu'))"
    env = dict(os.environ, JMOE_XLA_DEFAULTS="1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "None"


def test_low_precision_weights_are_not_hoisted_to_float32_copies():
    # XLA:CPU dots convert bfloat16 weights to float32; with loop-invariant code motion
    # the convert of a loop-invariant weight moves out of the while loop, so a float32
    # copy of the weight lives through the loop. jmoe's bfloat16 compilations keep the
    # convert inside the loop body.
    if jax.devices()[0].platform != "cpu":
        return
    import dataclasses
    import re

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        dtype: str
        platform: str = "cpu"

    def loop(w, x, *, config):
        return jax.lax.fori_loop(0, 4, lambda i, h: jnp.tanh(h @ w).astype(h.dtype), x)

    w, x = jnp.ones((64, 64), jnp.bfloat16), jnp.ones((8, 64), jnp.bfloat16)
    f = xla_options.jit(loop, static_argnames=("config",))

    def entry_converts_weight(config):
        text = f.lower(w, x, config=config).compile().as_text()
        entry = text[text.index("ENTRY"):]
        entry = entry[:entry.index("\n}")]
        # a [64, 64] float32 value made in the entry computation (outside the loop)
        return bool(re.search(r"= f32\[64,64\]", entry))

    assert xla_options.compiler_options("cpu", True)["xla_disable_hlo_passes"]
    assert not entry_converts_weight(Cfg("bfloat16"))
    # the control: under the options of a float32 model (the pass on) the same program
    # hoists the convert -- what the check above would catch
    assert entry_converts_weight(Cfg("float32"))


def test_cpu_vocab_chunks_are_bit_exact(monkeypatch):
    # the chunked LM head of a bfloat16 model on CPU (no float32 copy of the whole head)
    # gives the plain dot's logits bit for bit, the last chunk overlapping included
    from jmoe import layers

    monkeypatch.setattr(layers, "CPU_VOCAB_CHUNK", 24)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(16, 100)), jnp.bfloat16)  # 5 chunks of 20
    want = np.asarray((x @ w).astype(jnp.float32))
    got = jax.jit(lambda a, b: layers.vocab_logits(a, b, "cpu"))(x, w)
    np.testing.assert_array_equal(np.asarray(got), want)
    # under jmoe's low-precision CPU options (no loop-invariant code motion, which would
    # hoist a convert of the whole head out of the chunk loop) the whole head is never
    # converted
    opts = xla_options.compiler_options("cpu", True)
    text = jax.jit(lambda a, b: layers.vocab_logits(a, b, "cpu"),
                   compiler_options=opts).lower(x, w).compile().as_text()
    made = [ln for ln in text.splitlines() if "= f32[16,100]" in ln
            and ("ROOT" in ln or " fusion(" in ln or " convert(" in ln and "%param" not in ln)]
    assert not made, made  # a float32 whole head is never materialized (only fused slices)
    assert any("= f32[16,20]" in ln and "ROOT" in ln for ln in text.splitlines())
