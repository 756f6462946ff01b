"""Run a test file's ``interpreted`` cases in Triton's interpreter, in a pytest subprocess (the
``interpreter`` fixture, in conftest.py, works around Triton 3.6 interpreter bugs inside them).

TRITON_INTERPRET=1 must be set before Triton is first imported (torch imports it at startup), so
the CPU checks of the Triton kernels run in a child pytest; the parent asserts that every case ran
and passed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install triton==3.6.0)")
interpreted = pytest.mark.skipif(
    not (HAS_TRITON and IN_INTERPRETER),
    reason="runs in its file's interpreter subprocess test (TRITON_INTERPRET=1 before Triton loads)",
)


def run_interpreted(test_file: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "interpreted"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, out
    assert "skipped" not in proc.stdout.splitlines()[-1], out  # every interpreted case really ran
    assert " passed" in proc.stdout.splitlines()[-1], out
