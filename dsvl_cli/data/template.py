r"""The DSVL prompt format: renders a Conversation into token ids and labels.

Literal strings are the original DSVL's. Rounds with and without images::

  <s>{sys}### Image 1:\n<image>\n### Image 2:\n<image>\n\n### Question:\n{q}\n\n### Answer:\n{a}</s>
  <s>### Question:\n{q}\n\n### Answer:\n{a}</s>

Rules (the original's Prompter, generalised):

* System prompt: ``Conversation.system`` if not None, else `SYSTEM_PROMPT`; only in the first
  round. Trailing newlines are normalised to exactly two, as the default has; ``""`` means none.
* Image placement: ``Conversation`` allows ``<image>`` placeholders anywhere in a user message.
  A round's images are rendered as the original's block at the start of the round, in
  placeholder order (one ``### Image k:\n<image>\n`` line pair per image, then one extra
  ``\n``), and the placeholders are removed from the question: a run of placeholders and the
  whitespace around it becomes ``\n`` if that whitespace held a newline, else one space, and the
  question is stripped. So ``"<image>\nWhat is it?"`` asks ``"What is it?"``.
* Numbering: one mechanism, string level, tokenised in context (the original's mechanism B,
  §2.5): k counts images across the whole conversation (1, 2, ... continuing across rounds), with
  no cap. ``first_image_index`` offsets it, so a chat turn can continue a session's numbering.
* Ids: BOS and EOS are inserted by id (every round starts with BOS and ends with EOS), and each
  rendered ``<image>`` becomes ``tokens_per_image`` copies of the image token id. The text
  between them, and each answer, is tokenised as its own segment with
  ``add_special_tokens=False, split_special_tokens=True``: a placeholder can never merge with its
  neighbours, ``</s>`` typed in a message stays text, and the prompt ids of a round are the same
  at training and at generation. Image ids come only from placeholders (structure): ``<image>``
  typed in chat or an eval question reaches here escaped (``conversation.escape_typed``) and is
  tokenised as the plain characters ``<image>``. (A SentencePiece tokenizer adds its word-start
  marker to each segment, as the original's legacy handling did after an added token.)
* Labels: -100 everywhere except the answer tokens and the EOS that ends each answer.
* ``max_round_tokens`` (the original's 512): caps a round's text tokens (BOS, prompt text, answer,
  EOS; image runs do not count, as the original counted each image as one token) by cutting the
  answer's tail only; the EOS stays supervised. A prompt that alone fills the cap leaves only the
  EOS supervised, as in the original.
* ``max_seq_len`` (all tokens, image tokens included): ``"drop"`` skips the sample;
  ``"truncate_rounds"`` keeps the longest prefix of whole rounds that fits (so an image run is
  never cut) and skips the sample if not even the first round fits.

`encode_conversation` returns `Encoded` (plain ``list[int]``: cheap to pickle between DataLoader
workers; the collator builds the padded tensors once per batch) or `Skip`, a value with a
machine-readable reason for the drop report. Modality ids are not produced here: the model derives
them from the image token id. Callers reach these functions through `encoder.SampleEncoder`, which
holds the tokenizer, the image-token settings and the limits of one model.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Literal, get_args

from dsvl_cli.data.conversation import IMAGE_PLACEHOLDER, Conversation, unescape_typed
from dsvl_cli.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language.\n\n"
)
IMAGE_MARKER = "### Image {k}:"
QUESTION_HEADER = "### Question:"
ANSWER_HEADER = "### Answer:"
IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

SkipReason = Literal["empty", "invalid", "too_many_images", "too_long"]
Overlength = Literal["drop", "truncate_rounds"]
OVERLENGTH_MODES: tuple[str, ...] = get_args(Overlength)

# A run of placeholders with the whitespace around it (see the module docstring).
_PLACEHOLDER_RUN = re.compile(r"\s*(?:" + re.escape(IMAGE_PLACEHOLDER) + r"\s*)+")


@dataclass(frozen=True)
class ImageTokens:
    """How one rendered `<image>` becomes ids: `count` copies of `token_id` (N from the encoder)."""

    token_id: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"tokens_per_image must be >= 1, got {self.count}")


@dataclass(frozen=True)
class Encoded:
    """A tokenised training sample.

    Attributes:
        input_ids: token ids, image runs included.
        labels: same length; IGNORE_INDEX except answer tokens and each answer's EOS.
        num_images: images in the kept rounds; they are ``conv.images[:num_images]``.
        num_rounds: rounds kept.
        rounds_dropped: trailing rounds removed by ``overlength="truncate_rounds"``.
        answers_truncated: kept rounds whose answer was cut by ``max_round_tokens``.
    """

    input_ids: list[int]
    labels: list[int]
    num_images: int
    num_rounds: int
    rounds_dropped: int = 0
    answers_truncated: int = 0


@dataclass(frozen=True)
class Skip:
    """Why a sample was not encoded: `reason` is for counting, `detail` for humans."""

    reason: SkipReason
    detail: str = ""


@dataclass(frozen=True)
class _Round:
    """A rendered round: prompt text segments with one image between consecutive segments."""

    segments: tuple[str, ...]
    answer: str | None

    @property
    def num_images(self) -> int:
        return len(self.segments) - 1


@dataclass
class _RoundIds:
    """A round's ids: `prompt` starts with BOS and holds the image runs; EOS comes on assembly."""

    prompt: list[int]
    answer: list[int] | None
    num_images: int
    answer_cut: bool = False


def question_text(content: str) -> str:
    """The user message with its placeholders removed (see the module docstring).

    Typed `<image>` text (`escape_typed`) comes back as the characters `<image>`: plain text.
    """

    def _gap(match: re.Match[str]) -> str:
        return "\n" if "\n" in match.group(0) else " "

    return unescape_typed(_PLACEHOLDER_RUN.sub(_gap, content).strip())


def system_text(conv: Conversation) -> str:
    """The system prompt as rendered: the override or the default, ending in two newlines."""
    text = SYSTEM_PROMPT if conv.system is None else conv.system
    text = text.rstrip("\n")
    return text + "\n\n" if text else ""


def _render_round(content: str, answer: str | None, first_k: int, prefix: str) -> _Round:
    n = content.count(IMAGE_PLACEHOLDER)
    qa = f"{QUESTION_HEADER}\n{question_text(content)}\n\n{ANSWER_HEADER}\n"
    if n == 0:
        return _Round(segments=(prefix + qa,), answer=answer)
    markers = [IMAGE_MARKER.format(k=k) + "\n" for k in range(first_k, first_k + n)]
    segments = [prefix + markers[0], *("\n" + m for m in markers[1:]), "\n\n" + qa]
    return _Round(segments=tuple(segments), answer=answer)


def _layout(conv: Conversation, first_image_index: int, include_system: bool) -> list[_Round]:
    rounds = []
    k = first_image_index
    for i, (user, assistant) in enumerate(conv.rounds):
        prefix = system_text(conv) if include_system and i == 0 else ""
        answer = None if assistant is None else unescape_typed(assistant.content)
        rounds.append(_render_round(user.content, answer, k, prefix))
        k += rounds[-1].num_images
    return rounds


def render_text(
    conv: Conversation,
    first_image_index: int = 1,
    include_system: bool = True,
    bos: str = "<s>",
    eos: str = "</s>",
) -> str:
    """The exact rendered text, one `<image>` per image (for `prepare-data --show`, debugging).

    `bos`/`eos` are display strings only: ids are inserted by id. An open conversation (last
    message the user's) ends with the answer header and no EOS.
    """
    parts = []
    for rnd in _layout(conv, first_image_index, include_system):
        parts.append(bos + IMAGE_TOKEN.join(rnd.segments))
        if rnd.answer is not None:
            parts.append(rnd.answer + eos)
    return "".join(parts)


def tokenize_segments(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Ids of each text as its own segment, in one batched call (specials split, not matched)."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
    return [list(ids) for ids in encoded["input_ids"]]


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        check_tokenizer(tokenizer)  # raises the ConfigError with the fix
    return int(bos), int(eos)


def _encode_rounds(
    rounds: list[_Round], tokenizer: PreTrainedTokenizerBase, image: ImageTokens
) -> list[_RoundIds]:
    """Tokenise every segment and answer of every round in one call, then splice in the ids."""
    bos, _ = _special_ids(tokenizer)
    texts = [s for r in rounds for s in r.segments]
    texts += [r.answer for r in rounds if r.answer is not None]
    pieces = iter(tokenize_segments(tokenizer, texts))
    image_run = [image.token_id] * image.count
    prompts = []
    for rnd in rounds:
        prompt = [bos]
        for j in range(len(rnd.segments)):
            prompt += (image_run if j else []) + next(pieces)
        prompts.append(prompt)
    # Answers were queued after all segments, in round order.
    return [
        _RoundIds(prompt, None if r.answer is None else next(pieces), r.num_images)
        for prompt, r in zip(prompts, rounds, strict=True)
    ]


def _cap_answers(round_ids: list[_RoundIds], max_round_tokens: int, image: ImageTokens) -> None:
    """Cut answer tails so each round's text tokens (EOS included) fit in `max_round_tokens`."""
    for r in round_ids:
        text_prompt = len(r.prompt) - r.num_images * image.count
        room = max(0, max_round_tokens - text_prompt - 1)
        if r.answer is not None and len(r.answer) > room:
            r.answer = r.answer[:room]
            r.answer_cut = True


def _fit_rounds(
    round_ids: list[_RoundIds], max_seq_len: int | None, overlength: Overlength
) -> list[_RoundIds] | Skip:
    """Apply the `max_seq_len` policy to whole rounds."""
    lengths = [len(r.prompt) + len(r.answer or []) + 1 for r in round_ids]
    total = sum(lengths)
    if max_seq_len is None or total <= max_seq_len:
        return round_ids
    detail = f"{total} tokens > max_seq_len {max_seq_len}"
    if overlength == "drop":
        return Skip("too_long", detail)
    kept = bisect_right(list(accumulate(lengths)), max_seq_len)
    if kept == 0:
        return Skip("too_long", f"first round alone: {lengths[0]} tokens > {max_seq_len}")
    return round_ids[:kept]


def _check_sample(conv: Conversation, max_images: int | None) -> Skip | None:
    if not conv.messages:
        return Skip("empty", f"sample {conv.id!r} has no messages")
    try:
        conv.validate()
    except DataError as err:
        return Skip("invalid", str(err))
    if max_images is not None and conv.num_images > max_images:
        return Skip("too_many_images", f"{conv.num_images} images > max_images {max_images}")
    return None


def encode_conversation(
    conv: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    image_token_id: int,
    tokens_per_image: int,
    max_seq_len: int | None,
    overlength: Overlength = "drop",
    max_images: int | None = None,
    max_round_tokens: int | None = None,
) -> Encoded | Skip:
    """Render and tokenise a complete conversation into ids and labels (see module docstring).

    Returns `Skip` with reason "empty" (no messages), "invalid" (fails `Conversation.validate`),
    "too_many_images" (over `max_images`, counted on the whole conversation) or "too_long".
    """
    if overlength not in OVERLENGTH_MODES:
        raise ValueError(f"overlength must be one of {OVERLENGTH_MODES}, got {overlength!r}")
    skip = _check_sample(conv, max_images)
    if skip is not None:
        return skip
    image = ImageTokens(image_token_id, tokens_per_image)
    round_ids = _encode_rounds(_layout(conv, 1, True), tokenizer, image)
    if max_round_tokens is not None:
        _cap_answers(round_ids, max_round_tokens, image)
    kept = _fit_rounds(round_ids, max_seq_len, overlength)
    if isinstance(kept, Skip):
        return kept
    _, eos = _special_ids(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for r in kept:
        answer = (r.answer or []) + [eos]
        input_ids += r.prompt + answer
        labels += [IGNORE_INDEX] * len(r.prompt) + answer
    return Encoded(
        input_ids=input_ids,
        labels=labels,
        num_images=sum(r.num_images for r in kept),
        num_rounds=len(kept),
        rounds_dropped=len(round_ids) - len(kept),
        answers_truncated=sum(r.answer_cut for r in kept),
    )


def encode_prompt(
    conv: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    image_token_id: int,
    tokens_per_image: int,
    first_image_index: int = 1,
    include_system: bool = True,
) -> list[int]:
    """Ids for generation: earlier rounds in full, then the open round up to `### Answer:\\n`.

    `conv` must end with the user's message; no EOS follows the answer header. For a chat turn
    whose history already sits in a KV cache, pass a conversation holding only the new user
    message, ``include_system=False`` and ``first_image_index`` = images so far + 1: the result
    starts with BOS and numbers the new images after the earlier ones.
    """
    if first_image_index < 1:
        raise ValueError(f"first_image_index must be >= 1, got {first_image_index}")
    conv.validate(allow_open=True)
    if conv.messages[-1].role != "user":
        raise DataError(
            f"sample {conv.id!r}: a generation prompt must end with the user's message; "
            "use encode_conversation for complete conversations"
        )
    _, eos = _special_ids(tokenizer)
    image = ImageTokens(image_token_id, tokens_per_image)
    ids: list[int] = []
    for r in _encode_rounds(_layout(conv, first_image_index, include_system), tokenizer, image):
        ids += r.prompt if r.answer is None else r.prompt + r.answer + [eos]
    return ids


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> int:
    """Raise ConfigError unless BOS, EOS and `<image>` (one added token) exist; return its id."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    for kind, default in (("bos", "<s>"), ("eos", "</s>")):
        if getattr(tokenizer, f"{kind}_token_id", None) is None:
            raise ConfigError(
                f"tokenizer {name!r} has no {kind.upper()} token, and the DSVL template starts "
                f"each round with BOS and ends it with EOS; set `{kind}_token` in its "
                f"tokenizer_config.json (e.g. {default!r}) or use a tokenizer that has one"
            )
    image_id = tokenizer.get_added_vocab().get(IMAGE_TOKEN)
    single = image_id is not None and tokenizer.encode(
        IMAGE_TOKEN, add_special_tokens=False, split_special_tokens=False
    ) == [image_id]
    if not single:
        raise ConfigError(
            f"tokenizer {name!r}: {IMAGE_TOKEN!r} is not a single added token; add it with "
            f"tokenizer.add_special_tokens({{'extra_special_tokens': [{IMAGE_TOKEN!r}]}}) and "
            "resize the LM's embeddings (the model builder does both)"
        )
    if image_id in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        raise ConfigError(
            f"tokenizer {name!r}: {IMAGE_TOKEN!r} shares id {image_id} with BOS, EOS or pad; "
            "it needs its own id"
        )
    return int(image_id)
