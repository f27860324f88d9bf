"""The training blend: which prepared conversations a run uses, the eval split, and grouping.

`load_blend(cfg, max_images)` reads every source's JSONL once and fixes, per source and for the
whole run (seeded by `data.seed` and the source name):

1. `samples: N` draws N **raw conversations** without replacement (`all` keeps every one). The
   original counted groups after concatenation; N here is what the file holds, before grouping.
2. The eval split: `floor(N * eval_fraction)` of those N go to eval, the rest to train, by a
   seeded shuffle done before any grouping, so an eval conversation never reaches train in any
   epoch. With `eval_file` set, all N go to train and eval is that file (relative paths are
   resolved against `prepared_dir`).

`Blend.train_split(epoch)` then groups each source's train conversations for one epoch
(`concat: k`): a shuffle seeded by (seed, source, epoch), then consecutive runs of 1..k
conversations (sizes uniform) become one multi-image, multi-round `Conversation`. A group is
closed early rather than exceed `max_images` images. Every train conversation is used exactly once
per epoch, and groups are redrawn every epoch (the original froze them, and for Otter, blend and
Sparkles used only a group's first element). `Blend.eval_split()` groups eval once, with epoch 0,
so eval losses stay comparable across the run; `eval_file` conversations are not grouped.

Image paths inside a prepared file are relative to its folder; each split carries that folder per
conversation (`Split.base_dirs`) for the dataset to resolve them. `blend_manifest` describes the
blend and `write_blend_report` saves it beside the run's outputs.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsvl_cli.config import DataConfig, SourceSpec
from dsvl_cli.data.conversation import Conversation, read_jsonl
from dsvl_cli.errors import DataError
from dsvl_cli.log import get_logger

log = get_logger(__name__)

# Separate random streams per purpose, so changing one never shifts another.
_STREAM_SUBSAMPLE, _STREAM_SPLIT, _STREAM_GROUP_TRAIN, _STREAM_GROUP_EVAL = range(4)
EVAL_FILE_SOURCE = "eval_file"


@dataclass
class Split:
    """Conversations of one split plus, per conversation, the folder its image paths start from.

    `counts` maps each source (and "eval_file") to its number of conversations in the split.
    """

    conversations: list[Conversation] = field(default_factory=list)
    base_dirs: list[Path] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.conversations)

    def extend(self, name: str, conversations: list[Conversation], base_dir: Path) -> None:
        self.conversations.extend(conversations)
        self.base_dirs.extend([base_dir] * len(conversations))
        self.counts[name] = self.counts.get(name, 0) + len(conversations)


@dataclass
class SourcePool:
    """One source after subsampling and the split: fixed for the whole run."""

    name: str
    spec: SourceSpec
    path: Path
    raw_count: int
    train: list[Conversation]
    eval: list[Conversation]

    @property
    def used_count(self) -> int:
        return len(self.train) + len(self.eval)


@dataclass
class Blend:
    """Every source's pool, the optional eval file, and the settings that group them."""

    pools: list[SourcePool]
    seed: int
    max_images: int
    eval_file: Path | None = None
    eval_file_conversations: list[Conversation] = field(default_factory=list)
    _eval: Split | None = field(default=None, repr=False)
    _train: tuple[int, Split] | None = field(default=None, repr=False)

    def train_split(self, epoch: int) -> Split:
        """This epoch's training conversations: each source grouped with (seed, source, epoch).

        The latest epoch's split is cached: the trainer asks for it several times (step count,
        blend report, the epoch itself) and regrouping a large blend takes seconds.
        """
        if self._train is not None and self._train[0] == epoch:
            return self._train[1]
        split = Split()
        for pool in self.pools:
            rng = _rng(self.seed, pool.name, _STREAM_GROUP_TRAIN, epoch)
            groups = group(pool.train, pool.spec.concat, self.max_images, rng)
            split.extend(pool.name, groups, pool.path.parent)
        self._train = (epoch, split)
        return split

    def eval_split(self) -> Split:
        """The eval conversations, grouped once (epoch 0) and cached."""
        if self._eval is None:
            split = Split()
            if self.eval_file is not None:
                split.extend(EVAL_FILE_SOURCE, self.eval_file_conversations, self.eval_file.parent)
            for pool in self.pools:
                rng = _rng(self.seed, pool.name, _STREAM_GROUP_EVAL, 0)
                groups = group(pool.eval, pool.spec.concat, self.max_images, rng)
                split.extend(pool.name, groups, pool.path.parent)
            self._eval = split
        return self._eval


def _rng(seed: int, name: str, stream: int, epoch: int = 0) -> np.random.Generator:
    """A generator for one (seed, source, purpose, epoch); crc32 is stable across processes."""
    # SeedSequence takes non-negative integers only; a negative seed wraps to 64 bits.
    return np.random.default_rng([seed % 2**64, zlib.crc32(name.encode("utf-8")), stream, epoch])


def source_path(cfg: DataConfig, name: str, spec: SourceSpec) -> Path:
    """The prepared JSONL of a source: `spec.file` (relative to prepared_dir) or NAME.jsonl."""
    return Path(cfg.prepared_dir) / (spec.file or f"{name}.jsonl")


def _read(path: Path, what: str) -> list[Conversation]:
    if not path.is_file():
        raise DataError(
            f"{what}: {path} not found; run `dsvl prepare-data` to write it, or set the "
            "file name (relative to data.prepared_dir)"
        )
    conversations = list(read_jsonl(path))
    if not conversations:
        raise DataError(f"{what}: {path} holds no conversations; re-run `dsvl prepare-data`")
    return conversations


def _pool(cfg: DataConfig, name: str, spec: SourceSpec) -> SourcePool:
    path = source_path(cfg, name, spec)
    raw = _read(path, f"data.sources.{name}")
    order = np.arange(len(raw))
    if spec.samples != "all":
        if spec.samples > len(raw):
            raise DataError(
                f"data.sources.{name}.samples={spec.samples}, but {path} holds only {len(raw)} "
                f"conversations; lower it or use 'all'"
            )
        order = _rng(cfg.seed, name, _STREAM_SUBSAMPLE).choice(
            len(raw), size=spec.samples, replace=False
        )
    order = _rng(cfg.seed, name, _STREAM_SPLIT).permutation(order)
    num_eval = 0 if cfg.eval_file is not None else int(len(order) * cfg.eval_fraction)
    return SourcePool(
        name=name,
        spec=spec,
        path=path,
        raw_count=len(raw),
        train=[raw[i] for i in order[num_eval:].tolist()],
        eval=[raw[i] for i in order[:num_eval].tolist()],
    )


def load_blend(cfg: DataConfig, max_images: int) -> Blend:
    """Read every source once and fix the subsample and the eval split (see module docstring).

    Args:
        cfg: the `data` section.
        max_images: `model.max_images_per_sample`; no group exceeds it.

    Raises:
        DataError: no sources, a missing or empty file, or `samples` larger than the file.
    """
    if not cfg.sources:
        raise DataError(
            "data.sources is empty; name at least one prepared source, e.g. "
            "`data.sources={synthetic: {file: train.jsonl}}`"
        )
    pools = [_pool(cfg, name, spec) for name, spec in cfg.sources.items()]
    blend = Blend(pools=pools, seed=cfg.seed, max_images=max_images)
    if cfg.eval_file is not None:
        blend.eval_file = Path(cfg.prepared_dir) / cfg.eval_file  # an absolute path stays as is
        blend.eval_file_conversations = _read(blend.eval_file, "data.eval_file")
    elif cfg.eval_fraction > 0 and not any(pool.eval for pool in pools):
        log.warning(
            "data.eval_fraction=%s leaves no eval conversations (too few samples); "
            "evaluation is off. Raise it or set data.eval_file",
            cfg.eval_fraction,
        )
    return blend


def merge(conversations: list[Conversation]) -> Conversation:
    """One multi-round conversation: messages and images concatenated in order.

    The system prompt and source are the first's; the id joins all ids with "+"; `meta` keeps
    each part's meta under "parts" (when any has one).
    """
    if len(conversations) == 1:
        return conversations[0]
    first = conversations[0]
    metas = [c.meta for c in conversations]
    return Conversation(
        messages=[m for c in conversations for m in c.messages],
        images=[p for c in conversations for p in c.images],
        id="+".join([c.id for c in conversations]),
        source=first.source,
        system=first.system,
        meta={"parts": metas} if any(metas) else {},
    )


def group(
    conversations: list[Conversation], concat: int, max_images: int, rng: np.random.Generator
) -> list[Conversation]:
    """Shuffle, then merge consecutive runs of 1..`concat` conversations (sizes uniform).

    A run stops early when the next conversation would take it over `max_images` images; a
    conversation alone over the limit stays alone (the template then skips it, and it is counted).
    With `concat` 1 the conversations are returned shuffled and unmerged.
    """
    order = rng.permutation(len(conversations)).tolist()
    if concat == 1:
        return [conversations[i] for i in order]
    sizes = rng.integers(1, concat + 1, size=len(conversations)).tolist()
    groups: list[Conversation] = []
    current: list[Conversation] = []
    images = 0
    for i in order:
        conv = conversations[i]
        count = len(conv.images)
        if current and images + count > max_images:
            groups.append(merge(current))
            current, images = [], 0
        current.append(conv)
        images += count
        if len(current) == sizes[len(groups)]:
            groups.append(merge(current))
            current, images = [], 0
    if current:
        groups.append(merge(current))
    return groups


def blend_manifest(blend: Blend, epoch: int, train: Split | None = None) -> dict[str, Any]:
    """What the run trains and evaluates on: per-source counts, grouping, file, seed.

    Counts: `raw` conversations in the file, `used` after `samples`, `train`/`eval` after the
    split (all raw conversations); `train_groups` (for `epoch`, when its `train` split is given)
    and `eval_groups` are dataset items after grouping. `eval_ids` lists every eval item.
    """
    train_groups = {} if train is None else train.counts
    eval_split = blend.eval_split()
    sources = {
        pool.name: {
            "file": str(pool.path),
            "samples": pool.spec.samples,
            "concat": pool.spec.concat,
            "raw": pool.raw_count,
            "used": pool.used_count,
            "train": len(pool.train),
            "eval": len(pool.eval),
            "train_groups": train_groups.get(pool.name),
            "eval_groups": eval_split.counts.get(pool.name, 0),
        }
        for pool in blend.pools
    }
    return {
        "seed": blend.seed,
        "epoch": epoch,
        "max_images_per_sample": blend.max_images,
        "sources": sources,
        "eval_file": None if blend.eval_file is None else str(blend.eval_file),
        "eval_file_conversations": len(blend.eval_file_conversations),
        "eval_items": len(eval_split),
        "eval_ids": [c.id for c in eval_split.conversations],
    }


def write_blend_report(path: str | Path, manifest: dict[str, Any]) -> None:
    """Write the manifest as indented JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
