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
