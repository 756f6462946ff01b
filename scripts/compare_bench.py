"""Old against new: paired ratios of two sets of ``bench_gpu.py`` results measured in the same call.

An engine change is measured by running ``scripts/bench_gpu.py`` twice in one device call, once on the
old code (``git archive OLD fitprune scripts`` unpacked beside the tree) and once on the new, and
comparing each configuration with itself. The speed-up ÷ ideal of a single run moves by about ±0.02
between runs because its denominator, the unpruned model, moves; the paired ratio new ÷ old of the
same pruned configuration is the measurement of the change.

    python scripts/compare_bench.py OLD.json NEW.json [OLD2.json NEW2.json ...] [--metric lm_prefill_ms]

Each pair is one old and one new run of the same command in one call; their configurations are
matched by geometry, batch and label. Prints, per pair, every configuration's old and new value, new ÷
old, and both speed-ups ÷ ideal (``flops_ratio / ratio_vs_unpruned``), then per pair, geometry and batch
the mean ± standard error of new ÷ old over the pruned configurations, and in how many of them new was
faster. ``--json`` writes the same as rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["Pair", "compare", "load_rows", "main", "summarise"]

Key = tuple[str, int, str]  # (geometry, batch, label)


class BenchFileError(ValueError):
    """A file that is not a bench_gpu result, or a pair whose configurations do not match."""


def load_rows(path: str | Path, metric: str) -> dict[Key, dict]:
    """The rows of ``metric`` in a ``bench_gpu.py --out`` file, by (geometry, batch, label); graphed
    configurations get ``+graphs`` appended to their label where bench_gpu did not already."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BenchFileError(f"{path}: cannot read a bench_gpu result ({err})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise BenchFileError(f"{path}: expected a JSON object with a 'rows' list, as scripts/bench_gpu.py --out "
                             "writes")
    out: dict[Key, dict] = {}
    for row in rows:
        if not isinstance(row, dict) or row.get("metric") != metric:
            continue
        label = str(row["label"])
        if row.get("cuda_graphs") and not label.endswith("+graphs"):
            label += "+graphs"
        key = (str(row["geometry"]), int(row["batch"]), label)
        if key in out:
            raise BenchFileError(f"{path}: two {metric} rows for {key}")
        out[key] = row
    if not out:
        raise BenchFileError(f"{path}: no '{metric}' rows (metrics are named as in bench_gpu.py's rows)")
    return out


class Pair:
    """One configuration measured on the old and the new code in the same call."""

    def __init__(self, key: Key, old: dict, new: dict, pair: int):
        self.key, self.old, self.new, self.pair = key, old, new, pair  # pair: which (old, new) files, from 1

    @property
    def pruned(self) -> bool:
        return self.old.get("method") != "unpruned"

    @property
    def ratio(self) -> float:
        """new ÷ old of the metric."""
        return float(self.new["value"]) / float(self.old["value"])

    @staticmethod
    def of_ideal(row: dict) -> float | None:
        flops, measured = row.get("flops_ratio"), row.get("ratio_vs_unpruned")
        return None if not flops or not measured else float(flops) / float(measured)


def compare(pairs_of_files: Sequence[tuple[dict[Key, dict], dict[Key, dict]]]) -> list[Pair]:
    """Every configuration present in both files of each (old, new) pair of row maps; a configuration in
    only one of them is an error (the two runs did not measure the same thing)."""
    pairs = []
    for index, (old, new) in enumerate(pairs_of_files, start=1):
        if old.keys() != new.keys():
            only = sorted(set(old) ^ set(new))
            raise BenchFileError(f"pair {index}: old and new differ in configurations, e.g. {only[:3]}; compare "
                                 "runs of the same bench_gpu command")
        pairs.extend(Pair(key, old[key], new[key], index) for key in sorted(old))
    return pairs


def mean_se(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, its standard error (sample standard deviation / √n; nan for n < 2) and n."""
    xs = list(values)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan, n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n), n


def summarise(pairs: Sequence[Pair]) -> list[dict]:
    """Per pair, geometry and batch: mean ± s.e. of new ÷ old over the pruned configurations, and how many
    of them were faster on the new code."""
    groups: dict[tuple[int, str, int], list[float]] = {}
    for p in pairs:
        if p.pruned:
            groups.setdefault((p.pair, p.key[0], p.key[1]), []).append(p.ratio)
    out = []
    for (index, geometry, batch), ratios in sorted(groups.items()):
        mean, se, n = mean_se(ratios)
        out.append({"pair": index, "geometry": geometry, "batch": batch, "new_over_old": mean, "se": se, "n": n,
                    "faster": sum(r < 1 for r in ratios)})
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="OLD NEW [OLD NEW ...]: bench_gpu.py --out files, one pair per old/new run")
    p.add_argument("--metric", default="lm_prefill_ms", help="the rows' metric to compare (default lm_prefill_ms)")
    p.add_argument("--json", help="write the configurations and the summary to this file")
    args = p.parse_args(argv)
    if len(args.files) % 2:
        p.error(f"give the files in (old, new) pairs; got {len(args.files)} files")
    try:
        maps = [load_rows(f, args.metric) for f in args.files]
        pairs = compare(list(zip(maps[0::2], maps[1::2])))
    except BenchFileError as err:
        print(f"compare_bench: {err}", file=sys.stderr)
        return 1
    print(f"{'pair':>4}  {'geometry':<14} {'batch':>5}  {'label':<22} {'old':>9} {'new':>9}  {'new/old':>7}  "
          f"{'of ideal old':>12} {'new':>6}")
    for q in pairs:
        geometry, batch, label = q.key
        print(f"{q.pair:>4}  {geometry:<14} {batch:>5}  {label:<22} {float(q.old['value']):>9.2f} "
              f"{float(q.new['value']):>9.2f}  {q.ratio:>7.4f}  {_fmt(Pair.of_ideal(q.old)):>12} "
              f"{_fmt(Pair.of_ideal(q.new)):>6}")
    summary = summarise(pairs)
    print()
    for s in summary:
        print(f"pair {s['pair']}: {s['geometry']} batch {s['batch']}: pruned new/old {s['new_over_old']:.4f} ± "
              f"{s['se']:.4f} (n = {s['n']}, new faster in {s['faster']})")
    if args.json:
        rows = [{"pair": q.pair, "geometry": q.key[0], "batch": q.key[1], "label": q.key[2], "metric": args.metric,
                 "old": float(q.old["value"]), "new": float(q.new["value"]), "new_over_old": q.ratio,
                 "of_ideal_old": Pair.of_ideal(q.old), "of_ideal_new": Pair.of_ideal(q.new)} for q in pairs]
        Path(args.json).write_text(json.dumps({"pairs": rows, "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
