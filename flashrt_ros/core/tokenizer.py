"""Tokenizers: a checkpoint's `tokenizer.json` through the `tokenizers` library, else bytes.

`ByteTokenizer` (ids 0..255 are UTF-8 bytes, then four specials) serves presets that have no
tokenizer file; it needs a vocabulary of at least 260 ids.

`max_token_chars` is the most characters of text one token stands for: a text longer than the
context's tokens times that cannot fit, and is refused before it is tokenized (a 10 MB text takes
seconds to tokenize).
"""
from __future__ import annotations

import functools

from flashrt_ros.core.exceptions import ConfigError

BOS, EOS, SEP, PAD = 256, 257, 258, 259


# An unknown token can stand for a whole word (WordPiece: up to 100 characters by default, and
# a longer word is one unknown token too): a tokenizer.json is taken to need at least one token
# per this many characters.
UNKNOWN_WORD_CHARS = 100


class ByteTokenizer:
    kind = "bytes"
    vocab_size = 260
    max_token_chars = 1      # an id per UTF-8 byte, and a character is at least one byte

    def encode(self, text: str) -> list[int]:
        return [BOS] + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class FileTokenizer:
    """A `tokenizer.json` (transformers' fast tokenizer file), encoded without special tokens
    (Qwen3.5 prompts carry none)."""
    kind = "tokenizer.json"

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types
            raise ConfigError(f"{path}: expected a tokenizers JSON file, found "
                              f"{type(e).__name__}: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry (a byte-level entry has one character per byte), at least
        UNKNOWN_WORD_CHARS."""
        longest = max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=0)
        return max(longest, UNKNOWN_WORD_CHARS)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load(path: str, vocab_size: int):
    """The tokenizer of a model: its tokenizer.json, or bytes when `path` is ''."""
    tok = FileTokenizer(path) if path else ByteTokenizer()
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer: expected at most vocab_size={vocab_size} ids (config.json), "
                          f"found {tok.vocab_size} ({path or 'the byte tokenizer'}); use the "
                          f"tokenizer saved with this checkpoint")
    return tok
