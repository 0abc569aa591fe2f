"""Host-side pieces shared by the conventions' layouts: the canvas the compiled loop runs
on, and the ``GenerateOutput`` cut back from its final state.

Shape letters: B batch, P the batch's longest prompt, G generated positions
(``gen_length``), L the canvas length, S model calls. Terms: the *canvas* is the
token grid the loop denoises (prompts, mask tokens to generate, padding); its
*generated region* is its last ``opts.gen_length`` columns, the ones the loop's
blocks cover.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """What ``jmoe.generate`` returns (NumPy arrays on the host).

    tokens            ``[B, P + G]`` prompts (left-padded with the pad id) and generation
    texts             decoded generations cut at the first EOS (None without a tokenizer)
    nfe               model calls made (one per step; with CFG both halves share a call)
    experts_per_token ``[B, P + G]`` final budgets (0 on padding)
    remask_count      ``[B, P + G]`` update rounds each position stayed masked (0 on prompts)
    expert_work       routed token-expert pairs summed over model calls and layers
    expert_reads      distinct experts with at least one routed token, summed over model
                      calls, MoE layers and rows: the expert weights a batch-1 step
                      reads (block expert sets bound it by ``experts_per_block``)
    block_steps       ``[B, blocks]`` model calls each row took part in (had a position
                      to decode), per block of the loop's region; diffusion_gemma: the
                      denoising steps of each canvas (transformers' per-row decoder
                      passes; ``tokens_per_forward`` = kept tokens / their sum)
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
    expert_reads: int = 0
    block_steps: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Canvas:
    """A convention's layout of the prompts: the loop's inputs and what cuts the output.

    ``config`` and ``opts`` are the ones the loop compiles for (a convention may change
    them: llada2 sets block-causal attention and a generated region of whole blocks);
    ``gen_length`` is the caller's G.
    """

    tokens_BL: np.ndarray  # int32: prompts, mask tokens to generate, padding
    valid_BL: np.ndarray   # bool: real tokens (prompts and positions to generate)
    prompt_BL: np.ndarray  # bool: real prompt tokens
    lens_B: np.ndarray     # each row's prompt length
    pad_id: int
    gen_length: int
    config: Any
    opts: Any


def bucket_length(p: int) -> int:
    """Prompt-region length the loop compiles for: powers of two from 16, then multiples
    of 256, so similar prompt lengths share one compiled loop."""
    if p <= 256:
        return max(16, 1 << max(p - 1, 0).bit_length())
    return -(-p // 256) * 256


def pad_id(config) -> int:
    """The padding token: the model's pad id, else its EOS id, else 0."""
    for v in (config.pad_token_id, config.eos_token_id):
        if v is not None:
            return int(v)
    return 0


def check_fits(length: int, config, what: str) -> None:
    if length > config.max_position_embeddings:
        raise ValueError(f"{what} = {length} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")


def state_output(s, canvas: Canvas, cut: int) -> GenerateOutput:
    """The loop's final state as an output without texts: canvas columns from ``cut`` on
    (padding shown as the pad id, budget 0), trace arrays over the generated region."""
    opts = canvas.opts
    s = jax.device_get(s)
    valid = canvas.valid_BL[:, cut:]
    tokens = np.where(valid, np.asarray(s.tokens_BL)[:, cut:], canvas.pad_id)
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
                 "work": np.asarray(s.work_S[:nfe, 0])}
    return GenerateOutput(tokens=tokens, texts=None, nfe=nfe, experts_per_token=budgets,
                          remask_count=remask, expert_work=int(np.sum(s.work_S[:nfe, 0])),
                          trace=trace, expert_reads=int(np.sum(s.work_S[:nfe, 1])),
                          block_steps=np.asarray(s.block_calls_BN))


def with_texts(out: GenerateOutput, tokenizer, gen_length: int, eos_id) -> GenerateOutput:
    """Decode each row's last ``gen_length`` tokens, cut at the first EOS."""
    if tokenizer is None:
        return out
    texts = [tokenizer.decode(cut_eos(r[-gen_length:], eos_id)) for r in out.tokens.tolist()]
    return dataclasses.replace(out, texts=texts)


def cut_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids
