"""Files that stages hand to each other, written so that a later stage never trusts a half-written one.

Only the main process writes: under ``torchrun`` / ``accelerate launch`` every other rank computes the same
result and skips the write (``RANK`` != 0), and :func:`sync_processes` lets them wait for the files.

Every JSON artefact is strict (no NaN or Infinity, which strict parsers reject), carries a schema version and
is written to a temporary file in the same folder and renamed into place, which is atomic on POSIX file
systems. Folders (PEFT adapters) are written the same way: into a temporary sibling, then renamed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import IlaError


def envelope(kind: str, schema_version: int = 1) -> dict[str, Any]:
    """The fields every JSON artefact starts with: what it is, its schema, which ila wrote it and when."""
    return {
        "schema_version": schema_version,
        "kind": kind,
        "ila_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun / accelerate launch job."""
    return int(os.environ.get("RANK", "0")) == 0


def sync_processes() -> None:
    """Wait until every process gets here (a no-op without a process group), so that files the main process
    has just written are there for the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_finite(obj: Any, where: str = "value") -> None:
    """Raise if ``obj`` holds a NaN or infinite float anywhere (JSON would otherwise carry ``NaN``)."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise IlaError(f"{where} is {obj}; refusing to write a non-finite number")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, f"{where}[{i}]")


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file beside it, fsynced, then an atomic rename; only the
    main process writes. A reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    if not is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Strict JSON (``allow_nan=False``), written atomically."""
    check_finite(obj, Path(path).name)
    return write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read strict JSON; NaN/Infinity literals are rejected."""
    path = Path(path)
    if not path.is_file():
        raise IlaError(f"{what} {path} does not exist")

    def reject(token: str) -> Any:
        raise IlaError(f"{what} {path} contains {token}, which is not valid JSON")

    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)
    except UnicodeDecodeError:
        raise IlaError(f"{what} {path} is not UTF-8 text; is it the right file?") from None
    except json.JSONDecodeError as e:
        raise IlaError(
            f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}"
        ) from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    An interrupted write leaves only a ``.tmp`` sibling, never a partial ``path``.
    """
    path = Path(path)
    if not is_main_process():
        # Other ranks write into a scratch folder that is thrown away.
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder should read like any other
    try:
        yield tmp
        if path.exists():
            # rename() cannot replace a non-empty folder: move the old one aside first, then drop it.
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finite_or_null(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its non-finite float values as null, so that it can be written as strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one metrics record; non-finite floats are written as null so the file stays strict JSON."""
    if not is_main_process():
        return
    clean = finite_or_null(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(clean, allow_nan=False) + "\n")


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Keep only the records of ``path`` up to ``last_step`` (atomically): a run resumed from the checkpoint
    of ``last_step`` logs the later steps again, and each must appear once."""
    path = Path(path)
    if not is_main_process() or not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut off by the interruption
        if isinstance(step, int) and step <= last_step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a line cut off by an interruption (the last one) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
