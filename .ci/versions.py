"""Print the installed version of every bounded dependency next to its bound in pyproject.toml.

Run by .ci/run after each install so a CI log says exactly which versions were tested.
"""

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]
for spec in project["dependencies"]:
    name = re.split(r"[<>=!~ ;\[]", spec, maxsplit=1)[0]
    try:
        installed = version(name)
    except PackageNotFoundError:
        installed = "not installed"
    print(f"{name:18} {installed:14} {spec}")
