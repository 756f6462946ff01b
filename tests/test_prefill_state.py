"""The per-prefill state (fitprune.prefill_state): copies, the read-only view probes get, its tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import FACTORIES, IMAGES

from fitprune import Recipe
from fitprune.apply import attach, remove
from fitprune.prefill_state import PrefillState, PrefillView
from fitprune.prune import Probe


def _state(bsz: int = 2, length: int = 10) -> PrefillState:
    visual = torch.zeros(bsz, length, dtype=torch.bool)
    visual[:, 3:7] = True
    real = torch.ones(bsz, length, dtype=torch.bool)
    real[1, :2] = False  # sample 1 is left-padded by 2
    return PrefillState.start(length, visual, real, lambda n: [1, 2, 0])


def _advance(state: PrefillState) -> None:
    """What one pruning layer does to a state, by hand: new tensors, counts, a version, cached work."""
    keep = torch.ones_like(state.valid)
    keep[:, 3] = False
    sel = torch.nonzero(keep)[:, 1].view(state.idx.shape[0], -1)
    state.dropped_positions[0] = torch.where(~keep, state.idx, -1)
    for name in ("idx", "visual", "text", "real"):
        setattr(state, name, getattr(state, name).gather(1, sel))
    state.valid = keep.gather(1, sel)
    state.alive_visual = [n - 1 for n in state.alive_visual]
    state.slots = [n - 1 for n in state.slots]
    state.version += 1
    state.versions.append((state.idx, state.valid, state.all_valid))
    state.layer_version += [0, 1]
    state.attn_counts.append((list(state.alive_real), list(state.alive_visual)))
    state.resliced[(1, 1)] = (state.idx.float(), state.idx.float() + 1)


def test_start_counts_on_the_host():
    s = _state()
    assert s.alive_visual == [4, 4] and s.alive_real == [10, 8] and s.first_visual == [3, 3]
    assert s.slots == [10, 10] and s.drops == [[1, 2, 0], [1, 2, 0]] and s.version == 0
    assert s.text[:, 7:].all() and not s.text[:, :7].any()  # text rows: after the last visual token
    assert s.initial_visual == s.alive_visual and s.initial_visual is not s.alive_visual
    assert s.width == 10 and s.all_valid and s.recipe_drops(1) == [2, 2] and s.first_candidate_row() == 3


def test_copy_gives_independent_containers_and_shares_tensors():
    s = _state()
    c = s.copy()
    for f in dataclasses.fields(s):
        a, b = getattr(s, f.name), getattr(c, f.name)
        if isinstance(a, (list, dict)):
            assert a == b and a is not b, f.name
    c.alive_visual.append(9)
    c.pending[3] = "x"
    c.versions.append(None)
    assert s.alive_visual == [4, 4] and not s.pending and len(s.versions) == 1
    assert c.idx is s.idx  # shared: the pruner replaces state tensors, never writes them in place
    _advance(c)
    assert s.version == 0 and s.idx.shape[1] == 10 and not s.dropped_positions and not s.attn_counts


def test_copy_can_clone_every_tensor_once():
    s = _state()
    _advance(s)
    c = s.copy(clone_tensors=True)
    originals = {id(t) for t in s.tensors()}
    clones = c.tensors()
    assert len(clones) == len(s.tensors()) and not originals & {id(t) for t in clones}
    for a, b in zip(s.tensors(), clones):
        assert torch.equal(a, b)
    assert c.versions[-1][0] is c.idx  # a tensor held twice stays one tensor in the copy
    c.idx.add_(100)
    assert s.idx.max() < 10


def test_copy_applies_changes_and_initial_copy_refuses_a_started_state():
    s = _state()
    assert s.copy(static=True).static and not s.static
    fresh = s.initial_copy()
    assert fresh.versions == s.versions and fresh.versions is not s.versions and fresh.visual is s.visual
    _advance(s)
    with pytest.raises(RuntimeError, match="no layer has run"):
        s.initial_copy()


def test_tensors_lists_every_tensor_field_once():
    s = _state()
    _advance(s)
    got = s.tensors()
    assert len({id(t) for t in got}) == len(got)
    ids = {id(t) for t in got}
    tensor_fields = [f.name for f in dataclasses.fields(s) if isinstance(getattr(s, f.name), torch.Tensor)]
    assert len(tensor_fields) >= 5
    for name in tensor_fields:
        assert id(getattr(s, name)) in ids, name
    for idx, valid, _ in s.versions:
        assert id(idx) in ids and id(valid) in ids
    assert id(s.dropped_positions[0]) in ids and all(id(t) in ids for t in s.resliced[(1, 1)])
    assert got[0] is s.idx  # field order


def test_read_only_view_reads_through_and_refuses_writes():
    s = _state()
    view = s.read_only()
    assert isinstance(view, PrefillView)
    assert view.input_len == 10 and view.idx is s.idx and view.width == s.width
    assert view.recipe_drops(0) == [1, 1] and view.alive_visual == (4, 4)
    for name, value in (("alive_visual", [0, 0]), ("idx", None), ("version", 3), ("new_field", 1)):
        with pytest.raises(AttributeError, match="read-only"):
            setattr(view, name, value)
    with pytest.raises(AttributeError, match="read-only"):
        del view.idx
    with pytest.raises(AttributeError):
        view.alive_visual.append(1)  # lists read as tuples
    with pytest.raises(TypeError):
        view.pending[1] = None  # dicts read as read-only mappings
    _advance(s)
    assert view.version == 1 and view.alive_visual == (3, 3)  # a live view
    snapshot = s.frozen()
    _advance(s)
    assert snapshot.version == 1 and s.version == 2


class _Recorder(Probe):
    def __init__(self):
        self.seen, self.errors = [], []

    def _try_write(self, state):
        try:
            state.alive_visual = []
        except AttributeError as e:
            self.errors.append(str(e))

    def begin(self, state):
        self.seen.append(type(state))
        self._try_write(state)

    def on_scores(self, layer, state, cross, self_, candidates):
        self.seen.append(type(state))
        self._try_write(state)
        return None

    def end(self, state, report):
        self.seen.append(type(state))
        self._try_write(state)


def test_probes_receive_read_only_views():
    model, make_inputs = FACTORIES["llava"]()
    batch = make_inputs([(5, IMAGES["llava"][0], 7)])
    probe = _Recorder()
    attach(model, Recipe(drop_fractions=(0.0,) * 4, family="llava"), probe=probe)
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        remove(model)
    assert probe.seen == [PrefillView] * 6  # begin, 4 layers, end
    assert len(probe.errors) == 6 and all("read-only" in e for e in probe.errors)
