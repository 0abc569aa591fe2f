"""Masked-diffusion training (LLaDA's SFT objective) with the MoE load-balancing loss.

Per sequence ``t ~ U(eps, 1]``; each answer token is replaced by the mask token
with probability t; the loss is the cross-entropy on masked positions weighted by
``1/t`` and divided by the answer length (prompt tokens are never masked), plus
``lb_coef`` times the Switch/OLMoE load-balancing loss. optax AdamW with linear
warmup and cosine decay, global-norm clipping; orbax checkpoints with resume;
deterministic given a seed (the batch of step s depends only on (seed, s)).

Shape letters: B batch, L sequence, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jmoe import routing as routing_lib
from jmoe import xla_options
from jmoe import model as model_lib
from jmoe.model import Model, init_params


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 200
    end_learning_rate_fraction: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lb_coef: float | None = None  # None: the model config's router_aux_loss_coef
    eps: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 500
    max_checkpoints: int = 2
    # the expert backend used while training (same math as the model's own backend;
    # dense is the fastest on CPU at toy sizes); None keeps the model config's
    moe_backend: str | None = None
    prompt_len: int = 8
    answer_len: int = 8
    # addition task only: the fraction of each batch drawn uniformly from [0, 999]^2
    # (jmoe.tasks "uniform"), the rest by digit count ("digits")
    uniform_fraction: float = 0.0
    # stop after this many steps of the ``steps`` schedule (a checkpoint is saved there, so
    # a later run with the same config resumes the same schedule); None: run it all
    stop_at: int | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train config {name}={getattr(self, name)}: expected > 0")
        if not 0 <= self.uniform_fraction <= 1:
            raise ValueError(f"train config uniform_fraction={self.uniform_fraction}: "
                             "expected in [0, 1]")
        if not 0 < self.eps < 1:
            raise ValueError(f"train config eps={self.eps}: expected in (0, 1)")
        if self.stop_at is not None and (isinstance(self.stop_at, bool) or
                                         not isinstance(self.stop_at, int) or self.stop_at <= 0):
            raise ValueError(f"train config stop_at={self.stop_at!r}: expected an int > 0")


def diffusion_loss(params, config, tokens_BL, valid_BL, answer_BL, key, lb_coef: float,
                   eps: float):
    """The masked-diffusion loss of one batch; returns ``(loss, metrics)``."""
    if config.mask_token_id is None:
        raise ValueError("training needs a config with mask_token_id")
    b, _ = tokens_BL.shape
    k_t, k_mask = jax.random.split(key)
    t_B = 1.0 - (1.0 - eps) * jax.random.uniform(k_t, (b,))  # in (eps, 1]
    masked_BL = answer_BL & (jax.random.uniform(k_mask, tokens_BL.shape) < t_B[:, None])
    noisy_BL = jnp.where(masked_BL, config.mask_token_id, tokens_BL)
    logits, aux, _ = model_lib.apply(config, params, noisy_BL, valid_BL=valid_BL)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll_BL = -jnp.take_along_axis(logp, tokens_BL[..., None], axis=-1)[..., 0]
    answer_len_B = jnp.maximum(answer_BL.sum(-1), 1)
    ce = jnp.mean(jnp.where(masked_BL, nll_BL, 0.0).sum(-1) / t_B / answer_len_B)
    lb = aux["load_balancing_loss"]
    return ce + lb_coef * lb, {"ce": ce, "lb": lb}


def make_optimizer(tc: TrainConfig):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1),
        end_value=tc.learning_rate * tc.end_learning_rate_fraction)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                       optax.adamw(schedule, weight_decay=tc.weight_decay))


def _checkpoint_manager(folder: str, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.abspath(folder),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep))


def _optimizer_fields(tc: TrainConfig) -> TrainConfig:
    """``tc`` with only what the update step depends on (the rest set to defaults), so
    runs that differ in seed, length of the run or checkpointing share one program."""
    keep = ("steps", "learning_rate", "warmup_steps", "end_learning_rate_fraction",
            "weight_decay", "grad_clip", "eps")
    return TrainConfig(**{k: getattr(tc, k) for k in keep})


@functools.lru_cache(maxsize=4)
def _update_fn(config, tc: TrainConfig, lb_coef: float):
    """The optimizer and the jitted update step (cached: resuming a run, or a second run
    of the same schedule in one process, reuses the compiled step)."""
    opt = make_optimizer(tc)

    @xla_options.jit
    def update(state, tokens, valid, answer, key):
        grad_fn = jax.value_and_grad(diffusion_loss, has_aux=True)
        (loss, metrics), grads = grad_fn(state["params"], config, tokens, valid, answer, key,
                                         lb_coef, tc.eps)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, dict(metrics, loss=loss)

    return opt, update


def train(config, batch_fn: Callable, tc: TrainConfig = TrainConfig(), *, tokenizer=None,
          checkpoint_dir: str | None = None, progress: bool = True, init=None) -> Model:
    """Train a model of ``config`` from scratch (or resume from ``checkpoint_dir``).

    ``batch_fn(rng: np.random.Generator, batch_size) -> (tokens, valid, answer)``
    (all ``[B, L]``); ``init``: params to start from (fine-tuning) instead of random.
    Example:
        model = train(cfg, lambda rng, b: addition_batch(tok, rng, b), TrainConfig(steps=100))
    """
    import orbax.checkpoint as ocp

    lb_coef = config.router_aux_loss_coef if tc.lb_coef is None else tc.lb_coef
    saved_config = config
    if tc.moe_backend is not None:
        config = config.replace(moe_backend=tc.moe_backend)
    opt, update = _update_fn(config, _optimizer_fields(tc), lb_coef)
    params = init_params(config, tc.seed) if init is None else init
    state = {"params": params, "opt_state": opt.init(params)}
    start = 0
    mngr = _checkpoint_manager(checkpoint_dir, tc.max_checkpoints) if checkpoint_dir else None
    if mngr is not None and mngr.latest_step() is not None:
        start = mngr.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = mngr.restore(start, args=ocp.args.StandardRestore(abstract))

    base_key = jax.random.key(tc.seed)
    stop = tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at)
    bar = tqdm(range(start, stop), initial=start, total=stop, desc="training",
               disable=not progress)
    t0, seen = time.perf_counter(), 0
    for step in bar:
        tokens, valid, answer = batch_fn(np.random.default_rng([tc.seed, step]), tc.batch_size)
        state, metrics = update(state, jnp.asarray(tokens), jnp.asarray(valid),
                                jnp.asarray(answer), jax.random.fold_in(base_key, step))
        seen += int(np.asarray(valid).sum())
        if step % 10 == 0 or step == tc.steps - 1:
            m = jax.device_get(metrics)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lb=f"{m['lb']:.3f}",
                            tok_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if mngr is not None and ((step + 1) % tc.checkpoint_every == 0 or step + 1 == stop):
            mngr.save(step + 1, args=ocp.args.StandardSave(state))
    if mngr is not None:
        mngr.wait_until_finished()
    return Model(saved_config, state["params"], tokenizer)


def addition_batch(tokenizer, rng, batch_size: int, prompt_len: int = 8, answer_len: int = 8,
                   uniform_fraction: float = 0.0):
    """A training batch of the addition task (held-out pairs never appear);
    ``round(uniform_fraction * batch_size)`` rows are drawn uniformly from [0, 999]^2."""
    from jmoe import tasks

    n_uni = int(round(uniform_fraction * batch_size))
    a, b = tasks.addition_pairs(rng, batch_size - n_uni)
    if n_uni:
        au, bu = tasks.addition_pairs(rng, n_uni, distribution="uniform")
        a, b = np.concatenate([a, au]), np.concatenate([b, bu])
    prompts, answers = tasks.addition_texts(a, b)
    return tasks.encode_batch(tokenizer, prompts, answers, prompt_len, answer_len)


def run_from_file(path: str, *, out: str | None = None, steps: int | None = None,
                  stop_at: int | None = None, progress: bool = True) -> Model:
    """``jmoe train --config FILE``: a JSON file with ``model`` (config fields, family
    ``olmoe``), ``train`` (TrainConfig fields), ``task`` (``"addition"``), ``out`` and
    optionally ``init`` (a jmoe checkpoint whose params training starts from).
    The trained model is saved as a jmoe checkpoint at ``out`` (atomically), with
    training checkpoints under ``out + ".train"`` for resuming.
    """
    from jmoe.checkpoint import atomic_dir, config_from_dict, save_checkpoint
    from jmoe.tokenizer import CharTokenizer

    with open(path) as f:
        spec = json.load(f)
    unknown = sorted(set(spec) - {"model", "train", "task", "out", "init"})
    if unknown:
        raise ValueError(f"unknown section(s) {unknown} in {path!r}; expected model, train, task, out")
    if spec.get("task", "addition") != "addition":
        raise ValueError(f"task={spec['task']!r}: the only built-in task is 'addition'")
    tok = CharTokenizer()
    config = config_from_dict(dict(spec["model"], family=spec["model"].get("family", "olmoe")))
    tc_fields = dict(spec.get("train", {}))
    if steps is not None:
        tc_fields["steps"] = steps
    if stop_at is not None:
        tc_fields["stop_at"] = stop_at
    tc = TrainConfig(**tc_fields)
    out = out or spec.get("out")
    if not out:
        raise ValueError("no output folder: give 'out' in the config or --out")
    batch_fn = lambda rng, b: addition_batch(tok, rng, b, tc.prompt_len, tc.answer_len,  # noqa: E731
                                             tc.uniform_fraction)
    init = None
    if spec.get("init"):
        from jmoe.checkpoint import load

        init = load(spec["init"], tokenizer=False).params
    model = train(config, batch_fn, tc, tokenizer=tok, init=init,
                  checkpoint_dir=out.rstrip("/") + ".train", progress=progress)
    with atomic_dir(out, overwrite=True) as tmp:
        save_checkpoint(tmp, config, jax.device_get(model.params))
        tok.save(tmp)
        with open(os.path.join(tmp, "train_config.json"), "w") as f:
            json.dump(spec | {"train": dataclasses.asdict(tc)}, f, indent=2)
    return model
