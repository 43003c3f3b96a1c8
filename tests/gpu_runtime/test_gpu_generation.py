"""GenerationParams validation (fast) and the generation engine on the bundled SmolLM2 (slow)."""

from __future__ import annotations

import pytest

from shardwise.gpu_runtime import GenerationParams
from shardwise.gpu_runtime.batching import plan_batches
from shardwise.gpu_runtime.prompts import build_chat


def test_params_defaults_are_greedy():
    params = GenerationParams()
    assert params.temperature == 0.0 and params.max_new_tokens == 64 and params.seed is None
    assert params.ignore_eos is False


def test_params_accept_ignore_eos():
    assert GenerationParams(ignore_eos=True, max_new_tokens=3).ignore_eos is True


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 2.5},
        {"max_new_tokens": True},
        {"token_budget": -1},
        {"max_batch_size": 0},
        {"max_input_tokens": 0},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": "7"},
        {"ignore_eos": 1},
        {"ignore_eos": "yes"},
        {"ignore_eos": None},
        {"cache": "paged"},
        {"compile": True},  # without cache="static"
        {"cache": "static", "compile": "yes"},
    ],
)
def test_params_reject_invalid_values(kwargs):
    with pytest.raises(ValueError):
        GenerationParams(**kwargs)


# Very different lengths, so length-sorted batches still pad.
PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue. " * 3,
    "List three fruits.",
    "Summarize this review: " + "The hotel was clean, the staff friendly, the breakfast cold. " * 8,
    "Translate 'good morning' to Spanish.",
]


@pytest.mark.slow
def test_batched_greedy_equals_one_prompt_at_a_time(generation_engine):
    params = GenerationParams(max_new_tokens=12, token_budget=300, max_batch_size=3)
    tokenizer = generation_engine.tokenizer
    lengths = [len(tokenizer(build_chat(tokenizer, p, None), add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    batches = plan_batches(lengths, token_budget=300, max_batch_size=3, extra_tokens_per_row=12)
    # The premise of the test: several batches, and at least one that mixes lengths (real padding).
    assert len(batches) >= 2
    assert any(len({lengths[i] for i in batch}) > 1 for batch in batches)

    batched = generation_engine.generate(PROMPTS, params)
    alone = [generation_engine.generate([p], params)[0] for p in PROMPTS]

    assert [g.text for g in batched] == [g.text for g in alone]
    assert batched == alone
    assert [g.n_prompt_tokens for g in batched] == lengths
    assert all(g.text for g in batched)


@pytest.mark.slow
def test_finish_reasons_and_token_counts(generation_engine):
    stop, cut = generation_engine.generate(
        ["What is the capital of France?", "Write a long story about a dragon."],
        GenerationParams(max_new_tokens=16),
    )
    assert "Paris" in stop.text
    assert stop.finish_reason == "stop"
    assert 1 <= stop.n_generated_tokens < 16
    assert stop.truncated is False

    (short,) = generation_engine.generate(["Write a long story about a dragon."], GenerationParams(max_new_tokens=3))
    assert short.finish_reason == "length"
    assert short.n_generated_tokens == 3
    assert cut.n_generated_tokens <= 16


@pytest.mark.slow
def test_ignore_eos_generates_exactly_max_new_tokens(generation_engine):
    prompts = ["What is the capital of France?", "Say hi."]
    (natural,) = generation_engine.generate(prompts[:1], GenerationParams(max_new_tokens=16))
    assert natural.finish_reason == "stop" and natural.n_generated_tokens < 16  # the premise

    forced = generation_engine.generate(prompts, GenerationParams(max_new_tokens=16, ignore_eos=True))
    for out in forced:
        assert out.n_generated_tokens == 16
        assert out.finish_reason == "length"
    assert forced[0].text.startswith(natural.text)  # same greedy answer, then it carries on
    assert forced[0].n_prompt_tokens == natural.n_prompt_tokens


@pytest.mark.slow
def test_long_prompt_is_truncated_not_fatal(generation_engine):
    long_text = "The quick brown fox jumps over the lazy dog. " * 450  # ~20k characters
    assert len(long_text) > 20_000
    (out,) = generation_engine.generate(
        [long_text], GenerationParams(max_new_tokens=4, max_input_tokens=256, system_prompt="Be brief.")
    )
    assert out.truncated is True
    assert 200 < out.n_prompt_tokens <= 256
    assert 1 <= out.n_generated_tokens <= 4


@pytest.mark.slow
def test_input_limit_leaves_room_in_the_model_context(generation_engine):
    # Checked at the tokenization step: an 8k-token prefill takes minutes on a small CPU.
    max_context = generation_engine.info["max_context"]
    limit = generation_engine._input_limit(GenerationParams(max_new_tokens=64))
    assert limit == max_context - 64
    assert generation_engine._input_limit(GenerationParams(max_new_tokens=64, max_input_tokens=100)) == 100
    ids, truncated = generation_engine._encode("word " * (max_context + 500), None, limit)
    assert truncated is True
    assert limit - 16 <= len(ids) <= limit
    with pytest.raises(ValueError, match="no room"):
        generation_engine._input_limit(GenerationParams(max_new_tokens=max_context))
    with pytest.raises(ValueError, match="system prompt"):
        generation_engine.generate(["hi"], GenerationParams(max_new_tokens=2, max_input_tokens=5))


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(generation_engine):
    params = GenerationParams(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=1234)
    first = generation_engine.generate(["Tell me a fun fact."], params)
    second = generation_engine.generate(["Tell me a fun fact."], params)
    assert first == second


@pytest.mark.slow
def test_empty_list_and_invalid_prompts(generation_engine):
    assert generation_engine.generate([], GenerationParams()) == []
    with pytest.raises(ValueError, match="prompt 1"):
        generation_engine.generate(["ok", ""], GenerationParams(max_new_tokens=2))
    with pytest.raises(ValueError):
        generation_engine.generate([None], GenerationParams(max_new_tokens=2))  # type: ignore[list-item]


@pytest.mark.slow
def test_engine_info(generation_engine):
    info = generation_engine.info
    assert info["spec"] == "bundled:smollm2-135m-instruct"
    assert info["source"] == "bundled"
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert len(info["revision"]) == 64
    assert info["max_context"] == 8192
    assert generation_engine.tokenizer.padding_side == "left"


@pytest.mark.slow
def test_static_kv_cache_gives_the_same_greedy_answers(generation_engine):
    prompts = [
        "What is the capital of France?",
        "Name a colour.",
        "Summarise: the blender is loud but crushes ice well, and the jug is easy to clean.",
    ]
    dynamic = generation_engine.generate(prompts, GenerationParams(max_new_tokens=8))
    static = generation_engine.generate(prompts, GenerationParams(max_new_tokens=8, cache="static"))
    assert [g.text for g in static] == [g.text for g in dynamic]
    assert static[0].text == "The capital of France is Paris."
    config = generation_engine._generation_config(GenerationParams(cache="static"))
    assert config.cache_implementation == "static" and config.disable_compile is True
    compiled = generation_engine._generation_config(GenerationParams(cache="static", compile=True))
    assert compiled.disable_compile is False


REVIEWS = [
    "Product: kettle (kitchen), rated 2/5.\nReview: Boils fast but the lid broke after a week.\n\nMain point?",
    "Product: kettle (kitchen), rated 5/5.\nReview: Quiet, quick, and the handle stays cool.\n\nMain point?",
    "Product: tent (outdoor), rated 4/5.\nReview: "
    + "Kept us dry through two nights of heavy rain. " * 6
    + "\n\nMain point?",
    "Product: lamp (home), rated 1/5.\nReview: Flickers.\n\nMain point?",
    "Product: headphones (audio), rated 3/5.\nReview: Good sound, but they pinch after an hour.\n\nMain point?",
    "Product: blender (kitchen), rated 4/5.\nReview: Loud, crushes ice well, easy to clean.\n\nMain point?",
]


def _whole_prompt_generate(engine, prompts, params):
    """The engine's plain path: every batch's whole prompts through ``model.generate``."""
    saved, engine._cache_arg = engine._cache_arg, None
    try:
        return engine.generate(prompts, params)
    finally:
        engine._cache_arg = saved


@pytest.mark.slow
def test_shared_prefix_and_chunked_prefill_give_the_whole_prompt_answers(generation_engine, monkeypatch):
    """The prefix cached once, rows prefilled in several chunks and joined into one decode batch:
    the same greedy answers and token counts as running every whole prompt through generate()."""
    import shardwise.gpu_runtime.prefill as prefill

    params = GenerationParams(max_new_tokens=10, max_batch_size=6)
    encoded = [generation_engine._encode(p, None, 10**6)[0] for p in REVIEWS]
    prefix = generation_engine._shared_prefix(encoded, params)
    # The chat template's system turn and the template's first word are shared.
    template_tokens = len(generation_engine._tokenize(build_chat(generation_engine.tokenizer, "Product:", None)))
    assert prefix is not None and template_tokens - 8 <= prefix.length < min(map(len, encoded))
    assert all(ids[: prefix.length] == encoded[0][: prefix.length] for ids in encoded)

    # A chunk budget this small prefills the six rows in several chunks of different widths.
    monkeypatch.setattr(prefill, "PREFILL_CHUNK_TOKENS", 64)
    bodies = [len(ids) - prefix.length - 1 for ids in encoded]
    assert len(plan_batches(sorted(bodies, reverse=True), token_budget=64, max_batch_size=6)) >= 3
    reused = generation_engine.generate(REVIEWS, params)
    whole = _whole_prompt_generate(generation_engine, REVIEWS, params)
    assert reused == whole
    assert all(g.text for g in reused)


@pytest.mark.slow
def test_identical_prompts_keep_their_last_token_for_generate(generation_engine):
    params = GenerationParams(max_new_tokens=8)
    same = generation_engine.generate(["What is the capital of France?"] * 3, params)
    assert [g.text for g in same] == ["The capital of France is Paris."] * 3


@pytest.mark.slow
def test_shared_prefix_is_skipped_where_it_does_not_pay_or_apply(generation_engine):
    engine, params = generation_engine, GenerationParams()
    assert engine._shared_prefix([list(range(1, 40)), list(range(2, 40))], params) is None  # nothing shared
    assert engine._shared_prefix([list(range(1, 40))], params) is None  # one prompt
    shared = list(range(1, 20))
    assert engine._shared_prefix([shared + [50], shared + [60, 70]], params).length == 19
    assert engine._shared_prefix([shared + [50], shared + [60]], GenerationParams(cache="static")) is None


ENDINGS = [
    "What is the capital of France? Answer in one word.",
    "Write a long story about a dragon who learns to bake bread.",
    "Say yes.",
    "Describe, in detail, every step of making fresh pasta by hand.",
    "Name one colour. One word only.",
    "Explain how a refrigerator works, at length.",
    "Is water wet? Yes or no.",
    "Write a poem about the sea with many verses.",
]


@pytest.mark.slow
def test_greedy_rows_leave_the_batch_as_they_end_with_generates_answers(generation_engine, monkeypatch):
    """The engine's own greedy loop drops ended rows from the decode batch (and its KV cache);
    every answer, token count and finish reason equals generate()'s, which keeps all rows."""
    model = generation_engine.model
    params = GenerationParams(max_new_tokens=24, max_batch_size=8)
    widths: list[int] = []

    def recording(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:  # a decode step
            widths.append(ids.shape[0])

    # A hook, not a wrapped forward: generate() reads the forward's signature.
    hook = model.register_forward_pre_hook(recording, with_kwargs=True)
    try:
        dropping = generation_engine.generate(ENDINGS, params)
        dropped_widths, widths[:] = list(widths), []
        monkeypatch.setattr(generation_engine, "drop_finished_rows", False)
        kept = generation_engine.generate(ENDINGS, params)
    finally:
        hook.remove()
    assert dropping == kept
    finished = sorted(g.n_generated_tokens for g in kept if g.finish_reason == "stop")
    assert len(finished) >= 2 and finished[0] < 24  # the premise: answers of different lengths
    assert set(widths) == {8}  # generate() decodes all 8 rows at every step
    assert dropped_widths[0] == 8 and dropped_widths[-1] < 8  # ended rows left the batch
    assert dropped_widths == sorted(dropped_widths, reverse=True)
    assert sum(dropped_widths) < sum(widths)
