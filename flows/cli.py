"""The ``shardwise`` command line: ``run``, ``plan``, ``backfill``, ``demo``, ``status``, ``lineage``,
``release`` and ``cache``. This module parses the command and maps its errors to exit codes; the
commands are :mod:`shardwise.flows.commands` and :mod:`shardwise.flows.backfill_cli`, the flags'
config keys :mod:`shardwise.flows.flags`, and every text printed :mod:`shardwise.flows.render`.

Exit codes: 0 success; 1 the run failed (some shards failed, or an unexpected error); 2 bad input
or config (nothing was processed); 3 storage not reachable or not writable; 4 the output is complete
but held by the quality gate (no ``_SUCCESS``; see ``shardwise release``); 130 interrupted
(Ctrl-C, SIGINT); 143 terminated (SIGTERM).
Errors are one line on stderr; set ``SHARDWISE_DEBUG=1`` for a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from typing import Any, NoReturn

from shardwise.flows.console import console


def _environment_defaults() -> None:
    """Defaults that must be in place before Prefect or tokenizers are imported."""
    # The ephemeral Prefect server takes ~12 s to start on a small machine; 20 s is too tight.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if "TOKENIZERS_PARALLELISM" not in os.environ:
        # One tokenizer thread: compute on the CPU needs the cores. An engine on a GPU turns the
        # tokenizers' threads on (shardwise.gpu_runtime.device.tokenize_on_all_cores); the marker says whose
        # choice this was.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["SHARDWISE_TOKENIZERS_PARALLELISM_DEFAULTED"] = "1"
    # No network but package registries: telemetry would only log a failure.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardwise",
        description="Enrich a Parquet dataset with generated text and embeddings, shard by shard, "
        "as Prefect flows tracked in MLflow.",
        epilog="`shardwise COMMAND --help` lists a command's flags. Exit codes: 0 done, 1 a run "
        "failed (every good shard still written), 2 bad input or config, 3 storage unreachable, "
        "4 held by the quality gate, 130 interrupted, 141 output pipe closed, 143 terminated.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="enrich a Parquet dataset")
    run.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print Prefect's task lines, MLflow's and vLLM's logs and progress bars",
    )
    run.add_argument("--config", help="YAML job config (conf/jobs/*.yaml)")
    run.add_argument("--input", help="Parquet file, directory, glob or fsspec URI")
    run.add_argument("--output", help="output directory URI")
    run.add_argument("--task", choices=["generate", "embed", "both"])
    run.add_argument("--text-column")
    run.add_argument("--id-column")
    run.add_argument("--keep-columns", choices=["all", "id"])
    run.add_argument("--prompt-template")
    run.add_argument("--system-prompt")
    run.add_argument("--max-new-tokens", type=int)
    run.add_argument(
        "--output-schema",
        metavar="FILE_OR_JSON",
        help="JSON Schema every answer follows (a .json file or inline JSON); adds the column generated",
    )
    run.add_argument("--gen-model", help="model spec: bundled:NAME, a Hugging Face id or a local path")
    run.add_argument(
        "--engine",
        choices=["auto", "hf", "vllm", "openai"],
        help="generation engine (default auto: vllm when CUDA and a CUDA vLLM are there, else hf); "
        "openai: the OpenAI-compatible server at --base-url",
    )
    run.add_argument("--base-url", help="engine openai: the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1")
    run.add_argument("--embed-model", help="model spec: bundled:NAME, a Hugging Face id or a local path")
    run.add_argument("--rows-per-shard", type=int)
    run.add_argument("--date", help="run one dt=YYYY-MM-DD partition of a partitioned job")
    run.add_argument("--workers", type=int, help="worker processes, one per device (default: visible GPUs, 1 on CPU)")
    run.add_argument("--runner", choices=["local", "ray"], help="local worker processes (default) or Ray")
    run.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    run.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    run.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace an output that was written with a different config",
    )
    run.add_argument(
        "--set",
        dest="set_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. generate.temperature=0.7 (repeatable)",
    )
    run.add_argument(
        "--max-cost",
        type=float,
        metavar="USD",
        help="refuse the run if its forecast can cost more; start no shard past it",
    )
    run.add_argument(
        "--cache", metavar="URI", help="row cache (any fsspec URI): reuse rows computed before from the same inputs"
    )
    run.add_argument(
        "--baseline",
        metavar="OUTPUT_URI",
        help="an earlier output the quality gate compares this one with (quality.baseline)",
    )

    plan = sub.add_parser("plan", help="forecast rows, tokens, device time and cost of a run; runs nothing")
    for action in run._actions[1:]:  # exactly run's job flags (all but -h), so a plan matches its run
        plan._add_action(action)
    plan.add_argument("--json", action="store_true", help="print one JSON document")
    sample_rows = plan.add_argument(
        "--sample-rows",
        type=int,
        default=None,
        metavar="N",
        help="tokenize every row up to N rows to compute, else a random sample of shards",
    )
    calibrate = plan.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help="without earlier runs of the job: load the model and answer N sampled rows "
        "to measure answer length and speed (default 0: no model is loaded)",
    )
    plan.add_argument(
        "--compare",
        action="store_true",
        help="also price the job on each endpoint the config lists under endpoints:, in one table",
    )

    backfill = sub.add_parser(
        "backfill",
        help="run every dt=YYYY-MM-DD partition from --start to --end "
        "(finished ones are skipped); --plan forecasts them",
    )
    for action in run._actions[1:]:
        if action.dest != "date":  # the dates come from --start and --end
            backfill._add_action(action)
    backfill.set_defaults(date=None)
    backfill.add_argument("--start", required=True, help="first date, YYYY-MM-DD")
    backfill.add_argument("--end", required=True, help="last date, YYYY-MM-DD (included)")
    backfill.add_argument("--plan", action="store_true", help="forecast the partitions, summed; runs nothing")
    backfill.add_argument("--json", action="store_true", help="with --plan: print one JSON document")
    backfill._add_action(calibrate)
    backfill._add_action(sample_rows)

    demo = sub.add_parser("demo", help="generate a synthetic review dataset and enrich it")
    demo.add_argument("--rows", type=int, default=48, help="total rows (spread over 3 files)")
    demo.add_argument("--max-new-tokens", type=int)
    demo._add_action(run._option_string_actions["--verbose"])
    demo.add_argument("--set", dest="set_options", action="append", default=[], metavar="KEY=VALUE")

    status = sub.add_parser("status", help="progress of an output directory")
    status.add_argument("output")

    lineage = sub.add_parser("lineage", help="provenance of an output part, or of one output row")
    lineage.add_argument("target", help="an output directory or one part-*.parquet")
    lineage.add_argument("--id", dest="row_id", help="show the row with this id and where it came from")

    cache = sub.add_parser("cache", help="inspect or prune a row cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    stats = cache_sub.add_parser("stats", help="entries, size and the hit rate of recent runs")
    stats.add_argument("uri")
    stats.add_argument("--json", action="store_true", help="print one JSON document")
    prune = cache_sub.add_parser("prune", help="delete entries written more than DAYS days ago")
    prune.add_argument("uri")
    prune.add_argument("--older-than", type=float, required=True, metavar="DAYS")

    release = sub.add_parser("release", help="publish an output the quality gate held (writes _SUCCESS)")
    release.add_argument("output")
    release.add_argument("--reason", help="why it is released (recorded in the manifest and MLflow)")
    return parser


def _fail(message: str, exit_code: int) -> int:
    """Report an error exit: one line, and with ``SHARDWISE_DEBUG`` set the traceback before it."""
    from shardwise.flows.render import error

    if os.environ.get("SHARDWISE_DEBUG"):
        traceback.print_exc(file=sys.stderr)
    error(message)
    return exit_code


def _exit_abandoning_threads(code: int) -> NoReturn:
    """End the process now. A shard thread abandoned by an interrupt may still be computing, and a
    normal exit joins every such thread first; the run's MLflow and Prefect states are already
    recorded, and logs still queued for Prefect get a few seconds to go out."""
    handlers = sys.modules.get("prefect.logging.handlers")
    if handlers is not None:
        handlers.APILogWorker.drain_all(timeout=5, at_exit=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _raise_terminated(signum: int, frame: Any) -> None:
    from shardwise.tasks.errors import Terminated

    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return 128 + signal.SIGPIPE  # as a Unix tool killed by SIGPIPE: `shardwise ... | head` is not an error


def _stdout_closed() -> bool:
    """Whether standard output's reader has gone (``| head`` read what it wanted): the pipe then
    polls as an error. If so, what is left to print goes nowhere, so the interpreter's exit does
    not fail on it either."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (captured output)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True


def _main(argv: list[str] | None) -> int:
    _environment_defaults()
    args = build_parser().parse_args(argv)
    from shardwise.gpu_runtime.errors import EngineError, ModelNotFoundError
    from shardwise.tasks.errors import ShardwiseError, Terminated

    # SIGTERM unwinds like Ctrl-C, so the run is closed properly (while a flow runs, Prefect's own
    # handler raises TerminationSignal instead).
    signal.signal(signal.SIGTERM, _raise_terminated)

    from shardwise.flows import commands
    from shardwise.flows.backfill_cli import cmd_backfill

    handlers = {
        "run": commands.cmd_run,
        "plan": commands.cmd_plan,
        "backfill": cmd_backfill,
        "demo": commands.cmd_demo,
        "status": commands.cmd_status,
        "lineage": commands.cmd_lineage,
        "cache": commands.cmd_cache,
        "release": commands.cmd_release,
    }
    started = time.perf_counter()
    try:
        with console(getattr(args, "verbose", None)):
            return handlers[args.command](args)
    except ShardwiseError as err:
        return _fail(str(err), err.exit_code)
    except ModelNotFoundError as err:
        return _fail(str(err), 2)
    except EngineError as err:
        return _fail(f"engine failed: {err}", 1)
    except BrokenPipeError:
        raise  # main() tells a closed standard output from any other broken pipe
    except KeyboardInterrupt:
        _fail(f"interrupted after {time.perf_counter() - started:.0f}s; rerun the same command to redo it", 130)
        _exit_abandoning_threads(130)
    except Exception as err:  # noqa: BLE001 - last resort: one line, traceback on request
        return _fail(f"unexpected {type(err).__name__}: {err} (SHARDWISE_DEBUG=1 shows the traceback)", 1)
    except BaseException as err:
        prefect_exceptions = sys.modules.get("prefect.exceptions")  # Prefect's SIGTERM bridge, if loaded
        if not isinstance(err, Terminated) and not (
            prefect_exceptions and isinstance(err, prefect_exceptions.TerminationSignal)
        ):
            raise
        _fail(f"terminated after {time.perf_counter() - started:.0f}s; rerun the same command to redo it", 143)
        _exit_abandoning_threads(143)


if __name__ == "__main__":
    sys.exit(main())
