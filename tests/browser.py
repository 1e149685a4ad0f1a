"""A headless Chromium with the network off, for tests that open an offline HTML page (the report).

Debian's chromium + chromium-driver (`apt-get install chromium chromium-driver`) driven by selenium.
`offline_browser()` starts one (about 1.5 s) that reaches no host: every host name, IP addresses and
localhost included, resolves to nothing (--host-resolver-rules) and DevTools' network emulation is
offline; file:// and data: URLs still load. `check_page` opens a file and reports what a reader meets
there: console errors, broken images, alerts; `bokeh_drawn_points` asks BokehJS how many data points
its plots painted (0 when BokehJS did not load or the data is empty).

    from tests.browser import chromium_missing, offline_browser, check_page, bokeh_drawn_points
"""
from __future__ import annotations

import base64
import contextlib
import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage",
                 "--hide-scrollbars",  # they take no width: a page lays out (and screenshots) at the full width
                 # file:// pages only: every host, IP addresses and localhost too, resolves to nothing
                 "--host-resolver-rules=MAP * ~NOTFOUND"]

SCREENSHOT_MAX_HEIGHT = 12000  # px: a full-page screenshot of a longer page is cut there
NO_DOCUMENT_GRACE = 2.0  # s: how long check_page waits for a Bokeh document where BokehJS loaded alone

# The whole page is loaded, and BokehJS (where the page has it) has painted every root: each Bokeh
# document is idle (Document.is_idle: every root view reported has_finished(), which for a plot means
# each of its renderers has painted once) and each root view in Bokeh.index has_finished().
_STATE_JS = """
const out = {ready_state: document.readyState, bokeh: null};
const B = window.Bokeh;
const embedded = document.querySelector('[data-root-id]') != null;
if (B === undefined) { out.bokeh = embedded ? 'not loaded' : null; return out; }
const docs = B.documents || [];
const roots = B.index ? B.index.roots : [];
out.bokeh_documents = docs.length;
out.bokeh_roots = roots.length;
if (docs.length == 0 && !embedded) { out.bokeh = 'no documents'; return out; }
const idle = docs.length > 0 && docs.every((d) => d.is_idle);
const finished = roots.length > 0 && roots.every((v) => v.has_finished());
out.bokeh = idle && finished ? 'idle' : 'pending';
return out;
"""

# Every GlyphRendererView under Bokeh.index, whether it has painted (RendererView.paint() marks the
# view finished right after its _paint) and is displayed, and how many of its points lie on the plot:
# those whose screen coordinates (the glyph view's sx, sy, mapped by the last paint) are finite and
# inside the plot frame's box. A glyph without sx/sy (an image, an area) counts the indices its last
# paint used (the CDSView's masked indices) or else its data size.
_DRAWN_JS = """
const B = window.Bokeh;
if (B === undefined || !B.index) return [];
const out = [];
for (const v of B.index.all_views()) {
  if (v.model == null || v.model.type !== 'GlyphRenderer') continue;
  const g = v.glyph;
  const row = {id: v.model.id, glyph: g && g.model ? g.model.type : null,
               painted: v.has_finished(), displayed: !!v.displayed, n: 0};
  if (g != null) {
    const sx = g.sx, sy = g.sy;
    const frame = v.plot_view && v.plot_view.frame ? v.plot_view.frame.bbox : null;
    const inside = frame == null || frame.left == null ? (x, y) => true
      : (x, y) => x >= frame.left && x <= frame.right && y >= frame.top && y <= frame.bottom;
    if (sx != null && sy != null && sx.length != null) {
      for (let i = 0; i < sx.length; i++) if (isFinite(sx[i]) && isFinite(sy[i]) && inside(sx[i], sy[i])) row.n++;
    } else {
      const masked = v.model.view != null ? v.model.view.masked : null;
      row.n = masked != null && typeof masked.count === 'number' ? masked.count
        : (typeof g.data_size === 'number' ? g.data_size : 0);
    }
  }
  out.push(row);
}
return out;
"""


@functools.lru_cache(maxsize=None)
def chromium_missing() -> str | None:
    """None when Chromium, its driver (the same major version) and selenium are usable; else one line
    saying what is missing and how to get it."""
    apt = "apt-get install chromium chromium-driver (as root)"
    absent = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if absent:
        return f"browser tests need {' and '.join(absent)}: {apt}"
    try:
        import selenium.webdriver  # noqa: F401
    except ImportError:
        return "browser tests need selenium: pip install selenium"
    majors = []
    for path, name in ((CHROMIUM, "Chromium"), (CHROMEDRIVER, "ChromeDriver")):
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return f"browser tests need a working {path} ({exc}): {apt}"
        version = re.search(rf"\b{name} (\d+)\.", out)
        if version is None:
            first = (out.strip().splitlines() or [""])[0][:80]
            return f"browser tests need a working {path} (`{path} --version` printed {first!r}): {apt}"
        majors.append(version.group(1))
    if majors[0] != majors[1]:
        return (f"browser tests need a chromedriver for Chromium {majors[0]}, not {majors[1]}: "
                f"{apt}, from the same release")
    return None


@contextlib.contextmanager
def offline_browser(width: int = 1400, height: int = 1000, *, block_hosts: bool = True,
                    emulate_offline: bool = True) -> Iterator["selenium.webdriver.Chrome"]:  # noqa: F821
    """A headless Chromium (a selenium Chrome driver) whose viewport is width x height CSS px and that
    reaches no network, on a fresh profile removed afterwards (the driver is always quit).

    Two locks, each enough alone (tests/test_browser_harness.py checks both against a local HTTP
    server): --host-resolver-rules maps every host, IP addresses and localhost included, to nothing
    (ERR_NAME_NOT_RESOLVED), and DevTools' network emulation is offline (ERR_INTERNET_DISCONNECTED),
    set before the first navigation; it stays on for the tab across page loads. block_hosts=False /
    emulate_offline=False take one off: for that test only. file:// and data: URLs still load.

    Browser console messages of every level are kept (driver.get_log("browser")); an alert does not
    block the driver (unhandledPromptBehavior "ignore"): check_page accepts and records it.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="featscope-chromium-")
    driver = None
    try:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in CHROMIUM_ARGS:
            if block_hosts or not arg.startswith("--host-resolver-rules="):
                options.add_argument(arg)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        options.set_capability("unhandledPromptBehavior", "ignore")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(60)
        driver.execute_cdp_cmd("Network.enable", {})
        set_offline(driver, emulate_offline)
        # --window-size is the outer size (headless=new keeps ~140 px of it for the window frame):
        # grow the window by the difference so that the viewport is width x height
        inner_w, inner_h = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        if (inner_w, inner_h) != (width, height):
            size = driver.get_window_size()
            driver.set_window_size(size["width"] + width - inner_w, size["height"] + height - inner_h)
        yield driver
    finally:
        if driver is not None:
            try:
                driver.quit()
            except Exception:  # a crashed browser: the profile still goes
                pass
        shutil.rmtree(profile, ignore_errors=True)


def set_offline(driver, offline: bool = True) -> None:
    """Turn DevTools' network emulation offline (or back on) for the driver's tab."""
    driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                           {"offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})


def _collect_alerts(driver, alerts: list[str]) -> None:
    """Accept every open alert/confirm/prompt, recording its text."""
    from selenium.common.exceptions import NoAlertPresentException

    for _ in range(100):
        try:
            alert = driver.switch_to.alert
            alerts.append(alert.text)
            alert.accept()
        except NoAlertPresentException:
            return


def _retry(driver, alerts: list[str], call):
    """call(), accepting (and recording) any alert that is in its way."""
    from selenium.common.exceptions import UnexpectedAlertPresentException

    for _ in range(100):
        _collect_alerts(driver, alerts)
        try:
            return call()
        except UnexpectedAlertPresentException as exc:  # opened between the two lines above
            if exc.alert_text is not None:
                alerts.append(exc.alert_text)
    raise RuntimeError("the page keeps opening alerts")


def _wait(driver, alerts: list[str], script: str, done, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = _retry(driver, alerts, lambda: driver.execute_script(script))
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


_IMAGES_JS = """
for (const img of document.images) if (img.loading === 'lazy') img.loading = 'eager';
return Array.from(document.images, (i) => [i.complete, i.naturalWidth, i.naturalHeight, i.getAttribute('src') || '']);
"""


def check_page(driver, path: str | os.PathLike, screenshot: str | os.PathLike | None = None,
               timeout: float = 20.0) -> dict:
    """Open file://<absolute path> and report what a reader meets there, once the document is
    complete, Bokeh (where the page embeds it) has painted every plot, and every <img> is complete
    (lazy ones are made eager first); each wait gives up after `timeout` seconds:

    console_errors: the browser console's SEVERE messages, none left out (uncaught JS errors,
        console.error, resources that failed to load); console_warnings: its WARNING ones,
    broken_images: the first 60 characters of the src of every <img> with no natural width or height,
    images: how many <img> the document has,
    alerts: the text of each alert/confirm/prompt that opened (each is accepted),
    title: document.title,
    bokeh: None (no Bokeh on the page), "idle" (every Bokeh document idle, every root view painted),
        "not loaded" (the page has a Bokeh root, <div data-root-id>, but window.Bokeh is undefined
        once the page has loaded: BokehJS failed), "no documents" (BokehJS loaded, nothing embedded
        NO_DOCUMENT_GRACE s after the load) or "pending" (not idle after `timeout`).

    With `screenshot`, a PNG of the whole page (up to SCREENSHOT_MAX_HEIGHT px tall) is written there.
    """
    _retry(driver, [], lambda: driver.get_log("browser"))  # drop what earlier pages left open or logged
    alerts: list[str] = []
    _retry(driver, alerts, lambda: driver.get(Path(path).resolve().as_uri()))
    loaded_at = []

    def settled(state):
        # None: the script ran while the page was being replaced (an alert, a navigation): ask again
        if state is None or state["ready_state"] != "complete":
            return False
        loaded_at[:] = loaded_at or [time.monotonic()]
        # BokehJS but no Bokeh document yet, nor a root to embed one in: one may still come from a
        # script (embed_item into a <div>); give it NO_DOCUMENT_GRACE seconds
        if state["bokeh"] == "no documents":
            return time.monotonic() - loaded_at[0] > NO_DOCUMENT_GRACE
        return state["bokeh"] != "pending"

    state = _wait(driver, alerts, _STATE_JS, settled, timeout)
    images = _wait(driver, alerts, _IMAGES_JS, lambda imgs: all(img[0] for img in imgs), timeout)
    title = _retry(driver, alerts, lambda: driver.title)
    if screenshot is not None:
        png = _retry(driver, alerts, lambda: full_page_png(driver))
        Path(screenshot).write_bytes(png)
    log = _retry(driver, alerts, lambda: driver.get_log("browser"))
    _collect_alerts(driver, alerts)
    return {
        "console_errors": [entry["message"] for entry in log if entry["level"] == "SEVERE"],
        "console_warnings": [entry["message"] for entry in log if entry["level"] == "WARNING"],
        "broken_images": [src[:60] for complete, w, h, src in images if not (w and h)],
        "images": len(images),
        "alerts": alerts,
        "title": title,
        "bokeh": state["bokeh"],
    }


def full_page_png(driver, max_height: int = SCREENSHOT_MAX_HEIGHT) -> bytes:
    """The whole page (its full scroll height, at most max_height px) as PNG bytes, through DevTools."""
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    width = max(1, int(size["width"]))
    height = max(1, min(int(size["height"]), max_height))
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    return base64.b64decode(shot["data"])


def bokeh_renderers(driver) -> list[dict]:
    """One row per Bokeh GlyphRenderer view on the page: id, glyph (its model type), painted (has
    the view painted once), displayed (visible), n (its points on screen: finite screen coordinates
    inside the plot frame)."""
    return driver.execute_script(_DRAWN_JS)


def bokeh_drawn_points(driver) -> int:
    """How many data points the page's Bokeh plots have painted: the sum of `n` over the glyph
    renderers that painted and are displayed; 0 without BokehJS or data."""
    return sum(row["n"] for row in bokeh_renderers(driver) if row["painted"] and row["displayed"])


def injected_elements(driver, marker_selector: str) -> int:
    """How many elements in the document match a CSS selector (e.g. "img[src=x]" for a payload that
    must have been rendered as text)."""
    from selenium.webdriver.common.by import By

    return len(driver.find_elements(By.CSS_SELECTOR, marker_selector))


def page_text(driver) -> str:
    """The page's visible text (document.body.innerText)."""
    return driver.execute_script("return document.body ? document.body.innerText : ''")
