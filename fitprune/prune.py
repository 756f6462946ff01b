"""The pruned forward: hooks that drop visual tokens during prefill and keep decode consistent.

DESIGN.md §2 "Inference" and §3. One :class:`Pruner` holds all state of one model. Per prefill:

* top-level pre-hook: find visual positions in ``input_ids``, per-sample drop counts from the recipe;
* pre-hook of layer 0, for a recipe that selects before the language model (``input_fraction``,
  :mod:`fitprune.input_stage`): the chosen tokens are removed from the embeddings before layer 0
  runs; layer 0's KV cache is then laid out at full length with those slots masked in decode, since
  transformers reads the cache length from layer 0;
* scoring attention (``fitprune.attention``) at layers with a nonzero entry: score alive visual
  tokens on the layer's post-RoPE queries/keys and pick the ones to drop;
* MLP pre/post hooks of that layer: the MLP runs on the survivors only (rows gathered, then
  scattered back so the stock residual add still lines up);
* layer post-hook: the layer output keeps only the survivors. The layer's own KV cache was written
  before the drop, so it keeps them (they were keys/values in layer l);
* pre-hooks of later layers: the attention mask, cos/sin and position ids are re-sliced to the
  survivors, which keep their original RoPE positions;
* final-norm post-hook: hidden states are scattered back to the input length (pruned positions are
  zero), so logits line up with ``input_ids`` and labels.

Samples of a batch may keep different numbers of tokens (LLaVA-NeXT, samples without an image):
the compressed sequence is left-padded with *invalid* slots that no query may attend to.
Decoding attends to each layer's shortened cache through re-sliced masks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import attention as attn_registry
from . import scoring
from .adapters import Adapter
from .input_stage import InputStage
from .prune_report import PruneReport
from .recipe import Recipe, RecipeError
from .reslice import decode_mask, gather_seq, prefill_mask
from .selection import dart_drops

__all__ = ["Probe", "Pruner", "PruneReport"]


class _Prefill:
    """Per-forward state of a pruned prefill, in compressed coordinates (B, Lc).

    Token counts are kept on the host (lists, one entry per sample) next to the device tensors, so
    lengths, row ranges and "anything to do?" checks never wait for the GPU. They are exact: the
    recipe fixes how many tokens each sample drops, and a probe's data-dependent drops are counted
    once per layer.
    """

    def __init__(self, input_len: int, visual: torch.Tensor, real: torch.Tensor, drops_for):
        bsz = visual.shape[0]
        device = visual.device
        positions = torch.arange(input_len, device=device)
        self.input_len = input_len
        self.idx = positions.expand(bsz, -1)  # original position of each slot
        self.valid = torch.ones_like(visual)  # False on slots that only pad a ragged batch
        self.visual = visual
        self.real = real  # False on the model's own padding tokens
        last_visual = torch.where(visual, positions, -1).amax(1)
        first_visual = torch.where(visual, positions, input_len).amin(1)
        self.text = real & (positions[None, :] > last_visual[:, None])
        host = torch.stack([visual.sum(1), real.sum(1), first_visual]).tolist()  # the one sync of a prefill
        self.alive_visual: list[int] = host[0]  # per sample, alive visual tokens
        self.alive_real: list[int] = host[1]  # per sample, alive non-padding tokens
        self.first_visual: list[int] = host[2]  # original position of the first visual token
        self.slots: list[int] = [input_len] * bsz  # per sample, valid slots (all tokens incl. model padding)
        self.drops = [drops_for(n) for n in self.alive_visual]  # [b][layer] the recipe's drops after each layer
        self.version = 0  # how many pruning layers have run so far
        self.layer_version: list[int] = []  # version each layer saw (decode re-slices with it)
        self.versions: list[tuple[torch.Tensor, torch.Tensor, bool]] = [(self.idx, self.valid, True)]
        self.pending: dict[int, tuple[torch.Tensor, list[int]]] = {}  # layer -> (drop mask, counts)
        self.selection: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (sel, new_valid)
        self.resliced: dict[tuple[int, int], object] = {}
        self.attn_counts: list[tuple[list[int], list[int]]] = []  # per layer (real, visual) entering
        self.mlp_counts: list[tuple[list[int], list[int]]] = []  # per layer (real, visual) after drop
        self.dropped_positions: dict[int, torch.Tensor] = {}  # pruning layer -> (B, Lc) original idx or -1
        self.deferred: dict[int, tuple[torch.Tensor, list[int]]] = {}  # DART layer -> (keys, counts) until its MLP
        self.decode_views: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}  # layer -> full-length cache view
        self.initial_visual: list[int] = list(self.alive_visual)  # per sample, visual tokens of the prompt
        self.initial_real: list[int] = list(self.alive_real)  # per sample, non-padding tokens of the prompt
        self.cache = None  # the KV cache of this prefill (seen by layer 0), when a pre-LLM recipe pads it
        self.static = False  # True: the device tensors are a CUDA graph's, overwritten by its next replay

    def initial_copy(self) -> "_Prefill":
        """A fresh state for another run of the same prefill, made before any layer ran: it shares
        the input-derived tensors (never written in place) and copies the host counts, without the
        host sync of ``__init__`` (so it may be made while a CUDA graph is being captured)."""
        if self.version or self.attn_counts:
            raise RuntimeError("initial_copy() needs a state no layer has run on yet")
        new = object.__new__(_Prefill)
        new.__dict__.update(self.__dict__)
        for name in ("alive_visual", "alive_real", "first_visual", "slots", "layer_version", "versions",
                     "attn_counts", "mlp_counts"):
            setattr(new, name, list(getattr(self, name)))
        for name in ("pending", "selection", "resliced", "dropped_positions", "deferred", "decode_views"):
            setattr(new, name, {})
        return new

    @property
    def width(self) -> int:
        return max(self.slots)

    @property
    def all_valid(self) -> bool:
        return min(self.slots) == self.width

    def recipe_drops(self, layer: int) -> list[int]:
        """Tokens each sample really drops after ``layer`` under the recipe (never more than alive)."""
        return [min(d[layer], a) for d, a in zip(self.drops, self.alive_visual)]

    def first_candidate_row(self) -> int:
        """A slot index no later than any sample's first alive visual slot (system rows come first)."""
        width = self.width
        return min(width - n + f for n, f in zip(self.slots, self.first_visual) if f < self.input_len)


@dataclass
class _Session:
    """What a decode step needs from the pruned prefill that filled the cache."""

    cache: weakref.ref
    input_len: int
    versions: list[tuple[torch.Tensor, torch.Tensor, bool]]  # (idx, valid, all slots valid)
    layer_version: list[int]
    decode_views: dict[int, tuple[torch.Tensor, torch.Tensor, bool]]  # layers whose cache is full length


class Probe:
    """Looks at (and may decide) every layer's drops during a prefill; used by statistics
    collection and the progressive fit. ``on_scores`` returns a (B, Lc) drop mask or None
    (None: the recipe decides)."""

    def begin(self, state: _Prefill) -> None: ...

    def on_scores(self, layer: int, state: _Prefill, cross, self_, candidates) -> torch.Tensor | None:
        return None

    def end(self, state: _Prefill, report: "PruneReport") -> None: ...


def cache_of(mapping) -> object | None:
    """The KV cache in forward kwargs or outputs: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    get = mapping.get if isinstance(mapping, dict) else (lambda name: getattr(mapping, name, None))
    cache = get("cache")
    return cache if cache is not None else get("past_key_values")


def _replace_output(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


class Pruner:
    """All fitprune state of one model; created by :func:`fitprune.apply`."""

    def __init__(self, model: nn.Module, recipe: Recipe, adapter: Adapter, probe: "Probe | None" = None):
        self.model = model
        self.recipe = recipe
        self.adapter = adapter
        self.probe = probe
        self.lm = adapter.language_model(model)
        self.layers = list(self.lm.layers)
        recipe_layers = {i for i, f in enumerate(recipe.drop_fractions) if f > 0}
        probe_layers = set(range(len(self.layers))) if probe is not None else set()
        # layers whose attention is looked at, and where tokens may be dropped
        self.prune_layers = sorted(recipe_layers | probe_layers)
        self.input_stage = InputStage(self) if recipe.input_fraction > 0 else None
        if self.input_stage is not None and probe is not None:
            raise RecipeError("statistics probes run on in-LLM recipes only, not on one that selects before layer 0")
        self.active = bool(self.prune_layers) or self.input_stage is not None
        self._drop_cache: dict[int, list[int]] = {}
        # device constants made once and reused: no host-to-device copy inside a prefill after the
        # first one (CUDA graph capture forbids them; fitprune.graphs)
        self._k_cache: dict[tuple, torch.Tensor] = {}
        self._random_cache: dict[tuple, torch.Tensor] = {}
        self.prefill: _Prefill | None = None
        self.session: _Session | None = None
        self.decoding: _Session | None = None
        self.last_report: PruneReport | None = None
        self._handles: list = []
        self._step_masks: dict = {}
        self._observed: list[nn.Module] = []

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._on_model_end, with_kwargs=True, always_call=True))
        if not self.active:
            return  # a no-op recipe runs the stock model untouched
        if self.input_stage is not None:
            self._handles.extend(self.input_stage.install())
            self._handles.append(self.layers[0].register_forward_hook(self._pad_first_cache))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre(i), with_kwargs=True))
            if i in self.prune_layers:
                attn_module = layer.self_attn
                attn_registry.observe(attn_module, self._attention_observer(i))
                self._observed.append(attn_module)
                self._handles.append(layer.register_forward_hook(self._layer_post(i)))
                mlp = getattr(layer, self.adapter.mlp_attr, None)
                if mlp is not None:
                    self._handles.append(mlp.register_forward_pre_hook(self._mlp_pre(i)))
                    self._handles.append(mlp.register_forward_hook(self._mlp_post(i)))
        self._handles.append(self.lm.norm.register_forward_hook(self._on_norm))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._observed:
            attn_registry.unobserve(module)
        self._observed.clear()
        self.prefill = self.session = self.decoding = None

    # ------------------------------------------------------------------ top level
    def _drops_for(self, n_visual: int) -> list[int]:
        if n_visual not in self._drop_cache:
            self._drop_cache[n_visual] = self.recipe.drop_counts(n_visual) if n_visual else [0] * len(self.layers)
        return self._drop_cache[n_visual]

    def _on_model_start(self, module, args, kwargs):
        self.prefill = None
        self.decoding = None
        self._step_masks = {}
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_of(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            session = self.session
            if session is not None and session.cache() is cache:
                self.decoding = session
            return None
        self.session = None
        if not self.active:
            return None
        if input_ids is None:
            raise ValueError(
                "fitprune finds visual tokens in input_ids; this call passed inputs_embeds only. "
                "Pass input_ids (with the image placeholder tokens), or remove the recipe for this call."
            )
        if cache is not None and type(cache).__name__ not in ("DynamicCache",):
            raise NotImplementedError(
                f"fitprune prunes with a DynamicCache; got {type(cache).__name__}. "
                "Use the default cache (no cache_implementation='static') while a recipe is applied."
            )
        if input_ids.shape[1] < 2:
            return None
        visual = self.adapter.visual_mask(self.model, input_ids)
        mask2d = kwargs.get("attention_mask")
        real = mask2d.bool() if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 else torch.ones_like(visual)
        self.prefill = _Prefill(input_ids.shape[1], visual, real, self._drops_for)
        if self.probe is not None:
            self.probe.begin(self.prefill)
        return None

    def _on_model_end(self, module, args, kwargs, output):
        state, self.prefill, self.decoding = self.prefill, None, None
        if state is None or output is None:  # output None: the forward raised (this hook is always_call)
            return None
        self.last_report = self._report(state)
        if self.probe is not None:
            self.probe.end(state, self.last_report)
        cache = cache_of(output)
        if cache is not None and state.version > 0:
            self.session = _Session(
                cache=weakref.ref(cache),
                input_len=state.input_len,
                versions=state.versions,
                layer_version=state.layer_version,
                decode_views=state.decode_views,
            )
        return None

    # ------------------------------------------------------------------ layers
    def _layer_pre(self, i: int):
        def hook(layer, args, kwargs):
            state = self.prefill
            if state is not None:
                if i == 0 and self.input_stage is not None and state.version == 0:
                    args, kwargs = self._drop_input(state, args, kwargs)
                state.layer_version.append(state.version)
                state.attn_counts.append((list(state.alive_real), list(state.alive_visual)))
                if state.version == 0:
                    return None
                return args, self._reslice_prefill(state, kwargs)
            session = self.decoding
            if session is not None and (session.layer_version[i] > 0 or i in session.decode_views):
                return args, self._reslice_decode(session, i, args, kwargs)
            return None

        return hook

    def _reslice_prefill(self, state: _Prefill, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        for name in ("attention_mask", "position_embeddings"):
            value = kwargs.get(name)
            key = (id(value), state.version)
            if key not in state.resliced:
                if name == "attention_mask":
                    state.resliced[key] = prefill_mask(value, state.idx, state.valid, state.all_valid)
                else:
                    state.resliced[key] = None if value is None else tuple(gather_seq(t, state.idx) for t in value)
            kwargs[name] = state.resliced[key]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = None  # gapped ids look like packed sequences to FlashAttention
        return kwargs

    def _reslice_decode(self, session: _Session, i: int, args, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        view = session.decode_views.get(i)
        version = session.layer_version[i] if view is None else ("view", i)
        mask = kwargs.get("attention_mask")
        key = (version, id(mask))  # layers of one version share the re-sliced mask within a step
        if key not in self._step_masks:
            idx, valid, all_valid = session.versions[version] if view is None else view
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            q_len = hidden.shape[1]
            kv_len = mask.shape[-1] if mask is not None else cache_of(kwargs).get_seq_length(0)
            if mask is None and i == 0:  # layer 0 adds this step's tokens in its own attention, after this hook
                kv_len += q_len
            self._step_masks[key] = decode_mask(mask, idx, valid, all_valid, session.input_len, q_len, kv_len)
        kwargs["attention_mask"] = self._step_masks[key]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = None
        return kwargs

    def _attention_observer(self, i: int):
        def observe(module, query, key, mask, scaling):
            state = self.prefill
            if state is None or query.shape[2] < 2 or not any(state.alive_visual):
                return
            counts = state.recipe_drops(i)
            by_recipe = any(counts)
            rule = self.recipe.scoring
            candidates = state.visual & state.valid
            cs = None
            if self.probe is not None or (by_recipe and rule == "fitprune"):
                cs = self._cross_self(state, query, key, mask, scaling, candidates)
            drop = self.probe.on_scores(i, state, *cs, candidates) if self.probe is not None else None
            if drop is not None:
                counts = drop.sum(1).tolist()  # data-dependent drops: count them (probes only)
            elif by_recipe and rule == "dart":  # chosen on the hidden states the MLP receives (_mlp_pre)
                state.deferred[i] = (key, counts)
            elif by_recipe:
                if rule == "fitprune":
                    scores = cs[0] * cs[1]
                elif rule == "fastv":
                    scores = scoring.fastv_scores(query, key, mask, scaling)
                else:
                    scores = self._random_scores(tuple(candidates.shape), i, query.device)
                k = self._k_tensor(counts, query.device)
                drop = scoring.select_drops(scores, candidates, k)
            if drop is not None and any(counts):
                state.pending[i] = (drop, counts)

        return observe

    def _k_tensor(self, counts: list[int], device) -> torch.Tensor:
        key = (tuple(counts), str(device))
        if key not in self._k_cache:
            if len(self._k_cache) >= 4096:  # a long run over many batch compositions: start over
                self._k_cache.clear()
            self._k_cache[key] = torch.tensor(counts, device=device)
        return self._k_cache[key]

    def _random_scores(self, shape: tuple[int, int], layer: int, device) -> torch.Tensor:
        key = (shape, layer, str(device))
        if key not in self._random_cache:
            if len(self._random_cache) >= 256:  # many distinct batch shapes: start over (bounds memory)
                self._random_cache.clear()
            self._random_cache[key] = scoring.random_scores(shape, self.recipe.seed, layer, device)
        return self._random_cache[key]

    @staticmethod
    def _cross_self(state: _Prefill, query, key, mask, scaling, candidates):
        """FitPrune's c and s (B, Lc) for the alive visual slots (0 elsewhere before row_start).

        On a CUDA device with Triton, a fused kernel computes them without materialising attention
        probabilities (``fitprune.kernels.fused_scores``; FITPRUNE_FUSED_SCORES=0 turns it off).
        """
        from .kernels import fused_scores  # imports Triton (if installed) on first use only

        first = state.first_candidate_row()  # system rows are neither T nor V
        text_rows = state.text[:, first:] & state.valid[:, first:]  # (B, R)
        visual_rows = candidates[:, first:]  # (B, R)
        if fused_scores.available(query):
            return fused_scores.fused_cross_self(query, key, mask, scaling, first, text_rows, visual_rows)
        probs = scoring.head_max_probs(query, key, mask, scaling, row_start=first)
        return scoring.cross_self(probs, text_rows, visual_rows)

    def _selection(self, state: _Prefill, i: int):
        """(sel, new_valid): slots kept after layer i, left-padded with invalid slots to one length."""
        if i not in state.selection:
            drop, counts = state.pending[i]
            keep = state.valid & ~drop
            new_len = max(n - k for n, k in zip(state.slots, counts))
            order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices  # dropped first, order kept
            sel = order[:, keep.shape[1] - new_len :]
            state.selection[i] = (sel, keep.gather(1, sel))
        return state.selection[i]

    def _dart(self, state: _Prefill, i: int, x: torch.Tensor) -> None:
        """DART's drops after layer i, from the MLP's input ``x`` (B, Lc, D) and the layer's keys.

        DART compares hidden states under the model's final norm. RMSNorm only rescales each token, so
        ``x / γ_post · γ_final`` has the cosine similarities of the final-normed residual stream after
        this layer's attention (DART reads it after the MLP; here the MLP already runs on survivors).
        """
        keys, counts = state.deferred.pop(i)
        post = getattr(self.layers[i], "post_attention_layernorm", None)
        g_post, g_final = getattr(post, "weight", None), getattr(self.lm.norm, "weight", None)
        hidden = x.float()
        if g_post is not None and g_final is not None and g_post.shape == g_final.shape:
            safe = torch.where(g_post.float().abs() > 1e-6, g_post.float(), 1.0)
            hidden = hidden / safe * g_final.float()
        candidates = state.visual & state.valid
        k = self._k_tensor(counts, x.device)
        drop = dart_drops(hidden, keys, candidates, state.text & state.valid, k)
        state.pending[i] = (drop, counts)

    def _mlp_pre(self, i: int):
        def hook(mlp, args):
            state = self.prefill
            if state is not None and i in state.deferred:
                self._dart(state, i, args[0])
            if state is None or i not in state.pending:
                return None
            sel, _ = self._selection(state, i)
            x = args[0]
            return (torch.gather(x, 1, sel[..., None].expand(-1, -1, x.shape[-1])), *args[1:])

        return hook

    def _mlp_post(self, i: int):
        def hook(mlp, args, output):
            state = self.prefill
            if state is None or i not in state.pending:
                return None
            sel, _ = self._selection(state, i)
            full = output.new_zeros(output.shape[0], state.idx.shape[1], output.shape[-1])
            return full.scatter(1, sel[..., None].expand(-1, -1, output.shape[-1]), output)

        return hook

    def _layer_post(self, i: int):
        def hook(layer, args, output):
            state = self.prefill
            if state is None:
                return None
            if i not in state.pending:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            return _replace_output(output, self._compact(state, i, hidden))

        return hook

    def _compact(self, state: _Prefill, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Remove the pending drops of layer ``i`` (-1: before layer 0) from ``hidden`` and the state."""
        sel, new_valid = self._selection(state, i)
        drop, counts = state.pending.pop(i)
        state.dropped_positions[i] = torch.where(drop, state.idx, -1)
        hidden = torch.gather(hidden, 1, sel[..., None].expand(-1, -1, hidden.shape[-1]))
        state.idx = state.idx.gather(1, sel)
        state.visual = state.visual.gather(1, sel)
        state.text = state.text.gather(1, sel)
        state.real = state.real.gather(1, sel)
        state.valid = new_valid
        state.slots = [n - k for n, k in zip(state.slots, counts)]
        state.alive_visual = [n - k for n, k in zip(state.alive_visual, counts)]
        state.alive_real = [n - k for n, k in zip(state.alive_real, counts)]
        state.version += 1
        state.versions.append((state.idx, state.valid, state.all_valid))
        state.selection.pop(i)
        return hidden

    def _drop_input(self, state: _Prefill, args, kwargs):
        """Layer 0's pre-hook for a pre-LLM recipe: remove the input stage's tokens before layer 0 runs."""
        in_kwargs = "hidden_states" in kwargs
        hidden = kwargs["hidden_states"] if in_kwargs else args[0]
        drop, counts = self.input_stage.select(state, hidden)
        if not any(counts):
            return args, kwargs
        state.pending[-1] = (drop, counts)
        hidden = self._compact(state, -1, hidden)
        state.cache = cache_of(kwargs)
        if in_kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    def _pad_first_cache(self, layer, args, output):
        """After layer 0 ran on the pre-LLM survivors: lay its KV cache out at the prompt's full length
        (removed slots zero, masked in every decode step), so the cache length transformers reads from
        layer 0 stays the prompt length."""
        state = self.prefill
        if state is None or state.cache is None or -1 not in state.dropped_positions:
            return None
        idx, valid, _ = state.versions[1]  # the slots layer 0 ran on
        store = getattr(state.cache, "layers", None)
        first = store[0] if store else None
        if first is None or not hasattr(first, "keys"):
            raise NotImplementedError(f"fitprune cannot re-lay layer 0 of a {type(state.cache).__name__} "
                                      "for a recipe that selects before the language model")
        for name in ("keys", "values"):
            t = getattr(first, name)  # (B, Hkv, Lc, hd)
            index = idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
            full = t.new_zeros(t.shape[0], t.shape[1], state.input_len, t.shape[-1]).scatter(2, index, t)
            setattr(first, name, full)
        bsz = idx.shape[0]
        positions = torch.arange(state.input_len, device=idx.device).expand(bsz, -1)
        kept = torch.zeros(bsz, state.input_len, dtype=torch.bool, device=idx.device).scatter(1, idx, valid)
        state.decode_views[0] = (positions, kept, False)
        state.cache = None
        return None

    def _on_norm(self, norm, args, output):
        state = self.prefill
        if state is None or state.version == 0:
            return None
        # slot positions are distinct per sample; invalid slots write zeros at dropped positions
        full = output.new_zeros(output.shape[0], state.input_len, output.shape[-1])
        src = output * state.valid[..., None].to(output.dtype)
        return full.scatter(1, state.idx[..., None].expand(-1, -1, output.shape[-1]), src)

    # ------------------------------------------------------------------ report
    def _report(self, state: _Prefill) -> PruneReport:
        n_layers = len(state.attn_counts)
        attn_real = np.array([c[0] for c in state.attn_counts]).T  # (B, L)
        attn_vis = np.array([c[1] for c in state.attn_counts]).T
        # tokens left after a layer's pruning = tokens entering the next; after the last: alive now
        mlp_real = np.concatenate([attn_real[:, 1:], np.array(state.alive_real)[:, None]], axis=1)[:, :n_layers]
        mlp_vis = np.concatenate([attn_vis[:, 1:], np.array(state.alive_visual)[:, None]], axis=1)[:, :n_layers]
        idx, valid, positions = state.idx, state.valid, dict(state.dropped_positions)
        bsz, length, num_layers = idx.shape[0], state.input_len, len(self.layers)

        def kept_on_device() -> torch.Tensor:
            return torch.zeros(bsz, length, dtype=torch.bool, device=idx.device).scatter_(1, idx, valid)

        kept_now = None
        if state.static:  # a graph replay: copy now (queued, no wait) before the next replay overwrites
            kept_now = kept_on_device()
            if positions:
                flat = torch.cat(list(positions.values()), 1).split([p.shape[1] for p in positions.values()], 1)
                positions = dict(zip(positions, flat))

        def kept() -> np.ndarray:
            return (kept_now if kept_now is not None else kept_on_device()).cpu().numpy()

        def rows(pos) -> list[list[int]]:
            return [sorted(p for p in row if p >= 0) for row in pos.cpu().tolist()]

        def dropped() -> list[list[list[int]]]:
            out = [[[] for _ in range(num_layers)] for _ in range(bsz)]
            for layer, pos in positions.items():
                if layer >= 0:
                    for b, row in enumerate(rows(pos)):
                        out[b][layer] = row
            return out

        def dropped_input() -> list[list[int]]:
            return rows(positions[-1]) if -1 in positions else [[] for _ in range(bsz)]

        return PruneReport(attn_real, mlp_real, attn_vis, mlp_vis, kept, dropped, n_visual=state.initial_visual,
                           dropped_input_fn=dropped_input, input_tokens=state.initial_real)
