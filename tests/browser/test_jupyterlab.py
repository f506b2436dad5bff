"""Notebook 05 in a real browser: JupyterLab on 127.0.0.1 with a token, headless Chromium
driven by Playwright, run all cells, move a slider, check the view changed, screenshot.

Needs Debian's chromium (`make test` installs it when run as root) and the cached data a
smoke run leaves (`make test` runs this after nbval). Skips with a reason otherwise."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from paper_lib.runtime import PROJECT_ROOT

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Screenshots go to build/browser, so `make test` leaves the committed ones alone;
# PAPER_LIB_SCREENSHOT_DIR=figures/browser refreshes those (relative to the project).
SCREENSHOT = (PROJECT_ROOT / os.environ.get("PAPER_LIB_SCREENSHOT_DIR", "build/browser")
              / "05_explore_lab.png")
SCREENSHOT_PANELS = SCREENSHOT.with_name("05_explore_lab_effect.png")
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def lab(tmp_path):
    """A JupyterLab server on a scratch copy of notebook 05 (the committed file is never
    touched, even by autosave)."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium; make test does "
                    "this when run as root)")
    pytest.importorskip("playwright")
    if not any((PROJECT_ROOT / "data" / "saes" / "smoke").rglob("cfg.json")):
        pytest.skip("no saved smoke SAEs yet: run the notebooks first (make test runs nbval "
                    "before this test)")
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(PROJECT_ROOT / "notebooks" / "05_explore.ipynb", root / "05_explore.ipynb")
    port, token = _free_port(), "paper-lib-browser-test"
    # No "get notified about Jupyter news?" toast over the screenshots (and no fetch).
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "PAPER_LIB_OUTPUT_ROOT": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--LabApp.workspaces_dir={tmp_path / 'ws'}", "--LabApp.expose_app_in_browser=True",
         f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
         "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("JupyterLab did not start within 60 s")
    yield url, token
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _contexts_text(page) -> str:
    return _panel_text(page, "fires on")


def _panel_text(page, marker: str) -> str:
    # textContent, not innerText: JupyterLab skips rendering off-screen cells.
    return page.locator(".widget-html-content", has_text=marker).first.text_content()


def test_explorer_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    url, token = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/05_explore.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook", timeout=60_000)
        page.wait_for_function("window.jupyterapp && window.jupyterapp.commands", timeout=60_000)
        # Wait for the kernel, then run every cell.
        page.wait_for_function(
            "() => !document.querySelector('.jp-Notebook-ExecutionIndicator') || "
            "document.body.innerText.includes('Idle')", timeout=60_000)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        page.wait_for_selector(".widget-html-content:has-text('fires on')", timeout=240_000)
        before = _contexts_text(page)
        assert "latent 0" in before
        effect_before = _panel_text(page, "removing it")
        assert "log p(next token)" in effect_before and "it supports" in effect_before
        handle = page.locator(".widget-slider .noUi-handle").first
        handle.scroll_into_view_if_needed()
        handle.focus()
        for _ in range(3):
            page.keyboard.press("ArrowRight")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.widget-html-content')]"
            ".some(e => e.textContent.includes('latent 3 fires on'))", timeout=60_000)
        after = _contexts_text(page)
        assert after != before and "latent 3" in after
        page.wait_for_function(  # the effect panel re-ran the LM for latent 3
            f"() => [...document.querySelectorAll('.widget-html-content')].some(e => "
            f"e.textContent.includes('removing it') && e.textContent !== {effect_before!r})",
            timeout=60_000)
        assert "closest latent elsewhere" in _panel_text(page, "closest latent elsewhere")
        page.wait_for_timeout(2000)  # let the histogram image follow before the screenshot
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=False)
        page.locator(".widget-html-content", has_text="removing it").first \
            .scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(SCREENSHOT_PANELS), full_page=False)
        browser.close()
    assert SCREENSHOT.stat().st_size > 10_000 and SCREENSHOT_PANELS.stat().st_size > 10_000
