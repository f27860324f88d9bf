"""`prepare-data --show N`: print rendered samples with the supervised tokens highlighted.

With a tokenizer the highlighting is exact: the pieces come from `SampleEncoder.supervision`, the
same encoder call training makes. Without one, the rendered text is shown plain.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from rich.console import Console
from rich.text import Text

from dsvl_cli.data.conversation import Conversation, read_jsonl
from dsvl_cli.data.encoder import SampleEncoder
from dsvl_cli.data.template import render_text


def show_conversation(conv: Conversation, console: Console, encoder: SampleEncoder | None) -> None:
    """Print one conversation: its images, then its text (supervised pieces in green)."""
    console.rule(f"{conv.id}  ({conv.num_images} image(s))", style="cyan")
    for k, path in enumerate(conv.images, start=1):
        console.print(f"  image {k}: {path}", style="dim", highlight=False)
    if encoder is None:
        console.print(render_text(conv), highlight=False, markup=False)
        return
    pieces = encoder.supervision(conv)
    if not isinstance(pieces, list):
        console.print(f"[yellow]skipped at training time: {pieces.reason}[/]")
        return
    text = Text()
    for piece, supervised in pieces:
        text.append(piece, style="bold green" if supervised else "dim")
    console.print(text)


def show_samples(
    jsonl: Path, count: int, console: Console, encoder: SampleEncoder | None = None
) -> None:
    """Print the first `count` conversations of a prepared file, supervised text in green.

    `encoder` (a model's, or `SampleEncoder.for_text(tokenizer)`) gives the exact highlighting;
    without one the rendered text is shown plain.
    """
    for conv in islice(read_jsonl(jsonl), count):
        show_conversation(conv, console, encoder)
    if encoder is None:
        console.print("[dim]pass --tokenizer LM_FOLDER to highlight the supervised tokens[/]")
