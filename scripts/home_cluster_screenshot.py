#!/usr/bin/env python3
"""The README's picture of the Home page listing a cluster's nodes: docs/screenshots/home_cluster.png.

    .venv/bin/python -m engine.cluster.localcluster --env-file /tmp/cluster.env &   # head, nodeA, nodeB
    (source /tmp/cluster.env; .venv/bin/python scripts/home_cluster_screenshot.py [--out PATH])
    kill %1                                                                          # stops the cluster

Serves the app (``streamlit run``, 127.0.0.1, a fresh database with the demo models) in
the cluster's environment (``PLANNER_RAY_ADDRESS`` and the token), opens Home in headless
Chromium (/usr/bin/chromium, as tests/test_browser.py does), waits for the node list and
saves a full-page screenshot.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from engine import catalog  # noqa: E402
from engine.demo_models import ensure_demo_models  # noqa: E402
from engine.paths import DEFAULT_MODELS_DIR  # noqa: E402
from engine.store import Store  # noqa: E402
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, serve  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots" / "home_cluster.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jshot") as folder:
        db = Path(folder) / "planner.duckdb"
        catalog.register_demo_models(Store(db), ensure_demo_models(DEFAULT_MODELS_DIR))
        with serve(db) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            # Tall enough for the whole page: Streamlit scrolls inside its own container, not the page.
            page = browser.new_page(viewport={"width": 1400, "height": 2600})
            page.goto(url)
            heading = page.get_by_role("heading", name="Cluster", exact=True)
            expect(heading).to_be_visible(timeout=60_000)
            expect(page.get_by_role("cell", name="nodeB/cpu")).to_be_visible(timeout=90_000)
            page.wait_for_timeout(1500)  # the tables settle
            top = heading.bounding_box()["y"] - 12
            bottom = page.get_by_role("cell", name="nodeB/cpu").bounding_box()
            below = page.get_by_text("Energy sensors of the nodes").bounding_box()
            end = max(bottom["y"] + bottom["height"], below["y"] + below["height"] if below else 0) + 24
            page.screenshot(path=args.out, clip={"x": 300, "y": top, "width": 1100, "height": end - top})
            browser.close()
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
