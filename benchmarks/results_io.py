"""Where and how the benchmark scripts write their results: ``benchmarks/results/<name>.json`` and ``.md``."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def command_line(script: str) -> str:
    """The command that produced a result, as a reader would type it from the repository root."""
    return f"python benchmarks/{script} " + shlex.join(sys.argv[1:])


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


def save(name: str, doc: dict, markdown: str) -> Path:
    """Write the JSON record and the Markdown table of one benchmark run; returns the Markdown path."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    path = RESULTS / f"{name}.md"
    path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return path
