"""Tokenizers: a checkpoint's `tokenizer.json` through the `tokenizers` library, else bytes.

`ByteTokenizer` (ids 0..255 are UTF-8 bytes, then four specials) serves presets that have no
tokenizer file; it needs a vocabulary of at least 260 ids.
"""
from __future__ import annotations

from flashrt_ros.core.exceptions import ConfigError

BOS, EOS, SEP, PAD = 256, 257, 258, 259


class ByteTokenizer:
    kind = "bytes"
    vocab_size = 260

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
