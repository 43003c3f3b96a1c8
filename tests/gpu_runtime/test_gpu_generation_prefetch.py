"""The generation engine's host work overlapping its device work (slow: real models on CPU).

While one batch generates, the prefetch thread builds the next batch's inputs and a decode thread
turns the finished batch's tokens into text. Greedy results must equal the serial path's
(``overlap_host_work = False``) on the bundled SmolLM2, a ``dummy:`` shape and tiny random-weight
families of both engine paths (joined cache, plain generate); order, errors, cancellation and the
out-of-memory split must behave as before, and no helper thread may outlive a call.
"""

from __future__ import annotations

import threading

import pytest
import torch

from shardwise.gpu_runtime import GenerationParams, compute_thread, load_generation_engine
from shardwise.gpu_runtime.backoff import BatchBackoff
from tests.gpu_runtime.families import NEW_TOKENS, TEXTS, greedy_reference, save_family

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue. " * 3,
    "List three fruits.",
    "Summarize this review: " + "The hotel was clean, the staff friendly, the breakfast cold. " * 6,
    "Translate 'good morning' to Spanish.",
    "Product: kettle (kitchen), rated 2/5.\nReview: Boils fast but the lid broke after a week.\n\nMain point?",
    "Product: lamp (home), rated 1/5.\nReview: Flickers.\n\nMain point?",
]
WAIT_S = 30  # far longer than any step here takes; reached only when the overlap is missing


def _serial_and_overlapped(engine, prompts, params):
    saved = engine.overlap_host_work
    try:
        engine.overlap_host_work = False
        serial = engine.generate(prompts, params)
        engine.overlap_host_work = True
        overlapped = engine.generate(prompts, params)
    finally:
        engine.overlap_host_work = saved
    return serial, overlapped


def _helper_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("shardwise-prefetch", "shardwise-decode"))]


@pytest.fixture
def fresh_backoff(generation_engine, monkeypatch):
    monkeypatch.setattr(generation_engine, "backoff", BatchBackoff(generation_engine.device, what="test"))


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(max_new_tokens=12, max_batch_size=2),  # joined cache over a shared prefix
        GenerationParams(max_new_tokens=6, max_batch_size=3, ignore_eos=True),
        GenerationParams(max_new_tokens=8, max_batch_size=2, system_prompt="Answer briefly."),
        GenerationParams(max_new_tokens=6, max_batch_size=3, cache="static"),  # whole prompts through generate
        GenerationParams(max_new_tokens=6, max_batch_size=2, temperature=0.8, seed=7),  # same random stream
    ],
    ids=["greedy", "ignore_eos", "system_prompt", "static_cache", "seeded_sampling"],
)
def test_smollm2_overlapped_equals_serial(generation_engine, params):
    serial, overlapped = _serial_and_overlapped(generation_engine, PROMPTS, params)
    assert overlapped == serial
    assert all(g.text for g in overlapped)
    assert not _helper_threads()


def test_smollm2_overlapped_known_answers(generation_engine):
    assert generation_engine.overlap_host_work is True  # the default
    out = generation_engine.generate(
        ["What is the capital of France?"] * 3 + ["Hi"], GenerationParams(max_new_tokens=8, max_batch_size=2)
    )
    assert [g.text for g in out[:3]] == ["The capital of France is Paris."] * 3


def test_plain_path_padding_equals_the_tokenizers(generation_engine):
    """The prefetch thread pads with numpy, not the tokenizer: the same ids and mask as
    ``tokenizer.pad(pad_to_multiple_of=8)`` (left padding)."""
    engine = generation_engine
    rows = [engine._encode(p, None, 10**6)[0] for p in PROMPTS[:5]]
    config = engine._generation_config(GenerationParams(cache="static"))
    inputs = engine._batch_inputs(rows, config, None)
    expected = engine.tokenizer.pad({"input_ids": rows}, padding=True, pad_to_multiple_of=8, return_tensors="pt")
    assert torch.equal(inputs.plain[0], expected["input_ids"])
    assert torch.equal(inputs.plain[1], expected["attention_mask"])
    assert inputs.plain[0].shape[1] % 8 == 0


def test_next_batch_is_prepared_while_the_current_one_generates(generation_engine, monkeypatch):
    """``generate`` of batch k waits for the preparation of batch k+1 to have finished on the
    prefetch thread, and the decoding of batch k waits for batch k+1's ``generate`` to have
    started: with serial host work either wait would time out."""
    engine = generation_engine
    params = GenerationParams(max_new_tokens=4, max_batch_size=2)  # 8 prompts: 4 batches
    expected = _serial_and_overlapped(engine, PROMPTS, params)[0]

    prepared = [threading.Event() for _ in range(4)]
    generating = [threading.Event() for _ in range(4)]
    events: dict[str, list] = {"prepare": [], "generate": [], "decode": [], "waits": []}
    real_inputs, real_generate, real_decode = engine._batch_inputs, engine._generate_batch, engine._decode

    def batch_inputs(*args, **kwargs):
        index = len(events["prepare"])
        events["prepare"].append(threading.current_thread().name)
        out = real_inputs(*args, **kwargs)
        prepared[index].set()
        return out

    def generate(*args, **kwargs):
        index = len(events["generate"])
        events["generate"].append(threading.current_thread().name)
        generating[index].set()
        if index + 1 < len(prepared):
            events["waits"].append(prepared[index + 1].wait(WAIT_S))
        return real_generate(*args, **kwargs)

    def decode(batch_tokens):
        index = len(events["decode"])
        events["decode"].append(threading.current_thread().name)
        if index + 1 < len(generating):
            events["waits"].append(generating[index + 1].wait(WAIT_S))
        return real_decode(batch_tokens)

    monkeypatch.setattr(engine, "_batch_inputs", batch_inputs)
    monkeypatch.setattr(engine, "_generate_batch", generate)
    monkeypatch.setattr(engine, "_decode", decode)
    got = engine.generate(PROMPTS, params)

    assert got == expected
    assert events["waits"] == [True] * 6
    assert all(name.startswith("shardwise-prefetch") for name in events["prepare"]) and len(events["prepare"]) == 4
    assert all(name.startswith("shardwise-compute") for name in events["generate"])
    assert all(name.startswith("shardwise-decode") for name in events["decode"]) and len(events["decode"]) == 4
    assert not _helper_threads()


def test_out_of_memory_split_with_prefetched_batches(generation_engine, monkeypatch, fresh_backoff):
    """A prefetched batch that runs out of memory is split; its halves get inputs of their own."""
    params = GenerationParams(max_new_tokens=6, max_batch_size=4)
    expected = _serial_and_overlapped(generation_engine, PROMPTS, params)[0]
    attempts: list[int] = []
    real = generation_engine._generate_batch

    def generate(inputs, *args, **kwargs):
        attempts.append(inputs.rows)
        if attempts[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(generation_engine, "_generate_batch", generate)
    assert generation_engine.generate(PROMPTS, params) == expected
    assert attempts == [4, 2, 2, 2, 2]


@pytest.mark.parametrize("where", ["prepare", "generate", "decode"])
def test_an_error_in_any_stage_propagates_and_leaves_no_thread(generation_engine, monkeypatch, where):
    engine = generation_engine
    params = GenerationParams(max_new_tokens=3, max_batch_size=2)
    calls = []
    target, name = {
        "prepare": (engine, "_batch_inputs"),
        "generate": (engine, "_generate_batch"),
        "decode": (engine, "_decode"),
    }[where]
    real = getattr(target, name)

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError(f"broken {where}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    with pytest.raises(ValueError, match=f"broken {where}"):
        engine.generate(PROMPTS, params)
    assert not engine._lock.locked()
    assert not _helper_threads()
    if where != "decode":  # a failed decode is reported when the call collects the texts, at its end
        # The call stopped at the failure: at most one batch was prepared ahead of it.
        assert len(calls) <= 3
    monkeypatch.undo()
    assert engine.generate(PROMPTS[:2], params) == _serial_and_overlapped(engine, PROMPTS[:2], params)[0]


def test_cancelling_stops_before_the_next_batch(generation_engine, monkeypatch):
    """The caller stopping (compute_thread's cancel event) ends the call at the next batch; the
    batch prepared ahead is dropped and the helper threads are gone."""
    engine = generation_engine
    generated = []
    real = engine._generate_batch

    def generate(inputs, *args, **kwargs):
        generated.append(inputs.rows)
        compute_thread._job.cancel.set()  # what on_compute_thread does when its caller is interrupted
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(engine, "_generate_batch", generate)
    with pytest.raises(compute_thread.ComputeCancelled):
        engine.generate(PROMPTS, GenerationParams(max_new_tokens=3, max_batch_size=2))
    assert generated == [2]
    assert not engine._lock.locked()
    assert not _helper_threads()


def test_dummy_llama_overlapped_equals_serial():
    engine = load_generation_engine("dummy:llama-135m", device="cpu")
    params = GenerationParams(max_new_tokens=4, ignore_eos=True, max_batch_size=2)
    serial, overlapped = _serial_and_overlapped(engine, PROMPTS[:5], params)
    assert overlapped == serial
    assert all(g.n_generated_tokens == 4 for g in overlapped)


@pytest.mark.parametrize("family", ["llama", "mistral-sliding"])  # joined-cache path, plain-generate path
def test_tiny_families_overlapped_equal_serial_and_the_reference(family, tmp_path):
    from shardwise.gpu_runtime.dummy import llama_tokenizer_dir

    model_dir = save_family(family, tmp_path / family, llama_tokenizer_dir("the prefetch tests"))
    engine = load_generation_engine(str(model_dir), device="cpu")
    assert (engine._cache_arg is None) == (family == "mistral-sliding")
    params = GenerationParams(max_new_tokens=NEW_TOKENS, token_budget=160, max_batch_size=3)
    serial, overlapped = _serial_and_overlapped(engine, TEXTS, params)
    assert overlapped == serial
    assert [(g.text, g.n_generated_tokens) for g in overlapped] == greedy_reference(model_dir, TEXTS, NEW_TOKENS)
