"""Supervised samples as text segments: chat conversations and prompt/completion pairs (DESIGN §1).

A sample becomes ``segments``, consecutive pieces of its text, and ``trained``, per segment whether it is
completion. The packer tokenizes every segment on its own (``pack._TokenizeAndPack``), so a completion starts at a
token boundary, as it does when a model generates it after its prompt, and the loss mask is exact.

Chat: ``messages`` is rendered with the data tokenizer's chat template (transformers' renderer, the one
``apply_chat_template`` uses). The assistant turns are the completion:

- a template with ``{% generation %}`` marks them itself (transformers' assistant-token mask, as character spans);
- else each assistant turn i spans from the end of render(messages[:i], add_generation_prompt=True) to the end of
  render(messages[:i+1]) (its content and the template's end-of-turn text). Every such render must be a prefix of
  the whole conversation's: a template that rewrites earlier turns once later ones follow (one that drops past
  reasoning, say) cannot be split this way and is refused (``DataError``).

A malformed sample (not a list of {role, content} messages, an unknown role, no assistant turn, a template that
refuses it; a prompt or completion that is not a string) raises ``MalformedSample``: the reader marks it skipped
and it is counted, with its location and the reason, in the ingest report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from transformers.utils.chat_template_utils import render_jinja_template

from tailkd_ray.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class MalformedSample(ValueError):
    """A sample the reader skips (skip reason ``malformed``); the message says what is wrong with it."""


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template and the special-token strings it may use (``bos_token``, ``eos_token``, ...)."""

    template: str
    special_tokens: dict
    tokenizer: str  # the tokenizer's name, for errors

    @classmethod
    def of(cls, tokenizer) -> "ChatTemplate":
        template = tokenizer.chat_template
        if not isinstance(template, str) or not template:
            raise DataError(f"data.format = chat renders conversations with the data tokenizer's chat template, but "
                            f"tokenizer {tokenizer.name_or_path} has none: set data.tokenizer to a tokenizer with a "
                            f"chat_template (an instruct model's), or use data.format: prompt_completion")
        specials = {name: value for name, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
        return cls(template=template, special_tokens=specials, tokenizer=str(tokenizer.name_or_path))

    def render(self, messages: list, *, add_generation_prompt: bool = False,
               assistant_spans: bool = False) -> tuple[str, list]:
        """(text, character spans of the {% generation %} blocks when ``assistant_spans``)."""
        try:
            texts, spans = render_jinja_template(
                conversations=[messages], chat_template=self.template, add_generation_prompt=add_generation_prompt,
                return_assistant_tokens_mask=assistant_spans, **self.special_tokens)
        except Exception as error:  # the template's raise_exception(...) or a jinja error on this conversation
            raise MalformedSample(f"the chat template refuses it: {' '.join(str(error).split())[:200]}") from None
        return texts[0], spans[0] if assistant_spans else []


_CONTENT_MARK = "TAILKD_ASSISTANT_CONTENT"  # a reply no template alters (Llama 3's trims whitespace)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special tokens the chat template writes right after an assistant's content (Qwen2.5's ``<|im_end|>``,
    Llama 3's ``<|eot_id|>``): where a chat model's reply ends. Found by rendering a one-turn conversation, since
    neither the tokenizer's EOS nor a model's generation_config need name them; none when the template ends a
    turn with plain text."""
    template = ChatTemplate.of(tokenizer)
    text, _ = template.render([{"role": "user", "content": "?"}, {"role": "assistant", "content": _CONTENT_MARK}])
    after = text[text.index(_CONTENT_MARK) + len(_CONTENT_MARK):].lstrip()
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = []
    for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token not in special:
            break
        ids.append(token)
    return ids


def chat_segments(messages: Any, template: ChatTemplate) -> tuple[list[str], list[bool]]:
    """(segments, trained) of a conversation: its rendered text cut at the assistant turns."""
    check_messages(messages)
    if _GENERATION_TAG.search(template.template):
        text, spans = template.render(messages, assistant_spans=True)
    else:
        text, spans = template.render(messages)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt, _ = template.render(messages[:i], add_generation_prompt=True)
                turn, _ = template.render(messages[: i + 1])
                if not (turn.startswith(prompt) and text.startswith(turn)):
                    raise DataError(f"the chat template of tokenizer {template.tokenizer} does not render a "
                                    f"conversation prefix by prefix (a turn changes once later turns follow), so its "
                                    f"assistant turns cannot be found: add {{% generation %}} marks around the "
                                    f"assistant content in its chat_template, or use data.format: prompt_completion")
                spans.append((len(prompt), len(turn)))
    return _cut(text, spans)


def prompt_completion_segments(prompt: Any, completion: Any) -> tuple[list[str], list[bool]]:
    """(segments, trained) of a prompt/completion pair."""
    check_prompt_completion(prompt, completion)
    return _cut(prompt + completion, [(len(prompt), len(prompt) + len(completion))])


def check_prompt_completion(prompt: Any, completion: Any) -> None:
    """``MalformedSample`` unless both are strings and the completion is not empty."""
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise MalformedSample(f"'{name}' is {type(value).__name__}, expected a string")
    if not completion:
        raise MalformedSample("empty completion")


def check_messages(messages: Any) -> None:
    """``MalformedSample`` unless ``messages`` is a conversation of known roles with a prompt and an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise MalformedSample(f"'messages' is {_describe(messages)}, expected a non-empty list of {{role, content}}")
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise MalformedSample(f"message {number} is {_describe(message)}, expected {{role, content}} with "
                                  f"string content")
        if message.get("role") not in ROLES:
            raise MalformedSample(f"message {number} has role {message.get('role')!r}, expected one of "
                                  f"{', '.join(ROLES)}")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise MalformedSample("no assistant turn (nothing to train on)")
    if roles[0] == "assistant":
        raise MalformedSample("it starts with an assistant turn (no prompt before it)")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _cut(text: str, spans: list) -> tuple[list[str], list[bool]]:
    """``text`` as its non-empty pieces, alternately outside and inside the sorted ``spans``."""
    segments, trained, start = [], [], 0
    for begin, end in sorted(spans):
        for piece, inside in ((text[start:begin], False), (text[begin:end], True)):
            if piece:
                segments.append(piece)
                trained.append(inside)
        start = max(start, end)
    if text[start:]:
        segments.append(text[start:])
        trained.append(False)
    return segments, trained


def completion_columns(fmt: str) -> tuple[str, ...]:
    """The record fields a supervised format reads."""
    return ("messages",) if fmt == "chat" else ("prompt", "completion")


def sample_segments(record: dict, fmt: str, template: Optional[ChatTemplate]) -> tuple[list[str], list[bool]]:
    """(segments, trained) of one record (a dict holding ``completion_columns(fmt)``)."""
    missing = [name for name in completion_columns(fmt) if name not in record]
    if missing:
        raise MalformedSample(f"no field '{missing[0]}'; fields: {', '.join(record) or 'none'}")
    if fmt == "chat":
        return chat_segments(record["messages"], template)
    return prompt_completion_segments(record["prompt"], record["completion"])
