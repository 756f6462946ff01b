"""Screenshot a sweep's artifacts in the Prefect UI, with headless Chromium.

    python scripts/ui_screenshot.py --out reports/ui-artifacts.png

Starts a throwaway Prefect server with its UI (temporary PREFECT_HOME, free loopback port), runs the
``fitprune/sweep`` flow on the toy model against it, opens the flow run's Artifacts tab in headless
Chromium (Playwright driving the system browser: ``/usr/bin/chromium`` or ``--browser PATH``), waits
until the plot image has loaded and the Pareto table is rendered, and saves a full-page screenshot.
It prints what the browser saw as JSON (image size, table text found) and exits 1 if the image
did not load. ``tests/test_ui_artifacts.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_FLOW = """
import json, sys
from flows.config import SweepConfig
from flows.sweep_flow import sweep
from prefect.context import get_run_context
result = sweep(config=SweepConfig(model={"kind": "toy", "seed": 0}, source="toy", calib_samples=4, eval_samples=4,
                                  batch_size=4, budgets=[0.5], methods=["fitprune", "fastv", "random"],
                                  data_root=sys.argv[1]), return_state=True)
print(json.dumps({"flow_run_id": str(result.state_details.flow_run_id)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_browser(path: str | None = None) -> str | None:
    """The Chromium executable to drive: ``path``, else ``chromium`` / ``chromium-browser`` on PATH."""
    return path or shutil.which("chromium") or shutil.which("chromium-browser")


def _wait_healthy(port: int, server: subprocess.Popen, log: Path) -> None:
    while True:  # the server either becomes healthy or exits; its log says why
        if server.poll() is not None:
            raise RuntimeError("prefect server exited:\n" + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)


def _artifacts(base: str, run_id: str) -> dict:
    """The run's artifacts by type (``image``, ``markdown``), read from the server's REST API."""
    request = urllib.request.Request(f"{base}/api/artifacts/filter", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"artifacts": {"flow_run_id": {"any_": [run_id]}}}).encode())
    with urllib.request.urlopen(request, timeout=30) as resp:
        rows = json.load(resp)
    found = {row["type"]: {"id": row["id"], "key": row["key"]} for row in rows if row["type"] in ("image", "markdown")}
    if set(found) != {"image", "markdown"}:
        raise RuntimeError(f"flow run {run_id} has artifacts {sorted(r['type'] for r in rows)}; expected an image "
                           "and a markdown one")
    found["progress"] = [row["data"] for row in rows if row["type"] == "progress"]  # one per shard, in percent
    return found


def capture(out: Path, browser: str, work: Path) -> dict:
    """Run the toy sweep against a fresh server with its UI and screenshot its Artifacts tab (module docstring)."""
    from playwright.sync_api import sync_playwright

    port, home = _free_port(), work / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "true",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = work / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        _wait_healthy(port, server, log)
        done = subprocess.run([sys.executable, "-c", _FLOW, str(work / "data")], cwd=REPO, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError("the toy sweep failed:\n" + done.stderr[-3000:])
        run_id = json.loads(done.stdout.strip().splitlines()[-1])["flow_run_id"]
        base = f"http://127.0.0.1:{port}"
        artifacts = _artifacts(base, run_id)
        with sync_playwright() as pw:
            chrome = pw.chromium.launch(executable_path=browser, headless=True, args=["--no-sandbox"])
            page = chrome.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/runs/flow-run/{run_id}")
            page.get_by_text("Artifacts", exact=True).first.click()  # the run's Artifacts tab: both cards
            page.get_by_text(artifacts["markdown"]["key"]).first.wait_for(timeout=60_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            tab_png = out.with_name(out.stem + "-run-tab.png")
            page.screenshot(path=str(tab_png), full_page=True)
            page.goto(f"{base}/artifacts/artifact/{artifacts['image']['id']}")
            try:
                page.wait_for_function("""() => [...document.images].some(
                    i => i.src.startsWith('data:image/png') && i.complete && i.naturalWidth > 0)""", timeout=60_000)
            except Exception:
                page.screenshot(path=str(out.with_suffix(".failed.png")), full_page=True)
                raise RuntimeError("the plot artifact's image did not load within 60 s; page text:\n"
                                   + page.inner_text("body")[:3000] + f"\nscreenshot: {out.with_suffix('.failed.png')}")
            image = page.evaluate("""() => { const i = [...document.images].find(i => i.src.startsWith('data:image/png'));
                return {width: i.naturalWidth, height: i.naturalHeight, shown_width: i.clientWidth}; }""")
            page.screenshot(path=str(out), full_page=True)
            page.goto(f"{base}/artifacts/artifact/{artifacts['markdown']['id']}")
            page.get_by_text("Pareto front").first.wait_for(timeout=60_000)
            text = page.inner_text("body")
            table_png = out.with_name(out.stem + "-table.png")
            page.screenshot(path=str(table_png), full_page=True)
            chrome.close()
        return {"flow_run_id": run_id, "artifacts": [artifacts["markdown"]["key"], artifacts["image"]["key"]],
                "shard_progress": artifacts["progress"], "image": image,
                "pareto_table": "Pareto front" in text,
                "methods_in_table": [m for m in ("none", "fitprune", "fastv", "random") if m in text],
                "screenshots": [str(out), str(tab_png), str(table_png)]}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="ui-artifacts.png", help="screenshot path (PNG)")
    parser.add_argument("--browser", default=None, help="Chromium executable (default: chromium on PATH)")
    args = parser.parse_args(argv)
    browser = find_browser(args.browser)
    if browser is None:
        print("no Chromium found: install it (Debian: apt-get install chromium) or pass --browser PATH", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="fitprune-ui-") as work:
        facts = capture(Path(args.out).resolve(), browser, Path(work))
    print(json.dumps(facts, indent=1))
    return 0 if facts["image"]["width"] > 0 and facts["pareto_table"] else 1


if __name__ == "__main__":
    sys.exit(main())
