"""Decoding settings for chat and eval, and a streamer that hands out text pieces.

Every setting is explicit and shown (chat prints them at start, eval writes them beside the
results); `GenerationSettings.generation_config` builds a complete `transformers.GenerationConfig`
so nothing is inherited from the language model's `generation_config.json` (the original silently
took Llama-2's sampling defaults). Greedy decoding is the default,
for reproducible answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, StoppingCriteria, TextStreamer

from dsvl_cli.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings, all explicit. ``temperature == 0`` means greedy (deterministic).

    top_p, top_k and temperature act only when sampling (temperature > 0); top_k 0 is off.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, 0 = greedy (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, 0 = off (got {self.top_k})")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if problems:
            raise ConfigError("generation settings: " + "; ".join(problems))

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mode": "sampling" if self.sampling else "greedy"}

    def describe(self) -> str:
        """One line for the chat banner and logs."""
        text = f"max_new_tokens={self.max_new_tokens}, "
        if self.sampling:
            text += f"sampling temperature={self.temperature} top_p={self.top_p} "
            text += f"top_k={self.top_k or 'off'}, "
        else:
            text += "greedy (temperature=0), "
        return text + f"repetition_penalty={self.repetition_penalty}, seed={self.seed}"

    def generation_config(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        """A complete `GenerationConfig`: every decoding choice set here, none inherited."""
        values: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.sampling,
            "num_beams": 1,
            "return_dict_in_generate": True,
            "repetition_penalty": self.repetition_penalty,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if self.sampling:
            values.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return GenerationConfig(**values)


class GenerationCancelled(Exception):
    """Generation stopped because the caller no longer wants the answer (a client left)."""


class StopCriteria(StoppingCriteria):
    """Ends generation at a stop string in the answer, or raises when the caller cancels.

    Args:
        tokenizer: decodes the generated ids (special tokens skipped).
        start: length of the input (history + prompt); later ids are the answer.
        stop: strings that end the answer (the session cuts the answer before the first).
        cancelled: called after every token; True raises `GenerationCancelled`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        start: int,
        stop: tuple[str, ...] = (),
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.start = start
        self.stop = stop
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        """[batch, length] ids so far -> [batch] bool "done" (batch 1 in chat)."""
        if self.cancelled is not None and self.cancelled():
            raise GenerationCancelled("generation cancelled")
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.stop:
            for row in range(input_ids.shape[0]):
                ids = input_ids[row, self.start :].tolist()
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                done[row] = any(s in text for s in self.stop)
        return done


class TextPieceStreamer(TextStreamer):
    """Hands decoded text pieces (whole words) to a callback; leading whitespace is dropped."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, callback: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback
        self.started = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.callback(text)
