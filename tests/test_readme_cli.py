"""The README's command synopsis matches the parser: every command and every flag of it is there,
and ``shardwise --help`` reads as text (no reStructuredText, nothing cut off)."""

from __future__ import annotations

import re
from pathlib import Path

from shardwise.flows.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _synopsis() -> str:
    start = README.index("shardwise run --input URI")
    return README[start : README.index("```", start)]


def _subparsers(parser):
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action.choices


def test_every_command_and_flag_is_in_the_readme_synopsis():
    synopsis = _synopsis()
    lines = {line.split()[1]: line for line in re.split(r"\n(?=shardwise )", synopsis) if line.strip()}
    missing = []
    for name, sub in _subparsers(build_parser()).items():
        if name not in lines:
            missing.append(name)
            continue
        commands = _subparsers(sub) if name == "cache" else {None: sub}
        for sub_name, command in commands.items():
            text = lines[name] if sub_name is None else synopsis
            if "<the same flags as run>" in text or "<the flags of run but --date>" in text:
                continue  # checked on run itself; what each adds is listed
            for action in command._actions:
                flags = [f for f in action.option_strings if f not in ("-h", "--help")]
                if flags and not any(re.search(rf"[\[ ]{re.escape(f)}[\] ]", text) for f in flags):
                    missing.append(f"{name} {sub_name or ''} {flags[0]}".replace("  ", " "))
    assert not missing, missing
    for extra in ("--json", "--sample-rows", "--calibrate"):  # what plan adds to run's flags
        assert extra in lines["plan"]


def test_help_is_plain_text():
    text = build_parser().format_help()
    assert "``" not in text and "Exit codes: 0 done" in text
    assert text.rstrip().endswith("143 terminated.")
