"""Record formats: turning one record into a conversation.

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
"""

from __future__ import annotations

from ila.errors import DataError

Message = dict[str, str]
Conversation = list[Message]

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion")

SKIP_HINT = "Fix or remove the record, or set data.skip_bad_records: true to skip and count bad records."
"""The end of the message of an error about one bad record."""

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
    return tidy(conv)


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
    return messages_of(turns, key, role_key=role_key, content_key=content_key)


def messages_of(turns: list, where: str, *, role_key: str, content_key: str) -> Conversation:
    """The messages of a list of turns, untidied; ``where`` names the list in errors.

    Either naming of the role and content keys (``from``/``value`` or ``role``/``content``) is accepted.
    """
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
            conv.extend(messages_of(value, name, role_key="role", content_key="content"))
        else:
            raise DataError(
                f"field {name!r} must be a string or a list of messages, got {type(value).__name__}"
            )
    return conv


def tidy(conv: Conversation) -> Conversation:
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
