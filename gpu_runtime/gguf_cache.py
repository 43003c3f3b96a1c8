"""GGUF weights dequantized once into a safetensors checkpoint in the model cache.

GGUF weights are quantized; transformers dequantizes them on every load (~16 s for SmolLM2-135M).
They are therefore dequantized once into a checkpoint under
:func:`~shardwise.gpu_runtime.model_cache.model_cache_dir`, keyed by the file's sha256, and loaded from there
afterwards (well under a second). The checkpoint holds the tokenizer too, which token counting and
the dummy shapes read instead of parsing the GGUF again.
"""

from __future__ import annotations

from pathlib import Path

from .errors import EngineError
from .model_cache import ENTRY_META, model_cache_dir, populate_cache_dir
from .model_specs import ResolvedModel

__all__ = ["converted_gguf_dir", "gguf_cache_path", "weights_dir"]


def gguf_cache_path(resolved: ResolvedModel) -> Path:
    """Directory that holds (or will hold) the dequantized checkpoint of a GGUF model."""
    if resolved.gguf_file is None:
        raise ValueError(f"{resolved.spec!r} is not a GGUF model")
    return model_cache_dir() / f"gguf-{resolved.revision[:16]}"


def converted_gguf_dir(resolved: ResolvedModel) -> Path | None:
    """The dequantized checkpoint of a GGUF model if it was already converted, else None."""
    target = gguf_cache_path(resolved)
    return target if (target / ENTRY_META).exists() else None


def weights_dir(resolved: ResolvedModel) -> str:
    """A directory or Hub id that ``from_pretrained`` loads quickly, converting a GGUF first if needed."""
    gguf_file = resolved.gguf_file
    if gguf_file is None:
        return resolved.path
    target = gguf_cache_path(resolved)

    def convert(tmp: Path) -> dict[str, object]:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only when converting

        try:
            tokenizer = AutoTokenizer.from_pretrained(resolved.path, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=gguf_file)
            # The weights are already dequantized in memory; the GGUF quantizer only blocks saving.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)  # safetensors; handles tied embeddings
            tokenizer.save_pretrained(tmp)
        except Exception as exc:
            raise EngineError(f"could not convert GGUF model {resolved.spec!r} into {target}: {exc}") from exc
        return {
            "source_spec": resolved.spec,
            "gguf": str(Path(resolved.path) / gguf_file),
            "sha256": resolved.revision,
            "dtype": str(model.dtype),
        }

    return str(populate_cache_dir(target, convert, f"the dequantized checkpoint of {resolved.spec!r}"))
