"""The tokenized data of a run, as an artefact of the run directory (``run_dir/data/<key>/``).

Every stage of a run, ``ila evaluate`` and ``compare-strategies`` need the same training and held-out
examples, tokenized the same way. They are built once (:func:`ila.data.build_datasets`) and saved with
``datasets``' ``save_to_disk``; the folder's name is a key over everything the examples depend on: the data
settings (:meth:`ila.config.DataConfig.tokenization`, so not how they are batched) and the tokenizer itself
(its vocabulary, merges, special tokens and chat template, not its name, so that a changed local folder is a
different key). A later reader with the same key loads the examples instead of reading and tokenizing the
dataset again; any other data config or tokenizer gets its own folder. The folder is written whole or not
at all (:func:`ila.artifacts.atomic_dir`), so an interrupted write is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import atomic_dir, is_main_process, read_json, write_json_atomic
from .data import build_datasets

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from .config import DataConfig

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
"""Bumped whenever the way examples are tokenized changes, so that older folders are not reused."""


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what the tokenizer turns text into: its whole vocabulary and rules (the fast tokenizer's
    JSON, or the vocabulary of a slow one), its special and added tokens and its chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "added": {str(k): str(v) for k, v in tokenizer.get_added_vocab().items()},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos": getattr(tokenizer, "add_bos_token", None),
        "eos": getattr(tokenizer, "add_eos_token", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def data_key(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """The key of the examples ``cfg`` and ``tokenizer`` make (the folder name under ``run_dir/data``)."""
    blob = json.dumps(
        {"layout": LAYOUT_VERSION, "data": cfg.tokenization(), "tokenizer": tokenizer_fingerprint(tokenizer)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def tokenized_datasets(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, cache: Path | None
) -> tuple[datasets.Dataset, datasets.Dataset, dict[str, Any], bool]:
    """(train, held-out, their :class:`~ila.data.DataStats` as a dict, whether they came from ``cache``).

    With ``cache`` (a run's ``data`` folder) the examples are read from ``cache/<key>`` when it is there and
    written there when it is not; without, they are built every time."""
    if cache is None:
        train, heldout, stats = build_datasets(cfg, tokenizer)
        return train, heldout, stats.to_dict(), False
    import datasets

    key = data_key(cfg, tokenizer)
    folder = cache / key
    if (folder / "data.json").is_file():
        record = read_json(folder / "data.json", "tokenized data")
        if record.get("key") == key:
            log.info("data: the tokenized examples of %s from %s", cfg.name, folder)
            train = datasets.load_from_disk(str(folder / "train"))
            # datasets cannot read back an empty saved split: none is saved, and it is the empty selection
            held = folder / "heldout"
            heldout = datasets.load_from_disk(str(held)) if held.is_dir() else train.select([])
            return train, heldout, record["stats"], True
    train, heldout, stats = build_datasets(cfg, tokenizer)
    if is_main_process():  # the other processes built the same examples and use their own
        with atomic_dir(folder) as tmp:
            train.save_to_disk(str(tmp / "train"))
            if len(heldout) > 0:
                heldout.save_to_disk(str(tmp / "heldout"))
            write_json_atomic(
                tmp / "data.json",
                {"key": key, "layout": LAYOUT_VERSION, "data": cfg.tokenization(), "stats": stats.to_dict()},
            )
    return train, heldout, stats.to_dict(), False
