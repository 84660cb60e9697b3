"""Templates and tokenization: rendering conversations and the loss mask.

Only assistant turns are trained on: every other token (system and user turns, role headers and other
template scaffolding) gets the label -100 (:data:`IGNORE_INDEX`). ``template`` is:

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

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ila.errors import DataError

from .formats import Conversation

if TYPE_CHECKING:  # transformers is slow to import and only typed against here
    from transformers import PreTrainedTokenizerBase

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

PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n### Assistant:\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
)
"""The plain template (:data:`PLAIN_TEMPLATE`) as a Jinja chat template, for the tools that render prompts
through ``tokenizer.apply_chat_template`` (lm-eval's ``apply_chat_template``): a model trained in the plain
template is asked its questions in the form it was taught. The generation prompt adds nothing, since a
user turn already ends with the assistant header."""

IGNORE_INDEX = -100
"""Label of tokens that do not count in the loss (the value that PyTorch's cross entropy ignores)."""


class TemplateRefused(DataError):
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
        raise TemplateRefused(
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

    ``labels`` is :data:`IGNORE_INDEX` on every token outside the assistant replies (see the module
    docstring). Returns None when truncation to ``max_length`` leaves no labelled token.
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
