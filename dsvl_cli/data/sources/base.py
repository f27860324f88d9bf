"""What every source adapter shares: the context it runs in, the `Source` base, text helpers.

A source turns one raw dataset, in its published on-disk layout, into validated `Conversation`s.
`prepare-data` calls `check` (missing files, with download hints), then iterates `load` once and
writes the result; nothing is cached inside the user's data folder.

Conventions every adapter follows:
* Randomness comes only from `ctx.rng`. Choices the original redrew on every `__getitem__`
  (prompt, caption, round order, blend draws, Sparkles tag style) are drawn once here, at
  prepare time, so a prepared file is reproducible from (raw data, seed).
* A round that introduces images starts its user text with one `<image>\\n` per image, then the
  question; the template renders them as that round's `### Image k:` block.
* Placeholders in raw text are checked, never repaired: text that names its images has exactly
  one `<image>` per image, or it names none and the adapter places them by its layout rule
  (`placeholders_fit`). Any other count is dropped as "placeholder_mismatch"; deleting or adding
  placeholders to make the numbers agree would keep a question about an image that is not there.
* Random picks among raw alternatives (captions, QA pairs, dialogues, prompts) go through
  `choose`, which draws among usable candidates only: a blank caption is never drawn while a
  good one exists.
* Anything skipped is counted in `ctx.drops` under a machine-readable reason, never lost silently.
  Counts are per raw record unless an adapter's docstring says otherwise.
* Images are absolute paths of raw files, or paths relative to `ctx.image_out.parent` for images
  an adapter decoded itself. Adapters do not open images (prepare.py checks them all in one pass)
  unless the original's filtering depends on it; each adapter's docstring says which.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from dsvl_cli.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message
from dsvl_cli.errors import DataError
from dsvl_cli.log import get_logger

logger = get_logger(__name__)

MAX_DROP_EXAMPLES = 5
PLACEHOLDER_MISMATCH = "placeholder_mismatch"
T = TypeVar("T")


@dataclass(frozen=True)
class RequiredFile:
    """A file or folder a source needs under `data_path`, with where to download it."""

    path: str
    kind: Literal["file", "dir"]
    hint: str

    def missing(self, data_path: Path) -> str | None:
        """Return a one-line message if the path is absent, else None."""
        full = data_path / self.path
        present = full.is_dir() if self.kind == "dir" else full.is_file()
        if present:
            return None
        hint = self.hint.replace("{data_path}", str(data_path))
        return f"{full} ({'folder' if self.kind == 'dir' else 'file'}) not found: {hint}"


@dataclass
class SourceContext:
    """Everything an adapter may read, write or draw from while loading.

    Attributes:
        data_path: the user's raw-data root (or, for file-based sources, the file itself).
        image_out: folder where adapters may write decoded images (the prepared JSONL sits in
            its parent; written images are referenced relative to that parent).
        rng: the only source of randomness, seeded by the caller.
        max_images: most images one conversation may carry (model.max_images_per_sample).
        files: explicit input files for file-based sources (llava_json, messages).
        image_root: folder that relative image paths of file-based sources are resolved against;
            None means the input file's folder.
        drops: reason -> number of skipped records.
        drop_examples: reason -> a few ids/paths of skipped records.
    """

    data_path: Path
    image_out: Path
    rng: random.Random
    max_images: int = 8
    files: list[Path] = field(default_factory=list)
    image_root: Path | None = None
    drops: Counter[str] = field(default_factory=Counter)
    drop_examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, example: str) -> None:
        """Count one skipped record under `reason`, keeping a few examples for the report."""
        self.drops[reason] += 1
        examples = self.drop_examples.setdefault(reason, [])
        if len(examples) < MAX_DROP_EXAMPLES:
            examples.append(example)

    def written_image(self, path: Path) -> str:
        """Reference an image this adapter wrote under `image_out`, relative to the JSONL folder."""
        return path.relative_to(self.image_out.parent).as_posix()


class Source(ABC):
    """One dataset adapter. Subclasses set `name`, `required` and implement `records`."""

    name: str = ""
    required: tuple[RequiredFile, ...] = ()

    def check(self, ctx: SourceContext) -> list[str]:
        """Return one message per missing input (path + download hint); empty when ready."""
        data_path = Path(ctx.data_path)
        return [msg for req in self.required if (msg := req.missing(data_path)) is not None]

    def load(self, ctx: SourceContext) -> Iterator[Conversation]:
        """Yield validated conversations with unique ids; raise DataError if inputs are missing."""
        # Prepared files store absolute raw-image paths, whatever the caller's working folder.
        ctx.data_path = Path(ctx.data_path).absolute()
        if ctx.image_root is not None:
            ctx.image_root = Path(ctx.image_root).absolute()
        ctx.files = [Path(f).absolute() for f in ctx.files]
        problems = self.check(ctx)
        if problems:
            raise DataError(f"{self.name}: missing inputs:\n  " + "\n  ".join(problems))
        seen: Counter[str] = Counter()
        for conv in self.records(ctx):
            conv.source = self.name
            seen[conv.id] += 1
            if seen[conv.id] > 1:  # LLaVA files repeat ids across files and records
                conv.id = f"{conv.id}#{seen[conv.id]}"
            if accept(ctx, conv):
                yield conv

    @abstractmethod
    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        """Yield conversations (ids set, source filled in by `load`); count drops in ctx."""


def accept(ctx: SourceContext, conv: Conversation) -> bool:
    """Apply the checks shared by every source; count and reject a failing conversation."""
    if conv.num_images > ctx.max_images:
        ctx.drop("too_many_images", conv.id)
        return False
    for msg in conv.messages:
        if not isinstance(msg.content, str):
            ctx.drop("malformed_record", conv.id)
            return False
    answer_holders = any(m.role == "assistant" and m.num_images for m in conv.messages)
    if answer_holders or sum(m.num_images for m in conv.messages) != conv.num_images:
        ctx.drop(PLACEHOLDER_MISMATCH, conv.id)
        return False
    for msg in conv.messages:
        if msg.role == "assistant" and not msg.content.strip():
            ctx.drop("empty_answer", conv.id)
            return False
        if msg.role == "user" and not msg.content.strip():  # an image-only turn is allowed
            ctx.drop("empty_question", conv.id)
            return False
    try:
        conv.validate()
    except DataError as err:
        logger.debug("dropping %s: %s", conv.id, err)
        ctx.drop("invalid_conversation", conv.id)
        return False
    return True


def placeholders_fit(texts: Iterable[str], num_images: int) -> bool:
    """Whether raw user texts about `num_images` images can be used without rewriting them.

    True when the texts hold exactly one `<image>` per image, or none at all (the adapter then
    places the images by its layout rule). Any other count means the text speaks of an image it
    does not have, or ignores one it has: the caller drops the record as PLACEHOLDER_MISMATCH.
    """
    found = sum(text.count(IMAGE_PLACEHOLDER) for text in texts)
    return found in (0, num_images)


def usable_text(value: Any) -> bool:
    """True for a string with some text besides `<image>` placeholders and whitespace."""
    return isinstance(value, str) and bool(strip_placeholders(value))


def choose(
    rng: random.Random, candidates: Sequence[T], usable: Callable[[T], bool] = usable_text
) -> T | None:
    """One candidate drawn uniformly among the usable ones; None if none is usable.

    Every random pick among raw alternatives goes through here, so an unusable candidate (a blank
    caption, say) is never drawn while a usable one exists. When all are usable the draw is
    `rng.choice(candidates)`, the same as before this filter existed, so seeds keep their picks.
    """
    pool = [c for c in candidates if usable(c)]
    return rng.choice(pool) if pool else None


def user_text(question: str, num_images: int = 0) -> str:
    """A user turn: one `<image>` line per image introduced this round, then the question."""
    return f"{IMAGE_PLACEHOLDER}\n" * num_images + question


def strip_placeholders(text: str) -> str:
    """Remove `<image>` placeholders and surrounding whitespace (text is otherwise kept)."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def clean_dsvl_question(text: str) -> str:
    """The original's question cleaning: drop `<image>` and every newline (kept for parity)."""
    return text.replace(IMAGE_PLACEHOLDER, "").replace("\n", "")


def conversation(
    conv_id: str,
    rounds: Sequence[tuple[str, str]],
    images: Sequence[str | Path] = (),
    system: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Conversation:
    """Build a Conversation from (user text, assistant text) rounds."""
    messages: list[Message] = []
    for question, answer in rounds:
        messages.append(Message(role="user", content=question))
        messages.append(Message(role="assistant", content=answer))
    return Conversation(
        messages=messages,
        images=[str(p) for p in images],
        id=conv_id,
        system=system,
        meta=dict(meta or {}),
    )


def expect_type(value: Any, kind: type, path: Path, what: str) -> Any:
    """Return `value` if it has type `kind`, else raise DataError describing the expected layout."""
    if not isinstance(value, kind):
        raise DataError(
            f"{path}: expected {what} (a JSON {kind.__name__}), got {type(value).__name__}; "
            "is this the right file?"
        )
    return value
