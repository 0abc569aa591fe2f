"""A small character-level tokenizer for the shipped default model and toy tasks.

Ids 0..2 are the special tokens ``<pad>``, ``<eos>``, ``<mask>``; every other id is
one character of ``chars``. Unknown characters are a ValueError naming them.
"""

from __future__ import annotations

import json
import os

SPECIALS = ("<pad>", "<eos>", "<mask>")
DEFAULT_CHARS = "0123456789+-*=<>|,.:;?!()[] abcdefghijklmnopqrstuvwxyz"
FILENAME = "char_tokenizer.json"


class CharTokenizer:
    """``encode(text) -> list[int]`` and ``decode(ids) -> str`` (specials dropped).

    Example:
        tok = CharTokenizer(); tok.decode(tok.encode("12+3="))  # '12+3='
    """

    pad_token_id, eos_token_id, mask_token_id = 0, 1, 2

    def __init__(self, chars: str = DEFAULT_CHARS):
        if len(set(chars)) != len(chars):
            raise ValueError(f"tokenizer chars contain duplicates: {chars!r}")
        self.chars = chars
        self._to_id = {c: i + len(SPECIALS) for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        bad = sorted({c for c in text if c not in self._to_id})
        if bad:
            raise ValueError(f"characters {bad} are not in the tokenizer's vocabulary "
                             f"{self.chars!r}")
        return [self._to_id[c] for c in text]

    def decode(self, ids) -> str:
        n = len(SPECIALS)
        return "".join(self.chars[int(i) - n] for i in ids if n <= int(i) < self.vocab_size)

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, FILENAME), "w") as f:
            json.dump({"type": "char", "specials": list(SPECIALS), "chars": self.chars}, f)

    @classmethod
    def load(cls, folder: str) -> "CharTokenizer":
        with open(os.path.join(folder, FILENAME)) as f:
            data = json.load(f)
        if data.get("type") != "char" or tuple(data.get("specials", ())) != SPECIALS:
            raise ValueError(f"{FILENAME} in {folder!r} is not a jmoe char tokenizer")
        return cls(data["chars"])


# ---- chat conversations (instruct checkpoints) -------------------------------------

def _is_message(m) -> bool:
    return isinstance(m, dict) and "role" in m and "content" in m


def is_chat(prompts) -> bool:
    """True for one conversation (a non-empty list of ``{"role", "content"}`` dicts) or a
    batch of them (a non-empty list of such lists)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        return False
    if all(_is_message(m) for m in prompts):
        return True
    return all(isinstance(c, (list, tuple)) and c and all(_is_message(m) for m in c)
               for c in prompts)


def chat_template(tokenizer) -> str | None:
    """The tokenizer's chat template (a Jinja string), or None if it has none."""
    t = getattr(tokenizer, "chat_template", None)
    return t if isinstance(t, str) and t else None


def chat_prompts(tokenizer, conversations) -> list[str]:
    """Each conversation rendered by the tokenizer's chat template with the generation
    prompt added (``apply_chat_template(conv, tokenize=False,
    add_generation_prompt=True)``, as transformers' chat pipelines do).

    Args:
        tokenizer: a transformers tokenizer carrying ``chat_template``.
        conversations: one conversation (a list of ``{"role", "content"}`` dicts) or a
            list of them.

    Returns:
        One prompt string per conversation.

    Raises:
        ValueError: not a conversation or a batch of them; a tokenizer without a chat
            template (jmoe's character tokenizer has none: pass plain prompts).
    """
    if not is_chat(conversations):
        raise ValueError(f"{type(conversations).__name__} is not a chat: expected a list of "
                         f"{{'role', 'content'}} dicts or a list of such lists")
    if chat_template(tokenizer) is None:
        raise ValueError(f"the model's tokenizer ({type(tokenizer).__name__}) has no chat "
                         f"template: pass plain prompts, or load a checkpoint whose tokenizer "
                         f"has one (an instruct model)")
    if all(_is_message(m) for m in conversations):
        conversations = [conversations]
    return [tokenizer.apply_chat_template([dict(m) for m in c], tokenize=False,
                                          add_generation_prompt=True) for c in conversations]


def chat_ids(tokenizer, conversations) -> list[list[int]]:
    """``chat_prompts`` as token ids; the template writes any BOS itself, so no special
    tokens are added on top."""
    return [list(tokenizer.encode(p, add_special_tokens=False))
            for p in chat_prompts(tokenizer, conversations)]
