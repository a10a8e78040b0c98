"""The explorer in a real JupyterLab, driven by headless Chromium (Playwright).

JupyterLab is started on the session's smoke run (a free localhost port, a
token, settings in a temporary folder). Notebook 07 is opened with only run_dir
set and all its cells are run; then the explorer must have rendered its
widgets, opened on the worst group, react to a control, and give the same
intact image grid on five clicks in a row (the race that corrupted grids under
kernel subshells). Skipped only when Chromium, Playwright or JupyterLab is
missing and REQUIRE_CHROMIUM is not set.
"""

from __future__ import annotations

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
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "notebooks" / "07_error_analysis.ipynb"
RUN_ALL_S = 300          # notebook 07 on the smoke run takes ~20 s under papermill; CI has 2 cores
STEP_MS = 60_000         # one widget round trip (a click draws one figure)


def require_lab():
    from d3m_lib.book_check import browser_problem

    why = browser_problem()
    if why is None:
        try:
            import jupyterlab  # noqa: F401
        except ImportError:
            why = "jupyterlab is not installed"
    if why is None:
        return
    if os.environ.get("REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"REQUIRE_CHROMIUM=1 but {why}")
    pytest.skip(f"{why}; set REQUIRE_CHROMIUM=1 to make this a failure")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook_for(run_dir: Path, folder: Path) -> Path:
    """Notebook 07 with run_dir set in its parameters cell (nothing else changed)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = re.sub(r"^run_dir\s*=.*$", f"run_dir = {str(run_dir)!r}", cell.source, count=1, flags=re.M)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    out = folder / NOTEBOOK.name
    nbformat.write(nb, out)
    return out


@pytest.fixture
def lab(smoke_run, tmp_path):
    """A JupyterLab server on the smoke run: (base URL, token, notebook name). Stopped afterwards."""
    require_lab()
    run_dir, _ = smoke_run
    root = tmp_path / "lab"
    root.mkdir()
    nb = notebook_for(run_dir, root)
    port, token = free_port(), "d3m-" + os.urandom(12).hex()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("JUPYTER_RUNTIME_DIR", "runtime")):
        env[var] = str(tmp_path / sub)
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
         f"--port={port}", "--port-retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    json.load(r)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
                time.sleep(1)
        yield base, token, nb.name
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.copy2(tmp_path / "lab.log", tmp_path / "lab.log.kept")


def _run_all_cells(page, deadline_s: float) -> None:
    """Run every cell through JupyterLab's command and wait until the kernel is idle with all counted."""
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext.session "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=120_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(
        """() => {
            const nb = window.jupyterapp.shell.currentWidget;
            const cells = nb.content.widgets.filter(c => c.model.type === 'code');
            return nb.sessionContext.session.kernel.status === 'idle'
                && cells.every(c => c.model.executionCount !== null);
        }""", timeout=int(deadline_s * 1000), polling=1000)


def test_explorer_runs_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    from d3m_lib.book_check import launch

    base, token, name = lab
    shots = REPO_ROOT / "runs" / "jupyterlab-screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/{name}?token={token}", wait_until="domcontentloaded", timeout=90_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            try:
                _run_all_cells(page, RUN_ALL_S)
            finally:
                page.screenshot(path=str(shots / "07_after_run_all.png"), full_page=False)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
            assert errors.count() == 0, f"error output in the notebook: {errors.first.inner_text()[:2000]}"

            # the widgets rendered (the panel adds the class d3m-explorer to its box)
            panel = page.locator(".d3m-explorer")
            panel.wait_for(timeout=STEP_MS)
            panel.scroll_into_view_if_needed()
            selects = panel.locator("select")
            assert selects.count() >= 5, "finding, method, seed, group and target dropdowns"
            assert panel.locator(".widget-slider").count() == 1
            button = panel.locator("button", has_text="most helpful and most harmful")
            assert button.count() == 1 and button.is_visible()
            metrics = panel.locator(".widget-html-content").first
            assert "<table" in metrics.inner_html()

            # it opened on the worst group, and that group has misclassified targets
            worst = re.search(r"worst group (.+)", metrics.locator("p").inner_text()).group(1).strip()
            group_select = panel.locator("select").nth(3)
            assert group_select.input_value().replace("\xa0", " ") == worst
            status = panel.locator(".widget-html-content").nth(1)
            assert re.match(r"\d+ misclassified", status.inner_text()), status.inner_text()

            # changing one control changes the output
            # option labels render spaces as no-break spaces ("Black\xa0or\xa0African...")
            labels = {o.replace("\xa0", " "): o for o in group_select.locator("option").all_inner_texts()}
            options = [o for o in labels if o != worst]
            assert options, "the smoke run has a single group"
            before = status.inner_text()
            group_select.select_option(label=labels[options[0]])
            page.wait_for_function("([el, old]) => el.innerText !== old",
                                   arg=[status.element_handle(), before], timeout=STEP_MS)
            assert options[0] in status.inner_text().replace("\xa0", " ")
            group_select.select_option(label=labels.get(worst, worst))
            page.wait_for_function("([el, g]) => el.innerText.includes(g)",
                                   arg=[status.element_handle(), worst], timeout=STEP_MS)

            # five clicks in a row: each gives a new, complete image of the same grid
            srcs, sizes = [], []
            for i in range(5):
                page.evaluate("() => document.querySelectorAll('.d3m-explorer img')"
                              ".forEach(im => im.dataset.seen = '1')")
                button.click()
                img = panel.locator("img:not([data-seen])")
                img.wait_for(timeout=STEP_MS)
                page.wait_for_function("el => el.complete && el.naturalWidth > 0",
                                       arg=img.element_handle(), timeout=STEP_MS)
                srcs.append(img.get_attribute("src"))
                sizes.append(img.evaluate("el => [el.naturalWidth, el.naturalHeight]"))
                assert panel.locator("img").count() == 1, f"click {i + 1}: more than one grid shown"
            page.screenshot(path=str(shots / "07_explorer_after_5_clicks.png"), full_page=False)
            assert len(set(map(tuple, sizes))) == 1 and sizes[0][0] > 300, sizes
            assert len(set(srcs)) == 1, "the same target drew different grids on repeated clicks"
        finally:
            browser.close()
