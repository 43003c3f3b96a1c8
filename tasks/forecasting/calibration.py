"""A small calibration run for forecasts of a job that has no history yet.

Without earlier runs in MLflow, a forecast knows neither how long the model's answers are nor how
fast this machine produces them. ``shardwise plan --calibrate N`` loads the generation model, as a
run would, answers N rows of the input and measures both; the forecast then says it rests on that
sample. Nothing is written: the answers are thrown away.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.planning.shards import Shard

Z_95 = 1.96


@dataclass(frozen=True)
class Calibration:
    """What N sampled rows cost to generate on this machine (model loading not included)."""

    generated_per_row: tuple[int, ...]  # generated tokens of each sampled row with text
    prompt_tokens: int
    seconds: float  # the engine's generate call over the sample
    device: str

    @property
    def rows(self) -> int:
        return len(self.generated_per_row)

    @property
    def mean_per_row(self) -> float:
        return sum(self.generated_per_row) / self.rows if self.rows else 0.0

    def per_row_interval(self) -> tuple[float, float]:
        """A 95% interval for the mean generated tokens per row (normal approximation)."""
        n = self.rows
        if n < 2:
            return 0.0, math.inf
        mean = self.mean_per_row
        sd = math.sqrt(sum((v - mean) ** 2 for v in self.generated_per_row) / (n - 1))
        half = Z_95 * sd / math.sqrt(n)
        return max(0.0, mean - half), mean + half

    @property
    def seconds_per_generated_token(self) -> float:
        return self.seconds / max(sum(self.generated_per_row), 1)


def calibrate(cfg: JobConfig, shards: list[Shard], rows: int) -> Calibration:
    """Answer up to ``rows`` rows with text from ``shards`` (read in the order given) and measure."""
    from shardwise.tasks.compute.shard_work import input_columns, load_engines
    from shardwise.tasks.records.engine_inputs import generation_params, render_prompts
    from shardwise.tasks.records.enrichment import clean_text
    from shardwise.tasks.records.shard_io import read_shard

    prompts: list[str] = []
    for shard in shards:
        table = read_shard(shard, input_columns(cfg), cfg.storage_options)
        cleaned = [clean_text(v) for v in table.column(cfg.text_column).to_pylist()]
        ok = [i for i, (_, err) in enumerate(cleaned) if err is None][: rows - len(prompts)]
        prompts += render_prompts(cfg, table, [text for text, _ in cleaned], ok)
        if len(prompts) >= rows:
            break
    generator, _ = load_engines(cfg.model_copy(update={"task": "generate"}))
    chat_date = cfg.run_chat_date()
    params = generation_params(cfg, chat_date)
    started = time.perf_counter()
    outputs = generator.generate(prompts, params) if prompts else []
    seconds = time.perf_counter() - started
    return Calibration(
        generated_per_row=tuple(o.n_generated_tokens for o in outputs),
        prompt_tokens=sum(o.n_prompt_tokens for o in outputs),
        seconds=seconds,
        device=str(generator.info.get("device")),
    )
