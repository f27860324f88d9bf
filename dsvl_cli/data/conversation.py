"""The one sample type: a conversation of user/assistant messages about an ordered list of images.

Every dataset source, the synthetic task, chat and eval produce or consume `Conversation`.
Prepared data is JSONL with one `Conversation.to_dict()` per line; image paths are relative
to the JSONL file's folder (or absolute).

Image placement: each `<image>` placeholder in a user message stands for the next image of
`images`, in order, counted across the whole conversation (placeholder k -> images[k]).

Typed text (chat and eval questions, model answers) is text, even where it spells `<image>`: it
enters a message through `escape_typed`, which writes each `<image>` as `LITERAL_PLACEHOLDER`, so
it is never counted as an image slot; the template turns it back into the characters `<image>`
and tokenises them as plain text. Image slots of typed rounds are added structurally, one
placeholder per attached image. In prepared data, `<image>` in a user message IS the placeholder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dsvl_cli.data.json_files import iter_jsonl
from dsvl_cli.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
# `<image>` typed as text: a private-use character after `<` keeps it from being a placeholder.
LITERAL_PLACEHOLDER = "<\ue000image>"
Role = Literal["user", "assistant"]
ROLES: tuple[str, ...] = ("user", "assistant")


def escape_typed(text: str) -> str:
    """Text a person or a model wrote, for a message: each `<image>` stays text, not a slot."""
    return text.replace(IMAGE_PLACEHOLDER, LITERAL_PLACEHOLDER)


def unescape_typed(text: str) -> str:
    """The characters as written: `LITERAL_PLACEHOLDER` back to `<image>` (for tokenising)."""
    return text.replace(LITERAL_PLACEHOLDER, IMAGE_PLACEHOLDER)


@dataclass(frozen=True)
class Message:
    """One turn. `content` may hold `<image>` placeholders (user turns only)."""

    role: Role
    content: str

    @property
    def num_images(self) -> int:
        return self.content.count(IMAGE_PLACEHOLDER)


@dataclass
class Conversation:
    """An ordered dialogue plus the images its placeholders refer to.

    Attributes:
        messages: alternating user/assistant turns, starting with user, ending with assistant
            (a trailing user turn is allowed only for generation prompts, see `validate`).
        images: image paths, one per placeholder, in placeholder order.
        id: stable identifier, unique within a prepared file.
        source: name of the source adapter that produced it.
        system: system prompt override; None means the template's default.
        meta: free-form extras (question type, reference answer, origin ids...).
    """

    messages: list[Message]
    images: list[str] = field(default_factory=list)
    id: str = ""
    source: str = ""
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def rounds(self) -> list[tuple[Message, Message | None]]:
        """(user, assistant) pairs; the last assistant is None for an open generation prompt."""
        msgs = self.messages
        return [
            (msgs[i], msgs[i + 1] if i + 1 < len(msgs) else None) for i in range(0, len(msgs), 2)
        ]

    def validate(self, allow_open: bool = False) -> None:
        """Raise DataError if roles do not alternate, texts are empty, or counts differ.

        Args:
            allow_open: accept a final user turn without an answer (generation prompts).
        """
        where = f"sample {self.id!r}" + (f" ({self.source})" if self.source else "")
        if not self.messages:
            raise DataError(f"{where}: no messages; every sample needs a user turn and an answer")
        for i, msg in enumerate(self.messages):
            expected = ROLES[i % 2]
            if msg.role != expected:
                raise DataError(
                    f"{where}: message {i} has role {msg.role!r}, expected {expected!r} "
                    "(turns must alternate user/assistant, starting with user)"
                )
            if not msg.content.strip() and msg.num_images == 0:
                raise DataError(f"{where}: message {i} ({msg.role}) is empty")
            if msg.role == "assistant" and msg.num_images:
                raise DataError(
                    f"{where}: message {i} is an assistant turn with {IMAGE_PLACEHOLDER}"
                )
        if self.messages[-1].role != "assistant" and not allow_open:
            raise DataError(f"{where}: the last message must be the assistant's answer")
        placeholders = sum(m.num_images for m in self.messages)
        if placeholders != len(self.images):
            raise DataError(
                f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
                f"{len(self.images)} image(s); each image needs one placeholder in a user turn"
            )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "source": self.source,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "images": list(self.images),
        }
        if self.system is not None:
            out["system"] = self.system
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, record: dict[str, Any], where: str = "record") -> Conversation:
        """Build from a JSON record; raise DataError naming `where` if a field is wrong."""
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        raw = record.get("messages")
        if not isinstance(raw, list):
            raise DataError(
                f"{where}: field 'messages' must be a list of {{role, content}} objects"
            )
        try:
            messages = [Message(role=m["role"], content=str(m["content"])) for m in raw]
        except (KeyError, TypeError) as err:
            raise DataError(f"{where}: each message needs 'role' and 'content' ({err})") from None
        images = record.get("images", [])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise DataError(f"{where}: field 'images' must be a list of path strings")
        return cls(
            messages=messages,
            images=list(images),
            id=str(record.get("id", "")),
            source=str(record.get("source", "")),
            system=record.get("system"),
            meta=dict(record.get("meta") or {}),
        )


def write_jsonl(path: str | Path, conversations: list[Conversation]) -> None:
    """Write conversations, one JSON object per line (sorted keys: byte-identical re-runs)."""
    with open(path, "w", encoding="utf-8") as fh:
        for conv in conversations:
            fh.write(json.dumps(conv.to_dict(), ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> Iterator[Conversation]:
    """Yield conversations from a prepared JSONL file; a bad line raises DataError naming it.

    Read with the shared reader (data/json_files.py): a byte-order mark is accepted.
    """
    for line in iter_jsonl(path):
        where = f"{path}:{line.lineno}"
        if line.error is not None:
            raise DataError(f"{where}: not valid JSON ({line.error})")
        yield Conversation.from_dict(line.value, where=where)
