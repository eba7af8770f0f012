"""The notebook lab in a real browser: JupyterLab on 127.0.0.1 (token, free
port), Debian's chromium driven by Playwright for Python.

Opens the quickstart with `?reset`, runs all cells and checks, in the page:
the dashboard's memory chart gains points while the notebook's run trains; then
as a user would: a long run started with Run is ended with Stop, and a second
run with other knobs adds a row to the history. Screenshots go to
tests/browser/artifacts/ (gitignored). Everything it starts is stopped.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.engine]

CHROMIUM = os.environ.get("MEMLAB_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ARTIFACTS = os.path.join(HERE, "artifacts")
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the active notebook only
DASH = PANEL + " .memlab-dashboard"

# In CI (`make test` after set-up) a missing browser is a failure, not a skip.
if os.environ.get("CI"):
    import playwright.sync_api as sync_api  # noqa: E402
    assert os.path.exists(CHROMIUM), f"no browser at {CHROMIUM}: set-up installs Debian's chromium package"
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM}: set-up installs Debian's chromium package", allow_module_level=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base, token, path, method="GET"):
    request = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
        return json.loads(body) if body else None


def worker_pids(marker):
    """memlab workers started for this test: their command line names our run store."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "memlab.engine.worker" in " ".join(p.info["cmdline"] or []) and marker in " ".join(p.info["cmdline"])]


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), root)
    port, token = free_port(), os.urandom(16).hex()
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("JUPYTERLAB_SETTINGS_DIR", "settings")):
        env[var] = str(root / f".{sub}")  # nothing read from, or left in, the user's Jupyter folders
    env.pop("MEMLAB_STORE", None)  # the notebook's Lab() stores runs beside it
    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(  # no news pop-up over the screenshots
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    log = open(root / "jupyter.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--ServerApp.shutdown_no_activity_timeout=900",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            api(base, token, "/api/status")
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("jupyter lab did not start:\n" + (root / "jupyter.log").read_text()[-3000:])
            time.sleep(0.5)
    try:
        yield {"base": base, "token": token, "root": root}
    finally:
        try:  # kernels first (they run in their own sessions), then the server
            for kernel in api(base, token, "/api/kernels"):
                api(base, token, f"/api/kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        log.close()
        for pid in worker_pids(str(root)):  # a worker outliving its kernel would be a bug: still clean up
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def page(lab_server):
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def shot(page, name):
    path = os.path.join(ARTIFACTS, name)
    page.screenshot(path=path, full_page=False)
    return path


def live_points(page):
    """Points of the RSS line in the dashboard's live memory chart, as plotly.js holds them."""
    return page.evaluate("""(sel) => {
        const el = document.querySelector(sel + ' .memlab-live-chart');
        const gd = el && (el.data ? el : el.querySelector('.js-plotly-plot'));
        if (!gd || !gd.data) return -1;
        const rss = gd.data.find(t => t.name === 'rss');
        return rss && rss.x ? rss.x.length : 0;
    }""", DASH)


def status_text(page):
    return page.locator(DASH + " .memlab-status").inner_text()


def steps_done(page):
    found = re.search(r"step (\d+)/", status_text(page))
    return int(found.group(1)) if found else 0


def history_rows(page):
    return page.locator(DASH + " table.memlab-history tr").count() - 1


def kernel_idle(page):
    return page.locator(PANEL + " .jp-Notebook-ExecutionIndicator").get_attribute("data-status") == "idle"


def wait_for(predicate, timeout, what, step=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def set_knob(page, name, value):
    """Type into a knob's text field and commit it (Enter), as a user would."""
    field = page.locator(f"{DASH} .memlab-knob-{name.replace('.', '-').replace('_', '-')} input")
    field.fill(str(value))
    field.press("Enter")


@pytest.fixture
def screenshot_on_failure(page, request):
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        shot(page, "failure.png")


def test_quickstart_live_stop_and_history(lab_server, page, screenshot_on_failure):
    base, token = lab_server["base"], lab_server["token"]
    page.goto(f"{base}/lab/tree/quickstart.ipynb?reset&token={token}")
    page.wait_for_selector(PANEL + " .jp-Cell")
    select = page.locator(".jp-Dialog button.jp-mod-accept")
    try:  # JupyterLab may ask which kernel to start: the notebook's own (Python 3)
        select.wait_for(timeout=10_000)
        select.click()
    except sync_api.TimeoutError:
        pass
    wait_for(lambda: "Idle" in page.locator(".jp-StatusBar-Widget", has_text="Python 3").first.inner_text(),
             120, "the kernel to start")
    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").first.click()  # fold the file browser

    # Run > Run All Cells (not awaited: the charts must move while it runs)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    page.wait_for_selector(DASH + " .memlab-live-chart", timeout=120_000)
    wait_for(lambda: live_points(page) >= 0, 60, "plotly to draw the live chart")
    page.locator(DASH).first.scroll_into_view_if_needed()

    # the notebook's run: the memory chart gains points while it trains
    counts = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        counts.append(live_points(page))
        if "running" in status_text(page) and len(set(c for c in counts if c > 0)) >= 4:
            break
        time.sleep(0.5)
    gains = [b for a, b in zip(counts, counts[1:]) if b > a > 0]
    assert len(gains) >= 3, f"memory chart points while running: {counts}"
    page.locator(DASH + " .memlab-live-chart").scroll_into_view_if_needed()
    shot(page, "1-live-while-running.png")

    # all cells done (the quickstart also made a second run with 10 buffers)
    wait_for(lambda: kernel_idle(page) and "ok" in status_text(page), 420, "the notebook to finish")
    wait_for(lambda: history_rows(page) >= 2, 30, "two history rows")
    rows_before = history_rows(page)
    page.locator(DASH + " .memlab-knob-panel").scroll_into_view_if_needed()
    shot(page, "2-after-run-all.png")

    # a long run from the dashboard, ended with Stop
    set_knob(page, "run.steps", 5000)
    run_button = page.locator(DASH + " .memlab-run button, " + DASH + " button.memlab-run").first
    stop_button = page.locator(DASH + " .memlab-stop button, " + DASH + " button.memlab-stop").first
    wait_for(lambda: run_button.is_enabled(), 30, "Run to be enabled")
    run_button.click()
    wait_for(lambda: "running" in status_text(page), 60, "the run to start")
    first = wait_for(lambda: live_points(page) if live_points(page) > 5 else 0, 180, "points of the new run")
    wait_for(lambda: live_points(page) > first, 60, "the chart to gain points")
    wait_for(lambda: steps_done(page) >= 3, 180, "a few steps")
    page.locator(DASH + " .memlab-live-chart").scroll_into_view_if_needed()
    shot(page, "3-long-run.png")
    wait_for(lambda: stop_button.is_enabled(), 10, "Stop to be enabled")
    stop_button.click()
    wait_for(lambda: "stopped" in status_text(page), 90, "the run to stop")
    wait_for(lambda: history_rows(page) == rows_before + 1, 30, "the stopped run's row")
    assert "stopped" in page.locator(DASH + " table.memlab-history tr").last.inner_text()
    assert not worker_pids(str(lab_server["root"])), "Stop must end the worker"

    # a second run with other knobs adds a row, naming the knob that differs
    set_knob(page, "run.steps", 6)
    set_knob(page, "zero_optimization.offload_param.buffer_count", 8)
    wait_for(lambda: run_button.is_enabled(), 30, "Run to be enabled")
    run_button.click()
    wait_for(lambda: "running" in status_text(page), 60, "the second run to start")
    wait_for(lambda: status_text(page).startswith("ok"), 240, "the second run to finish")
    wait_for(lambda: history_rows(page) == rows_before + 2, 30, "the second run's row")
    last = page.locator(DASH + " table.memlab-history tr").last.inner_text()
    assert "ok" in last and "offload_param.buffer_count=8" in last, last
    page.locator(DASH + " .memlab-live-chart").scroll_into_view_if_needed()
    shot(page, "4-second-run-chart.png")
    page.locator(DASH + " table.memlab-history").scroll_into_view_if_needed()
    shot(page, "5-history-and-comparison.png")
    comparison = page.locator(DASH + " .js-plotly-plot").last
    comparison.scroll_into_view_if_needed()
    comparison.screenshot(path=os.path.join(ARTIFACTS, "6-comparison-chart.png"))
    # the legend names the components, the axis says the unit
    svg_texts = lambda css: page.evaluate(  # noqa: E731  (SVG text has no innerText)
        "(css) => Array.from(document.querySelectorAll(css)).map(e => e.textContent)", css)
    legend = svg_texts(DASH + " .memlab-live-chart .legendtext")
    assert {"framework", "param_pool", "optimizer_pool", "heap_free", "rss"} <= set(legend), legend
    axis = svg_texts(DASH + " .memlab-live-chart .g-ytitle")
    assert any("MiB" in t or "GiB" in t for t in axis), axis
