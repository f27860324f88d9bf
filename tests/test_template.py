"""The DSVL template: golden rendered strings, ids, label masks, overlength and chat prompts.

The tokenizer is a byte-level BPE trained here in milliseconds on a few sentences and the template
strings, wrapped in transformers' PreTrainedTokenizerFast; `<image>` is added as a special token
the way the model builder adds it. Byte-level BPE decodes exactly, so decoded ids can be compared
with strings.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dsvl_cli.data.conversation import Conversation, Message
from dsvl_cli.data.encoder import render_supervision
from dsvl_cli.data.template import (
    IGNORE_INDEX,
    Encoded,
    Skip,
    check_tokenizer,
    encode_conversation,
    encode_prompt,
    question_text,
    render_text,
)
from dsvl_cli.errors import ConfigError, DataError

N = 4  # tokens per image
# The default system prompt, written out (not imported) so a changed constant fails here.
SYS = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language.\n\n"
)
CORPUS = [
    SYS,
    "### Image 1:\n### Image 2:\n### Image 3:\n",
    "### Question:\nWhat shape is this?\n\n### Answer:\nA red square.",
    "Which one is bigger? The blue circle is bigger than the green triangle.",
    "Describe the picture in detail. There are two shapes on a white background.",
]


def _raw_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def raw() -> Tokenizer:
    return _raw_tokenizer()


def _wrap(raw: Tokenizer, image: bool = True, bos: bool = True) -> PreTrainedTokenizerFast:
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    if bos:
        specials["bos_token"] = "<s>"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw.to_str()), **specials)
    if image:
        tok.add_special_tokens({"extra_special_tokens": ["<image>"]})
    return tok


@pytest.fixture(scope="module")
def tok(raw: Tokenizer) -> PreTrainedTokenizerFast:
    return _wrap(raw)


@pytest.fixture(scope="module")
def img_id(tok: PreTrainedTokenizerFast) -> int:
    return check_tokenizer(tok)


def conv(*turns: str, system: str | None = None) -> Conversation:
    """A conversation from alternating user/assistant texts, one image path per placeholder."""
    messages = [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    n = sum(m.num_images for m in messages)
    return Conversation(messages, images=[f"{k}.png" for k in range(n)], id="t", system=system)


def enc(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode(c: Conversation, tok: PreTrainedTokenizerFast, img_id: int, **kw) -> Encoded:
    out = encode_conversation(c, tok, img_id, N, kw.pop("max_seq_len", None), **kw)
    assert isinstance(out, Encoded), out
    return out


def answers(c: Conversation) -> list[str]:
    return [m.content for m in c.messages if m.role == "assistant"]


def supervised_runs(e: Encoded, tok: PreTrainedTokenizerFast) -> list[str]:
    """Decode each contiguous run of supervised labels (reference kept simple, in the test)."""
    labels = np.asarray(e.labels)
    mask = np.concatenate([[False], labels != IGNORE_INDEX, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(mask))
    return [tok.decode(labels[s:t].tolist()) for s, t in zip(edges[::2], edges[1::2], strict=True)]


# ---- golden rendered strings -------------------------------------------------------------

SINGLE = conv("<image>\nWhat shape is this?", "A red square.")
TWO_IMAGES = conv("<image>\n<image>\nWhich one is bigger?", "The blue circle.")
IMAGE_IN_ROUND_2 = conv(
    "<image>\nWhat shape is this?", "A red square.", "<image> And this one?", "A green triangle."
)
TEXT_ROUND_BETWEEN = conv(
    "<image>\nWhat shape is this?",
    "A red square.",
    "What colour is it?",
    "Red.",
    "Describe <image>",
    "A blue circle.",
)
CUSTOM_SYSTEM = conv("What is bigger?", "The circle.", system="You are a shapes expert.\n")

GOLDEN = [
    (
        SINGLE,
        "<s>" + SYS + "### Image 1:\n<image>\n\n### Question:\nWhat shape is this?\n\n"
        "### Answer:\nA red square.</s>",
    ),
    (
        TWO_IMAGES,
        "<s>" + SYS + "### Image 1:\n<image>\n### Image 2:\n<image>\n\n"
        "### Question:\nWhich one is bigger?\n\n### Answer:\nThe blue circle.</s>",
    ),
    (
        IMAGE_IN_ROUND_2,
        "<s>" + SYS + "### Image 1:\n<image>\n\n### Question:\nWhat shape is this?\n\n"
        "### Answer:\nA red square.</s>"
        "<s>### Image 2:\n<image>\n\n### Question:\nAnd this one?\n\n"
        "### Answer:\nA green triangle.</s>",
    ),
    (
        TEXT_ROUND_BETWEEN,
        "<s>" + SYS + "### Image 1:\n<image>\n\n### Question:\nWhat shape is this?\n\n"
        "### Answer:\nA red square.</s>"
        "<s>### Question:\nWhat colour is it?\n\n### Answer:\nRed.</s>"
        "<s>### Image 2:\n<image>\n\n### Question:\nDescribe\n\n### Answer:\nA blue circle.</s>",
    ),
    (
        CUSTOM_SYSTEM,
        "<s>You are a shapes expert.\n\n### Question:\nWhat is bigger?\n\n"
        "### Answer:\nThe circle.</s>",
    ),
]


GOLDEN_IDS = ["single", "two_images", "image_in_round_2", "text_round_between", "custom_system"]


@pytest.mark.parametrize("sample,expected", GOLDEN, ids=GOLDEN_IDS)
def test_render_text_golden(sample: Conversation, expected: str) -> None:
    assert render_text(sample) == expected


def test_render_text_empty_system_and_offset() -> None:
    c = conv("<image>\nHi?", "Hello.", system="")
    assert render_text(c, first_image_index=5) == (
        "<s>### Image 5:\n<image>\n\n### Question:\nHi?\n\n### Answer:\nHello.</s>"
    )


@pytest.mark.parametrize(
    "content,question",
    [
        ("<image>\nWhat is it?", "What is it?"),
        ("What is it?\n<image>", "What is it?"),
        ("Compare <image> with <image> please", "Compare with please"),
        ("Left:\n<image>\nRight:\n<image>\nSame colour?", "Left:\nRight:\nSame colour?"),
        ("<image><image>", ""),
        ("No image here.", "No image here."),
    ],
)
def test_question_text_removes_placeholders(content: str, question: str) -> None:
    assert question_text(content) == question


# ---- ids and labels ----------------------------------------------------------------------


def test_single_image_ids_exact(tok, img_id) -> None:
    e = encode(SINGLE, tok, img_id)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    prompt = (
        [bos]
        + enc(tok, SYS + "### Image 1:\n")
        + [img_id] * N
        + enc(tok, "\n\n### Question:\nWhat shape is this?\n\n### Answer:\n")
    )
    answer = enc(tok, "A red square.") + [eos]
    assert e.input_ids == prompt + answer
    assert e.labels == [IGNORE_INDEX] * len(prompt) + answer
    assert (e.num_images, e.num_rounds, e.rounds_dropped, e.answers_truncated) == (1, 1, 0, 0)


@pytest.mark.parametrize("sample", [g[0] for g in GOLDEN], ids=GOLDEN_IDS)
def test_label_mask(sample: Conversation, tok, img_id) -> None:
    e = encode(sample, tok, img_id)
    ids, labels = np.asarray(e.input_ids), np.asarray(e.labels)
    assert len(ids) == len(labels)
    assert supervised_runs(e, tok) == [a + "</s>" for a in answers(sample)]
    rounds = len(sample.messages) // 2
    assert (ids == tok.bos_token_id).sum() == rounds == e.num_rounds
    assert (ids == tok.eos_token_id).sum() == rounds
    assert (ids == img_id).sum() == N * sample.num_images == N * e.num_images
    assert (labels[ids == tok.bos_token_id] == IGNORE_INDEX).all()
    assert (labels[ids == img_id] == IGNORE_INDEX).all()
    # Everything else unsupervised is exactly the prompt text: system, markers, question, headers.
    pieces = render_supervision(sample, tok, img_id, N)
    assert "".join(text for text, _ in pieces) == render_text(sample)
    assert [text for text, sup in pieces if sup] == [a + "</s>" for a in answers(sample)]


def test_special_token_text_in_messages_stays_text(tok, img_id) -> None:
    c = conv("What does </s> mean? <s>", "It ends </s> a sequence.")
    e = encode(c, tok, img_id)
    ids = np.asarray(e.input_ids)
    assert (ids == tok.eos_token_id).sum() == 1 and (ids == tok.bos_token_id).sum() == 1
    assert supervised_runs(e, tok) == ["It ends </s> a sequence.</s>"]


# ---- skips and overlength ----------------------------------------------------------------


def test_skip_reasons(tok, img_id) -> None:
    def reason(c: Conversation, **kw) -> str:
        out = encode_conversation(c, tok, img_id, N, None, **kw)
        assert isinstance(out, Skip)
        return out.reason

    assert reason(Conversation(messages=[])) == "empty"
    assert reason(Conversation(SINGLE.messages, images=[])) == "invalid"
    assert reason(TWO_IMAGES, max_images=1) == "too_many_images"
    assert encode(TWO_IMAGES, tok, img_id, max_images=2).num_images == 2


def test_overlength_drop_vs_truncate_rounds(tok, img_id) -> None:
    full = encode(TEXT_ROUND_BETWEEN, tok, img_id)
    starts = np.flatnonzero(np.asarray(full.input_ids) == tok.bos_token_id).tolist()
    ends = starts[1:] + [len(full.input_ids)]  # cumulative length after each round
    images_after = [1, 1, 2]
    assert encode(TEXT_ROUND_BETWEEN, tok, img_id, max_seq_len=ends[-1]).input_ids == full.input_ids
    for limit in range(1, ends[-1]):
        dropped = encode_conversation(TEXT_ROUND_BETWEEN, tok, img_id, N, limit)
        assert isinstance(dropped, Skip) and dropped.reason == "too_long"
        out = encode_conversation(
            TEXT_ROUND_BETWEEN, tok, img_id, N, limit, overlength="truncate_rounds"
        )
        kept = sum(end <= limit for end in ends)
        if kept == 0:
            assert isinstance(out, Skip) and out.reason == "too_long"
            continue
        assert isinstance(out, Encoded)
        assert out.input_ids == full.input_ids[: ends[kept - 1]]  # whole rounds, in order
        assert out.labels == full.labels[: ends[kept - 1]]
        assert (out.num_rounds, out.rounds_dropped) == (kept, 3 - kept)
        assert out.num_images == images_after[kept - 1]
        assert out.input_ids.count(img_id) == N * out.num_images  # no image run is split


def test_max_round_tokens_cuts_answer_keeps_eos(tok, img_id) -> None:
    long_answer = "The blue circle is bigger than the green triangle. " * 3
    c = conv("<image>\nDescribe the picture in detail.", long_answer.strip())
    full = encode(c, tok, img_id)
    answer_ids = enc(tok, long_answer.strip())
    prompt_text_tokens = len(full.input_ids) - len(answer_ids) - 1 - N
    cap = prompt_text_tokens + 5 + 1  # room for 5 answer tokens and the EOS
    e = encode(c, tok, img_id, max_round_tokens=cap)
    supervised = [t for t in e.labels if t != IGNORE_INDEX]
    assert supervised == answer_ids[:5] + [tok.eos_token_id]
    assert e.input_ids[-1] == tok.eos_token_id
    assert len(e.input_ids) - N == cap  # image tokens do not count against the cap
    assert e.input_ids.count(img_id) == N and e.answers_truncated == 1
    # A prompt that fills the cap leaves only the EOS supervised (the original's edge case).
    tiny = encode(c, tok, img_id, max_round_tokens=1)
    assert [t for t in tiny.labels if t != IGNORE_INDEX] == [tok.eos_token_id]
    assert encode(c, tok, img_id, max_round_tokens=10_000).input_ids == full.input_ids


# ---- generation prompts ------------------------------------------------------------------


def test_encode_prompt_continuation_round(tok, img_id) -> None:
    new_round = Conversation([Message("user", "<image>\nAnd this one?")], images=["c.png"])
    ids = encode_prompt(new_round, tok, img_id, N, first_image_index=3, include_system=False)
    expected = (
        [tok.bos_token_id]
        + enc(tok, "### Image 3:\n")
        + [img_id] * N
        + enc(tok, "\n\n### Question:\nAnd this one?\n\n### Answer:\n")
    )
    assert ids == expected
    assert tok.decode(ids[-3:]).endswith("\n") and tok.eos_token_id not in ids
    assert render_text(new_round, first_image_index=3, include_system=False).endswith(
        "### Answer:\n"
    )


def test_encode_prompt_matches_training_ids(tok, img_id) -> None:
    """History ids + the new round's prompt + answer ids equal the training encoding."""
    full = encode(IMAGE_IN_ROUND_2, tok, img_id)
    first = encode(conv(*[m.content for m in IMAGE_IN_ROUND_2.messages[:2]]), tok, img_id)
    second = Conversation([IMAGE_IN_ROUND_2.messages[2]], images=["1.png"])
    prompt = encode_prompt(second, tok, img_id, N, first_image_index=2, include_system=False)
    answer = enc(tok, "A green triangle.") + [tok.eos_token_id]
    assert first.input_ids + prompt + answer == full.input_ids
    whole_open = Conversation(IMAGE_IN_ROUND_2.messages[:3], images=["0.png", "1.png"])
    assert encode_prompt(whole_open, tok, img_id, N) == full.input_ids[: -len(answer)]


def test_encode_prompt_rejects_closed_conversation(tok, img_id) -> None:
    with pytest.raises(DataError, match="must end with the user's message"):
        encode_prompt(SINGLE, tok, img_id, N)


# ---- tokenizer requirements --------------------------------------------------------------


def test_check_tokenizer(raw, tok, img_id) -> None:
    assert img_id == tok.convert_tokens_to_ids("<image>")
    with pytest.raises(ConfigError, match="extra_special_tokens"):
        check_tokenizer(_wrap(raw, image=False))
    with pytest.raises(ConfigError, match="no BOS token"):
        check_tokenizer(_wrap(raw, bos=False))
