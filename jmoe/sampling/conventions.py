"""Sampler conventions: the rules by which LLaDA, LLaDA2 and DiffusionGemma generate, one
object each.

Shape letters: B batch, P a prompt's length, G generated positions (the loop's
region, ``opts.gen_length``), L the canvas, V vocab. Diffusion terms: *mask* the mask
token on a position not yet generated; *block* ``block_length`` generated positions
decoded before the next block starts; *step* one model call; *commit* writing a
sampled token for good; *remask* a masked position a step leaves masked; *budget* a
position's number of experts; *canvas* the token grid the loop runs on.

A convention is a frozen (hashable) dataclass: it rides in ``SamplerOptions``, a jit
static argument, and the loop calls its methods at trace time. It decides

- the layout: how prompts and masks are laid onto the canvas (``layout``) and how
  the output is cut back from it (``output``);
- the lengths: ``default_block_length``, ``default_steps``, ``cap_steps``,
  ``check_lengths``, ``steps_per_block``, ``max_calls``;
- the commit count: threshold comparison (``threshold_strict``) and the default floor
  (``threshold_floor``); the block end (``block_over``);
- which rows a step computes (``gate_call``), how far an uncached call reaches
  (``reach``), when a row is done (``rows_done``);
- whether its attention is block-causal (``block_causal``: the exact K/V cache of
  finished blocks needs it) and which models can run it (``check_model``);
- whether the confidence at temperature > 0 is tempered (``tempered_confidence``:
  llada2, as LLaDA2's ``_sample_with_temperature_topk_topp``).

Which positions a step writes beyond the fixed schedule and the threshold rule is the
decoder's (``decoders.py``); its block end and trace length override these.

``LLaDA``: prompts right-aligned before ``G`` masks (prompt-relative blocks), ``steps``
over the whole generation, threshold ``>=`` with at least one commit. ``LLaDA2``
(LLaDA2's published ``generate``): each row from position 0 on a canvas of whole
blocks aligned to absolute positions, block-causal attention, ``steps`` per block
(capped at ``gen_length``), threshold ``>`` with the schedule as floor, a block ends
early when it has no mask. ``DiffusionGemma`` (transformers'
``DiffusionGemmaGenerationMixin.generate``): llada's layout, canvases of uniform random
tokens (no mask token) denoised by the entropy-bound decoder
(``entropy_bound.EntropyBound``) over an encoder K/V cache (``encoder_decoder``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.sampling import canvas as cv
from jmoe.sampling import entropy_bound
from jmoe.sampling import remasking as rm
from jmoe.sampling import schedules

DEFAULT_BLOCK_LENGTH = 32  # the library's block length (capped or fitted to gen_length)


def positive_length(name: str, value) -> int:
    """``value`` as an int if it is a positive int (a Python or NumPy integer), else a
    ValueError naming ``name``, the value and its type."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        kind = "" if isinstance(value, (int, np.integer)) else f" ({type(value).__name__})"
        raise ValueError(f"{name}={value!r}{kind}: expected a positive int")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Convention:
    """The rules both conventions share; subclasses override what differs."""

    name: str
    threshold_strict: bool  # threshold decoding commits conf > t (else conf >= t)
    threshold_floor: str    # default least commits of a thresholded step
    block_causal: bool      # a block attends only to itself and earlier blocks
    # at temperature > 0 the confidence is the tempered, filtered probability of the
    # sampled token (LLaDA2's reference), else softmax of the raw logits (LLaDA)
    tempered_confidence: bool = False
    # the model is an encoder (causal, writes the K/V cache) and a decoder (the canvas
    # over the cache, writes nothing): model_call.cached_call uses that contract
    encoder_decoder: bool = False

    def check_model(self, config) -> None:
        """Raise ValueError if ``config``'s model cannot run this convention."""

    def default_block_length(self, model_default: int | None, gen_length: int) -> int:
        """``block_length`` when the caller leaves it unset: from the model's default
        (its generation config or ``attention_block_length``; None: none) and the
        resolved ``gen_length``."""
        return model_default or min(DEFAULT_BLOCK_LENGTH, gen_length)

    def default_steps(self, gen_length: int, block_length: int) -> int:
        """The library's ``steps`` when neither the caller nor the model sets it."""
        raise NotImplementedError

    def derive_steps(self, model_steps: int, gen_length: int, block_length: int) -> int:
        """The model's default ``steps`` fitted to lengths the caller set (the model's
        value was chosen for its own lengths)."""
        return model_steps

    def cap_steps(self, gen_length: int, steps: int) -> int:
        """``steps`` as the convention's generate runs it (applied to every value)."""
        return steps

    def check_lengths(self, gen_length: int, block_length: int, steps: int) -> None:
        """Raise ValueError (naming the length) unless the lengths are positive ints
        that fit this convention."""
        for name, v in (("gen_length", gen_length), ("block_length", block_length),
                        ("steps", steps)):
            positive_length(name, v)

    def steps_per_block(self, opts) -> int:
        raise NotImplementedError

    def max_calls(self, opts) -> int:
        """The most model calls a run can make (the trace's length)."""
        raise NotImplementedError

    def commit_count(self, opts):
        """``count(conf_BG, candidates_BG, schedule_B, threshold) -> n_B``."""
        if not opts.thresholded:
            return rm.count_fixed
        return rm.count_threshold(opts.threshold_floor, strict=self.threshold_strict)

    def block_over(self, opts, step, still_masked_BG):
        """Whether the current block ends after step ``step`` (0-based)."""
        raise NotImplementedError

    def gate_call(self, predict, candidates_BG, active_B, carry=None):
        """Run ``predict(rows_B) -> (x0_BG, conf_BG, work, carry)`` on the rows this step
        computes (``work``: the call's routed pairs and expert reads, and the carried
        sets); return its results and whether a model call was made (``carry``: the
        decoder's, returned unchanged without a call)."""
        return *predict(active_B), jnp.bool_(True)

    def reach(self, valid_BL, block, opts):
        """``valid_BL`` of an uncached call: the canvas positions it computes."""
        return valid_BL

    def rows_done(self, gen_BG, active_B, opts):
        """At a block's end, after early stopping: the rows that go on."""
        return active_B

    def initial_tokens(self, tokens_BL, key, config, opts):
        """The canvas the loop starts from (traced): the layout's (mask tokens)."""
        return tokens_BL

    def layout(self, rows: list[list[int]], opts, config) -> cv.Canvas:
        raise NotImplementedError

    def output(self, model, state, canvas: cv.Canvas) -> cv.GenerateOutput:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class LLaDA(Convention):
    """LLaDA's ``generate``: prompt-relative blocks, ``steps`` over the whole generation."""

    name: str = "llada"
    threshold_strict: bool = False
    threshold_floor: str = "one"
    block_causal: bool = False

    def default_block_length(self, model_default: int | None, gen_length: int) -> int:
        """The model's (else 32) if it divides ``gen_length``, else ``gen_length``
        (one block): ``gen_length`` must be a multiple of ``block_length``."""
        block = model_default or DEFAULT_BLOCK_LENGTH
        return block if gen_length % block == 0 else gen_length

    def default_steps(self, gen_length: int, block_length: int) -> int:
        return gen_length

    def derive_steps(self, model_steps: int, gen_length: int, block_length: int) -> int:
        """At most ``gen_length`` (more steps than tokens commit nothing), rounded down
        to a multiple of the number of blocks (at least one step per block)."""
        blocks = gen_length // block_length if gen_length % block_length == 0 else 1
        steps = min(model_steps, gen_length)
        return max(steps - steps % blocks, blocks)

    def check_lengths(self, gen_length: int, block_length: int, steps: int) -> None:
        super().check_lengths(gen_length, block_length, steps)
        schedules.check_lengths(gen_length, block_length, steps)

    def steps_per_block(self, opts) -> int:
        return opts.steps // opts.num_blocks

    def max_calls(self, opts) -> int:
        """Fixed steps make exactly ``steps`` calls; threshold decoding with floor one
        commits at least one token per call, so at most ``gen_length``."""
        if opts.thresholded and opts.threshold_floor == "one":
            return max(opts.gen_length, opts.steps)
        return opts.steps

    def block_over(self, opts, step, still_masked_BG):
        """Fixed steps: after ``steps_per_block`` calls; threshold: when no mask is left."""
        if opts.thresholded:
            return ~still_masked_BG.any()
        return step + 1 >= opts.steps_per_block

    def layout(self, rows, opts, config) -> cv.Canvas:
        """Right-align each prompt in a bucketed prompt region, then ``G`` mask tokens.

        The bucket (``canvas.bucket_length``) lets similar prompt lengths share one
        compiled loop; left padding is invalid, so it changes no position or attention.
        """
        p, g = max(len(r) for r in rows), opts.gen_length
        cv.check_fits(p + g, config, f"prompt length {p} + gen_length {g}")
        p_b = cv.bucket_length(p)
        b, l = len(rows), p_b + g
        pad = cv.pad_id(config)
        tokens = np.full((b, l), pad, np.int32)
        # no mask token (diffusion_gemma): initial_tokens draws the generated region
        tokens[:, p_b:] = opts.mask_id if opts.mask_id is not None else pad
        valid = np.zeros((b, l), bool)
        valid[:, p_b:] = True
        for i, r in enumerate(rows):
            if r:
                tokens[i, p_b - len(r):p_b] = r
                valid[i, p_b - len(r):p_b] = True
        prompt = valid & (np.arange(l) < p_b)
        return cv.Canvas(tokens_BL=tokens, valid_BL=valid, prompt_BL=prompt,
                         lens_B=np.array([len(r) for r in rows]), pad_id=pad, gen_length=g,
                         config=config, opts=opts)

    def output(self, model, state, canvas: cv.Canvas) -> cv.GenerateOutput:
        """The canvas without the bucket's extra padding: ``[B, P + G]``."""
        p_b = canvas.tokens_BL.shape[1] - canvas.gen_length
        out = cv.state_output(state, canvas, p_b - int(canvas.lens_B.max()))
        return cv.with_texts(out, model.tokenizer, canvas.gen_length, canvas.opts.eos_id)


@dataclasses.dataclass(frozen=True)
class LLaDA2(Convention):
    """LLaDA2's ``generate``: aligned blocks, block-causal attention, ``steps`` per block.

    Rows of different prompt lengths in one batch each generate as they would alone:
    a step computes only the rows with a mask in the current block, a block with none
    makes no call, and a row with no mask left is done.
    """

    name: str = "llada2"
    threshold_strict: bool = True
    threshold_floor: str = "schedule"
    block_causal: bool = True
    tempered_confidence: bool = True

    def check_model(self, config) -> None:
        # any family's bidirectional model can run block-causal (the LLaDA2 reference
        # generate builds its mask from block_length); a causal one was never trained
        # to see later positions inside a block
        if config.causal:
            raise ValueError(f"convention={self.name!r} runs block-causal attention "
                             "(bidirectional inside a block), which a causal model "
                             "(causal=True) does not have: use convention='llada'")

    def default_steps(self, gen_length: int, block_length: int) -> int:
        return block_length  # counted per block

    def cap_steps(self, gen_length: int, steps: int) -> int:
        """LLaDA2's generate: ``steps = min(steps, gen_length // minimal_topk)`` with
        ``minimal_topk = 1``, before the schedule over ``block_length`` is built."""
        return min(steps, gen_length)

    # check_lengths: positive ints only; gen_length need not fill whole blocks (the
    # canvas is padded to them)

    def steps_per_block(self, opts) -> int:
        return opts.steps

    @staticmethod
    def until_empty(opts) -> bool:
        """Threshold decoding with at least one commit per step (``threshold_floor="one"``,
        dInfer's and Fast-dLLM's floor) runs a block until it has no mask, as they do:
        its commits follow no schedule that empties the block within ``steps``, which
        would leave masks in the output."""
        return opts.thresholded and opts.threshold_floor == "one"

    def max_calls(self, opts) -> int:
        steps = max(opts.steps, opts.block_length) if self.until_empty(opts) else opts.steps
        return opts.num_blocks * steps

    def block_over(self, opts, step, still_masked_BG):
        """When ``steps`` are spent or no row has a mask left in the block (only the
        latter under ``until_empty``)."""
        if self.until_empty(opts):
            return ~still_masked_BG.any()
        return (step + 1 >= opts.steps_per_block) | ~still_masked_BG.any()

    def gate_call(self, predict, candidates_BG, active_B, carry=None):
        """Only the rows with a mask in the current block: with mixed prompt lengths the
        rows' regions start in different blocks, and a row that emptied the block early
        waits. A block where no row has one (between a short row's region and a long
        prompt's) makes no call at all."""
        busy_B = candidates_BG.any(-1)
        b, g = candidates_BG.shape
        # predict's work (routed pairs and expert reads, carried sets) as zeros; the
        # decoder's carry unchanged
        work = jax.eval_shape(predict, busy_B)[2]
        idle = lambda _: (jnp.zeros((b, g), jnp.int32), jnp.full((b, g), -jnp.inf, jnp.float32),
                          jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), work), carry)
        return *jax.lax.cond(busy_B.any(), predict, idle, busy_B), busy_B.any()

    def reach(self, valid_BL, block, opts):
        """Block-causal: later blocks cannot change this block, so they are left out (as
        the reference runs ``x[:, :window_end]``) and cost no expert work."""
        l = valid_BL.shape[1]
        end = l - opts.gen_length + (block + 1) * opts.block_length
        return valid_BL & (jnp.arange(l) < end)

    def rows_done(self, gen_BG, active_B, opts):
        """A row with no mask left is done (rows' regions end in different blocks)."""
        return active_B & (gen_BG == opts.mask_id).any(-1)

    def layout(self, rows, opts, config) -> cv.Canvas:
        """Each row on a canvas of whole aligned blocks from position 0.

        Row ``i`` (prompt length ``P_i``) holds its prompt, then masks up to its own last
        block ``ceil((P_i + G) / block_length)``, then padding: positions equal canvas
        columns in every row, so blocks are the same columns for all rows (and the K/V
        cache offsets too). The loop's generated region (``G'``) starts at the first
        block holding some row's prompt tail, ``min_i P_i // block_length``.
        """
        bl, g = opts.block_length, opts.gen_length
        lens = np.array([len(r) for r in rows])
        ends = -(-(lens + g) // bl) * bl  # each row's canvas: whole blocks
        l = int(ends.max())
        cv.check_fits(l, config, f"prompt length {int(lens.max())} + gen_length {g} padded "
                                 f"to whole blocks")
        pad = cv.pad_id(config)
        cols = np.arange(l)
        tokens = np.where(cols < ends[:, None], opts.mask_id, pad).astype(np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        return cv.Canvas(
            tokens_BL=tokens, valid_BL=cols < ends[:, None], prompt_BL=cols < lens[:, None],
            lens_B=lens, pad_id=pad, gen_length=g,
            config=config.replace(attention_block_length=bl),
            opts=dataclasses.replace(opts, gen_length=l - int((lens // bl).min()) * bl))

    def output(self, model, state, canvas: cv.Canvas) -> cv.GenerateOutput:
        """Canvas columns to the output's: row ``i``'s first ``P_i + G`` columns,
        right-aligned to ``max P + G`` (left-padded as the llada layout). Trace arrays,
        ``[nfe, B, G']`` over the loop's region, come back on the same columns."""
        out = cv.state_output(state, canvas, 0)
        lens, g, g_loop = canvas.lens_B, canvas.gen_length, canvas.opts.gen_length
        l = out.tokens.shape[-1]
        src_BK = np.arange(int(lens.max()) + g)[None] - (lens.max() - lens)[:, None]
        inside_BK = src_BK >= 0
        src_BK = np.maximum(src_BK, 0)

        def relayout(a_L, fill=0):
            got = np.take_along_axis(a_L, np.broadcast_to(src_BK, a_L.shape[:-2] + src_BK.shape),
                                     -1)
            return np.where(inside_BK, got, fill).astype(a_L.dtype)

        trace = out.trace
        if trace is not None:  # the loop's region back on canvas columns, then relaid
            canvas_cols = lambda a: np.concatenate(
                [np.zeros(a.shape[:-1] + (l - g_loop,), a.dtype), a], -1)
            trace = dict(trace, **{n: relayout(canvas_cols(trace[n]))
                                   for n in ("committed", "experts_per_token", "remask_count")})
        out = dataclasses.replace(out, tokens=relayout(out.tokens, canvas.pad_id),
                                  experts_per_token=relayout(out.experts_per_token),
                                  remask_count=relayout(out.remask_count), trace=trace)
        return cv.with_texts(out, model.tokenizer, g, canvas.opts.eos_id)


@dataclasses.dataclass(frozen=True)
class DiffusionGemma(LLaDA):
    """DiffusionGemma's ``generate`` (transformers' ``DiffusionGemmaGenerationMixin``):
    canvases of ``canvas_length`` (the loop's ``block_length``) uniform random tokens,
    each denoised for at most ``max_denoising_steps`` (the loop's ``steps``, per canvas)
    by the entropy-bound sampler (``entropy_bound.EntropyBound``, the decoder this
    convention runs), then re-encoded causally into the K/V cache before the next.

    Layout and output as llada (prompts left-padded in a bucketed region, padding
    invalid), with ``G`` whole canvases; the output keeps whole canvases as
    transformers does, and (with ``early_stop``) every token after a row's first EOS is
    the pad id, as transformers' ``_finalize_canvas``. A step computes only the rows
    still denoising (llada2's ``gate_call``).
    """

    name: str = "diffusion_gemma"
    encoder_decoder: bool = True

    def check_model(self, config) -> None:
        if getattr(config, "family", None) != "diffusion_gemma":
            raise ValueError(f"convention={self.name!r} needs a DiffusionGemma model (an "
                             f"encoder-decoder with self-conditioning); this model's family is "
                             f"{getattr(config, 'family', None)!r}")

    def default_steps(self, gen_length: int, block_length: int) -> int:
        return 48  # max_denoising_steps (options resolves the real default)

    def check_lengths(self, gen_length: int, block_length: int, steps: int) -> None:
        Convention.check_lengths(self, gen_length, block_length, steps)
        if gen_length % block_length:
            raise ValueError(f"gen_length={gen_length} is not whole canvases of "
                             f"canvas_length={block_length}")

    def steps_per_block(self, opts) -> int:
        return opts.steps

    def max_calls(self, opts) -> int:
        return opts.num_blocks * opts.steps

    def block_over(self, opts, step, still_masked_BG):
        return step + 1 >= opts.steps  # the decoder's stop rule ends a canvas earlier

    gate_call = LLaDA2.gate_call

    def initial_tokens(self, tokens_BL, key, config, opts):
        """Uniform random tokens on the generated region (``entropy_bound.initial_canvas``)."""
        g = opts.gen_length
        init = entropy_bound.initial_canvas(key, tokens_BL.shape[0], jnp.arange(g),
                                            config.vocab_size)
        return tokens_BL.at[:, -g:].set(init)

    def output(self, model, state, canvas: cv.Canvas) -> cv.GenerateOutput:
        """llada's cut; with ``early_stop`` and an EOS id, the pad id after each row's
        first generated EOS (later canvases included)."""
        out = LLaDA.output(self, model, state, canvas)
        eos, g = canvas.opts.eos_id, canvas.gen_length
        if eos is None or not canvas.opts.early_stop:
            return out
        gen = out.tokens[:, -g:]
        after = np.cumsum(gen == eos, axis=-1) - (gen == eos) > 0
        tokens = out.tokens.copy()
        tokens[:, -g:] = np.where(after, canvas.pad_id, gen)
        return dataclasses.replace(out, tokens=tokens)


CONVENTIONS: dict[str, Convention] = {"llada": LLaDA(), "llada2": LLaDA2(),
                                      "diffusion_gemma": DiffusionGemma()}
