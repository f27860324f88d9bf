"""`dsvl extract-qwen`: the standalone Qwen-VL vision tower from a Qwen-VL(-Chat) checkpoint.

Reads a local Qwen-VL or Qwen-VL-Chat folder as downloaded from the hub (`config.json` with
`model_type: "qwen"` and a `visual` section, plus the weights: sharded safetensors or `.bin` with
their `*.index.json`, or one unsharded file) and writes the `qwen_vit` folder that
`load_vision_encoder("qwen_vit", folder)` loads strictly: `config.json`, `preprocessor_config.json`
and `model.safetensors`.

Only the `transformer.visual.*` tensors are read, with the prefix stripped and the final 4096x4096
`proj` dropped; the 9.6B model is never built, no remote code is imported, nothing is downloaded,
and the source dtype (bf16 in the released checkpoints) is kept. Shards are read one at a time:

* safetensors: `safe_open` fetches only the visual tensors; shards without any are never opened.
  Peak memory is about the visual tensors (~3.8 GB in bf16 for Qwen-VL's 1.9B-parameter tower).
* `.bin`: `torch.load(..., weights_only=True, mmap=True)` maps one shard; the visual tensors are
  copied out and the rest dropped before the next shard. Peak memory is the visual tensors plus,
  at most, one shard's pages (file-backed, reclaimable by the OS).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import SafetensorError, safe_open

from dsvl_cli.errors import CheckpointError
from dsvl_cli.log import console, get_logger
from dsvl_cli.model.qwen_vit import QwenViT, QwenViTConfig
from dsvl_cli.model.vision_loader import save_qwen_vit_folder

log = get_logger(__name__)

VISUAL_PREFIX = "transformer.visual."
DROPPED_KEYS = frozenset({"proj"})  # the final 4096x4096 projection; DSVL projects on its own
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
VISUAL_FIELDS = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "output_dim")
_DOWNLOAD_HINT = "download it first, e.g. `hf download Qwen/Qwen-VL-Chat --local-dir DIR`"


@dataclass(frozen=True)
class ExtractResult:
    """What `extract_qwen` wrote: the folder, the tower's config and the tensors' totals."""

    out: Path
    config: QwenViTConfig
    num_tensors: int
    num_params: int
    num_bytes: int
    dtypes: tuple[str, ...]
    shards_read: int


def extract_qwen(
    src: str | Path, out: str | Path, force: bool = False, progress: bool = True
) -> ExtractResult:
    """Write the Qwen-VL vision tower of checkpoint folder `src` as a `qwen_vit` folder `out`.

    `out` must not exist or be empty unless `force`, which replaces it; the folder appears
    atomically (written beside it, then renamed), so an interrupted run leaves no half folder.
    Raises CheckpointError for a missing or non-Qwen-VL `src`, missing shards, unreadable files,
    and visual keys or shapes that differ from the architecture in `src`'s `config.json`.
    """
    src, out = Path(src), Path(out)
    config = read_qwen_vl_config(src)
    _check_out(out, src, force)
    expected = _expected_shapes(config, src)
    plan = _visual_plan(src, _weight_map(src))
    _check_key_set(set().union(*plan.values()), set(expected), src)
    state = _read_visual_tensors(plan, progress)
    _check_shapes(state, expected, src)
    _write_atomically(out, config, state)
    result = ExtractResult(
        out=out,
        config=config,
        num_tensors=len(state),
        num_params=sum(t.numel() for t in state.values()),
        num_bytes=sum(t.numel() * t.element_size() for t in state.values()),
        dtypes=tuple(sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})),
        shards_read=len(plan),
    )
    log.info(
        "wrote %d tensors (%.2fB parameters, %.2f GB, %s) from %d shard(s) to %s",
        result.num_tensors,
        result.num_params / 1e9,
        result.num_bytes / 1e9,
        "/".join(result.dtypes),
        result.shards_read,
        out,
    )
    return result


def read_qwen_vl_config(src: Path) -> QwenViTConfig:
    """The `QwenViTConfig` of a Qwen-VL checkpoint folder, from its config.json `visual` section.

    Qwen-VL's `visual.py`: MLP width int(width * mlp_ratio), resampler heads output_dim // 128,
    n_queries 256 unless given, a 256-row (16x16) `positional_embedding`, LayerNorm eps 1e-6.
    """
    if not src.is_dir():
        raise CheckpointError(f"Qwen-VL checkpoint folder {src} does not exist; {_DOWNLOAD_HINT}")
    config_file = src / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{src} has no config.json, so it is not a Qwen-VL checkpoint; {_DOWNLOAD_HINT}"
        )
    data = _read_json(config_file)
    if data.get("model_type") != "qwen" or not isinstance(data.get("visual"), dict):
        raise CheckpointError(
            f"{config_file} is not a Qwen-VL config (model_type {data.get('model_type')!r}, "
            "needs 'qwen' with a 'visual' section); point SRC at a Qwen-VL or Qwen-VL-Chat folder"
        )
    visual = data["visual"]
    missing = [name for name in VISUAL_FIELDS if name not in visual]
    if missing:
        raise CheckpointError(f"{config_file} 'visual' lacks {missing}; re-download config.json")
    try:
        width, output_dim = int(visual["width"]), int(visual["output_dim"])
        return QwenViTConfig(
            image_size=int(visual["image_size"]),
            patch_size=int(visual["patch_size"]),
            width=width,
            layers=int(visual["layers"]),
            heads=int(visual["heads"]),
            mlp_size=int(width * float(visual["mlp_ratio"])),
            n_queries=int(visual.get("n_queries", 256)),
            output_dim=output_dim,
            output_heads=output_dim // 128,
            pos_grid=16,
            eps=1e-6,
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file} 'visual' has a non-numeric value ({err})") from err


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}); re-download it") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download it")
    return data


def _expected_shapes(config: QwenViTConfig, src: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of our `QwenViT` for `config`, built on the meta device (no memory, no init).

    A meta forward also checks that the tower yields `[N, n_queries, output_dim]`.
    """
    try:
        with torch.device("meta"):
            model = QwenViT(config)
            side = config.image_size
            out_shape = tuple(model(torch.empty(1, 3, side, side)).shape)
    except (ValueError, RuntimeError, AssertionError) as err:
        raise CheckpointError(
            f"{src / 'config.json'} 'visual' describes a tower dsvl cannot build ({err}); "
            "only Qwen-VL's own visual settings are supported"
        ) from err
    if out_shape != (1, config.n_queries, config.output_dim):
        raise CheckpointError(
            f"{src / 'config.json'} 'visual' yields image features of shape {out_shape}, not "
            f"(1, {config.n_queries}, {config.output_dim}); check its image_size and patch_size"
        )
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _weight_map(src: Path) -> dict[str, str]:
    """Checkpoint key -> file name, from the shard index, or from the one unsharded file."""
    for name in INDEX_FILES:
        if (src / name).is_file():
            weight_map = _read_json(src / name).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{src / name} has no 'weight_map'; re-download it")
            return weight_map
    for name in SINGLE_FILES:
        if (src / name).is_file():
            return dict.fromkeys(_file_keys(src / name), name)
    raise CheckpointError(
        f"{src} has no weights ({' / '.join(INDEX_FILES + SINGLE_FILES)}); {_DOWNLOAD_HINT}"
    )


def _file_keys(path: Path) -> list[str]:
    """Tensor names of one unsharded file (safetensors header, or the mmap'd .bin's pickle)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError) as err:
            raise _unreadable(path, err) from err
    return list(_load_bin(path))


def _visual_plan(src: Path, weight_map: dict[str, str]) -> dict[Path, set[str]]:
    """Shard -> the visual keys it holds (prefix stripped, `proj` dropped); shards must exist."""
    plan: dict[Path, set[str]] = defaultdict(set)
    for key, shard in weight_map.items():
        name = key.removeprefix(VISUAL_PREFIX)
        if key.startswith(VISUAL_PREFIX) and name not in DROPPED_KEYS:
            plan[src / shard].add(name)
    if not plan:
        raise CheckpointError(
            f"{src} has no {VISUAL_PREFIX}* weights, so it is not a Qwen-VL checkpoint; "
            "use Qwen/Qwen-VL or Qwen/Qwen-VL-Chat"
        )
    # Only shards holding visual tensors are needed: a partial download without them is fine.
    absent = sorted(path.name for path in plan if not path.is_file())
    if absent:
        raise CheckpointError(
            f"{src} lacks shard(s) {', '.join(absent)} named in its index; download them again"
        )
    return dict(sorted(plan.items()))


def _sample(keys: set[str] | list[str], limit: int = 4) -> str:
    ordered = sorted(keys)
    more = f", ... ({len(ordered)} in all)" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more


def _check_key_set(found: set[str], expected: set[str], src: Path) -> None:
    """Refuse visual keys that differ from the architecture in `src`'s config.json."""
    missing, unexpected = expected - found, found - expected
    problems = [
        f"{label} {VISUAL_PREFIX}{{{_sample(keys)}}}"
        for label, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{src} visual weights do not match its config.json: {'; '.join(problems)}; "
            "use an unmodified Qwen-VL(-Chat) checkpoint (merge LoRA adapters first)"
        )


def _check_shapes(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], src: Path
) -> None:
    wrong = [
        f"{key} {tuple(tensor.shape)} != {expected[key]}"
        for key, tensor in state.items()
        if tuple(tensor.shape) != expected[key]
    ]
    if wrong:
        raise CheckpointError(
            f"{src} visual weights have shapes that differ from its config.json: {_sample(wrong)}; "
            "check that config.json belongs to these weights"
        )


def _read_visual_tensors(plan: dict[Path, set[str]], progress: bool) -> dict[str, torch.Tensor]:
    """Stream the shards one by one and collect their visual tensors (prefix stripped)."""
    state: dict[str, torch.Tensor] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("reading shards", total=len(plan))
        for path, names in plan.items():
            bar.update(task, description=f"reading {path.name}")
            state.update(_read_shard(path, sorted(names)))
            bar.advance(task)
    return state


def _read_shard(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` (without the prefix) of one shard, read as little as possible."""
    keys = [VISUAL_PREFIX + name for name in names]
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                absent = set(keys) - set(handle.keys())
                if absent:
                    raise _not_in_shard(path, absent)
                return {name: handle.get_tensor(key) for name, key in zip(names, keys, strict=True)}
        except (SafetensorError, OSError) as err:
            raise _unreadable(path, err) from err
    shard = _load_bin(path)
    absent = set(keys) - set(shard)
    if absent:
        raise _not_in_shard(path, absent)
    # clone() copies out of the mmap'd file, so the shard is unmapped once `shard` goes away.
    visual = {name: shard[key].clone() for name, key in zip(names, keys, strict=True)}
    del shard
    return visual


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, memory-mapped (weights_only); pre-zip files are read whole instead."""
    mmap = zipfile.is_zipfile(path)  # torch can only memory-map its zip format (torch >= 1.6)
    if not mmap:
        log.warning("%s is not in torch's zip format: reading it whole (no mmap)", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # torch's text suggests weights_only=False: never here
        raise _unreadable(path, ValueError("not a weights-only PyTorch state dict")) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise _unreadable(path, err) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict; download it again")
    return state


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CheckpointError(f"cannot read shard {path} ({reason}); download it again")


def _not_in_shard(path: Path, absent: set[str]) -> CheckpointError:
    return CheckpointError(
        f"{path} lacks {_sample(absent)}, which its index places there; download the folder again"
    )


def _check_out(out: Path, src: Path, force: bool) -> None:
    """Refuse an `out` that would overwrite data (unless `force`) or delete the source."""
    src_real, out_real = src.resolve(), out.resolve()
    if out_real == src_real or out_real in src_real.parents:
        raise CheckpointError(f"--out {out} would replace the source {src}; choose another folder")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"--out {out} exists and is not empty; pass --force to replace it")


def _write_atomically(out: Path, config: QwenViTConfig, state: dict[str, torch.Tensor]) -> None:
    """Write the folder beside `out`, then rename it into place (replacing an old `out`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.with_name(f".{out.name}.tmp-{tag}")
    old = out.with_name(f".{out.name}.old-{tag}")
    tmp.mkdir()
    try:
        save_qwen_vit_folder(tmp, config, state)
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():  # put the previous folder back rather than leave nothing
                old.rename(out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
