"""A pruning recipe: how many visual tokens to drop after each decoder layer, and how to pick them.

FitPrune (arXiv 2409.10197, "Method": the pruning recipe) fits one number per decoder layer: how many visual tokens are
removed right after that layer's attention. The authors hard-code these as counts for LLaVA-1.5's
576 visual tokens. A :class:`Recipe` stores them as *fractions of the sample's initial visual-token
count*, so one recipe serves inputs of any resolution (LLaVA-NeXT, Qwen2-VL); :meth:`Recipe.drop_counts`
turns them back into integer counts for a given sample, and :meth:`Recipe.from_counts` builds a
recipe from the authors' counts.

Baselines (FastV, PDrop-style pyramid, uniform, random) are recipes too, differing only in the
per-layer schedule and the ``scoring`` rule (DESIGN §2, "Baselines, as recipes"). Methods that
select *before* the language model (DivPrune, VisionZip) use ``input_fraction``: tokens removed from
the embeddings before layer 0. A method that merges the tokens it removes into the ones it keeps
(VisionZip's contextual tokens) says so with ``merge_fraction > 0``; :attr:`Recipe.changes_values`.

Recipes are saved as JSON with sorted keys and a ``format_version``; loading drops unknown keys
with a warning and fails on missing or malformed ones with :class:`RecipeError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

from . import rules as _rules

__all__ = ["FORMAT_VERSION", "SCORINGS", "Recipe", "RecipeError", "validate_for"]

FORMAT_VERSION = 1
# the scoring rules known to the engine, from its registry (fitprune.rules: one entry per name)
SCORINGS = _rules.names()
LAYER_SCORINGS = _rules.names("layers")  # may drop after decoder layers
INPUT_SCORINGS = _rules.names("input")  # may drop before layer 0 (``input_fraction``)
MERGE_SCORINGS = _rules.names("merge")  # may merge removed tokens into kept ones (``merge_fraction``)

_EPS_COUNT = 1e-6  # fractions are stored as count / n; floor(frac * n + eps) gives the count back
_EPS_SUM = 1e-9


class RecipeError(ValueError):
    """A recipe is invalid, or a recipe file cannot be read."""


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _optional_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise RecipeError(f"{name} must be a string or None, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class Recipe:
    """A per-layer visual-token drop schedule plus the rule that picks which tokens go.

    ``drop_fractions[l]`` (one per decoder layer, shape ``(num_layers,)``) is the fraction of the
    sample's *initial* visual-token count removed right after layer ``l``'s attention: the dropped
    tokens were keys/values of layer ``l`` and are gone from its MLP onward (DESIGN §2, "Inference").

    ``input_fraction`` is the fraction removed *before* layer 0 (from the embeddings the language
    model receives; pre-LLM methods). ``merge_fraction`` is the fraction of the initial count that is
    kept as *merged* tokens, each the mean of itself and removed tokens (VisionZip's contextual
    tokens); it must fit within the tokens kept at the input. Both are 0 for in-LLM methods, and are
    left out of :meth:`to_dict` then, so recipes written before they existed keep their JSON.
    """

    drop_fractions: tuple[float, ...]
    scoring: str = "fitprune"
    method: str = "fitprune"
    family: str | None = None
    checkpoint: str | None = None
    budget: float | None = None
    flops_convention: str | None = None
    seed: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    input_fraction: float = 0.0
    merge_fraction: float = 0.0

    def __post_init__(self) -> None:
        fr = self.drop_fractions
        if isinstance(fr, (str, bytes, Mapping)) or not hasattr(fr, "__iter__"):
            raise RecipeError(f"drop_fractions must be a sequence of numbers, got {type(fr).__name__} {fr!r}")
        fr = tuple(fr)
        if not fr:
            raise RecipeError("drop_fractions is empty: a recipe needs one entry per decoder layer (at least one)")
        for i, f in enumerate(fr):
            if not _is_real(f) or not math.isfinite(float(f)) or not 0.0 <= float(f) <= 1.0:
                raise RecipeError(
                    f"drop_fractions[{i}] = {f!r}: each entry must be a finite number in [0, 1] "
                    "(a fraction of the initial visual-token count)"
                )
        fr = tuple(float(f) for f in fr)
        for name in ("input_fraction", "merge_fraction"):
            f = getattr(self, name)
            if not _is_real(f) or not math.isfinite(float(f)) or not 0.0 <= float(f) <= 1.0:
                raise RecipeError(f"{name} = {f!r}: must be a finite number in [0, 1] (a fraction of the initial "
                                  "visual-token count)")
            object.__setattr__(self, name, float(f))
        total = math.fsum(fr) + self.input_fraction
        if total > 1.0 + _EPS_SUM:
            raise RecipeError(
                f"drop_fractions (plus input_fraction) sum to {total:.6g} > 1: a recipe cannot drop more than all "
                "visual tokens; fractions are of the *initial* count, not of the tokens still alive"
            )
        object.__setattr__(self, "drop_fractions", fr)

        _rules.get(self.scoring)  # an unknown name: RecipeError listing the known ones
        if self.input_fraction > 0 and self.scoring not in INPUT_SCORINGS:
            raise RecipeError(
                f"input_fraction = {self.input_fraction:g} with scoring {self.scoring!r}: only "
                f"{', '.join(INPUT_SCORINGS)} select before the language model"
            )
        if any(fr) and self.scoring not in LAYER_SCORINGS:
            raise RecipeError(
                f"scoring {self.scoring!r} selects before the language model only; its recipe drops through "
                f"input_fraction with drop_fractions all 0 (in-LLM scorings: {', '.join(LAYER_SCORINGS)})"
            )
        if self.merge_fraction > 0:
            if self.scoring not in MERGE_SCORINGS:
                raise RecipeError(f"merge_fraction = {self.merge_fraction:g} with scoring {self.scoring!r}: only "
                                  f"{', '.join(MERGE_SCORINGS)} merge tokens")
            if self.merge_fraction > 1.0 - self.input_fraction + _EPS_SUM:
                raise RecipeError(
                    f"merge_fraction = {self.merge_fraction:g} > 1 - input_fraction = {1 - self.input_fraction:g}: "
                    "merged tokens are part of the tokens kept at the input"
                )
        if not isinstance(self.method, str) or not self.method:
            raise RecipeError(f"method must be a non-empty string, got {self.method!r}")
        _optional_str("family", self.family)
        _optional_str("checkpoint", self.checkpoint)
        _optional_str("flops_convention", self.flops_convention)
        if self.flops_convention is not None:
            from .flops import CONVENTIONS  # local: flops needs nothing from here at import time

            if self.flops_convention not in CONVENTIONS:
                raise RecipeError(
                    f"unknown flops_convention {self.flops_convention!r}; known: {', '.join(sorted(CONVENTIONS))}"
                )
        if self.budget is not None:
            b = self.budget
            if not _is_real(b) or not math.isfinite(float(b)) or not 0.0 <= float(b) < 1.0:
                raise RecipeError(f"budget = {b!r}: must be None or a fraction of prefill FLOPs in [0, 1)")
            object.__setattr__(self, "budget", float(b))
        if not _is_int(self.seed):
            raise RecipeError(f"seed must be an integer, got {type(self.seed).__name__} {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        if not isinstance(self.metadata, Mapping):
            raise RecipeError(f"metadata must be a mapping, got {type(self.metadata).__name__}")
        try:  # a JSON round trip gives a plain, detached copy that equals what load() will return
            meta = json.loads(json.dumps(dict(self.metadata), allow_nan=False, sort_keys=True))
        except (TypeError, ValueError) as e:
            raise RecipeError(
                f"metadata must be JSON-serialisable (finite numbers, strings, lists, dicts): {e}"
            ) from None
        object.__setattr__(self, "metadata", meta)

    # -- views -------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.drop_fractions)

    @property
    def is_noop(self) -> bool:
        return self.input_fraction == 0.0 and all(f == 0.0 for f in self.drop_fractions)

    @property
    def changes_values(self) -> bool:
        """True when kept tokens carry merged values (not only fewer tokens): ``merge_fraction > 0``."""
        return self.merge_fraction > 0.0

    def input_count(self, n_visual: int) -> int:
        """Visual tokens removed before layer 0: ``floor(input_fraction * n_visual + 1e-6)``, at most ``n_visual``."""
        if not _is_int(n_visual) or n_visual < 0:
            raise RecipeError(f"n_visual must be a non-negative integer, got {n_visual!r}")
        return min(int(math.floor(self.input_fraction * int(n_visual) + _EPS_COUNT)), int(n_visual))

    def merge_count(self, n_visual: int) -> int:
        """Of the tokens kept at the input, how many are merged tokens (VisionZip's contextual tokens)."""
        kept = int(n_visual) - self.input_count(n_visual)
        return min(int(math.floor(self.merge_fraction * int(n_visual) + _EPS_COUNT)), kept)

    def drop_counts(self, n_visual: int) -> list[int]:
        """Per-layer drop counts, shape ``(num_layers,)``, for a sample with ``n_visual`` visual tokens.

        ``k_l = floor(frac_l * n_visual + 1e-6)``, then clipped so the running total (with the
        :meth:`input_count` removed before layer 0) never exceeds ``n_visual``. For fractions ``c / N``
        this equals the authors' LLaVA-NeXT rule ``int(c * n_visual / N)`` (the epsilon absorbs the
        rounding of ``c / N``).
        """
        left = int(n_visual) - self.input_count(n_visual)  # validates n_visual
        n, counts = int(n_visual), []
        for f in self.drop_fractions:
            k = min(int(math.floor(f * n + _EPS_COUNT)), left)
            counts.append(k)
            left -= k
        return counts

    @classmethod
    def from_counts(cls, counts: Sequence[int], n_visual: int, **fields: Any) -> Recipe:
        """Build a recipe from per-layer drop counts for ``n_visual`` visual tokens (the authors' form).

        ``frac_l = counts[l] / n_visual``; ``drop_counts(n_visual)`` gives back exactly ``counts``.
        """
        if not _is_int(n_visual) or n_visual <= 0:
            raise RecipeError(f"n_visual must be a positive integer, got {n_visual!r}")
        counts = list(counts)
        bad = [(i, c) for i, c in enumerate(counts) if not _is_int(c) or c < 0]
        if bad:
            i, c = bad[0]
            raise RecipeError(f"counts[{i}] = {c!r}: drop counts must be non-negative integers")
        if sum(counts) > n_visual:
            raise RecipeError(
                f"counts sum to {sum(counts)} but there are only n_visual={n_visual} visual tokens; "
                "check that n_visual is the reference count the counts were published for"
            )
        recipe = cls(drop_fractions=tuple(int(c) / n_visual for c in counts), **fields)
        if recipe.drop_counts(n_visual) != [int(c) for c in counts]:  # pragma: no cover - guards the epsilon
            raise RecipeError(f"internal error: counts do not round-trip through fractions of {n_visual}")
        return recipe

    def with_updates(self, **changes: Any) -> Recipe:
        """A copy with some fields replaced (``dataclasses.replace``, re-validated)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {unknown}; fields are: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)

    # -- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with every field and ``format_version``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("input_fraction", "merge_fraction"):  # absent at 0: older recipes keep their JSON (and id)
            if d[name] == 0.0:
                del d[name]
        d["drop_fractions"] = list(self.drop_fractions)
        d["metadata"] = json.loads(json.dumps(self.metadata))
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | None = None) -> Recipe:
        """Inverse of :meth:`to_dict`. ``source`` names the origin (a file) in error messages."""
        where = source or "recipe dict"
        if not isinstance(d, Mapping):
            raise RecipeError(f"{where}: expected a JSON object (mapping), got {type(d).__name__}")
        if "format_version" not in d:
            raise RecipeError(
                f"{where}: missing 'format_version'; this fitprune writes and reads format {FORMAT_VERSION}"
            )
        version = d["format_version"]
        if not _is_int(version) or version < 1:
            raise RecipeError(f"{where}: format_version = {version!r} is not valid; expected {FORMAT_VERSION}")
        if version > FORMAT_VERSION:
            raise RecipeError(
                f"{where}: written with recipe format {version}, this fitprune reads up to {FORMAT_VERSION}: "
                "upgrade fitprune to load it"
            )
        if "drop_fractions" not in d:
            raise RecipeError(f"{where}: missing required key 'drop_fractions'")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"format_version"})
        if unknown:
            warnings.warn(f"{where}: ignoring unknown recipe key(s) {unknown}", stacklevel=2)
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None

    def to_json(self) -> str:
        """JSON text with sorted keys (floats use Python's shortest repr, so they round-trip exactly)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the recipe to ``path`` atomically (temp file in the same directory, then ``os.replace``)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_json() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        """Read a recipe written by :meth:`save`; any problem raises :class:`RecipeError` naming the file."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as e:
            raise RecipeError(f"cannot read recipe file {path!r}: {e.strerror or e}") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"recipe file {path!r} is not valid JSON: {e}") from None
        return cls.from_dict(data, source=f"recipe file {path!r}")


def validate_for(recipe: Recipe, *, family: str, num_layers: int) -> None:
    """Raise :class:`RecipeError` unless ``recipe`` fits a model of ``family`` with ``num_layers`` decoder layers."""
    if recipe.family is not None and recipe.family != family:
        raise RecipeError(
            f"recipe is for model family {recipe.family!r}, model is {family!r}: "
            "fit a recipe for this model (or clear the recipe's family to use it anyway)"
        )
    if recipe.num_layers != num_layers:
        raise RecipeError(
            f"recipe has {recipe.num_layers} layers, model has {num_layers}: fit a recipe for this model"
        )
