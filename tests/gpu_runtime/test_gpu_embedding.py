"""The embedding engine on the bundled all-MiniLM-L6-v2 (slow)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TEXTS = [
    "hello world",
    "A",
    "The hotel was clean and the staff were friendly.",
    ("A long text about nothing in particular, repeated. " * 100)[:5000],  # ~1,000 tokens
    "Ein kurzer deutscher Satz.",
    " ".join(f"word{i}" for i in range(300)),
    "Prices rose 3.2% in May, the fastest pace since 2023.",
    "🙂 emoji and ünïcödé",
    "short",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "What is the capital of France?",
    "Paris is the capital of France.",
    "Sentence embeddings map text to vectors.",
    "GPU batch inference over Parquet shards",
    "a b c d e f g",
    "This review is about a terrible product that broke after a day. " * 3,
    "Numbers: 1 2 3 4 5 6 7 8 9 10",
    "Tabs\tand\nnewlines",
    "   leading and trailing spaces   ",
    "The end.",
]


def test_matches_sentence_transformers_encode(embedding_engine):
    out = embedding_engine.embed(TEXTS, token_budget=600, max_batch_size=4)
    reference = embedding_engine.model.encode(TEXTS, convert_to_numpy=True, show_progress_bar=False)

    assert out.vectors.dtype == np.float32
    assert out.vectors.shape == (len(TEXTS), 384)
    cosine = np.sum(out.vectors * reference, axis=1) / (
        np.linalg.norm(out.vectors, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)


def test_token_counts_and_truncation_flags(embedding_engine):
    out = embedding_engine.embed(TEXTS, token_budget=600, max_batch_size=4)
    assert out.n_tokens[0] == 4  # [CLS] hello world [SEP]
    assert out.truncated == [n > embedding_engine.max_seq_length for n in out.n_tokens]
    assert out.truncated[3] is True and out.truncated[5] is True
    assert out.truncated[0] is False
    assert sum(out.truncated) == 2


def test_empty_input_and_info(embedding_engine):
    out = embedding_engine.embed([])
    assert out.vectors.shape == (0, 384) and out.vectors.dtype == np.float32
    assert out.n_tokens == [] and out.truncated == []
    assert embedding_engine.dim == 384 and embedding_engine.max_seq_length == 256
    info = embedding_engine.info
    assert info["normalize"] is True and info["dim"] == 384 and info["source"] == "bundled"
    assert info["dtype"] == "float32" and len(info["revision"]) == 64


def test_batching_does_not_change_vectors(embedding_engine):
    one_by_one = embedding_engine.embed(TEXTS[:6], max_batch_size=1).vectors
    together = embedding_engine.embed(TEXTS[:6], max_batch_size=64).vectors
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)


def test_bf16_embeddings_are_unit_length_in_float32():
    """The model computes in bf16; the float32 vectors it returns are normalised again."""
    import torch
    from sentence_transformers import SentenceTransformer

    from shardwise.gpu_runtime import resolve_model_spec
    from shardwise.gpu_runtime.embedding import EmbeddingEngine

    path = resolve_model_spec("bundled:all-minilm-l6-v2").path
    model = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": torch.bfloat16})
    engine = EmbeddingEngine(model, {"spec": "bf16 MiniLM"})
    vectors = engine.embed(TEXTS, max_batch_size=8).vectors
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


PROMPTS = {"query": "query: ", "passage": "Represent this passage for retrieval: "}


@pytest.fixture(scope="module")
def prompted_minilm(tmp_path_factory) -> dict[str, str]:
    """Saved copies of the bundled MiniLM whose config_sentence_transformers.json has prompts:
    one without a default prompt, one whose default is "passage"."""
    from sentence_transformers import SentenceTransformer

    from shardwise.gpu_runtime import resolve_model_spec

    root = tmp_path_factory.mktemp("prompted-minilm")
    copies = {}
    for name, default in (("named", None), ("default", "passage")):
        model = SentenceTransformer(
            resolve_model_spec("bundled:all-minilm-l6-v2").path,
            device="cpu",
            prompts=dict(PROMPTS),
            default_prompt_name=default,
        )
        model.save(str(root / name))
        copies[name] = str(root / name)
    return copies


def test_prompt_name_prepends_the_models_prompt(prompted_minilm, embedding_engine):
    from shardwise.gpu_runtime import load_embedding_engine

    engine = load_embedding_engine(prompted_minilm["named"], device="cpu")
    texts = TEXTS[:6]
    query = engine.embed(texts, prompt_name="query", max_batch_size=4)
    by_hand = embedding_engine.embed([PROMPTS["query"] + t for t in texts], max_batch_size=4)
    np.testing.assert_allclose(query.vectors, by_hand.vectors, atol=1e-6)
    assert query.n_tokens == by_hand.n_tokens  # the prompt's tokens are counted
    plain = engine.embed(texts, max_batch_size=4)  # no default prompt: the text alone
    np.testing.assert_allclose(plain.vectors, embedding_engine.embed(texts, max_batch_size=4).vectors, atol=1e-6)
    with pytest.raises(ValueError, match=r"no prompt 'classification' \(its prompts: document, passage, query\)"):
        engine.embed(texts, prompt_name="classification")


def test_the_models_default_prompt_applies_when_none_is_named(prompted_minilm, embedding_engine):
    from shardwise.gpu_runtime import load_embedding_engine

    engine = load_embedding_engine(prompted_minilm["default"], device="cpu")
    got = engine.embed(TEXTS[:4], max_batch_size=4)
    want = embedding_engine.embed([PROMPTS["passage"] + t for t in TEXTS[:4]], max_batch_size=4)
    np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-6)
    assert got.n_tokens == want.n_tokens


def test_truncation_counts_the_prompt(prompted_minilm):
    from shardwise.gpu_runtime import load_embedding_engine

    engine = load_embedding_engine(prompted_minilm["named"], device="cpu")
    tokenizer = engine.model.tokenizer
    # A text that just fits on its own ([CLS] + words + [SEP] == max_seq_length) but not after the prompt.
    words = ["hello"] * (engine.max_seq_length - 2)
    text = " ".join(words)
    assert len(tokenizer(text)["input_ids"]) == engine.max_seq_length
    alone = engine.embed([text])
    prompted = engine.embed([text], prompt_name="query")
    assert alone.truncated == [False] and alone.n_tokens == [engine.max_seq_length]
    assert prompted.truncated == [True] and prompted.n_tokens[0] > engine.max_seq_length


def _minilm(**tokenizer_settings):
    """A fresh engine on the bundled MiniLM whose model tokenizer has ``tokenizer_settings``."""
    from sentence_transformers import SentenceTransformer

    from shardwise.gpu_runtime import resolve_model_spec
    from shardwise.gpu_runtime.embedding import EmbeddingEngine

    model = SentenceTransformer(resolve_model_spec("bundled:all-minilm-l6-v2").path, device="cpu")
    for name, value in tokenizer_settings.items():
        setattr(model.tokenizer, name, value)
    return EmbeddingEngine(model, {"spec": f"MiniLM {tokenizer_settings}"})


@pytest.mark.parametrize(
    ("padding_side", "truncation_side"), [("right", "right"), ("left", "right"), ("right", "left")]
)
@pytest.mark.parametrize("prompt", ["", "query: "])
def test_one_tokenization_gives_preprocess_features_for_every_batch(padding_side, truncation_side, prompt):
    """Texts are tokenized once; each batch's padded ids equal what ``preprocess`` builds, the
    over-long rows (cut from the one tokenization) included, on either padding and truncation side."""
    import torch

    engine = _minilm(padding_side=padding_side, truncation_side=truncation_side)
    tokenized = engine._tokenize(TEXTS, prompt)
    assert tokenized.n_tokens[3] > engine.max_seq_length  # truncated rows are in there
    assert engine._special_layout == (1, 1) and engine._cut_is_exact is True  # [CLS] text [SEP], cut in place
    for rows in ([0, 1, 2], [3, 5, 9], list(range(len(TEXTS))), [18], [3]):
        collated = engine._collate(tokenized, rows)
        reference = engine.model.preprocess([TEXTS[i] for i in rows], prompt=prompt or None)
        assert set(collated) == {"input_ids", "token_type_ids", "attention_mask"}
        for key, tensor in collated.items():
            assert tensor.dtype == reference[key].dtype and torch.equal(tensor, reference[key]), (rows, key)
    out = engine.embed(TEXTS, max_batch_size=4)
    assert engine._collate_extras[""] == {"modality": "text"}  # the single tokenization was used
    if padding_side == "right":  # BERT's positions move with left padding, so vectors depend on the batch
        reference = engine.model.encode(TEXTS, convert_to_numpy=True, show_progress_bar=False)
        np.testing.assert_allclose(out.vectors, reference, atol=1e-5)


def test_over_long_texts_are_not_tokenized_a_second_time():
    """Once the first call checked the Rust tokenizer against the transformers one, and the first
    cut against the tokenizer's truncation, a call tokenizes its texts in one Rust call, over-long
    ones included, and whole: the truncation the check left set on the backend is not applied."""
    engine = _minilm()
    engine.embed(TEXTS[:4], max_batch_size=4)  # both checks
    assert engine._backend_is_exact is True and engine._cut_is_exact is True
    assert engine._tokenizer.backend_tokenizer.truncation is not None  # left there by the cut's check
    calls = []
    tokenizer = engine._tokenizer

    class Counting:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, **kwargs):
            calls.append(kwargs.get("truncation"))
            return tokenizer(texts, **kwargs)

    engine._tokenizer = Counting()
    out = engine.embed(TEXTS, max_batch_size=4)
    assert calls == []
    assert out.n_tokens == [len(ids) for ids in tokenizer(TEXTS)["input_ids"]]
    assert sum(out.truncated) == 2
    reference = engine.model.encode(TEXTS, convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(out.vectors, reference, atol=1e-5)


@pytest.mark.parametrize("prompt", ["", "query: "])
def test_the_rust_tokenizer_gives_the_transformers_tokenizers_columns(prompt):
    engine = _minilm()
    prompted = [prompt + text for text in TEXTS]
    direct = engine._encoded_by_backend(prompted)
    assert set(direct) == {"input_ids", "token_type_ids", "attention_mask"}
    assert direct == engine._by_tokenizer(prompted)


def test_a_tokenizer_that_prepares_text_itself_keeps_the_transformers_call(caplog):
    """A tokenizer whose transformers call changes the text before its Rust backend sees it (here a
    wrapper that appends a word, standing for such Python-side preparation): the first call finds
    the columns unequal, and every call goes through the transformers call."""
    engine = _minilm()
    tokenizer = engine._tokenizer

    class Preparing:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, **kwargs):
            return tokenizer([text + " amen" for text in texts], **kwargs)

    engine._tokenizer = Preparing()
    with caplog.at_level("INFO", logger="shardwise.gpu_runtime.embedding"):
        out = engine.embed(TEXTS[:3])
    assert engine._backend_is_exact is False
    assert "beyond its Rust tokenizer" in caplog.text
    assert out.n_tokens == [len(ids) for ids in tokenizer([t + " amen" for t in TEXTS[:3]])["input_ids"]]
    again = engine.embed(TEXTS[:3])
    assert again.n_tokens == out.n_tokens


def test_a_cut_unlike_the_tokenizers_truncation_falls_back_to_a_second_pass(caplog):
    """Where cutting the ids would not give what the tokenizer's truncation gives (here: the
    special tokens miscounted, as for a tokenizer whose layout the one-word probe misreads), the
    first over-long row shows it, and over-long rows are tokenized again with truncation."""
    engine = _minilm()
    engine._special_layout = (0, 0)  # [CLS] and [SEP] not known: a cut would drop the [SEP]
    with caplog.at_level("INFO", logger="shardwise.gpu_runtime.embedding"):
        out = engine.embed(TEXTS, max_batch_size=4)
    assert engine._cut_is_exact is False
    assert "truncates its own way" in caplog.text
    tokenized = engine._tokenize(TEXTS, "")
    reference = engine.model.preprocess([TEXTS[3]])
    assert tokenized.columns["input_ids"][3] == reference["input_ids"][0].tolist()
    np.testing.assert_allclose(
        out.vectors, engine.model.encode(TEXTS, convert_to_numpy=True, show_progress_bar=False), atol=1e-5
    )


def test_a_model_that_preprocesses_its_own_way_gets_preprocess_for_every_batch():
    """Padding to a multiple of 8 (set on the model's text processing): the padded ids differ from
    preprocess's on the first batch, so every batch is built by preprocess and vectors still equal
    ``encode``'s."""
    engine = _minilm()
    texts = [text for text in TEXTS if len(engine.model.tokenizer(text)["input_ids"]) < engine.max_seq_length]
    assert max(len(ids) for ids in engine.model.tokenizer(texts)["input_ids"]) % 8  # the widest batch
    engine.model[0].processing_kwargs = {"text": {"pad_to_multiple_of": 8}}
    out = engine.embed(texts, max_batch_size=4)
    assert engine._collate_extras[""] is None
    reference = engine.model.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(out.vectors, reference, atol=1e-5)
    assert out.n_tokens[0] == 4 and not any(out.truncated)


def test_callers_tokenize_on_their_own_threads_concurrently():
    """Two callers at once (a worker holding two shards): each tokenizes on its own thread, not the
    compute thread, and both get the vectors they would get alone."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    engine = _minilm()
    alone = {half: engine.embed(TEXTS[half::2], max_batch_size=4).vectors for half in (0, 1)}
    tokenizing_threads = set()
    tokenize = engine._tokenize

    def recording(texts, prompt):
        tokenizing_threads.add(threading.current_thread().name)
        return tokenize(texts, prompt)

    engine._tokenize = recording
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard") as pool:
        futures = {half: pool.submit(engine.embed, TEXTS[half::2], max_batch_size=4) for half in (0, 1)}
        together = {half: future.result().vectors for half, future in futures.items()}
    assert tokenizing_threads and all(name.startswith("shard") for name in tokenizing_threads)
    for half in (0, 1):
        np.testing.assert_allclose(together[half], alone[half], atol=1e-6)


def test_a_tokenizer_is_loaded_once_until_its_files_change(tmp_path):
    """A run's fingerprint, forecast and row cache share one tokenizer per process; an edited
    tokenizer file in a local model directory is read again."""
    import json
    import shutil
    from pathlib import Path

    from shardwise.gpu_runtime import resolve_model_spec
    from shardwise.gpu_runtime.token_count import load_tokenizer

    source = Path(resolve_model_spec("bundled:all-minilm-l6-v2").path)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, tmp_path / name)
    first = load_tokenizer(str(tmp_path))
    assert load_tokenizer(str(tmp_path)) is first and first.model_max_length == 512
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    again = load_tokenizer(str(tmp_path))
    assert again is not first and again.model_max_length == 77
