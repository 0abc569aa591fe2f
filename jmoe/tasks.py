"""Toy tasks with checkable answers, for training and evaluating the default model.

Addition: ``"123+456="`` -> ``"579"`` then EOS. Operands have 1 to 3 digits,
their digit counts drawn uniformly so short numbers are common. A fixed
deterministic split holds out every pair whose ``hash`` falls in the held-out
bucket: training never sees those pairs.
"""

from __future__ import annotations

import numpy as np

HELD_OUT_MOD = 50  # 2% of all pairs are held out


def _held_out(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # a fixed mixing hash of the pair (not Python's salted hash): the split never moves
    h = (a.astype(np.int64) * 1000003 + b.astype(np.int64) * 7919) % 1000033
    return h % HELD_OUT_MOD == 0


DISTRIBUTIONS = ("digits", "uniform")


def _operands(rng: np.random.Generator, n: int, distribution: str = "digits"
              ) -> tuple[np.ndarray, np.ndarray]:
    if distribution == "uniform":
        vals = rng.integers(0, 1000, (2, n))
        return vals[0], vals[1]
    digits = rng.integers(1, 4, (2, n))
    lo = np.where(digits == 1, 0, 10 ** (digits - 1))
    hi = 10 ** digits
    vals = rng.integers(lo, hi)
    return vals[0], vals[1]


def addition_pairs(rng: np.random.Generator, n: int, held_out: bool = False,
                   distribution: str = "digits"):
    """``n`` operand pairs from the training (or held-out) side of the split.

    ``distribution``: ``"digits"`` (default; each operand's digit count 1-3 uniform, then
    the value uniform among numbers of that many digits) or ``"uniform"`` (each operand
    uniform in [0, 999], so mostly 3-digit sums with carries). The split is on the pair,
    whichever distribution draws it. Raises ValueError for another distribution.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r}: expected one of {DISTRIBUTIONS}")
    out_a, out_b = [], []
    while sum(len(x) for x in out_a) < n:
        a, b = _operands(rng, 4 * n if held_out else n + n // 8 + 8, distribution)
        keep = _held_out(a, b) == held_out
        out_a.append(a[keep])
        out_b.append(b[keep])
    return np.concatenate(out_a)[:n], np.concatenate(out_b)[:n]


def addition_texts(a, b) -> tuple[list[str], list[str]]:
    """Prompts ``"a+b="`` and answers ``"a+b"`` (without EOS)."""
    return [f"{x}+{y}=" for x, y in zip(a, b)], [str(x + y) for x, y in zip(a, b)]


def encode_batch(tokenizer, prompts, answers, prompt_len: int, answer_len: int):
    """Token rows ``[B, prompt_len + answer_len]``: prompts left-padded (pad id, mask 0),
    answers followed by EOS up to ``answer_len`` (LLaDA's SFT form: EOS padding is
    part of the answer and is learned).

    Returns ``tokens``, ``valid`` (attention mask) and ``answer`` (positions of the
    answer, the only ones that get noised and scored).
    """
    b = len(prompts)
    tokens = np.full((b, prompt_len + answer_len), tokenizer.pad_token_id, np.int32)
    valid = np.zeros_like(tokens, bool)
    answer = np.zeros_like(tokens, bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        pi, ai = tokenizer.encode(p), tokenizer.encode(a)
        if len(pi) > prompt_len or len(ai) >= answer_len:
            raise ValueError(f"example {p!r}->{a!r} does not fit prompt_len={prompt_len}, "
                             f"answer_len={answer_len}")
        tokens[i, prompt_len - len(pi):prompt_len] = pi
        tokens[i, prompt_len:prompt_len + len(ai)] = ai
        tokens[i, prompt_len + len(ai):] = tokenizer.eos_token_id
        valid[i, prompt_len - len(pi):] = True
        answer[i, prompt_len:] = True
    return tokens, valid, answer


def addition_accuracy(model, n: int = 200, seed: int = 1234, batch_size: int = 100,
                      distribution: str = "digits", **generate_kw) -> float:
    """Exact-match accuracy of ``jmoe.generate`` on ``n`` held-out addition pairs drawn
    from ``distribution`` (see ``addition_pairs``)."""
    from jmoe.sampling import generate

    a, b = addition_pairs(np.random.default_rng(seed), n, held_out=True,
                          distribution=distribution)
    prompts, answers = addition_texts(a, b)
    correct = 0
    for s in range(0, n, batch_size):
        out = generate(model, prompts[s:s + batch_size], **generate_kw)
        correct += sum(t == want for t, want in zip(out.texts, answers[s:s + batch_size]))
    return correct / n
