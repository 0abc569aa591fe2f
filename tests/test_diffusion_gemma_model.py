"""DiffusionGemma against transformers' ``DiffusionGemmaForBlockDiffusion`` (tiny random
configs, float32, CPU): the encoder's causal logits over a prompt, the decoder's logits
over a fixed canvas with and without self-conditioning, sliding and full layers with a
window smaller than the prompt, left padding; per-token budgets; the HF round trip;
multimodal and bad-config refusals.

The reference is transformers' PyTorch model (random init, every norm, scale and
layer_scalar perturbed so none is the identity), saved with ``save_pretrained`` and
loaded by ``jmoe.load``. The encoder's logits are its last hidden state through the
tied LM head and the soft-cap, as ``DiffusionGemmaForBlockDiffusion.forward`` applies
them to the decoder's.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.diffusion_gemma")

import jax.numpy as jnp  # noqa: E402

import jmoe  # noqa: E402
from jmoe.config import DiffusionGemmaConfig  # noqa: E402
from jmoe.sampling import model_call  # noqa: E402

V, CANVAS, WINDOW = 96, 6, 4
TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            num_experts=8, top_k_experts=2, moe_intermediate_size=16,
            max_position_embeddings=128)
VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from transformers import DiffusionGemmaConfig as HFConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(0)
    cfg = HFConfig(text_config=TEXT, vision_config=VISION, canvas_length=CANVAS)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():  # no norm, scale or layer_scalar left at its identity init
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if p.ndim == 1 or "layer_scalar" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "experts" in name or "proj" in name or "embed" in name:
                p.copy_(0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "layer_scalar" in name:  # encoder's and decoder's differ (untied)
                b.copy_(1.0 + 0.3 * torch.randn_like(b))
    folder = str(tmp_path_factory.mktemp("dgemma") / "hf")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def jm(hf_model):
    return jmoe.load(hf_model[1], tokenizer=False)


def _close(got, want, what):
    want = np.asarray(want, np.float32)
    scale = float(np.abs(want).max())
    err = float(np.abs(np.asarray(got) - want).max())
    assert err <= 1e-4 * scale, f"{what}: max error {err:.3g} vs logit scale {scale:.3g}"


def _hf_encoder_logits(model, ids, mask=None):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with torch.no_grad():
        enc = model.model.encoder(input_ids=torch.tensor(ids), attention_mask=mask, cache=cache)
        logits = model.lm_head(enc.last_hidden_state).float()
        cap = model.final_logit_softcapping
    return (torch.tanh(logits / cap) * cap).numpy(), enc.cache


def _prompt(b=2, l=9, seed=1):
    return np.random.default_rng(seed).integers(3, V, (b, l)).astype(np.int64)


def test_encoder_logits_match_transformers(hf_model, jm):
    model, _ = hf_model
    ids = _prompt()
    want, _ = _hf_encoder_logits(model, ids)
    got, _ = jmoe.forward(jm, ids)  # jmoe.forward: the encoder's causal logits
    _close(got, want, "encoder (uncached)")
    cache = model_call.new_encoder_cache(jm.config, 2, 16)
    got, work, cache = model_call.encode_call(
        jm.params, jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, bool), None,
        config=jm.config, opts=None, cache=cache, offset=0)
    _close(got, want, "encoder (cached)")
    assert int(cache.length) == ids.shape[1] and int(work[0]) == 3 * 2 * ids.size


@pytest.mark.parametrize("self_cond", [False, True])
def test_decoder_canvas_matches_transformers(hf_model, jm, self_cond):
    model, _ = hf_model
    ids = _prompt()
    canvas = np.random.default_rng(2).integers(0, V, (2, CANVAS)).astype(np.int64)
    sc = np.random.default_rng(3).normal(0, 3, (2, CANVAS, V)).astype(np.float32) \
        if self_cond else None
    _, hf_cache = _hf_encoder_logits(model, ids)
    with torch.no_grad():
        out = model(decoder_input_ids=torch.tensor(canvas), cache=hf_cache,
                    self_conditioning_logits=None if sc is None else torch.tensor(sc))
    cache = model_call.new_encoder_cache(jm.config, 2, 16)
    _, _, cache = model_call.encode_call(
        jm.params, jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, bool), None,
        config=jm.config, opts=None, cache=cache, offset=0)
    got, work, _ = model_call.denoise_call(
        jm.params, jnp.asarray(canvas, jnp.int32), None, config=jm.config, opts=None,
        cache=cache, offset=ids.shape[1], self_cond_BCV=None if sc is None else jnp.asarray(sc))
    _close(got, out.logits.numpy(), f"decoder (self-conditioning={self_cond})")


def test_second_canvas_after_reencoding(hf_model, jm):
    """Re-encode a finished canvas into the cache (sliding layers then see only the window
    across the prompt/canvas boundary) and decode the next canvas."""
    model, _ = hf_model
    ids = _prompt(l=7)
    first = np.random.default_rng(4).integers(0, V, (2, CANVAS)).astype(np.int64)
    nxt = np.random.default_rng(5).integers(0, V, (2, CANVAS)).astype(np.int64)
    _, hf_cache = _hf_encoder_logits(model, ids)
    with torch.no_grad():
        enc = model.model.encoder(input_ids=torch.tensor(first), cache=hf_cache)
        want = model(decoder_input_ids=torch.tensor(nxt), cache=enc.cache).logits.numpy()
    cache = model_call.new_encoder_cache(jm.config, 2, 32)
    for tokens, off in ((ids, 0), (first, ids.shape[1])):
        _, _, cache = model_call.encode_call(
            jm.params, jnp.asarray(tokens, jnp.int32), jnp.ones(tokens.shape, bool), None,
            config=jm.config, opts=None, cache=cache, offset=off)
    got, _, _ = model_call.denoise_call(jm.params, jnp.asarray(nxt, jnp.int32), None,
                                        config=jm.config, opts=None, cache=cache,
                                        offset=ids.shape[1] + CANVAS)
    _close(got, want, "decoder after a re-encoded canvas")


def test_left_padding_matches_transformers(hf_model, jm):
    """Left-padded prompt: transformers' positions count the padding (as the cached call's
    absolute positions do); padding is never attended to, by the encoder or the canvas."""
    model, _ = hf_model
    ids = _prompt()
    mask = np.ones(ids.shape, bool)
    mask[1, :3] = False
    ids[1, :3] = 0
    tmask = torch.tensor(mask.astype(np.int64))
    want, hf_cache = _hf_encoder_logits(model, ids, tmask)
    canvas = np.random.default_rng(6).integers(0, V, (2, CANVAS)).astype(np.int64)
    dmask = torch.cat([tmask, torch.ones(2, CANVAS, dtype=torch.int64)], 1)
    with torch.no_grad():
        dec = model(decoder_input_ids=torch.tensor(canvas), cache=hf_cache,
                    decoder_attention_mask=dmask).logits.numpy()
    cache = model_call.new_encoder_cache(jm.config, 2, 16)
    got, _, cache = model_call.encode_call(
        jm.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), None, config=jm.config,
        opts=None, cache=cache, offset=0)
    _close(np.asarray(got)[mask], want[mask], "padded encoder")
    got, _, _ = model_call.denoise_call(jm.params, jnp.asarray(canvas, jnp.int32), None,
                                        config=jm.config, opts=None, cache=cache,
                                        offset=ids.shape[1])
    _close(got, dec, "decoder over a padded prompt")


def test_per_token_budgets(jm):
    ids = _prompt()
    full, aux = jmoe.forward(jm, ids)
    same, aux_k = jmoe.forward(jm, ids, experts_per_token=np.full(ids.shape, 2),
                               max_experts=2)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(full))
    fewer, aux1 = jmoe.forward(jm, ids, experts_per_token=np.where(
        np.arange(ids.shape[1]) % 2 == 0, 1, 2)[None].repeat(2, 0), max_experts=2)
    assert int(aux1["routed_pairs"]) < int(aux["routed_pairs"])
    assert not np.allclose(np.asarray(fewer), np.asarray(full))
    _, cap = jmoe.forward(jm, ids, capture_router_logits=True, experts_per_block=4)
    assert cap["router_logits"].shape == (3, 2, ids.shape[1], 8)
    assert int(cap["distinct_experts"].max()) <= 4
    usage = jmoe.analysis.analyze_expert_usage(jmoe.get_routing(jm, ids), router=jm.config.router)
    assert len(usage) == 3


def test_round_trip_bit_exact(hf_model, jm, tmp_path):
    from safetensors.numpy import load_file

    from jmoe.convert import hf_to_jmoe, jmoe_to_hf

    _, folder = hf_model
    ckpt = hf_to_jmoe(folder, str(tmp_path / "ck"), progress=False)
    back = jmoe_to_hf(ckpt, str(tmp_path / "hf"), progress=False)
    src, out = load_file(os.path.join(folder, "model.safetensors")), \
        load_file(os.path.join(back, "model.safetensors"))
    text = {k for k in src if ".vision_tower." not in k and ".embed_vision." not in k}
    assert set(out) == text
    for k in text:
        np.testing.assert_array_equal(out[k], src[k], err_msg=k)
    cfg = json.load(open(os.path.join(back, "config.json")))
    assert DiffusionGemmaConfig.from_hf_config(cfg) == jm.config.replace(platform=None) or \
        DiffusionGemmaConfig.from_hf_config(cfg).to_dict() == jm.config.to_dict()
    reloaded = jmoe.load(back, tokenizer=False)
    ids = _prompt()
    np.testing.assert_array_equal(np.asarray(jmoe.forward(reloaded, ids)[0]),
                                  np.asarray(jmoe.forward(jm, ids)[0]))


def test_multimodal_refused(jm):
    from jmoe.model import check_text_only

    cfg = jm.config.replace(image_token_id=7)
    with pytest.raises(ValueError, match="image token id 7"):
        jmoe.forward(jm.replace(config=cfg), [[1, 7, 3]])
    with pytest.raises(ValueError, match="pixel_values"):
        check_text_only(cfg, None, pixel_values=np.zeros((1, 3, 4, 4)))


@pytest.mark.parametrize("change, match", [
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "rope_parameters"),
    ({"per_layer_config": {"2": {"head_dim": 32}, "0": {"head_dim": 8}}}, "per_layer_config"),
])
def test_bad_config_values_refused(change, match):
    hf = {"model_type": "diffusion_gemma", "text_config": {**TEXT, **change}}
    with pytest.raises(ValueError, match=match):
        DiffusionGemmaConfig.from_hf_config(hf)


def test_bad_fields_and_expert_choice_refused():
    base = DiffusionGemmaConfig.from_hf_config({"model_type": "diffusion_gemma",
                                                "text_config": TEXT})
    with pytest.raises(ValueError, match="routing"):
        base.replace(routing="expert_choice")
    with pytest.raises(ValueError, match="mask_token_id"):
        base.replace(mask_token_id=3)
    with pytest.raises(ValueError, match="full_num_kv_heads"):
        base.replace(full_num_kv_heads=3)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def test_geglu_expert_backends_match_oracle():
    """Every expert backend (cpu_gmm where jmoe's CPU kernels build) computes gelu-tanh
    gated experts as a per-assignment float64 loop written from the spec, and cpu_gmm's
    gradient is bucketed's."""
    import jax

    from jmoe import cpu_kernels, moe, routing

    rng = np.random.default_rng(0)
    t, d, f, e, k = 24, 16, 8, 8, 2
    x = rng.normal(size=(t, d)).astype(np.float32)
    wg, wu = (rng.normal(0, 0.3, (e, d, f)).astype(np.float32) for _ in range(2))
    wd = rng.normal(0, 0.3, (e, f, d)).astype(np.float32)
    r = routing.softmax_topk(jnp.asarray(rng.normal(size=(t, e)), jnp.float32), bound=k,
                             norm_topk_prob=True)
    want = np.zeros((t, d))
    for tok, ex, w in zip(np.asarray(r.token_A), np.asarray(r.expert_A), np.asarray(r.weight_A)):
        h = _gelu_tanh(x[tok] @ wg[ex].astype(np.float64)) * (x[tok] @ wu[ex])
        want[tok] += float(w) * (h @ wd[ex])
    backends = ("dense", "bucketed", "ragged", "pallas") + (
        ("cpu_gmm",) if cpu_kernels.available() else ())
    args = tuple(jnp.asarray(a) for a in (x, wg, wu, wd))
    for backend in backends:
        got = moe.expert_compute(backend, args[0], r, *args[1:], platform="cpu",
                                 activation="gelu_tanh")
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5,
                                   err_msg=backend)
    grads = {b: jax.grad(lambda *w, b=b: moe.expert_compute(
        b, w[0], r, *w[1:], platform="cpu", activation="gelu_tanh").sum(), argnums=(0, 1, 2, 3))(
        *args) for b in ("bucketed", "pallas")}  # pallas: its own backward (act' by jvp)
    for b, g in grads.items():
        for got, ref in zip(g, grads["bucketed"]):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5,
                                       err_msg=b)
    with pytest.raises(ValueError, match="activation"):
        moe.backend_for("auto", jnp.float32, "cpu", "relu")


@pytest.mark.parametrize("backend", ["bucketed", "ragged", "pallas"])
def test_model_backends_agree(jm, backend):
    ids = _prompt()
    want, _ = jmoe.forward(jm, ids)
    got, aux = jmoe.forward(jm.replace(config=jm.config.replace(moe_backend=backend)), ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


EP_SCRIPT = r"""
import os, sys
# 8 virtual devices; cheap LLVM passes (tiny programs: compile-bound)
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           "--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np, jax.numpy as jnp, jmoe
from jmoe.sampling import model_call
m = jmoe.load(sys.argv[1], tokenizer=False)
ep = jmoe.shard_model(m, jmoe.make_mesh(expert=8))
ids = np.random.default_rng(1).integers(3, 96, (2, 9))
(a, _), (b, aux) = jmoe.forward(m, ids), jmoe.forward(ep, ids)
assert "ep_dropped" in aux  # the MoE layers ran expert-parallel
out = [float(np.abs(np.asarray(a) - np.asarray(b)).max())]
canvas = jnp.asarray(np.random.default_rng(2).integers(0, 96, (2, 6)), jnp.int32)


def two_passes(params, tokens, canvas, config):
    c = model_call.new_encoder_cache(config, 2, 16)
    _, _, c = model_call.encode_call(params, tokens, jnp.ones((2, 9), bool), None,
                                     config=config, opts=None, cache=c, offset=0)
    return model_call.denoise_call(params, canvas, None, config=config, opts=None, cache=c,
                                   offset=9)[0]


run = jax.jit(two_passes, static_argnames="config")
for mod in (m, ep):
    out.append(np.asarray(run(mod.params, jnp.asarray(ids, jnp.int32), canvas, config=mod.config)))
print("EPDIFF", out[0], float(np.abs(out[1] - out[2]).max()))
"""


def test_expert_parallel_matches_single_device(hf_model):
    """8 virtual CPU devices, experts sharded 8 ways (a subprocess: jax fixes its device
    count at start): encoder and decoder logits equal the single-device model's."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", EP_SCRIPT, hf_model[1]], capture_output=True,
                          text=True, env=env, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("EPDIFF")]
    assert line, proc.stderr[-2000:]
    enc, dec = map(float, line[0].split()[1:])
    assert enc < 1e-5 and dec < 1e-5, (enc, dec)


def test_tpu_plan_compiles_a_tiny_diffusion_gemma():
    """The encoder forward, the canvas decoder step and the whole sampler loop compile
    for a v5e-8 slice without the hardware (experts split 8 ways), with no CPU custom
    call; the per-device parameter bytes equal a count written from the architecture."""
    from jmoe import aot

    pytest.importorskip("libtpu")
    c = DiffusionGemmaConfig.from_hf_config({"model_type": "diffusion_gemma",
                                             "text_config": TEXT, "canvas_length": 8})
    c = c.replace(dtype="bfloat16")
    p = aot.plan(c, target="v5e-8", expert=8, batch=2, prompt_length=16, gen_length=16,
                 moe_backend="ragged")
    d, e, f, v = c.hidden_size, c.num_experts, c.moe_intermediate_size, c.vocab_size
    h = c.num_heads
    # embedding, final norm, self-conditioning (pre-norm + GeGLU)
    replicated = v * d + 2 * d + 3 * d * c.intermediate_size
    for kind in c.layer_types:
        n, k = (c.num_kv_heads, c.head_dim) if kind == "sliding_attention" else \
            (c.full_num_kv_heads, c.full_head_dim)
        attn = 2 * d * h * k + d * n * k * (2 if kind == "sliding_attention" else 1) + 2 * k
        mlp = 3 * d * c.intermediate_size
        replicated += attn + mlp + 7 * d + d * e + d + 2  # norms, router, scale, scalars
    per_expert_scale = 3 * e * 4  # float32, replicated
    experts = 3 * 3 * e * d * f
    want = (replicated + experts // 8) * 2 + per_expert_scale
    assert set(p.programs) == {"forward", "step", "generate"}
    for name, prog in p.programs.items():
        assert not [x for x in prog.custom_calls if x.startswith("jmoe_")], name
        assert prog.param_bytes == want, (name, prog.param_bytes, want)
        assert prog.flops > 0 and prog.all_to_all_bytes > 0


def test_generate_from_an_hf_folder_honours_its_generation_config(hf_model, tmp_path):
    # transformers' own DiffusionGemmaGenerationConfig, saved as the hub's
    # generation_config.json (nested sampler_config, unset fields as null)
    import shutil

    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig)

    folder = tmp_path / "hf"
    shutil.copytree(hf_model[1], folder)
    DiffusionGemmaGenerationConfig(
        max_new_tokens=2 * CANVAS, max_denoising_steps=3, sampler_config=EntropyBoundSamplerConfig(0.3),
        t_min=0.2, t_max=0.9, stability_threshold=1, confidence_threshold=0.01,
    ).save_pretrained(folder)
    model = jmoe.load(str(folder), tokenizer=False)
    gen = model.config.generation
    assert (gen["gen_length"], gen["max_denoising_steps"], gen["entropy_bound"],
            gen["t_min"], gen["t_max"]) == (2 * CANVAS, 3, 0.3, 0.2, 0.9)
    out = jmoe.generate(model, [[5, 6, 7, 8], [9, 10]], seed=0)
    # the prompts left-padded to 4, then two canvases of CANVAS
    assert np.asarray(out.tokens).shape == (2, 4 + 2 * CANVAS)
    steps = np.asarray(out.block_steps)
    assert steps.shape == (2, 2) and steps.max() <= 3 and steps.min() >= 1
    assert 0 <= np.asarray(out.tokens).min() and np.asarray(out.tokens).max() < V
