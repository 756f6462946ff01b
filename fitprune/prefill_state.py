"""The state of one pruned prefill: what the pruner's hooks share while one forward runs (DESIGN §3).

:class:`PrefillState` is made by the model's top-level pre-hook (:meth:`PrefillState.start`, the one
host sync of a prefill) and advanced by the layer hooks of :class:`fitprune.prune.Pruner`. It is in
*compressed coordinates*: slot ``j`` of sample ``b`` holds the token at original position
``idx[b, j]``; ``valid[b, j]`` is False on slots that only left-pad a ragged batch.

Its fields are the one list of what a prefill carries; everything that copies or walks the state
(:meth:`~PrefillState.copy`, :meth:`~PrefillState.initial_copy`, :meth:`~PrefillState.tensors`,
the read-only :class:`PrefillView` probes receive, :mod:`fitprune.graphs`) derives from
:func:`dataclasses.fields`, so a new field needs no other edit.

Invariant the copies rely on: the pruner never writes a state tensor in place. Each pruning layer
*replaces* ``idx``, ``valid``, ``visual``, ``text`` and ``real`` with gathered tensors, so copies may
share tensors safely; only host containers (lists, dicts) are mutated, and copies get their own.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable

import torch

__all__ = ["DecodeSession", "PrefillState", "PrefillView", "Version", "cache_of"]

Version = tuple[torch.Tensor, torch.Tensor, bool]  # (idx, valid, every slot valid) after some pruning layers


@dataclass(eq=False)
class PrefillState:
    """Per-forward state of a pruned prefill, in compressed coordinates (B, Lc).

    Token counts are kept on the host (lists, one entry per sample) next to the device tensors, so
    lengths, row ranges and "anything to do?" checks never wait for the GPU. They are exact: the
    recipe fixes how many tokens each sample drops, and a probe's data-dependent drops are counted
    once per layer.
    """

    input_len: int  # prompt length L (original coordinates)
    # device tensors, (B, Lc), replaced (never written in place) by every pruning layer
    idx: torch.Tensor  # original position of each slot
    valid: torch.Tensor  # False on slots that only pad a ragged batch
    visual: torch.Tensor  # visual-token slots
    real: torch.Tensor  # False on the model's own padding tokens
    text: torch.Tensor  # real tokens after the sample's last visual token (FitPrune's text rows T)
    # host counts, one entry per sample
    alive_visual: list[int]  # alive visual tokens
    alive_real: list[int]  # alive non-padding tokens
    first_visual: list[int]  # original position of the first visual token (input_len: none)
    slots: list[int]  # valid slots (all tokens incl. model padding)
    drops: list[list[int]]  # [b][layer] the recipe's drops after each layer (shared, read-only lists)
    initial_visual: list[int]  # visual tokens of the prompt
    initial_real: list[int]  # non-padding tokens of the prompt
    n_text: list[int]  # text rows T (real tokens after the last visual one); never dropped
    # progress through the layers
    version: int = 0  # how many pruning layers have run so far
    layer_version: list[int] = field(default_factory=list)  # version each layer saw (decode re-slices with it)
    versions: list[Version] = field(default_factory=list)  # (idx, valid, all valid) of each version
    attn_counts: list[tuple[list[int], list[int]]] = field(default_factory=list)  # per layer (real, visual) entering
    # per-layer work in flight and caches of this forward
    pending: dict[int, tuple[torch.Tensor, list[int]]] = field(default_factory=dict)  # layer -> (drop mask, counts)
    selection: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (sel, new_valid)
    resliced: dict[tuple[int, int], Any] = field(default_factory=dict)  # (id of input, version) -> re-sliced value
    dropped_positions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, Lc) original idx or -1
    deferred: dict[int, tuple[torch.Tensor, list[int]]] = field(default_factory=dict)  # layer -> (keys, counts), DART
    decode_views: dict[int, Version] = field(default_factory=dict)  # layer -> full-length cache view
    cache: object | None = None  # the KV cache layer 0 saw, while a pre-LLM recipe must re-lay it
    static: bool = False  # True: the device tensors are a CUDA graph's, overwritten by its next replay

    @classmethod
    def start(cls, input_len: int, visual: torch.Tensor, real: torch.Tensor,
              drops_for: Callable[[int], list[int]]) -> "PrefillState":
        """The state before layer 0 of a prompt: ``visual``/``real`` (B, L) bool; ``drops_for(n)`` the
        recipe's per-layer drops for a sample with n visual tokens. Syncs with the device once."""
        bsz = visual.shape[0]
        positions = torch.arange(input_len, device=visual.device)
        idx = positions.expand(bsz, -1)
        valid = torch.ones_like(visual)
        last_visual = torch.where(visual, positions, -1).amax(1)
        first_visual = torch.where(visual, positions, input_len).amin(1)
        text = real & (positions[None, :] > last_visual[:, None])
        alive_visual, alive_real, first, n_text = torch.stack(
            [visual.sum(1), real.sum(1), first_visual, text.sum(1)]).tolist()
        return cls(
            input_len=input_len, idx=idx, valid=valid, visual=visual, real=real, text=text,
            alive_visual=alive_visual, alive_real=alive_real, first_visual=first, slots=[input_len] * bsz,
            drops=[drops_for(n) for n in alive_visual], initial_visual=list(alive_visual),
            initial_real=list(alive_real), n_text=n_text, versions=[(idx, valid, True)],
        )

    def __repr__(self) -> str:  # the default would print every tensor
        return (f"PrefillState(batch={len(self.slots)}, input_len={self.input_len}, version={self.version}, "
                f"alive_visual={self.alive_visual})")

    # ------------------------------------------------------------------ views
    @property
    def width(self) -> int:
        """Slots of the compressed sequence (the longest sample's valid slots)."""
        return max(self.slots)

    @property
    def all_valid(self) -> bool:
        return min(self.slots) == self.width

    def recipe_drops(self, layer: int) -> list[int]:
        """Tokens each sample really drops after ``layer`` under the recipe (never more than alive)."""
        return [min(d[layer], a) for d, a in zip(self.drops, self.alive_visual)]

    def width_after(self, counts: list[int]) -> int:
        """Slots per row after dropping ``counts[b]`` from each row: the longest row's survivors."""
        return max(n - k for n, k in zip(self.slots, counts))

    def first_candidate_row(self) -> int:
        """A slot index no later than any sample's first alive visual slot (system rows come first)."""
        width = self.width
        return min(width - n + f for n, f in zip(self.slots, self.first_visual) if f < self.input_len)

    # ------------------------------------------------------------------ advancing
    def advance(self, layer: int, sel: torch.Tensor, new_valid: torch.Tensor, fused: dict | None = None) -> None:
        """Take layer ``layer``'s pending drops out of the state: the slots ``sel`` (B, Lc') are kept, with
        ``new_valid`` their valid flags. ``fused``: the slots' state as the selection kernel laid it out
        (:mod:`fitprune.kernels.fused_select`), taken instead of gathering it here."""
        drop, counts = self.pending.pop(layer)
        if fused is not None:
            self.dropped_positions[layer] = fused["dropped"]
            self.idx, self.visual, self.text, self.real = (fused[n] for n in ("idx", "visual", "text", "real"))
        else:
            self.dropped_positions[layer] = torch.where(drop, self.idx, -1)
            self.idx, self.visual, self.text, self.real = (
                t.gather(1, sel) for t in (self.idx, self.visual, self.text, self.real))
        self.valid = new_valid
        self.slots = [n - k for n, k in zip(self.slots, counts)]
        self.alive_visual = [n - k for n, k in zip(self.alive_visual, counts)]
        self.alive_real = [n - k for n, k in zip(self.alive_real, counts)]
        self.version += 1
        self.versions.append((self.idx, self.valid, self.all_valid))
        self.selection.pop(layer)

    # ------------------------------------------------------------------ copies
    def copy(self, clone_tensors: bool = False, **changes) -> "PrefillState":
        """An independent copy: its own lists and dicts (one level deep: the tuples and the per-sample
        ``drops`` lists inside, which the pruner never mutates, are shared), so advancing one never
        changes the other. Tensors are shared (the pruner replaces them, never writes them in place)
        unless ``clone_tensors``. ``changes`` set fields of the copy (``static=True``)."""
        new, memo = {}, {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if clone_tensors:
                value = _cloned(value, memo)
            if isinstance(value, list):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            new[f.name] = value
        new.update(changes)
        return PrefillState(**new)

    def initial_copy(self) -> "PrefillState":
        """A fresh state for another run of the same prefill, made before any layer ran: it shares
        the input-derived tensors and copies the host counts, without the host sync of :meth:`start`
        (so it may be made while a CUDA graph is being captured)."""
        if self.version or self.attn_counts or self.pending or self.dropped_positions:
            raise RuntimeError("initial_copy() needs a state no layer has run on yet")
        return self.copy()

    def read_only(self) -> "PrefillView":
        """A live read-only view (what probes receive): reads follow this state as layers advance it."""
        return PrefillView(self)

    def frozen(self) -> "PrefillView":
        """A read-only snapshot: a read-only view of a copy, which later layers do not change."""
        return PrefillView(self.copy())

    # ------------------------------------------------------------------ tensors
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds, each once, in field order (containers walked in their
        order): what a CUDA graph capture must keep alive and what its replay rewrites."""
        out: list[torch.Tensor] = []
        seen: set[int] = set()
        for f in dataclasses.fields(self):
            for t in _walk_tensors(getattr(self, f.name)):
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        return out


def _walk_tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk_tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _walk_tensors(v)


def _cloned(value, memo: dict):
    """``value`` with every tensor cloned; a tensor held twice (``idx`` and ``versions[0]``) is cloned once."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.clone()
        return memo[id(value)]
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v, memo) for v in value)
    if isinstance(value, dict):
        return {k: _cloned(v, memo) for k, v in value.items()}
    return value


class PrefillView:
    """Read-only view of a :class:`PrefillState`, as :class:`fitprune.prune.Probe` methods receive it.

    Every field, property and method of the state reads through; assigning or deleting an
    attribute raises ``AttributeError``; lists read as tuples and dicts as read-only mappings, so
    a probe cannot change the pruner's bookkeeping. Tensors are the state's own: do not write
    them in place.
    """

    __slots__ = ("_state",)

    def __init__(self, state: PrefillState):
        object.__setattr__(self, "_state", state)

    def __getattr__(self, name: str):
        value = getattr(object.__getattribute__(self, "_state"), name)
        if isinstance(value, list):
            return tuple(value)
        if isinstance(value, dict):
            return MappingProxyType(value)
        return value

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"the prefill state a probe sees is read-only (tried to set {name!r}); "
                             "return a drop mask from on_scores to decide drops")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the prefill state a probe sees is read-only (tried to delete {name!r})")

    def __repr__(self) -> str:
        s = object.__getattribute__(self, "_state")
        return f"PrefillView(batch={len(s.slots)}, input_len={s.input_len}, version={s.version})"


@dataclass
class DecodeSession:
    """What a decode step needs from the pruned prefill that filled the cache."""

    cache: weakref.ref
    input_len: int
    versions: list[Version]
    layer_version: list[int]
    decode_views: dict[int, Version]  # layers whose cache is full length

    @classmethod
    def of(cls, state: PrefillState, cache) -> "DecodeSession":
        return cls(cache=weakref.ref(cache), input_len=state.input_len, versions=state.versions,
                   layer_version=state.layer_version, decode_views=state.decode_views)


def cache_of(mapping) -> object | None:
    """The KV cache in forward kwargs or outputs: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    get = mapping.get if isinstance(mapping, dict) else (lambda name: getattr(mapping, name, None))
    cache = get("cache")
    return cache if cache is not None else get("past_key_values")
