"""`dsvl recipes` (list the shipped recipes) and `dsvl recipes copy NAME [DEST]` (edit one).

Registered on the main app in dsvl_cli/cli.py; the library side is dsvl_cli/recipe_registry.py.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

stdout = Console(soft_wrap=True)

recipes_app = typer.Typer(
    help="List the shipped recipes, or copy one to edit (`dsvl train NAME` runs one as is).",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@recipes_app.callback()
def recipes_cmd(ctx: typer.Context) -> None:
    """List the shipped recipes: name, what it trains, file. `dsvl train NAME` runs one."""
    if ctx.invoked_subcommand is not None:
        return
    from dsvl_cli.recipe_registry import list_recipes

    recipes = list_recipes()
    width = max((len(r.name) for r in recipes), default=0)
    for recipe in recipes:
        stdout.print(
            f"{recipe.name:<{width}}  {recipe.description}  {recipe.path}",
            highlight=False,
            markup=False,
        )


@recipes_app.command("copy")
def copy_cmd(
    name: str = typer.Argument(..., help="Recipe name, e.g. tiny (see `dsvl recipes`)."),
    dest: Path | None = typer.Argument(None, help="File or folder to write (default ./NAME.yaml)."),
    force: bool = typer.Option(False, "--force", help="Overwrite DEST if it exists."),
) -> None:
    """Write an editable copy of a shipped recipe; then `dsvl train DEST`."""
    from dsvl_cli.recipe_registry import copy_recipe

    target = copy_recipe(name, dest, force)
    stdout.print(f"wrote {target}; train with: dsvl train {target}", highlight=False, markup=False)
