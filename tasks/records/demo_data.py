"""A realistic synthetic dataset for the demo and tests: product reviews across several Parquet files.

Reviews mix one-liners and multi-paragraph rants so batching by length matters; each file has
several row groups so planning has something to cut. Deterministic for a given seed.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardwise.tasks.storage.fs import atomic_write_bytes, join

PRODUCTS = {
    "kitchen": ["espresso machine", "chef's knife", "air fryer", "cast-iron skillet", "blender"],
    "outdoor": ["hiking boots", "two-person tent", "headlamp", "rain jacket", "water filter"],
    "electronics": ["noise-cancelling headphones", "e-reader", "USB-C charger", "webcam", "smart plug"],
    "home": ["desk lamp", "office chair", "duvet", "robot vacuum", "bookshelf"],
}
OPENERS = {
    5: ["Absolutely love this {p}.", "Best {p} I have owned.", "Exceeded every expectation."],
    4: ["Really good {p} overall.", "Solid {p}, a few nitpicks.", "Happy with this purchase."],
    3: ["The {p} is okay.", "Mixed feelings about this {p}.", "Does the job, nothing more."],
    2: ["Disappointed with the {p}.", "Not great, honestly.", "Expected more for the price."],
    1: ["Terrible {p}.", "Broke within a week.", "Do not buy this {p}."],
}
DETAILS = {
    "good": [
        "Setup took five minutes and the instructions were clear.",
        "Build quality feels premium and nothing rattles.",
        "It arrived a day early and was well packed.",
        "Battery life is far better than advertised.",
        "My partner, who is picky about these things, approves.",
        "Customer support answered a question within an hour.",
    ],
    "bad": [
        "The box was damaged and one part was missing.",
        "It stopped working after the second use.",
        "The manual is translated so badly it is useless.",
        "Returns were a hassle and took three weeks.",
        "It is much louder than the listing suggested.",
        "The finish started peeling after a month.",
    ],
    "neutral": [
        "I use it mostly on weekends.",
        "Compared with my old one, it is a bit smaller.",
        "The colour is slightly different from the photos.",
        "I bought it on sale, which helped.",
        "It took some getting used to.",
    ],
}


def _review_text(rng: random.Random, product: str, rating: int) -> str:
    opener = rng.choice(OPENERS[rating]).format(p=product)
    length = rng.choices(["one-liner", "short", "medium", "long"], weights=[2, 4, 3, 1])[0]
    if length == "one-liner":
        return opener
    pool = DETAILS["good" if rating >= 4 else "bad" if rating <= 2 else "neutral"] + DETAILS["neutral"]
    sentences = {"short": 2, "medium": 5, "long": 14}[length]
    body = [rng.choice(pool) for _ in range(sentences)]
    if length == "long":
        paragraphs = [" ".join(body[i : i + 4]) for i in range(0, len(body), 4)]
        return opener + "\n\n" + "\n\n".join(paragraphs)
    return " ".join([opener, *body])


def review_rows(n: int, seed: int = 7, start_id: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    base = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    rows = []
    for i in range(n):
        category = rng.choice(sorted(PRODUCTS))
        product = rng.choice(PRODUCTS[category])
        rating = rng.choices([1, 2, 3, 4, 5], weights=[1, 1, 2, 3, 4])[0]
        rows.append(
            {
                "review_id": f"r-{start_id + i:06d}",
                "created_at": base + dt.timedelta(minutes=rng.randint(0, 60 * 24 * 27)),
                "category": category,
                "product": product,
                "rating": rating,
                "text": _review_text(rng, product, rating),
            }
        )
    return rows


REVIEW_SCHEMA = pa.schema(
    [
        pa.field("review_id", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("category", pa.string()),
        pa.field("product", pa.string()),
        pa.field("rating", pa.int8()),
        pa.field("text", pa.string()),
    ]
)

# The answer the structured-output example asks of each review (``generate.output_schema``): the
# tests and the benchmark use this one schema.
REVIEW_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "mixed"]},
        "topic": {"type": "string"},
        "would_recommend": {"type": "boolean"},
        "stars": {"type": "integer"},
    },
    "required": ["sentiment", "topic", "would_recommend", "stars"],
}


def write_reviews_dataset(
    directory: str,
    files: int = 3,
    rows_per_file: int = 16,
    rows_per_group: int = 4,
    seed: int = 7,
    storage_options: dict[str, Any] | None = None,
    rows: int | None = None,
) -> list[str]:
    """Write ``files`` Parquet files of reviews under ``directory``; returns their URIs.

    ``rows`` (instead of ``rows_per_file``) is a total spread as evenly as it goes over at most
    ``files`` files: 8 rows in 3 files are 3 + 3 + 2."""
    import io

    if rows is None:
        counts = [rows_per_file] * files
    else:
        used = max(1, min(files, rows))
        counts = [rows // used + (1 if f < rows % used else 0) for f in range(used)]
    uris = []
    for f, count in enumerate(counts):
        records = review_rows(count, seed=seed + f, start_id=sum(counts[:f]))
        table = pa.Table.from_pylist(records, schema=REVIEW_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=rows_per_group)
        uri = join(directory, f"reviews-{f:03d}.parquet")
        atomic_write_bytes(uri, buffer.getvalue(), storage_options)
        uris.append(uri)
    return uris
