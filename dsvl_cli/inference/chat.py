"""`dsvl chat`: an interactive REPL over a `ChatSession`, plus one-shot and piped use.

Three ways in (`run_chat`):

* ``--prompt "..."``: one turn (the ``--images`` attach to it); prints only the answer.
* stdin not a terminal: every non-empty line is a turn (commands work too); prints only the
  answers, one per line; a bad line prints one error line on stderr and the rest go on.
* a terminal: the REPL. Replies stream word by word. ``--images`` attach to the first question;
  ``/image PATH ...`` attaches images to the next question (numbering continues across the
  conversation: the banner of each attach says which `### Image k:` it becomes).

Commands: ``/image PATH ...``, ``/clear``, ``/save FILE``, ``/help``, ``/quit`` (or Ctrl-D).
Arguments are split like a shell line, so quote paths with spaces. A question that starts with
``/`` is typed with two (``//etc is a folder`` asks "/etc is a folder"). Bad input (unreadable
image, too many images, unknown command, full context) prints one line; the session goes on.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.markup import escape

from dsvl_cli.data.image_refs import resolve_image_ref
from dsvl_cli.data.images import load_image
from dsvl_cli.errors import DsvlError
from dsvl_cli.inference.generation import GenerationSettings
from dsvl_cli.inference.session import ChatSession, Overflow, Reply
from dsvl_cli.log import console as stderr_console
from dsvl_cli.log import get_logger

log = get_logger(__name__)

HELP = (
    "/image PATH ...  attach images to the next question\n"
    "/clear           start a new conversation\n"
    "/save FILE       write the transcript (JSON, with image paths)\n"
    "/help            this list\n"
    "/quit            leave (or Ctrl-D)"
)


class ChatRepl:
    """Commands and turns for one `ChatSession`, printing to rich consoles.

    Args:
        session: the conversation.
        out: where answers (and, interactively, everything else) go.
        err: where error lines go.
        interactive: stream replies and show prompts, banners and notes; otherwise print only
            answers, one per line.
        model_folder: recorded in saved transcripts.
    """

    def __init__(
        self,
        session: ChatSession,
        out: Console,
        err: Console,
        interactive: bool,
        model_folder: Path | None = None,
    ) -> None:
        self.session = session
        self.out = out
        self.err = err
        self.interactive = interactive
        self.model_folder = model_folder
        self.pending: list[str] = []
        self.errors = 0

    # ------------------------------------------------------------------ output

    def error(self, message: str) -> None:
        self.errors += 1
        self.err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        if self.interactive:
            self.out.print(f"[dim]{escape(message)}[/]", highlight=False, soft_wrap=True)

    def banner(self) -> None:
        s = self.session
        limits = f"context {s.max_context or 'unlimited'} tokens, "
        limits += f"at most {s.max_images or 'any number of'} images per conversation"
        self.out.print(
            f"[bold]dsvl chat[/] {escape(str(self.model_folder or ''))}", highlight=False
        )
        self.out.print(f"generation: {s.settings.describe()}", highlight=False)
        self.out.print(f"{limits}; overflow: {s.overflow}", highlight=False)
        hint = "type a question; /help lists commands, /quit or Ctrl-D leaves"
        self.out.print(hint, style="dim", highlight=False)

    # ------------------------------------------------------------------ actions

    def attach(self, paths: Sequence[str | Path]) -> bool:
        """Check images, queue them (absolute paths) for the next question; False if one is bad."""
        try:
            self.session.check_images(len(self.pending) + len(paths))
            files = [str(resolve_image_ref(str(p), Path.cwd())) for p in paths]
            for file in files:
                load_image(file)
        except DsvlError as err:
            self.error(str(err))
            return False
        first = len(self.session.images) + len(self.pending) + 1
        self.pending += files
        for k, file in enumerate(files, start=first):
            self.note(f"image {k}: {file}")
        return True

    def ask(self, question: str) -> Reply | None:
        """One turn with the pending images; prints the answer (streamed when interactive)."""
        stream = self._stream if self.interactive else None
        try:
            reply = self.session.ask(question, self.pending, on_text=stream)
        except DsvlError as err:
            self.error(str(err))
            return None
        except KeyboardInterrupt:
            self.out.print()
            self.error("interrupted; this question was not added to the conversation")
            return None
        self.pending = []
        if not self.interactive:
            self.out.print(reply.text, markup=False, highlight=False, soft_wrap=True)
            return reply
        self.out.print()
        if reply.dropped_rounds:
            self.note(
                f"(dropped the {reply.dropped_rounds} oldest round(s) to fit the context; "
                "the remaining images are numbered from 1)"
            )
        if reply.finish_reason == "length":
            self.note(f"(answer cut at {self.session.settings.max_new_tokens} new tokens)")
        return reply

    def _stream(self, piece: str) -> None:
        self.out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        try:
            name, *args = shlex.split(line)
        except ValueError as err:
            self.error(f"cannot read {line!r}: {err}")
            return True
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.out.print(HELP, markup=False, highlight=False)
        elif name == "/clear":
            self.session.clear()
            self.pending = []
            self.note("(new conversation)")
        elif name == "/image" and args:
            self.attach(args)
        elif name == "/save" and len(args) == 1:
            self._save(args[0])
        elif name in ("/image", "/save"):
            self.error(f"usage: {'/image PATH ...' if name == '/image' else '/save FILE'}")
        else:
            self.error(f"unknown command {name}; /help lists commands")
        return True

    def _save(self, file: str) -> None:
        try:
            path = self.session.save(file, self.model_folder)
        except DsvlError as err:
            self.error(str(err))
            return
        self.note(f"(saved {len(self.session.rounds)} round(s) to {path})")

    def handle(self, line: str) -> bool:
        """One input line: a command, a question, or nothing. False means leave."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/") and not line.startswith("//"):
            return self.command(line)
        self.ask(line[1:] if line.startswith("//") else line)
        return True

    def run(self, read_line: Callable[[], str]) -> int:
        """Read and handle lines until /quit or end of input.

        Returns 0, or 1 when not interactive and a line failed (scripts can tell).
        """
        while True:
            try:
                line = read_line()
            except EOFError:
                if self.interactive:
                    self.out.print()
                return self.exit_code
            except KeyboardInterrupt:
                self.out.print()
                self.note("(use /quit or Ctrl-D to leave)")
                continue
            if not self.handle(line):
                return self.exit_code

    @property
    def exit_code(self) -> int:
        return 1 if self.errors and not self.interactive else 0


def _stdin_reader(stream: TextIO) -> Callable[[], str]:
    def read() -> str:
        line = stream.readline()
        if not line:
            raise EOFError
        return line

    return read


def _prompt_reader(console: Console) -> Callable[[], str]:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()

    def read() -> str:
        return console.input("[bold green]>>>[/] ")

    return read


def run_chat(
    model: Path,
    images: Sequence[Path] = (),
    prompt: str | None = None,
    settings: GenerationSettings | None = None,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    overflow: Overflow = "error",
    max_context: int | None = None,
    stdin: TextIO | None = None,
    out: Console | None = None,
    err: Console | None = None,
    base_lm: Path | None = None,
    base_vision: Path | None = None,
) -> int:
    """`dsvl chat MODEL`: load the model, then one turn, piped turns, or the REPL.

    `base_lm` / `base_vision` point an export at its base models on this machine (see
    `load_for_inference`). Returns the exit code: 0, or 1 when a piped line failed. With
    `prompt`, a bad image or a full context raises DsvlError (the CLI prints it and exits 2).
    """
    from dsvl_cli.inference.loader import load_for_inference

    stdin = stdin or sys.stdin
    out = out or Console(soft_wrap=True)
    interactive = prompt is None and stdin.isatty()
    loaded = load_for_inference(
        model, device, dtype, device_map, base_lm=base_lm, base_vision=base_vision
    )
    session = ChatSession.from_loaded(loaded, settings, overflow=overflow, max_context=max_context)
    if prompt is not None:
        reply = session.ask(prompt, [str(p) for p in images])
        out.print(reply.text, markup=False, highlight=False, soft_wrap=True)
        return 0
    err = err or (out if interactive else stderr_console)
    repl = ChatRepl(session, out, err, interactive, model_folder=Path(model))
    if interactive:
        repl.banner()
    if images and not repl.attach(list(images)) and not interactive:
        return 1
    reader = _prompt_reader(out) if interactive else _stdin_reader(stdin)
    return repl.run(reader)
