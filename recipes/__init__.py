"""The recipes shipped with dsvl, installed as the `dsvl_cli.recipes` package (YAML files only).

This file makes the folder an importable package so `importlib.resources.files("dsvl_cli.recipes")`
finds the recipes both from a wheel and from an editable install; `dsvl recipes` lists them.
"""
