"""Tiny random-weight base models (tokenizer, LLaMA-style LM, CLIP vision tower) built offline.

The demo recipe and the tests use these instead of downloaded checkpoints. Each is saved with
`save_pretrained`, exactly like a user's model folder, so the rest of dsvl loads it through the
normal `AutoTokenizer` / `AutoModelForCausalLM` / `CLIPVisionModel` path. Everything is
deterministic for a given seed: the same arguments give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from dsvl_cli.data.template import ANSWER_HEADER, IMAGE_MARKER, QUESTION_HEADER, SYSTEM_PROMPT
from dsvl_cli.log import get_logger

log = get_logger(__name__)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3 (LLaMA's first three ids, plus pad).
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
MAX_IMAGES = 8  # the DSVL markers stop at "### Image 8:"

# LLaMA draws embeddings with std 0.02: at width 64 a text token then has norm ~0.16 while a
# projected image token has norm ~5, so what attention writes into image tokens (which image
# they are in) is drowned. At 0.1 (norm ~0.8) binding a shape to its image is learned sooner
# and more reliably (demo: seed 1 two-image 91.2 % -> 97.1 %, captions 89.5 % -> 100 %).
EMBEDDING_STD = 0.1

# The OpenAI CLIP normalisation, as used by every CLIP checkpoint DSVL loads.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _template_texts() -> list[str]:
    """The fixed strings the DSVL template writes around every round."""
    markers = [IMAGE_MARKER.format(k=k) for k in range(1, MAX_IMAGES + 1)]
    return [SYSTEM_PROMPT, QUESTION_HEADER + "\n", "\n\n" + ANSWER_HEADER + "\n", *markers]


def train_tiny_tokenizer(
    texts: list[str], vocab_size: int = 512, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` plus the DSVL template strings.

    Byte-level BPE encodes any string and decodes it back losslessly. The special tokens are
    `<unk>` (0), `<s>` (1, bos), `</s>` (2, eos) and `<pad>` (3). There is no post-processor:
    `tokenizer(text)["input_ids"]` is the plain encoding of `text`, without BOS or EOS, whatever
    `add_special_tokens` says; the DSVL template adds BOS/EOS itself by id.

    Args:
        texts: corpus (e.g. `conversation_texts(...)` of the training split).
        vocab_size: upper bound on the vocabulary, special tokens included; a small corpus may
            give fewer tokens, so size models with `len(tokenizer)`.
        model_max_length: the length the tokenizer reports (match the LM's positions).

    Returns:
        A transformers fast tokenizer with bos/eos/unk/pad set, padding on the right.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The template strings occur once per round in rendered samples, so weight them like the
    # corpus: BPE then merges the system prompt and headers into few tokens (shorter sequences).
    weight = max(1, len(texts))
    corpus = [*texts, *(_template_texts() * weight)]
    backend.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        model_max_length=model_max_length,
    )
    log.debug("trained a byte-level BPE tokenizer with %d tokens", len(tokenizer))
    return tokenizer


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide transformers' per-shard progress bars while saving tiny models (noise in CLI output)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_tiny_lm(
    out_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_position_embeddings: int = 1024,
    embedding_std: float = EMBEDDING_STD,
    seed: int = 0,
) -> None:
    """Save a random-weight LLaMA causal LM plus `tokenizer` into `out_dir` (safetensors).

    The vocabulary is `len(tokenizer)`; bos/eos/pad ids come from the tokenizer. The defaults
    give about 0.14M parameters with a 512-token vocabulary. The input embeddings are drawn
    with `embedding_std` (see `EMBEDDING_STD`), every other weight as LLaMA initialises it.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=embedding_std)
    out_dir = Path(out_dir)
    with _no_progress_bars():
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log.debug("saved a tiny LM (%d params) to %s", model.num_parameters(), out_dir)


def build_tiny_clip(
    out_dir: Path,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    seed: int = 0,
) -> None:
    """Save a random-weight CLIP vision tower and a matching `CLIPImageProcessor` into `out_dir`.

    The processor resizes the shortest edge to `image_size` (bicubic), centre-crops to
    `image_size` square and normalises with the CLIP mean/std, so the tower yields
    `(image_size // patch_size) ** 2 + 1` tokens of `hidden_size` per image (17 x 64 by default).
    """
    config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        projection_dim=hidden_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        resample=3,  # PIL bicubic, as CLIP checkpoints ship it
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    out_dir = Path(out_dir)
    with _no_progress_bars():
        model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    log.debug("saved a tiny CLIP vision tower (%d params) to %s", model.num_parameters(), out_dir)
