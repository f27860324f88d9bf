"""The trainable set: which parameters train, decided once from the `trainable:` config section.

The builder first applies every wrapper that adds or replaces parameters (PEFT LoRA on the LM
and/or the vision encoder, `NewTokenEmbedding` for `embeddings: new_tokens`, gradient
checkpointing when training); then `set_trainable` freezes everything, unfreezes exactly
`expected_trainable`, and checks the result. Wrappers are never trusted with `requires_grad`:
PEFT's injection, for one, freezes every non-LoRA weight of the module it adapts, the LM's input
embedding table included.

Each parameter belongs to one setting (a "component"), and that setting alone decides it:

| component        | its parameters                            | trains with                    |
|------------------|-------------------------------------------|--------------------------------|
| `vision`         | the encoder's                             | full: all; lora: LoRA weights  |
| `projector`      | the projector's                           | true                           |
| `language_model` | the LM's, but its input embedding table   | full: all (LM head included);  |
|                  |                                           | lora: LoRA weights only        |
| `embeddings`     | the LM's input token-embedding table, and | full: the table; new_tokens:   |
|                  | rows of tokens dsvl added (`token_embed`) | the added rows only            |

So the input table follows `embeddings` whatever `language_model` is (`full` + `frozen` trains
every other LM weight; `lora` + `full` trains LoRA and the table). A tied LM head
(`tie_word_embeddings`) is the same tensor as the input table and follows `embeddings` with it;
an untied head is an LM weight and trains only with `language_model: full`. Other tables inside
the LM (learned positions) are LM weights.
"""

from __future__ import annotations

from torch import nn

from dsvl_cli.config import Config, TrainableConfig
from dsvl_cli.errors import ConfigError
from dsvl_cli.log import get_logger

log = get_logger(__name__)

COMPONENTS = ("vision", "projector", "language_model", "embeddings")
# Top-level submodule of VisualChatModel -> the component its parameters belong to (the LM's
# input table is moved to `embeddings` by identity, see `component_of`).
_PART_COMPONENT = {
    "vision": "vision",
    "mm_projector": "projector",
    "language_model": "language_model",
    "token_embed": "embeddings",
}
# PEFT names every adapter weight `lora_*` (lora_A, lora_B, lora_embedding_A, lora_magnitude_...)
# and tells adapter weights from base weights by this same substring.
LORA_MARK = "lora_"
_SHOWN = 3  # parameter names quoted in an error


def adapted_modules(module: nn.Module) -> dict[str, int]:
    """Short name (last dotted part) of each module holding a LoRA adapter -> how many."""
    found: dict[str, int] = {}
    for name, child in module.named_modules():
        if hasattr(child, "lora_A") and name:
            short = name.rsplit(".", 1)[-1]
            found[short] = found.get(short, 0) + 1
    return found


def block_linear_names(module: nn.Module) -> set[str]:
    """Short names of the Linear layers inside numbered blocks (`layers.3.mlp.up_proj` ...).

    The output head and other layers outside the repeated blocks are left out; a LoRA-wrapped
    layer counts under its own name (PEFT nests the original as `base_layer`).
    """
    names = set()
    for name, child in module.named_modules():
        parts = name.split(".")
        in_block = any(part.isdigit() for part in parts)
        is_linear = isinstance(child, nn.Linear) or hasattr(child, "lora_A")
        if in_block and is_linear and parts[-1] not in ("base_layer",) and LORA_MARK not in name:
            names.add(parts[-1])
    return names


def component_of(name: str, param: nn.Parameter, table: nn.Parameter) -> str:
    """The component (see the module doc) that `param`, named `name` in the model, belongs to."""
    if param is table:
        return "embeddings"
    part = name.split(".", 1)[0]
    if part not in _PART_COMPONENT:
        raise RuntimeError(f"parameter {name} lies outside every part of the model")
    return _PART_COMPONENT[part]


def _trains(component: str, name: str, is_table: bool, parts: TrainableConfig) -> bool:
    """Whether the config trains this parameter of `component`."""
    if component == "projector":
        return parts.projector
    if component == "embeddings":
        if parts.embeddings == "full":
            return is_table
        return parts.embeddings == "new_tokens" and not is_table
    mode = parts.vision if component == "vision" else parts.language_model
    return mode == "full" or (mode == "lora" and LORA_MARK in name)


def input_table(model: nn.Module) -> nn.Parameter:
    """The LM's input token-embedding weight (a PEFT-wrapped layer exposes its base weight)."""
    return model.language_model.get_input_embeddings().weight


def expected_trainable(model: nn.Module, config: Config) -> dict[str, set[str]]:
    """Component -> names (as `model.named_parameters()` gives them) that the config trains.

    Tied parameters appear once, under their first name; every component is a key.
    """
    table = input_table(model)
    expected: dict[str, set[str]] = {component: set() for component in COMPONENTS}
    for name, param in model.named_parameters():
        component = component_of(name, param, table)
        if _trains(component, name, param is table, config.trainable):
            expected[component].add(name)
    return expected


def _empty_component_error(component: str, config: Config) -> str | None:
    """The message for a component the config trains but that has nothing to train, or None."""
    parts = config.trainable
    if component in ("vision", "language_model"):
        mode = getattr(parts, component)
        if mode == "lora":
            return (
                f"trainable.{component}=lora but the {component} has no LoRA weight; set "
                f"lora.{component}.target_modules to names of its layers (e.g. q_proj, v_proj)"
            )
        if mode == "full":
            return (
                f"trainable.{component}=full but the {component} has no weight; "
                f"set trainable.{component}=frozen"
            )
        return None
    if component == "projector" and parts.projector:
        return "trainable.projector=true but the projector has no weight; set it to false"
    # embeddings=full always has the table; new_tokens without added tokens trains no row (the
    # builder warns): neither is an error.
    return None


def require_each_component(config: Config, expected: dict[str, set[str]]) -> None:
    """ConfigError naming the field when a component the config trains has nothing to train."""
    for component, names in expected.items():
        message = None if names else _empty_component_error(component, config)
        if message:
            raise ConfigError(message)


def check_trainable(model: nn.Module, config: Config) -> dict[str, set[str]]:
    """Check that exactly the config's trainable set has `requires_grad`; return that set.

    Call it after anything that may touch `requires_grad` (a wrapper, an engine). Raises
    ConfigError when a component the config trains has nothing to train, RuntimeError (a dsvl
    bug, not a config problem) when `requires_grad` differs from the config's set.
    """
    expected = expected_trainable(model, config)
    require_each_component(config, expected)
    wanted = set().union(*expected.values())
    actual = {name for name, param in model.named_parameters() if param.requires_grad}
    if actual != wanted:
        extra, missing = sorted(actual - wanted), sorted(wanted - actual)
        raise RuntimeError(
            "the trainable parameters differ from what the config's trainable section says: "
            f"{len(extra)} train but should not ({extra[:_SHOWN]}), {len(missing)} are frozen "
            f"but should train ({missing[:_SHOWN]}); something changed requires_grad after "
            "the model was built"
        )
    return expected


def set_trainable(model: nn.Module, config: Config) -> dict[str, set[str]]:
    """Freeze every parameter, unfreeze the config's trainable set, check it; return it.

    Run once after every wrapper is applied (see the module doc).
    """
    expected = expected_trainable(model, config)
    require_each_component(config, expected)
    wanted = set().union(*expected.values())
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if name in wanted:
            param.requires_grad_(True)
    log.debug("trainable tensors per component: %s", {k: len(v) for k, v in expected.items()})
    return check_trainable(model, config)
