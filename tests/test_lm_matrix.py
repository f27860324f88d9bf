"""The support matrix: every LM family the README names, through dsvl, MMCA on and off.

Per family and MMCA setting, with the default LoRA targets on the LM: forward + backward on a
conversation with an image (every adapter and the projector get a gradient), the text-only
logits and the training loss equal the LM's own `ForCausalLM` (its logit post-processing
included), and greedy generation with the KV cache equals generation without it.
`python tests/test_lm_matrix.py` prints the README's matrix table from the same code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from lm_matrix_helpers import (  # noqa: E402
    build,
    family_config,
    family_folder,
    image_batch,
    image_prompt,
    own_logits,
    text_ids,
)

from dsvl_cli.demo.lm_families import FAMILIES  # noqa: E402
from dsvl_cli.demo.synthetic import generate_synthetic  # noqa: E402
from dsvl_cli.model.builder import Built  # noqa: E402
from dsvl_cli.model.lm_support import check_language_model  # noqa: E402
from dsvl_cli.model.trainable import adapted_modules  # noqa: E402
from dsvl_cli.train.param_count import count_parameters  # noqa: E402

TOLERANCE = 1e-4  # fp32, same weights and kernels up to summation order


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("families")
    generate_synthetic(out, num=4, seed=0)
    return out


def max_logit_difference(built: Built, lm: Path) -> float:
    """Max |dsvl logits - the LM's own logits| over text-only ids, original vocabulary."""
    ids, base = text_ids(built)
    with torch.no_grad():
        ours = built.model(input_ids=ids).logits[..., :base]
    return float((ours - own_logits(lm, ids)).abs().max())


def loss_difference(built: Built) -> float:
    """Relative |training loss sum - cross-entropy of the full logits| (checked against the
    LM's own by `max_logit_difference`; the vocabulary here includes dsvl's added tokens)."""
    ids, _ = text_ids(built, seed=1)
    labels = ids.clone()
    labels[0, ::2] = -100
    labels[1, :10] = -100  # rows supervise different positions: the union is asked for
    with torch.no_grad():
        out = built.model(input_ids=ids, labels=labels)
        reference = built.model(input_ids=ids).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    expected = F.cross_entropy(reference[keep], targets[keep], reduction="sum")
    assert int(out.num_tokens) == int(keep.sum())
    return float((out.loss_sum - expected).abs() / expected)


def check_train_step(built: Built, shapes: Path) -> dict[str, int]:
    """Forward + backward with an image; returns the adapted modules of the LM."""
    model = built.model.train()
    out = model(**image_batch(built, shapes))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    adapters = [(n, p) for n, p in model.named_parameters() if "lora_B" in n]
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in adapters)
    projector = [p.grad for p in model.mm_projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in projector)
    return adapted_modules(model.language_model)


def check_cached_generation(built: Built, shapes: Path) -> None:
    """Greedy tokens and step logits with the KV cache equal those without it."""
    model, tok = built.model.eval(), built.tokenizer
    ids, pixels = image_prompt(built, shapes)
    settings = {
        "max_new_tokens": 6,
        "do_sample": False,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": None,
        "return_dict_in_generate": True,
        "output_logits": True,
    }
    with torch.no_grad():
        cached = model.generate(input_ids=ids, pixel_values=pixels, use_cache=True, **settings)
        fresh = model.generate(input_ids=ids, pixel_values=pixels, use_cache=False, **settings)
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.logits, fresh.logits, strict=True):
        assert torch.allclose(a, b, atol=TOLERANCE, rtol=0)


def run_family(shapes: Path, family: str, mmca: bool) -> dict[str, object]:
    """Every check of one matrix cell; returns what the README table shows."""
    lm = family_folder(shapes, family)
    config = family_config(shapes, lm, model={"mmca": mmca}, trainable={"language_model": "lora"})
    # What `--dry-run` does with the config: accepted, every part counted.
    check_language_model(config.model)
    assert all(part.total is not None for part in count_parameters(config).parts)
    built = build(config)
    logit_diff = max_logit_difference(built, lm)
    assert logit_diff < TOLERANCE, f"{family}: logits differ from the LM's own by {logit_diff}"
    loss_diff = loss_difference(built)
    assert loss_diff < TOLERANCE, f"{family}: loss differs from the LM's own by {loss_diff}"
    check_cached_generation(built, shapes)
    adapted = check_train_step(built, shapes)
    return {"logit_diff": logit_diff, "lora": sorted(adapted)}


@pytest.mark.parametrize("mmca", [True, False], ids=["mmca", "causal"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family(shapes: Path, family: str, mmca: bool) -> None:
    result = run_family(shapes, family, mmca)
    # Every linear layer of the decoder blocks is adapted (PEFT's all-linear), fused or not.
    expected = {
        "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
    }.get(family, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    assert result["lora"] == expected


def matrix_table(root: Path) -> str:
    """The README's support matrix (markdown), from `run_family` on every family."""
    generate_synthetic(root, num=4, seed=0)
    rows = [
        "| family | MMCA on | MMCA off | LoRA targets (default) | max logit diff |",
        "|---|" * 5,
    ]
    rows[1] = "|---|---|---|---|---|"
    for family in sorted(FAMILIES):
        cells = [run_family(root, family, mmca) for mmca in (True, False)]
        diff = max(c["logit_diff"] for c in cells)
        lora = ", ".join(cells[0]["lora"])
        # run_family asserted every check of both cells, so both read "yes"
        rows.append(f"| {family} | yes | yes | {lora} | {diff:.1e} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(matrix_table(Path(tmp)))
