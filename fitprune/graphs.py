"""CUDA-graph replay of the language model's prefill: pruning that pays at batch 1.

At batch 1 a 7B prefill is bound by Python dispatch, not by the GPU: every layer launches a few
dozen kernels, and a pruning layer adds its scoring, selection and gathers. A recipe fixes how many
tokens each layer keeps, so for one input geometry every shape of the pruned prefill is known in
advance. :func:`graph_prefill` captures the language model's prefill once per geometry (input
shape, where the visual tokens sit, the recipe) and replays it as one launch afterwards::

    with fitprune.apply(model, recipe), fitprune.graph_prefill(model):
        out = model.generate(**inputs, max_new_tokens=32)   # prefill replayed, decode eager

What is captured: the decoder stack called with ``inputs_embeds`` (vision tower and merge stay
eager). What runs eagerly instead, and is counted in :attr:`PrefillGraphs.eager` by reason:
decode steps, padded batches (a 2-D mask with zeros), gradients on, a statistics probe, outputs of
attentions or hidden states, caches other than a ``DynamicCache`` or a static cache a recipe armed
(:mod:`fitprune.static_cache`), tensors off the GPU. A replay copies the cache into the caller's
cache and clones the hidden states, so outputs of an earlier call stay valid after the next one.
Each captured geometry keeps its own memory pool (about one prefill's activations); ``max_graphs`` bounds how many are kept (least recently used go first).

Two things keep a replay as fast as the eager kernels (measured on an H100, LLaVA-1.5-7B batch 8:
without them the graphed unpruned prefill was 10 % slower than eager):

* transformers up to at least 5.17 treats a capturing stream like ``torch.export`` tracing and then
  never lets SDPA run with ``is_causal``: it builds a 4-D causal mask, which moves attention from the
  flash kernel to the memory-efficient one (19 ms instead of 8 ms per prefill). While capturing,
  :func:`_causal_skip_while_capturing` decides as eager transformers does (no padding mask, square
  or one-row attention: no mask needed);
* the captured cache stores each layer's keys and values without the concatenation a
  ``DynamicCache`` does (:class:`_NoCopyCache`); a replay then copies them once, contiguously, into
  the caller's cache. The stock path copies once too.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers import masking_utils
from transformers.cache_utils import DynamicCache, DynamicLayer

from . import static_cache
from .adapters import get_adapter
from .prefill_state import PrefillState, cache_of

__all__ = ["PrefillGraphs", "graph_prefill", "prefill_graphs"]

_ATTR = "_fitprune_graphs"
_CACHE_NAMES = ("past_key_values", "cache")
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states")


@dataclass
class _Entry:
    graph: object  # torch.cuda.CUDAGraph or _EmulatedGraph
    inputs: dict[str, torch.Tensor]  # static input buffers, copied into before each replay
    output: object  # the captured forward's output (its tensors are the graph's)
    state: PrefillState | None  # the pruner state the capture ended with (host counts + static tensors)
    keep_alive: list = field(default_factory=list)  # tensors the graph reads that live outside its pool


def _hand_over(cache: DynamicCache, layer_idx: int, keys, values, *args, **kwargs):
    """Fill layer ``layer_idx`` of ``cache`` with ``keys``/``values``: an empty plain layer keeps the
    tensors themselves (the stock ``DynamicLayer`` concatenates them onto an empty tensor, a copy);
    other layers (sliding windows etc.) update as stock."""
    DynamicCache.update(cache, keys[..., :0, :], values[..., :0, :], layer_idx, *args, **kwargs)  # makes the layer
    layer = cache.layers[layer_idx]
    if type(layer) is not DynamicLayer or layer.keys.shape[-2]:
        return layer.update(keys, values, *args, **kwargs)
    layer.keys, layer.values = keys, values
    return keys, values


class _NoCopyCache(DynamicCache):
    """The cache a capture runs with: its layers keep the states they are given (:func:`_hand_over`)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return _hand_over(self, layer_idx, key_states, value_states, *args, **kwargs)


@contextlib.contextmanager
def _causal_skip_while_capturing():
    """Let SDPA use ``is_causal`` inside a capture where eager transformers would (see module doc)."""
    stock = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    if stock is None:  # another transformers: keep its behaviour (correct, maybe slower)
        yield
        return
    signature = inspect.signature(stock)

    def skip(*args, **kwargs):
        arg = signature.bind(*args, **kwargs).arguments
        q_len = arg.get("query_length", arg.get("q_length"))
        kv_len, local = arg.get("kv_length"), arg.get("local_attention_size")
        if (arg.get("padding_mask") is None and isinstance(q_len, int) and isinstance(kv_len, int)
                and (local is None or kv_len < local) and (q_len == 1 or q_len == kv_len)):
            return True
        return stock(*args, **kwargs)

    masking_utils._ignore_causal_mask_sdpa = skip
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = stock


class _EmulatedGraph:
    """Stand-in for ``torch.cuda.CUDAGraph`` off the GPU (tests): a replay reruns the captured
    function and writes its results into the captured tensors in place, so callers see the same
    aliasing a real graph gives (outputs are overwritten by the next replay)."""

    def __init__(self, run: Callable[[], tuple[object, list[torch.Tensor]]]):
        self._run = run
        self._targets: list[torch.Tensor] = []

    def capture(self) -> object:
        output, self._targets = self._run()
        return output

    def replay(self) -> None:
        _, fresh = self._run()
        for target, new in zip(self._targets, fresh):
            if target is not new:
                target.copy_(new)


class PrefillGraphs:
    """The graph cache of one model; made by :func:`graph_prefill`, a context manager that removes
    itself on exit. ``captures``/``replays`` count graph work, ``eager`` counts calls that ran
    eagerly by reason."""

    def __init__(self, model: nn.Module, max_graphs: int = 4, warmup: int = 2, backend: str = "cuda"):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        if backend not in ("cuda", "emulate"):
            raise ValueError(f"backend must be 'cuda' or 'emulate', got {backend!r}")
        self.model = model
        self.lm = get_adapter(model).language_model(model)
        if backend == "cuda":
            device = next(self.lm.parameters()).device
            if device.type != "cuda" or not torch.cuda.is_available():
                raise ValueError(
                    f"graph_prefill needs the language model on a CUDA device; it is on {device}. "
                    "Move the model with model.to('cuda') first (on CPU, prefill is not launch-bound)."
                )
        self.max_graphs, self.warmup, self.backend = max_graphs, max(1, warmup), backend
        self.graphs: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self.failed: dict[tuple, str] = {}
        self.captures = 0
        self.replays = 0
        self.eager: collections.Counter[str] = collections.Counter()
        self._pruner_seen = None
        self._forward = self.lm.forward  # the bound stock forward
        params = inspect.signature(self._forward).parameters
        self._cache_param = next((n for n in _CACHE_NAMES if n in params), None)
        self.lm.forward = self._call  # an instance attribute shadows the class method

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> nn.Module:
        if self.lm.__dict__.get("forward") == self._call:
            del self.lm.forward
        self.clear()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        return self.model

    def clear(self) -> None:
        """Drop every captured graph (and its memory pool)."""
        self.graphs.clear()
        self.failed.clear()

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"PrefillGraphs(graphs={len(self.graphs)}, captures={self.captures}, replays={self.replays}, "
                f"eager={dict(self.eager)})")

    # ------------------------------------------------------------------ the wrapped forward
    def _call(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # a compiled decode step (static cache): nothing to replay or count
            return self._forward(*args, **kwargs)
        pruner = self._pruner()
        reason = self._eager_reason(args, kwargs, pruner)
        if reason is None:
            kwargs, key, reason = self._prepare(kwargs, pruner)
        if reason is not None:
            self.eager[reason] += 1
            return self._forward(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            if key in self.failed:
                self.eager[f"capture failed earlier: {self.failed[key]}"] += 1
                return self._forward(**kwargs)
            state = pruner.prefill if pruner is not None else None
            try:
                entry = self._capture(kwargs, pruner, state)
            except Exception as e:  # noqa: BLE001 - anything that breaks capture: run this geometry eagerly
                self.failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.eager[f"capture failed: {self.failed[key]}"] += 1
                if pruner is not None:
                    pruner.prefill = state
                if self.backend == "cuda":
                    torch.cuda.synchronize()
                return self._forward(**kwargs)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        return self._replay(entry, kwargs, pruner)

    def _pruner(self):
        handle = getattr(self.model, "_fitprune", None)
        pruner = None if handle is None else handle.pruner
        if pruner is not self._pruner_seen:  # a recipe was applied or removed: graphs hold its hooks
            self.clear()
            self._pruner_seen = pruner
        return pruner

    def _eager_reason(self, args, kwargs, pruner) -> str | None:
        if args:
            return "positional arguments"
        if torch.is_grad_enabled():
            return "gradients enabled (use torch.no_grad() or inference_mode)"
        if self.backend == "cuda" and torch.cuda.is_current_stream_capturing():
            return "already capturing"
        cache = cache_of(kwargs)
        if cache is not None:
            if static_cache.decoding(cache):
                return "decode step"
            if type(cache) is not DynamicCache and not static_cache.armed(cache):
                return f"{type(cache).__name__} cache"
        if any(kwargs.get(flag) for flag in _OUTPUT_FLAGS):
            return "attentions or hidden states requested"
        if pruner is not None and pruner.probe is not None:
            return "statistics probe"
        if pruner is not None and (pruner.input_stage is not None or not pruner.rule.capturable):
            return f"{pruner.recipe.scoring} selection (data-dependent host work: runs eagerly)"
        if pruner is not None and pruner.prefill is not None and pruner.prefill.version:
            return "pruner state already advanced"
        return None

    def _prepare(self, kwargs: dict, pruner) -> tuple[dict, tuple | None, str | None]:
        """(kwargs for the graph, graph key, eager reason). The key pins everything the graph bakes
        in: shapes, dtypes, flags, the recipe and where the visual tokens sit."""
        kwargs = dict(kwargs)
        state = pruner.prefill if pruner is not None else None
        mask = kwargs.get("attention_mask")
        host_checks = []
        if isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            causal = _causal_check(mask)  # generate prepares 4-D masks for a static cache
            if causal is None:
                return kwargs, None, "prepared 4-D attention mask"
            # one flag, True if it is the plain causal mask: then it is dropped, as a 2-D mask of ones is
            mask = causal
            if causal.numel() == 0:  # a dict of None masks: plain causal already
                kwargs["attention_mask"] = mask = None
        if isinstance(mask, torch.Tensor):
            if mask.dim() not in (0, 2):
                return kwargs, None, "prepared 4-D attention mask"
            host_checks.append(mask.bool().all().reshape(1))
        if state is not None:
            host_checks.append(state.visual.reshape(-1))
        checks = torch.cat(host_checks).cpu() if host_checks else None  # the one host sync of a replay
        if isinstance(mask, torch.Tensor):
            if not bool(checks[0]):
                return kwargs, None, "padded batch"
            kwargs["attention_mask"] = None  # all ones: the same as no mask, and the causal fast path
        parts = []
        for name in sorted(kwargs):
            value = kwargs[name]
            if isinstance(value, torch.Tensor):
                if self.backend == "cuda" and value.device.type != "cuda":
                    return kwargs, None, f"{name} not on the GPU"
                parts.append((name, tuple(value.shape), value.dtype, str(value.device)))
            elif name in _CACHE_NAMES:
                parts.append((name, value is not None))
            else:
                try:
                    hash(value)
                except TypeError:
                    return kwargs, None, f"unhashable argument {name}"
                parts.append((name, value))
        if state is not None:
            visual = checks[1 if isinstance(mask, torch.Tensor) else 0:].numpy().tobytes()
            parts.append(("pruner", id(pruner), state.input_len, tuple(state.alive_visual),
                          tuple(state.alive_real), tuple(state.first_visual), visual))
        return kwargs, tuple(parts), None

    # ------------------------------------------------------------------ capture / replay
    def _capture(self, kwargs: dict, pruner, state: PrefillState | None) -> _Entry:
        inputs = {n: v.clone() for n, v in kwargs.items() if isinstance(v, torch.Tensor)}
        call = {**{n: v for n, v in kwargs.items() if n not in _CACHE_NAMES}, **inputs}
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.lm.config, "use_cache", False)
        cache_param = next((n for n in _CACHE_NAMES if n in kwargs), self._cache_param)

        def run():
            run_state = None
            if state is not None:
                pruner.prefill = run_state = state.initial_copy()
            if use_cache and cache_param is not None:
                call[cache_param] = _NoCopyCache(config=self.lm.config)
            output = self._forward(**call)
            return output, run_state

        with _causal_skip_while_capturing():
            graph, output, cap_state = self._record(run)
        self.captures += 1
        keep = [] if state is None else state.tensors()  # input-derived: outside the graph's pool
        return _Entry(graph=graph, inputs=inputs, output=output, state=cap_state, keep_alive=keep)

    def _record(self, run):
        if self.backend == "emulate":
            def emulated():
                output, run_state = run()
                return (output, run_state), _tensors_of(output, run_state)

            graph = _EmulatedGraph(emulated)
            output, cap_state = graph.capture()
        else:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: lazy inits, kernel compiles, cached constants
                for _ in range(self.warmup):
                    run()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output, cap_state = run()
        return graph, output, cap_state

    def _replay(self, entry: _Entry, kwargs: dict, pruner):
        for name, buf in entry.inputs.items():
            buf.copy_(kwargs[name])
        entry.graph.replay()
        self.replays += 1
        if pruner is not None and entry.state is not None:
            # the pruner's end hook reports from it: the captured host counts and the graph's tensors,
            # marked static so the report copies what it needs before the next replay overwrites them
            pruner.prefill = entry.state.copy(static=True)
        return self._output(entry, kwargs)

    def _output(self, entry: _Entry, kwargs: dict):
        cached = cache_of(entry.output)
        cache = None
        if cached is not None:
            cache = cache_of(kwargs)
            if cache is None:
                cache = DynamicCache(config=self.lm.config)
            armed = static_cache.armed(cache)
            for i, layer in enumerate(cached.layers):
                if armed:  # held as given; the pruner then lays them into the static buffers
                    cache.layers[i].update(layer.keys, layer.values)
                elif type(layer) is DynamicLayer:  # one contiguous copy, handed over as the layer's states
                    _hand_over(cache, i, layer.keys.clone(memory_format=torch.contiguous_format),
                               layer.values.clone(memory_format=torch.contiguous_format))
                else:
                    cache.update(layer.keys, layer.values, i)  # the stock update copies
        fields = {}
        for name, value in entry.output.items():
            if name in _CACHE_NAMES:
                fields[name] = cache
            elif isinstance(value, torch.Tensor):
                fields[name] = value.clone()
            else:
                fields[name] = value
        return type(entry.output)(**fields)


def _causal_check(mask) -> torch.Tensor | None:
    """For a prepared 4-D prefill mask (or a dict of them, one per layer type): a 0-d bool tensor,
    True where every one is the plain causal mask over the prompt (no padding); None where the masks
    are not square 4-D tensors, so the graph cannot stand in for them."""
    masks = [m for m in (mask.values() if isinstance(mask, dict) else [mask]) if m is not None]
    flags = []
    for m in masks:
        if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[-1] != m.shape[-2]:
            return None
        allowed = m if m.dtype == torch.bool else m == 0
        tril = torch.ones(m.shape[-2:], dtype=torch.bool, device=m.device).tril()
        flags.append((allowed == tril).all())
    return torch.stack(flags).all() if flags else torch.zeros(0, dtype=torch.bool)


def _tensors_of(output, state: PrefillState | None) -> list[torch.Tensor]:
    """Every tensor a graph replay rewrites, in a fixed order (the emulation copies them)."""
    out = [v for v in output.values() if isinstance(v, torch.Tensor)]
    cache = cache_of(output)
    if cache is not None:
        for layer in cache.layers:
            out += [layer.keys, layer.values]
    if state is not None:
        out += state.tensors()
    return out


def graph_prefill(model: nn.Module, max_graphs: int = 4, warmup: int = 2, backend: str = "cuda") -> PrefillGraphs:
    """Replay the language model's prefill from CUDA graphs, one per input geometry (see the
    module docstring). Works with or without a recipe applied, in either order. Returns a handle;
    ``with`` it, or call ``.remove()``, to go back to the stock forward."""
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("graph_prefill is already on for this model; call .remove() on its handle first")
    handle = PrefillGraphs(model, max_graphs=max_graphs, warmup=warmup, backend=backend)
    setattr(model, _ATTR, handle)
    return handle


def prefill_graphs(model: nn.Module) -> PrefillGraphs | None:
    """The :class:`PrefillGraphs` of ``model``, or None when graph_prefill is off."""
    return getattr(model, _ATTR, None)
