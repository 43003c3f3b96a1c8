"""How the HF engine decodes and where a row stops.

Decoding is decided by :class:`~shardwise.gpu_runtime.generation_params.GenerationParams` alone:
:func:`token_ids_only` reduces a model's own generation_config (checkpoints ship with sampling
knobs, penalties, a ``cache_implementation``) to its bos, eos and pad ids at load, and
:func:`generation_config` builds each call's config from the params, so a greedy row decodes the
same on every path. :func:`eos_token_ids` is the set of ids that end an answer (the vLLM engine
stops on the same set); :func:`finished_rows` cuts each generated row at its first one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from .errors import EngineError

if TYPE_CHECKING:
    from .generation_params import GenerationParams

__all__ = [
    "AnswerFrequencyPenalty",
    "BatchTokens",
    "eos_token_ids",
    "finished_rows",
    "generation_config",
    "token_ids_only",
]

# One row of a generate() call: its new tokens through the first eos, and why it ended.
BatchTokens = tuple[list[int], Literal["stop", "length"]]


def generation_config(params: GenerationParams, pad_token_id: int, eos_ids: frozenset[int]) -> Any:
    """The transformers ``GenerationConfig`` of one call: only the knobs ``params`` exposes."""
    from transformers import GenerationConfig

    sampling: dict[str, Any] = {"do_sample": False}
    if params.temperature > 0:
        # top_k=0 switches off transformers' default top-k=50: only the knobs we expose apply.
        sampling = {
            "do_sample": True,
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "top_k": 0,
        }
    if params.ignore_eos:
        # The eos ids are masked until max_new_tokens is reached: every row runs to the end.
        sampling["min_new_tokens"] = params.max_new_tokens
    if params.cache == "static":
        # A preallocated KV cache; transformers compiles the decode step for it on GPUs unless
        # told not to. Off by default: each new batch shape recompiles (see bench/gpu_check.sh).
        sampling["cache_implementation"] = "static"
        sampling["disable_compile"] = not params.compile
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=sorted(eos_ids),
        **sampling,
    )


class AnswerFrequencyPenalty:
    """A ``generate`` logits processor: each token's logit less ``penalty`` times the number of
    times the row's answer so far holds it (``frequency_penalty`` as vLLM and OpenAI define it).
    The answer starts at column ``answer_start`` of ``input_ids``: the prompt's tokens, and the
    filler standing for a prefilled cache, do not count."""

    def __init__(self, penalty: float, answer_start: int) -> None:
        self.penalty = float(penalty)
        self.answer_start = answer_start

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        answer = input_ids[:, self.answer_start :]
        if answer.shape[1] == 0:
            return scores
        counts = scores.new_zeros(scores.shape).scatter_add_(1, answer, scores.new_ones(answer.shape))
        return scores - self.penalty * counts


def finished_rows(new_tokens: list[list[int]], eos_ids: frozenset[int], ignore_eos: bool) -> list[BatchTokens]:
    """Each row of a generate() output's new tokens, through its first eos, and why it ended."""
    rows: list[BatchTokens] = []
    for row in new_tokens:
        # Rows that finish early are filled with pad (often == eos) up to the batch's longest:
        # count through the first eos only.
        # With ignore_eos every row runs to max_new_tokens and nothing is padding.
        stop_at = None if ignore_eos else next((k for k, tok in enumerate(row) if tok in eos_ids), None)
        n_new = len(row) if stop_at is None else stop_at + 1
        rows.append((row[:n_new], "length" if stop_at is None else "stop"))
    return rows


# What a model's generation_config may keep: token ids the model was trained with, not decoding choices.
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def token_ids_only(loaded: Any) -> Any:
    """A generation_config holding only ``loaded``'s token ids. transformers fills every field a
    ``GenerationConfig`` passed to ``generate`` leaves unset from the model's (penalties, no-repeat
    n-grams, sampling knobs, ``cache_implementation``): with this one, only the engine's own count."""
    from transformers import GenerationConfig

    kept = {name: getattr(loaded, name, None) for name in _TOKEN_ID_FIELDS}
    return GenerationConfig(**{name: value for name, value in kept.items() if value is not None})


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends an answer: the tokenizer's eos plus the generation config's (may be a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if not ids:
        raise EngineError("model has no eos token: generation could never stop")
    return frozenset(ids)
