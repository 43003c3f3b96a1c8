"""Constrained decoding on the HF engine: every path (joined cache, plain, out-of-memory split)
gives answers that follow the schema, and the same greedy answers."""

from __future__ import annotations

import json

import pytest
import torch

from shardwise.gpu_runtime import GenerationParams
from shardwise.gpu_runtime.backoff import BatchBackoff
from tests.gpu_runtime.test_gpu_generation import REVIEWS, _whole_prompt_generate

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "mixed"]},
        "stars": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    },
    "required": ["sentiment", "stars", "tags"],
}
PROMPTS = [r.replace("Main point?", "Answer in JSON: sentiment, stars, tags.") for r in REVIEWS]


def test_params_reject_a_schema_that_is_not_json_text_and_ignore_eos():
    with pytest.raises(ValueError, match="output_schema must be a JSON Schema as JSON text"):
        GenerationParams(output_schema="schema.json")
    with pytest.raises(ValueError, match="cannot be combined with ignore_eos"):
        GenerationParams(output_schema=json.dumps(SCHEMA), ignore_eos=True)


@pytest.mark.slow
def test_constrained_answers_follow_the_schema_on_every_path(generation_engine, monkeypatch):
    params = GenerationParams(max_new_tokens=40, max_batch_size=6, output_schema=json.dumps(SCHEMA))
    joined = generation_engine.generate(PROMPTS, params)
    finished = [g for g in joined if g.finish_reason == "stop"]
    assert len(finished) >= 5, [g.text for g in joined]
    for g in finished:
        answer = json.loads(g.text)
        assert list(answer) == ["sentiment", "stars", "tags"]  # schema order, nothing else
        assert answer["sentiment"] in ("positive", "negative", "mixed") and isinstance(answer["stars"], int)
    assert _whole_prompt_generate(generation_engine, PROMPTS, params) == joined

    # A batch that runs out of memory is split; fresh matchers per attempt give the same answers.
    monkeypatch.setattr(generation_engine, "backoff", BatchBackoff(generation_engine.device, what="test"))
    real, attempts = generation_engine.model.generate, []

    def out_of_memory_above_two(*args, **kwargs):
        attempts.append(kwargs["input_ids"].shape[0])
        if attempts[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation_engine.model, "generate", out_of_memory_above_two)
    assert generation_engine.generate(PROMPTS, params) == joined
    assert attempts[:2] == [6, 3] and max(attempts[2:]) <= 2


def test_the_frequency_penalty_counts_the_answer_tokens_only():
    from shardwise.gpu_runtime.sampling import AnswerFrequencyPenalty

    # Columns 0-1 are the prompt (or the filler standing for a prefilled cache); the answer follows.
    ids = torch.tensor([[5, 5, 7, 7, 7, 9], [5, 5, 3, 3, 3, 3]])
    penalized = AnswerFrequencyPenalty(0.5, answer_start=2)(ids, torch.zeros(2, 10))
    assert penalized[0].tolist() == [0, 0, 0, 0, 0, 0, 0, -1.5, 0, -0.5]
    assert penalized[1].tolist() == [0, 0, 0, -2.0, 0, 0, 0, 0, 0, 0]
    scores = torch.randn(2, 10)
    assert torch.equal(AnswerFrequencyPenalty(0.5, answer_start=6)(ids, scores), scores)  # no answer yet


@pytest.mark.parametrize(
    ("setting", "value"),
    [("frequency_penalty", 2.5), ("frequency_penalty", True), ("repair_frequency_penalty", -0.5)],
)
def test_params_reject_penalties_out_of_range(setting, value):
    with pytest.raises(ValueError, match=setting):
        GenerationParams(**{setting: value})
