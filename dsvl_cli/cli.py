"""The `dsvl` command: a thin Typer shell; each command parses, then calls one library function.

Heavy imports (torch, transformers, deepspeed) happen inside commands so `dsvl --help` is fast.
`DsvlError` and its subclasses end the program with one red line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from dsvl_cli import __version__
from dsvl_cli.errors import DsvlError
from dsvl_cli.log import console, setup_logging

stdout = Console(soft_wrap=True)  # results go to stdout; logs and errors to stderr

app = typer.Typer(
    name="dsvl",
    help="Train vision-language chat models on multi-image, multi-round conversations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"dsvl {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    setup_logging("DEBUG" if verbose else "INFO")


@app.command("env")
def env_cmd() -> None:
    """Print versions and hardware facts for a bug report."""
    from dsvl_cli.tools.env import collect_env, render_env

    render_env(collect_env(), stdout)


@app.command("prepare-data")
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
    num: int = typer.Option(2000, "--num", help="synthetic: number of conversations."),
    show: int = typer.Option(0, "--show", help="Print N rendered samples per source."),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="LM folder: --show highlights the exact supervised tokens."
    ),
) -> None:
    """Validate raw datasets and write prepared JSONL, or generate the synthetic task."""
    if sources == ["synthetic"]:
        from dsvl_cli.data.synthetic import generate_synthetic

        manifest = generate_synthetic(out, num=num, seed=seed)
        counts = manifest["counts"]
        stdout.print(
            f"synthetic: {counts['train']} train + {counts['eval']} eval conversations, "
            f"{counts['images']} images, base models in {out / 'models'}",
            highlight=False,
        )
        _show(out / "train.jsonl", show, tokenizer or out / "models" / "lm")
        return
    from dsvl_cli.data.prepare import PrepareOptions, prepare_data

    opts = PrepareOptions(data_path, out, seed, max_images, check_images, files or [], image_root)
    results = prepare_data(sources, opts)
    _print_prepare_results(results)
    for result in results:
        _show(out / f"{result.name}.jsonl", show, tokenizer)


def _show(jsonl: Path, count: int, tokenizer: Path | None) -> None:
    if count > 0:
        from dsvl_cli.data.show import show_samples

        show_samples(jsonl, count, stdout, tokenizer)


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


@app.command("train")
def train_cmd(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/tiny.yaml."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides: optim.lr=2e-4 ..."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate and print the resolved config; load no weights."
    ),
) -> None:
    """Train a model from a recipe (DeepSpeed underneath)."""
    from dsvl_cli.config import dump_config, load_config

    config = load_config(recipe, overrides or [])
    if dry_run:
        stdout.print(dump_config(config), highlight=False, markup=False)
        return
    from dsvl_cli.errors import ConfigError

    raise ConfigError("training is not available in this build; use --dry-run")


def main() -> None:
    """Console-script entry point: run the app, turning DsvlError into one line + exit 2."""
    try:
        app(prog_name="dsvl")
    except DsvlError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
