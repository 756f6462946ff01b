"""One-launch selection and state compaction (fitprune.kernels.fused_select) against the torch path.

The reference is what the pruner does without the kernel: ``scoring.select_drops``, then a stable sort
of the keep flags for the slot order, then gathers of the per-slot state. Every output must be equal,
not close: the drops decide which tokens survive. Cases cover ties (integer scores), bf16 scores,
signed zeros, left padding, k above the number of candidates and k = 0. On the CPU the kernel runs in
Triton's interpreter, in one subprocess (TRITON_INTERPRET=1 must be set before Triton loads); with a
CUDA device the same checks run compiled at real sizes (``-m gpu``). Without Triton these tests skip.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import HAS_TRITON, IN_INTERPRETER, interpreted, needs_triton, run_interpreted
from tiny_models import FACTORIES, FAMILIES, IMAGES

import fitprune
from fitprune import Recipe, scoring
from fitprune.kernels import fused_scores, fused_select

NAMES = ("drop", "dropped", "sel", "valid", "idx", "visual", "text", "real")


def _reference(scores, cand, k, valid, idx, vis, txt, real, new_len):
    drop = scoring.select_drops(scores, cand, k)
    keep = valid & ~drop
    sel = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, keep.shape[1] - new_len:]
    return {"drop": drop, "dropped": torch.where(drop, idx, -1), "sel": sel, "valid": keep.gather(1, sel),
            "idx": idx.gather(1, sel), "visual": vis.gather(1, sel), "text": txt.gather(1, sel),
            "real": real.gather(1, sel)}


def _case(trial: int, bsz: int, n_slots: int, device):
    g = torch.Generator().manual_seed(trial)
    valid = torch.ones(bsz, n_slots, dtype=torch.bool)
    for b in range(bsz):
        valid[b, : int(torch.randint(0, n_slots // 3 + 1, (1,), generator=g))] = False  # left padding
    vis = torch.rand(bsz, n_slots, generator=g) < 0.6
    cand = vis & valid
    txt, real = ~vis & valid, valid.clone()
    idx = torch.stack([torch.randperm(3 * n_slots, generator=g)[:n_slots].sort().values for _ in range(bsz)])
    kind = trial % 3
    if kind == 0:
        scores = torch.randint(0, 4, (bsz, n_slots), generator=g).float()  # many ties
    elif kind == 1:
        scores = torch.randn(bsz, n_slots, generator=g).to(torch.bfloat16)
    else:
        zero = torch.rand(bsz, n_slots, generator=g) < 0.3
        scores = torch.where(zero, -0.0, torch.randn(bsz, n_slots, generator=g)) * torch.where(zero, 1.0, -1.0)
    n_cand = cand.sum(1)
    k = torch.stack([torch.randint(0, int(n) + 3, (1,), generator=g)[0] for n in n_cand])
    if trial % 5 == 0:
        k[0] = 0
    new_len = max(1, max(int(v) - int(c) for v, c in zip(valid.sum(1), torch.minimum(k, n_cand))))
    args = [t.to(device) for t in (scores, cand, k, valid, idx, vis, txt, real)]
    return args, new_len


def _check(trials: int, bsz: int, n_slots: int, device) -> None:
    for trial in range(trials):
        args, new_len = _case(trial, bsz, n_slots + trial % 7, device)
        want = _reference(*args, new_len)
        got = fused_select.fused_select_compact(*args, new_len)
        for name in NAMES:
            assert torch.equal(got[name], want[name]), (trial, name)


@pytest.mark.slow
@needs_triton
def test_select_kernel_under_triton_interpreter():
    if IN_INTERPRETER:
        pytest.skip("already inside the interpreter subprocess")
    run_interpreted(__file__)


@interpreted
def test_interpreted_select_matches_torch_path(interpreter):
    _check(trials=30, bsz=3, n_slots=40, device="cpu")


@interpreted
@pytest.mark.parametrize("family", FAMILIES)
def test_interpreted_pruner_takes_the_kernel_and_drops_the_same_tokens(interpreter, monkeypatch, family):
    model, make_inputs = FACTORIES[family]()
    a, b = IMAGES[family]
    batch = make_inputs([(5, a, 7), (3, b, 4), (4, None, 6)])  # padded, two image sizes, one text-only sample
    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), family=family)
    with fitprune.apply(model, recipe, fused_scores=False) as m, torch.no_grad():
        want_logits = m(**batch).logits
        want = fitprune.last_report(m)
    calls = []
    original = fused_select.fused_select_compact

    def spy(*args, **kwargs):
        calls.append(args[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_scores, "supported", lambda where: True)  # both kernels run on the CPU here
    monkeypatch.setattr(fused_select, "fused_select_compact", spy)
    with fitprune.apply(model, recipe, fused_scores=None) as m, torch.no_grad():
        got_logits = m(**batch).logits
        got = fitprune.last_report(m)
        generated = m.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(calls) == 4  # both pruning layers, in the forward and in generate's prefill (not in decode)
    assert got.dropped == want.dropped and (got.kept == want.kept).all()
    torch.testing.assert_close(got_logits, want_logits)
    with fitprune.apply(model, recipe, fused_scores=False) as m, torch.no_grad():
        assert torch.equal(generated, m.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0))


def test_bad_sizes_are_refused():
    if not HAS_TRITON:
        pytest.skip("needs triton")
    args, _ = _case(0, 1, 8, "cpu")
    with pytest.raises(ValueError, match="new_len"):
        fused_select.fused_select_compact(*args, 0)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("bsz,n_slots", [(1, 651), (8, 651), (8, 3003)])
def test_cuda_select_matches_torch_path(monkeypatch, bsz, n_slots):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _check(trials=12, bsz=bsz, n_slots=n_slots, device="cuda")
