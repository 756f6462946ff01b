"""GPU checks (run on the device machine: `python -m pytest -q -m gpu tests/test_gpu.py`)."""

from __future__ import annotations

import pytest
import torch
from reference import reference_forward
from tiny_models import FACTORIES, FAMILIES, IMAGE_ID, IMAGES, VIDEO_ID

import fitprune
from fitprune import Recipe
from fitprune.prune import cache_of

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_prefill_matches_reference_on_cuda(family):
    model, make_inputs = FACTORIES[family]()
    model = model.cuda()
    a, b = IMAGES[family]
    specs = [(5, a, 7), (3, b, 4), (4, None, 6)]
    batch = {k: v.cuda() for k, v in make_inputs(specs).items()}
    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), family=family)
    with fitprune.apply(model, recipe) as m:
        with torch.no_grad():
            logits = m(**batch).logits
        report = fitprune.last_report(m)
    width = batch["input_ids"].shape[1]
    for i, spec in enumerate(specs):
        single = {k: v.cuda() for k, v in make_inputs([(*spec, i)]).items()}
        n_vis = int(torch.isin(single["input_ids"], torch.tensor([IMAGE_ID, VIDEO_ID], device="cuda")).sum())
        counts = recipe.drop_counts(n_vis) if n_vis else [0] * 4
        ref, kept, dropped = reference_forward(model, single, counts, (IMAGE_ID, VIDEO_ID))
        pad = width - single["input_ids"].shape[1]
        assert [[p - pad for p in layer] for layer in report.dropped[i]] == dropped
        assert (logits[i, [p + pad for p in kept]] - ref).abs().max().item() <= 1e-4


def test_bf16_generate_runs_and_shortens_cache():
    model, make_inputs = FACTORIES["llava"]()
    model = model.cuda().to(torch.bfloat16)
    batch = {k: v.cuda() for k, v in make_inputs([(4, "img", 5), (4, "img", 5)]).items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    recipe = Recipe(drop_fractions=(0.0, 0.5, 0.0, 0.0), family="llava")
    with fitprune.apply(model, recipe) as m:
        out = m.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    length = batch["input_ids"].shape[1]
    assert cache_of(out).layers[2].keys.shape[-2] == length - 18 + 3
