"""`dsvl prepare-data`: raw datasets -> prepared JSONL, a manifest, and a report of every drop.

For each source: check the expected layout (missing files come with their download hint), run the
adapter once (the one-time merges the original did inside Dataset constructors), open every
referenced image once to drop unreadable ones (on `workers` processes, see image_check.py), and
write `OUT/<source>.jsonl` atomically. A source that keeps nothing is an error (DataError naming
the source, its input and the top drop reasons), not an empty success: it almost always means
the wrong file or layout. Progress shows as a bar on a terminal and as log lines otherwise.

Idempotent: the manifest records, per source, a fingerprint of its inputs (paths, sizes, mtimes)
and of the settings (seed, max images, image check). Re-running with the same fingerprint does
nothing; a changed input or setting re-prepares that source only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dsvl_cli.data.conversation import Conversation, write_jsonl
from dsvl_cli.data.image_check import check_paths, check_workers, default_workers
from dsvl_cli.data.json_files import read_json
from dsvl_cli.data.sources import SourceContext, get_source
from dsvl_cli.errors import DataError
from dsvl_cli.log import console, get_logger

log = get_logger(__name__)
PREPARE_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
TOP_REASONS = 3  # drop reasons named in the "kept nothing" error
PLAIN_STEPS = 10  # without a terminal, one progress log line per tenth done


@dataclass
class SourceResult:
    """What preparing one source produced."""

    name: str
    kept: int
    drops: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    skipped_up_to_date: bool = False


@dataclass
class PrepareOptions:
    """Inputs of one prepare-data run (the CLI's flags)."""

    data_path: Path | None
    out: Path
    seed: int = 0
    max_images: int = 8
    check_images: bool = True
    files: list[Path] = field(default_factory=list)
    image_root: Path | None = None
    workers: int = field(default_factory=default_workers)


def _progress() -> Progress:
    """A rich progress display on a terminal; disabled (prints nothing) otherwise."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def _advancer(progress: Progress, description: str, total: int) -> Callable[[int], None]:
    """A callback that advances a bar on a terminal, or logs each tenth done otherwise."""
    if not progress.disable:
        task = progress.add_task(description, total=total)
        return lambda n: progress.advance(task, n)
    done, step = [0], max(1, -(-total // PLAIN_STEPS))

    def advance(n: int) -> None:
        before, done[0] = done[0], done[0] + n
        if done[0] // step > before // step or done[0] == total:
            log.info("%s: %d/%d", description, done[0], total)

    return advance


def _stat(path: Path) -> dict[str, Any]:
    info = path.stat()
    return {"path": str(path), "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _fingerprint(name: str, opts: PrepareOptions) -> tuple[str, list[dict[str, Any]]]:
    """Hash of the source's inputs and the settings that shape its output."""
    source = get_source(name)
    data_path = Path(opts.data_path or ".").absolute()
    inputs = [
        _stat(data_path / req.path) for req in source.required if (data_path / req.path).exists()
    ]
    inputs += [_stat(Path(f).absolute()) for f in opts.files]
    settings = [
        PREPARE_VERSION,
        opts.seed,
        opts.max_images,
        opts.check_images,
        str(opts.image_root),
    ]
    blob = json.dumps([name, settings, inputs], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16], inputs


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except DataError as err:
        log.warning("%s; preparing everything again", err)
        return {}
    return data if isinstance(data, dict) else {}


def _needs_input_flag(name: str, opts: PrepareOptions) -> str | None:
    """What `name` lacks when neither --data-path nor --file was given, or None."""
    source = get_source(name)
    if opts.data_path is not None or (opts.files and not source.required):
        return None
    if not source.check(_context(name, opts)):
        return None  # the raw layout is in the current folder
    if not source.required:
        return f"{name} needs --file FILE, its input JSON or JSONL (repeat --file for several)"
    paths = [req.path + ("/" if req.kind == "dir" else "") for req in source.required]
    shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
    return f"{name} needs --data-path DIR, the folder that holds its raw files ({shown})"


def _check_layout(names: list[str], opts: PrepareOptions) -> None:
    """One DataError listing every missing input of every source, with download hints."""
    flags = [msg for name in names if (msg := _needs_input_flag(name, opts)) is not None]
    if flags:
        raise DataError("prepare-data: " + "; ".join(flags))
    problems: list[str] = []
    for name in names:
        ctx = _context(name, opts)
        problems += [f"{name}: {msg}" for msg in get_source(name).check(ctx)]
    if problems:
        under = f" under {opts.data_path}" if opts.data_path is not None else ""
        raise DataError(f"{len(problems)} input(s) missing{under}:\n  " + "\n  ".join(problems))


def _context(name: str, opts: PrepareOptions) -> SourceContext:
    return SourceContext(
        data_path=Path(opts.data_path or "."),
        image_out=opts.out / "images",
        rng=random.Random(f"{opts.seed}:{name}"),
        max_images=opts.max_images,
        files=list(opts.files),
        image_root=opts.image_root,
    )


def _image_path(conv_image: str, out: Path) -> Path:
    path = Path(conv_image)
    return path if path.is_absolute() else out / path


def _drop_bad_images(
    convs: list[Conversation], result: SourceResult, opts: PrepareOptions, progress: Progress
) -> list[Conversation]:
    """Decode each distinct image once (`opts.workers` processes); drop samples with a bad one."""
    unique = sorted({_image_path(p, opts.out) for c in convs for p in c.images})
    advance = _advancer(progress, f"{result.name}: checking images", len(unique))
    reasons = check_paths(unique, opts.workers, advance)
    failures = {p: str(r) for p, r in zip(unique, reasons, strict=True) if r is not None}
    kept = []
    for conv in convs:
        bad = [
            failures[p] for p in (_image_path(i, opts.out) for i in conv.images) if p in failures
        ]
        if bad:
            reason = f"image_{bad[0]}"
            result.drops[reason] += 1
            result.examples.setdefault(reason, [])
            if len(result.examples[reason]) < 5:
                result.examples[reason].append(conv.id)
        else:
            kept.append(conv)
    return kept


def _prepare_source(name: str, opts: PrepareOptions, progress: Progress) -> SourceResult:
    ctx = _context(name, opts)
    task = progress.add_task(f"{name}: reading", total=None)
    convs = []
    for conv in get_source(name).load(ctx):
        convs.append(conv)
        progress.advance(task)
    result = SourceResult(name, kept=0, drops=Counter(ctx.drops), examples=dict(ctx.drop_examples))
    log.info("%s: %d sample(s) read, %d record(s) dropped", name, len(convs), ctx.drops.total())
    if opts.check_images:
        convs = _drop_bad_images(convs, result, opts, progress)
    tmp = opts.out / f".{name}.jsonl.tmp"
    write_jsonl(tmp, convs)
    os.replace(tmp, opts.out / f"{name}.jsonl")  # a crash never leaves a half file in place
    result.kept = len(convs)
    return result


def prepare_data(names: list[str], opts: PrepareOptions) -> list[SourceResult]:
    """Prepare each named source into `opts.out`; returns per-source results (also on disk).

    Raises DataError (after writing the manifest and report) if a source kept nothing.
    """
    names = list(dict.fromkeys(names))
    for name in names:
        get_source(name)  # unknown names fail before any work, with a suggestion
    check_workers(opts.workers)
    _check_layout(names, opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    manifest = _read_json(opts.out / MANIFEST)
    report = _read_json(opts.out / REPORT)
    manifest.setdefault("sources", {})
    results, empty = [], []
    with _progress() as progress:
        for name in names:
            digest, inputs = _fingerprint(name, opts)
            entry = manifest["sources"].get(name, {})
            fresh = entry.get("fingerprint") == digest and entry.get("count")
            if fresh and (opts.out / f"{name}.jsonl").is_file():
                results.append(SourceResult(name, entry["count"], skipped_up_to_date=True))
                continue
            result = _prepare_source(name, opts, progress)
            results.append(result)
            report[name] = {
                "kept": result.kept,
                "dropped": dict(sorted(result.drops.items())),
                "examples": result.examples,
            }
            if result.kept:
                manifest["sources"][name] = _manifest_entry(result, digest, inputs, opts)
            else:  # never recorded as prepared: the next run tries again
                manifest["sources"].pop(name, None)
                empty.append(_kept_nothing(result, opts))
    manifest["version"] = PREPARE_VERSION
    _write_json(opts.out / MANIFEST, manifest)
    _write_json(opts.out / REPORT, report)
    if empty:
        raise DataError("; ".join(empty))
    return results


def _manifest_entry(
    result: SourceResult, digest: str, inputs: list[dict[str, Any]], opts: PrepareOptions
) -> dict[str, Any]:
    return {
        "file": f"{result.name}.jsonl",
        "count": result.kept,
        "fingerprint": digest,
        "inputs": inputs,
        "seed": opts.seed,
        "max_images": opts.max_images,
        "images_checked": opts.check_images,
    }


def _kept_nothing(result: SourceResult, opts: PrepareOptions) -> str:
    """One line: the source, the file(s) it read, and its top drop reasons."""
    source = get_source(result.name)
    data_path = Path(opts.data_path or ".")
    if source.required:
        files = [data_path / req.path for req in source.required if req.kind == "file"]
    else:
        files = [Path(f) for f in opts.files] or [data_path]
    shown = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    if result.drops:
        top = ", ".join(f"{k} {v}" for k, v in result.drops.most_common(TOP_REASONS))
        why = f"dropped {sum(result.drops.values())} ({top}"
        why += ", ...)" if len(result.drops) > TOP_REASONS else ")"
    else:
        why = "it holds no records"
    return f"{result.name}: kept 0 samples from {shown}: {why}; details in {opts.out / REPORT}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
