"""Sequence packing: a packed row equals its conversations run one by one (MMCA on and off)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsvl_cli.config import Config, validate_config
from dsvl_cli.data.collate import Batch, Collator
from dsvl_cli.data.conversation import Conversation, Message
from dsvl_cli.data.encoder import Sample, SampleEncoder
from dsvl_cli.data.grouping import LengthGroupedSampler, grouped_batches
from dsvl_cli.data.packing import PackedCollator, PackedRowSampler, first_fit_decreasing, pack_epoch
from dsvl_cli.data.template import IGNORE_INDEX
from dsvl_cli.demo.synthetic import generate_synthetic
from dsvl_cli.errors import ConfigError
from dsvl_cli.model import mmca as mmca_module
from dsvl_cli.model.builder import Built, build_model
from dsvl_cli.model.hf_compat import packed_causal_mask
from dsvl_cli.model.mmca import IMAGE, PAD, TEXT, build_mmca_masks
from dsvl_cli.model.sequences import sequence_positions
from dsvl_cli.train.batches import model_inputs

FLEX_CPU_WARNING = "ignore:flex_attention called without torch.compile"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_synthetic(out, num=12, seed=0)
    return out


def make_config(shapes: Path, mmca: bool) -> Config:
    return validate_config(
        {
            "model": {
                "language_model": str(shapes / "models/lm"),
                "vision": {"kind": "clip", "path": str(shapes / "models/vision")},
                "max_seq_len": 512,
                "mmca": mmca,
            },
            "data": {"system_prompt": ""},
        }
    )


def build(shapes: Path, mmca: bool) -> tuple[Built, Config]:
    torch.manual_seed(0)
    config = make_config(shapes, mmca)
    return build_model(config), config


def conversations() -> list[Conversation]:
    """Images in several conversations of a row, a multi-image one, a text-only one between."""

    def conv(cid: str, question: str, answer: str, images: list[str]) -> Conversation:
        return Conversation(
            [Message("user", "<image>\n" * len(images) + question), Message("assistant", answer)],
            images=images,
            id=cid,
        )

    return [
        conv("a", "Which image has a red square?", "the first", ["images/000000.png"] * 2),
        conv("b", "How many sides has a triangle?", "three", []),
        conv("c", "What colour is it?", "blue", ["images/000002.png"]),
        conv("d", "Name a shape.", "circle", []),
    ]


def samples(built: Built, config: Config, shapes: Path) -> list[Sample]:
    encoder = SampleEncoder.from_built(built, config)
    out = [encoder.sample(c, shapes) for c in conversations()]
    assert all(isinstance(s, Sample) for s in out)
    return out  # type: ignore[return-value]


def run(built: Built, batch: Batch, labels: bool) -> object:
    inputs = model_inputs(batch, built, torch.device("cpu"), "fp32")
    if not labels:
        inputs.pop("labels")
    with torch.no_grad():
        return built.model(**inputs)


@pytest.mark.parametrize("mmca, tile", [(True, 256), (True, 8), (False, 256)])
def test_packed_rows_equal_conversations_one_by_one(
    shapes: Path, mmca: bool, tile: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tile 8: dense MMCA runs many query tiles, most starting their keys past position 0
    monkeypatch.setattr(mmca_module, "DENSE_TILE", tile)
    built, config = build(shapes, mmca)
    built.model.eval()
    items = samples(built, config, shapes)
    pad = built.tokenizer.pad_token_id
    # Two rows of unequal length (the second is padded): [a, b, c] and [d].
    packed = PackedCollator(pad)([items[:3], items[3:]])
    assert packed.sequence_ids is not None and packed.position_ids is not None
    assert packed.num_images.tolist() == [3, 0]
    if mmca:
        masks = build_mmca_masks(
            built.model.modality_ids(packed.input_ids, packed.attention_mask),
            impl="dense",
            sequence_ids=packed.sequence_ids,
        )
        assert masks.tiles is not None and (tile > 8 or any(t[2] > 0 for t in masks.tiles))
    logits = run(built, packed, labels=False).logits  # type: ignore[attr-defined]
    total_sum, total_tokens = 0.0, 0
    for index, sample in enumerate(items):
        row, seq = (0, index + 1) if index < 3 else (1, 1)
        alone = Collator(pad)([sample])
        expected = run(built, alone, labels=False).logits[0]  # type: ignore[attr-defined]
        where = packed.sequence_ids[row] == seq
        assert packed.position_ids[row][where].tolist() == list(range(expected.shape[0]))
        torch.testing.assert_close(logits[row][where], expected, atol=1e-5, rtol=1e-5)
        out = run(built, alone, labels=True)
        total_sum += float(out.loss_sum)  # type: ignore[attr-defined]
        total_tokens += int(out.num_tokens)  # type: ignore[attr-defined]
    out = run(built, packed, labels=True)
    assert int(out.num_tokens) == total_tokens  # type: ignore[attr-defined]
    assert float(out.loss_sum) == pytest.approx(total_sum, rel=1e-5)  # type: ignore[attr-defined]
    assert float(out.loss) == pytest.approx(total_sum / total_tokens, rel=1e-5)  # type: ignore[attr-defined]


def test_labels_never_cross_a_boundary(shapes: Path) -> None:
    built, config = build(shapes, True)
    items = samples(built, config, shapes)
    packed = PackedCollator(built.tokenizer.pad_token_id)([items])
    seq, labels = packed.sequence_ids[0], packed.labels[0]  # type: ignore[index]
    first = torch.ones_like(seq, dtype=torch.bool)
    first[1:] = seq[1:] != seq[:-1]
    assert (labels[first] == IGNORE_INDEX).all()
    assert packed.ids == ["a", "b", "c", "d"] and packed.size == 4


def packed_modality() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows: [text, image, text | image, text, text | pad] and [text | image, text, pad]."""
    T, I = TEXT, IMAGE  # noqa: E741
    modality = torch.tensor([[T, I, I, T, I, T, T, PAD], [T, T, I, I, T, T, PAD, PAD]])
    sequence = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 0], [1, 2, 2, 2, 2, 2, 0, 0]])
    return modality, sequence


def cross(sequence: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L]: query and key in different sequences."""
    return sequence[:, None, :, None] != sequence[:, None, None, :]


@pytest.mark.filterwarnings(FLEX_CPU_WARNING)
def test_no_mask_crosses_a_boundary() -> None:
    modality, sequence = packed_modality()
    masks = build_mmca_masks(modality, impl="dense", sequence_ids=sequence)
    real = (sequence > 0)[:, None, :, None]
    for mask in (masks.image_branch, masks.text_branch):
        # only the dummy diagonal key of an empty row may be set outside the query's sequence
        assert not (mask & cross(sequence) & real).any()
    # the image of sequence 2 has no earlier image in its own sequence: the text at position 5
    # sees image 4 only; position 3 (sequence 1) sees images 1, 2, never image 4
    assert masks.image_branch[0, 0, 5].nonzero().flatten().tolist() == [4]
    assert masks.image_branch[0, 0, 3].nonzero().flatten().tolist() == [1, 2]
    # row 1: sequence 2 starts with text after sequence 1's text: no image key for position 1
    assert not bool(masks.has_image_keys[1, 0, 1, 0])
    # the flex masks apply the same rule: evaluate their mask_mod on every (query, key)
    flex = build_mmca_masks(modality, impl="flex", sequence_ids=sequence)
    b, q, kv = torch.arange(2)[:, None, None], torch.arange(8)[None, :, None], torch.arange(8)
    pairs = (
        (masks.image_branch, flex.image_branch, masks.has_image_keys),
        (masks.text_branch, flex.text_branch, masks.has_text_keys),
    )
    for dense, block, has_keys in pairs:
        rule = block.mask_mod(b, None, q, kv[None, None, :])[:, None]
        assert torch.equal(rule, dense & has_keys)


def test_flex_matches_dense_with_sequences_on_cpu() -> None:
    modality, sequence = packed_modality()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    from dsvl_cli.model.mmca import mmca_attention

    outs = [
        mmca_attention(
            None,
            q,
            k,
            v,
            None,
            mmca_masks=build_mmca_masks(modality, impl=impl, sequence_ids=sequence),
        )[0]
        for impl in ("flex", "dense")
    ]
    real = sequence > 0
    torch.testing.assert_close(outs[0][real], outs[1][real], atol=1e-5, rtol=1e-5)


def test_causal_packed_mask_is_block_diagonal(shapes: Path) -> None:
    built, _ = build(shapes, False)
    _, sequence = packed_modality()
    lm = built.model.language_model
    embeds = torch.zeros(2, 8, lm.config.hidden_size)
    mask = packed_causal_mask(
        lm.config, embeds, (sequence > 0).long(), sequence_positions(sequence), sequence
    )
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 8, 8)
    real = (sequence > 0)[:, None, :, None]
    assert not (mask & cross(sequence) & real).any()
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    same = ~cross(sequence) & real & (sequence > 0)[:, None, None, :]
    assert torch.equal(mask & real, causal & same)


def test_positions_restart_per_sequence() -> None:
    _, sequence = packed_modality()
    assert sequence_positions(sequence).tolist() == [
        [0, 1, 2, 3, 0, 1, 2, 0],
        [0, 0, 1, 2, 3, 4, 0, 1],
    ]


# ----------------------------------------------------------------------------- the plan

LENGTHS = [300, 40, 2100, 900, 520, 60, 1300, 270, 280, 33, 1700, 500] * 5


def test_plan_is_whole_conversations_within_capacity_and_deterministic() -> None:
    rows = pack_epoch(LENGTHS, 2048, seed=3, epoch=0)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(LENGTHS)))  # every sample exactly once, none split
    for row in rows:
        assert len(row) == 1 or sum(LENGTHS[i] for i in row) <= 2048  # over-long ones alone
    assert pack_epoch(LENGTHS, 2048, seed=3, epoch=0) == rows
    assert pack_epoch(LENGTHS, 2048, seed=3, epoch=1) != rows
    assert len(rows) < len(LENGTHS) / 2  # packing actually fills rows


def test_first_fit_decreasing_fills_the_first_row_with_room() -> None:
    assert first_fit_decreasing([0, 1, 2, 3], [5, 7, 3, 4], 10) == [[1, 2], [0, 3]]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_rows_of_equal_count(world: int) -> None:
    shards = [PackedRowSampler(LENGTHS, 2048, 7, rank, world) for rank in range(world)]
    for epoch in (0, 1):
        for sampler in shards:
            sampler.set_epoch(epoch)
        assert len({len(s) for s in shards}) == 1
        seen = [i for s in shards for row in s for i in row]
        assert len(seen) == len(set(seen))


def test_grouped_batches_keep_modalities_apart_and_similar_lengths() -> None:
    lengths = [10 + (i * 37) % 500 for i in range(103)]
    has_images = [i % 3 != 0 for i in range(103)]
    batches = grouped_batches(lengths, has_images, 4, 1, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == sorted(set(i for b in batches for i in b))
    assert len(batches) == 103 // 4  # only the mixed leftover's remainder is dropped
    pure = [b for b in batches if len({has_images[i] for i in b}) == 1]
    assert len(pure) >= len(batches) - 1  # at most one mixed leftover batch
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread < len(batches) * 60  # sorted within mega-batches: near-equal lengths
    assert grouped_batches(lengths, has_images, 4, 1, seed=0, epoch=1) != batches


def test_grouped_sampler_ranks_run_the_same_number_of_batches() -> None:
    lengths = [10 + (i * 37) % 500 for i in range(50)]
    has_images = [i % 2 == 0 for i in range(50)]
    shards = [LengthGroupedSampler(lengths, has_images, 4, 0, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) and len(shards[0]) % 4 == 0
    assert not set(shards[0]) & set(shards[1])


def test_packing_with_grouping_is_refused_naming_both_fields(shapes: Path) -> None:
    tree = {
        "model": {
            "language_model": str(shapes / "models/lm"),
            "vision": {"kind": "clip", "path": str(shapes / "models/vision")},
        },
        "data": {"packing": True, "group_by_length": True},
    }
    with pytest.raises(ConfigError) as err:
        validate_config(tree)
    message = str(err.value)
    assert "data" in message and "packing" in message and "group_by_length" in message


def test_benchmark_reports_equal_losses_and_less_padding_when_packed() -> None:
    from dsvl_cli.bench.packing import main

    argv = ["--samples", "8", "--hidden", "64", "--layers", "1", "--batch", "4"]
    unpacked, packed = main(argv)
    assert packed.mean_loss == pytest.approx(unpacked.mean_loss, rel=1e-5)
    assert packed.padding_fraction < unpacked.padding_fraction


def test_an_over_long_sample_is_planned_small_and_counted_as_skipped(shapes: Path) -> None:
    from dataclasses import replace

    from dsvl_cli.data.packing import encoded_lengths

    built, config = build(shapes, True)
    plain, convs = SampleEncoder.from_built(built, config), conversations()
    full = [len(plain.encode(c).input_ids) for c in convs]  # type: ignore[union-attr]
    limit = max(full[1:])
    assert full[0] > limit  # "a" (two images) is the longest: too long under `limit`
    encoder = replace(plain, max_seq_len=limit)
    lengths = encoded_lengths(convs, encoder)
    assert lengths[0] == 1 and lengths[1:] == full[1:]
    items = [encoder.sample(c, shapes) for c in convs]
    batch = PackedCollator(built.tokenizer.pad_token_id)([items])
    assert batch.skipped == [("a", "too_long")] and batch.ids == ["b", "c", "d"]


def test_worker_loaders_prefetch_and_pin_on_cuda() -> None:
    from dsvl_cli.data.dataset import PREFETCH_FACTOR, make_loader

    def loader(workers: int) -> torch.utils.data.DataLoader:
        return make_loader(
            list(range(8)), batch_size=2, collate_fn=list, shuffle=True, seed=0,
            workers=workers, drop_last=True,
        )  # fmt: skip

    assert loader(2).prefetch_factor == PREFETCH_FACTOR > 2  # deeper than torch's default
    assert loader(0).prefetch_factor is None  # no workers: nothing to prefetch
    assert loader(2).pin_memory == torch.cuda.is_available()
