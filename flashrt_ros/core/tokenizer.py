"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then four specials. Enough for instructions."""
BOS, EOS, SEP, PAD = 256, 257, 258, 259


def encode(text: str, bos: bool = True) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [BOS] + ids if bos else ids


def decode(ids) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
