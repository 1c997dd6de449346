"""The app in a real browser: `streamlit run` on a free port, driven by headless Chromium.

Chromium comes from Debian (`apt-get install -y chromium`; .ci/run does it). Without it
these tests skip with a reason, except under CI (CI=true), where a missing browser fails.
With SCREENSHOTS=1 (`make screenshots`) the pictures are saved under docs/screenshots/.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine import catalog, execution
from engine.planning import list_plans
from engine.store import Store

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not CHROMIUM.exists():
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but /usr/bin/chromium is missing: .ci/run must install Debian's chromium", pytrace=False)
    pytest.skip("no /usr/bin/chromium here (apt-get install -y chromium to run the browser tests)",
                allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

#: Headless Chromium (software WebGL for the 3-D surfaces) crashed once in a full suite run here
#: (2026-11-30 00:24 UTC, "Target page, context or browser has been closed" mid-click; the same tests passed
#: when run again). A test that meets a browser crash, and only that error, runs once more in a fresh browser,
#: with every assertion as it was; any other failure fails at once.
pytestmark = pytest.mark.flaky(reruns=1, only_rerun=["TargetClosedError"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with {server.returncode}: {server.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
                if response.read().decode().strip() == "ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer /_stcore/health within {timeout_s} s")


served_db: dict = {}


@contextlib.contextmanager
def serve(db: Path):
    """`streamlit run app.py` on a free port with PLANNER_DB=db; yields the URL."""
    port = free_port()
    env = {**os.environ, "PLANNER_DB": str(db)}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def served_app(tmp_path_factory, demo_models):
    """`streamlit run app.py` on a fresh database holding the demo models."""
    db = tmp_path_factory.mktemp("browser") / "planner.duckdb"
    catalog.register_demo_models(Store(db), list(demo_models.values()))
    served_db["path"] = db
    with serve(db) as url:
        yield url


@pytest.fixture(scope="module")
def playwright_driver():
    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture
def browser(playwright_driver):
    """A Chromium of its own for each test: a browser that crashes takes one test with it, not the rest."""
    chromium = playwright_driver.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    yield chromium
    with contextlib.suppress(Exception):  # closing a browser that crashed has nothing to close
        chromium.close()


def profile_now(model: str, inputs: list[int], outputs: list[int], max_trials: int, batch_size: int = 1) -> Store:
    """Profile a model on the served database, in a worker process, and wait for it to finish."""
    from engine.profiling import jobs

    store = Store(served_db["path"])
    settings = jobs.ProfileSettings(max_trials=max_trials, idle_s=0.5, warmup_runs=1, batch_size=batch_size)
    job = jobs.create_job(store, model, "cpu", "custom", inputs=inputs, outputs=outputs, settings=settings)
    assert jobs.start_worker(store, job.id, watch=False).wait(timeout=300) == 0
    return store


def screenshot_path(name: str, tmp_path: Path) -> Path:
    if os.environ.get("SCREENSHOTS") == "1":
        folder = ROOT / "docs" / "screenshots"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name
    return tmp_path / name


def test_a_deep_link_to_a_fresh_server_gets_the_app_navigation(served_app: str, browser):
    """The first request names a page: the sidebar still lists the app's pages, not the pages/ folder."""
    page = browser.new_page()
    page.goto(served_app + "/models")
    expect(page.get_by_role("heading", name="Models")).to_be_visible(timeout=60_000)
    navigation = page.get_by_role("navigation")
    expect(navigation.get_by_role("link", name="Home")).to_be_visible()
    expect(navigation.get_by_role("link", name="common")).to_have_count(0)
    page.close()


def test_home_shows_demo_models_and_sensors(served_app: str, browser, demo_models, tmp_path: Path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(served_app)
    expect(page.get_by_text("Energy sensors on this host")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Models in the catalog")).to_be_visible()
    for demo in demo_models.values():
        expect(page.get_by_role("cell", name=demo.name, exact=True)).to_be_visible(timeout=30_000)
    expect(page.get_by_role("cell", name="rapl", exact=True)).to_be_visible()
    expect(page.get_by_role("cell", name="estimated", exact=True)).to_be_visible()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(screenshot_path("home.png", tmp_path)), full_page=True)
    page.close()


def test_models_page_in_the_browser(served_app: str, browser, demo_models, tmp_path: Path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(served_app + "/models")
    expect(page.get_by_role("heading", name="Models")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Demo models have random weights")).to_be_visible()
    expect(page.get_by_label("Name")).to_be_visible(timeout=30_000)
    expect(page.get_by_role("button", name="Add model")).to_be_visible()
    expect(page.locator('[data-testid="stDataFrame"]').first).to_be_visible()
    page.wait_for_timeout(2000)  # let the data grid paint its canvas before the picture
    page.screenshot(path=str(screenshot_path("models.png", tmp_path)), full_page=True)
    page.close()


def choose(page, selector, label: str, attempts: int = 4) -> None:
    """Pick label in a selectbox, again if a redraw of the page swallowed the choice."""
    for attempt in range(attempts):
        selector.click()
        page.get_by_role("option", name=label, exact=True).click()
        try:
            expect(selector).to_have_value(label, timeout=5_000)
            return
        except AssertionError:
            if attempt == attempts - 1:
                raise


def test_profile_page_in_the_browser(served_app: str, browser, tmp_path: Path):
    profile_now("demo-large", [8, 32, 64], [4, 8, 16], max_trials=4)
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(served_app + "/profile")
    expect(page.get_by_role("heading", name="Profile")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Done:")).to_be_visible(timeout=30_000)
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)

    # A job started here shows at once in the jobs panel, with its Cancel button; cancelled, it says so
    # in the panel, the selector and the list alike.
    page.get_by_text("Custom lists").click()
    page.get_by_role("textbox", name="Input tokens", exact=True).fill("8")
    page.get_by_role("textbox", name="Output tokens", exact=True).fill("4,8")
    batch_sizes = page.get_by_role("textbox", name="Batch sizes", exact=True)
    expect(batch_sizes).to_have_value("1,2,4,8,16,32")  # the batch axis by default
    batch_sizes.fill("1")  # one request at a time: this job is only started to be cancelled
    page.get_by_role("button", name="Start profiling").click()
    expect(page.get_by_role("button", name="Cancel job")).to_be_visible(timeout=15_000)
    store = Store(served_db["path"])
    job_id, model = store.query_one("SELECT id, model FROM profiling_jobs ORDER BY id DESC LIMIT 1")
    expect(page.get_by_text(f"Job #{job_id}: {model} on cpu")).to_be_visible()
    page.get_by_role("button", name="Cancel job").click()
    expect(page.get_by_text(f"Job #{job_id}: {model} on cpu — cancelled")).to_be_visible(timeout=60_000)
    expect(page.get_by_role("button", name="Resume job")).to_be_visible()
    # The selector names the job (no status that could go stale there); the list says cancelled.
    # (The redraw after Cancel shows the old panel faded beside the new one for a moment: wait for one.)
    selector = page.get_by_role("combobox", name="Job", exact=True)
    expect(selector).to_have_count(1, timeout=30_000)
    expect(selector).to_have_value(f"#{job_id} {model} on cpu")
    page.get_by_text("All jobs").click()
    expect(page.get_by_test_id("stExpander").filter(has_text="All jobs")).to_be_visible()

    # Back to the finished job for the picture. (The page redraws once more when polling stops after the
    # cancel; a choice made during that redraw is dropped, so choose again until the selector holds it.)
    choose(page, selector, f"#{job_id - 1} demo-large on cpu")
    expect(page.get_by_text("Done:")).to_be_visible(timeout=30_000)
    batch_sizes.fill("1,2,4,8,16,32")  # the default again, for the picture (a form field: nothing is submitted)
    batch_sizes.blur()
    expect(page.get_by_text("Energy is estimated")).to_be_visible()
    expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)
    page.wait_for_timeout(2000)  # plotly and the data grid finish drawing after they appear
    page.screenshot(path=str(screenshot_path("profile.png", tmp_path)), full_page=True)
    page.close()


def test_models_page_shows_fitted_surfaces(served_app: str, browser, tmp_path: Path):
    """Profile demo-small on a small grid, fit it, and the Models page draws the surface with the trials."""
    from engine.fitting import fit_all, save_fits

    store = profile_now("demo-small", [8, 32, 96], [4, 16, 48], max_trials=3)
    assert save_fits(store, fit_all(store, model="demo-small"))
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.goto(served_app + "/models")
    expect(page.get_by_role("heading", name="Fitted surfaces")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Energy here is estimated")).to_be_visible()
    expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)
    chart = page.locator('[data-testid="stPlotlyChart"]').first
    chart.scroll_into_view_if_needed()
    page.wait_for_timeout(2500)  # the WebGL surfaces finish drawing after they appear
    chart.screenshot(path=str(screenshot_path("surfaces.png", tmp_path)))
    page.close()


def test_plan_page_in_the_browser(served_app: str, browser, tmp_path: Path):
    """Fit both demo models, plan the sample workload, download the schedule; then a malformed
    upload lists its row problems and an impossible target explains itself."""
    from engine.fitting import fit_all, save_fits

    store = Store(served_db["path"])
    for model in ("demo-small", "demo-large"):
        if not store.query_one("SELECT count(*) FROM measurements WHERE model = ?", [model])[0]:
            profile_now(model, [8, 32, 96], [4, 16, 48], max_trials=3)
    # demo-small (transformers) at a second batch size too, so that its fits have a batch axis and the plan
    # may batch it (llama.cpp's demo-large runs one request at a time).
    if not store.query_one("SELECT count(*) FROM measurements WHERE model = 'demo-small' AND batch_size > 1")[0]:
        profile_now("demo-small", [8, 32, 96], [4, 16, 48], max_trials=3, batch_size=4)
    assert save_fits(store, fit_all(store))
    page = browser.new_page(viewport={"width": 1400, "height": 4200})
    page.goto(served_app + "/plan")
    expect(page.get_by_role("heading", name="Plan", exact=True)).to_be_visible(timeout=60_000)
    page.get_by_text("Sample workload (sample_50.csv)").click()
    expect(page.get_by_text("50 queries read from sample_50")).to_be_visible(timeout=30_000)
    target = page.get_by_role("spinbutton", name="Accuracy target (fraction)")
    mean_score = round(float(catalog.list_models(store).accuracy.mean()), 2)  # the two demo models' mean
    expect(target).to_have_value(f"{mean_score:.3f}")
    page.get_by_role("button", name="Plan", exact=True).click()
    expect(page.get_by_text("Proven gap")).to_be_visible(timeout=120_000)
    expect(page.get_by_text("Compared with the obvious alternatives")).to_be_visible()
    expect(page.get_by_text("What each constraint costs")).to_be_visible()
    assert float(store.query_one("SELECT accuracy_target FROM plans ORDER BY id DESC LIMIT 1")[0]) == mean_score
    # The lever and the band: batch sizes per option, what batching saves (or why plans are at batch 1), and
    # the range the measurement is expected in.
    expect(page.get_by_text("Queries per option")).to_be_visible()
    expect(page.get_by_text("Expected to measure between").first).to_be_visible()
    batched = store.query_one("SELECT max(batch_size) > 1 FROM plan_assignments WHERE plan_id = "
                              "(SELECT max(id) FROM plans)")[0]
    expect(page.get_by_text("Batching saves" if batched else "Plans here are at batch size 1").first).to_be_visible()
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download the schedule (CSV)").click()
    schedule = download_info.value.path().read_text()
    assert schedule.splitlines()[0].startswith("id,model,device,input_tokens,output_tokens,predicted_energy_j")
    assert len(schedule.splitlines()) == 51
    page.get_by_role("button", name="Draw energy against the accuracy target and the deadline").click()
    expect(page.get_by_text("Drawing the trade-offs")).to_be_visible(timeout=30_000)  # in the background
    expect(page.locator(".js-plotly-plot").filter(has_text="Energy against the deadline")).to_be_visible(
        timeout=300_000)
    page.mouse.wheel(0, -20_000)  # back to the top of the page for the picture
    page.wait_for_timeout(2500)  # plotly finishes drawing after it appears
    page.screenshot(path=str(screenshot_path("plan.png", tmp_path)), full_page=True)

    # Enter in a field of the targets does not plan: only the button does.
    plans_before = len(list_plans(store))
    target = page.get_by_role("spinbutton", name="Accuracy target (fraction)")
    target.fill("0.45")
    target.press("Enter")
    page.wait_for_timeout(3000)
    assert len(list_plans(store)) == plans_before

    # An impossible accuracy target: no schedule, and the reason in words.
    page.get_by_role("spinbutton", name="Accuracy target (fraction)").fill("0.95")
    page.get_by_role("button", name="Plan", exact=True).click()
    expect(page.get_by_text("No schedule meets these targets")).to_be_visible(timeout=120_000)
    expect(page.get_by_text("is above the best achievable")).to_be_visible()

    # A new upload hides the plan of the old workload (and says so).
    fresh = tmp_path / "fresh_workload.csv"
    fresh.write_text("id,input_tokens,output_tokens\na,12,8\nb,30,8\nc,64,4\n")
    page.get_by_text("Upload a CSV").click()
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(fresh))
    expect(page.get_by_text("3 queries read from fresh_workload")).to_be_visible(timeout=30_000)
    expect(page.get_by_text("The workload changed after plan #")).to_be_visible()
    expect(page.get_by_text("Proven gap")).to_have_count(0)
    expect(page.get_by_role("button", name="Download the schedule (CSV)")).to_have_count(0)

    # A malformed workload: every bad row listed, nothing planned.
    bad = tmp_path / "bad_workload.csv"
    bad.write_text("id,input_tokens,output_tokens\na,12,8\nb,-3,8\nc,nan,4\nd,,\n")
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(bad))
    expect(page.get_by_text("The workload has 3 problems")).to_be_visible(timeout=30_000)
    expect(page.get_by_text("Proven gap")).to_have_count(0)
    page.close()


def test_execute_page_after_the_plan_page_in_the_browser(served_app: str, browser, tmp_path: Path):
    """Execute the sample workload's plan (made by the Plan page test before this one) from the Execute
    page: the measured total against the plan's band in a sentence, and predicted against measured per
    option and, where the plan batches, per batch with the share rule."""
    store = Store(served_db["path"])
    plans = list_plans(store)
    runnable = plans[plans.status.isin(["optimal", "feasible"]) & (plans.workload == "sample_50")]
    assert not runnable.empty, "the Plan page test plans the sample workload first (run both: -k plan_page)"
    plan_id = int(runnable.id.iloc[0])
    batched = bool(store.query_one("SELECT max(batch_size) > 1 FROM plan_assignments WHERE plan_id = ?",
                                   [plan_id])[0])
    page = browser.new_page(viewport={"width": 1400, "height": 3000})
    page.goto(served_app + "/execute")
    expect(page.get_by_role("heading", name="Execute", exact=True)).to_be_visible(timeout=60_000)
    page.get_by_role("button", name="Execute this plan").click()
    expect(page.get_by_text("done: 50 of 50 queries")).to_be_visible(timeout=600_000)
    assert store.query_one("SELECT plan_id FROM executions ORDER BY id DESC LIMIT 1")[0] == plan_id
    expect(page.get_by_text("Predicted against measured")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Against the plan's energy band:")).to_be_visible()
    expect(page.get_by_text(re.compile(r"Measured \d[\d,]*\.\d+ k?J( \(estimated\))?, predicted \d[\d,]*\.\d+ k?J ± "
                                       r"\d[\d,]*\.\d+ k?J \(±\d+\.\d%\): (inside|outside) the band")).first).to_be_visible()
    if batched:
        expect(page.get_by_text("Per batch", exact=True)).to_be_visible()
        expect(page.get_by_text("in proportion to the tokens it processed")).to_be_visible()
        expect(page.locator(".js-plotly-plot").filter(has_text="Energy error per batch")).to_be_visible(timeout=60_000)
    else:  # every batch holds one query: the per-query comparison says it all
        expect(page.get_by_text("Per batch", exact=True)).to_have_count(0)
    page.mouse.wheel(0, -20_000)
    page.wait_for_timeout(2500)  # plotly finishes drawing after it appears
    page.screenshot(path=str(screenshot_path("execute.png", tmp_path)), full_page=True)
    page.close()


def test_models_page_draws_the_batch_axis_in_the_browser(served_app: str, browser, tmp_path: Path):
    """demo-small, profiled at batch sizes 1 and 4 by the Plan page test, has fits with a batch axis: the
    Models page draws its surface at a chosen batch size and energy per request against batch size."""
    store = Store(served_db["path"])
    sizes = store.query_one("SELECT count(DISTINCT batch_size) FROM measurements WHERE model = 'demo-small'")[0]
    assert sizes >= 2, "the Plan page test profiles demo-small at two batch sizes first (run both: -k page)"
    page = browser.new_page(viewport={"width": 1400, "height": 2600})
    page.goto(served_app + "/models")
    expect(page.get_by_role("heading", name="Fitted surfaces")).to_be_visible(timeout=60_000)
    chooser = page.locator('[data-testid="stSelectbox"]').filter(has_text="Model and device").locator("input")
    chooser.click()
    chooser.fill("demo-small")
    page.keyboard.press("Enter")
    expect(page.get_by_text("Energy per request against batch size", exact=True)).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Batch size", exact=True).first).to_be_visible()
    curve = page.locator(".js-plotly-plot").filter(has_text="batch size").last
    expect(curve).to_be_visible(timeout=60_000)
    page.wait_for_timeout(3000)  # the WebGL surface and the curve finish drawing after they appear
    page.screenshot(path=str(screenshot_path("models_batch.png", tmp_path)), full_page=True)
    page.close()


def test_the_whole_journey_of_a_new_user(tmp_path_factory, demo_models, browser, tmp_path: Path):
    """A fresh database: the first-run button profiles and fits the demo models and opens the
    Plan page with the sample workload; plan it, download the schedule, execute it, and read
    predicted against measured."""
    db = tmp_path_factory.mktemp("journey") / "planner.duckdb"
    catalog.register_demo_models(Store(db), list(demo_models.values()))
    started = time.perf_counter()
    with serve(db) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(url)
        expect(page.get_by_text("Start here")).to_be_visible(timeout=60_000)
        page.get_by_role("button", name="Profile the demo models and plan").click()
        expect(page.get_by_text("First run:")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("of 9 points").first).to_be_visible(timeout=120_000)  # a job's own progress
        page.wait_for_timeout(1500)
        page.screenshot(path=str(screenshot_path("first_run.png", tmp_path)), full_page=True)
        # The first run ends on the Plan page, the sample workload loaded.
        expect(page.get_by_text("50 queries read from sample_50")).to_be_visible(timeout=900_000)
        first_run_s = time.perf_counter() - started
        page.get_by_role("button", name="Plan", exact=True).click()
        expect(page.get_by_text("Proven gap")).to_be_visible(timeout=120_000)
        expect(page.get_by_text("Compared with the obvious alternatives")).to_be_visible()
        with page.expect_download() as download_info:
            page.get_by_role("button", name="Download the schedule (CSV)").click()
        assert len(download_info.value.path().read_text().splitlines()) == 51

        page.get_by_role("link", name="Execute").click()
        expect(page.get_by_role("heading", name="Execute", exact=True)).to_be_visible(timeout=60_000)
        page.get_by_role("button", name="Execute this plan").click()
        expect(page.get_by_text("running:").first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("done: 50 of 50 queries")).to_be_visible(timeout=600_000)
        expect(page.get_by_text("Predicted against measured")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("vs predicted").first).to_be_visible()
        expect(page.get_by_text("Against the plan's energy band:")).to_be_visible()
        page.wait_for_timeout(2500)  # plotly finishes drawing after it appears
        # (execute.png, in the README, is the Execute page test's: a plan that may batch.)
        page.screenshot(path=str(screenshot_path("execute_first_run.png", tmp_path)), full_page=True)

        # Home after the first run: the start box stays, and the latest work reads in units.
        page.get_by_role("link", name="Home", exact=True).click()
        expect(page.get_by_text("Latest work")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Start here")).to_be_visible()
        expect(page.get_by_role("button", name="Explore the paper's published A100 profiles")).to_be_visible()
        latest_plan = page.get_by_text(re.compile(r"^Plan: #\d+ optimal, 50 queries of sample_50: "))
        expect(latest_plan).to_be_visible()
        expect(latest_plan).to_contain_text(re.compile(r": \d[\d,]*\.\d+ (J|kJ) predicted \(total energy\), "
                                                       r"mean accuracy 0\.\d{4}; \d{4}-\d\d-\d\d \d\d:\d\d$"))
        expect(page.get_by_text(re.compile(r"^Fit: #\d+ .*CV MAPE \d+\.\d%; \d{4}-\d\d-\d\d \d\d:\d\d$"))).to_be_visible()
        expect(page.get_by_text(re.compile(r"^Execution: #\d+ of plan #\d+, done \(50 of 50 queries\)"))).to_be_visible()
        expect(page.get_by_text(re.compile(r"cv_mape|energy_j|\d\.\d{7}|T\d\d:\d\d:\d\d"))).to_have_count(0)
        page.get_by_text("Latest work").scroll_into_view_if_needed()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(screenshot_path("home_after_run.png", tmp_path)))

        # The next step the Home page offers: measure batching; it ends on the Plan page, whose plan now batches.
        page.mouse.wheel(0, -20_000)
        # The bordered "Start here" box: the innermost block that holds its heading.
        offer = page.get_by_test_id("stVerticalBlock").filter(has_text="Start here").last
        expect(offer.get_by_role("button", name="Measure batching, then plan")).to_be_visible(timeout=30_000)
        page.wait_for_timeout(1000)
        offer.screenshot(path=str(screenshot_path("home_batching.png", tmp_path)))
        page.get_by_role("button", name="Measure batching, then plan").click()
        expect(page.get_by_text("Measuring batching:")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("50 queries read from sample_50")).to_be_visible(timeout=900_000)
        page.get_by_role("button", name="Plan", exact=True).click()
        expect(page.get_by_text("Proven gap")).to_be_visible(timeout=120_000)
        expect(page.get_by_text("Batching saves").first).to_be_visible()
        page.close()
    store = Store(db)
    assert store.query_one("SELECT count(*) FROM execution_results WHERE error IS NULL")[0] == 50
    assert store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0] == 50
    print(f"\njourney: first run {first_run_s:.0f} s, whole journey {time.perf_counter() - started:.0f} s")
    # Issue 15's target for this journey is the executed total within ±15% of the plan's prediction. It is
    # a target, not yet met every time (the browser and the app server share the cores; runs on 2026-11-29 gave
    # -9.4% and -21.2%), so it is printed here and reported; bench/fidelity.py measures it quietly. The
    # assertion below only catches what no honest run gives (a unit mistake, an energy of another run).
    (execution_id,) = store.query_one("SELECT max(id) FROM executions")
    comparison = execution.compare(execution.execution_results(store, execution_id),
                                   execution.execution_energy_scope(store, execution_id))
    label = "estimated (CPU time)" if comparison.energy_estimated else "measured"
    print(f"journey: energy predicted {comparison.predicted_energy_j:.1f} J, executed {comparison.measured_energy_j:.1f} J "
          f"({label}): {comparison.energy_error:+.1%}; per query mean absolute error "
          f"{comparison.per_query_energy_error_mean_abs:.1%}")
    assert comparison.n_run == 50 and comparison.measured_energy_j is not None
    assert abs(comparison.energy_error) <= 0.5, (
        f"executed {comparison.measured_energy_j:.1f} J ({label}) against {comparison.predicted_energy_j:.1f} J "
        f"predicted: {comparison.energy_error:+.1%}, outside ±50%")
