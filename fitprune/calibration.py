"""Attention statistics of a calibration set: what FitPrune's fit reads (DESIGN §2, "Fitting").

For one sample at decoder layer ``l`` with head-max attention ``A`` (max over heads, not mean):

* cross score ``c_v = mean_{t in T} A[t, v]`` over the text query rows ``T`` (tokens after the last
  visual token);
* self score ``s_v = mean_{i in V} A[i, v]`` over the visual query rows (causal, zeros counted);
* reference masses of the **unpruned** model ``C_l = sum_v c_v`` and ``S_l = sum_v s_v``.

:class:`CalibrationStats` holds them as dense ``(S, L, V)`` arrays, ``V = max n_visual``, with NaN
where a sample has fewer visual tokens (ragged counts, e.g. LLaVA-NeXT's any-resolution tiling).
:meth:`CalibrationStats.to_arrow` / :meth:`~CalibrationStats.from_arrow` convert to the two long
tables the storage layer writes as Parquet (one row per sample × layer × token, and one per
sample × layer). :func:`synthetic_stats` makes plausible random statistics for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["LAYER_SCHEMA", "TOKEN_SCHEMA", "CalibrationStats", "synthetic_stats"]

TOKEN_SCHEMA = pa.schema([
    ("checkpoint", pa.string()),
    ("calib_id", pa.string()),
    ("sample", pa.string()),
    ("layer", pa.int16()),
    ("token", pa.int32()),  # visual index 0..n_visual-1, original order
    ("cross", pa.float32()),
    ("self", pa.float32()),
])
LAYER_SCHEMA = pa.schema([
    ("checkpoint", pa.string()),
    ("calib_id", pa.string()),
    ("sample", pa.string()),
    ("layer", pa.int16()),
    ("cross_mass", pa.float64()),
    ("self_mass", pa.float64()),
    ("n_system", pa.int32()),
    ("n_visual", pa.int32()),
    ("n_text", pa.int32()),
    ("n_alive", pa.int32()),  # visual tokens alive entering the layer (= n_visual when unpruned)
])

# C_l is the sum of the stored float32 scores, possibly computed from the float64/fp16 attention
# before rounding: accept small disagreements, catch swapped or unrelated columns.
_MASS_RTOL, _MASS_ATOL = 1e-3, 1e-6


def _int_vector(name: str, value, n: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full(n, arr)
    if arr.shape != (n,):
        raise ValueError(f"{name} has shape {arr.shape}, expected ({n},): one entry per sample")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


@dataclass
class CalibrationStats:
    """Per-token FitPrune scores of a calibration set, from one forward pass per sample.

    Arrays (``S`` samples, ``L`` decoder layers, ``V = max(n_visual)``):

    * ``cross``, ``self_`` — ``(S, L, V)`` float32; NaN where token ``v`` does not exist for the
      sample (``v >= n_visual[s]``) or is not alive at that layer (statistics of a pruned pass).
    * ``n_visual``, ``n_system``, ``n_text`` — ``(S,)`` int64: visual tokens, tokens before the first
      visual token, tokens after the last one.
    * ``cross_mass``, ``self_mass`` — ``(S, L)`` float64: ``C_l``, ``S_l`` (nansum of the scores).
    * ``n_alive`` — ``(S, L)`` int64 or None (None: an unpruned pass, ``n_alive = n_visual``).
    """

    cross: np.ndarray
    self_: np.ndarray
    n_visual: np.ndarray
    n_system: np.ndarray
    n_text: np.ndarray
    cross_mass: np.ndarray
    self_mass: np.ndarray
    sample_ids: list[str] | None = None
    checkpoint: str | None = None
    calib_id: str | None = None
    family: str | None = None
    n_alive: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.cross = np.asarray(self.cross, dtype=np.float32)
        self.self_ = np.asarray(self.self_, dtype=np.float32)
        if self.cross.ndim != 3:
            raise ValueError(f"cross has shape {self.cross.shape}; expected (samples, layers, visual tokens)")
        if self.self_.shape != self.cross.shape:
            raise ValueError(f"self_ has shape {self.self_.shape} but cross has {self.cross.shape}: they must agree")
        S, L, V = self.cross.shape
        if S < 1 or L < 1 or V < 1:
            raise ValueError(f"empty statistics: shape {self.cross.shape}; need at least one sample, layer and token")
        self.n_visual = _int_vector("n_visual", self.n_visual, S)
        self.n_system = _int_vector("n_system", self.n_system, S)
        self.n_text = _int_vector("n_text", self.n_text, S)
        if self.n_visual.min() < 1 or self.n_visual.max() > V:
            raise ValueError(
                f"n_visual must lie in [1, {V}] (the token axis of cross), got {self.n_visual.min()}..{self.n_visual.max()}"
            )
        if self.n_visual.max() != V:
            raise ValueError(f"the token axis ({V}) is longer than max(n_visual) = {self.n_visual.max()}: trim it")
        if self.n_system.min() < 0 or self.n_text.min() < 0:
            raise ValueError("n_system and n_text must be non-negative")
        for name in ("cross_mass", "self_mass"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != (S, L):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({S}, {L}) = (samples, layers)")
            if not np.all(np.isfinite(arr)) or arr.min() < 0:
                raise ValueError(f"{name} must be finite and non-negative")
            setattr(self, name, arr)
        if self.sample_ids is None:
            self.sample_ids = [str(i) for i in range(S)]
        self.sample_ids = [str(s) for s in self.sample_ids]
        if len(self.sample_ids) != S:
            raise ValueError(f"sample_ids has {len(self.sample_ids)} entries for {S} samples")
        if len(set(self.sample_ids)) != S:
            raise ValueError("sample_ids must be unique (they key the rows of the Arrow tables)")
        for name in ("checkpoint", "calib_id", "family"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{name} must be a string or None, got {type(v).__name__}")

        exists = np.arange(V)[None, :] < self.n_visual[:, None]  # (S, V)
        if self.n_alive is None:
            present = np.broadcast_to(exists[:, None, :], (S, L, V))
        else:
            self.n_alive = np.asarray(self.n_alive).astype(np.int64)
            if self.n_alive.shape != (S, L):
                raise ValueError(f"n_alive has shape {self.n_alive.shape}, expected ({S}, {L})")
            if np.any(self.n_alive < 0) or np.any(self.n_alive > self.n_visual[:, None]):
                raise ValueError("n_alive must lie in [0, n_visual] for every sample and layer")
            if np.array_equal(self.n_alive, np.broadcast_to(self.n_visual[:, None], (S, L))):
                self.n_alive = None
            present = ~np.isnan(self.cross)
        for name, arr in (("cross", self.cross), ("self_", self.self_)):
            finite = np.isfinite(arr)
            if self.n_alive is None:
                if not np.array_equal(finite, present):
                    s = int(np.argwhere(finite != present)[0][0])
                    raise ValueError(
                        f"{name}: sample {self.sample_ids[s]!r} (n_visual={self.n_visual[s]}) must have finite scores "
                        "for tokens 0..n_visual-1 and NaN beyond them"
                    )
            else:
                if not np.array_equal(finite, present) or np.any(present & ~exists[:, None, :]):
                    raise ValueError(f"{name}: NaN pattern disagrees with cross or with n_visual")
                if not np.array_equal(present.sum(axis=2), self.n_alive):
                    raise ValueError(f"{name}: the number of finite scores per (sample, layer) must equal n_alive")
            if np.nanmin(arr) < 0:
                raise ValueError(f"{name} holds negative scores; attention probabilities are >= 0")
        for name, arr, mass in (("cross", self.cross, self.cross_mass), ("self_", self.self_, self.self_mass)):
            if self.n_alive is not None:
                break  # a pruned pass: masses are those of the unpruned model, not of what is left
            got = np.nansum(arr, axis=2, dtype=np.float64)
            if not np.allclose(got, mass, rtol=_MASS_RTOL, atol=_MASS_ATOL):
                s, l = np.unravel_index(np.argmax(np.abs(got - mass)), mass.shape)
                raise ValueError(
                    f"{name}_mass disagrees with the sum of {name} scores (sample {self.sample_ids[s]!r}, layer {l}: "
                    f"{mass[s, l]:.6g} vs {got[s, l]:.6g}); masses must be those of the unpruned pass"
                )

    # -- views ------------------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return self.cross.shape[0]

    @property
    def num_layers(self) -> int:
        return self.cross.shape[1]

    @property
    def max_visual(self) -> int:
        return self.cross.shape[2]

    @property
    def is_unpruned(self) -> bool:
        return self.n_alive is None

    def subset(self, sample_indices: Sequence[int] | np.ndarray) -> CalibrationStats:
        """A copy with only the given samples (in that order); the token axis is trimmed to their max."""
        idx = np.asarray(sample_indices)
        if idx.dtype == bool:
            if idx.shape != (self.num_samples,):
                raise ValueError(f"a boolean mask needs {self.num_samples} entries, got {idx.shape}")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu":
            raise ValueError("sample_indices must be a non-empty 1-D sequence of integer indices (or a boolean mask)")
        if idx.min() < -self.num_samples or idx.max() >= self.num_samples:
            raise ValueError(f"sample index out of range for {self.num_samples} samples")
        idx = idx % self.num_samples
        if len(np.unique(idx)) != len(idx):
            raise ValueError("sample_indices repeats a sample; sample ids must stay unique")
        V = int(self.n_visual[idx].max())
        return CalibrationStats(
            cross=self.cross[idx, :, :V].copy(),
            self_=self.self_[idx, :, :V].copy(),
            n_visual=self.n_visual[idx],
            n_system=self.n_system[idx],
            n_text=self.n_text[idx],
            cross_mass=self.cross_mass[idx],
            self_mass=self.self_mass[idx],
            sample_ids=[self.sample_ids[i] for i in idx],
            checkpoint=self.checkpoint,
            calib_id=self.calib_id,
            family=self.family,
            n_alive=None if self.n_alive is None else self.n_alive[idx],
        )

    # -- Arrow ------------------------------------------------------------------------------------

    def to_arrow(self) -> tuple[pa.Table, pa.Table]:
        """``(token_table, layer_table)`` with :data:`TOKEN_SCHEMA` / :data:`LAYER_SCHEMA`.

        Token rows exist only for finite scores, ordered by sample, layer, token.
        """
        S, L, V = self.cross.shape
        present = ~np.isnan(self.cross)  # (S, L, V)
        flat = np.flatnonzero(present.ravel())
        s_idx, rest = np.divmod(flat, L * V)
        layer, token = np.divmod(rest, V)
        per_sample = np.bincount(s_idx, minlength=S)  # rows are sorted by sample
        tokens = pa.table(
            [
                _repeat_strings([self.checkpoint], [len(flat)]),
                _repeat_strings([self.calib_id], [len(flat)]),
                _repeat_strings(self.sample_ids, per_sample),
                pa.array(layer.astype(np.int16)),
                pa.array(token.astype(np.int32)),
                pa.array(self.cross.ravel()[flat]),
                pa.array(self.self_.ravel()[flat]),
            ],
            schema=TOKEN_SCHEMA,
        )
        n_alive = self.n_alive if self.n_alive is not None else np.broadcast_to(self.n_visual[:, None], (S, L))
        rows = S * L
        layers = pa.table(
            [
                _repeat_strings([self.checkpoint], [rows]),
                _repeat_strings([self.calib_id], [rows]),
                _repeat_strings(self.sample_ids, np.full(S, L)),
                pa.array(np.tile(np.arange(L, dtype=np.int16), S)),
                pa.array(self.cross_mass.ravel()),
                pa.array(self.self_mass.ravel()),
                pa.array(np.repeat(self.n_system, L).astype(np.int32)),
                pa.array(np.repeat(self.n_visual, L).astype(np.int32)),
                pa.array(np.repeat(self.n_text, L).astype(np.int32)),
                pa.array(np.ascontiguousarray(n_alive).ravel().astype(np.int32)),
            ],
            schema=LAYER_SCHEMA,
        )
        return tokens, layers

    @classmethod
    def from_arrow(
        cls,
        token_table: pa.Table,
        layer_table: pa.Table,
        *,
        checkpoint: str | None = None,
        calib_id: str | None = None,
        family: str | None = None,
    ) -> CalibrationStats:
        """Inverse of :meth:`to_arrow`; rows may come in any order (e.g. read back through DuckDB).

        Sample order is the order of first appearance in ``layer_table``. Tables holding several
        checkpoints or calibration sets need ``checkpoint=`` / ``calib_id=`` to pick one.
        """
        for name, table, schema in (("token_table", token_table, TOKEN_SCHEMA), ("layer_table", layer_table, LAYER_SCHEMA)):
            missing = [f.name for f in schema if f.name not in table.column_names]
            if missing:
                raise ValueError(f"{name} lacks column(s) {missing}; expected columns {schema.names}")
        token_table, ckpt = _pick(token_table, "checkpoint", checkpoint, "token_table")
        token_table, cid = _pick(token_table, "calib_id", calib_id, "token_table")
        layer_table, ckpt2 = _pick(layer_table, "checkpoint", checkpoint if checkpoint is not None else ckpt, "layer_table")
        layer_table, cid2 = _pick(layer_table, "calib_id", calib_id if calib_id is not None else cid, "layer_table")
        if layer_table.num_rows == 0:
            raise ValueError("layer_table has no rows (for this checkpoint / calib_id): no statistics to read")

        # layer table: (S, L) grid
        lsample = _strings(layer_table["sample"])
        enc = pc.dictionary_encode(lsample)
        order = np.asarray(enc.indices)  # dictionary order = first appearance
        ids = enc.dictionary.to_pylist()
        S = len(ids)
        llayer = np.asarray(layer_table["layer"]).astype(np.int64)
        if llayer.min() < 0:
            raise ValueError("layer_table has negative layer indices")
        L = int(llayer.max()) + 1
        if layer_table.num_rows != S * L:
            raise ValueError(f"layer_table has {layer_table.num_rows} rows; {S} samples x {L} layers need exactly {S * L}")
        slot = order * L + llayer
        seen = np.zeros(S * L, dtype=bool)
        seen[slot] = True
        if not seen.all():
            raise ValueError("layer_table must hold exactly one row per (sample, layer) for layers 0..L-1")

        def grid(col: str, dtype) -> np.ndarray:
            out = np.empty(S * L, dtype=dtype)
            out[slot] = np.asarray(layer_table[col]).astype(dtype)
            return out.reshape(S, L)

        per_sample = {}
        for col in ("n_system", "n_visual", "n_text"):
            g = grid(col, np.int64)
            if not np.all(g == g[:, :1]):
                raise ValueError(f"layer_table: {col} differs between layers of one sample")
            per_sample[col] = g[:, 0]
        n_alive = grid("n_alive", np.int64)
        V = int(per_sample["n_visual"].max())

        # token table: scatter into (S, L, V)
        index = pa.array(ids, pa.string())
        tsample = pc.index_in(_strings(token_table["sample"]), value_set=index)
        if tsample.null_count:
            raise ValueError("token_table has samples that are not in layer_table")
        ts = np.asarray(tsample.combine_chunks() if isinstance(tsample, pa.ChunkedArray) else tsample).astype(np.int64)
        tl = np.asarray(token_table["layer"]).astype(np.int64)
        tt = np.asarray(token_table["token"]).astype(np.int64)
        if tl.size and (tl.min() < 0 or tl.max() >= L):
            raise ValueError(f"token_table has layers outside 0..{L - 1}")
        if tt.size and (tt.min() < 0 or np.any(tt >= per_sample["n_visual"][ts])):
            raise ValueError("token_table has token indices outside 0..n_visual-1 of their sample")
        flat = (ts * L + tl) * V + tt
        filled = np.zeros(S * L * V, dtype=bool)
        filled[flat] = True
        if int(filled.sum()) != len(flat):
            raise ValueError("token_table has duplicate (sample, layer, token) rows")
        cross = np.full(S * L * V, np.nan, dtype=np.float32)
        self_ = np.full(S * L * V, np.nan, dtype=np.float32)
        cross[flat] = np.asarray(token_table["cross"]).astype(np.float32)
        self_[flat] = np.asarray(token_table["self"]).astype(np.float32)
        return cls(
            cross=cross.reshape(S, L, V),
            self_=self_.reshape(S, L, V),
            n_visual=per_sample["n_visual"],
            n_system=per_sample["n_system"],
            n_text=per_sample["n_text"],
            cross_mass=grid("cross_mass", np.float64),
            self_mass=grid("self_mass", np.float64),
            sample_ids=ids,
            checkpoint=ckpt if ckpt is not None else ckpt2,
            calib_id=cid if cid is not None else cid2,
            family=family,
            n_alive=n_alive,
        )


def _repeat_strings(values: Sequence[str | None], counts: np.ndarray) -> pa.Array:
    """A plain string array holding ``values[i]`` ``counts[i]`` times in a row, shape ``(sum(counts),)``.

    Built in Arrow/numpy buffers, not Python objects: 10M-row columns take a fraction of a second.
    ``None`` values become nulls.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if len(values) == 1:
        (value,) = values
        if value is None:
            return pa.nulls(n, pa.string())
        data = value.encode("utf-8")
        if len(data) * n >= 2**31:
            raise ValueError("string column exceeds 2 GiB; write the statistics in several shards")
        offsets = np.arange(n + 1, dtype=np.int32) * np.int32(len(data))
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data * n))
    indices = np.repeat(np.arange(len(values), dtype=np.int32), counts)
    return pa.DictionaryArray.from_arrays(pa.array(indices), pa.array(list(values), pa.string())).cast(pa.string())


def _strings(col) -> pa.Array:
    """A plain string array (dictionary-encoded partition columns and chunking undone)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    return col


def _pick(table: pa.Table, col: str, want: str | None, name: str) -> tuple[pa.Table, str | None]:
    """Keep rows whose ``col`` equals ``want``; with ``want=None`` the column must hold one value."""
    values = pc.unique(_strings(table[col])).to_pylist()
    if want is not None:
        if want not in values:
            raise ValueError(f"{name} has no rows with {col} = {want!r}; it holds {sorted(map(str, values))}")
        if len(values) > 1:
            table = table.filter(pc.equal(_strings(table[col]), pa.scalar(want, pa.string())))
        return table, want
    if len(values) > 1:
        raise ValueError(
            f"{name} mixes several {col} values {sorted(map(str, values))}: pass {col}= to from_arrow to pick one"
        )
    return table, (values[0] if values else None)


# -- synthetic statistics -------------------------------------------------------------------------


def synthetic_stats(
    num_samples: int,
    num_layers: int,
    n_visual: int | Sequence[int],
    n_system: int | Sequence[int] = 35,
    n_text: int | Sequence[int] = 40,
    seed: int = 0,
) -> CalibrationStats:
    """Plausible random statistics for tests and benchmarks (no model involved).

    Per (sample, layer) the scores are lognormal with a spread that grows with depth (early layers
    attend diffusely, deep ones to a few tokens), built on a per-token importance shared by all
    layers, plus a few heavy "sink" tokens, and scaled to a random visual mass (cross ``C_l`` in
    [0.1, 0.7], self ``S_l`` in [0.3, 0.9]). Self scores share part of their log-score with cross
    scores and decay along the sequence (causal: later tokens are seen by fewer visual rows). ``n_visual`` (and ``n_system``, ``n_text``) may be per-sample.
    """
    for name, v in (("num_samples", num_samples), ("num_layers", num_layers)):
        if not isinstance(v, Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    S, L = int(num_samples), int(num_layers)
    nv = _int_vector("n_visual", n_visual, S)
    if nv.min() < 1:
        raise ValueError("n_visual must be >= 1")
    V = int(nv.max())
    rng = np.random.default_rng(seed)
    depth = np.linspace(0.0, 1.0, L, dtype=np.float32)[None, :, None]  # (1, L, 1)
    sigma = 0.4 + 1.4 * depth
    # a per-token importance that persists across layers (what the walk exploits), per-layer noise,
    # and a self score that only partly agrees with the cross score
    persistent = rng.standard_normal((S, 1, V), dtype=np.float32)
    z_cross = 0.8 * persistent + 0.6 * rng.standard_normal((S, L, V), dtype=np.float32)
    z_self = 0.8 * persistent + 0.6 * rng.standard_normal((S, L, V), dtype=np.float32)
    log_c = sigma * z_cross
    log_s = sigma * (0.5 * z_cross + 0.866 * z_self)
    heavy = rng.random((S, L, V), dtype=np.float32) < 0.01
    log_c += heavy * np.float32(3.0)
    log_s += heavy * np.float32(2.0)
    position = np.arange(V, dtype=np.float32)[None, None, :] / np.maximum(nv, 1)[:, None, None].astype(np.float32)
    log_s += np.log1p(-0.9 * np.minimum(position, 1.0)).astype(np.float32)
    exists = (np.arange(V)[None, :] < nv[:, None])[:, None, :]  # (S, 1, V)
    out = []
    for logits, lo, hi in ((log_c, 0.1, 0.7), (log_s, 0.3, 0.9)):
        w = np.where(exists, np.exp(logits), np.float32(0))
        mass = rng.uniform(lo, hi, size=(S, L, 1)).astype(np.float32)
        w *= mass / w.sum(axis=2, keepdims=True)
        w[~np.broadcast_to(exists, w.shape)] = np.nan
        out.append(w.astype(np.float32))
    cross, self_ = out
    return CalibrationStats(
        cross=cross,
        self_=self_,
        n_visual=nv,
        n_system=n_system,
        n_text=n_text,
        cross_mass=np.nansum(cross, axis=2, dtype=np.float64),
        self_mass=np.nansum(self_, axis=2, dtype=np.float64),
        sample_ids=[f"synthetic-{seed}-{i}" for i in range(S)],
        checkpoint="synthetic",
        calib_id=f"synthetic-{seed}",
    )
