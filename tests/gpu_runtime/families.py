"""Tiny random-weight checkpoints of the model families users bring, and their greedy reference.

Each family is built from its transformers config class (hidden 64, 2 layers, the bundled SmolLM2
tokenizer's vocabulary), saved with ``save_pretrained`` next to that tokenizer and a
generation_config.json full of the defaults checkpoints ship (sampling, penalties, no-repeat
n-grams, ``cache_implementation``), which the engine must ignore. The reference decodes one row
at a time, unpadded, with a clean ``GenerationConfig``, from the weights as reloaded from disk
(a model built with ``from_config`` may not round-trip every tensor through save/load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
}
WINDOW = 8  # far below the prompts' length, so sliding-window attention matters

# family -> (config class, model class, extra config)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": WINDOW}),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": WINDOW}),
}

# Defaults a checkpoint may ship; every one of them would change greedy output if it leaked.
SHIPPED_GENERATION_DEFAULTS = {
    "do_sample": True,
    "temperature": 0.7,
    "top_k": 20,
    "top_p": 0.8,
    "repetition_penalty": 1.3,
    "no_repeat_ngram_size": 2,
    "cache_implementation": "static",
}

# Demo-like rows of different lengths, so batches pad.
TEXTS = [
    "Great hotel, friendly staff.",
    "The room was small and the walls were thin; we heard the neighbours all night long.",
    "Breakfast cold.",
    "Check-in took forty minutes because the system was down, but the manager apologised and upgraded us.",
    "Lovely view of the harbour from the balcony, would come back.",
    "Noisy air conditioning, dirty carpet, and the pool was closed for the whole week without notice.",
    "OK.",
]
NEW_TOKENS = 6


def save_family(name: str, target: Path, tokenizer_dir: str) -> Path:
    """Write family ``name``'s tiny checkpoint (weights, tokenizer, generation defaults) to ``target``."""
    import transformers
    from transformers import AutoTokenizer

    config_name, model_name, extra = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), **SMALL, **ids, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "generation_config.json").write_text(json.dumps({**ids, **SHIPPED_GENERATION_DEFAULTS}))
    return target


def greedy_reference(model_dir: Path, texts: list[str], new_tokens: int) -> list[tuple[str, int]]:
    """(text, generated tokens) per row: each row alone, unpadded, greedy, with none of the
    checkpoint's generation defaults."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config = GenerationConfig()
    clean = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    answers = []
    for text in texts:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=clean)
        new = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        answers.append((tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)))
    return answers
