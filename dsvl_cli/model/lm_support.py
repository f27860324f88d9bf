"""What dsvl supports of a Hugging Face causal LM, decided from its `config.json` alone.

Every place that builds the LM (train, `--dry-run`'s parameter count, eval, chat, serve,
fuse-lora) goes through `check_language_model` and `attention_implementation`, so an
unsupported feature is refused in one line before any weight loads or any process starts, and
the attention implementation is chosen the same way everywhere.

MMCA (`model/mmca.py`) implements neither attention-logit softcapping nor sliding-window
attention; with `model.mmca=false` the LM runs its own attention, which does both. A sliding
window at least as long as `model.max_seq_len` never takes effect, so it is accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsvl_cli.config import ModelConfig
from dsvl_cli.errors import CheckpointError, ConfigError
from dsvl_cli.model.mmca import MMCA_ATTN_NAME

SLIDING = "sliding_attention"


def read_lm_config(path: str | Path) -> Any:
    """The LM folder's transformers config (its text config for multimodal wrappers).

    Raises:
        CheckpointError: no `config.json`, or transformers cannot read it.
    """
    from transformers import AutoConfig

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"language model folder {folder} has no config.json")
    try:
        return AutoConfig.from_pretrained(folder).get_text_config()
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{folder / 'config.json'} is not readable: {err}") from None


def sliding_window(lm_config: Any) -> int | None:
    """The window of the LM's sliding-window layers, or None when no layer slides."""
    window = getattr(lm_config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(lm_config, "layer_types", None)
    if layer_types is not None and SLIDING not in layer_types:
        return None
    return int(window)


def unsupported_features(cfg: ModelConfig, lm_config: Any) -> list[str]:
    """One phrase per LM config feature that `cfg` cannot run, each with its way out."""
    if not cfg.mmca.enabled:
        return []
    problems = []
    softcap = getattr(lm_config, "attn_logit_softcapping", None)
    if softcap is not None:
        problems.append(
            f"attn_logit_softcapping={softcap} (MMCA has no attention softcapping): set "
            "model.mmca=false, or attn_logit_softcapping to null in the LM's config.json"
        )
    window = sliding_window(lm_config)
    if window is not None and window < cfg.max_seq_len:
        problems.append(
            f"sliding_window={window} < model.max_seq_len={cfg.max_seq_len} (MMCA has no "
            f"sliding window): set model.max_seq_len<={window}, or model.mmca=false"
        )
    return problems


def check_language_model(cfg: ModelConfig, lm_config: Any | None = None) -> None:
    """Refuse, in one line, an LM whose config has a feature `cfg` cannot run.

    `lm_config` defaults to the one in `cfg.language_model` (which must then exist).

    Raises:
        ConfigError: naming the LM config field(s) and the way out.
        CheckpointError: the LM's config.json is missing or unreadable.
    """
    lm_config = lm_config if lm_config is not None else read_lm_config(cfg.language_model)
    problems = unsupported_features(cfg, lm_config)
    if problems:
        folder = Path(cfg.language_model) / "config.json"
        raise ConfigError(f"{folder}: MMCA cannot run this LM: {'; '.join(problems)}")


def check_if_present(cfg: ModelConfig) -> None:
    """`check_language_model` when the LM folder has a config.json; else nothing (the
    missing folder is reported by whoever needs it)."""
    if (Path(cfg.language_model) / "config.json").is_file():
        check_language_model(cfg)


def attention_implementation(cfg: ModelConfig, lm_config: Any | None = None) -> str | None:
    """`attn_implementation` to build the LM with.

    MMCA's registered name when MMCA is on; otherwise `model.attn_implementation`, or None,
    which makes transformers pick the model's best supported one (SDPA, else eager), except
    that attention-logit softcapping needs eager: some transformers releases (5.17) let Gemma2
    run SDPA, which drops the softcap silently. `lm_config` defaults to the folder's.
    """
    if cfg.mmca.enabled:
        return MMCA_ATTN_NAME
    if cfg.attn_implementation is not None:
        return cfg.attn_implementation
    lm_config = lm_config if lm_config is not None else read_lm_config(cfg.language_model)
    if getattr(lm_config, "attn_logit_softcapping", None) is not None:
        return "eager"
    return None


def refuse_attention(cfg: ModelConfig, err: Exception) -> ConfigError:
    """The ConfigError for an attention implementation transformers refused for this LM."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ConfigError(
        f"model.attn_implementation={cfg.attn_implementation} does not fit "
        f"{cfg.language_model} ({reason}); set it to null (the LM's best: SDPA, else eager)"
    )
