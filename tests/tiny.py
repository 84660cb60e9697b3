"""Tiny, download-free stand-ins for the real model and tokenizer, built entirely in process.

Keep this a plain module of factory functions: test modules import what they need from it.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)

# ChatML, as used by SmolLM2 and Qwen: every turn is "<|im_start|>{role}\n{content}<|im_end|>\n" and the
# generation prompt opens an assistant turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with 259 tokens: the 256 bytes, then ``<|endoftext|>`` (eos and pad),
    ``<|im_start|>`` and ``<|im_end|>``.

    There are no merges, so every byte of text is one token and any text round-trips through encode and
    decode exactly. With ``chat_template`` the tokenizer carries a ChatML chat template; without it the
    tokenizer has none (and ``ila.data`` falls back to its plain template). It has no bos token.
    """
    # The byte-level alphabet maps each of the 256 bytes to one printable character; ids follow byte order.
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_char)
    vocab = {char: index for index, char in enumerate(byte_chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _byte_of_char(char: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to ``char`` (the inverse of that table)."""
    code = ord(char)
    if 33 <= code <= 126 or 161 <= code <= 172 or 174 <= code <= 255:
        return code
    # The other 68 bytes (controls, space, 127-160, 173) were moved to 256 + n in byte order.
    unprintable = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return unprintable[code - 256]
