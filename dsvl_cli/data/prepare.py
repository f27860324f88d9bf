"""`dsvl prepare-data`: raw datasets -> prepared JSONL, a manifest, and a report of every drop.

For each source: check the expected layout (missing files come with their download hint), run the
adapter once (the one-time merges the original did inside Dataset constructors), open every
referenced image once to drop unreadable ones, and write `OUT/<source>.jsonl` atomically.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dsvl_cli.data.conversation import Conversation, write_jsonl
from dsvl_cli.data.images import check_image
from dsvl_cli.data.sources import SourceContext, get_source
from dsvl_cli.errors import DataError
from dsvl_cli.log import console, get_logger

log = get_logger(__name__)
PREPARE_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"


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
    workers: int = max(1, min(8, os.cpu_count() or 1))


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


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
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; preparing everything again", path)
        return {}


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
    """Open every distinct image once (in threads); drop conversations with a failing one."""
    unique = sorted({_image_path(p, opts.out) for c in convs for p in c.images})
    task = progress.add_task(f"{result.name}: checking images", total=len(unique))
    failures: dict[Path, str] = {}
    with ThreadPoolExecutor(max_workers=opts.workers) as pool:
        for path, failure in zip(unique, pool.map(check_image, unique), strict=True):
            if failure is not None:
                failures[path] = str(failure)
            progress.advance(task)
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
    if opts.check_images:
        convs = _drop_bad_images(convs, result, opts, progress)
    tmp = opts.out / f".{name}.jsonl.tmp"
    write_jsonl(tmp, convs)
    os.replace(tmp, opts.out / f"{name}.jsonl")  # a crash never leaves a half file in place
    result.kept = len(convs)
    return result


def prepare_data(names: list[str], opts: PrepareOptions) -> list[SourceResult]:
    """Prepare each named source into `opts.out`; returns per-source results (also on disk)."""
    names = list(dict.fromkeys(names))
    for name in names:
        get_source(name)  # unknown names fail before any work, with a suggestion
    _check_layout(names, opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    manifest = _read_json(opts.out / MANIFEST)
    report = _read_json(opts.out / REPORT)
    manifest.setdefault("sources", {})
    results = []
    with _progress() as progress:
        for name in names:
            digest, inputs = _fingerprint(name, opts)
            entry = manifest["sources"].get(name, {})
            if entry.get("fingerprint") == digest and (opts.out / f"{name}.jsonl").is_file():
                results.append(SourceResult(name, entry["count"], skipped_up_to_date=True))
                continue
            result = _prepare_source(name, opts, progress)
            results.append(result)
            manifest["sources"][name] = {
                "file": f"{name}.jsonl",
                "count": result.kept,
                "fingerprint": digest,
                "inputs": inputs,
                "seed": opts.seed,
                "max_images": opts.max_images,
                "images_checked": opts.check_images,
            }
            report[name] = {
                "kept": result.kept,
                "dropped": dict(sorted(result.drops.items())),
                "examples": result.examples,
            }
    manifest["version"] = PREPARE_VERSION
    _write_json(opts.out / MANIFEST, manifest)
    _write_json(opts.out / REPORT, report)
    return results


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
