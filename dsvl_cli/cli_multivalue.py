"""Options that take several values after one flag: `dsvl chat --images a.png b.png`.

Click (and so Typer) options take a fixed number of values; `nargs=-1` is for arguments only.
`MultiValueCommand` rewrites the command line before click parses it, so

    --images a.png b.png --prompt "..."     becomes     --images a.png --images b.png --prompt "..."

and the option stays an ordinary repeatable list option (repeating `--images` still works). The
values after the flag end at the next token that starts with `-`, at `--`, or at an existing
folder (an image is a file; a folder after the images is the MODEL argument). A value that
starts with `-` is written `--images=-odd.png`. Only public click API is used (`parse_args`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import click
from typer.core import TyperCommand


def _ends_values(token: str) -> bool:
    return token.startswith("-") or Path(token).is_dir()


def expand_multi_values(args: list[str], flags: Iterable[str]) -> list[str]:
    """Repeat each of `flags` before every extra value that follows it (see module docstring)."""
    flags = set(flags)
    out: list[str] = []
    taking: str | None = None  # the flag whose values are being read
    tokens = iter(args)
    for token in tokens:
        if token == "--":
            out += [token, *tokens]
            break
        if taking is not None and not _ends_values(token):
            out += [taking, token]
            continue
        taking = None
        name = token.split("=", 1)[0]
        out.append(token)
        if name in flags:
            taking = name
            if "=" not in token:  # the first value belongs to the flag whatever it looks like
                first = next(tokens, None)
                if first is not None:
                    out.append(first)
    return out


class MultiValueCommand(TyperCommand):
    """A Typer command whose `multi_value_flags` accept several values after one flag."""

    multi_value_flags: ClassVar[tuple[str, ...]] = ()

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Expand the multi-value flags, then parse as usual."""
        return super().parse_args(ctx, expand_multi_values(args, self.multi_value_flags))


class ImagesCommand(MultiValueCommand):
    """`--images A.png B.png ...`: several image paths after one flag."""

    multi_value_flags: ClassVar[tuple[str, ...]] = ("--images",)
