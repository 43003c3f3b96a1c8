"""What an embedding call returns, the same for every engine (local and serving endpoint); kept
apart from the local engine so that an endpoint's engine imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EmbeddingOutput"]


@dataclass
class EmbeddingOutput:
    """Embeddings in input order: ``vectors`` is float32 ``[n, dim]``; ``n_tokens`` counts each
    text's tokens (special tokens included) before truncation; ``truncated`` marks texts longer
    than the model's ``max_seq_length``, whose tail did not influence the vector. ``errors`` says,
    per text, why a serving endpoint refused it (its vector is then zeros); None: no refusals."""

    vectors: np.ndarray
    n_tokens: list[int]
    truncated: list[bool]
    errors: list[str | None] | None = None
