"""Answers cut by ``max_new_tokens`` part-way through a multi-byte character: the incomplete
character is left out of the text, never shown as U+FFFD; a U+FFFD made of whole tokens stays.
With SmolLM2's real byte-level tokenizer, where one emoji is three tokens."""

from __future__ import annotations

import pytest

from shardwise.gpu_runtime.decoding import decode_answer
from shardwise.gpu_runtime.generation_params import GenerationParams

EMOJI = "😀"
CJK = "日本語"


@pytest.fixture(scope="module")
def tokenizer(generation_engine):
    return generation_engine.tokenizer


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", [f"ok {EMOJI}{EMOJI}", f"{CJK} {CJK}", f"a {EMOJI} b"])
def test_every_cut_decodes_to_a_prefix_without_a_replacement_character(tokenizer, text):
    ids = encode(tokenizer, text)
    assert len(ids) > len(text.split())  # the multi-byte characters take several tokens each
    for cut in range(1, len(ids) + 1):
        answer = decode_answer(tokenizer, ids[:cut])
        assert "\ufffd" not in answer, (cut, answer)
        assert text.startswith(answer), (cut, answer)
    assert decode_answer(tokenizer, ids) == text


def test_a_replacement_character_from_whole_tokens_is_kept(tokenizer):
    ids = encode(tokenizer, "bad \ufffd")
    assert decode_answer(tokenizer, ids) == "bad \ufffd"
    # ... also when an incomplete emoji follows it: only the incomplete one goes
    emoji = encode(tokenizer, EMOJI)
    assert decode_answer(tokenizer, ids + emoji[:2]) == "bad \ufffd"
    # special tokens between the bytes do not hide the cut
    assert decode_answer(tokenizer, ids + emoji[:1] + [tokenizer.eos_token_id]) == "bad \ufffd"


def test_the_engine_drops_the_cut_character_and_says_length(generation_engine):
    # The model answers an emoji line with emojis, three byte-level tokens each.
    prompt = EMOJI * 8
    texts = []
    for n in range(1, 7):
        (answer,) = generation_engine.generate([prompt], GenerationParams(max_new_tokens=n))
        assert answer.finish_reason == "length", n
        assert answer.n_generated_tokens == n
        assert "\ufffd" not in answer.text, (n, answer.text)
        texts.append(answer.text)
    assert EMOJI in texts[-1]
    assert [len(t) for t in texts] == sorted(len(t) for t in texts)
