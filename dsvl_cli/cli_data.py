"""`dsvl prepare-data`: validate raw datasets into prepared JSONL, or generate the synthetic task.

Registered on the main app in dsvl_cli/cli.py; the library side is dsvl_cli/data/.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

stdout = Console(soft_wrap=True)  # results go to stdout; logs and errors to stderr


def prepare_data_cmd(
    sources: list[str] = typer.Argument(
        ..., help="Dataset names (llava llava_dial ... llava_json messages) or synthetic."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder for prepared JSONL + manifest."),
    data_path: Path | None = typer.Option(None, "--data-path", help="Root of the raw datasets."),
    files: list[Path] = typer.Option(
        None, "--file", help="Input file for llava_json / messages (repeatable)."
    ),
    image_root: Path | None = typer.Option(
        None, "--image-root", help="Folder relative image paths of --file inputs start from."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for every random choice."),
    max_images: int = typer.Option(8, "--max-images", help="Drop samples with more images."),
    check_images: bool = typer.Option(
        True, "--check-images/--no-check-images", help="Open every image once; drop bad ones."
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="Processes that check images (default: every core)."
    ),
    num: int = typer.Option(2000, "--num", help="synthetic: number of conversations."),
    show: int = typer.Option(0, "--show", help="Print N rendered samples per source."),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="LM folder: --show highlights the exact supervised tokens."
    ),
) -> None:
    """Validate raw datasets and write prepared JSONL, or generate the synthetic task."""
    if sources == ["synthetic"]:
        from dsvl_cli.demo.synthetic import generate_synthetic

        manifest = generate_synthetic(out, num=num, seed=seed)
        counts = manifest["counts"]
        stdout.print(
            f"synthetic: {counts['train']} train + {counts['eval']} eval conversations, "
            f"{counts['images']} images, base models in {out / 'models'}",
            highlight=False,
        )
        _show(out / "train.jsonl", show, tokenizer or out / "models" / "lm")
        return
    from dsvl_cli.data.image_check import default_workers
    from dsvl_cli.data.prepare import PrepareOptions, prepare_data

    opts = PrepareOptions(
        data_path,
        out,
        seed,
        max_images,
        check_images,
        files or [],
        image_root,
        workers=default_workers() if workers is None else workers,
    )
    results = prepare_data(sources, opts)
    _print_prepare_results(results)
    for result in results:
        _show(out / f"{result.name}.jsonl", show, tokenizer)


def _show(jsonl: Path, count: int, tokenizer: Path | None) -> None:
    if count > 0:
        from dsvl_cli.data.encoder import SampleEncoder
        from dsvl_cli.data.show import show_samples

        encoder = None
        if tokenizer is not None:
            from dsvl_cli.model.builder import load_tokenizer

            encoder = SampleEncoder.for_text(load_tokenizer(str(tokenizer)))
        show_samples(jsonl, count, stdout, encoder)


def _print_prepare_results(results: list) -> None:
    from rich.table import Table

    table = Table(title="prepared data")
    for column in ("source", "kept", "dropped", "reasons"):
        table.add_column(column)
    for r in results:
        if r.skipped_up_to_date:
            table.add_row(r.name, str(r.kept), "-", "up to date (inputs unchanged)")
            continue
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(r.drops.items())) or "-"
        table.add_row(r.name, str(r.kept), str(sum(r.drops.values())), reasons)
    stdout.print(table)
