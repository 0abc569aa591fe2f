"""Expert-parallel checks on 8 virtual CPU devices (issue 6).

Run by ``tests/test_sharding.py`` in a subprocess, because the device count is
fixed when jax starts: ``python tests/sharding_checks.py [check ...]`` prints one
JSON line per check (``{"name", "ok", "error", "seconds"}``).

References: the MoE layer against a NumPy float64 oracle written from the routing
spec (SEEDS.md §1, §5) and against the single-device layer; the whole model (OLMoE,
LLaDA2) and ``generate`` against the same model unsharded. float32, tight tolerance.
"""

from __future__ import annotations

import os

# 8 virtual devices; cheap LLVM passes: these tiny programs are compile-bound
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json
import math
import sys
import tempfile
import time
import traceback

import jax
import jax.extend.core  # jaxprs_in_params
import jax.numpy as jnp
import numpy as np

import jmoe
from jmoe import cpu_kernels, expert_parallel, sharding
from jmoe.model import param_logical_axes
from jmoe.moe import MoE
from jmoe.routing import Budget

MESHES = ((1, 8), (2, 4))  # (data, expert)
TOL = 2e-5                 # float32, relative to the largest output entry
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def close(got, want, tol=TOL, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3g} > {tol}")


# -- NumPy oracle of the MoE layer (from the spec, float64) -----------------------------------

def softmax64(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def token_choice_weights(logits_TE, budget_T, valid_T):
    """[T, E] combine weights: the k_t most probable experts (ties: lower id), weight = prob."""
    p = softmax64(logits_TE)
    w = np.zeros_like(p)
    for t in range(p.shape[0]):
        if valid_T[t]:
            kept = np.argsort(-p[t], kind="stable")[:budget_T[t]]
            w[t, kept] = p[t, kept]
    return w


def expert_choice_weights(logits_BLE, valid_BL, k, cf):
    """[B*L, E]: per sequence, expert e takes its C = min(n, ceil(cf*n*k/E)) best real tokens."""
    b, l, e = logits_BLE.shape
    p = softmax64(logits_BLE)
    w = np.zeros((b, l, e))
    for i in range(b):
        n = int(valid_BL[i].sum())
        cap = min(n, math.ceil(cf * n * k / e))
        real = np.flatnonzero(valid_BL[i])
        for j in range(e):
            best = real[np.argsort(-p[i, real, j], kind="stable")][:cap]
            w[i, best, j] = p[i, best, j]
    return w.reshape(b * l, e)


def oracle_moe(x_TD, w_TE, p):
    x = np.asarray(x_TD, np.float64)
    y = np.zeros_like(x)
    for e in range(w_TE.shape[1]):
        g, u, dn = (np.asarray(p[n][e], np.float64) for n in ("w_gate", "w_up", "w_down"))
        a = x @ g
        y += w_TE[:, e:e + 1] * (((a / (1 + np.exp(-a))) * (x @ u)) @ dn)
    return y


# -- the layer ---------------------------------------------------------------------------------

def layer_case(num_experts, b, l, seed=0):
    rng = np.random.default_rng(seed)
    d, f = 16, 8
    params = {"router": rng.normal(size=(d, num_experts)) / np.sqrt(d),
              "w_gate": rng.normal(size=(num_experts, d, f)) / np.sqrt(d),
              "w_up": rng.normal(size=(num_experts, d, f)) / np.sqrt(d),
              "w_down": rng.normal(size=(num_experts, f, d)) / np.sqrt(f)}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    x = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
    valid = np.ones((b, l), bool)
    valid[0, :2] = False  # left padding in the first sequence
    return params, x, jnp.asarray(valid), rng


def layer_config(params_or_e, *, routing="token_choice", mesh=None, backend="dense", ep_cf=None):
    """A one-layer config whose MoE has the case's experts (top-2, softmax router)."""
    e, f = ((params_or_e["router"].shape[1], params_or_e["w_gate"].shape[-1])
            if isinstance(params_or_e, dict) else (params_or_e, 8))
    return tiny_olmoe(num_layers=1, hidden_size=16, num_experts=e, moe_intermediate_size=f,
                      moe_backend=backend, routing=routing, mesh=mesh, ep_capacity_factor=ep_cf)


def place(params, config, mesh):
    """The MoE params on ``mesh`` by the logical axes the model declares for them."""
    axes = param_logical_axes(config)["layer_0"]["moe"]
    return sharding.shard_params(params, axes, mesh, num_experts=config.num_experts)


def run_block(params, x, valid, budget, *, k_max, routing="token_choice", mesh=None,
              backend="dense", ep_cf=None):
    config = layer_config(params, routing=routing, mesh=mesh, backend=backend, ep_cf=ep_cf)
    if mesh is not None:
        params = place(params, config, mesh)
    block = MoE(config)
    f = jax.jit(lambda p, x, v, k: block.apply({"params": p}, x, v, Budget(k, k_max)))
    return f(params, x, valid, budget)


def layer_against_oracle(num_experts, routing, budgets, backend="dense", b=2, l=12,
                         meshes=MESHES):
    params, x, valid, rng = layer_case(num_experts, b, l)
    k_max = 4 if budgets else 2
    budget = jnp.asarray(rng.integers(1, k_max + 1, (b, l)), jnp.int32) if budgets else None
    logits = np.asarray(x, np.float64).reshape(b * l, -1) @ np.asarray(params["router"],
                                                                       np.float64)
    if routing == "expert_choice":
        w = expert_choice_weights(logits.reshape(b, l, -1), np.asarray(valid), k_max, 1.0)
    else:
        kt = np.full(b * l, k_max) if budget is None else np.asarray(budget).reshape(-1)
        w = token_choice_weights(logits, kt, np.asarray(valid).reshape(-1))
    want = oracle_moe(np.asarray(x).reshape(b * l, -1), w, params).reshape(x.shape)
    single, _ = run_block(params, x, valid, budget, k_max=k_max, routing=routing,
                          backend=backend)
    close(single, want, 1e-5, "single device vs oracle")
    for dp, ep in meshes:
        mesh = sharding.make_mesh(data=dp, expert=ep)
        y, aux = run_block(params, x, valid, budget, k_max=k_max, routing=routing, mesh=mesh,
                           backend=backend)
        close(y, want, 1e-5, f"mesh data={dp} expert={ep} vs oracle")
        close(y, single, TOL, f"mesh data={dp} expert={ep} vs single device")
        if int(aux["ep_dropped"]) != 0:
            raise AssertionError(f"default buffers dropped {int(aux['ep_dropped'])} assignments")


@check
def layer_token_choice_one_expert_per_device():
    layer_against_oracle(8, "token_choice", budgets=False)


@check
def layer_token_choice_budgets_two_and_four_experts_per_device():
    layer_against_oracle(16, "token_choice", budgets=True)


@check
def layer_expert_choice():
    layer_against_oracle(16, "expert_choice", budgets=False)


@check
def layer_uneven_batch_and_length_are_padded():
    # B=3 does not split over data=2, and a data shard's 2*5 tokens not over expert=4
    # (nor 15 over 8 devices): batch and length are padded, and cut off again
    layer_against_oracle(8, "token_choice", budgets=True, b=3, l=5, meshes=((2, 4),))
    layer_against_oracle(8, "expert_choice", budgets=False, b=3, l=5)


@check
def layer_bucketed_ragged_pallas_and_cpu_gmm_backends():
    layer_against_oracle(16, "token_choice", budgets=True, backend="bucketed",
                         meshes=((1, 8),))
    if cpu_kernels.available():  # the compiled CPU kernel, inside shard_map
        layer_against_oracle(8, "expert_choice", budgets=False, backend="cpu_gmm",
                             meshes=((1, 8),))
    layer_against_oracle(8, "expert_choice", budgets=False, backend="ragged",
                         meshes=((2, 4),))
    layer_against_oracle(8, "token_choice", budgets=True, backend="pallas",
                         meshes=((2, 4),))  # Pallas interpret mode on CPU


def oracle_capacity_drops(logits_TE, budget_T, valid_T, mesh_shape, num_experts, cf):
    """Token choice with per-destination buffers of Cs rows: which assignments survive.

    Devices hold contiguous chunks of tokens; a device's live assignments go to shard
    ``e // El`` in token-major, best-first order; the ones past Cs are dropped.
    """
    dp, s = mesh_shape
    t, e = logits_TE.shape
    el, t_l = e // s, t // (dp * s)
    k_max = 4
    cap = min(t_l * min(k_max, el), math.ceil(cf * t_l * k_max / s))
    w = token_choice_weights(logits_TE, budget_T, valid_T)
    p = softmax64(logits_TE)
    dropped = 0
    for dev in range(dp * s):
        used = np.zeros(s, int)
        for tok in range(dev * t_l, (dev + 1) * t_l):
            if not valid_T[tok]:
                continue
            for ex in np.argsort(-p[tok], kind="stable")[:budget_T[tok]]:
                if used[ex // el] >= cap:
                    w[tok, ex] = 0.0
                    dropped += 1
                used[ex // el] += 1
    return w, dropped


@check
def layer_capacity_factor_reports_drops():
    params, x, valid, rng = layer_case(8, 2, 16)
    b, l = valid.shape
    budget = jnp.asarray(rng.integers(1, 5, (b, l)), jnp.int32)
    logits = np.asarray(x, np.float64).reshape(b * l, -1) @ np.asarray(params["router"],
                                                                       np.float64)
    for (dp, ep), cf in (((2, 4), 0.5), ((1, 8), 1.0)):
        w, dropped = oracle_capacity_drops(logits, np.asarray(budget).reshape(-1),
                                           np.asarray(valid).reshape(-1), (dp, ep), 8, cf)
        mesh = sharding.make_mesh(data=dp, expert=ep)
        y, aux = run_block(params, x, valid, budget, k_max=4, mesh=mesh, ep_cf=cf)
        if dropped == 0 or int(aux["ep_dropped"]) != dropped:
            raise AssertionError(f"ep_dropped={int(aux['ep_dropped'])}, oracle {dropped} (> 0)")
        want = oracle_moe(np.asarray(x).reshape(b * l, -1), w, params).reshape(x.shape)
        close(y, want, 1e-5, f"capacity {cf} on data={dp} expert={ep}")


@check
def layer_gradients_match_single_device():
    params, x, valid, _ = layer_case(16, 2, 12)
    weights = jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
    mesh = sharding.make_mesh(data=2, expert=4)

    def grads(p, routing, mesh):
        block = MoE(layer_config(16, routing=routing, mesh=mesh, backend="bucketed"))
        loss = lambda p, x: jnp.sum(block.apply({"params": p}, x, valid, Budget(None, 2))[0]
                                    * weights)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)

    for routing in ("token_choice", "expert_choice"):
        want = grads(params, routing, None)
        got = grads(place(params, layer_config(16, routing=routing), mesh), routing, mesh)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            close(g, w, TOL, f"{routing} gradient {jax.tree_util.keystr(path)}")


def all_to_all_operand_bytes(jaxpr):
    """Bytes of every all_to_all operand in a (nested) jaxpr: what one device sends."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "all_to_all":
            total += sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.invars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += all_to_all_operand_bytes(sub)
    return total


@check
def all_to_all_bytes_formula_matches_the_program():
    for routing, cf, mesh_shape in (("token_choice", None, (2, 4)),
                                    ("token_choice", 1.25, (1, 8)),
                                    ("expert_choice", None, (2, 4))):
        mesh = sharding.make_mesh(data=mesh_shape[0], expert=mesh_shape[1])
        cfg = tiny_olmoe(num_experts=16, moe_intermediate_size=16, routing=routing,
                         ep_capacity_factor=cf, mesh=mesh, moe_backend="dense")
        block = MoE(cfg)
        x, valid = jnp.zeros((3, 10, 32)), jnp.ones((3, 10), bool)
        params = jax.eval_shape(lambda: MoE(cfg.replace(mesh=None)).init(
            jax.random.key(0), x, valid, Budget(None, 2)))
        jaxpr = jax.make_jaxpr(lambda p: block.apply(p, x, valid, Budget(None, 2)))(params)
        got = all_to_all_operand_bytes(jaxpr.jaxpr)
        want = expert_parallel.all_to_all_bytes(cfg, 3, 10, mesh)
        if got != want:
            raise AssertionError(f"{routing} cf={cf}: program sends {got} bytes, formula {want}")


@check
def pack_sends_only_live_assignments():
    mesh = sharding.make_mesh(data=1, expert=8)
    plan = expert_parallel.make_plan(mesh, 1, 32, 16, expert_choice=False, capacity_factor=None)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)       # T_l = 4 tokens
    token = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 3)       # k = 3
    expert = jnp.asarray(rng.permutation(16)[:12], jnp.int32)
    keep = jnp.asarray(rng.random(12) < 0.5)
    expert = jnp.where(keep, expert, 16)                         # budget-dropped: sentinel E
    cap = expert_parallel.capacity_rows(plan, 3)
    send, send_e, slot, dropped = expert_parallel.pack(plan, x, token, expert, keep, cap)
    sent = np.asarray(send_e).reshape(-1) < 2
    if sent.sum() != int(keep.sum()) or int(dropped) != 0:
        raise AssertionError(f"sent {sent.sum()} rows for {int(keep.sum())} live assignments")
    rows = np.asarray(send).reshape(-1, 5)
    for a in np.flatnonzero(np.asarray(keep)):
        s_a = int(slot[a])
        if s_a // cap != int(expert[a]) // 2 or int(send_e.reshape(-1)[s_a]) != int(expert[a]) % 2:
            raise AssertionError(f"assignment {a} packed for the wrong shard or expert")
        np.testing.assert_array_equal(rows[s_a], np.asarray(x)[int(token[a])])
    if np.abs(rows[~sent]).max() != 0:
        raise AssertionError("unsent rows are not zero")


@check
def experts_not_divisible_by_devices_is_a_clear_error():
    mesh = sharding.make_mesh(data=2, expert=4)
    cfg = tiny_olmoe(num_experts=6)
    model = jmoe.random_model(cfg)
    for attempt in (lambda: cfg.replace(mesh=mesh), lambda: jmoe.shard_model(model, mesh)):
        try:
            attempt()
        except ValueError as err:
            if "num_experts=6" not in str(err) or "expert axis size 4" not in str(err):
                raise AssertionError(f"unclear message: {err}")
        else:
            raise AssertionError("num_experts=6 on expert=4 did not raise")
    try:
        sharding.make_mesh(data=3)
    except ValueError as err:
        assert "data=3" in str(err), err
    else:
        raise AssertionError("make_mesh(data=3) on 8 devices did not raise")


# -- whole models -------------------------------------------------------------------------------

def tiny_olmoe(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                causal=False, mask_token_id=96, eos_token_id=3, pad_token_id=1)
    return jmoe.OlmoeConfig(**(base | kw))


def peaked(model):
    # std 0.15 instead of 0.02: well separated router scores and logits
    return model.replace(params=jax.tree.map(lambda p: p * 7.5 if p.ndim >= 2 else p,
                                             model.params))


def tokens_and_mask(b=2, l=12, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, l), np.int32)
    mask[1, :3] = 0
    return rng.integers(0, vocab, (b, l)), mask, rng


def compare_forward(model, meshes=MESHES, **kw):
    want, aux_w = jmoe.forward(model, **kw)
    for dp, ep in meshes:
        sharded = jmoe.shard_model(model, sharding.make_mesh(data=dp, expert=ep))
        got, aux_g = jmoe.forward(sharded, **kw)
        close(got, want, TOL, f"logits on data={dp} expert={ep}")
        np.testing.assert_array_equal(aux_g["expert_counts"], aux_w["expert_counts"])
        if int(aux_g["ep_dropped"]) != 0:
            raise AssertionError("default buffers dropped assignments")


@check
def olmoe_model_budgets():
    # plain token choice (no budgets) on the whole model: load_with_mesh and generate
    model = peaked(jmoe.random_model(tiny_olmoe(moe_backend="bucketed"), seed=0))
    tokens, mask, rng = tokens_and_mask()
    compare_forward(model, tokens_BL=tokens, attention_mask=mask, max_experts=4,
                    experts_per_token=rng.integers(1, 5, tokens.shape))


@check
def olmoe_model_expert_sets():
    # block expert sets (issue 16) with per-token budgets: the restricted routing is
    # computed once outside the shard_map, so every mesh equals the single device
    model = peaked(jmoe.random_model(tiny_olmoe(moe_backend="bucketed"), seed=0))
    tokens, mask, rng = tokens_and_mask()
    compare_forward(model, tokens_BL=tokens, attention_mask=mask, max_experts=3,
                    experts_per_token=rng.integers(1, 4, tokens.shape), experts_per_block=3)


@check
def llada2_model_expert_sets():
    model = tiny_llada2()
    tokens, mask, _ = tokens_and_mask(vocab=71, seed=2)
    compare_forward(model, ((2, 4), (1, 8)), tokens_BL=tokens, attention_mask=mask,
                    experts_per_block=4)


@check
def olmoe_model_expert_choice():
    model = peaked(jmoe.random_model(tiny_olmoe(routing="expert_choice", num_experts=16),
                                     seed=1))
    tokens, mask, _ = tokens_and_mask(seed=1)
    compare_forward(model, tokens_BL=tokens, attention_mask=mask)


@check
def pallas_on_data_parallel_meshes():
    # a Pallas kernel is a custom call XLA cannot partition: on a mesh without an expert
    # axis it runs per data shard (jmoe.moe.data_parallel_experts); batches that split
    # (8 rows) and that do not (2 rows), token choice with budgets and expert choice
    for routing, b in (("token_choice", 8), ("token_choice", 2), ("expert_choice", 8)):
        model = peaked(jmoe.random_model(tiny_olmoe(moe_backend="pallas", routing=routing),
                                         seed=2))
        rng = np.random.default_rng(4)
        tokens = rng.integers(0, 97, (b, 12))
        mask = np.ones((b, 12), np.int32)
        mask[1, :3] = 0
        kw = dict(tokens_BL=tokens, attention_mask=mask)
        if routing == "token_choice":
            kw |= dict(max_experts=4, experts_per_token=rng.integers(1, 5, tokens.shape))
        want, _ = jmoe.forward(model, **kw)
        for dp, ep in ((8, 1),):
            mesh = jax.sharding.Mesh(np.array(jax.devices()[:dp * ep]).reshape(dp, ep),
                                     (sharding.DATA_AXIS, sharding.EXPERT_AXIS))
            got, _ = jmoe.forward(jmoe.shard_model(model, mesh), **kw)
            close(got, want, TOL, f"{routing} b={b} logits on data={dp}")


def tiny_llada2(**kw):
    """The tiny LLaDA2 (tests/llada2_reference.py TINY) with peaked weights and a nonzero
    expert bias."""
    base = dict(vocab_size=71, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                head_dim=8, intermediate_size=40, moe_intermediate_size=12, num_experts=8,
                num_experts_per_tok=3, n_group=4, topk_group=2, num_shared_experts=1,
                first_k_dense_replace=1, routed_scaling_factor=2.5, rotary_fraction=0.5,
                mask_token_id=70, eos_token_id=69, pad_token_id=69, moe_backend="bucketed")
    model = peaked(jmoe.random_model(jmoe.LLaDA2Config(**(base | kw)), seed=2))
    bias = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.05 * jnp.arange(a.shape[0]) if p[-1].key == "expert_bias" else a,
        model.params)
    return model.replace(params=bias)


@check
def llada2_model_budgets():
    model = tiny_llada2()
    tokens, mask, rng = tokens_and_mask(vocab=71, seed=2)
    compare_forward(model, ((2, 4),), tokens_BL=tokens, attention_mask=mask, max_experts=3,
                    experts_per_token=rng.integers(1, 4, tokens.shape))


@check
def llada2_model_expert_choice():
    # sigmoid expert choice: each expert picks among the data shard's whole sequences
    # (a padded batch; capacity 0.25 leaves some tokens unrouted). One dense and one MoE
    # layer: the programs are compile-bound
    model = tiny_llada2(routing="expert_choice", capacity_factor=0.25, num_layers=2)
    tokens, mask, _ = tokens_and_mask(vocab=71, seed=5)
    compare_forward(model, tokens_BL=tokens, attention_mask=mask)
    _, aux = jmoe.forward(model, tokens, attention_mask=mask)
    if not int(np.asarray(aux["unrouted_tokens"]).sum()) > 0:
        raise AssertionError("capacity 0.25 should leave some tokens unrouted")


@check
def load_with_mesh_places_params():
    from jmoe.checkpoint import save_checkpoint

    model = peaked(jmoe.random_model(tiny_olmoe(moe_backend="bucketed"), seed=3))
    mesh = sharding.make_mesh(data=2, expert=4)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model.config, model.params)
        loaded = jmoe.load(tmp, mesh=mesh)
    if loaded.config.mesh != mesh:
        raise AssertionError("config.mesh not set by jmoe.load(path, mesh=mesh)")
    moe = loaded.params["layer_0"]["moe"]
    for name, first in (("w_gate", "expert"), ("router", None)):
        got = moe[name].sharding
        if not isinstance(got, jax.sharding.NamedSharding) or tuple(got.spec)[:1] not in (
                (first,), ()) or any(a is not None for a in tuple(got.spec)[1:]):
            raise AssertionError(f"{name} placed {got}, expected its first axis on {first}")
    if moe["w_gate"].addressable_shards[0].data.shape[0] != 2:
        raise AssertionError("w_gate shards should hold 8/4 = 2 experts each")
    tokens, mask, _ = tokens_and_mask(seed=3)
    close(jmoe.forward(loaded, tokens, attention_mask=mask)[0],
          jmoe.forward(model, tokens, attention_mask=mask)[0], TOL, "loaded sharded model")


@check
def generate_same_tokens_sharded():
    generate = getattr(jmoe, "generate", None)
    if generate is None:
        from jmoe.sampling import generate
    from jmoe.sampling import AdaptiveExperts

    model = peaked(jmoe.random_model(tiny_olmoe(moe_backend="bucketed"), seed=4))
    sharded = jmoe.shard_model(model, sharding.make_mesh(data=2, expert=4))
    rows = [[5, 17, 42, 8, 9, 60, 11], [23, 7, 4]]
    kw = dict(gen_length=8, block_length=4, steps=8,
              adaptive=AdaptiveExperts(initial=1, maximum=4, update_interval=1))
    want, got = generate(model, rows, **kw), generate(sharded, rows, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.experts_per_token, want.experts_per_token)
    if got.expert_work != want.expert_work:
        raise AssertionError(f"expert_work {got.expert_work} != {want.expert_work}")


def main(names):
    if len(jax.devices()) != 8:
        raise SystemExit(f"expected 8 CPU devices, got {jax.devices()}")
    for name in names or list(CHECKS):
        t0 = time.time()
        try:
            CHECKS[name]()
            ok, err = True, ""
        except Exception:  # reported to the parent test, which fails on it
            ok, err = False, traceback.format_exc()
        print(json.dumps({"name": name, "ok": ok, "error": err,
                          "seconds": round(time.time() - t0, 2)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
