"""Sample sets of the sweep: described, recorded with a content hash, and loaded as model inputs.

A set ``{"source": "easy-vqa:train", "n": 16, "seed": 0, "split": "calib", "id": ...,
"content_hash": ...}`` is made and recorded in the store's ``calibration_sets`` (calibration and
evaluation sets alike) by ``calibration_set``. Question sources (easy-vqa, synthetic, benchmark
folders; ``tasks.sources``) become model inputs through the model's encoder; input sources (toy,
hf:) are inputs already. Either way ``load_samples`` returns batches ``{input_ids,
attention_mask, pixel_values, ..., "sample_ids": [...]}``, samples ``start..end-1`` of the set in
its recorded order.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from storage import store

from . import sources
from .models import encoder_for, load_model

__all__ = ["calibration_set", "content_hash", "load_samples", "record_calibration_set", "sample_ids", "shard_ranges"]


def calibration_set(n: int, seed: int, split: str = "calib", source: str = "easy-vqa:train", root=None,
                    record: bool = True) -> dict:
    """Describe a sample set and (``record``) record it in the store's ``calibration_sets``.

    Returns ``{"source", "split", "n", "seed", "id", "content_hash"}``. The row is written once
    per (id, content): a re-run finds it; a source whose content changed under the same id is an
    error, since statistics keyed by that id would be stale.
    """
    desc = sources.describe(n, seed, split, source)
    if record:
        desc["content_hash"] = record_calibration_set(desc, root)
    return desc


def content_hash(desc: dict, batch_size: int = 16) -> tuple[str, list[str]]:
    """SHA-256 over the set's samples in order (ids and input bytes, or ids, questions, answers and
    image bytes for question sources); and the ids."""
    if sources.is_question_source(desc["source"]):
        return sources.question_hash(desc)
    h = hashlib.sha256()
    ids: list[str] = []
    for start in range(0, desc["n"], max(batch_size, 1) * 4):
        for batch in _input_range(desc, start, min(desc["n"], start + max(batch_size, 1) * 4), batch_size):
            mask = batch.get("attention_mask")
            pixel_keys = sorted(k for k in batch if k.startswith("pixel") and torch.is_tensor(batch[k]))
            for i, sid in enumerate(batch["sample_ids"]):
                ids.append(str(sid))
                h.update(str(sid).encode() + b"\0")
                tokens = batch["input_ids"][i]
                if mask is not None:
                    tokens = tokens[mask[i].bool()]
                h.update(tokens.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
                for k in pixel_keys:
                    h.update(k.encode() + batch[k][i].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest(), ids


def record_calibration_set(desc: dict, root) -> str:
    """Write the set's ``calibration_sets`` row (idempotent) and return its content hash."""
    digest, ids = content_hash(desc)
    known = store.read_table("calibration_sets", root, filters={"calib_id": desc["id"]})
    hashes = set(known.column("content_hash").to_pylist())
    if hashes and digest not in hashes:
        raise ValueError(
            f"sample set {desc['id']} ({desc['source']}, split {desc['split']}) has changed: content hash "
            f"{digest[:16]}… but the store recorded {sorted(h[:16] for h in hashes)}; statistics under this id "
            "would be stale. Use another seed or sample count, or delete the old set's rows and statistics"
        )
    if not hashes:
        store.write_rows("calibration_sets", [dict(calib_id=desc["id"], source=desc["source"], split=desc["split"],
                                                    n_samples=desc["n"], seed=desc["seed"], content_hash=digest,
                                                    sample_ids=ids)],
                         root=root, write_id=f"{desc['id']}-{digest[:16]}")
    return digest


def _input_range(desc: dict, start: int, end: int, batch_size: int) -> list[dict]:
    src = sources.parse(desc["source"])
    if not 0 <= start <= end <= desc["n"]:
        raise ValueError(f"sample range {start}-{end} is outside the set's {desc['n']} samples")
    if src.kind == "toy":
        from fitprune.demo import toy

        return toy.toy_batches(end, batch_size, desc["seed"], desc["split"], start=start)
    return _hf_range(src.arg, desc, start, end, batch_size)


def _question_range(spec, desc: dict, start: int, end: int, batch_size: int, root=None) -> list[dict]:
    """Encode question samples with the model's encoder; a sample that cannot be encoded is an error
    here (calibration needs every sample), unlike in evaluation where it is a recorded failure."""
    from fitprune.evaluation.harness import collate, encode_sample

    encoder, model = encoder_for(spec, root), load_model(spec, root)
    samples = sources.question_samples(desc, start, end)
    batches = []
    for first in range(0, len(samples), batch_size):
        chunk = samples[first:first + batch_size]
        encoded = [encode_sample(s, encoder, model) for s in chunk]
        batch = collate(encoded, encoder.pad_token_id)
        batch["sample_ids"] = [str(s.id) for s in chunk]
        batches.append(batch)
    return batches


def _hf_dataset(path: str, split: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"sample source 'hf:{path}' needs the Hugging Face `datasets` package, which is not "
                         "installed here (pip install datasets); or use another source") from None
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        data = datasets.load_from_disk(str(p))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{path} has splits {sorted(data)}, not {split!r}")
            data = data[split]
    elif p.is_file():
        formats = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
        if p.suffix not in formats:
            raise ValueError(f"{path}: unknown data file type {p.suffix!r}; use one of {', '.join(formats)}")
        data = datasets.load_dataset(formats[p.suffix], data_files=str(p), split="train")
    else:
        raise ValueError(f"sample source 'hf:{path}': no such directory or file")
    missing = [c for c in ("input_ids", "pixel_values") if c not in data.column_names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}: the 'hf:' source takes processed model inputs "
                         f"(input_ids, pixel_values; optional attention_mask, image_sizes, id); it has {data.column_names}")
    return data


def _hf_range(path: str, desc: dict, start: int, end: int, batch_size: int) -> list[dict]:
    data = _hf_dataset(path, desc["split"])
    if desc["n"] > len(data):
        raise ValueError(f"{path} holds {len(data)} samples; {desc['n']} asked for")
    order = np.random.default_rng(desc["seed"]).permutation(len(data))[: desc["n"]]  # the set, in calibration order
    rows = data.select(order[start:end].tolist()).with_format("torch")
    batches = []
    for first in range(0, end - start, batch_size):
        items = [rows[i] for i in range(first, min(end - start, first + batch_size))]
        width = max(int(it["input_ids"].shape[-1]) for it in items)
        ids, mask = torch.zeros(len(items), width, dtype=torch.long), torch.zeros(len(items), width, dtype=torch.long)
        for i, it in enumerate(items):  # left padding (the last position is every sample's last token)
            n_tok = int(it["input_ids"].shape[-1])
            ids[i, width - n_tok:] = it["input_ids"].reshape(-1)
            mask[i, width - n_tok:] = it["attention_mask"].reshape(-1) if "attention_mask" in it else 1
        batch = {"input_ids": ids, "attention_mask": mask,
                 "pixel_values": torch.stack([it["pixel_values"] for it in items]),
                 "sample_ids": [str(it["id"]) if "id" in it else f"{desc['split']}-{int(order[start + first + i])}"
                                for i, it in enumerate(items)]}
        if "image_sizes" in items[0]:
            batch["image_sizes"] = torch.stack([it["image_sizes"] for it in items])
        batches.append(batch)
    return batches


def load_samples(sample_set: dict, batch_size: int, device: str = "cpu", start: int = 0,
                 end: int | None = None, spec=None, root=None) -> list[dict]:
    """Samples ``start..end-1`` of the set (default: all) as model-input batches on ``device``.

    Question sources are encoded by ``spec``'s model (required for them; ``root``: where the demo
    model is cached, see ``tasks.models``)."""
    end = sample_set["n"] if end is None else end
    if sources.is_question_source(sample_set["source"]):
        if spec is None:
            raise ValueError(f"source {sample_set['source']!r} holds questions: pass the model spec to encode them")
        batches = _question_range(spec, sample_set, start, end, batch_size, root)
    else:
        batches = _input_range(sample_set, start, end, batch_size)
    if device != "cpu":
        batches = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
    return batches


def shard_ranges(n: int, shard_size: int) -> list[list[int]]:
    """``[[start, end], ...]`` covering ``0..n`` in shards of ``shard_size`` samples."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    return [[s, min(n, s + shard_size)] for s in range(0, n, shard_size)]


def sample_ids(desc: dict, root) -> list[str]:
    """The set's sample ids in order, as recorded in ``calibration_sets`` (``calibration_set`` records them)."""
    rows = store.read_table("calibration_sets", root, filters={"calib_id": desc["id"]},
                            columns=["content_hash", "sample_ids"]).to_pylist()
    rows = [r for r in rows if desc.get("content_hash") in (None, r["content_hash"])]
    if not rows:
        raise ValueError(f"sample set {desc['id']} is not recorded under the data root; record it first with "
                         "tasks.samples.calibration_set(..., root=ROOT)")
    return list(rows[0]["sample_ids"])
