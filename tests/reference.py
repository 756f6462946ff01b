"""An independent reference for the pruned forward, written for the tests.

It shares no code with ``fitprune``'s engine: one sample at a time, the language model run layer by
layer with **eager** attention and ``attn_weights`` read off the attention module, scores computed
from the full attention maps, and dropped tokens *physically removed* from the hidden states
(survivors get cos/sin recomputed from their original position ids). With ``fixed_drops`` it
replays a given drop schedule instead of scoring (for the cached-vs-uncached decode check). With
``input_drops`` it removes given positions before layer 0 (pre-LLM methods: DivPrune, VisionZip), and
``embeds`` replaces the embeddings the language model receives (VisionZip's merged tokens).
"""

from __future__ import annotations

import torch

import fitprune
from fitprune.flops import prefill_flops


class _Stop(Exception):
    pass


def language_model(model):
    return model.model.language_model


def capture_lm_inputs(model, inputs: dict) -> dict:
    """Embeddings and position ids the top-level model hands its language model (B = 1)."""
    lm = language_model(model)
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)
        raise _Stop

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen


def reference_forward(model, inputs: dict, drop_counts, visual_ids, scoring="fitprune", fixed_drops=None,
                      record=None, input_drops=None, embeds=None):
    """Run one unpadded sample. Returns (logits (n_kept, V), kept original positions, dropped per layer).

    drop_counts[l]: tokens to drop after layer l. fixed_drops[l]: original positions to drop instead
    (drop_counts and fixed_drops both None: nothing is dropped inside the language model).
    record: a list that receives, per layer, {original visual position: (c, s)} of the alive visual
    tokens, computed from the full eager attention map.
    input_drops: original positions physically removed before layer 0 (their RoPE positions are gone
    with them; survivors keep theirs). embeds: (1, L, D) embeddings given to the language model in
    place of the ones the top-level model computes (position ids still come from the model).
    """
    assert inputs["input_ids"].shape[0] == 1
    lm = language_model(model)
    seen = capture_lm_inputs(model, inputs)
    hidden = seen["inputs_embeds"] if embeds is None else embeds.to(seen["inputs_embeds"])
    length = hidden.shape[1]
    position_ids = seen.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length, device=hidden.device)[None]
    elif position_ids.dim() == 3 and position_ids.shape[0] == 4:  # text positions prepended (Qwen2-VL)
        position_ids = position_ids[1:]
    if "Qwen" in type(lm).__name__ and position_ids.dim() == 2:  # M-RoPE wants (3, B, L)
        position_ids = position_ids[None].expand(3, -1, -1)
    ids = inputs["input_ids"][0]
    visual = torch.isin(ids, torch.tensor(visual_ids, device=ids.device)).cpu()
    vis_positions = torch.where(visual)[0]
    last_visual = int(vis_positions.max()) if len(vis_positions) else -1
    pos = list(range(length))
    dropped = [[] for _ in lm.layers]
    if input_drops:
        removed = set(input_drops)
        assert removed <= set(vis_positions.tolist()), "input_drops must be visual positions"
        pos = [p for p in pos if p not in removed]
        hidden = hidden[:, pos]
    if drop_counts is None and fixed_drops is None:
        fixed_drops = [[] for _ in lm.layers]

    weights = {}
    original = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    handles = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: weights.__setitem__(i, out[1]))
        for i, layer in enumerate(lm.layers)
    ]
    try:
        with torch.no_grad():
            for i, layer in enumerate(lm.layers):
                n = len(pos)
                pid = position_ids[..., pos]
                cos, sin = lm.rotary_emb(hidden, pid)
                mask = torch.full((n, n), torch.finfo(hidden.dtype).min, device=hidden.device).triu(1)[None, None]
                out = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None,
                            use_cache=False)
                hidden = out[0] if isinstance(out, tuple) else out
                if record is not None:
                    record.append(_cross_self(weights[i][0], pos, visual, last_visual))
                if fixed_drops is not None:
                    drop = [j for j, p in enumerate(pos) if p in set(fixed_drops[i])]
                elif drop_counts[i] > 0:
                    drop = _choose(weights[i][0], pos, visual, last_visual, drop_counts[i], scoring)
                else:
                    drop = []
                if drop:
                    dropped[i] = sorted(pos[j] for j in drop)
                    keep = [j for j in range(n) if j not in set(drop)]
                    hidden = hidden[:, keep]
                    pos = [pos[j] for j in keep]
            logits = model.lm_head(lm.norm(hidden))[0]
    finally:
        for h in handles:
            h.remove()
        lm.set_attn_implementation(original)
    return logits, pos, dropped


def _cross_self(attn, pos, visual, last_visual):
    a = attn.max(dim=0).values.double()
    alive_vis = [j for j, p in enumerate(pos) if visual[p]]
    text_rows = [j for j, p in enumerate(pos) if p > last_visual]
    return {
        pos[j]: (float(a[text_rows, j].mean()), float(a[alive_vis, j].sum() / len(alive_vis)))
        for j in alive_vis
    }


def _choose(attn, pos, visual, last_visual, k, scoring):
    """Indices (into the current sequence) of the k tokens to drop; attn is (H, n, n) eager weights."""
    alive_vis = [j for j, p in enumerate(pos) if visual[p]]
    if scoring == "fastv":
        score = {j: float(attn[:, -1, j].mean()) for j in alive_vis}
    else:
        a = attn.max(dim=0).values  # head max, (n, n)
        text_rows = [j for j, p in enumerate(pos) if p > last_visual]
        c = {j: float(sum(a[t, j] for t in text_rows)) / max(1, len(text_rows)) for j in alive_vis}
        s = {j: float(sum(a[r, j] for r in alive_vis)) / len(alive_vis) for j in alive_vis}
        score = {j: c[j] * s[j] for j in alive_vis}
    ranked = sorted(alive_vis, key=lambda j: (score[j], j))
    return sorted(ranked[: min(k, len(ranked))])


def sample_inputs(batch: dict, b: int) -> dict:
    """Sample b of a left-padded batch, padding removed, with its own image tensors."""
    mask = batch["attention_mask"][b].bool()
    out = {"input_ids": batch["input_ids"][b][mask][None], "attention_mask": torch.ones(1, int(mask.sum()), dtype=torch.long)}
    return out


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "sample_ids"}


def measured_reduction(model, batches, recipe, dims) -> float:
    """Measured independently of ``fitprune.divergence``: ``1 - Σ executed / Σ unpruned`` prefill FLOPs, from the pruner's report and the attention masks."""
    pruned, full = 0.0, 0.0
    with fitprune.apply(model, recipe):
        for batch in batches:
            with torch.no_grad():
                model(**_inputs(batch))
            report = fitprune.last_report(model)
            pruned += float(report.flops(dims).sum())
            full += sum(prefill_flops(dims, [int(n)] * dims.num_layers) for n in batch["attention_mask"].sum(1))
    return 1.0 - pruned / full
