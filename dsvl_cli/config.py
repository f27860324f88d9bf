"""The one typed configuration: pydantic schema, YAML loading, dotted key=value overrides.

`load_config(path, overrides)` reads a recipe, applies overrides such as `optim.lr=2e-4`
(values parsed as YAML), validates once, and raises a single ConfigError that lists every
problem with its dotted path, the bad value, and a "did you mean" for unknown keys.
Defaults live here in code; recipes carry only the knobs a user turns.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dsvl_cli.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- model


class VisionConfig(_Strict):
    """Which vision encoder, chosen by kind (never guessed from the path)."""

    kind: Literal["clip", "open_clip", "qwen_vit"] = "clip"
    path: str = Field(description="local folder (clip, qwen_vit) or weights file (open_clip)")
    open_clip_model: str | None = Field(
        default=None, description="open_clip model name or model-config JSON (kind open_clip)"
    )


class MMCAConfig(_Strict):
    """Multi-modal causal attention (see model/mmca.py). `mmca: false` in YAML is a shorthand."""

    enabled: bool = True
    image_attends_text: bool = True
    impl: Literal["auto", "dense", "flex"] = "auto"


class ModelConfig(_Strict):
    language_model: str = Field(description="local Hugging Face causal-LM folder")
    vision: VisionConfig
    projector: Literal["linear", "mlp", "vit", "perceiver"] = "linear"
    mmca: MMCAConfig = MMCAConfig()
    max_seq_len: int = Field(default=4096, gt=0)
    max_images_per_sample: int = Field(default=8, gt=0)
    attn_implementation: str | None = Field(
        default=None,
        description="the LM's attention with mmca off (sdpa, eager, flash_attention_2, ...); "
        "null: the LM's best supported (SDPA, else eager)",
    )

    @model_validator(mode="after")
    def _attention_without_mmca(self) -> ModelConfig:
        if self.attn_implementation is not None and self.mmca.enabled:
            raise ValueError(
                "attn_implementation applies with model.mmca=false only (MMCA is the attention)"
            )
        return self

    @field_validator("mmca", mode="before")
    @classmethod
    def _mmca_shorthand(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return {"enabled": value}
        if not isinstance(value, (dict, MMCAConfig)):
            keys = ", ".join(MMCAConfig.model_fields)
            raise ValueError(f"expected true/false or a mapping with {keys}")
        return value


# ----------------------------------------------------------------------------- trainable parts

PartMode = Literal["frozen", "lora", "full"]


class TrainableConfig(_Strict):
    """What trains; each parameter follows exactly one of these fields (see model/trainable.py)."""

    vision: PartMode = Field(
        default="frozen",
        description="frozen | lora (its LoRA weights only, settings lora.vision) | full (every "
        "encoder weight)",
    )
    language_model: PartMode = Field(
        default="frozen",
        description="frozen | lora (its LoRA weights only, settings lora.language_model; base "
        "weights and LM head stay frozen) | full (every LM weight, LM head included); the input "
        "embedding table follows `embeddings` instead, whatever this is",
    )
    projector: bool = Field(
        default=True,
        description="train the projector; false keeps its initialisation, drawn from train.seed",
    )
    embeddings: Literal["full", "new_tokens", "frozen"] = Field(
        default="full",
        description="the LM's input token-embedding table, with any language_model: full (every "
        "row) | new_tokens (only rows of tokens dsvl added, e.g. <image>) | frozen; a tied LM "
        "head (tie_word_embeddings) is the same tensor and follows this, an untied one trains "
        "only with language_model: full",
    )


class LoraSettings(_Strict):
    """PEFT LoRA settings for one part; `target_modules: null` picks the part's default."""

    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | None = None


class LoraConfig(_Strict):
    language_model: LoraSettings = LoraSettings()
    vision: LoraSettings = LoraSettings()


# ----------------------------------------------------------------------------- data


class SourceSpec(_Strict):
    """How one prepared source enters the blend."""

    samples: int | Literal["all"] = "all"
    concat: int = Field(default=1, ge=1, description="group 1..k samples into one")
    file: str | None = Field(default=None, description="JSONL in prepared_dir (default NAME.jsonl)")

    @field_validator("samples")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be 'all' or a positive number of samples")
        return value


class DataConfig(_Strict):
    prepared_dir: str = Field(default="data/prepared", description="output of `dsvl prepare-data`")
    sources: dict[str, SourceSpec] = Field(default_factory=dict)
    eval_fraction: float = Field(default=0.01, ge=0, lt=1)
    eval_file: str | None = Field(
        default=None, description="held-out JSONL used instead of a split"
    )
    seed: int = 1234
    workers: int = Field(default=2, ge=0)
    pixel_cache_mb: int = Field(
        default=0,
        ge=0,
        description="keep processed images in memory, up to this many MiB per data-loading "
        "process (0: off); for data sets small enough to decode once",
    )
    token_cache_mb: int = Field(
        default=0,
        ge=0,
        description="keep tokenised conversations in memory, up to this many MiB (0: off), so "
        "each is encoded once per run, not once per epoch; needs data.workers 0",
    )
    system_prompt: str | None = Field(
        default=None,
        description="system prompt of conversations without their own (None: DSVL's); stored "
        "in exports, so eval and chat render it too",
    )
    packing: bool = Field(
        default=False,
        description="fill each training row up to model.max_seq_len with whole conversations "
        "(attention, positions and labels stay per conversation; see data/packing.py)",
    )
    group_by_length: bool = Field(
        default=False,
        description="unpacked training: batch samples of similar length, image and text-only "
        "samples apart (modality-length grouping; see data/grouping.py)",
    )
    overlength: Literal["drop", "truncate_rounds"] = "drop"
    max_round_tokens: int | None = Field(default=512, gt=0)
    max_failure_fraction: float = Field(default=0.01, ge=0, le=1)

    @model_validator(mode="after")
    def _one_sampler(self) -> DataConfig:
        if self.packing and self.group_by_length:
            raise ValueError(
                "packing and group_by_length both order the samples: set one of them to false "
                "(packing already removes most padding)"
            )
        return self

    @field_validator("sources", mode="before")
    @classmethod
    def _empty_specs(cls, value: Any) -> Any:
        # `llava:` with nothing under it in YAML means "defaults".
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value


# ----------------------------------------------------------------------------- optimisation


class OptimConfig(_Strict):
    lr: float = Field(default=1e-3, gt=0)
    lr_pretrained: float | None = Field(
        default=None, gt=0, description="lr of pretrained parts (embeddings); null = lr"
    )
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-6, gt=0)
    schedule: Literal[
        "cosine", "linear", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "cosine"
    warmup_steps: int | None = Field(default=None, ge=0)
    warmup_ratio: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _one_warmup(self) -> OptimConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="stop after N optimiser steps")
    micro_batch_size: int = Field(default=1, gt=0, description="samples per GPU per forward")
    global_batch_size: int = Field(default=1, gt=0, description="micro x GPUs x accumulation")
    eval_batch_size: int = Field(default=2, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    gradient_checkpointing: bool = False
    log_every: int = Field(default=10, gt=0)
    eval_every: int | None = Field(default=None, gt=0, description="steps; epoch ends always")
    save_every: int | None = Field(default=500, gt=0, description="resumable checkpoint interval")
    keep_last: int = Field(default=2, gt=0)
    output_dir: str = "outputs/run"
    seed: int = 1234
    resume: str = Field(default="auto", description="auto | never | path to checkpoints/step-N")
    overwrite: bool = Field(
        default=False,
        description="output_dir holds an earlier run: delete it and train from step 0",
    )
    on_nonfinite: Literal["skip", "stop"] = Field(
        default="skip",
        description="a non-finite loss: stop (exit 2), or skip its micro-batch; a step whose "
        "every micro-batch is skipped applies no update",
    )
    max_nonfinite_steps: int = Field(
        default=3,
        gt=0,
        description="on_nonfinite=skip: stop after this many consecutive skipped steps",
    )
    tensorboard: bool = True

    @model_validator(mode="after")
    def _overwrite_starts_over(self) -> TrainConfig:
        if self.overwrite and self.resume not in ("auto", "never"):
            raise ValueError(
                "overwrite=true trains from step 0 and deletes output_dir's checkpoints; "
                "drop it to resume from a checkpoint, or set resume to auto"
            )
        return self


class DistributedConfig(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="extra DeepSpeed config merged last"
    )


class Config(_Strict):
    """A whole run: model, trainable parts, LoRA, data, optimiser, training, distribution."""

    model: ModelConfig
    trainable: TrainableConfig = TrainableConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()


# ----------------------------------------------------------------------------- loading


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`)."""


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text with the float fix; errors become ConfigError naming `where`."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({err})") from None


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override in place (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=2e-4")
    parts = key.strip().split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        node = child
    node[parts[-1]] = parse_yaml(raw, f"override {item!r}")


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the schema section that `loc` (minus its last part) points into."""
    model: Any = Config
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "(root)"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{path}: unknown key{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("missing",):
        return f"{path}: required, not set"
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        # pydantic names the schema class here; a user wrote YAML, so say "a mapping" and its keys
        keys = _fields_at((*loc, None))
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        msg = f"expected a mapping with {shown}" if keys else "expected a mapping"
    if isinstance(err.get("input"), dict):
        return f"{path}: {msg}"  # a whole section: its repr would bury the message
    return f"{path}: {msg} (got {err.get('input')!r})"


def validate_config(tree: Any, where: str = "config") -> Config:
    """Validate a plain dict against the schema; one ConfigError listing every problem."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(tree).__name__}")
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{where}: {len(problems)} problem(s): " + "; ".join(problems)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe, apply dotted key=value overrides, validate once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found; see recipes/ for examples")
    tree = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        apply_override(tree, item)
    return validate_config(tree, where=str(path))


def dump_config(config: Config) -> str:
    """The resolved config as YAML (saved beside every checkpoint, printed by --dry-run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(dump_config(config), encoding="utf-8")
