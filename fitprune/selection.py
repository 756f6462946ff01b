"""Token selection of the field's training-free pruners, as pure tensor functions (issue: strongest pruners).

Each function works on a batch and on each sample's own candidates and counts, so samples of one
batch may keep different numbers of tokens. Ties go to the earlier position. Shapes: ``B`` samples,
``L`` slots, ``D`` feature width.

* :func:`divprune_keep` — DivPrune (Alvar et al., CVPR 2025): keep a max-min diverse subset of the
  visual embeddings the language model receives. Distance ``1 - cos``; the first token kept is the
  most isolated one (largest distance to its nearest neighbour), then greedily the token farthest
  from everything kept so far.
* :func:`dart_drops` — DART (Wen et al., 2025, "duplication matters more"): pivots are the 4 visual
  and 4 text tokens with the largest L1 norm of their (post-RoPE) keys; the kept visual tokens are
  the image pivots plus, pivot by pivot, the pool tokens *least* similar (cosine of the normalised
  hidden states) to that pivot, the kept count split evenly over the pivots.
* :func:`visionzip_select` — VisionZip (Yang et al., CVPR 2025): *dominant* tokens by the vision
  tower's CLS attention (summed over heads); of the rest, ``C`` *contextual* targets at a uniform
  stride, every other remaining token assigned to its most similar target (cosine of the head-mean
  keys) and merged as ``target + mean(assigned)``, as the authors' code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DART_PIVOTS", "dart_drops", "divprune_keep", "visionzip_cls_attention", "visionzip_select"]

DART_PIVOTS = (4, 4)  # (visual, text) pivots: DART's defaults for LLaVA-1.5


def _order(scores: torch.Tensor, allowed: torch.Tensor, descending: bool) -> torch.Tensor:
    """(B, L) slot indices, the ``allowed`` slots first, best first by ``scores`` (ties: earlier slot first)."""
    masked = torch.where(allowed, scores.float(), -torch.inf if descending else torch.inf)
    return torch.sort(masked, dim=1, descending=descending, stable=True).indices


def _first(order: torch.Tensor, allowed: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the first k[b] ``allowed`` slots of ``order`` (from :func:`_order` with the same ``allowed``)."""
    k = torch.minimum(k, allowed.sum(1))
    chosen = torch.arange(order.shape[1], device=order.device)[None, :] < k[:, None]
    return torch.zeros_like(allowed).scatter_(1, order, chosen)


def _ranks_below(scores: torch.Tensor, allowed: torch.Tensor, k: torch.Tensor, descending: bool) -> torch.Tensor:
    """(B, L) bool: the k[b] best ``allowed`` slots of each row by ``scores`` (ties: earlier slot first)."""
    return _first(_order(scores, allowed, descending), allowed, k)


def divprune_keep(features: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the ``keep[b]`` candidates of sample b that DivPrune's greedy max-min selection keeps.

    ``features`` (B, L, D): the embeddings (any dtype; compared in float32); ``candidates`` (B, L) bool:
    the sample's visual tokens; ``keep`` (B,) long.
    """
    x = F.normalize(features.float(), dim=-1)
    dist = 1.0 - x @ x.transpose(1, 2)  # (B, L, L) cosine distance
    bsz, length = candidates.shape
    eye = torch.eye(length, dtype=torch.bool, device=x.device)[None]
    others = candidates[:, None, :] & ~eye
    nearest = torch.where(others, dist, torch.inf).amin(-1)  # (B, L): distance to the nearest other candidate
    nearest = torch.where(candidates, nearest, -torch.inf)
    rows = torch.arange(bsz, device=x.device)
    keep = torch.minimum(keep, candidates.sum(1))
    kept = torch.zeros_like(candidates)
    pick = nearest.argmax(1)  # the most isolated candidate (argmax: first of equal maxima)
    kept[rows, pick] = keep > 0
    to_selected = dist[rows, pick]  # (B, L): distance to the nearest kept token
    for step in range(1, int(keep.max()) if keep.numel() else 0):
        score = torch.where(candidates & ~kept, to_selected, -torch.inf)
        pick = score.argmax(1)
        kept[rows, pick] |= keep > step
        to_selected = torch.minimum(to_selected, dist[rows, pick])
    return kept & candidates


def dart_drops(hidden: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor, text: torch.Tensor,
               drop: torch.Tensor, pivots: tuple[int, int] = DART_PIVOTS) -> torch.Tensor:
    """(B, L) bool: the ``drop[b]`` candidates DART removes.

    ``hidden`` (B, L, D): the hidden states whose cosine similarity measures duplication;
    ``keys`` (B, Hkv, L, hd): the layer's keys (their L1 norm over heads and width picks the pivots);
    ``candidates``: the alive visual slots; ``text``: the slots text pivots may come from.
    """
    n_vis, n_txt = pivots
    bsz = candidates.shape[0]
    norm = keys.float().abs().sum(dim=(1, 3))  # (B, L): L1 norm of each token's keys
    keep = (candidates.sum(1) - drop).clamp(min=0)
    # pivot order: image pivots by descending norm, then text pivots; each row lists up to n_vis + n_txt slots
    order_img, order_txt = _order(norm, candidates, True), _order(norm, text & ~candidates, True)
    image_pivots = _first(order_img, candidates, torch.minimum(keep, torch.full_like(keep, n_vis)))
    text_pivots = _first(order_txt, text & ~candidates, torch.full_like(keep, n_txt))
    slots = torch.cat([order_img[:, :n_vis], order_txt[:, :n_txt]], dim=1)  # (B, P)
    valid = torch.cat([torch.arange(n_vis, device=keep.device)[None] < image_pivots.sum(1, keepdim=True),
                       torch.arange(n_txt, device=keep.device)[None] < text_pivots.sum(1, keepdim=True)], dim=1)
    n_piv = valid.sum(1)  # (B,)
    rest = keep - image_pivots.sum(1)  # tokens the pivots pick from the pool
    rank = valid.long().cumsum(1) - 1  # (B, P): index of each valid pivot
    share = torch.where(n_piv > 0, rest // n_piv.clamp(min=1), 0)
    extra = torch.where(n_piv > 0, rest % n_piv.clamp(min=1), 0)
    quota = torch.where(valid, share[:, None] + (rank < extra[:, None]).long(), 0)  # (B, P)
    h = F.normalize(hidden.float(), dim=-1)
    rows = torch.arange(bsz, device=h.device)
    pool = candidates & ~image_pivots
    kept = image_pivots.clone()
    for j in range(slots.shape[1]):
        sim = torch.einsum("bd,bld->bl", h[rows, slots[:, j]], h)
        chosen = _ranks_below(sim, pool, quota[:, j], descending=False)
        kept |= chosen
        pool &= ~chosen
    return candidates & ~kept


def visionzip_cls_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """(N, P) CLS-row attention probabilities of one vision layer, summed over heads, CLS column removed.

    ``query``/``key`` (N, H, 1 + P, hd): the layer's projected queries and keys (CLS first).
    """
    logits = torch.einsum("nhd,nhkd->nhk", query[:, :, 0].float(), key.float()) * scaling
    return torch.softmax(logits, dim=-1).sum(1)[:, 1:]


def visionzip_select(cls_attention: torch.Tensor, metric: torch.Tensor, features: torch.Tensor,
                     keep: torch.Tensor, contextual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on N images of P patches: returns (features with merged contextual tokens, kept (N, P) bool).

    ``cls_attention`` (N, P); ``metric`` (N, P, d): head-mean keys of the same layer; ``features``
    (N, P, Dv): the vision features the projector receives; ``keep`` (N,): tokens kept per image, of
    which ``contextual`` (N,) are merged targets (the rest are dominant). Merged targets stay at their
    own positions; the dominant ones keep theirs.
    """
    n_img, n_patch = cls_attention.shape
    contextual = torch.minimum(contextual, keep)
    dominant = _ranks_below(cls_attention, torch.ones_like(cls_attention, dtype=torch.bool), keep - contextual, True)
    remaining = ~dominant
    n_rem = remaining.sum(1)  # (N,)
    rank = remaining.long().cumsum(1) - 1  # rank of each remaining token in original order
    step = torch.where(contextual > 0, (n_rem // contextual.clamp(min=1)).clamp(min=1), 1)
    target = remaining & (rank % step[:, None] == 0) & (rank // step[:, None] < contextual[:, None])
    others = remaining & ~target
    m = F.normalize(metric.float(), dim=-1)
    sim = torch.where(target[:, None, :], m @ m.transpose(1, 2), -torch.inf)  # (N, P, P): other → target
    assign = F.one_hot(sim.argmax(-1), n_patch).to(features.dtype) * others[..., None].to(features.dtype)
    counts = assign.sum(1)  # (N, P): tokens assigned to each target
    merged = features + (assign.transpose(1, 2) @ features) / counts.clamp(min=1)[..., None]
    out = torch.where(target[..., None] & (counts[..., None] > 0), merged, features)
    return out, dominant | target
