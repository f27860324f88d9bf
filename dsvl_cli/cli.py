"""The `dsvl` command: a thin Typer shell; each command parses, then calls one library function.

Heavy imports (torch, transformers, deepspeed) happen inside commands so `dsvl --help` is fast.
`DsvlError` and its subclasses end the program with one red line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from dsvl_cli import __version__
from dsvl_cli.cli_data import prepare_data_cmd
from dsvl_cli.cli_multivalue import ImagesCommand
from dsvl_cli.cli_recipes import recipes_app
from dsvl_cli.cli_serve import serve_cmd
from dsvl_cli.errors import ConfigError, DsvlError
from dsvl_cli.log import console, setup_logging

stdout = Console(soft_wrap=True)  # results go to stdout; logs and errors to stderr

app = typer.Typer(
    name="dsvl",
    help="Train vision-language chat models on multi-image, multi-round conversations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"dsvl {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    setup_logging("DEBUG" if verbose else "INFO")


@app.command("env")
def env_cmd() -> None:
    """Print versions and hardware facts for a bug report."""
    from dsvl_cli.tools.env import collect_env, render_env

    render_env(collect_env(), stdout)


app.add_typer(recipes_app, name="recipes")


app.command("prepare-data")(prepare_data_cmd)
app.command("serve")(serve_cmd)


@app.command("train")
def train_cmd(
    recipe: str | None = typer.Argument(
        None, help="A YAML recipe file, or a shipped recipe's name: tiny, 7b ... (`dsvl recipes`)."
    ),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides: optim.lr=2e-4 ..."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate, print the resolved config and a memory estimate."
    ),
    gpus: int | None = typer.Option(
        None, "--gpus", min=1, help="GPUs per node: re-launch through the deepspeed launcher."
    ),
    hostfile: Path | None = typer.Option(
        None, "--hostfile", help="Multi-node: a DeepSpeed hostfile ('node1 slots=8' lines)."
    ),
    master_addr: str | None = typer.Option(None, "--master-addr", help="Multi-node rendezvous."),
    master_port: int | None = typer.Option(None, "--master-port", help="Rendezvous port."),
    cpu_procs: int | None = typer.Option(
        None,
        "--cpu-procs",
        min=1,
        help="No GPU: train N CPU processes through the deepspeed launcher (default: one).",
    ),
) -> None:
    """Train a model from a recipe (DeepSpeed underneath); resumes with train.resume=auto."""
    from dsvl_cli.config import dump_config, load_config
    from dsvl_cli.recipe_registry import missing_recipe_message, resolve_recipe
    from dsvl_cli.train.preflight import check_inputs, warn_missing_inputs
    from dsvl_cli.train.run_dir import refuse_finished_run

    if recipe is None:
        raise ConfigError(missing_recipe_message())
    recipe_file = resolve_recipe(recipe)  # a shipped recipe's name becomes its absolute path
    config = load_config(recipe_file, overrides or [])
    from dsvl_cli.model.lm_support import check_if_present

    check_if_present(config.model)  # an LM feature MMCA cannot run: one line, before anything
    if cpu_procs is not None:
        from dsvl_cli.train.deepspeed_bugs import check_gloo_zero3

        check_gloo_zero3(config, cpu_procs, cuda=False)  # one line, before any process starts
    if dry_run:
        from dsvl_cli.train.dry_run import dry_run_report

        stdout.print(dump_config(config), highlight=False, markup=False)
        dry_run_report(config, gpus or cpu_procs or 1, hostfile, stdout)
        warn_missing_inputs(config, recipe_file)
        return
    check_inputs(config, recipe_file)
    refuse_finished_run(config.train)  # before the launcher or any heavy import
    if gpus is not None or hostfile is not None or cpu_procs is not None:
        from dsvl_cli.train.engine import gradient_accumulation_steps
        from dsvl_cli.train.launch import launch, local_processes

        procs = local_processes(gpus, cpu_procs, hostfile)  # no GPU: one line, before launching
        if procs is not None and hostfile is None:
            gradient_accumulation_steps(config, procs)  # a batch that does not divide: now, too
        code = launch(recipe_file, overrides or [], procs, hostfile, master_addr, master_port)
        raise typer.Exit(code)
    from dsvl_cli.train.trainer import fit

    result = fit(config)
    stdout.print(
        f"trained {result.steps} steps; final eval loss {result.eval_loss}; "
        f"exports in {result.output_dir}",
        highlight=False,
    )


EXTRACT_QWEN_NEEDS = (
    "dsvl extract-qwen needs SRC, a local Qwen-VL-Chat (or Qwen-VL) folder (get one with "
    "huggingface-cli download Qwen/Qwen-VL-Chat --local-dir models/Qwen-VL-Chat), and --out, the "
    "folder for the vision encoder: dsvl extract-qwen models/Qwen-VL-Chat --out models/qwen-vit"
)


@app.command("extract-qwen")
def extract_qwen_cmd(
    src: Path | None = typer.Argument(None, help="Local Qwen-VL or Qwen-VL-Chat folder."),
    out: Path | None = typer.Option(None, "--out", help="Folder for the vision encoder."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """Write the Qwen-VL vision tower as a standalone `qwen_vit` encoder folder."""
    if src is None or out is None:  # before the heavy import: a usage error is instant
        raise ConfigError(EXTRACT_QWEN_NEEDS)
    from dsvl_cli.tools.extract_qwen import extract_qwen

    result = extract_qwen(src, out, force=force)
    stdout.print(
        f"wrote {result.num_tensors} tensors ({result.num_params / 1e9:.2f}B parameters) to "
        f"{result.out}; use it with model.vision.kind=qwen_vit model.vision.path={result.out}",
        highlight=False,
    )


@app.command("fuse-lora")
def fuse_lora_cmd(
    checkpoint: Path | None = typer.Argument(
        None, help="Export folder (final, best, epoch-K); default: the newest under ./outputs."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for the standalone model."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
    tolerance: float | None = typer.Option(
        None, "--tolerance", help="Max abs logit difference merged vs unmerged (default by dtype)."
    ),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="LM safetensors shards."),
    from_dsvl: bool = typer.Option(
        False, "--from-dsvl", help="CHECKPOINT is an original DeepSpeed-VisualChat epoch folder."
    ),
    lm: str | None = typer.Option(
        None,
        "--lm",
        "--base-lm",
        help="The base LM folder, instead of the export's config.yaml model.language_model "
        "(base models moved); needed with --from-dsvl.",
    ),
    vision_kind: str = typer.Option("clip", "--vision-kind", help="--from-dsvl: clip|qwen_vit."),
    vision_path: str | None = typer.Option(
        None,
        "--vision-path",
        "--base-vision",
        help="The vision encoder folder (open_clip: weights file), instead of the export's "
        "model.vision.path; needed with --from-dsvl.",
    ),
) -> None:
    """Merge LoRA into a standalone model folder that chat and eval load without adapters."""
    if from_dsvl:
        from dsvl_cli.tools.dsvl_legacy import convert_dsvl_checkpoint

        if checkpoint is None or lm is None or vision_path is None:
            raise ConfigError(
                "--from-dsvl needs CHECKPOINT (the epoch folder), --lm LM_FOLDER and "
                "--vision-path VISION_FOLDER"
            )
        result = convert_dsvl_checkpoint(
            checkpoint,
            out,
            lm,
            vision_kind,
            vision_path,
            force=force,
            tolerance=tolerance,
            max_shard_size=max_shard_size,
        )
    else:
        from dsvl_cli.model.discovery import EXPORT_FORMAT, model_or_newest

        checkpoint = model_or_newest(checkpoint, formats=(EXPORT_FORMAT,))
        from dsvl_cli.tools.fuse_lora import fuse_lora

        result = fuse_lora(
            checkpoint, out, force, tolerance, max_shard_size, base_lm=lm, base_vision=vision_path
        )
    stdout.print(
        f"fused {', '.join(result.merged_parts) or 'no LoRA (converted)'} into {result.out}; "
        f"max |logit diff| {result.max_abs_diff:.2e} (tolerance {result.tolerance:.1e})",
        highlight=False,
    )


def _settings(
    max_new_tokens: int, temperature: float, top_p: float, top_k: int, rep: float, seed: int
) -> object:
    from dsvl_cli.inference.generation import GenerationSettings

    return GenerationSettings(max_new_tokens, temperature, top_p, top_k, rep, seed)


MAX_NEW = typer.Option(256, "--max-new-tokens", help="Most tokens per answer.")
TEMPERATURE = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples.")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling (when sampling).")
TOP_K = typer.Option(0, "--top-k", help="Top-k sampling, 0 = off (when sampling).")
REPETITION = typer.Option(1.0, "--repetition-penalty", help="1.0 = off.")
SEED = typer.Option(0, "--seed", help="Seed for sampling.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
DTYPE = typer.Option("auto", "--dtype", help="auto | fp32 | bf16 | fp16.")
DEVICE_MAP = typer.Option(None, "--device-map", help="Spread over GPUs: auto|balanced|sequential.")
MODEL_HELP = "Model folder: an export or a fused folder (default: the newest under ./outputs)."
IMAGE_ROOT_HELP = (
    "Folder the image paths start from (default: the data file's folder). A relative path is "
    "looked for under it as written, then by shorter tails: ./eval/eval_data/images/cats/1.jpg as "
    "eval/eval_data/images/cats/1.jpg, eval_data/images/cats/1.jpg, images/cats/1.jpg, "
    "cats/1.jpg, 1.jpg; the first file found is used, so any folder on the way to the images "
    "works. Absolute paths and file:// URIs are used as they are."
)
OVERFLOW = typer.Option("error", "--overflow", help="Context full: error | drop_oldest rounds.")
BASE_LM = typer.Option(
    None, "--base-lm", help="An export's base LM folder here (replaces model.language_model)."
)
BASE_VISION = typer.Option(
    None, "--base-vision", help="An export's vision encoder here (replaces model.vision.path)."
)


@app.command("chat", cls=ImagesCommand)
def chat_cmd(
    model: Path | None = typer.Argument(None, help=MODEL_HELP),
    images: list[Path] = typer.Option(
        None,
        "--images",
        "--image",
        help="Images for the first turn: --images A.png B.png (the list ends at the next option "
        "or at a folder), or repeat: --image A.png --image B.png.",
    ),
    prompt: str | None = typer.Option(None, "--prompt", help="Ask once, print only the answer."),
    max_new_tokens: int = MAX_NEW,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    repetition_penalty: float = REPETITION,
    seed: int = SEED,
    device: str = DEVICE,
    dtype: str = DTYPE,
    device_map: str | None = DEVICE_MAP,
    overflow: str = OVERFLOW,
    base_lm: Path | None = BASE_LM,
    base_vision: Path | None = BASE_VISION,
) -> None:
    """Talk with a model about images, over several rounds (/image, /clear, /save, /quit)."""
    from dsvl_cli.model.discovery import model_or_newest

    model = model_or_newest(model)  # before the heavy imports: no model found is instant
    from dsvl_cli.inference.chat import run_chat

    settings = _settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    code = run_chat(
        model,
        images or [],
        prompt,
        settings,
        device,
        dtype,
        device_map,
        overflow,
        base_lm=base_lm,
        base_vision=base_vision,
    )
    raise typer.Exit(code)


@app.command("eval")
def eval_cmd(
    model: Path | None = typer.Argument(None, help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", help="Eval JSON set, or prepared JSONL."),
    out: Path | None = typer.Option(None, "--out", help="Results folder."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N tests/samples."),
    image_root: Path | None = typer.Option(None, "--image-root", help=IMAGE_ROOT_HELP),
    batch_size: int = typer.Option(8, "--batch-size", help="Batch for loss and answers."),
    max_new_tokens: int = MAX_NEW,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    repetition_penalty: float = REPETITION,
    seed: int = SEED,
    device: str = DEVICE,
    dtype: str = DTYPE,
    device_map: str | None = DEVICE_MAP,
    overflow: str = typer.Option(
        "error",
        "--overflow",
        help="A round that does not fit the context: error (its test fails there) | drop_oldest "
        "(the test's earliest rounds are forgotten).",
    ),
    base_lm: Path | None = BASE_LM,
    base_vision: Path | None = BASE_VISION,
) -> None:
    """Evaluate: the original's multi-round eval sets to CSV, or loss + accuracy on JSONL.

    A failing test (eval set) or sample (JSONL) is listed with its reason; the others still run.

    Exit status: 0 all evaluated; 1 some tests or samples failed (listed in outputs and summary).

    Exit status 2: bad usage or input that stops everything (nothing can run, unreadable file).
    """
    from dsvl_cli.model.discovery import model_or_newest

    model = model_or_newest(model)  # before the heavy imports: no model found is instant
    from dsvl_cli.inference.evaluate import exit_code, run_eval

    settings = _settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    out = out or Path("eval-results") / data.stem
    summary = run_eval(
        model,
        data,
        out,
        limit,
        image_root,
        batch_size,
        settings,
        device,
        dtype,
        device_map,
        overflow,
        base_lm=base_lm,
        base_vision=base_vision,
    )
    raise typer.Exit(exit_code(summary))


def main() -> None:
    """Console-script entry point: run the app, turning DsvlError into one line + exit 2."""
    try:
        app(prog_name="dsvl")
    except DsvlError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
