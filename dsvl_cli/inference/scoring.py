"""Scores on prepared conversations: teacher-forced loss and perplexity, exact-match accuracy.

Loss uses the training path unchanged (`ConversationDataset` + `Collator` + the model's loss, with
the model's `max_seq_len`, `data.overlength`, `data.max_round_tokens` and image limit), summed
over supervised tokens and divided by their count; perplexity is exp(loss). Samples the template
or the image loader refuses are counted by reason, as in training.

Accuracy, for conversations whose `meta["answer"]` holds a reference (the synthetic task,
VQA-style data): the model answers the LAST question given every earlier round with its
reference answer, as in training; the prediction and the reference are normalised (whitespace
collapsed, lower case, trailing punctuation removed) and compared. Broken down by `meta["type"]`
(single / two_image / multi_round / caption for the synthetic task). Prompts are batched (sorted
by length, left-padded) and each batch is seeded with the settings' seed.

A sample that cannot be scored (refused by the template, too long to answer, an image that fails
to load) is a `SampleFailure` at stage "loss" or "accuracy", next to those found while reading
(`dsvl_cli.inference.prepared`); the other samples are scored as usual.

Outputs in `--out`: `metrics.json` (all numbers, settings, model, data, every failure) and
`predictions.jsonl` (one record per answered conversation with `error` null, then one per
failure with `error` set and no prediction).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from dsvl_cli import __version__
from dsvl_cli.data.collate import Collator
from dsvl_cli.data.conversation import Conversation
from dsvl_cli.data.dataset import ConversationDataset
from dsvl_cli.data.encoder import SampleEncoder
from dsvl_cli.data.image_refs import ImageRefError, image_failure
from dsvl_cli.data.images import ImageLoadError
from dsvl_cli.inference.generation import GenerationSettings
from dsvl_cli.inference.loader import LoadedModel
from dsvl_cli.inference.prepared import SampleFailure
from dsvl_cli.log import get_logger

log = get_logger(__name__)

MAX_LISTED = 5  # failures printed one by one; all are in the files
NO_TYPE = "all"  # the group of conversations without meta["type"]
_TRAILING_PUNCTUATION = ".,;:!?。"


def normalise(text: str) -> str:
    """Whitespace collapsed, lower case, trailing punctuation removed."""
    text = " ".join(text.split()).lower()
    return text.rstrip(_TRAILING_PUNCTUATION).rstrip()


def qtype(conv: Conversation) -> str:
    return str(conv.meta.get("type", NO_TYPE))


# ---------------------------------------------------------------------- loss


@torch.no_grad()
def _group_loss(
    loaded: LoadedModel, convs: Sequence[Conversation], root: Path, batch_size: int
) -> tuple[float, int, int, list[tuple[str, str]]]:
    """(loss sum, supervised tokens, samples used, (id, reason) of each skip) over `convs`."""
    collate = Collator(loaded.built.tokenizer.pad_token_id)
    data = ConversationDataset(convs, root, SampleEncoder.from_built(loaded.built, loaded.config))
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate)
    loss_sum, tokens, samples, skipped = 0.0, 0, 0, []
    for batch in loader:
        skipped += batch.skipped
        if batch.is_empty:
            continue
        batch = batch.to(loaded.device)
        out = loaded.model(
            input_ids=batch.input_ids,
            pixel_values=batch.pixel_values,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
        )
        loss_sum += float(out.loss_sum)
        tokens += int(out.num_tokens)
        samples += batch.size
    return loss_sum, tokens, samples, skipped


def _loss_entry(loss_sum: float, tokens: int, samples: int) -> dict[str, Any]:
    loss = loss_sum / tokens if tokens else None
    return {
        "samples": samples,
        "tokens": tokens,
        "loss": loss,
        "perplexity": None if loss is None else math.exp(min(loss, 700.0)),
    }


def loss_and_failures(
    loaded: LoadedModel, convs: Sequence[Conversation], root: Path, batch_size: int
) -> tuple[dict[str, Any], list[SampleFailure]]:
    """`teacher_forced_loss`, and a failure (stage "loss") for each sample it skipped."""
    groups: dict[str, list[Conversation]] = defaultdict(list)
    for conv in convs:
        groups[qtype(conv)].append(conv)
    total = [0.0, 0, 0]
    skipped: list[tuple[str, str]] = []
    by_type = {}
    for name in sorted(groups):
        loss_sum, tokens, samples, skips = _group_loss(loaded, groups[name], root, batch_size)
        by_type[name] = _loss_entry(loss_sum, tokens, samples)
        total = [total[0] + loss_sum, total[1] + tokens, total[2] + samples]
        skipped += skips
    overall = _loss_entry(total[0], total[1], total[2])
    counts = Counter(reason for _, reason in skipped)
    failures = [
        SampleFailure("loss", reason, f"sample {id_!r}: not scored for loss ({reason})", id_)
        for id_, reason in skipped
    ]
    return {**overall, "skipped": dict(counts), "by_type": by_type}, failures


def teacher_forced_loss(
    loaded: LoadedModel, convs: Sequence[Conversation], root: Path, batch_size: int
) -> dict[str, Any]:
    """Token-weighted loss and perplexity, overall and per question type, plus skip counts."""
    return loss_and_failures(loaded, convs, root, batch_size)[0]


# ---------------------------------------------------------------------- accuracy


def _prompt(
    loaded: LoadedModel, conv: Conversation, root: Path, encoder: SampleEncoder | None = None
) -> tuple[list[int], torch.Tensor]:
    """Ids of every round but the last answer, and all images [n, 3, H, W].

    Raises ImageRefError or ImageLoadError for an image that cannot be found or decoded.
    """
    encoder = encoder or SampleEncoder.from_built(loaded.built, loaded.config)
    return encoder.last_question(conv), encoder.pixels(conv.images, root)


def _left_pad(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def generate_batch(
    loaded: LoadedModel,
    prompts: Sequence[tuple[list[int], torch.Tensor]],
    settings: GenerationSettings,
) -> list[tuple[str, str]]:
    """Greedy or sampled answers for left-padded prompts: (text, finish reason) per prompt."""
    tok = loaded.built.tokenizer
    ids, mask = _left_pad([p[0] for p in prompts], tok.pad_token_id)
    pixels = [p[1] for p in prompts if p[1].shape[0]]
    kwargs: dict[str, Any] = {}
    if pixels:
        kwargs["pixel_values"] = torch.cat(pixels).to(loaded.device)
    torch.manual_seed(settings.seed)
    out = loaded.model.generate(
        input_ids=ids.to(loaded.device),
        attention_mask=mask.to(loaded.device),
        generation_config=settings.generation_config(tok),
        **kwargs,
    )
    results = []
    for row in out.sequences[:, ids.shape[1] :].tolist():
        finish = "eos" if tok.eos_token_id in row else "length"
        row = row[: row.index(tok.eos_token_id)] if finish == "eos" else row
        results.append((tok.decode(row, skip_special_tokens=True).strip(), finish))
    return results


def _scorable(conv: Conversation) -> bool:
    answer = conv.meta.get("answer")
    return (
        isinstance(answer, str)
        and len(conv.messages) >= 2
        and conv.messages[-1].role == "assistant"
    )


def _record(conv: Conversation, text: str, finish: str) -> dict[str, Any]:
    reference = conv.meta["answer"]
    return {
        "id": conv.id,
        "type": qtype(conv),
        "question": conv.messages[-2].content,
        "reference": reference,
        "prediction": text,
        "correct": normalise(text) == normalise(reference),
        "finish_reason": finish,
        "error": None,
    }


def exact_match(
    loaded: LoadedModel,
    convs: Sequence[Conversation],
    root: Path,
    batch_size: int,
    settings: GenerationSettings,
) -> tuple[list[dict[str, Any]], list[SampleFailure]]:
    """Predictions (in input order) for conversations with a reference, and the failures."""
    items, failed = [], []
    encoder = SampleEncoder.from_built(loaded.built, loaded.config)
    for index, conv in enumerate(convs):
        if not _scorable(conv):
            continue
        try:
            ids, pixels = _prompt(loaded, conv, root, encoder)
        except (ImageLoadError, ImageRefError) as err:
            failed.append(SampleFailure("accuracy", image_failure(err), str(err), conv.id))
            continue
        need = len(ids) + settings.max_new_tokens
        if need > loaded.max_context:
            error = (
                f"sample {conv.id!r}: prompt {len(ids)} tokens + --max-new-tokens "
                f"{settings.max_new_tokens} > context {loaded.max_context}"
            )
            failed.append(SampleFailure("accuracy", "too_long", error, conv.id))
            continue
        items.append((index, ids, pixels))
    items.sort(key=lambda item: len(item[1]))  # similar lengths together: less padding
    done: dict[int, dict[str, Any]] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        answers = generate_batch(loaded, [(ids, px) for _, ids, px in chunk], settings)
        for (index, _, _), (text, finish) in zip(chunk, answers, strict=True):
            done[index] = _record(convs[index], text, finish)
    return [done[i] for i in sorted(done)], failed


def accuracy(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall and per-type exact-match accuracy of prediction records."""

    def entry(rows: list[dict[str, Any]]) -> dict[str, Any]:
        correct = sum(r["correct"] for r in rows)
        return {
            "correct": correct,
            "total": len(rows),
            "accuracy": correct / len(rows) if rows else None,
        }

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["type"]].append(r)
    return {**entry(list(records)), "by_type": {k: entry(v) for k, v in sorted(groups.items())}}


# ---------------------------------------------------------------------- the command


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _summary_row(name: str, loss: dict[str, Any] | None, acc: dict[str, Any] | None) -> list[str]:
    loss = loss or {}
    match = "-"
    if acc and acc["total"]:
        match = f"{acc['accuracy']:.3f} ({acc['correct']}/{acc['total']})"
    return [
        name,
        str(loss.get("samples", 0)),
        _fmt(loss.get("loss")),
        _fmt(loss.get("perplexity"), 2),
        match,
    ]


def _print_failures(failures: Sequence[dict[str, Any]], console: Console) -> None:
    """How many samples were not scored, by reason, and the first few with their error."""
    counts = Counter(f"{f['reason']} ({f['stage']})" for f in failures)
    listed = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
    console.print(f"failed: {len(failures)} sample(s) not scored: {listed}", highlight=False)
    for f in failures[:MAX_LISTED]:
        console.print(f"  {f['error']}", highlight=False, soft_wrap=True)
    if len(failures) > MAX_LISTED:
        more = len(failures) - MAX_LISTED
        console.print(f"  and {more} more (all in metrics.json and predictions.jsonl)")


def print_summary(metrics: dict[str, Any], console: Console) -> None:
    """One row per question type and one for all: samples, loss, perplexity, accuracy."""
    table = Table(title=f"eval {Path(metrics['data']).name}")
    for column in ("type", "samples", "loss", "perplexity", "exact match"):
        table.add_column(column, justify="left" if column == "type" else "right")
    loss, acc = metrics["loss"], metrics["accuracy"] or {"by_type": {}}
    for name in sorted(set(loss["by_type"]) | set(acc["by_type"])):
        table.add_row(*_summary_row(name, loss["by_type"].get(name), acc["by_type"].get(name)))
    table.add_row(*_summary_row("all", loss, metrics["accuracy"]), style="bold")
    console.print(table)
    if metrics["failed_samples"]:
        _print_failures(metrics["failed_samples"], console)


def _write_outputs(
    metrics: dict[str, Any], records: list[dict[str, Any]], out: Path
) -> tuple[Path, Path]:
    """metrics.json, and predictions.jsonl: the answers, then one record per failure."""
    paths = out / "metrics.json", out / "predictions.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    paths[0].write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    with open(paths[1], "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        for f in metrics["failed_samples"]:
            fh.write(json.dumps({**f, "prediction": None, "correct": None}) + "\n")
    return paths


def score_prepared(
    loaded: LoadedModel,
    data: Path,
    convs: Sequence[Conversation],
    root: Path,
    out: Path,
    batch_size: int,
    settings: GenerationSettings,
    console: Console,
    failures: Sequence[SampleFailure] = (),
) -> dict[str, Any]:
    """Loss, perplexity and accuracy on `convs`; writes metrics.json + predictions.jsonl.

    `failures` are the samples that failed before scoring (`read_prepared`); the ones that fail
    here join them, and all are reported (`metrics["failures"]` counts them).
    """
    log.info("loss over %d conversation(s)", len(convs))
    loss, loss_failed = loss_and_failures(loaded, convs, root, batch_size)
    log.info("answers for the conversations with a reference")
    records, answer_failed = exact_match(loaded, convs, root, batch_size, settings)
    failed = [*failures, *loss_failed, *answer_failed]
    for f in failed:
        log.warning("not scored (%s): %s", f.stage, f.error)
    metrics = {
        "model": str(loaded.folder),
        "data": str(data),
        "image_root": str(root),
        "samples": len(convs) + sum(f.stage in ("read", "images") for f in failures),
        "conversations": len(convs),
        "dsvl_version": __version__,
        "generation": settings.to_dict(),
        "loss": loss,
        "accuracy": accuracy(records) if records else None,
        "accuracy_skipped": dict(Counter(f.reason for f in answer_failed)),
        "failures": len(failed),
        "failed_samples": [f.to_dict() for f in failed],
    }
    paths = _write_outputs(metrics, records, out)
    print_summary(metrics, console)
    console.print(f"results: {paths[0]}, {paths[1]}", highlight=False, soft_wrap=True)
    return metrics
