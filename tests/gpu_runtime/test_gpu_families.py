"""Every model family decodes exactly like per-row HF greedy generation (fp32, CPU).

Tiny random-weight checkpoints of Llama, Qwen2, Qwen3, Mistral (sliding window), Gemma-2, Gemma-3
and Phi-3 (tests/gpu_runtime/families.py), each shipping a generation_config.json full of
sampling, penalty and cache defaults that must not leak into decoding. Full-attention families
take the engine's joined-cache path, sliding-window ones the plain ``generate`` path; both must
give the reference's text and token counts on every row. Gemma-3 also goes through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.gpu_runtime import GenerationParams, load_generation_engine
from shardwise.gpu_runtime.attention import GROUPED_KV_SDPA
from tests.gpu_runtime.families import FAMILIES, NEW_TOKENS, TEXTS, greedy_reference, save_family

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    from shardwise.gpu_runtime.dummy import llama_tokenizer_dir

    return llama_tokenizer_dir("the family tests")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: save_family(name, root / name, tokenizer_dir) for name in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_equals_per_row_greedy_reference(family, family_dirs):
    model_dir = family_dirs[family]
    expected = greedy_reference(model_dir, TEXTS, NEW_TOKENS)
    engine = load_generation_engine(str(model_dir), device="cpu")
    # A small budget: several batches, each padded to its longest row.
    got = engine.generate(TEXTS, GenerationParams(max_new_tokens=NEW_TOKENS, token_budget=160, max_batch_size=3))
    assert [(g.text, g.n_generated_tokens) for g in got] == expected
    assert engine.model.generation_config.do_sample is not True  # the shipped defaults were dropped
    assert engine.model.generation_config.cache_implementation is None


def test_joined_and_plain_generate_paths_agree(family_dirs, monkeypatch):
    """The same rows through the joined-cache path and the plain-generate fallback decode alike."""
    engine = load_generation_engine(str(family_dirs["qwen2"]), device="cpu")
    assert engine._cache_arg is not None  # a full-attention family takes the joined path
    params = GenerationParams(max_new_tokens=NEW_TOKENS, max_batch_size=4)
    joined = engine.generate(TEXTS, params)
    monkeypatch.setattr(engine, "_cache_arg", None)
    plain = engine.generate(TEXTS, params)
    assert plain == joined
    assert [(g.text, g.n_generated_tokens) for g in joined] == greedy_reference(family_dirs["qwen2"], TEXTS, NEW_TOKENS)


def test_sliding_window_families_take_the_plain_generate_path(family_dirs):
    for family in ("mistral-sliding", "gemma2", "gemma3"):
        assert load_generation_engine(str(family_dirs[family]), device="cpu")._cache_arg is None


def test_attention_implementation_is_transformers_choice_unless_configured(family_dirs):
    from transformers import AutoModelForCausalLM

    # Gemma-2 loads (some transformers releases refuse a forced sdpa for it) with the kernel
    # transformers itself picks for the architecture, whichever that is in this release.
    gemma2 = load_generation_engine(str(family_dirs["gemma2"]), device="cpu")
    config = AutoModelForCausalLM.from_pretrained(family_dirs["gemma2"]).config
    chosen = config._attn_implementation
    # On CPU a grouped-query model's sdpa becomes the same kernel without KV copies (attention.py).
    grouped = chosen == "sdpa" and config.num_key_value_heads < config.num_attention_heads
    assert gemma2.info["attn_implementation"] == (GROUPED_KV_SDPA if grouped else chosen)
    eager = load_generation_engine(str(family_dirs["llama"]), device="cpu", attn_implementation="eager")
    assert eager.info["attn_implementation"] == "eager"
    assert load_generation_engine(str(family_dirs["llama"]), device="cpu") is not eager


# One family through the CLI (a run costs ~1 min of Prefect and MLflow start-up); the rest in-process.
@pytest.mark.parametrize("family", ["gemma3"])
def test_cli_output_equals_per_row_greedy_reference(family, family_dirs, tmp_path):
    model_dir = family_dirs[family]
    data = tmp_path / "reviews"
    data.mkdir()
    pq.write_table(pa.table({"review_id": list(range(len(TEXTS))), "text": TEXTS}), data / "part-0.parquet")
    out = tmp_path / "out"
    shardwise = str(Path(sys.executable).with_name("shardwise"))
    proc = subprocess.run(
        [
            shardwise,
            "run",
            "--input",
            str(data),
            "--output",
            str(out),
            "--task",
            "generate",
            "--gen-model",
            str(model_dir),
            "--id-column",
            "review_id",
            "--device",
            "cpu",
            "--set",
            f"generate.max_new_tokens={NEW_TOKENS}",
            "--set",
            "generate.max_batch_size=4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out, columns=["review_id", "generated_text", "n_generated_tokens"]).sort_by("review_id")
    got = list(zip(table.column("generated_text").to_pylist(), table.column("n_generated_tokens").to_pylist()))
    assert got == greedy_reference(model_dir, TEXTS, NEW_TOKENS)
    # The run's chat date is fixed once and recorded in the manifest and every part's footer.
    manifest = json.loads((out / "_manifest.json").read_text())
    parts = sorted(out.glob("**/*.parquet"))
    assert manifest["chat_date"] and parts
    for part in parts:
        footer = pq.read_metadata(part).metadata
        assert any(
            key.endswith(b"chat_date") and value == manifest["chat_date"].encode() for key, value in footer.items()
        ), footer
