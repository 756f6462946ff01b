"""The pruned forward: hooks that drop visual tokens during prefill and keep decode consistent.

DESIGN.md §2 "Inference" and §3. One :class:`Pruner` holds all state of one model. Per prefill:

* top-level pre-hook: find visual positions in ``input_ids``, per-sample drop counts from the recipe;
* pre-hook of layer 0, for a recipe that selects before the language model (``input_fraction``,
  :mod:`fitprune.input_stage`): the chosen tokens are removed from the embeddings before layer 0
  runs; layer 0's KV cache is then laid out at full length with those slots masked in decode, since
  transformers reads the cache length from layer 0;
* scoring attention (``fitprune.attention``) at layers with a nonzero entry: score alive visual
  tokens on the layer's post-RoPE queries/keys and pick the ones to drop;
* hooks of that layer's MLP (and of the norm before it): they run on the survivors only (:mod:`fitprune.mlp_rows`:
  the layer's own residual sum takes the survivors' rows and adds the MLP rows, or they are scattered
  back for the stock add); rows move as 8-byte words (:mod:`fitprune.rows`);
* layer post-hook: the layer output keeps only the survivors. The layer's own KV cache was written
  before the drop, so it keeps them (they were keys/values in layer l);
* pre-hooks of later layers: the attention mask, cos/sin and position ids are re-sliced to the
  survivors, which keep their original RoPE positions;
* final-norm post-hook: hidden states are scattered back to the input length (pruned positions are
  zero), so logits line up with ``input_ids`` and labels.

Samples of a batch may keep different numbers of tokens (LLaVA-NeXT, samples without an image):
the compressed sequence is left-padded with *invalid* slots that no query may attend to.
Decoding attends to each layer's shortened cache through re-sliced masks. A ``StaticCache``
(``cache_implementation="static"``) is laid out at the pruned lengths by :mod:`fitprune.static_cache`,
so stock ``generate`` compiles the pruned decode step as it does the stock one.

The per-prefill state is a :class:`fitprune.prefill_state.PrefillState`; what each scoring rule does
comes from the registry in :mod:`fitprune.rules`; the re-slicing is the pure functions of
:mod:`fitprune.reslice`; each stage of this work is a named range of :mod:`fitprune.profiling`.
"""

from __future__ import annotations

import torch
from torch import nn

from . import attention as attn_registry
from . import mlp_rows, rules, scoring, static_cache
from .adapters import Adapter
from .device_constants import DeviceConstants
from .input_stage import InputStage
from .prefill_state import DecodeSession, PrefillState, PrefillView, cache_of
from .profiling import stage
from .prune_report import PruneReport, report_of
from .recipe import Recipe, RecipeError
from .reslice import decode_mask, layer_kwargs
from .rows import put_rows, take_rows

__all__ = ["Probe", "Pruner", "PruneReport", "cache_of"]


class Probe:
    """Looks at (and may decide) every layer's drops during a prefill; used by statistics
    collection and the progressive fit. Each method receives a read-only
    :class:`~fitprune.prefill_state.PrefillView` of the state (assigning to it raises).
    ``on_scores`` returns a (B, Lc) drop mask or None (None: the recipe decides)."""

    def begin(self, state: PrefillView) -> None: ...

    def on_scores(self, layer: int, state: PrefillView, cross, self_, candidates) -> torch.Tensor | None:
        return None

    def end(self, state: PrefillView, report: PruneReport) -> None: ...


def _replace_output(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


class Pruner:
    """All fitprune state of one model; created by :func:`fitprune.apply`.

    ``fused_scores``: how FitPrune's c and s are computed (``fitprune.kernels.fused_scores``): None =
    the fused kernel wherever it can run (CUDA with Triton), else the torch path; True = the kernel
    (an error where it cannot run); False = the torch path. :func:`fitprune.apply` resolves the default
    from FITPRUNE_FUSED_SCORES once; the pruner never reads the environment.
    """

    def __init__(self, model: nn.Module, recipe: Recipe, adapter: Adapter, probe: "Probe | None" = None,
                 fused_scores: bool | None = None):
        self.model = model
        self.recipe = recipe
        self.rule = rules.get(recipe.scoring)
        self.adapter = adapter
        self.probe = probe
        self.fused_scores = fused_scores
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
        self.constants = DeviceConstants(recipe.seed)  # counts and random scores as device tensors, made once
        self.prefill: PrefillState | None = None
        self.session: DecodeSession | None = None
        self.decoding: DecodeSession | None = None
        self.last_report: PruneReport | None = None
        self._handles: list = []
        self._step_masks: dict = {}
        self._observed: list[nn.Module] = []
        self._fold_mlp: set[int] = set()  # pruning layers whose residual sum takes the survivors (mlp_rows)
        self._mlp_out: dict[int, mlp_rows.Survivors] = {}  # their MLP rows, from the MLP's hook to the layer's
        self._norm_in: dict[int, tuple] = {}  # (residual, its survivors' rows) gathered at the norm before the MLP
        self._fold_now = True  # False in a call that records hidden states
        self._fused_select: dict[int, dict] = {}  # a layer's selection and new state from one kernel (fused_select)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._on_model_end, with_kwargs=True, always_call=True))
        if not self.active:
            return  # a no-op recipe runs the stock model untouched
        if self.input_stage is not None:
            self._handles.extend(self.input_stage.install())
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre(i), with_kwargs=True))
            if i in self.prune_layers:
                attn_module = layer.self_attn
                attn_registry.observe(attn_module, self._attention_observer(i))
                self._observed.append(attn_module)
                self._handles.append(layer.register_forward_hook(self._layer_post(i)))
                mlp = getattr(layer, self.adapter.mlp_attr, None)
                if mlp is not None:
                    if mlp_rows.feeds_residual(layer, self.adapter.mlp_attr):
                        self._fold_mlp.add(i)
                        norm = mlp_rows.norm_before_mlp(layer, self.adapter.mlp_attr)
                        if norm is not None:  # the survivors are gathered at the norm's input
                            self._handles.append(norm.register_forward_pre_hook(self._norm_pre(i)))
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
        self._mlp_out = {}
        self._norm_in = {}
        self._fused_select = {}
        # recorded hidden states may be taken before the layer's post-hook (README): fold only when none are
        self._fold_now = not kwargs.get("output_hidden_states", getattr(self.model.config, "output_hidden_states", False))
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_of(kwargs)
        if cache is not None and static_cache.decoding(cache):
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
        if input_ids.shape[1] < 2:
            return None
        if cache is not None and type(cache).__name__ != "DynamicCache":
            if not static_cache.convert(cache):
                raise NotImplementedError(
                    f"fitprune prunes into a DynamicCache or a StaticCache; got {type(cache).__name__}. "
                    "Use the default cache or cache_implementation='static' while a recipe is applied."
                )
            static_cache.arm(cache, input_ids.shape[1])
            kwargs = static_cache.prefill_kwargs(kwargs, input_ids.shape[1])
        visual = self.adapter.visual_mask(self.model, input_ids)
        mask2d = kwargs.get("attention_mask")
        real = mask2d.bool() if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 else torch.ones_like(visual)
        self.prefill = PrefillState.start(input_ids.shape[1], visual, real, self._drops_for)
        if self.probe is not None:
            self.probe.begin(self.prefill.read_only())
        return args, kwargs

    def _on_model_end(self, module, args, kwargs, output):
        state, self.prefill, self.decoding = self.prefill, None, None
        if state is None or output is None:  # output None: the forward raised (this hook is always_call)
            return None
        armed = cache_of(kwargs)
        if static_cache.is_pruned_static(armed) and armed.layers[0].mode == static_cache.PENDING:
            with stage("compaction"):
                static_cache.finish_prefill(armed)  # lay the pruned prefill into its static buffers
        self.last_report = report_of(state, len(self.layers))
        if self.probe is not None:
            self.probe.end(state.read_only(), self.last_report)
        cache = cache_of(output)
        if cache is not None and state.version > 0:
            self.session = DecodeSession.of(state, cache)
        return None

    # ------------------------------------------------------------------ layers
    def _layer_pre(self, i: int):
        def hook(layer, args, kwargs):
            state = self.prefill
            if state is not None:
                if i == 0 and self.input_stage is not None and state.version == 0:
                    args, kwargs = self.input_stage.drop_before_layer0(state, args, kwargs)
                state.layer_version.append(state.version)
                state.attn_counts.append((list(state.alive_real), list(state.alive_visual)))
                if state.version == 0:
                    return None
                with stage("reslice"):
                    return args, layer_kwargs(kwargs, state.resliced, state.version, state.idx, state.valid,
                                                state.all_valid)
            session = self.decoding
            if session is not None and (session.layer_version[i] > 0 or i in session.decode_views):
                with stage("reslice"):
                    return args, self._reslice_decode(session, i, args, kwargs)
            return None

        return hook

    def _reslice_decode(self, session: DecodeSession, i: int, args, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        view = session.decode_views.get(i)
        version = session.layer_version[i] if view is None else ("view", i)
        mask = kwargs.get("attention_mask")
        # layers of one version and attention type share the re-sliced mask within a step (no id() of
        # the mask: under torch.compile that guards on the tensor's identity and recompiles every step)
        key = (version, getattr(self.layers[i], "attention_type", None))
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

    def _needs_cross_self(self, by_recipe: bool) -> bool:
        """Whether a layer computes FitPrune's c and s: a probe reads them, or the recipe drops there
        (``by_recipe``) by them."""
        return self.probe is not None or (self.rule.cross_self and by_recipe)

    def _attention_observer(self, i: int):
        def wants_lse(query, mask) -> bool:  # c and s will come from the fused kernel, with counts (attention.py)
            state = self.prefill
            return (state is not None and mask is None and query.shape[2] > 1 and any(state.alive_visual)
                    and self._needs_cross_self(any(state.recipe_drops(i)))
                    and scoring.takes_counts(state, query, self.fused_scores))

        def observe(module, query, key, mask, scaling, lse=None):
            state = self.prefill
            if state is None or query.shape[2] < 2 or not any(state.alive_visual):
                return
            counts = state.recipe_drops(i)
            by_recipe = any(counts)
            rule = self.rule
            candidates = state.visual & state.valid
            cs = None
            if self._needs_cross_self(by_recipe):
                with stage("scoring"):
                    cs = scoring.state_cross_self(state, query, key, mask, scaling, candidates, self.fused_scores,
                                                    self.constants, lse)
            drop = self.probe.on_scores(i, state.read_only(), *cs, candidates) if self.probe is not None else None
            if drop is not None:
                counts = drop.sum(1).tolist()  # data-dependent drops: count them (probes only)
            elif by_recipe and rule.at_mlp is not None:  # chosen on the hidden states the MLP receives (_mlp_pre)
                state.deferred[i] = (key, counts)
            elif by_recipe:
                with stage("scoring"):
                    scores = rule.at_attention(rules.AttentionContext(self, state, i, query, key, mask, scaling,
                                                                      candidates, cs))
                with stage("selection"):
                    drop = self._select(state, i, scores, candidates, counts, query)
            if drop is not None and any(counts):
                state.pending[i] = (drop, counts)

        observe.wants_lse = wants_lse
        return observe

    def _select(self, state: PrefillState, i: int, scores, candidates, counts: list[int], query) -> torch.Tensor:
        """The (B, Lc) drop mask of a recipe's scores. Where the fused kernels run, one Triton launch also
        lays out the slots kept and their state (:mod:`fitprune.kernels.fused_select`), which
        :meth:`_selection` and :meth:`compact` then take instead of sorting and gathering."""
        k = self.constants.k_tensor(counts, query.device)
        if scoring.use_fused(query, self.fused_scores):
            from .kernels import fused_select

            if fused_select.can_run(scores):
                self._fused_select[i] = out = fused_select.for_state(state, scores, candidates, k, counts)
                state.selection[i] = (out["sel"], out["valid"])  # what _selection would compute
                return out["drop"]
        return scoring.select_drops(scores, candidates, k)

    def _selection(self, state: PrefillState, i: int):
        """(sel, new_valid): slots kept after layer i, left-padded with invalid slots to one length."""
        if i not in state.selection:
            with stage("selection"):
                drop, counts = state.pending[i]
                keep = state.valid & ~drop
                new_len = state.width_after(counts)
                order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices  # dropped first, order kept
                sel = order[:, keep.shape[1] - new_len :]
                state.selection[i] = (sel, keep.gather(1, sel))
        return state.selection[i]

    def _mlp_pre(self, i: int):
        def hook(mlp, args):
            state = self.prefill
            if state is not None and i in state.deferred:
                keys, counts = state.deferred.pop(i)
                with stage("dart"):
                    drop = self.rule.at_mlp(rules.MlpContext(self, state, i, args[0], keys, counts))
                state.pending[i] = (drop, counts)
            if state is None or i not in state.pending or i in self._norm_in:  # _norm_pre: survivors already
                return None
            sel, _ = self._selection(state, i)
            with stage("compaction"):
                return (take_rows(args[0], sel), *args[1:])

        return hook

    def _norm_pre(self, i: int):
        def hook(norm, args):  # the norm between the residual and the MLP of a folded layer (mlp_rows)
            state = self.prefill
            if state is None or i not in state.pending or not self._fold_now:  # registered on folded layers only
                return None
            sel, _ = self._selection(state, i)
            with stage("compaction"):
                self._norm_in[i] = (args[0], take_rows(args[0], sel))
            return (self._norm_in[i][1], *args[1:])

        return hook

    def _mlp_post(self, i: int):
        def hook(mlp, args, output):
            state = self.prefill
            if state is None or i not in state.pending:
                return None
            sel, _ = self._selection(state, i)
            if self._fold_now and i in self._fold_mlp:  # the layer's residual sum takes the survivors (mlp_rows)
                self._mlp_out[i] = mlp_rows.survivors(output, sel, state.idx.shape[1], self.constants.zero(output),
                                                      self._norm_in.pop(i, None))
                return self._mlp_out[i]
            with stage("compaction"):
                return mlp_rows.full_length(output, sel, state.idx.shape[1])

        return hook

    def _layer_post(self, i: int):
        def hook(layer, args, output):
            state = self.prefill
            if state is None or i not in state.pending:
                return None
            folded = self._mlp_out.pop(i, None)
            taken = folded is not None and folded.taken  # the layer returned the survivors' rows (mlp_rows)
            hidden = self.compact(state, i, output[0] if isinstance(output, tuple) else output, gathered=taken)
            if folded is not None and not taken:  # the layer returned its full residual: add the MLP rows here
                with stage("compaction"):
                    hidden = hidden + folded.rows
            return _replace_output(output, hidden)

        return hook

    def compact(self, state: PrefillState, i: int, hidden: torch.Tensor, gathered: bool = False) -> torch.Tensor:
        """Remove the pending drops of layer ``i`` (-1: before layer 0) from ``hidden`` and the state.
        ``gathered``: ``hidden`` holds the survivors' rows already; only the state is compacted."""
        sel, new_valid = self._selection(state, i)
        with stage("compaction"):
            if not gathered:
                hidden = take_rows(hidden, sel)
            state.advance(i, sel, new_valid, self._fused_select.pop(i, None))
        return hidden

    def _on_norm(self, norm, args, output):
        state = self.prefill
        if state is None or state.version == 0:
            return None
        with stage("compaction"):
            # slot positions are distinct per sample; invalid slots write zeros at dropped positions
            return put_rows(output * state.valid[..., None].to(output.dtype), state.idx, state.input_len)
