"""GPU batch sizing: KV bytes per token from a model config, and the budget a free-memory figure buys."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig

from shardwise.gpu_runtime import GenerationParams
from shardwise.gpu_runtime.sizing import (
    CPU_MAX_BATCH_SIZE,
    CPU_TOKEN_BUDGET,
    GPU_MAX_BATCH_SIZE,
    KV_MEMORY_FRACTION,
    MIN_TOKEN_BUDGET,
    auto_batch_limits,
    kv_bytes_per_token,
)

GiB = 1 << 30


def test_kv_bytes_per_token_of_llama_8b_shapes():
    # Llama-3.1-8B: 32 layers x 8 kv heads x 128 head dim x (key + value) x 2 bytes (bf16) = 128 KiB.
    llama_8b = LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8)
    assert kv_bytes_per_token(llama_8b, torch.bfloat16) == 32 * 8 * 128 * 2 * 2 == 128 * 1024
    assert kv_bytes_per_token(llama_8b, torch.float32) == 256 * 1024


def test_kv_bytes_per_token_reads_explicit_head_dim_and_missing_kv_heads():
    gemma = Gemma3TextConfig(
        num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=256
    )
    assert kv_bytes_per_token(gemma, torch.bfloat16) == 4 * 1 * 256 * 2 * 2
    mha = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    mha.num_key_value_heads = None
    assert kv_bytes_per_token(mha, torch.float32) == 2 * 4 * 16 * 2 * 4


def test_budget_from_free_memory():
    per_token = 128 * 1024  # an 8B Llama in bf16
    budget, rows = auto_batch_limits(100 * GiB, per_token)
    assert budget == int(100 * GiB * KV_MEMORY_FRACTION) // per_token == 655_360
    assert rows == GPU_MAX_BATCH_SIZE
    # Little free memory: a small budget and fewer rows, never nothing.
    budget, rows = auto_batch_limits(64 * 1024 * 1024, per_token)
    assert budget == 409 and rows == 409 // MIN_TOKEN_BUDGET == 6
    assert auto_batch_limits(0, per_token) == (MIN_TOKEN_BUDGET, 1)
    with pytest.raises(ValueError):
        auto_batch_limits(GiB, 0)


@pytest.mark.slow
def test_cpu_keeps_fixed_sizes_and_explicit_settings_win(generation_engine):
    assert generation_engine.batch_limits(GenerationParams()) == (CPU_TOKEN_BUDGET, CPU_MAX_BATCH_SIZE)
    assert generation_engine.batch_limits(GenerationParams(token_budget=512)) == (512, CPU_MAX_BATCH_SIZE)
    assert generation_engine.batch_limits(GenerationParams(token_budget=512, max_batch_size=3)) == (512, 3)
