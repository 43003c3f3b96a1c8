"""The job flags of ``shardwise run``, ``plan`` and ``backfill`` as a job config: each flag given
overrides its config key, over the ``--config`` file and under ``--set KEY=VALUE``."""

from __future__ import annotations

import argparse
from typing import Any

# Flag (argparse dest) -> the top-level config key it sets.
TOP_LEVEL = {
    "input": "input",
    "output": "output",
    "task": "task",
    "text_column": "text_column",
    "id_column": "id_column",
    "keep_columns": "keep_columns",
    "rows_per_shard": "rows_per_shard",
    "workers": "workers",
    "runner": "runner",
    "device": "device",
    "overwrite": "overwrite",
    "max_cost": "max_cost",
    "cache": "cache",
}
# Flag -> the key it sets in the ``generate:`` section.
GENERATE = {
    "prompt_template": "prompt_template",
    "system_prompt": "system_prompt",
    "max_new_tokens": "max_new_tokens",
    "gen_model": "model",
    "engine": "engine",
    "base_url": "base_url",
    "output_schema": "output_schema",
}


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the flags in ``args`` set (flags not given set nothing)."""
    overrides: dict[str, Any] = {
        key: getattr(args, flag) for flag, key in TOP_LEVEL.items() if getattr(args, flag) is not None
    }
    generate = {key: getattr(args, flag) for flag, key in GENERATE.items() if getattr(args, flag) is not None}
    if generate:
        overrides["generate"] = generate
    if args.embed_model:
        overrides["embed"] = {"model": args.embed_model}
    if args.baseline:
        overrides["quality"] = {"baseline": args.baseline}
    if args.ray_address:
        overrides["ray"] = {"address": args.ray_address}
        overrides.setdefault("runner", "ray")
    return overrides


def config_from_args(args: argparse.Namespace):
    """The job config of a ``run``, ``plan`` or ``backfill`` command; with ``--date``, that partition's."""
    from shardwise.tasks.config.loading import build_config

    overrides = config_overrides(args)
    if args.config is None and ("input" not in overrides or "output" not in overrides):
        from shardwise.tasks.errors import ConfigError

        raise ConfigError(f"{args.command} needs --input and --output (or a --config that sets them)")
    cfg = build_config(args.config, overrides, args.set_options)
    if args.date:
        from shardwise.tasks.schedule.partitions import dated

        cfg = dated(cfg, args.date)
    return cfg
