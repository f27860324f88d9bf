"""One conversation with a model: history in the KV cache, each image encoded once.

`ChatSession` is what `dsvl chat` and `dsvl eval` share. A round becomes ids and pixels through
the model's `SampleEncoder` (`dsvl_cli.data.encoder`), as in training: the first round carries the
system prompt, and image numbers continue across rounds (`### Image 3:` is the conversation's third
image). Only the new round's ids and the new round's images go through the model; the cache
returned by the previous `generate` covers the rest, so a round's cost does not grow with the
number of earlier images.

History invariant: after every round, `history_ids` equals the training rendering of
`conversation` (`encode_conversation(...).input_ids`), i.e. each round is prompt + answer + EOS.
The answer kept is the decoded reply with surrounding whitespace stripped, tokenised as the
template tokenises answers; where that differs from the generated ids (or generation stopped at
`max_new_tokens` without EOS), the cache is cropped back to the common prefix and the next round
feeds the difference. The next round then starts with BOS exactly as in training.

Context overflow (history + new prompt + `max_new_tokens` over `max_context`):
``"error"`` raises `ContextOverflow` and leaves the session as it was; ``"drop_oldest"`` drops
whole rounds from the start until the new round fits, together with their images, and
re-renders what is left as a fresh conversation: system prompt on the new first round, images
renumbered from 1, cache rebuilt on the next round (the remaining images are encoded again).

Generation settings are explicit (`dsvl_cli.inference.generation.GenerationSettings`): nothing
comes from the language model's `generation_config.json`.

A server (`dsvl serve`) rebuilds a client's history with `add_round` (rounds the model did not
answer here: their ids and images reach the model with the next `ask`, after whatever the cache
covers), changes settings per request with `configure`, and passes decoded `pixels`, `stop`
strings and a `cancelled` check to `ask`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from dsvl_cli import __version__
from dsvl_cli.data.conversation import Conversation, Message, escape_typed
from dsvl_cli.data.encoder import SampleEncoder, user_content
from dsvl_cli.errors import ConfigError, DataError
from dsvl_cli.inference.generation import GenerationSettings, StopCriteria, TextPieceStreamer
from dsvl_cli.inference.rounds import ContextOverflow, Plan, Reply, Round, common_prefix
from dsvl_cli.model.hf_compat import cache_kwargs, output_cache

if TYPE_CHECKING:
    from dsvl_cli.inference.loader import LoadedModel
    from dsvl_cli.model.builder import Built

Overflow = Literal["error", "drop_oldest"]
OVERFLOW_MODES: tuple[str, ...] = get_args(Overflow)
TRANSCRIPT_FORMAT = "dsvl-chat-transcript"


class ChatSession:
    """A multi-round, multi-image conversation with one model (see the module docstring).

    Args:
        built: model, tokenizer and image transform (`Built`, or `LoadedModel.built`).
        settings: decoding settings.
        max_context: token limit of a conversation (None: no check).
        max_images: images a conversation may hold (None: no limit).
        overflow: "error" or "drop_oldest".
        system: system prompt override (None: the template's default).
        device: where inputs go (default: the device of the token embeddings).
        encoder: the model's `SampleEncoder` (default: built from `built`, without limits).
    """

    def __init__(
        self,
        built: Built,
        settings: GenerationSettings | None = None,
        *,
        max_context: int | None = None,
        max_images: int | None = None,
        overflow: Overflow = "error",
        system: str | None = None,
        device: torch.device | None = None,
        encoder: SampleEncoder | None = None,
    ) -> None:
        if overflow not in OVERFLOW_MODES:
            raise ConfigError(f"overflow {overflow!r}: choose one of {', '.join(OVERFLOW_MODES)}")
        self.model = built.model
        self.tokenizer = built.tokenizer
        self.encoder = encoder or SampleEncoder.from_built(built)
        self.settings = settings or GenerationSettings()
        self.max_context = max_context
        self.max_images = max_images
        self.overflow = overflow
        self.system = system
        self.device = device or self.model.get_input_embeddings().weight.device
        self.eos = int(self.tokenizer.eos_token_id)
        self.generation_config = self.settings.generation_config(self.tokenizer)
        self.stop: tuple[str, ...] = ()
        self.rounds: list[Round] = []
        self.history_ids: list[int] = []
        self.dropped_rounds = 0
        self._cache: Any = None

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        settings: GenerationSettings | None = None,
        overflow: Overflow = "error",
        max_context: int | None = None,
    ) -> ChatSession:
        """A session with the limits of the model's config (`max_context` may lower it)."""
        limit = loaded.max_context if max_context is None else min(max_context, loaded.max_context)
        return cls(
            loaded.built,
            settings,
            max_context=limit,
            max_images=loaded.max_images,
            overflow=overflow,
            device=loaded.device,
            encoder=SampleEncoder.from_built(loaded.built, loaded.config),
        )

    # ------------------------------------------------------------------ state

    @property
    def images(self) -> list[str]:
        """Image paths of the conversation so far, in number order."""
        return [path for r in self.rounds for path in r.images]

    @property
    def cached_tokens(self) -> int:
        return 0 if self._cache is None else int(self._cache.get_seq_length())

    @property
    def conversation(self) -> Conversation:
        """The conversation so far, answers included (what `history_ids` renders)."""
        messages = []
        for r in self.rounds:
            messages += [
                Message("user", user_content(r.question, len(r.images))),
                Message("assistant", escape_typed(r.answer)),
            ]
        return Conversation(messages, self.images, id="chat", source="chat", system=self.system)

    def configure(self, settings: GenerationSettings) -> None:
        """Use `settings` from the next round on (the conversation is kept)."""
        self.settings = settings
        self.generation_config = settings.generation_config(self.tokenizer)

    def clear(self) -> None:
        """Forget the conversation (images, history, cache)."""
        self.rounds = []
        self.history_ids = []
        self.dropped_rounds = 0
        self._cache = None

    def transcript(self, model_folder: str | Path | None = None) -> dict[str, Any]:
        """The conversation as a JSON-ready dict (a prepared-JSONL record plus settings)."""
        record = self.conversation.to_dict()
        record.update(
            format=TRANSCRIPT_FORMAT,
            dsvl_version=__version__,
            model=None if model_folder is None else str(model_folder),
            generation=self.settings.to_dict(),
            dropped_rounds=self.dropped_rounds,
            finish_reasons=[r.finish_reason for r in self.rounds],
        )
        return record

    def save(self, path: str | Path, model_folder: str | Path | None = None) -> Path:
        """Write `transcript()` as JSON to `path`; DataError if it cannot be written."""
        path = Path(path).expanduser()
        text = json.dumps(self.transcript(model_folder), indent=2, ensure_ascii=False) + "\n"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as err:
            raise DataError(f"cannot write transcript {path}: {err.strerror}") from None
        return path

    # ------------------------------------------------------------------ one round

    def check_images(self, count: int) -> None:
        """DataError if `count` more images would exceed the conversation's limit."""
        total = len(self.images) + count
        if self.max_images is not None and total > self.max_images:
            raise DataError(
                f"too many images: the conversation would hold {total}, the model takes at most "
                f"{self.max_images} (model.max_images_per_sample); /clear starts a new one"
            )

    def load_pixels(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """`SampleEncoder.pixels`: [n, 3, H, W] on the CPU; ImageLoadError / ImageRefError."""
        return self.encoder.pixels(paths)

    def ask(
        self,
        question: str,
        images: Sequence[str | Path] = (),
        on_text: Callable[[str], None] | None = None,
        *,
        pixels: torch.Tensor | None = None,
        stop: Sequence[str] = (),
        cancelled: Callable[[], bool] | None = None,
    ) -> Reply:
        """Answer `question` about `images` (attached to this round) given the conversation.

        `on_text` receives the answer piece by piece while it is generated. `pixels`
        ([n, 3, H, W], n = len(images)) are the images already decoded (default: loaded from
        the paths). Generation ends at the first of `stop` in the answer, which is cut before
        it. `cancelled` is checked after every token; when it returns True generation stops
        with `GenerationCancelled`. On any error (bad image, too many images, context
        overflow, interruption, cancellation) the conversation is left as it was; the session
        changes only once the answer is complete.
        """
        if not question.strip() and not images:
            raise DataError("empty question: type a question")
        paths = [str(p) for p in images]
        self.check_images(len(paths))
        pixels = self.load_pixels(paths) if pixels is None else pixels
        plan = self._fit(question, len(paths))
        cached = 0 if plan.cache is None else int(plan.cache.get_seq_length())
        self.stop = tuple(stop)
        sequence = self._generate(plan, pixels, on_text, cancelled)
        text, finish, new_tokens = self._commit(plan, question, paths, pixels, sequence)
        first = len(self.images) - len(paths) + 1
        return Reply(
            text=text,
            finish_reason=finish,
            new_tokens=new_tokens,
            fed_tokens=len(sequence) - new_tokens - cached,
            cached_tokens=cached,
            image_numbers=list(range(first, first + len(paths))),
            dropped_rounds=plan.dropped,
        )

    def add_round(
        self, question: str, images: Sequence[str], answer: str, pixels: torch.Tensor | None = None
    ) -> None:
        """Append a finished round answered elsewhere (a client's history), as training renders it.

        `pixels` as in `ask`. Nothing runs now: the round's ids and images go through the model
        with the next `ask`. DataError for too many images or an unreadable image.
        """
        paths = [str(p) for p in images]
        self.check_images(len(paths))
        pixels = self.load_pixels(paths) if pixels is None else pixels
        prompt = self.next_prompt(question, len(paths))
        text = answer.strip()
        ids = self.answer_ids(text)
        self.history_ids = self.history_ids + prompt + ids + [self.eos]
        self.rounds = [*self.rounds, Round(question.strip(), paths, pixels, prompt, text, ids)]

    def next_prompt(self, question: str, num_images: int) -> list[int]:
        """Prompt ids the next round would have (`question` about `num_images` new images)."""
        return self._encode(question, num_images, len(self.images) + 1, not self.rounds)

    def _encode(
        self, question: str, num_images: int, first_image: int, first_round: bool
    ) -> list[int]:
        return self.encoder.turn(question, num_images, first_image, self.system, first_round)

    def _fit(self, question: str, num_images: int) -> Plan:
        """Plan the round: the prompt, and the rounds kept to make room as `overflow` says."""
        plan = Plan(self.rounds, self.history_ids, self._cache, 0, [])
        while True:
            first = sum(len(r.images) for r in plan.rounds) + 1
            plan.prompt = self._encode(question, num_images, first, not plan.rounds)
            need = len(plan.history) + len(plan.prompt) + self.settings.max_new_tokens
            if self.max_context is None or need <= self.max_context:
                return plan
            if self.overflow == "error" or not plan.rounds:
                raise ContextOverflow(
                    f"context full: {len(plan.history)} tokens of history + "
                    f"{len(plan.prompt)} for this question + {self.settings.max_new_tokens} to "
                    f"answer > {self.max_context}",
                    "/clear, ask with fewer images, lower --max-new-tokens, or use overflow "
                    "drop_oldest",
                )
            plan = self._without_oldest(plan)

    def _without_oldest(self, plan: Plan) -> Plan:
        """`plan` minus its first round, the rest re-rendered as a fresh conversation."""
        rounds, history, first = [], [], 1
        for i, r in enumerate(plan.rounds[1:]):
            prompt = self._encode(r.question, len(r.images), first, i == 0)
            rounds.append(replace(r, prompt_ids=prompt))
            history += prompt + r.answer_ids + [self.eos]
            first += len(r.images)
        return Plan(rounds, history, None, plan.dropped + 1, [])

    def _generate(
        self,
        plan: Plan,
        pixels: torch.Tensor,
        on_text: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[int]:
        """Run `generate` over history + prompt; the full id sequence (`plan.cache` updated)."""
        ids = torch.tensor([plan.history + plan.prompt], device=self.device)
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "generation_config": self.generation_config,
        }
        parts = [p for p in [*self._uncached_pixels(plan), pixels] if p.shape[0]]
        if parts:
            kwargs["pixel_values"] = torch.cat(parts).to(self.device)
        kwargs.update(cache_kwargs(plan.cache))
        if on_text is not None:
            kwargs["streamer"] = TextPieceStreamer(self.tokenizer, on_text)
        if self.stop or cancelled is not None:
            stops = StopCriteria(self.tokenizer, ids.shape[1], self.stop, cancelled)
            kwargs["stopping_criteria"] = [stops]
        torch.manual_seed(self.settings.seed)
        try:
            out = self.model.generate(**kwargs)
        except BaseException:
            if plan.cache is self._cache:
                # generate extends the cache in place; a half-written cache is not reusable.
                self._cache = None
            raise
        plan.cache = output_cache(out)
        return out.sequences[0].tolist()

    @staticmethod
    def _uncached_pixels(plan: Plan) -> list[torch.Tensor]:
        """Pixels of the kept rounds that start after what `plan.cache` covers (all: no cache).

        A cache always covers whole prompts (it is cut in an answer at the earliest), so a
        round is either in it with its images or entirely after it.
        """
        covered = 0 if plan.cache is None else int(plan.cache.get_seq_length())
        parts, start = [], 0
        for r in plan.rounds:
            if start >= covered:
                parts.append(r.pixels)
            start += len(r.prompt_ids) + len(r.answer_ids) + 1
        return parts

    def _commit(
        self,
        plan: Plan,
        question: str,
        paths: list[str],
        pixels: torch.Tensor,
        sequence: list[int],
    ) -> tuple[str, str, int]:
        """Record the round; keep the cache only where it matches the training rendering.

        Returns the answer text, the finish reason and the number of generated tokens.
        """
        new = sequence[len(plan.history) + len(plan.prompt) :]
        finish = "eos" if self.eos in new else "length"
        generated = new[: new.index(self.eos)] if finish == "eos" else new
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        text = text.strip()
        answer_ids = self.answer_ids(text)
        history = plan.history + plan.prompt + answer_ids + [self.eos]
        self._cache = self._crop(plan.cache, common_prefix(sequence, history))
        self.history_ids = history
        self.rounds = [
            *plan.rounds,
            Round(question.strip(), paths, pixels, plan.prompt, text, answer_ids, finish),
        ]
        self.dropped_rounds += plan.dropped
        return text, finish, len(new)

    def answer_ids(self, text: str) -> list[int]:
        """Ids of an answer as the template tokenises it (`SampleEncoder.answer_ids`)."""
        return self.encoder.answer_ids(text)

    @staticmethod
    def _crop(cache: Any, keep: int) -> Any:
        """The cache cut to its first `keep` positions, or None if it cannot be cut."""
        if cache is None:
            return None
        length = int(cache.get_seq_length())
        if keep >= length:
            return cache
        if not getattr(cache, "is_croppable", False):
            return None
        cache.crop(keep - length)  # transformers 5: a negative count removes from the end
        return cache
