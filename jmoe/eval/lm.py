"""jmoe as an lm-evaluation-harness model (``lm_eval --model jmoe``).

A face: it loads with ``jmoe.load``, generates with ``jmoe.generate`` and scores
continuations with ``jmoe.forward`` (``jmoe.eval.likelihood``); no model logic here.
Needs the ``eval`` extra (``pip install "jmoe[eval]"``: lm_eval 0.4.x).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from jmoe import tokenizer as tokenizer_lib
from jmoe.eval.likelihood import Usage, causal_loglikelihood, diffusion_loglikelihood

log = logging.getLogger(__name__)

# model args passed to jmoe.generate as they are
GENERATE_OPTIONS = (
    "gen_length", "block_length", "steps", "temperature", "cfg_scale", "remasking",
    "threshold", "threshold_floor", "mask_id", "eos_id", "logits_eos_inf",
    "confidence_eos_eot_inf", "early_stop", "seed", "convention", "cache", "cache_refresh",
    "decoder", "low_threshold", "edit_threshold", "max_post_steps", "credit_alpha",
    "credit_boost", "credit_decay", "top_k", "top_p")
# model args building jmoe.AdaptiveExperts: model arg -> field
ADAPTIVE_OPTIONS = {"adaptive": "growth", "adaptive_initial": "initial",
                    "adaptive_maximum": "maximum", "update_interval": "update_interval",
                    "experts_per_block": "experts_per_block", "expert_set": "expert_set",
                    "set_coverage": "set_coverage"}
# gen_kwargs of a task that jmoe honours; any other is refused
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _cache_arg(v):
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def _window_arg(v):
    """``cache_window`` as ``"BEFORE:AFTER"`` (lm_eval's model args split on commas)."""
    if v is None or isinstance(v, (tuple, list)):
        return v
    parts = str(v).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"cache_window={v!r}: expected 'BEFORE:AFTER', two ints >= 0")
    return int(parts[0]), int(parts[1])


@register_model("jmoe")
class JmoeLM(LM):
    """An lm_eval ``LM`` over a jmoe model: masked-diffusion generation and likelihoods.

    Model args (``--model_args k=v,...``):
        pretrained: a jmoe checkpoint or HF folder; empty or unset: the shipped
            default model (``jmoe.load()``).
        gen_length, block_length, steps, temperature, cfg_scale, remasking, threshold,
        threshold_floor, decoder, low_threshold, edit_threshold, max_post_steps,
        credit_alpha, credit_boost, credit_decay, top_k, top_p, convention, cache
            (``exact``/``prefix``/``dual``/``true``/``false``), cache_refresh,
        cache_window (``BEFORE:AFTER``), mask_id, eos_id, logits_eos_inf,
        confidence_eos_eot_inf, early_stop, seed: ``jmoe.generate`` options (unset: the
            model's generation defaults, then the library's).
        experts_per_token: int, a fixed top-k for every token (generation and scoring).
        adaptive (``linear``/``exponential``), adaptive_initial, adaptive_maximum,
        update_interval, experts_per_block, expert_set, set_coverage:
            ``jmoe.AdaptiveExperts``
            (adaptive budgets; block expert sets). Scoring uses ``experts_per_block``
            (rule ``mass``) with ``set_coverage``, and the model's top-k (or
            ``experts_per_token``).
        mc_num (128), mc_batch_size (``min(32, mc_num)``): the likelihood's Monte Carlo
            draws per request and rows per model call (``jmoe.eval.likelihood``);
            ``mc_num`` must be a multiple of ``mc_batch_size``.
        is_check_greedy (False): also decide, by greedy decoding, whether each scored
            continuation is the model's greedy one (one ``jmoe.generate`` per request).
        Any other key is a ``jmoe.load`` config override (``dtype``, ``moe_backend``,
        ``mask_token_id``, ...); an unknown one is a ValueError naming it.
    lm_eval's ``batch_size`` is the number of prompts per ``jmoe.generate`` call
    (``auto``: 64); ``device`` is ignored (JAX places the model on its default device).

    Expert work and model calls are counted and reported in the results' ``config``
    section under ``jmoe`` (``get_model_info``).

    Example:
        lm_eval.simple_evaluate(model="jmoe", model_args="threshold=0.9",
                                tasks=["jmoe_addition"], task_manager=tm)
    """

    def __init__(self, pretrained: str | None = None, batch_size=None, max_batch_size=None,
                 device=None, mc_num: int = 128, mc_batch_size: int | None = None,
                 is_check_greedy: bool = False, experts_per_token: int | None = None,
                 **kwargs):
        super().__init__()
        import jmoe

        self._generate_kw = {k: kwargs.pop(k) for k in GENERATE_OPTIONS if k in kwargs}
        if "cache" in self._generate_kw:
            self._generate_kw["cache"] = _cache_arg(self._generate_kw["cache"])
        if "cache_window" in kwargs:
            self._generate_kw["cache_window"] = _window_arg(kwargs.pop("cache_window"))
        adaptive = {f: kwargs.pop(k) for k, f in ADAPTIVE_OPTIONS.items() if k in kwargs}
        self.model = jmoe.load(pretrained or None, **kwargs)
        self.pretrained = pretrained or "default"
        if experts_per_token is not None:
            if "growth" in adaptive or "initial" in adaptive or "maximum" in adaptive:
                raise ValueError(f"experts_per_token={experts_per_token!r} with adaptive "
                                 f"budgets {adaptive}: expected one of the two")
            adaptive.update(initial=experts_per_token, maximum=experts_per_token)
        self.adaptive = jmoe.AdaptiveExperts(**adaptive) if adaptive else None
        self._forward_kw = {}
        if experts_per_token is not None:
            self._forward_kw["experts_per_token"] = experts_per_token
        if adaptive.get("experts_per_block") is not None:
            self._forward_kw["experts_per_block"] = adaptive["experts_per_block"]
            self._forward_kw["set_coverage"] = self.adaptive.set_coverage
        if mc_batch_size is None:
            mc_batch_size = min(32, mc_num) if isinstance(mc_num, int) else 32
        self.mc_num, self.mc_batch_size = mc_num, mc_batch_size
        if not (isinstance(mc_batch_size, int) and mc_batch_size >= 1 and
                isinstance(mc_num, int) and mc_num >= 1 and mc_num % mc_batch_size == 0):
            raise ValueError(f"mc_num={mc_num!r}, mc_batch_size={mc_batch_size!r}: expected "
                             f"ints >= 1 with mc_num a multiple of mc_batch_size")
        self.is_check_greedy = bool(is_check_greedy)
        if not self.model.config.causal or self.model.config.mask_token_id is not None:
            # bad sampler options fail here, in one line, before any request runs
            from jmoe.sampling.generate import random_key
            from jmoe.sampling.options import resolve_options

            random_key(self._generate_kw.get("seed", 0))
            opts, _ = resolve_options(
                self.model.config, adaptive=self.adaptive,
                **{k: v for k, v in self._generate_kw.items() if k != "seed"})
            max_pos = self.model.config.max_position_embeddings
            if opts.gen_length >= max_pos:
                raise ValueError(f"gen_length={opts.gen_length} leaves no room for a context "
                                 f"in the model's max_position_embeddings={max_pos}")
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 64
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1 or 'auto'")
        self.batch_size = int(batch_size)
        if device not in (None, "cpu", "cuda", "tpu"):
            log.warning("jmoe: device=%r is not used: JAX runs the model on its default "
                        "device", device)
        self._chat = False  # set once lm_eval applies the chat template to contexts
        self.usage = {"generate": Usage(), "generate_nfe": 0, "loglikelihood": Usage()}

    # ---- text <-> ids -----------------------------------------------------------------

    @property
    def tokenizer(self):
        tok = self.model.tokenizer
        if tok is None:
            raise ValueError("the model has no tokenizer: lm_eval passes text, so jmoe's "
                             "evaluation needs a checkpoint with tokenizer files")
        return tok

    def tok_encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        if isinstance(tok, tokenizer_lib.CharTokenizer):
            return tok.encode(text)
        # a templated context carries its own special tokens (BOS) already
        return list(tok.encode(text, add_special_tokens=not self._chat))

    def tok_decode(self, ids) -> str:
        tok = self.tokenizer
        if isinstance(tok, tokenizer_lib.CharTokenizer):
            return tok.decode(ids)
        return tok.decode(list(ids), skip_special_tokens=True)

    def _encode_pair(self, context: str, continuation: str):
        # context's trailing spaces belong to the continuation (lm_eval's TemplateLM rule)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # ---- chat -------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        tok = self.tokenizer
        name = getattr(tok, "name_or_path", None) or f"jmoe-{type(tok).__name__}"
        return str(name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return tokenizer_lib.chat_template(self.tokenizer) or ""

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """The conversation as the tokenizer's chat template renders it (a ValueError for
        a tokenizer without one, e.g. the shipped model's)."""
        if tokenizer_lib.chat_template(self.tokenizer) is None:
            tokenizer_lib.chat_prompts(self.tokenizer, list(chat_history))  # raises
        self._chat = True
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in chat_history], tokenize=False,
            add_generation_prompt=add_generation_prompt)

    # ---- generate_until ---------------------------------------------------------------

    def _options(self, gen_kwargs: dict):
        """(until, max_gen_toks, jmoe.generate options) for a task's gen_kwargs."""
        gk = dict(gen_kwargs or {})
        bad = sorted(set(gk) - set(GEN_KWARGS))
        if bad:
            raise ValueError(f"generation kwarg {bad[0]}={gk[bad[0]]!r} is not supported by "
                             f"jmoe's lm_eval model (supported: {', '.join(GEN_KWARGS)})")
        until = gk.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen_toks = gk.pop("max_gen_toks", None)
        opts = dict(self._generate_kw, adaptive=self.adaptive)
        do_sample = gk.pop("do_sample", None)
        for k in ("temperature", "top_k", "top_p"):
            if k in gk:
                opts[k] = gk.pop(k)
        if do_sample is False:  # greedy, as transformers' generate: sampling knobs unused
            opts.update(temperature=0.0, top_k=None, top_p=None)
        elif do_sample and not opts.get("temperature"):
            opts["temperature"] = 1.0  # transformers' default when sampling
        return until, max_gen_toks, opts

    def _gen_length(self, opts) -> int:
        from jmoe.sampling.options import resolve_options

        keys = ("gen_length", "block_length", "steps", "convention")
        return resolve_options(self.model.config, **{k: opts.get(k) for k in keys})[0].gen_length

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched ``jmoe.generate`` per group of equal gen_kwargs: the generation is cut
        at EOS, at ``max_gen_toks`` tokens and before the first ``until`` string.
        ``gen_length`` is the model arg or the model's generation default (lm_eval's
        ``max_gen_toks`` only shortens the text: the default model has 64 positions)."""
        import jmoe

        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="jmoe generate_until")
        max_pos = self.model.config.max_position_embeddings
        for idx in groups.values():
            until, max_gen_toks, opts = self._options(requests[idx[0]].args[1])
            room = max_pos - self._gen_length(opts)
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                rows = [self.tok_encode(requests[i].args[0])[-room:] if room > 0 else []
                        for i in chunk]  # left-truncated to fit, as lm_eval's HF model
                out = jmoe.generate(self.model, rows, **opts)
                self.usage["generate"].model_calls += 1
                self.usage["generate"].rows += len(chunk)
                self.usage["generate"].expert_work += int(out.expert_work)
                self.usage["generate"].expert_reads += int(out.expert_reads)
                self.usage["generate_nfe"] += int(out.nfe)
                g = out.tokens.shape[1] - max(len(r) for r in rows)
                eos = opts.get("eos_id", self.model.config.eos_token_id)
                for i, row in zip(chunk, np.asarray(out.tokens)[:, -g:].tolist()):
                    ids = row[:row.index(eos)] if eos is not None and eos in row else row
                    text = self.tok_decode(ids[:max_gen_toks] if max_gen_toks else ids)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        g = self.usage["generate"]
        log.info("jmoe generate_until: %d prompts, %d generate calls, NFE %d, expert work %d",
                 g.rows, g.model_calls, self.usage["generate_nfe"], g.expert_work)
        return results

    # ---- loglikelihood ----------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """``(log p(continuation | context), is_greedy)`` per request. Masked-diffusion
        models: LLaDA's Monte Carlo estimate of a lower bound (the ELBO;
        ``jmoe.eval.likelihood.diffusion_loglikelihood``, ``mc_num`` draws per request,
        ``mc_batch_size`` rows per model call, guided by ``cfg_scale`` if set),
        is_greedy False unless ``is_check_greedy``. Causal models: the exact
        autoregressive log-likelihood."""
        pairs = [self._encode_pair(*r.args) for r in requests]
        bar = tqdm(total=len(pairs), disable=disable_tqdm or self.rank != 0,
                   desc="jmoe loglikelihood")
        usage = self.usage["loglikelihood"]
        if self.model.config.causal:
            if self._generate_kw.get("cfg_scale"):
                raise ValueError(f"cfg_scale={self._generate_kw['cfg_scale']!r} with a causal "
                                 f"model: its likelihood is exact, without guidance")
            bos = self.model.config.eos_token_id  # lm_eval's prefix token for empty contexts
            pairs = [(c if c or bos is None else [bos], t) for c, t in pairs]
            res = causal_loglikelihood(self.model, pairs, forward_kw=self._forward_kw,
                                       usage=usage, progress=bar.update)
        else:
            lls = diffusion_loglikelihood(
                self.model, pairs, mc_num=self.mc_num, mc_batch_size=self.mc_batch_size,
                seed=int(self._generate_kw.get("seed", 0)),
                cfg_scale=float(self._generate_kw.get("cfg_scale") or 0.0),
                forward_kw=self._forward_kw,
                usage=usage, progress=bar.update)
            greedy = [self._is_greedy(c, t) if self.is_check_greedy else False
                      for c, t in pairs]
            res = list(zip(lls, greedy))
        bar.close()
        log.info("jmoe loglikelihood: %d requests, %d model calls of %d rows, expert work %d",
                 len(requests), usage.model_calls, usage.rows, usage.expert_work)
        for r, v in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", r.args, v)
        return res

    def _is_greedy(self, context, target) -> bool:
        """Whether greedy decoding, one most-confident token per step (LLaDA's
        ``suffix_greedy_prediction``), writes exactly ``target`` after ``context``."""
        import jmoe

        n = len(target)
        out = jmoe.generate(self.model, [context], gen_length=n, block_length=n, steps=n,
                            temperature=0.0, remasking="low_confidence", convention="llada",
                            early_stop=False, adaptive=self.adaptive)
        return np.asarray(out.tokens)[0, -n:].tolist() == list(target)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "jmoe's lm_eval model has no loglikelihood_rolling (perplexity tasks): a "
            "masked-diffusion model has no left-to-right token likelihood; use "
            "loglikelihood (multiple-choice) or generate_until tasks, or lm_eval's 'hf' "
            "model on the HF checkpoint of a causal model")

    # ---- results ----------------------------------------------------------------------

    def get_model_info(self) -> dict:
        """The results' ``config`` section: the model, its options and the work done
        (``jmoe.generate_*``: ``jmoe.generate`` calls, rows, model calls (NFE, summed
        over the calls), routed token-expert pairs (``expert_work``) and distinct
        experts routed to, summed over model calls, MoE layers and rows
        (``expert_reads``: the expert weights batch-1 steps read);
        ``jmoe.loglikelihood_*``: forward calls, rows, routed pairs, distinct experts)."""
        gen, ll = self.usage["generate"], self.usage["loglikelihood"]
        return {"jmoe": {
            "pretrained": self.pretrained,
            "generate_options": {k: v for k, v in self._generate_kw.items()},
            "adaptive": dataclasses.asdict(self.adaptive) if self.adaptive else None,
            "forward_options": dict(self._forward_kw),
            "mc_num": self.mc_num, "mc_batch_size": self.mc_batch_size,
            "generate_calls": gen.model_calls, "generate_rows": gen.rows,
            "generate_nfe": self.usage["generate_nfe"],
            "generate_expert_work": gen.expert_work, "generate_expert_reads": gen.expert_reads,
            "loglikelihood_calls": ll.model_calls, "loglikelihood_rows": ll.rows,
            "loglikelihood_expert_work": ll.expert_work,
            "loglikelihood_expert_reads": ll.expert_reads,
        }}
