"""The tables of the data root: one pyarrow schema each, with a docstring per column.

Every table is append-only Parquet under ``<root>/tables/<name>/`` (see ``storage.root``), and
the DuckDB catalog exposes each as a view of the same name.

To add a table, add a ``Table(...)`` to ``TABLES`` below: ``write_rows``, ``read_table`` and the
catalog's raw view pick it up; derived views go in ``storage/sql/<view>.sql``. To add a column
to an existing table, append it with ``nullable=True``: files written before it read as NULL.
Never change a column's type in place: add a new column instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa

__all__ = ["Column", "Table", "TABLES", "get_table", "schema_markdown", "TIMESTAMP"]

TIMESTAMP = pa.timestamp("us", tz="UTC")


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Column:
    """One column: its Arrow type, its meaning, and whether it may be NULL.

    ``json``: the value is a JSON document (a dict or list given for it is serialised with sorted
    keys; a string must parse). ``default``: called to fill the column when a write omits it.
    """

    name: str
    type: pa.DataType
    doc: str
    nullable: bool = False
    json: bool = False
    default: Callable[[], Any] | None = None

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.nullable, metadata={"doc": self.doc})


@dataclass(frozen=True)
class Table:
    """A table: name, purpose, columns in order, and the columns its files are partitioned by."""

    name: str
    doc: str
    columns: tuple[Column, ...]
    partition_by: tuple[str, ...] = ()
    _by_name: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {c.name: c for c in self.columns}
        if len(by_name) != len(self.columns):
            raise ValueError(f"table {self.name!r} declares a column twice")
        for key in self.partition_by:
            col = by_name.get(key)
            if col is None or col.nullable or col.type != pa.string():
                raise ValueError(f"table {self.name!r}: partition column {key!r} must be a non-null string column")
        object.__setattr__(self, "_by_name", by_name)

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([c.field for c in self.columns], metadata={"fitprune.table": self.name})

    @property
    def fingerprint(self) -> str:
        """Short hash of names, types and nullability (not docs): changes iff the files' schema does."""
        desc = [(c.name, str(c.type), c.nullable) for c in self.columns] + [list(self.partition_by)]
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    def column(self, name: str) -> Column:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def _created_at() -> Column:
    return Column("created_at", TIMESTAMP, "When the row was written (UTC); filled in when omitted.", default=_now)


def _versions() -> Column:
    return Column(
        "versions", pa.string(), "JSON object of package versions (fitprune, torch, transformers, ...).", json=True
    )


_S, _F64, _F32, _I16, _I32, _I64 = pa.string(), pa.float64(), pa.float32(), pa.int16(), pa.int32(), pa.int64()

TABLES: dict[str, Table] = {
    t.name: t
    for t in [
        Table(
            "calibration_sets",
            "Sample sets (calibration and evaluation): which samples, from where, and a hash of their content.",
            (
                Column("calib_id", _S, "Sample set id (referenced by the statistics tables as calib_id and by "
                       "evaluations and predictions as eval_set)."),
                Column("source", _S, "Where the samples come from (data set name or path)."),
                Column("split", _S, "Split of the source the samples were drawn from."),
                Column("n_samples", _I32, "Number of samples in the set."),
                Column("seed", _I64, "Seed of the sample draw."),
                Column("content_hash", _S, "Hash of the samples' content (images and text): detects a changed source."),
                Column("sample_ids", pa.list_(_S), "Sample ids in calibration order."),
                _created_at(),
            ),
        ),
        Table(
            "stats_token",
            "Per visual token attention scores of the unpruned model on a calibration set (DESIGN.md §2).",
            (
                Column("checkpoint", _S, "Checkpoint fingerprint (config + weight file hashes)."),
                Column("calib_id", _S, "Calibration set id."),
                Column("sample", _S, "Sample id within the calibration set."),
                Column("layer", _I16, "Decoder layer index, from 0."),
                Column("token", _I32, "Visual token index in the original (unpruned) order, from 0."),
                Column("cross", _F32, "Cross score c_v: mean over text query rows of head-max attention to the token."),
                Column("self", _F32, "Self score s_v: mean over alive visual query rows of head-max attention to it."),
            ),
            partition_by=("checkpoint", "calib_id"),
        ),
        Table(
            "stats_layer",
            "Per layer attention masses and token counts of one calibration sample.",
            (
                Column("checkpoint", _S, "Checkpoint fingerprint (config + weight file hashes)."),
                Column("calib_id", _S, "Calibration set id."),
                Column("sample", _S, "Sample id within the calibration set."),
                Column("layer", _I16, "Decoder layer index, from 0."),
                Column("cross_mass", _F64, "Reference cross mass C_l: sum of cross scores over alive visual tokens."),
                Column("self_mass", _F64, "Reference self mass S_l: sum of self scores over alive visual tokens."),
                Column("n_system", _I32, "System-prompt tokens before the image."),
                Column("n_visual", _I32, "Visual tokens of the sample before any pruning."),
                Column("n_text", _I32, "Text tokens after the last visual token."),
                Column("n_alive", _I32, "Visual tokens alive entering this layer."),
            ),
            partition_by=("checkpoint", "calib_id"),
        ),
        Table(
            "recipes",
            "Fitted pruning recipes, one row per recipe and run, written when the recipe is fitted (before any "
            "evaluation); the full recipe in recipe_json.",
            (
                Column("recipe_id", _S, "Recipe id (stable hash of the recipe's content)."),
                Column("checkpoint", _S, "Checkpoint fingerprint the recipe was fitted on."),
                Column("family", _S, "Model family (adapter name), e.g. llava."),
                Column("method", _S, "Pruning method, e.g. fitprune, fastv, random."),
                Column("scoring", _S, "Scoring rule used at inference."),
                Column("budget", _F64, "Target FLOPs reduction in [0, 1)."),
                Column("flops_convention", _S, "FLOPs accounting the budget refers to."),
                Column("alpha", _F64, "Fitted attention tolerance; NULL for methods without one.", nullable=True),
                Column("predicted_reduction", _F64, "FLOPs reduction the fit predicts for the recipe."),
                Column("drop_fractions", pa.list_(_F64), "Per decoder layer: fraction of initial visual tokens dropped."),
                Column("recipe_json", _S, "The full recipe as JSON.", json=True),
                Column("run_id", _S, "Run that produced the recipe (see runs)."),
                _created_at(),
                Column("divergence", _F64, "KL(unpruned ‖ pruned) of the next-token distribution at the last prompt "
                       "position, mean over the held-out part of the calibration set (nats); NULL when not "
                       "measured or not finite.", nullable=True),
                Column("divergence_search", _F64, "The same KL on the search part of the calibration set.",
                       nullable=True),
                Column("divergence_calib_id", _S, "Calibration set the divergences were measured on.", nullable=True),
                Column("divergence_samples", _I32, "Held-out samples behind divergence.", nullable=True),
                Column("measured_reduction", _F64, "FLOPs reduction measured from executed token counts on the "
                       "calibration set.", nullable=True),
                Column("feasible", pa.bool_(), "Whether the fit met the budget (measured reduction on the "
                       "calibration set at least the budget); NULL in rows written before it was recorded.",
                       nullable=True),
            ),
        ),
        Table(
            "evaluations",
            "Benchmark results, one row per (run, recipe, benchmark, metric, shard of samples).",
            (
                Column("run_id", _S, "Run that produced the row (see runs)."),
                Column("recipe_id", _S, "Evaluated recipe; 'none' for the unpruned baseline."),
                Column("checkpoint", _S, "Checkpoint fingerprint."),
                Column("method", _S, "Pruning method of the recipe; 'none' for the unpruned baseline."),
                Column("benchmark", _S, "Benchmark name."),
                Column("n_samples", _I32, "Samples evaluated in this shard."),
                Column("n_failed", _I32, "Samples of the shard that failed (not counted in the metric)."),
                Column("metric_name", _S, "Name of the metric, e.g. accuracy."),
                Column("metric", _F64, "Metric value over the shard's samples (higher is better)."),
                Column("flops_reduction", _F64, "FLOPs reduction vs unpruned, measured from executed token counts."),
                Column("prefill_flops", _F64, "Mean prefill FLOPs per sample, from executed token counts."),
                Column("wall_s", _F64, "Wall-clock seconds of the shard."),
                Column("shard", _S, "Sample range of the shard, e.g. '0-500'."),
                _created_at(),
                _versions(),
                Column("eval_set", _S, "Sample set evaluated (calibration_sets.calib_id: source, split, n, seed); "
                       "NULL in rows written before it was recorded.", nullable=True),
                Column("eval_content_hash", _S, "Content hash of that sample set when the shard ran.", nullable=True),
                Column("prefill_flops_full", _F64, "Mean prefill FLOPs per sample of the same prompts unpruned.",
                       nullable=True),
                Column("prefill_flops_paper", _F64, "Mean prefill FLOPs per sample under the authors' convention "
                       "(visual tokens only), from executed token counts.", nullable=True),
                Column("prefill_flops_paper_full", _F64, "The same prompts unpruned, authors' convention.",
                       nullable=True),
            ),
        ),
        Table(
            "predictions",
            "Per-sample answers behind question-benchmark evaluations, one row per (run, recipe, sample).",
            (
                Column("run_id", _S, "Run that produced the row (see runs)."),
                Column("recipe_id", _S, "Evaluated recipe; 'none' for the unpruned baseline."),
                Column("checkpoint", _S, "Checkpoint fingerprint."),
                Column("method", _S, "Pruning method of the recipe; 'none' for the unpruned baseline."),
                Column("benchmark", _S, "Benchmark name (the evaluation source)."),
                Column("shard", _S, "Sample range of the shard that evaluated the sample."),
                Column("sample_id", _S, "Sample id within the benchmark."),
                Column("question", _S, "Question as asked."),
                Column("prediction", _S, "Generated answer; NULL when the sample failed.", nullable=True),
                Column("answers", pa.list_(_S), "Reference answers."),
                Column("choices", pa.list_(_S), "Options of a multiple-choice sample; NULL otherwise.", nullable=True),
                Column("error", _S, "Why the sample failed (missing/corrupt image, empty question, ...); NULL if it ran.",
                       nullable=True),
                Column("score", _F64, "The sample's score under the benchmark's metric; NULL when it failed.", nullable=True),
                Column("visual_tokens", _I32, "Visual tokens in the encoded prompt.", nullable=True),
                Column("visual_kept", _I32, "Visual tokens left after the last decoder layer of the prefill.",
                       nullable=True),
                Column("prefill_flops", _F64, "Prefill FLOPs from the executed token counts.", nullable=True),
                Column("prefill_flops_full", _F64, "Prefill FLOPs of the same prompt unpruned.", nullable=True),
                _created_at(),
                Column("eval_set", _S, "Sample set evaluated (calibration_sets.calib_id).", nullable=True),
                Column("prefill_flops_paper", _F64, "Prefill FLOPs under the authors' convention (visual tokens "
                       "only), from the executed token counts.", nullable=True),
                Column("prefill_flops_paper_full", _F64, "The same prompt unpruned, authors' convention.",
                       nullable=True),
            ),
        ),
        Table(
            "runs",
            "Pipeline runs (flow runs): what ran, with which parameters, and how it ended.",
            (
                Column("run_id", _S, "Run id (the flow run id)."),
                Column("flow", _S, "Flow name."),
                Column("parameters", _S, "JSON object of the run's parameters.", json=True),
                Column("status", _S, "Status when the row was written: running (start row), then completed, "
                       "failed or interrupted (end row). A run killed outright keeps only its start row."),
                Column("started_at", TIMESTAMP, "When the run started (UTC)."),
                Column("ended_at", TIMESTAMP, "When the run ended (UTC); NULL in the start row.", nullable=True),
                _versions(),
                Column("error", _S, "Why a failed or interrupted run ended (exception type and message).",
                       nullable=True),
            ),
        ),
        Table(
            "benchmarks",
            "GPU speed measurements of pruned vs unpruned generation.",
            (
                Column("run_id", _S, "Run that measured (see runs)."),
                Column("gpu", _S, "GPU model name."),
                Column("config", _S, "JSON object of the measured configuration (recipe, batch, lengths).", json=True),
                Column("metric", _S, "What was measured, e.g. prefill_ms, tokens_per_s, peak_mem_gib."),
                Column("value", _F64, "Measured value."),
                Column("ratio_vs_unpruned", _F64, "value divided by the unpruned model's value in the same setting."),
                Column("flops_ratio", _F64, "Executed FLOPs divided by the unpruned model's FLOPs."),
                _created_at(),
                _versions(),
            ),
        ),
    ]
}


def get_table(name: str) -> Table:
    """The ``Table`` called ``name``; an unknown name lists the known ones."""
    try:
        return TABLES[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown table {name!r}; known tables: {', '.join(sorted(TABLES))}") from None


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}, {t.tz}]" if t.tz else f"timestamp[{t.unit}]"
    return str(t)


def schema_markdown(names: list[str] | None = None) -> str:
    """The tables as Markdown (a heading, the table's purpose, a column list), e.g. for the README."""
    out = []
    for name in names or list(TABLES):
        t = get_table(name)
        out.append(f"### `{t.name}`\n\n{t.doc}")
        if t.partition_by:
            out.append(f"Partitioned by {', '.join(f'`{k}`' for k in t.partition_by)}.")
        rows = ["| column | type | meaning |", "| --- | --- | --- |"]
        for c in t.columns:
            typ = _type_name(c.type) + (" (nullable)" if c.nullable else "")
            rows.append(f"| `{c.name}` | {typ} | {c.doc} |")
        out.append("\n".join(rows))
    return "\n\n".join(out) + "\n"
