"""TPU and GPU programs compiled on this CPU machine (``jmoe.aot``), no device needed.

Each check can fail: the programs contain no ``jmoe_*`` CPU custom call (the kernels are
chosen by the target, not by the process's backend), the Pallas kernels compile through
Mosaic (TPU) and Triton (GPU), and the per-device parameter bytes equal a count written
from the config (routed experts split over ``expert``, the rest replicated).
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import aot

def tiny_olmoe(**kw):
    base = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                causal=False, mask_token_id=511, eos_token_id=3, dtype="bfloat16")
    return jmoe.OlmoeConfig(**(base | kw))


def olmoe_param_bytes(c, expert: int) -> int:
    """Per-device bytes of an OLMoE (whole q/k norm, untied head) written from its
    architecture: routed experts split ``expert`` ways, everything else replicated."""
    d, e, f = c.hidden_size, c.num_experts, c.moe_intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attn = d * q + 2 * d * kv + q * d + q + kv
    layer = 2 * d + attn + d * e
    replicated = c.vocab_size * d * 2 + d + c.num_layers * layer
    experts = c.num_layers * 3 * e * d * f
    return (replicated + experts // expert) * 2  # bfloat16


def no_cpu_kernels(p: aot.Plan):
    for name, prog in p.programs.items():
        assert not [c for c in prog.custom_calls if c.startswith("jmoe_")], (name, prog)


@pytest.mark.parametrize("backend", ["ragged", "pallas"])
def test_tpu_mesh_programs_compile_without_cpu_kernels(backend):
    c = tiny_olmoe()
    p = aot.plan(c, target="v5e-8", expert=8, batch=2, prompt_length=16, gen_length=16,
                 block_length=8, moe_backend=backend)
    no_cpu_kernels(p)
    for name, prog in p.programs.items():
        assert prog.param_bytes == olmoe_param_bytes(c, expert=8), name
        assert prog.hbm_bytes >= prog.param_bytes and prog.fits
        assert prog.flops > 0 and prog.bytes_accessed > 0 and prog.roofline_s > 0
        assert prog.all_to_all_bytes > 0  # expert-parallel over 8 devices
    if backend == "pallas":  # the Mosaic kernels are in every program
        assert all("tpu_custom_call" in prog.custom_calls for prog in p.programs.values())


@pytest.mark.parametrize("backend", ["ragged", "pallas"])
def test_gpu_programs_compile_without_cpu_kernels(backend):
    c = tiny_olmoe()
    p = aot.plan(c, target="h100-1", batch=2, prompt_length=16, gen_length=16, block_length=8,
                 moe_backend=backend, programs=("forward", "generate"))
    no_cpu_kernels(p)
    for prog in p.programs.values():
        assert prog.param_bytes == olmoe_param_bytes(c, expert=1)
        assert prog.all_to_all_bytes == 0 and prog.flops > 0
    if backend == "pallas":
        assert all(any("triton" in t for t in prog.custom_calls) for prog in p.programs.values())


def test_block_causal_family_plans_a_cached_step():
    """LLaDA2 (a cache-capable convention): its step is one block over the cache, so it
    reads the weights once for ``block_length`` tokens, far fewer FLOPs than a forward."""
    c = jmoe.LLaDA2Config(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, intermediate_size=80,
                          moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                          n_group=2, topk_group=1, mask_token_id=511, eos_token_id=3,
                          dtype="bfloat16")
    p = aot.plan(c, target="v5e-8", expert=8, batch=2, prompt_length=32, gen_length=32,
                 block_length=8, programs=("forward", "step"))
    no_cpu_kernels(p)
    assert p.programs["step"].flops < p.programs["forward"].flops / 4


def _pallas_grad(lowering):
    from jmoe.routing import softmax_topk
    from pallas_kernels.moe_gmm import BlockSizes, moe_experts

    t, d, f, e = 64, 128, 128, 8
    logits = jax.random.normal(jax.random.key(0), (t, e))
    r = softmax_topk(logits, bound=2, norm_topk_prob=True)

    def loss(x, wg, wu, wd):
        blocks = BlockSizes.for_lowering(lowering, interpret=False)
        y = moe_experts(x, r, wg, wu, wd, lowering=lowering, interpret=False, blocks=blocks)
        return y.astype(jnp.float32).sum()

    shapes = [(t, d), (e, d, f), (e, d, f), (e, f, d)]
    return jax.jit(jax.grad(loss, argnums=range(4))), shapes


@pytest.mark.parametrize("lowering,target,call", [("tpu", "v5e-8", "tpu_custom_call"),
                                                  ("gpu", "h100-1", "triton")])
def test_pallas_kernels_compile_forward_and_backward(lowering, target, call):
    device = aot.target_devices(target)[0]
    grad, shapes = _pallas_grad(lowering)
    one = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=one) for s in shapes]
    text = grad.lower(*args).compile().as_text()
    calls = re.findall(r'custom_call_target="([^"]+)"', text)
    assert sum(call in c for c in calls) >= 2  # gate/up and down forward, and the backward
    assert not [c for c in calls if c.startswith("jmoe_")]


def test_bad_plans_are_one_line_errors(monkeypatch):
    c = tiny_olmoe()
    cases = [(dict(target="v9-8"), "target='v9-8'"),
             (dict(target="v5e-8", data=3), "data=3"),
             (dict(target="v5e-8", data=2, expert=8), "data * expert"),
             (dict(target="v5e-8", programs=("train",)), "programs="),
             (dict(target="v5e-8", batch=0), "batch=0")]
    for kw, words in cases:
        with pytest.raises(ValueError, match=re.escape(words)) as err:
            aot.plan(c, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="num_experts=6") as err:
        aot.plan(tiny_olmoe(num_experts=6), target="v5e-8", expert=8)
    with pytest.raises(ValueError, match="model 'nope'"):
        aot.plan("nope", target="v5e-8")
    from jax.experimental import topologies

    def missing(**_):
        raise RuntimeError("Unable to initialize backend 'tpu'\nmore lines")

    monkeypatch.setattr(topologies, "get_topology_desc", missing)
    with pytest.raises(ValueError, match=r"target 'v5e-8' failed: Unable to init") as err:
        aot.plan(c, target="v5e-8")
    assert "\n" not in str(err.value)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs libtpu: pip install") as err:
        aot.plan(c, target="v5e-8")
    assert "\n" not in str(err.value)


def test_presets_are_plannable_by_name():
    assert set(jmoe.config.PRESETS) == {"olmoe-1b-7b", "llada-moe-7b", "llada2-mini",
                                        "diffusiongemma-26b-a4b"}
    cfg, name = aot.config_of("llada2-mini")
    assert cfg is jmoe.LLADA2_MINI and name == "llada2-mini"
    np.testing.assert_equal(aot.HARDWARE["v5e-8"].chips, 8)


def test_pallas_on_a_data_parallel_tpu_mesh_compiles():
    # a Mosaic kernel cannot be partitioned by XLA: without an expert axis jmoe runs it
    # per data shard in a shard_map (this raised NotImplementedError before)
    p = aot.plan(tiny_olmoe(), target="v5e-8", data=8, expert=1, batch=8, prompt_length=16,
                 gen_length=16, block_length=8, moe_backend="pallas", programs=("forward",))
    no_cpu_kernels(p)
    assert "tpu_custom_call" in p.programs["forward"].custom_calls
    assert p.programs["forward"].all_to_all_bytes == 0


def test_a_causal_model_without_mask_token_is_plannable():
    # OLMoE-1B-7B (causal, no mask token): every program is planned (only shapes matter)
    c = tiny_olmoe(causal=True, mask_token_id=None)
    p = aot.plan(c, target="h100-1", batch=1, prompt_length=8, gen_length=8, block_length=8,
                 moe_backend="ragged")
    assert set(p.programs) == {"forward", "step", "generate"}
    no_cpu_kernels(p)


@pytest.mark.parametrize("backend", ["ragged", "pallas"])
def test_block_expert_sets_compile_for_a_tpu_mesh(backend):
    # AdaptiveExperts(experts_per_block=M) planned: the set choice and the restricted
    # routing lower for Mosaic / XLA:TPU on an expert-parallel mesh, with no CPU kernel
    c = tiny_olmoe()
    p = aot.plan(c, target="v5e-8", expert=8, batch=2, prompt_length=16, gen_length=16,
                 block_length=8, moe_backend=backend, experts_per_block=4,
                 expert_set="first_step", programs=("step", "generate"))
    no_cpu_kernels(p)
    assert (p.experts_per_block, p.expert_set) == (4, "first_step")
    assert "block expert sets M=4 (first_step)" in p.table()
    for name, prog in p.programs.items():
        assert prog.param_bytes == olmoe_param_bytes(c, expert=8), name
        assert prog.fits and prog.flops > 0


def test_bad_block_expert_sets_are_one_line_errors():
    c = tiny_olmoe()
    for kw, words in [(dict(experts_per_block=1), "experts_per_block=1"),
                      (dict(experts_per_block=9), "experts_per_block=9"),
                      (dict(experts_per_block=4, expert_set="nope"), "expert_set='nope'")]:
        with pytest.raises(ValueError, match=re.escape(words)) as err:
            aot.plan(c, target="v5e-8", programs=("forward",), **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="token_choice") as err:
        aot.plan(tiny_olmoe(routing="expert_choice"), target="v5e-8", programs=("forward",),
                 experts_per_block=4)
    assert "\n" not in str(err.value)


def test_a_program_too_big_for_the_chip_is_planned_as_not_fitting():
    # logits [64, 8192, 4096] float32 (8 GiB) and more: the TPU compiler refuses the
    # forward for a v5e's 16 GiB (RESOURCE_EXHAUSTED); the plan says so instead of raising
    import json

    c = tiny_olmoe(vocab_size=4096, max_position_embeddings=8192)
    p = aot.plan(c, target="v5e-4", expert=4, batch=64, prompt_length=4096, gen_length=4096,
                 programs=("forward",))
    prog = p.programs["forward"]
    assert not prog.fits and "RESOURCE_EXHAUSTED" in prog.compile_error
    assert prog.temp_bytes > 16 * aot.GiB  # the need the compiler reported
    assert prog.hbm_bytes == prog.param_bytes + prog.temp_bytes
    assert np.isnan(prog.flops) and np.isnan(prog.roofline_s)
    table = p.table()
    assert "forward: the v5e-4 compiler refused it: RESOURCE_EXHAUSTED" in table
    assert json.loads(json.dumps(p.to_dict()))["programs"]["forward"]["flops"] is None


def test_plans_leave_the_persistent_cache_alone(tmp_path):
    # a target's programs cannot be loaded back from JAX's persistent cache (no client):
    # with the cache on (as `import jmoe` sets it), two plans write nothing there and
    # warn nothing; the cache still works for this process's own programs after
    import subprocess
    import sys

    from conftest import own_stderr_lines

    code = """
import jax, jax.numpy as jnp, jmoe, os, sys
from jmoe import aot
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
c = jmoe.OlmoeConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8,
    num_experts_per_tok=2, causal=False, mask_token_id=511, eos_token_id=3)
for _ in range(2):
    aot.plan(c, target="v5e-4", expert=4, batch=1, prompt_length=8, gen_length=8,
             block_length=8, programs=("forward",))
assert not os.path.exists(sys.argv[1]) or not os.listdir(sys.argv[1]), "plan wrote"
jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(5)).block_until_ready()
print("ENTRIES", len(os.listdir(sys.argv[1])))
"""
    env = dict(os.environ, JMOE_CACHE_DIR=str(tmp_path), JMOE_COMPILATION_CACHE="1",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "jax_cache")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split("ENTRIES")[1]) >= 1  # this process's CPU programs, after
    assert not [ln for ln in own_stderr_lines(r.stderr) if "persistent compilation cache" in ln]
