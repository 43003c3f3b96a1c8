"""Answer text from generated token ids: the one decode path of every generation engine.

Byte-level tokenizers (GPT-2 style, as SmolLM2, Llama 3 and Qwen use) and SentencePiece byte
fallback split a multi-byte UTF-8 character (an emoji, CJK text) over several tokens. When
``max_new_tokens`` cuts such a character, the tokenizer decodes the bytes of the incomplete
character to U+FFFD. :func:`decode_answer` drops that incomplete trailing character instead; a
U+FFFD the model produced from whole tokens (the bytes of U+FFFD itself, or invalid bytes before
the end) is part of the answer and kept.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def decode_answer(tokenizer: Any, tokens: Sequence[int]) -> str:
    """``tokens`` as answer text: special tokens skipped, surrounding whitespace stripped, and an
    incomplete multi-byte character at the very end left out."""
    text = tokenizer.decode(list(tokens), skip_special_tokens=True)
    if text.endswith(REPLACEMENT_CHARACTER):  # rare: the check below costs a little more
        text = _without_incomplete_tail(tokenizer, list(tokens), text)
    return text.strip()


def incomplete_tail_bytes(data: bytes) -> int:
    """How many bytes at the end of ``data`` begin a UTF-8 character without finishing it (0-3)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    return len(decoder.getstate()[0])


def _without_incomplete_tail(tokenizer: Any, tokens: list[int], text: str) -> str:
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    kept = [t for t in tokens if t not in special]
    pieces = token_bytes(tokenizer, kept)
    if pieces is None:  # a tokenizer whose tokens' bytes are unknown here: its text as decoded
        return text
    pending = incomplete_tail_bytes(b"".join(pieces))
    if not pending:
        return text
    # The trailing tokens that hold the incomplete bytes; when they hold nothing else (byte
    # tokens), the answer is the text of the tokens before them.
    cut, dropped = len(pieces), 0
    while cut > 0 and dropped < pending:
        cut -= 1
        dropped += len(pieces[cut])
    if dropped == pending:
        return tokenizer.decode(kept[:cut], skip_special_tokens=True)
    # A token holding whole characters and the start of the cut one: byte-level decoders turn
    # the incomplete tail into exactly one U+FFFD (maximal-subpart replacement), the last one.
    return text[:-1]


def token_bytes(tokenizer: Any, ids: Sequence[int]) -> list[bytes] | None:
    """The UTF-8 bytes each token stands for, for byte-level BPE and SentencePiece byte-fallback
    tokenizers; None for any other kind (their decoded text is then taken as it is)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = repr(getattr(backend, "decoder", None))
    added = {i: t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    out: list[bytes] = []
    if "ByteLevel" in decoder:
        table = _byte_level_alphabet()
        for token_id, piece in zip(ids, pieces, strict=True):
            if token_id in added:
                out.append(added[token_id].encode())
                continue
            try:
                out.append(bytes(table[c] for c in piece))
            except KeyError:
                return None
        return out
    if "ByteFallback" in decoder:
        for token_id, piece in zip(ids, pieces, strict=True):
            match = None if token_id in added else _BYTE_TOKEN.fullmatch(piece)
            out.append(bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode())
        return out
    return None


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table
