"""``jmoe.generate``: masked-diffusion generation (LLaDA and LLaDA2 conventions) with
adaptive expert budgets and, for LLaDA2, an exact K/V cache of finished blocks.

Shape letters: B batch, P the batch's longest prompt, G generated positions
(``gen_length``), L = P + G, S model calls. Host-side work only: resolve options,
tokenise and left-pad the prompts into a length bucket (llada2: lay each row out from
position 0 on a canvas of whole blocks), call the compiled loop
(``jmoe.sampling.loop.run``) once, and cut the bucket away again.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.sampling import loop
from jmoe.sampling import remasking as rm
from jmoe.sampling.budgets import AdaptiveExperts
from jmoe.sampling.schedules import check_lengths
from jmoe.sampling.state import SamplerOptions

DEFAULT_GEN_LENGTH = 128
DEFAULT_BLOCK_LENGTH = 32


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """What ``jmoe.generate`` returns (NumPy arrays on the host).

    tokens            ``[B, P + G]`` prompts (left-padded with the pad id) and generation
    texts             decoded generations cut at the first EOS (None without a tokenizer)
    nfe               model calls made (one per step; with CFG both halves share a call)
    experts_per_token ``[B, P + G]`` final budgets (0 on padding)
    remask_count      ``[B, P + G]`` update rounds each position stayed masked (0 on prompts)
    expert_work       routed token-expert pairs summed over model calls and layers
    trace             with ``return_trace``, per model call ``[nfe, B, G]`` arrays (llada2:
                      ``[nfe, B, P + G]``, the columns of ``tokens``): ``committed``,
                      ``experts_per_token`` (the budgets the call used), ``remask_count``
                      (after the call); ``block [nfe]``; ``work [nfe]``
    """

    tokens: np.ndarray
    texts: list[str] | None
    nfe: int
    experts_per_token: np.ndarray
    remask_count: np.ndarray
    expert_work: int
    trace: dict[str, np.ndarray] | None = None


def bucket_length(p: int) -> int:
    """Prompt-region length the loop compiles for: powers of two from 16, then multiples
    of 256, so similar prompt lengths share one compiled loop."""
    if p <= 256:
        return max(16, 1 << max(p - 1, 0).bit_length())
    return -(-p // 256) * 256


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


def _default(value, generation, names, fallback):
    if value is not None:
        return value
    for n in names:
        if generation and generation.get(n) is not None:
            return generation[n]
    return fallback


CONVENTIONS = ("llada", "llada2")


def resolve_convention(config, convention, cache) -> tuple[str, bool]:
    """``convention`` defaults to the family's (llada2 for LLaDA2 models); ``cache``
    (the exact K/V cache of finished blocks) defaults to on for llada2, except under
    expert-choice routing, which needs the whole sequence in every call."""
    if convention is None:
        convention = "llada2" if config.family == "llada2" else "llada"
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: expected one of {CONVENTIONS}")
    if convention == "llada2" and config.family != "llada2":
        raise ValueError(f"convention='llada2' needs block-causal attention, which the "
                         f"{config.family!r} family does not have: use convention='llada'")
    expert_choice = getattr(config, "routing", "token_choice") == "expert_choice"
    if cache is None:
        cache = convention == "llada2" and not expert_choice
    if cache and expert_choice:
        raise ValueError("cache=True with routing='expert_choice': each expert picks among "
                         "the whole sequence's tokens, which a cached call on one block does "
                         "not see; use cache=False (the default for expert choice)")
    if cache and convention != "llada2":
        raise ValueError(f"cache=True needs convention='llada2' (got convention="
                         f"{convention!r}): the LLaDA convention has no block-causal attention")
    return convention, bool(cache)


def resolve_options(config, *, gen_length, block_length, steps, temperature, cfg_scale,
                    remasking, threshold, threshold_floor, adaptive, mask_id, eos_id,
                    logits_eos_inf, confidence_eos_eot_inf, early_stop,
                    return_trace, convention="llada", cache=False) -> SamplerOptions:
    """Fill ``None`` options from the model's generation defaults, then the library's.

    For ``convention="llada2"`` ``steps`` counts per block and ``gen_length`` need not
    be a multiple of ``block_length`` (the canvas is padded to whole blocks).
    """
    gen = config.generation
    gen_length = int(_default(gen_length, gen, ("gen_length", "max_new_tokens"),
                              DEFAULT_GEN_LENGTH))
    block_length = int(_default(block_length, gen, ("block_length",),
                                min(DEFAULT_BLOCK_LENGTH, gen_length)))
    steps = int(_default(steps, gen, ("steps",),
                         block_length if convention == "llada2" else gen_length))
    if convention == "llada2":
        check_lengths(block_length, block_length, steps)  # positive ints
        check_lengths(gen_length, 1, gen_length)
    else:
        check_lengths(gen_length, block_length, steps)
    threshold = _default(threshold, gen, ("threshold",), None)
    if threshold_floor is None:
        threshold_floor = "schedule" if convention == "llada2" else "one"
    if remasking not in rm.REMASKINGS:
        raise ValueError(f"remasking={remasking!r}: expected one of {rm.REMASKINGS}")
    if threshold_floor not in rm.THRESHOLD_FLOORS:
        raise ValueError(f"threshold_floor={threshold_floor!r}: expected one of "
                         f"{rm.THRESHOLD_FLOORS}")
    if threshold is not None and not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold!r}: expected a confidence in (0, 1] or None")
    if not float(temperature) >= 0.0:
        raise ValueError(f"temperature={temperature!r}: expected >= 0")
    if not float(cfg_scale) >= 0.0:
        raise ValueError(f"cfg_scale={cfg_scale!r}: expected >= 0")
    if adaptive is not None:
        if not isinstance(adaptive, AdaptiveExperts):
            raise ValueError(f"adaptive={adaptive!r}: expected jmoe.AdaptiveExperts or None")
        adaptive.check_model(config.num_experts)
    mask_id = mask_id if mask_id is not None else config.mask_token_id
    if mask_id is None:
        raise ValueError("this model has no mask token (config mask_token_id=None): pass "
                         "mask_id=... or load it with mask_token_id=...")
    eos_id = _default(eos_id, None, (), config.eos_token_id)
    for name, v in (("mask_id", mask_id), ("eos_id", eos_id)):
        if v is not None and not 0 <= int(v) < config.vocab_size:
            raise ValueError(f"{name}={v!r}: expected a token id in [0, {config.vocab_size})")
    return SamplerOptions(
        gen_length=gen_length, block_length=block_length, steps=steps, remasking=remasking,
        sampled=float(temperature) > 0, guided=float(cfg_scale) > 0,
        thresholded=threshold is not None, threshold_floor=threshold_floor, adaptive=adaptive,
        mask_id=int(mask_id), eos_id=None if eos_id is None else int(eos_id),
        logits_eos_inf=bool(logits_eos_inf), confidence_eos_eot_inf=bool(confidence_eos_eot_inf),
        early_stop=bool(early_stop), return_trace=bool(return_trace), convention=convention,
        cached=bool(cache))


def _pad_id(config) -> int:
    for v in (config.pad_token_id, config.eos_token_id):
        if v is not None:
            return int(v)
    return 0


def _layout(rows, p_b: int, opts: SamplerOptions, pad_id: int):
    """Right-align each prompt in a ``p_b`` prompt region, then ``G`` mask tokens."""
    b, l = len(rows), p_b + opts.gen_length
    tokens = np.full((b, l), pad_id, np.int32)
    tokens[:, p_b:] = opts.mask_id
    valid = np.zeros((b, l), bool)
    valid[:, p_b:] = True
    for i, r in enumerate(rows):
        if r:
            tokens[i, p_b - len(r):p_b] = r
            valid[i, p_b - len(r):p_b] = True
    prompt = valid & (np.arange(l) < p_b)
    return tokens, valid, prompt


def generate(model, prompts, *, gen_length=None, block_length=None, steps=None,
             temperature=0.0, cfg_scale=0.0, remasking="low_confidence", threshold=None,
             threshold_floor=None, adaptive=None, mask_id=None, eos_id=None,
             logits_eos_inf=False, confidence_eos_eot_inf=False, early_stop=True, seed=0,
             return_trace=False, convention=None, cache=None) -> GenerateOutput:
    """Generate by masked diffusion (LLaDA or LLaDA2), all steps in one compiled loop.

    ``threshold`` switches to threshold parallel decoding: each step commits every
    masked position of the block with confidence >= threshold, at least
    ``threshold_floor`` ones (``"one"``: 1 as dInfer/Fast-dLLM; ``"schedule"``: the
    step's schedule count as LLaDA2). ``adaptive`` gives per-token expert budgets
    that grow while a position stays masked. See SEEDS.md §1, §3.

    ``convention`` (default: the model family's): ``"llada"`` prompt-relative blocks
    and ``steps`` over the whole generation; ``"llada2"`` LLaDA2's generate: blocks
    aligned to absolute positions (the first may hold the prompt's tail), block-causal
    attention, ``steps`` per block, threshold strictly greater with the schedule as
    floor, stop after a block holding EOS; prompts of different lengths in one batch
    each generate as they would alone. ``cache`` (llada2, default on for LLaDA2
    models): keys/values of the prompt and of each finished block are computed once
    and each step runs the model on the current block only (same tokens, with
    ``cfg_scale`` and ``temperature`` too: the random stream is keyed per position).

    Example:
        out = jmoe.generate(model, ["Hello", "Hi"], gen_length=64, block_length=32,
                            adaptive=jmoe.AdaptiveExperts(growth="linear", maximum=8))
        print(out.texts, out.nfe, out.expert_work)
    """
    config = model.config
    convention, cache = resolve_convention(config, convention, cache)
    opts = resolve_options(
        config, gen_length=gen_length, block_length=block_length, steps=steps,
        temperature=temperature, cfg_scale=cfg_scale, remasking=remasking, threshold=threshold,
        threshold_floor=threshold_floor, adaptive=adaptive, mask_id=mask_id, eos_id=eos_id,
        logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
        early_stop=early_stop, return_trace=return_trace, convention=convention, cache=cache)
    rows = _encode(model, prompts)
    _check_tokens(rows, config.vocab_size)
    if convention == "llada2":
        return _generate_llada2(model, rows, opts, seed=seed, temperature=temperature,
                                cfg_scale=cfg_scale, threshold=threshold)
    p = max(len(r) for r in rows)
    if p + opts.gen_length > config.max_position_embeddings:
        raise ValueError(f"prompt length {p} + gen_length {opts.gen_length} = "
                         f"{p + opts.gen_length} exceeds the model's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    p_b = bucket_length(p)
    pad_id = _pad_id(config)
    tokens, valid, prompt = _layout(rows, p_b, opts, pad_id)
    knobs = {"temperature": jnp.float32(temperature), "cfg_scale": jnp.float32(cfg_scale),
             "threshold": jnp.float32(threshold if threshold is not None else 1.0)}
    s = loop.run(model.params, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(prompt),
                 jax.random.key(seed), knobs, config=config, opts=opts)
    return _output(model, s, valid, p_b - p, opts, pad_id)


def _knobs(temperature, cfg_scale, threshold):
    return {"temperature": jnp.float32(temperature), "cfg_scale": jnp.float32(cfg_scale),
            "threshold": jnp.float32(threshold if threshold is not None else 1.0)}


def _generate_llada2(model, rows, opts: SamplerOptions, *, seed, temperature, cfg_scale,
                     threshold) -> GenerateOutput:
    """LLaDA2's layout: each row on a canvas of whole aligned blocks from position 0.

    Row ``i`` (prompt length ``P_i``) holds its prompt, then masks up to its own last
    block ``ceil((P_i + G) / block_length)``, then padding: positions equal canvas
    columns in every row, so blocks are the same columns for all rows (and the K/V
    cache offsets too). The loop's generated region (``G'``) starts at the first block
    holding some row's prompt tail, ``min_i P_i // block_length``; each row's output is
    its prompt and ``gen_length`` positions, left-padded to the longest prompt.
    """
    config = model.config
    bl, g = opts.block_length, opts.gen_length
    lens = np.array([len(r) for r in rows])
    ends = -(-(lens + g) // bl) * bl  # each row's canvas: whole blocks
    l = int(ends.max())
    if threshold is None and config.generation:
        threshold = config.generation.get("threshold")
    if l > config.max_position_embeddings:
        raise ValueError(f"prompt length {int(lens.max())} + gen_length {g} padded to whole "
                         f"blocks = {l} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")
    inner = dataclasses.replace(opts, gen_length=l - int((lens // bl).min()) * bl)
    pad_id = _pad_id(config)
    cols = np.arange(l)
    tokens = np.where(cols < ends[:, None], opts.mask_id, pad_id).astype(np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    valid = cols < ends[:, None]
    prompt = cols < lens[:, None]
    loop_config = config.replace(attention_block_length=bl)
    s = loop.run(model.params, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(prompt),
                 jax.random.key(seed), _knobs(temperature, cfg_scale, threshold),
                 config=loop_config, opts=inner)
    return _output_llada2(model, _output(model, s, valid, 0, inner, pad_id), lens, g, inner,
                          pad_id)


def _output_llada2(model, out: GenerateOutput, lens, g: int, opts: SamplerOptions,
                   pad_id: int) -> GenerateOutput:
    """Canvas columns to the output's: row ``i``'s first ``P_i + G`` columns, right-aligned
    to ``max P + G`` (left-padded as the llada layout). Trace arrays, ``[nfe, B, G']``
    over the loop's region, come back on the same ``[nfe, B, max P + G]`` columns."""
    l, g_int = out.tokens.shape[-1], opts.gen_length
    src_BK = np.arange(int(lens.max()) + g)[None] - (lens.max() - lens)[:, None]
    inside_BK = src_BK >= 0
    src_BK = np.maximum(src_BK, 0)

    def relayout(a_L, fill=0):
        got = np.take_along_axis(a_L, np.broadcast_to(src_BK, a_L.shape[:-2] + src_BK.shape), -1)
        return np.where(inside_BK, got, fill).astype(a_L.dtype)

    tokens = relayout(out.tokens, pad_id)
    trace = out.trace
    if trace is not None:  # the loop's region back on canvas columns, then relaid
        canvas = lambda a: np.concatenate([np.zeros(a.shape[:-1] + (l - g_int,), a.dtype), a], -1)
        trace = dict(trace, **{n: relayout(canvas(trace[n]))
                               for n in ("committed", "experts_per_token", "remask_count")})
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(_cut_eos(r[-g:], opts.eos_id)) for r in tokens.tolist()]
    return dataclasses.replace(out, tokens=tokens, texts=texts,
                               experts_per_token=relayout(out.experts_per_token),
                               remask_count=relayout(out.remask_count), trace=trace)


def _output(model, s, valid, cut: int, opts: SamplerOptions, pad_id: int) -> GenerateOutput:
    s = jax.device_get(s)
    valid = valid[:, cut:]
    tokens = np.where(valid, np.asarray(s.tokens_BL)[:, cut:], pad_id)
    budgets = np.where(valid, np.asarray(s.budget_BL)[:, cut:], 0)
    remask = np.zeros(tokens.shape, np.int32)
    remask[:, -opts.gen_length:] = s.remask_BG
    nfe = int(s.nfe)
    trace = None
    if opts.return_trace:
        t = s.trace
        trace = {"committed": np.asarray(t["committed_SBG"][:nfe]),
                 "experts_per_token": np.asarray(t["budget_SBG"][:nfe]),
                 "remask_count": np.asarray(t["remask_SBG"][:nfe]),
                 "block": np.asarray(t["block_S"][:nfe]),
                 "work": np.asarray(s.work_S[:nfe])}
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(_cut_eos(r[-opts.gen_length:], opts.eos_id))
                 for r in tokens.tolist()]
    return GenerateOutput(tokens=tokens, texts=texts, nfe=nfe, experts_per_token=budgets,
                          remask_count=remask, expert_work=sum(int(w) for w in s.work_S[:nfe]),
                          trace=trace)


def _cut_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids
