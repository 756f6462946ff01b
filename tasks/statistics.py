"""Attention statistics of a calibration set, keyed by sample: collected where missing, read back once each.

The store holds ``stats_layer`` and ``stats_token`` rows per (checkpoint, calibration set,
sample). A sample counts as collected once its ``stats_token`` rows are published (they are
written after its ``stats_layer`` rows, in a part of the same write id). So:

* ``collect_stats_shard`` runs the model only on the samples of its range that no token part
  holds yet, whatever shard size wrote the others, and writes them under a write id derived from
  those samples: a retried or concurrent twin writes nothing twice;
* ``read_stats`` takes every sample from exactly one part (the first, in file-name order, whose
  token rows hold it), with the layer rows of the same write. Rows that an older version or a race
  of two differently sharded sweeps wrote twice are never read twice; ``stats_coverage`` (SQL)
  counts them in ``n_duplicate_rows``.
"""

from __future__ import annotations

import hashlib
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fitprune.calibration import CalibrationStats
from fitprune.stats import collect_stats
from storage import store

from .models import LOCK, load_model, normalize_spec
from .progress import ShardProgress
from .samples import load_samples, sample_ids

__all__ = ["collect_stats_shard", "collected_samples", "read_stats"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _key(checkpoint: str, calib_id: str) -> dict:
    return {"checkpoint": checkpoint, "calib_id": calib_id}


def _parts_by_sample(checkpoint: str, calib_id: str, root) -> dict[str, str]:
    """sample -> the part (file name) it is read from: the first published token part, by name, holding it.

    Which samples a write holds is read from its ``stats_layer`` part (same name, written first,
    the same samples; L rows per sample instead of L x V)."""
    key = _key(checkpoint, calib_id)
    done = {p.name for p in store.list_parts("stats_token", root, key)}
    owner: dict[str, str] = {}
    for part in store.list_parts("stats_layer", root, key):
        if part.name not in done:  # a write killed between its two parts: not collected
            continue
        held = store.read_table("stats_layer", root, columns=["sample"], parts=[part]).column("sample")
        for sample in pc.unique(held).to_pylist():
            owner.setdefault(sample, part.name)
    return owner


def collected_samples(checkpoint: str, calib_id: str, root) -> set[str]:
    """The calibration samples whose statistics the store holds."""
    return set(_parts_by_sample(checkpoint, calib_id, root))


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges covering sorted ``indices``."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _reporting(batches, progress):
    """The batches, reporting the samples done to ``progress`` as each next one is taken."""
    done = 0
    for batch in batches:
        yield batch
        done += int(batch["input_ids"].shape[0])
        progress(done)


def collect_stats_shard(spec, calib: dict, checkpoint: str, start: int, end: int, batch_size: int, root) -> dict:
    """Statistics of samples ``start..end-1`` of the set that the store does not hold yet.

    Returns ``{"checkpoint", "calib_id", "start", "end", "reused", "collected", "seconds"}``:
    ``collected`` samples were run now, ``reused`` says none had to be.
    """
    out = {"checkpoint": checkpoint, "calib_id": calib["id"], "start": start, "end": end}
    ids = sample_ids(calib, root)
    if not 0 <= start <= end <= len(ids):
        raise ValueError(f"sample range {start}-{end} is outside the set's {len(ids)} samples")
    have = collected_samples(checkpoint, calib["id"], root)
    missing = [i for i in range(start, end) if ids[i] not in have]
    if not missing:
        return {**out, "reused": True, "collected": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    spec = normalize_spec(spec)
    model = load_model(spec, root)
    batches = [b for s, e in _runs(missing) for b in load_samples(calib, batch_size, spec["device"], s, e, spec=spec,
                                                                   root=root)]
    got = [str(s) for b in batches for s in b["sample_ids"]]
    want = [ids[i] for i in missing]
    if got != want:
        raise ValueError(f"calibration set {calib['id']}: samples {start}-{end} load as {got[:3]}…, but the store "
                         f"recorded {want[:3]}…; the source changed under the same id")
    progress = ShardProgress(f"statistics {calib['id']} samples {start}-{end}", len(want))
    with LOCK:  # statistics hooks are per model: one collection at a time per process
        stats = collect_stats(model, _reporting(batches, progress), checkpoint=checkpoint, calib_id=calib["id"])
    tokens, layers = stats.to_arrow()
    digest = hashlib.sha256("\0".join(want).encode()).hexdigest()[:16]
    write_id = f"{checkpoint}-{calib['id']}-{digest}"  # the samples written, not the shard's range
    key = _key(checkpoint, calib["id"])
    store.write_rows("stats_layer", layers, root=root, write_id=write_id, partition=key)
    store.write_rows("stats_token", tokens, root=root, write_id=write_id, partition=key)  # written last: marks done
    return {**out, "reused": False, "collected": len(missing), "seconds": time.perf_counter() - t0}


def _pick(table: str, by_part: dict[str, list[str]], checkpoint: str, calib_id: str, root) -> pa.Table:
    """``table``'s rows of each part's samples (``by_part``: part file name -> samples read from it)."""
    paths = {p.name: p for p in store.list_parts(table, root, _key(checkpoint, calib_id))}
    chunks = []
    for part, samples in by_part.items():
        if part not in paths:
            raise ValueError(f"{table}: no part {part} for {checkpoint}/{calib_id}, although stats_token has one; "
                             "the store is inconsistent (was a file deleted?)")
        rows = store.read_table(table, root, parts=[paths[part]])
        chunks.append(rows.filter(pc.is_in(rows.column("sample"), pa.array(samples, pa.string()))))
    return pa.concat_tables(chunks)


def read_stats(checkpoint: str, calib_id: str, root, samples: list[str] | None = None) -> CalibrationStats:
    """The set's statistics, each sample read once, in the order of ``samples`` (default: the set's
    recorded order); a ValueError names what is missing."""
    owner = _parts_by_sample(checkpoint, calib_id, root)
    if not owner:
        raise ValueError(f"no statistics in the store for {checkpoint}/{calib_id}; collect them first "
                         "(fitprune sweep collects what is missing)")
    if samples is None:
        sets = store.read_table("calibration_sets", root, filters={"calib_id": calib_id}, columns=["sample_ids"])
        samples = list(sets.column("sample_ids")[0].as_py()) if sets.num_rows else sorted(owner)
    absent = [s for s in samples if s not in owner]
    if absent:
        raise ValueError(f"statistics for {checkpoint}/{calib_id} lack {len(absent)} of {len(samples)} samples "
                         f"({absent[:3]}…); re-run the sweep to collect them")
    by_part: dict[str, list[str]] = {}
    for s in samples:
        by_part.setdefault(owner[s], []).append(s)
    tokens = _pick("stats_token", by_part, checkpoint, calib_id, root)
    layers = _pick("stats_layer", by_part, checkpoint, calib_id, root)
    position = {s: i for i, s in enumerate(samples)}
    layers = layers.take(np.argsort([position[s] for s in layers.column("sample").to_pylist()], kind="stable"))
    return CalibrationStats.from_arrow(tokens, layers, checkpoint=checkpoint, calib_id=calib_id)
