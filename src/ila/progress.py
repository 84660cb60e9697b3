"""Progress bars for the long loops outside the Trainer (scoring batches, held-out loss, generation, the
strategy comparison): tqdm, shown on an interactive terminal and silent otherwise, so logs and CI output
stay clean. ``ILA_PROGRESS=0`` silences them on a terminal too, ``ILA_PROGRESS=1`` forces them on."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from .artifacts import is_main_process

T = TypeVar("T")


def enabled() -> bool:
    """Whether bars are drawn: on the main process, on a terminal (or as ``ILA_PROGRESS`` says)."""
    setting = os.environ.get("ILA_PROGRESS")
    if setting is not None:
        return setting not in ("0", "false", "no", "")
    return is_main_process() and sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``items``, with a bar named ``desc`` while they are consumed."""
    yield from tqdm(
        items, desc=desc, total=total, unit=unit, disable=not enabled(), leave=False, dynamic_ncols=True
    )
