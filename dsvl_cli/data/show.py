"""`prepare-data --show N`: print rendered samples with the supervised tokens highlighted.

With a tokenizer the highlighting is exact (the same template code training uses); without
one, the rendered text is shown plain.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from rich.console import Console
from rich.text import Text

from dsvl_cli.data.conversation import read_jsonl
from dsvl_cli.data.template import IMAGE_TOKEN, render_supervision, render_text

SHOWN_IMAGE_TOKENS = 1  # each image run is shown as one <image>


def show_samples(jsonl: Path, count: int, console: Console, tokenizer_path: Path | None) -> None:
    """Print the first `count` conversations of a prepared file, supervised text in green."""
    tokenizer = None
    if tokenizer_path is not None:
        from dsvl_cli.model.builder import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer_path))
    for conv in islice(read_jsonl(jsonl), count):
        console.rule(f"{conv.id}  ({conv.num_images} image(s))", style="cyan")
        for k, path in enumerate(conv.images, start=1):
            console.print(f"  image {k}: {path}", style="dim", highlight=False)
        if tokenizer is None:
            console.print(render_text(conv), highlight=False, markup=False)
            continue
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        pieces = render_supervision(conv, tokenizer, image_id, SHOWN_IMAGE_TOKENS)
        if not isinstance(pieces, list):
            console.print(f"[yellow]skipped at training time: {pieces.reason}[/]")
            continue
        text = Text()
        for piece, supervised in pieces:
            text.append(piece, style="bold green" if supervised else "dim")
        console.print(text)
    if tokenizer is None:
        console.print("[dim]pass --tokenizer LM_FOLDER to highlight the supervised tokens[/]")
