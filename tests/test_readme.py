"""The README's commands stay true: every `starling ...` and `python bench/...` command in
its code blocks, and in the inline code of it and of docs/benchmarks.md, names a command
that exists, with options that command accepts (the commands themselves run in the other
tests, the demo and CI)."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[list[str]]:
    """Every command line in the README's bash blocks, split into words."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for part in re.split(r"&&|\|\|", line):
                words = shlex.split(part.strip().strip("()"), comments=True)
                is_bench = words[:1] == ["python"] and words[1:2] and words[1].startswith("bench/")
                if words[:1] == ["starling"] or is_bench:
                    commands.append(words)
    return commands


def _inline_commands() -> list[list[str]]:
    """Every whole command in the inline code of the README and docs/benchmarks.md
    (`OMP_NUM_THREADS=1` dropped; a span with an ellipsis is an abbreviation)."""
    commands = []
    for doc in ("README.md", "docs/benchmarks.md"):
        for span in re.findall(r"`([^`\n]+)`", (ROOT / doc).read_text()):
            span = span.removeprefix("OMP_NUM_THREADS=1 ")
            if span.startswith(("starling ", "python bench/")) and "…" not in span:
                commands.append(shlex.split(span))
    return commands


@functools.cache
def _help(*command: str) -> str | None:
    if command[0] == "python":
        run = subprocess.run(
            [sys.executable, *command[1:], "--help"], capture_output=True, text=True, cwd=ROOT
        )
        return run.stdout if run.returncode == 0 else None
    result = run_cli(*command[1:], "--help", env={"COLUMNS": "250"})
    return result.stdout if result.returncode == 0 else None


def test_every_readme_command_exists_with_its_options() -> None:
    commands = _commands()
    named = {" ".join(c[:3]) for c in commands}
    # The README's main paths are all there.
    for expected in ("starling demo", "starling node join", "starling coordinator init"):
        assert any(n.startswith(expected) for n in named), expected
    inline = _inline_commands()
    assert len(inline) > 40  # the benchmark tables' commands among them
    for words in commands + inline:
        # The longest prefix of plain words that is a command of its own.
        length = 2 if words[0] == "python" else 1
        for end in range(length + 1, min(len(words), 4) + 1):
            if words[end - 1].startswith("-") or _help(*words[:end]) is None:
                break
            length = end
        help_text = _help(*words[:length])
        assert help_text is not None, words
        if words[0] == "starling":
            assert length > 1, f"`{' '.join(words)}` names no subcommand"
        for option in (w.split("=")[0] for w in words if w.startswith("--")):
            assert option in help_text, f"`{' '.join(words)}`: {option} is not an option"
