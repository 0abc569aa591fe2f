"""``jmoe.generate``: masked-diffusion generation (LLaDA and LLaDA2 conventions) with
adaptive expert budgets and, for LLaDA2, an exact K/V cache of finished blocks.

Shape letters: B batch, P the batch's longest prompt, G generated positions
(``gen_length``), L the canvas, V vocab, S model calls. Diffusion terms: *mask* the
mask token on a position not yet generated; *block* ``block_length`` generated
positions decoded before the next block starts; *step* one model call; *commit*
writing a sampled token for good; *remask* a masked position a step leaves masked;
*budget* a position's number of experts (``experts_per_token``).

Host-side work only: resolve the options once (``options.resolve_options``), tokenise
the prompts, let the convention lay them onto a canvas (``Convention.layout``), call
the compiled loop (``jmoe.sampling.loop.run``) once, and let the convention cut the
output back (``Convention.output``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.sampling import loop
from jmoe.sampling.canvas import GenerateOutput, bucket_length
from jmoe.sampling.options import resolve_convention, resolve_options

__all__ = ["generate", "GenerateOutput", "bucket_length", "resolve_options",
           "resolve_convention"]


def _encode(model, prompts) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        if model.tokenizer is None:
            raise ValueError("string prompts need a model with a tokenizer; pass token ids")
        return [list(model.tokenizer.encode(p)) for p in prompts]
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) in (1, 2):
        arr = np.asarray(prompts)
        return [arr.tolist()] if arr.ndim == 1 else arr.tolist()
    if isinstance(prompts, Sequence) and prompts and all(np.ndim(p) == 1 for p in prompts):
        return [np.asarray(p).tolist() for p in prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, (int, np.integer))
                                                         for t in prompts):
        return [list(prompts)]
    raise ValueError(f"prompts must be a string, a list of strings or token id arrays; got "
                     f"{type(prompts).__name__}")


def _check_tokens(rows: list[list[int]], vocab: int) -> None:
    if not rows:
        raise ValueError("prompts is empty: expected at least one prompt")
    for i, r in enumerate(rows):
        if any(not isinstance(t, (int, np.integer)) or t < 0 or t >= vocab for t in r):
            bad = next(t for t in r if not isinstance(t, (int, np.integer)) or t < 0 or t >= vocab)
            raise ValueError(f"prompt {i} has token id {bad!r} outside the vocabulary [0, {vocab})")


def generate(model, prompts, *, gen_length=None, block_length=None, steps=None,
             temperature=None, cfg_scale=None, remasking=None, threshold=None,
             threshold_floor=None, adaptive=None, mask_id=None, eos_id=None,
             logits_eos_inf=False, confidence_eos_eot_inf=False, early_stop=True, seed=0,
             return_trace=False, convention=None, cache=None) -> GenerateOutput:
    """Generate by masked diffusion (LLaDA or LLaDA2), all steps in one compiled loop.

    An option left ``None`` takes the model's generation default (``config.generation``,
    from the checkpoint's ``generation_config.json``) if it has one for it, else the
    library's default given below ("model, else ..."). See SEEDS.md §1, §3.

    Args:
        model: a ``jmoe.Model`` (``jmoe.load``, ``jmoe.random_model``).
        prompts: a string, a list of strings (needs ``model.tokenizer``), or token ids:
            one list / 1-D array, a list of them, or a ``[B, P]`` array. Rows may differ
            in length; each generates as it would alone.
        gen_length: int, tokens to generate per row. Model, else 128.
        block_length: int, generated positions decoded before the next block starts.
            Model, else the model's ``attention_block_length`` if set, else
            ``min(32, gen_length)``. llada: ``gen_length`` must be a multiple.
        steps: int, model calls of the fixed schedule. Model, else llada: ``gen_length``
            (over the whole generation; a multiple of the number of blocks); llada2:
            ``block_length`` (counted per block).
        temperature: float >= 0, Gumbel-max sampling temperature; 0 is argmax. Model,
            else 0.
        cfg_scale: float >= 0, classifier-free guidance ``un + (cfg_scale + 1) * (cond -
            un)`` with the prompt masked for ``un``; 0 is off. Model, else 0.
        remasking: ``"low_confidence"`` (commit the most probable sampled tokens) or
            ``"random"`` (random confidences). Model, else ``"low_confidence"``.
        threshold: float in (0, 1] or None: threshold parallel decoding, each step
            commits every masked position of the block with confidence >= threshold
            (llada2: strictly >). Model, else None (off: the fixed schedule).
        threshold_floor: ``"one"`` (at least 1 commit a step, as dInfer/Fast-dLLM) or
            ``"schedule"`` (at least the schedule's count, as LLaDA2). Default: the
            convention's, llada ``"one"``, llada2 ``"schedule"``.
        adaptive: ``jmoe.AdaptiveExperts`` or None: per-token expert budgets that grow
            while a position stays masked. Default None (the model's top-k everywhere).
        mask_id: int token id of the mask. Default: ``config.mask_token_id``.
        eos_id: int token id of EOS (early stop, text cut). Default:
            ``config.eos_token_id``.
        logits_eos_inf: bool, never predict EOS. Default False.
        confidence_eos_eot_inf: bool, a sampled EOS gets confidence 0 (committed last).
            Default False.
        early_stop: bool, a row stops after a block in which it committed EOS; its later
            positions become EOS. Default True.
        seed: int, the random stream's key (temperature > 0, random remasking). Default 0.
        return_trace: bool, per model call arrays in ``GenerateOutput.trace``. Default
            False.
        convention: ``"llada"`` (prompt-relative blocks, ``steps`` over the whole
            generation) or ``"llada2"`` (LLaDA2's generate: blocks aligned to absolute
            positions, the first may hold the prompt's tail; block-causal attention;
            ``steps`` per block; stop after a block holding EOS). Default: llada2 for a
            block-causal model (``attention_block_length`` set, any family) and for
            LLaDA2 models, else llada.
        cache: bool, llada2 only: keys/values of the prompt and of each finished block are
            computed once and each step runs the model on the current block only (the
            same tokens, with ``cfg_scale`` and ``temperature`` too). Default: on for
            llada2, except under expert-choice routing.

    Returns:
        ``GenerateOutput``: tokens ``[B, max P + G]`` (left-padded with the pad id),
        texts, nfe, experts_per_token, remask_count, expert_work, trace.

    Raises:
        ValueError: prompts empty, of the wrong type, with token ids outside the
            vocabulary, or strings without a tokenizer; a length not a positive int,
            ``gen_length`` not a multiple of ``block_length`` or ``steps`` not a
            multiple of the number of blocks (llada); prompt + ``gen_length`` past
            ``max_position_embeddings``; ``temperature`` or ``cfg_scale`` < 0;
            ``remasking``, ``threshold_floor`` or ``convention`` not a known name;
            ``threshold`` outside (0, 1]; ``adaptive`` not an ``AdaptiveExperts`` or its
            maximum above ``num_experts``; no mask token; a mask or EOS id outside the
            vocabulary; llada2 on a causal model (``causal=True``); ``cache=True``
            with llada or with expert-choice routing.

    Example:
        out = jmoe.generate(model, ["Hello", "Hi"], gen_length=64, block_length=32,
                            adaptive=jmoe.AdaptiveExperts(growth="linear", maximum=8))
        print(out.texts, out.nfe, out.expert_work)
    """
    config = model.config
    opts, knobs = resolve_options(
        config, gen_length=gen_length, block_length=block_length, steps=steps,
        temperature=temperature, cfg_scale=cfg_scale, remasking=remasking, threshold=threshold,
        threshold_floor=threshold_floor, adaptive=adaptive, mask_id=mask_id, eos_id=eos_id,
        logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
        early_stop=early_stop, return_trace=return_trace, convention=convention, cache=cache)
    rows = _encode(model, prompts)
    _check_tokens(rows, config.vocab_size)
    canvas = opts.convention.layout(rows, opts, config)
    s = loop.run(model.params, jnp.asarray(canvas.tokens_BL), jnp.asarray(canvas.valid_BL),
                 jnp.asarray(canvas.prompt_BL), jax.random.key(seed), knobs,
                 config=canvas.config, opts=canvas.opts)
    return opts.convention.output(model, s, canvas)
