"""The sweep's artifacts in the Prefect UI, seen by a real headless browser (``scripts/ui_screenshot.py``):
the plot is an image the browser loads (not a local path), the Pareto table renders with every method."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import ui_screenshot  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("playwright") is None or ui_screenshot.find_browser() is None,
                    reason="needs playwright and a Chromium (Debian: apt-get install chromium)")
def test_the_plot_and_the_table_show_in_the_prefect_ui(tmp_path):
    facts = ui_screenshot.capture(tmp_path / "ui.png", ui_screenshot.find_browser(), tmp_path / "work")
    assert facts["image"]["width"] > 300 and facts["image"]["height"] > 200  # decoded by the browser
    assert facts["image"]["shown_width"] > 0
    assert facts["pareto_table"] and facts["methods_in_table"] == ["none", "fitprune", "fastv", "random"]
    assert all(Path(p).stat().st_size > 10_000 for p in facts["screenshots"])
    # one progress bar per shard (statistics + 4 evaluations of the toy sweep), each finished
    assert len(facts["shard_progress"]) == 5 and all(p == 100.0 for p in facts["shard_progress"])
