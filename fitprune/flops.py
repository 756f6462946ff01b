"""Prefill compute of a decoder-only language model under visual-token pruning.

Costs are multiply-accumulates (MACs); ``prefill_flops = 2 * prefill_macs``. A *convention* maps one
decoder layer's token counts to MACs (DESIGN §2, "FLOPs"):

* ``"full"`` — what the engine executes, for all tokens (system + visual + text), with GQA and the
  model's real widths. With ``n`` tokens entering layer ``l``'s attention and ``n'`` left for its MLP
  (``d`` hidden, ``H``/``Hkv`` query/KV heads of width ``hd``, ``m`` MLP width)::

      q_proj  n·d·(H·hd)      k_proj, v_proj  2·n·d·(Hkv·hd)      o_proj  n·(H·hd)·d
      scores + weighted sum   2·n²·(H·hd)     (the full n×n, not the causal half: SDPA and
                                              FlashAttention kernels skip at most the masked
                                              blocks, and the authors count n² too)
      MLP     3·n'·d·m  (gated: gate/up/down)  or  2·n'·d·m  (plain up/down)

  Tokens are dropped after attention, so o_proj runs at ``n``: the rows are gathered just before
  the MLP.

* ``"fitprune-paper"`` — the authors' accounting (github.com/ywh187/FitPrune, its FLOPs estimate):
  visual tokens only, ``3·n·d² + 2·n²·d`` at the layer's input count ``n`` and
  ``n'·d² + 3·n'·d·m`` at the count ``n'`` left after that layer's pruning. Use it to check the
  published recipes (``fitprune.presets``), with ``n_other=0``.

Norms, RoPE, softmax and residual adds are ignored in both (they are O(n·d)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .recipe import Recipe

__all__ = [
    "CONVENTIONS",
    "ModelDims",
    "layer_macs",
    "prefill_flops",
    "prefill_macs",
    "projector_macs",
    "recipe_reduction",
    "recipe_token_schedule",
    "vit_macs",
]

# model_type values of text decoders whose MLP is plain up/down (no gate_proj); everything else is
# assumed llama-style gated (llama, mistral, qwen2, qwen2_vl_text, gemma, phi3, ...).
_UNGATED_MODEL_TYPES = frozenset({"gpt2", "opt", "gpt_neox", "gptj", "phi", "falcon", "bloom", "starcoder2", "mpt"})


@dataclass(frozen=True)
class ModelDims:
    """The widths of a decoder-only text model that its prefill cost depends on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, Integral) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelDims.{name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        v = self.vocab_size
        if not isinstance(v, Integral) or isinstance(v, bool) or v < 0:
            raise ValueError(f"ModelDims.vocab_size must be a non-negative integer (0 = unknown), got {v!r}")
        object.__setattr__(self, "vocab_size", int(v))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads} (GQA needs it)"
            )
        object.__setattr__(self, "gated_mlp", bool(self.gated_mlp))

    @classmethod
    def from_config(cls, text_config: Any, *, gated_mlp: bool | None = None) -> ModelDims:
        """Read the dims from a Hugging Face text config (``LlamaConfig``, ``Qwen2Config``, ...).

        ``head_dim`` is ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``;
        ``num_key_value_heads`` defaults to ``num_attention_heads``. ``gated_mlp`` is inferred from
        ``model_type`` (llama/qwen2/mistral-style gate_proj MLPs are gated) unless given.
        """
        def need(name: str) -> int:
            value = getattr(text_config, name, None)
            if value is None:
                raise ValueError(
                    f"{type(text_config).__name__} has no {name!r}; pass the *text* config "
                    "(e.g. model.config.text_config) or build ModelDims by hand"
                )
            return int(value)

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or hidden // heads
        if gated_mlp is None:
            gated_mlp = getattr(text_config, "model_type", "") not in _UNGATED_MODEL_TYPES
        return cls(
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            intermediate_size=need("intermediate_size"),
            vocab_size=int(getattr(text_config, "vocab_size", 0) or 0),
            gated_mlp=gated_mlp,
        )


# -- per-layer conventions: (dims, n_in, n_out) -> MACs ------------------------------------------


def _full(dims: ModelDims, n: float, n_out: float) -> float:
    d, q, kv = dims.hidden_size, dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    attn = n * d * q + 2 * n * d * kv + n * q * d + 2 * n * n * q
    mlp = (3 if dims.gated_mlp else 2) * n_out * d * dims.intermediate_size
    return float(attn + mlp)


def _fitprune_paper(dims: ModelDims, n: float, n_out: float) -> float:
    d, m = dims.hidden_size, dims.intermediate_size
    return float(3 * n * d * d + 2 * n * n * d + n_out * d * d + 3 * n_out * d * m)


CONVENTIONS: dict[str, Callable[[ModelDims, float, float], float]] = {
    "full": _full,
    "fitprune-paper": _fitprune_paper,
}


def _convention(name: str) -> Callable[[ModelDims, float, float], float]:
    try:
        return CONVENTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown FLOPs convention {name!r}; known: {', '.join(sorted(CONVENTIONS))}") from None


def _count(name: str, v: Any) -> float:
    if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(float(v)) or v < 0:
        raise ValueError(f"{name} must be a non-negative token count, got {v!r}")
    return float(v)


def layer_macs(dims: ModelDims, n_in: float, n_out: float, convention: str = "full") -> float:
    """MACs of one decoder layer: ``n_in`` tokens enter its attention, ``n_out <= n_in`` reach its MLP."""
    fn = _convention(convention)
    n, n2 = _count("n_in", n_in), _count("n_out", n_out)
    if n2 > n:
        raise ValueError(f"n_out={n_out} > n_in={n_in}: pruning only removes tokens")
    return fn(dims, n, n2)


def prefill_macs(
    dims: ModelDims,
    attn_tokens: Sequence[float],
    mlp_tokens: Sequence[float] | None = None,
    convention: str = "full",
    *,
    lm_head_tokens: int = 0,
) -> float:
    """MACs of the language model's prefill.

    ``attn_tokens[l]`` / ``mlp_tokens[l]`` (each shape ``(num_layers,)``): tokens entering layer ``l``'s
    attention / its MLP (``mlp_tokens=None``: no pruning inside layers). ``lm_head_tokens`` rows go
    through the LM head (``d·vocab`` each; 1 for generation, the prompt length for full logits).
    """
    _convention(convention)
    attn = list(attn_tokens)
    mlp = attn if mlp_tokens is None else list(mlp_tokens)
    for name, seq in (("attn_tokens", attn), ("mlp_tokens", mlp)):
        if len(seq) != dims.num_layers:
            raise ValueError(
                f"{name} has {len(seq)} entries, the model has {dims.num_layers} layers: give one per layer"
            )
    total = math.fsum(layer_macs(dims, a, b, convention) for a, b in zip(attn, mlp))
    heads = _count("lm_head_tokens", lm_head_tokens)
    if heads and not dims.vocab_size:
        raise ValueError("lm_head_tokens > 0 but ModelDims.vocab_size is 0 (unknown): set the vocabulary size")
    return total + heads * dims.hidden_size * dims.vocab_size


def prefill_flops(
    dims: ModelDims,
    attn_tokens: Sequence[float],
    mlp_tokens: Sequence[float] | None = None,
    convention: str = "full",
    *,
    lm_head_tokens: int = 0,
) -> float:
    """``2 * prefill_macs(...)`` (one multiply-accumulate = two floating-point operations)."""
    return 2.0 * prefill_macs(dims, attn_tokens, mlp_tokens, convention, lm_head_tokens=lm_head_tokens)


def recipe_token_schedule(recipe: Recipe, n_visual: int, n_other: int = 0) -> tuple[list[int], list[int]]:
    """Per-layer token counts when ``recipe`` prunes a sequence of ``n_visual + n_other`` tokens.

    Returns ``(attn_tokens, mlp_tokens)``, each shape ``(num_layers,)``: the tokens entering layer
    ``l``'s attention, and the tokens left after layer ``l``'s pruning (its MLP count, and the next
    layer's attention count). ``n_other`` (system + text tokens) are never dropped. Tokens a recipe
    removes before layer 0 (``input_fraction``) never enter any layer.
    """
    if not isinstance(n_other, Integral) or isinstance(n_other, bool) or n_other < 0:
        raise ValueError(f"n_other must be a non-negative integer (system + text tokens), got {n_other!r}")
    alive = n_visual - recipe.input_count(n_visual)
    attn, mlp = [], []
    for k in recipe.drop_counts(n_visual):
        attn.append(n_other + alive)
        alive -= k
        mlp.append(n_other + alive)
    return attn, mlp


def recipe_reduction(
    recipe: Recipe, dims: ModelDims, n_visual: int, n_other: int = 0, convention: str = "full"
) -> float:
    """Predicted fraction of prefill MACs removed: ``1 - pruned / unpruned`` (LM head excluded)."""
    if recipe.num_layers != dims.num_layers:
        raise ValueError(
            f"recipe has {recipe.num_layers} layers, model has {dims.num_layers}: fit a recipe for this model"
        )
    attn, mlp = recipe_token_schedule(recipe, n_visual, n_other)
    full = prefill_macs(dims, [n_visual + n_other] * dims.num_layers, None, convention)
    if full == 0:
        return 0.0
    return 1.0 - prefill_macs(dims, attn, mlp, convention) / full


# -- optional parts outside the language model -----------------------------------------------------


def vit_macs(vision_config: Any, num_patches: int, *, extra_tokens: int = 1, num_layers: int | None = None) -> float:
    """MACs of a ViT vision tower (CLIP / SigLIP / DINOv2-like) on one image.

    ``n = num_patches + extra_tokens`` tokens (CLS = 1 for CLIP/DINOv2; 0 for SigLIP; + registers);
    the patch embedding costs ``num_patches·C·p²·d`` and each of ``num_layers`` (default all)
    encoder layers ``4·n·d² + 2·n²·d + 2·n·d·m`` (QKV+out projections, n×n attention, plain MLP).
    """
    d, m = int(vision_config.hidden_size), int(vision_config.intermediate_size)
    layers = int(vision_config.num_hidden_layers) if num_layers is None else num_layers
    p = _count("num_patches", num_patches)
    n = p + _count("extra_tokens", extra_tokens)
    patch = getattr(vision_config, "patch_size", None)
    channels = getattr(vision_config, "num_channels", 3) or 3
    embed = p * channels * int(patch) ** 2 * d if patch else 0.0
    return float(embed + layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m))


def projector_macs(
    num_tokens: int, in_features: int, out_features: int, *, hidden_features: int | None = None
) -> float:
    """MACs of LLaVA's 2-layer MLP projector: ``n·(in·hidden + hidden·out)``, hidden defaults to out."""
    n = _count("num_tokens", num_tokens)
    hidden = out_features if hidden_features is None else hidden_features
    return float(n * (in_features * hidden + hidden * out_features))
