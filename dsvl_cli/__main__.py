"""`python -m dsvl_cli` runs the `dsvl` command."""

from dsvl_cli.cli import main

main()
