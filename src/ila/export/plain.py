"""``parameters.txt``: the selected weights' parameter names, one a line, for any full fine-tuning tool."""

from __future__ import annotations

from typing import Any

from .common import ExportContext, Writer, _approx


def _write_parameters(ctx: ExportContext) -> tuple[dict[str, Any], str]:
    entry: dict[str, Any] = {
        "method": "full",
        "status": "exact",
        "reason": None,
        "trains": len(ctx.weights),
        "extra": 0,
    }
    if ctx.tied_note:
        entry = _approx(entry, ctx.tied_note)
    return entry, "\n".join(ctx.weights) + "\n"


PARAMETERS = Writer("parameters.txt", _write_parameters)
