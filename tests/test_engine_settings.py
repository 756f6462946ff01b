"""The engine's explicit settings: the fused-scores switch (read once, at apply) and the profiling ranges."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FACTORIES, IMAGES

import fitprune
from fitprune import Recipe, profiling, scoring
from fitprune.kernels import FUSED_SCORES_ENV, fused_scores
from fitprune.stats import collect_stats

RECIPE = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), family="llava")


@pytest.fixture(scope="module")
def llava():
    model, make_inputs = FACTORIES["llava"]()
    a, b = IMAGES["llava"]
    return model, make_inputs([(5, a, 7), (3, b, 4)])


@pytest.fixture
def fake_kernel(monkeypatch):
    """Pretend the fused kernel can run here; its stand-in computes the torch path's c and s and
    records each call, so which path the pruner took is visible."""
    calls = []

    def kernel(query, key, mask, scaling, row_start, text_rows, visual_rows):
        calls.append(row_start)
        probs = scoring.head_max_probs(query, key, mask, scaling, row_start=row_start)
        return scoring.cross_self(probs, text_rows, visual_rows)

    def flags_kernel(query, key, mask, scaling, row_start, text, valid, visual, inverse_counts, lse=None):
        # the flags entry point must get the counts its rows have
        text_rows, visual_rows = text[:, row_start:] & valid[:, row_start:], visual[:, row_start:]
        counts = torch.stack([text_rows.sum(1), visual_rows.sum(1)], 1).float().clamp(min=1)
        assert torch.equal(inverse_counts, 1 / counts)
        return kernel(query, key, mask, scaling, row_start, text_rows, visual_rows)

    monkeypatch.setattr(fused_scores, "supported", lambda where: True)
    monkeypatch.setattr(fused_scores, "fused_cross_self", kernel)
    monkeypatch.setattr(fused_scores, "fused_cross_self_flags", flags_kernel)
    return calls


def _run(model, batch, **kw):
    with fitprune.apply(model, RECIPE, **kw) as m, torch.no_grad():
        logits = m(**batch).logits
        return logits, fitprune.last_report(m).dropped


def test_fused_true_where_the_kernel_cannot_run_fails_at_apply(llava):
    model, _ = llava
    if fused_scores.supported(next(model.parameters())):
        pytest.skip("the fused kernel can run here")
    with pytest.raises(ValueError, match="fused_scores=True needs the fused Triton kernel"):
        fitprune.apply(model, RECIPE, fused_scores=True)
    assert getattr(model, "_fitprune", None) is None  # nothing was applied
    with pytest.raises(TypeError, match="True, False or None"):
        fitprune.apply(model, RECIPE, fused_scores="yes")


def test_fused_setting_is_honoured(llava, fake_kernel, monkeypatch):
    model, batch = llava
    monkeypatch.delenv(FUSED_SCORES_ENV, raising=False)
    auto_logits, auto_dropped = _run(model, batch)
    assert len(fake_kernel) == 2  # both pruning layers scored by the (stand-in) kernel
    fake_kernel.clear()
    torch_logits, torch_dropped = _run(model, batch, fused_scores=False)
    assert fake_kernel == []
    assert torch_dropped == auto_dropped and torch.equal(torch_logits, auto_logits)
    _run(model, batch, fused_scores=True)
    assert len(fake_kernel) == 2


def test_environment_default_is_read_once_at_apply(llava, fake_kernel, monkeypatch):
    model, batch = llava
    monkeypatch.setenv(FUSED_SCORES_ENV, "0")
    with fitprune.apply(model, RECIPE) as m, torch.no_grad():
        assert m._fitprune.pruner.fused_scores is False
        monkeypatch.setenv(FUSED_SCORES_ENV, "1")  # too late: the setting was taken at apply
        m(**batch)
    assert fake_kernel == []
    _run(model, batch, fused_scores=True)  # an explicit setting wins over the environment
    assert len(fake_kernel) == 2
    monkeypatch.setenv(FUSED_SCORES_ENV, "0")
    fake_kernel.clear()
    collect_stats(model, [batch], fused_scores=None)
    assert fake_kernel == []
    collect_stats(model, [batch], fused_scores=True)
    assert len(fake_kernel) == 4  # every layer is scored for statistics


def test_fused_true_that_cannot_run_at_call_time_says_so(llava, monkeypatch):
    model, batch = llava
    monkeypatch.setattr(fused_scores, "supported", lambda where: isinstance(where, torch.device))
    with fitprune.apply(model, RECIPE, fused_scores=True) as m, torch.no_grad():
        with pytest.raises(RuntimeError, match="fused_scores=True, but the fused kernel cannot run on cpu"):
            m(**batch)


# ------------------------------------------------------------------------------------------ profiling


def test_no_range_is_made_without_a_profiler_or_timer():
    assert profiling.stage("scoring") is profiling._NULL


def test_stage_timer_times_the_pruner_stages(llava):
    model, batch = llava
    with fitprune.apply(model, RECIPE), torch.no_grad(), profiling.StageTimer("cpu") as timer:
        model(**batch)
    totals = timer.totals()
    assert set(totals) == {"scoring", "selection", "compaction", "reslice"}
    assert all(v > 0 for v in totals.values())
    assert timer.counts["scoring"] >= 2 and timer.counts["selection"] >= 2  # both pruning layers
    assert timer.counts["reslice"] == 2  # the layers after a pruning layer: 2 and 3
    assert timer.total() == pytest.approx(sum(totals.values()))
    timer.reset()
    assert timer.totals() == {}
    with profiling.StageTimer("cpu") as idle, torch.no_grad():
        model(**batch)  # no recipe applied: the stock model runs no stage
    assert idle.totals() == {}


@pytest.mark.parametrize("scoring_rule,stage", [("dart", "dart"), ("divprune", "input_stage")])
def test_stage_timer_sees_dart_and_the_input_stage(llava, scoring_rule, stage):
    model, batch = llava
    if scoring_rule == "divprune":
        recipe = Recipe(drop_fractions=(0.0,) * 4, input_fraction=0.5, scoring="divprune", family="llava")
    else:
        recipe = Recipe(drop_fractions=(0.0, 0.25, 0.0, 0.0), scoring="dart", family="llava")
    with fitprune.apply(model, recipe), torch.no_grad(), profiling.StageTimer("cpu") as timer:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert timer.counts[stage] >= 1 and timer.totals()[stage] > 0
    assert "scoring" not in timer.counts  # neither rule runs the attention-score path
    assert timer.counts["reslice"] > 0  # decode steps re-slice too


def test_profiler_sees_named_ranges(llava):
    from torch.profiler import ProfilerActivity, profile

    model, batch = llava
    with fitprune.apply(model, RECIPE), torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**batch)
    names = {e.key for e in prof.key_averages()}
    for stage in ("scoring", "selection", "compaction", "reslice"):
        assert profiling.PREFIX + stage in names, stage
    assert set(profiling.STAGES) >= {"scoring", "selection", "compaction", "reslice", "dart", "input_stage"}
