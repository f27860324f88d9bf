"""Run `fit` as one rank of a torchrun job and write this rank's loss sequence.

Usage: torchrun --nproc_per_node N tests/dist_fit.py OUT_JSON_DIR RECIPE [key=value ...]
Used by tests/test_distributed.py to compare what every rank saw.
"""

import json
import os
import sys
from pathlib import Path

from dsvl_cli.config import load_config
from dsvl_cli.train.trainer import fit

out, recipe, *overrides = sys.argv[1:]
result = fit(load_config(Path(recipe), overrides))
rank = int(os.environ.get("RANK", "0"))
Path(out, f"losses-rank{rank}.json").write_text(json.dumps(result.losses))
