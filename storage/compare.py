"""Do two data roots hold the same sweep? Every stored row of the sweep's tables, compared less what
differs between two runs of one sweep (ids, clocks, the search's own timing).

A serial sweep and the same sweep on a cluster must store the same rows (README, "One sweep on many
GPUs"); ``tests/test_fanout.py`` checks that on CPU workers, and this module's command checks it
wherever the two runs were made::

    python -m storage.compare ROOT_A ROOT_B     # exit 0: every table equal; 1: a table differs
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from .store import read_table

__all__ = ["SWEEP_TABLES", "VOLATILE", "differences", "snapshot"]

SWEEP_TABLES = ("calibration_sets", "stats_layer", "stats_token", "recipes", "evaluations", "predictions")
VOLATILE = frozenset({"run_id", "created_at", "wall_s"})  # differ between two runs of one sweep


def _row_text(row: dict) -> str:
    row = {k: v for k, v in row.items() if k not in VOLATILE}
    if "recipe_json" in row:
        recipe = json.loads(row["recipe_json"])
        recipe.get("metadata", {}).pop("seconds", None)  # the fit's own timing
        row["recipe_json"] = recipe
    return json.dumps(row, sort_keys=True, default=str)


def snapshot(root, tables=SWEEP_TABLES) -> dict[str, list[str]]:
    """Per table, its rows as sorted JSON texts without the volatile fields."""
    return {table: sorted(_row_text(row) for row in read_table(table, root).to_pylist()) for table in tables}


def differences(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict[str, tuple[int, int, int]]:
    """Per table of two snapshots: (rows in a, rows in b, rows without a twin in the other, counted
    with multiplicity: a row stored twice in a and once in b counts 1); equal tables give 0 last."""
    out = {}
    for table in sorted(set(a) | set(b)):
        rows_a, rows_b = Counter(a.get(table, [])), Counter(b.get(table, []))
        only = sum((rows_a - rows_b).values()) + sum((rows_b - rows_a).values())
        out[table] = (rows_a.total(), rows_b.total(), only)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root_a")
    p.add_argument("root_b")
    args = p.parse_args(argv)
    diff = differences(snapshot(args.root_a), snapshot(args.root_b))
    print(f"{'table':18s} {'rows a':>8s} {'rows b':>8s} {'differ':>7s}")
    for table, (n_a, n_b, only) in diff.items():
        print(f"{table:18s} {n_a:8d} {n_b:8d} {only:7d}")
    same = all(only == 0 for _, _, only in diff.values())
    print("identical" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
