"""SDPA attention that reads grouped keys and values in place on a CPU.

Models with grouped-query attention (SmolLM2, Llama 3, Qwen, Mistral: fewer key/value heads than
query heads) keep one key and value per group in their KV cache. transformers' ``sdpa`` attention
passes them to ``scaled_dot_product_attention`` as they are (``enable_gqa``) only when there is no
attention mask; with one (every left-padded batch has one) it first copies each layer's keys and
values once per query head of the group. On a CPU that copy of the whole cache at every decode step
costs more than the step's attention itself: a 64-row SmolLM2 decode step over 250 positions took
622 ms with the copy and 276 ms without the mask, and a 64-row batch decoded slower than two of 32.

:func:`use_grouped_kv_attention` switches a CPU model from ``sdpa`` to :data:`GROUPED_KV_SDPA`,
which calls the same kernel with the mask and ``enable_gqa``. The kernel's results are the same
bits as with the copies (checked by a test on the engine's outputs and on the kernel alone);
only the copies are gone. On CUDA the switch is not made: there a masked call with ``enable_gqa``
loses the memory-efficient kernel, which costs more than the copy.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GROUPED_KV_SDPA", "grouped_kv_sdpa", "use_grouped_kv_attention"]

GROUPED_KV_SDPA = "sdpa_grouped_kv"  # the attention implementation's registered name


def grouped_kv_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, with a masked grouped-query call made without copying
    the keys and values per query head. Everything else (no mask, position bias, a paged cache,
    equal head counts) goes to transformers' own function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if (
        not grouped
        or attention_mask is None
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("output_attentions")
        or key.shape[-1] != value.shape[-1]
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # With a mask, transformers' function never asks for the causal flag: the mask holds it.
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


def use_grouped_kv_attention(model: Any) -> bool:
    """Switch ``model`` to :data:`GROUPED_KV_SDPA` where that saves the copies: on a CPU, with
    ``sdpa`` attention and fewer key/value heads than query heads. Returns whether it switched."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if model.device.type != "cpu" or getattr(config, "_attn_implementation", None) != "sdpa" or kv_heads == heads:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_KV_SDPA, grouped_kv_sdpa)
    AttentionMaskInterface.register(GROUPED_KV_SDPA, sdpa_mask)
    try:
        model.set_attn_implementation(GROUPED_KV_SDPA)
    except (ValueError, KeyError, ImportError):  # a model class that accepts only its own kernels
        return False
    return config._attn_implementation == GROUPED_KV_SDPA
