"""`SampleEncoder`: the one way a conversation or a chat turn becomes model input.

It holds everything that decides the model's input for a sample: the tokenizer, the image-token
settings (`image_token_id`, `tokens_per_image`), the template limits (`max_seq_len`,
`overlength`, `max_images`, `max_round_tokens`) and the image transform with the size it
produces. Training (`ConversationDataset`), chat and eval (`ChatSession`), scoring and
`prepare-data --show` all call it, so the same conversation gives the same ids, labels and pixels
on every path. Build it once per model with `SampleEncoder.from_built(built, config)`.

Ids come from the DSVL template (`template.py`); images are found by the shared resolver
(`image_refs.resolve_image_ref`) and decoded by the one loader (`images.load_image`). Typed text
(a chat or eval question, a model answer) enters a message through `escape_typed`, so `<image>`
typed in a question stays text: image slots come only from attached images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace as replace_fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from dsvl_cli.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message, escape_typed
from dsvl_cli.data.image_refs import ImageRefError, image_failure, resolve_image_ref
from dsvl_cli.data.images import ImageLoadError, load_image
from dsvl_cli.data.pixel_cache import PixelCache
from dsvl_cli.data.template import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    Encoded,
    Overlength,
    Skip,
    encode_conversation,
    encode_prompt,
    tokenize_segments,
)
from dsvl_cli.data.token_cache import TokenCache
from dsvl_cli.log import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dsvl_cli.config import Config
    from dsvl_cli.model.builder import Built
    from dsvl_cli.model.vision import ImageTransform

log = get_logger(__name__)

SHOWN_IMAGE_TOKENS = 1  # `--show` has no vision encoder: each image run is one `<image>`
Tokens = tuple[Tensor, Tensor, int]  # input ids [L], labels [L], images kept


@dataclass
class Sample:
    """One encoded training sample.

    Attributes:
        input_ids: [L] token ids (long), image runs included.
        labels: [L] targets (long), -100 where not supervised.
        pixel_values: [num_images, 3, H, W] float, in placeholder order ([0, 3, H, W] if none).
        num_images: images kept (after `truncate_rounds`, the kept rounds' images only).
        id: the conversation id.
    """

    input_ids: Tensor
    labels: Tensor
    pixel_values: Tensor
    num_images: int
    id: str


@dataclass(frozen=True)
class SkippedSample:
    """A sample that could not be used: `reason` for counting, `detail` for humans."""

    id: str
    reason: str
    detail: str = ""


def user_content(question: str, num_images: int) -> str:
    """The user message of a chat turn: one placeholder line per image, then the question.

    The question is typed text: `<image>` in it stays text (`escape_typed`); image slots come
    only from the images attached to the turn.
    """
    return "\n".join([IMAGE_PLACEHOLDER] * num_images + [escape_typed(question.strip())])


@dataclass(frozen=True)
class SampleEncoder:
    """Conversation or chat turn -> ids, labels, pixels (see the module docstring).

    Attributes:
        tokenizer: the LM's tokenizer, with `<image>` added.
        image_token_id: id of `<image>`.
        tokens_per_image: image tokens per image (the encoder/projector's count).
        image_transform: picklable callable, PIL RGB image -> float tensor [3, H, W]; None for
            an encoder that only renders text (`--show` without a model).
        image_size: (H, W) the transform produces (an int means square).
        max_seq_len, overlength, max_images, max_round_tokens: the template's limits.
        system_prompt: the system prompt of conversations without their own
            (`data.system_prompt`); None means the template's default (DSVL's).
        pixel_cache: keeps transformed images in memory (`data.pixel_cache_mb`, training).
        token_cache: keeps tokenised conversations in memory (`data.token_cache_mb`, training).
    """

    tokenizer: PreTrainedTokenizerBase
    image_token_id: int
    tokens_per_image: int
    image_transform: ImageTransform | None = None
    image_size: int | tuple[int, int] = 0
    max_seq_len: int | None = None
    overlength: Overlength = "drop"
    max_images: int | None = None
    max_round_tokens: int | None = None
    system_prompt: str | None = None
    pixel_cache: PixelCache | None = None
    token_cache: TokenCache | None = None

    @classmethod
    def from_built(cls, built: Built, config: Config | None = None) -> SampleEncoder:
        """The encoder of a built model; the template limits from `config` (none without)."""
        model = built.model
        limits = {}
        if config is not None:
            limits = {
                "max_seq_len": config.model.max_seq_len,
                "overlength": config.data.overlength,
                "max_images": config.model.max_images_per_sample,
                "max_round_tokens": config.data.max_round_tokens,
                "system_prompt": config.data.system_prompt,
            }
        return cls(
            built.tokenizer,
            model.image_token_id,
            model.tokens_per_image,
            built.image_transform,
            model.vision.image_size,
            **limits,
        )

    @classmethod
    def for_text(cls, tokenizer: PreTrainedTokenizerBase) -> SampleEncoder:
        """An encoder without images or limits, one `<image>` per image (`--show`)."""
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        return cls(tokenizer, image_id, SHOWN_IMAGE_TOKENS)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of one transformed image."""
        size = self.image_size
        return (3, *((size, size) if isinstance(size, int) else tuple(size)))  # type: ignore[return-value]

    # ------------------------------------------------------------------ ids

    def with_system(self, conv: Conversation) -> Conversation:
        """`conv` with this encoder's system prompt when it has none of its own."""
        if conv.system is not None or self.system_prompt is None:
            return conv
        return replace_fields(conv, system=self.system_prompt)

    def encode(self, conv: Conversation) -> Encoded | Skip:
        """Ids and labels of a complete conversation under the limits (`encode_conversation`)."""
        return encode_conversation(
            self.with_system(conv),
            self.tokenizer,
            self.image_token_id,
            self.tokens_per_image,
            self.max_seq_len,
            overlength=self.overlength,
            max_images=self.max_images,
            max_round_tokens=self.max_round_tokens,
        )

    def prompt(
        self, conv: Conversation, first_image_index: int = 1, include_system: bool = True
    ) -> list[int]:
        """Generation ids of an open conversation (`encode_prompt`); DataError if not open."""
        return encode_prompt(
            self.with_system(conv),
            self.tokenizer,
            self.image_token_id,
            self.tokens_per_image,
            first_image_index=first_image_index,
            include_system=include_system,
        )

    def last_question(self, conv: Conversation) -> list[int]:
        """Ids of every round of a complete conversation but its last answer (scoring)."""
        return self.prompt(replace_messages(conv, conv.messages[:-1]))

    def turn(
        self,
        question: str,
        num_images: int,
        first_image_index: int = 1,
        system: str | None = None,
        include_system: bool = True,
    ) -> list[int]:
        """Prompt ids of a chat turn: `question` (typed text) about `num_images` new images."""
        conv = Conversation(
            [Message("user", user_content(question, num_images))],
            images=[""] * num_images,  # paths do not enter the ids
            system=system,
        )
        return self.prompt(conv, first_image_index, include_system)

    def answer_ids(self, text: str) -> list[int]:
        """Ids of an answer as the template tokenises it (its own segment, no specials)."""
        return tokenize_segments(self.tokenizer, [text])[0] if text else []

    # ------------------------------------------------------------------ pixels

    def pixels(self, refs: Sequence[str | Path], root: str | Path = ".") -> Tensor:
        """Find, load and transform images in order: [n, 3, H, W] float on the CPU.

        Relative references start at `root`. Raises ImageRefError (a reference that names no
        local file) or ImageLoadError (a file that does not decode), both DataErrors.
        """
        if self.image_transform is None:
            raise ValueError("this SampleEncoder has no image transform (text only)")
        tensors = []
        for ref in refs:
            if self.pixel_cache is None:
                tensors.append(self._pixels_of(ref, root))
            else:
                key = (str(root), str(ref))
                tensors.append(self.pixel_cache.get(key, partial(self._pixels_of, ref, root)))
        return torch.stack(tensors) if tensors else torch.zeros(0, *self.image_shape)

    def _pixels_of(self, ref: str | Path, root: str | Path) -> Tensor:
        """One image found, loaded and transformed: [3, H, W]."""
        assert self.image_transform is not None  # checked by `pixels`
        tensor = self.image_transform(load_image(resolve_image_ref(str(ref), root)))
        if tuple(tensor.shape) != self.image_shape:
            # A wiring error (transform vs image_size), not bad data: fail loudly.
            raise ValueError(
                f"image_transform gave shape {tuple(tensor.shape)}, expected "
                f"{self.image_shape} (the SampleEncoder's image_size)"
            )
        return tensor

    # ------------------------------------------------------------------ whole samples

    def sample(self, conv: Conversation, root: str | Path = ".") -> Sample | SkippedSample:
        """A training sample, or why not: never raises on bad data (see `ConversationDataset`).

        Only the images of the rounds the template kept are loaded.
        """
        tokens = self.tokens(conv)
        if isinstance(tokens, Skip):
            return SkippedSample(conv.id, tokens.reason, tokens.detail)
        input_ids, labels, num_images = tokens
        try:
            pixels = self.pixels(conv.images[:num_images], root)
        except (ImageLoadError, ImageRefError) as err:
            log.debug("sample %r skipped: %s", conv.id, err)
            return SkippedSample(conv.id, image_failure(err), str(err))
        return Sample(
            input_ids=input_ids,
            labels=labels,
            pixel_values=pixels,
            num_images=num_images,
            id=conv.id,
        )

    def tokens(self, conv: Conversation) -> Tokens | Skip:
        """(input ids [L], labels [L], images kept) of `conv`, or its Skip; from the token cache
        when this encoder has one (`data.token_cache_mb`)."""
        if self.token_cache is None:
            return self._tokens(conv)
        return self.token_cache.get(conv, partial(self._tokens, conv))

    def _tokens(self, conv: Conversation) -> Tokens | Skip:
        """`encode(conv)` as (input ids [L], labels [L], images kept), or its Skip."""
        encoded = self.encode(conv)
        if isinstance(encoded, Skip):
            return encoded
        input_ids = torch.tensor(encoded.input_ids, dtype=torch.long)
        return input_ids, torch.tensor(encoded.labels, dtype=torch.long), encoded.num_images

    def supervision(self, conv: Conversation) -> list[tuple[str, bool]] | Skip:
        """`encode` as text pieces flagged "supervised" (`--show`), or the sample's `Skip`."""
        encoded = self.encode(conv)
        if isinstance(encoded, Skip):
            return encoded
        return supervision_pieces(encoded, self.tokenizer, self.image_token_id)


def replace_messages(conv: Conversation, messages: list[Message]) -> Conversation:
    """`conv` with other messages (same images, id, source and system prompt)."""
    return Conversation(messages, conv.images, conv.id, conv.source, conv.system)


def supervision_pieces(
    encoded: Encoded, tokenizer: PreTrainedTokenizerBase, image_token_id: int
) -> list[tuple[str, bool]]:
    """Decoded runs of `encoded` with a flag "supervised"; each image run shows as one `<image>`.

    Joined, the texts equal `render_text` of the kept rounds for a byte-level tokenizer.
    """
    ids = np.asarray(encoded.input_ids, dtype=np.int64)
    supervised = np.asarray(encoded.labels, dtype=np.int64) != IGNORE_INDEX
    is_image = ids == image_token_id
    key = supervised.astype(np.int8) * 2 + is_image.astype(np.int8)
    starts = np.flatnonzero(np.diff(key, prepend=np.int8(-1)))
    ends = np.append(starts[1:], len(ids))
    pieces = []
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        run = encoded.input_ids[start:end]
        text = IMAGE_TOKEN if is_image[start] else tokenizer.decode(run, skip_special_tokens=False)
        pieces.append((text, bool(supervised[start])))
    return pieces


def render_supervision(
    conv: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    image_token_id: int,
    tokens_per_image: int,
    max_seq_len: int | None = None,
    overlength: Overlength = "drop",
    max_images: int | None = None,
    max_round_tokens: int | None = None,
) -> list[tuple[str, bool]] | Skip:
    """`SampleEncoder(...).supervision(conv)` for a tokenizer and limits without a model."""
    encoder = SampleEncoder(
        tokenizer,
        image_token_id,
        tokens_per_image,
        max_seq_len=max_seq_len,
        overlength=overlength,
        max_images=max_images,
        max_round_tokens=max_round_tokens,
    )
    return encoder.supervision(conv)
