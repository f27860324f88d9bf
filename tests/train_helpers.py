"""Shared set-up of the in-process training tests: the tiny recipe pointed at synthetic data."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "tiny.yaml"


def tiny_overrides(shapes: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that train recipes/tiny.yaml on `shapes` (prepare-data synthetic) into `out`."""
    return [
        f"model.language_model={shapes}/models/lm",
        f"model.vision.path={shapes}/models/vision",
        f"data.prepared_dir={shapes}",
        f"train.output_dir={out}",
        "train.micro_batch_size=4",
        "train.global_batch_size=4",
        "train.log_every=1",
        *extra,
    ]
