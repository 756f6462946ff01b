"""Where a pruned forward spends its time: the pruner's stages as named ranges, for profilers and timers.

The pruner (:mod:`fitprune.prune`, :mod:`fitprune.input_stage`) wraps each piece of its own work in
:func:`stage`. The stages do not nest; their names are :data:`STAGES`:

* ``input_stage`` — the selection before layer 0 (DivPrune, VisionZip, random) and the re-laid layer-0 cache;
* ``scoring`` — a pruning layer's scores (FitPrune's c and s, fused kernel or torch path; FastV; random);
* ``selection`` — which candidates go (the lowest scores) and the slots kept (the stable sort);
* ``dart`` — DART's selection at the MLP input (its scoring and selection in one);
* ``compaction`` — gathers and scatters of the hidden states (MLP in and out, layer output, final norm);
* ``reslice`` — attention masks and RoPE tables re-sliced to the survivors (prefill and decode steps).

While ``torch.profiler`` records, each stage is a ``record_function`` range named ``fitprune.<stage>``
(its kernels appear under it). While a :class:`StageTimer` is active, it adds up each stage's time.
Otherwise :func:`stage` returns a shared null context: one flag check, no range is made. A CUDA
graph replay runs none of this host code: profile or time the eager prefill.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

__all__ = ["PREFIX", "STAGES", "StageTimer", "stage"]

STAGES = ("input_stage", "scoring", "selection", "dart", "compaction", "reslice")
PREFIX = "fitprune."
_NULL = contextlib.nullcontext()
_timers: list["StageTimer"] = []  # active timers, innermost last
_profiler_enabled = torch._C._autograd._profiler_enabled  # True while torch.profiler (or autograd's) records


def stage(name: str):
    """Context manager around one stage of the pruner's work (see the module doc). Inside a
    ``torch.compile`` region (the compiled static decode) stages are not marked: there is no host
    code to time."""
    if torch.compiler.is_compiling():
        return _NULL
    if _timers:
        return _Timed(name)
    if _profiler_enabled():
        return torch.profiler.record_function(PREFIX + name)
    return _NULL


class _Timed:
    __slots__ = ("name", "range", "marks")

    def __init__(self, name: str):
        self.name = name
        self.range = torch.profiler.record_function(PREFIX + name) if _profiler_enabled() else None

    def __enter__(self):
        if self.range is not None:
            self.range.__enter__()
        self.marks = [t._begin() for t in _timers]
        return self

    def __exit__(self, *exc):
        for timer, mark in zip(_timers, self.marks):
            timer._end(self.name, mark)
        if self.range is not None:
            self.range.__exit__(*exc)
        return False


class StageTimer:
    """Adds up the time of each pruner stage while active (``with StageTimer() as t: ...``).

    ``device``: where the model runs (default: CUDA when available). On a CUDA device each stage is
    timed by CUDA events recorded around it, without waiting for the GPU: the span from the first
    kernel of the stage to its last, idle gaps included (read by :meth:`totals`, which synchronises).
    With ``sync=True`` the timer instead synchronises before and after each stage and reads the
    wall clock: the stage's own cost, launches included, at the price of stalling the pipeline it
    measures. On the CPU it reads the wall clock. Stages run while a CUDA graph is being captured are
    not timed (events and syncs are not allowed there).
    """

    def __init__(self, device: torch.device | str | None = None, sync: bool = False):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cuda = torch.device(device).type == "cuda"
        self.sync = sync
        self.counts: dict[str, int] = defaultdict(int)
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, object, object]] = []

    # ------------------------------------------------------------------ activation
    def __enter__(self) -> "StageTimer":
        _timers.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self in _timers:
            _timers.remove(self)

    def reset(self) -> None:
        self.counts.clear()
        self._seconds.clear()
        self._events.clear()

    # ------------------------------------------------------------------ reading
    def totals(self) -> dict[str, float]:
        """Seconds per stage so far (stages that did not run are absent)."""
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self._seconds[name] += start.elapsed_time(end) / 1000.0
            self._events.clear()
        return dict(self._seconds)

    def total(self, *names: str) -> float:
        """Seconds of the named stages together (all stages when none is named)."""
        totals = self.totals()
        return sum(v for k, v in totals.items() if not names or k in names)

    # ------------------------------------------------------------------ marks (called by stage())
    def _begin(self):
        if self.cuda:
            if torch.cuda.is_current_stream_capturing():
                return None
            if not self.sync:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                return event
            torch.cuda.synchronize()
        return time.perf_counter()

    def _end(self, name: str, mark) -> None:
        if mark is None:
            return
        self.counts[name] += 1
        if isinstance(mark, float):
            if self.cuda:
                torch.cuda.synchronize()
            self._seconds[name] += time.perf_counter() - mark
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._events.append((name, mark, event))
