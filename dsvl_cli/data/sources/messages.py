"""messages: OpenAI-style chat records, one per JSONL line (a JSON list works too).

    {"id": "...", "messages": [
        {"role": "system", "content": "..."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                     {"type": "image", "image": "a.jpg"},
                                     {"type": "image_url", "image_url": {"url": "b.jpg"}}]},
        {"role": "assistant", "content": "..."}],
     "images": ["c.jpg"]}

Content is a string or a list of typed parts (`text`, `image`, `image_url`; an image value is a
path string or `{"url"|"path": ...}`). The ms-swift / LLaMA-Factory style also works: `<image>` in
a text takes the next entry of the record's top-level `images`; texts with no `<image>` at all
put every top-level image in the first user turn (as llava_json does), and any other count is
"placeholder_mismatch" (`placeholders_fit`, the check every source shares). Text parts of one
message are joined with newlines; image placeholders move to the start of their user turn,
because the DSVL template shows a round's images before its question. A leading system message
becomes `Conversation.system`. Paths are resolved against `ctx.image_root` (default: the file's
folder); `file:` URIs are percent-decoded and `data:` URIs decoded into `ctx.image_out/messages/`;
remote URLs are dropped ("remote_image"): dsvl prepares data offline-first and never downloads.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsvl_cli.data.conversation import IMAGE_PLACEHOLDER, Conversation
from dsvl_cli.data.sources.base import (
    PLACEHOLDER_MISMATCH,
    Source,
    SourceContext,
    conversation,
    placeholders_fit,
    strip_placeholders,
    user_text,
)
from dsvl_cli.data.sources.files import (
    check_files,
    image_root,
    input_files,
    iter_records,
    resolve_image,
)


class RecordError(Exception):
    """A record cannot be used; `reason` is the drop reason counted in the context."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MessagesSource(Source):
    """OpenAI-style `messages` records with typed text/image parts."""

    name = "messages"
    required = ()

    def check(self, ctx: SourceContext) -> list[str]:
        return check_files(ctx, self.name, "chat.jsonl")

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        for path in input_files(ctx):
            root = image_root(ctx, path)
            for index, (where, record) in enumerate(iter_records(path, ctx)):
                try:
                    yield self._record(ctx, record, root, path, index)
                except RecordError as err:
                    ctx.drop(err.reason, where)

    def _record(
        self, ctx: SourceContext, record: Any, root: Path, path: Path, index: int
    ) -> Conversation:
        """One record -> Conversation; raises RecordError with the drop reason."""
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise RecordError("malformed_record")
        messages = list(record["messages"])
        spare = record.get("images", [])
        if not isinstance(spare, list) or not all(isinstance(s, str) for s in spare):
            raise RecordError("malformed_record")
        texts = _texts(messages)
        if not placeholders_fit(texts, len(spare)):
            raise RecordError(PLACEHOLDER_MISMATCH)
        named = any(IMAGE_PLACEHOLDER in text for text in texts)
        spare_refs = iter(spare if named else [])
        system = None
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            system_text, system_refs = _content(messages.pop(0), spare_refs)
            if system_refs:
                raise RecordError("malformed_record")
            system = system_text
        rounds, refs = _rounds(messages, spare_refs, [] if named else spare)
        images = []
        for ref in refs:
            resolved, reason = resolve_image(ref, root, ctx, self.name)
            if resolved is None:
                raise RecordError(reason)
            images.append(resolved)
        conv_id = f"{self.name}:{record.get('id', f'{path.stem}:{index}')}"
        return conversation(conv_id, rounds, images, system=system)


def _rounds(
    messages: list[Any], spare_refs: Iterator[str], first_turn: list[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """(user text, answer) rounds and the image references in placeholder order.

    `first_turn`: images that go at the start of the first user turn (unnamed top-level images).
    """
    if not messages or len(messages) % 2:
        raise RecordError("odd_turns")
    rounds, refs = [], []
    for user, assistant in zip(messages[0::2], messages[1::2], strict=True):
        if not (isinstance(user, dict) and isinstance(assistant, dict)):
            raise RecordError("malformed_record")
        if user.get("role") != "user" or assistant.get("role") != "assistant":
            raise RecordError("bad_roles")
        question, user_refs = _content(user, spare_refs)
        user_refs = ([] if rounds else first_turn) + user_refs
        answer, answer_refs = _content(assistant, spare_refs)
        if answer_refs:
            raise RecordError("assistant_image")
        rounds.append((user_text(question, len(user_refs)), answer))
        refs.extend(user_refs)
    return rounds, refs


def _content(message: dict[str, Any], spare_refs: Iterator[str]) -> tuple[str, list[str]]:
    """A message's text (placeholders removed) and its image references, in order."""
    content = message.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise RecordError("malformed_record")
    texts, refs = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            for _ in range(part["text"].count(IMAGE_PLACEHOLDER)):
                ref = next(spare_refs, None)
                if ref is None:  # unreachable after placeholders_fit; kept as a guard
                    raise RecordError(PLACEHOLDER_MISMATCH)
                refs.append(ref)
            texts.append(strip_placeholders(part["text"]))
        elif kind in ("image", "image_url"):
            refs.append(_image_ref(part, kind))
        else:
            raise RecordError("unsupported_content")
    return "\n".join(t for t in texts if t), refs


def _texts(messages: list[Any]) -> list[str]:
    """Every text of a record's messages (string contents and `text` parts), for counting."""
    texts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts if isinstance(parts, list) else []:
            is_text = isinstance(part, dict) and part.get("type") == "text"
            if is_text and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return texts


def _image_ref(part: dict[str, Any], kind: str) -> str:
    """The path/URL of an image part: a string, or an object with `url` or `path`."""
    value = part.get(kind)
    if isinstance(value, dict):
        value = value.get("url", value.get("path"))
    if not isinstance(value, str) or not value:
        raise RecordError("malformed_record")
    return value
