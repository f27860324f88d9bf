"""Teacher-forced evaluation during training: loss and perplexity over the eval split.

Each eval sample is scored exactly once across ranks (`batches.EvalShard` never pads), so 1 and
N processes give the same loss. Ranks with fewer batches run placeholder forwards until every rank
has run as many as the busiest one: under ZeRO-3 each forward gathers parameters collectively.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dsvl_cli import dist
from dsvl_cli.model.builder import Built
from dsvl_cli.train.batches import model_inputs, placeholder_inputs


@torch.no_grad()
def evaluate(engine: Any, loader: Any, built: Built, device: torch.device, precision: str) -> dict:
    """{"eval/loss", "eval/ppl", "eval/tokens", "eval/samples", "eval/skipped"} over every rank.

    `eval/loss` is the mean over every supervised token of the split; NaN (never a number that
    looks fine) when the model gives a non-finite loss; None when no token was scored (no eval
    data, or every eval sample skipped). `eval/skipped` counts samples the dataset skipped.
    """
    engine.eval()
    mine = torch.tensor([float(len(loader))], device=device)
    rounds = int(dist.all_reduce_max(mine.clone()).item())
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    batches = iter(loader)
    for _ in range(rounds):
        batch = next(batches, None)
        if batch is None:
            engine(**placeholder_inputs(built, device))
            continue
        out = engine(**model_inputs(batch, built, device, precision))
        totals[0] += out.loss_sum.double()
        totals[1] += out.num_tokens.double()
        totals[2] += batch.size
        totals[3] += len(batch.skipped)
    engine.train()
    dist.all_reduce_sum(totals)
    tokens = float(totals[1])
    loss = float(totals[0]) / tokens if tokens > 0 else None
    finite = loss is not None and math.isfinite(loss)
    return {
        "eval/loss": loss,
        "eval/ppl": math.exp(min(loss, 50.0)) if finite else None,
        "eval/tokens": tokens,
        "eval/samples": float(totals[2]),
        "eval/skipped": float(totals[3]),
    }
