"""``parameters.txt``: the selected weights' parameter names, one a line, for any full fine-tuning tool.

The names are those ``named_parameters()`` lists: a tied ``lm_head``'s weight appears under the input
embedding's name (``model.embed_tokens.weight``), the only name a tool can select it by."""

from __future__ import annotations

from typing import Any

from .common import ExportContext, Writer, _named_head


def _write_parameters(ctx: ExportContext) -> tuple[dict[str, Any], str]:
    entry: dict[str, Any] = {
        "method": "full",
        "status": "exact",
        "reason": None,
        "trains": len(ctx.weights),
        "extra": 0,
    }
    return _named_head(ctx, entry), "\n".join(ctx.weights) + "\n"


PARAMETERS = Writer("parameters.txt", _write_parameters)
