"""Training: the masked-diffusion loss against a NumPy restatement, determinism and
resume, the toy task's held-out split, and the char tokenizer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import tasks
from jmoe.tokenizer import CharTokenizer
from jmoe.train import TrainConfig, addition_batch, diffusion_loss, train

TOK = CharTokenizer()
CFG = jmoe.OlmoeConfig(vocab_size=TOK.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=4,
                       num_experts_per_tok=2, causal=False, mask_token_id=2, eos_token_id=1,
                       pad_token_id=0, max_position_embeddings=32)


# the expert backend the shipped model trains with (jmoe/default_model/train_config.json);
# the other backends' gradients are checked against the dense oracle in test_backends and
# test_cpu_kernels, and compile about 3x slower here
DENSE = "dense"


# the loss as training evaluates it (jitted; op by op it takes about 15 s here)
loss_fn = jax.jit(diffusion_loss, static_argnums=(1,))


def batch_fn(rng, b):
    return addition_batch(TOK, rng, b, 8, 6)


def test_loss_matches_numpy_restatement():
    params = jmoe.init_params(CFG, 0)
    tokens, valid, answer = batch_fn(np.random.default_rng(0), 5)
    key = jax.random.key(7)
    loss, m = loss_fn(params, CFG, jnp.asarray(tokens), jnp.asarray(valid),
                             jnp.asarray(answer), key, lb_coef=0.5, eps=1e-3)
    # the same draws, restated: t in (eps, 1], mask answer tokens with probability t
    k_t, k_mask = jax.random.split(key)
    t = 1.0 - (1.0 - 1e-3) * np.asarray(jax.random.uniform(k_t, (5,)))
    masked = answer & (np.asarray(jax.random.uniform(k_mask, tokens.shape)) < t[:, None])
    assert masked.any() and not (masked & ~answer).any()
    noisy = np.where(masked, 2, tokens)
    logits, aux = jmoe.forward(jmoe.Model(CFG, params), noisy, attention_mask=valid)
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    ce = np.mean((nll * masked).sum(-1) / t / answer.sum(-1))
    np.testing.assert_allclose(float(m["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), ce + 0.5 * float(aux["load_balancing_loss"]), rtol=1e-5)


def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    tc = TrainConfig(steps=4, batch_size=8, warmup_steps=2, checkpoint_every=2, seed=3,
                     moe_backend=DENSE)
    a = train(CFG, batch_fn, tc, progress=False)
    b = train(CFG, batch_fn, dataclasses.replace(tc, steps=2), progress=False,
              checkpoint_dir=str(tmp_path / "ck"))
    b = train(CFG, batch_fn, tc, progress=False, checkpoint_dir=str(tmp_path / "ck"))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    init = jax.tree.leaves(jmoe.init_params(CFG, 3))
    assert any(not np.array_equal(x, y) for x, y in zip(init, jax.tree.leaves(a.params)))


def test_stop_at_keeps_the_schedule_and_resumes_it(tmp_path):
    # --stop-at N runs N steps of the whole schedule (unlike --steps N, a schedule of N
    # steps): the default model's stage 3 was stopped this way and resumed
    tc = TrainConfig(steps=6, batch_size=8, warmup_steps=1, checkpoint_every=10, seed=5,
                     moe_backend=DENSE)
    full = train(CFG, batch_fn, tc, progress=False)
    ck = str(tmp_path / "ck")
    half = train(CFG, batch_fn, dataclasses.replace(tc, stop_at=3), progress=False,
                 checkpoint_dir=ck)
    short = train(CFG, batch_fn, dataclasses.replace(tc, steps=3), progress=False)
    assert any(not np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(half.params), jax.tree.leaves(short.params)))
    done = train(CFG, batch_fn, tc, progress=False, checkpoint_dir=ck)
    for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(done.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="stop_at=0: expected an int > 0"):
        TrainConfig(stop_at=0)


def test_training_reduces_the_loss():
    tc = TrainConfig(steps=60, batch_size=32, warmup_steps=5, learning_rate=3e-3, seed=0,
                     moe_backend=DENSE)
    model = train(CFG, batch_fn, tc, progress=False)
    key = jax.random.key(99)
    tokens, valid, answer = (jnp.asarray(x) for x in batch_fn(np.random.default_rng(99), 64))
    before, _ = loss_fn(jmoe.init_params(CFG, 0), CFG, tokens, valid, answer, key, 0.0, 1e-3)
    after, _ = loss_fn(model.params, CFG, tokens, valid, answer, key, 0.0, 1e-3)
    assert float(after) < 0.7 * float(before)


def test_held_out_pairs_never_train():
    a, b = tasks.addition_pairs(np.random.default_rng(0), 5000)
    ha, hb = tasks.addition_pairs(np.random.default_rng(1), 300, held_out=True)
    assert not set(zip(a.tolist(), b.tolist())) & set(zip(ha.tolist(), hb.tolist()))
    assert tasks._held_out(ha, hb).all() and not tasks._held_out(a, b).any()
    assert a.max() <= 999 and (a < 10).any() and (a >= 100).any()


def test_encode_batch_layout():
    tokens, valid, answer = tasks.encode_batch(TOK, ["1+2=", "123+456="], ["3", "579"], 8, 6)
    assert TOK.decode(tokens[0]) == "1+2=3" and TOK.decode(tokens[1]) == "123+456=579"
    assert (tokens[0, :4] == 0).all() and not valid[0, :4].any() and valid[0, 4:].all()
    assert (tokens[1, 11:] == TOK.eos_token_id).all() and answer[:, 8:].all()
    assert not answer[:, :8].any()
    with pytest.raises(ValueError, match="does not fit"):
        tasks.encode_batch(TOK, ["1234+5678="], ["6912"], 8, 6)


def test_char_tokenizer_round_trip_and_errors(tmp_path):
    text = "12+3=15, hello"
    assert TOK.decode(TOK.encode(text)) == text
    assert TOK.decode([0, 1, 2] + TOK.encode("7")) == "7"
    with pytest.raises(ValueError, match=r"\['#'\]"):
        TOK.encode("1#2")
    TOK.save(tmp_path)
    assert CharTokenizer.load(tmp_path).encode("9") == TOK.encode("9")
    with pytest.raises(ValueError, match="steps=0"):
        TrainConfig(steps=0)
