"""Dataset source adapters: raw datasets in their published layouts -> `Conversation`s.

Use `get_source(name)` and a `SourceContext`; `check` lists missing inputs with download hints,
`load` yields validated conversations and counts every dropped record in the context.
"""

from dsvl_cli.data.sources.base import RequiredFile, Source, SourceContext
from dsvl_cli.data.sources.registry import DSVL_NAMES, GENERATED_SOURCES, SOURCES, get_source

__all__ = [
    "DSVL_NAMES",
    "GENERATED_SOURCES",
    "SOURCES",
    "RequiredFile",
    "Source",
    "SourceContext",
    "get_source",
]
