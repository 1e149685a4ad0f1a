"""tests/browser.py can fail: each check is shown catching the fault it exists for (BokehJS that did
not load, a broken image, a script that ran, a network request) beside a page that passes it."""
from __future__ import annotations

import html
import http.server
import io
import socketserver
import threading
import time

import pytest

from tests.browser import (SCREENSHOT_MAX_HEIGHT, bokeh_drawn_points, bokeh_renderers, check_page, chromium_missing,
                           injected_elements, offline_browser, page_text, set_offline)


@pytest.fixture(scope="module", autouse=True)
def _needs_chromium():
    why = chromium_missing()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser(_needs_chromium):
    with offline_browser() as driver:
        yield driver


def _png(width: int = 4, height: int = 4, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def _bokeh_page(path, resources, n=500, **figure_kw):
    import numpy as np
    from bokeh.embed import file_html
    from bokeh.plotting import figure

    rng = np.random.default_rng(0)
    p = figure(width=600, height=400, **figure_kw)
    p.scatter(rng.random(n), rng.random(n), size=6)
    path.write_text(file_html(p, resources=resources, title="scatter"), encoding="utf-8")
    return path


def _colored_pixels(png_path) -> int:
    """Pixels that are neither white nor grey (the scatter's blue; axes, grid and text are grey)."""
    from PIL import Image

    im = Image.open(png_path).convert("RGB")
    return sum(1 for r, g, b in im.getdata() if max(r, g, b) - min(r, g, b) > 40)


def test_inline_bokeh_page_draws_every_point(browser, tmp_path):
    from bokeh.resources import INLINE

    page = _bokeh_page(tmp_path / "inline.html", INLINE)
    shot = tmp_path / "inline.png"
    t0 = time.monotonic()
    result = check_page(browser, page, screenshot=shot)
    assert time.monotonic() - t0 < 15
    assert result["bokeh"] == "idle", result
    assert result["console_errors"] == [], result
    assert result["alerts"] == [] and result["broken_images"] == [] and result["title"] == "scatter"
    assert bokeh_drawn_points(browser) == 500
    [renderer] = bokeh_renderers(browser)
    assert renderer["glyph"] == "Scatter" and renderer["painted"] and renderer["displayed"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _colored_pixels(shot) > 500  # the points are on the screenshot too, not only in BokehJS


def test_drawn_points_count_only_what_is_on_the_plot(browser, tmp_path):
    from bokeh.resources import INLINE

    # x in [0, 1) on a range of (0, 0.5): the points right of it are mapped but not drawn
    page = _bokeh_page(tmp_path / "half.html", INLINE, x_range=(0, 0.5))
    assert check_page(browser, page)["bokeh"] == "idle"
    import numpy as np

    expected = int((np.random.default_rng(0).random(500) <= 0.5).sum())
    assert bokeh_drawn_points(browser) == expected

    empty = _bokeh_page(tmp_path / "empty.html", INLINE, n=0)
    result = check_page(browser, empty)
    assert result["bokeh"] == "idle" and result["console_errors"] == []
    assert bokeh_drawn_points(browser) == 0


def test_bokeh_embedded_by_a_script(browser, tmp_path):
    """A plot embedded with Bokeh.embed.embed_item (json_item: no data-root-id in the HTML) is waited
    for too; BokehJS with nothing to embed settles as "no documents"."""
    import json

    import numpy as np
    from bokeh.embed import json_item
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    p = figure(width=400, height=300)
    p.line(np.arange(50), np.arange(50) ** 0.5)
    page = tmp_path / "item.html"
    page.write_text(f"""<title>item</title>{INLINE.render_js()}<div id="plot"></div>
<script>Bokeh.embed.embed_item({json.dumps(json_item(p))}, "plot")</script>""")
    result = check_page(browser, page)
    assert result["bokeh"] == "idle" and result["console_errors"] == [], result
    assert bokeh_drawn_points(browser) == 50

    bare = tmp_path / "bare.html"
    bare.write_text(f"<title>bare</title>{INLINE.render_js()}<p>no plot</p>")
    result = check_page(browser, bare)
    assert result["bokeh"] == "no documents" and result["console_errors"] == [], result
    assert bokeh_drawn_points(browser) == 0


def test_cdn_bokeh_page_draws_nothing_offline(browser, tmp_path):
    from bokeh.resources import CDN

    page = _bokeh_page(tmp_path / "cdn.html", CDN)
    t0 = time.monotonic()
    result = check_page(browser, page)
    assert time.monotonic() - t0 < 10  # a failed BokehJS is seen at once, not after the timeout
    assert result["bokeh"] == "not loaded"
    assert bokeh_drawn_points(browser) == 0
    failed = [m for m in result["console_errors"] if "cdn.bokeh.org" in m and "Failed to load resource" in m]
    assert failed and "ERR_INTERNET_DISCONNECTED" in failed[0], result["console_errors"]
    assert any("Bokeh is not defined" in m for m in result["console_errors"]), result["console_errors"]


class _Recorder(http.server.BaseHTTPRequestHandler):
    png = _png()

    def do_GET(self):
        self.server.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.send_header("Access-Control-Allow-Origin", "*")  # the fetch comes from a file:// page
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Recorder)
    server.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_no_request_leaves_the_browser(tmp_path, local_server):
    """A local HTTP server sees the page's requests only from a browser with both locks off; either
    lock alone stops them all (the CDN test above cannot tell: this machine has no network anyway)."""
    port = local_server.server_address[1]
    page = tmp_path / "net.html"
    page.write_text(f"""<title>net</title>
<img src="http://127.0.0.1:{port}/ip.png"><img src="http://localhost:{port}/localhost.png">
<script>fetch("http://127.0.0.1:{port}/fetch").catch(() => {{}});</script>""")

    def visit(driver):
        local_server.hits.clear()
        result = check_page(driver, page)
        time.sleep(0.3)  # a late fetch
        return result, sorted(local_server.hits)

    with offline_browser(block_hosts=False) as driver:
        result, hits = visit(driver)  # DevTools offline emulation alone
        assert hits == [] and len(result["broken_images"]) == 2
        assert all("ERR_INTERNET_DISCONNECTED" in m for m in result["console_errors"]), result
        set_offline(driver, False)  # and no lock at all: the control
        result, hits = visit(driver)
        assert hits == ["/fetch", "/ip.png", "/localhost.png"], hits
        assert result["broken_images"] == [] and result["console_errors"] == [], result
    with offline_browser() as driver:
        set_offline(driver, False)  # the host resolver rules alone
        result, hits = visit(driver)
        assert hits == [] and len(result["broken_images"]) == 2
        assert all("ERR_NAME_NOT_RESOLVED" in m for m in result["console_errors"]), result
        set_offline(driver, True)
        result, hits = visit(driver)  # both, as offline_browser() comes
        assert hits == [] and len(result["broken_images"]) == 2


def test_broken_images_are_reported(browser, tmp_path):
    good = _data_uri(_png())
    page = tmp_path / "images.html"
    page.write_text(f"""<title>images</title>
<img src="{good}" alt="good">
<img src="missing.png" alt="missing">
<img src="data:image/png;base64,iVBORw0KGgoAAAAN" alt="truncated">
<img src="{_data_uri(_png(8, 8))}" loading="lazy" style="margin-top: 5000px" alt="lazy, far below">""")
    result = check_page(browser, page)
    assert result["images"] == 4
    assert result["broken_images"] == ["missing.png", "data:image/png;base64,iVBORw0KGgoAAAAN"]
    assert good[:60] not in result["broken_images"]
    # the missing file is a console error; the undecodable data: URI is not (only broken_images has it)
    assert len(result["console_errors"]) == 1 and "missing.png" in result["console_errors"][0]
    assert "ERR_FILE_NOT_FOUND" in result["console_errors"][0]


def test_script_errors_are_console_errors(browser, tmp_path):
    page = tmp_path / "errors.html"
    page.write_text("<title>errors</title><script>console.warn('careful'); no_such_function();</script>"
                    "<script>console.error('said so')</script>")
    result = check_page(browser, page)
    assert len(result["console_errors"]) == 2, result
    assert "Uncaught ReferenceError: no_such_function is not defined" in result["console_errors"][0]
    assert '"said so"' in result["console_errors"][1]
    assert len(result["console_warnings"]) == 1 and "careful" in result["console_warnings"][0]


def test_alerts_and_injected_markup(browser, tmp_path):
    payload = "<img src=x onerror=alert(1)>"
    raw = tmp_path / "raw.html"
    raw.write_text(f"<title>raw</title><script>alert('from a script')</script><p>{payload}</p>")
    result = check_page(browser, raw)
    assert result["alerts"] == ["from a script", "1"], result
    assert injected_elements(browser, "img[src=x]") == 1

    escaped = tmp_path / "escaped.html"
    escaped.write_text(f"<title>escaped</title><p>{html.escape(payload)}</p>")
    result = check_page(browser, escaped)
    assert result["alerts"] == [] and result["console_errors"] == [], result
    assert injected_elements(browser, "img[src=x]") == 0
    assert payload in page_text(browser)


def test_full_page_screenshot(browser, tmp_path):
    from PIL import Image

    page = tmp_path / "tall.html"
    page.write_text("<title>tall</title><body style='margin:0'><div style='height:3000px;background:#c00'></div>"
                    "<div style='height:20000px;background:#00c'></div></body>")
    shot = tmp_path / "tall.png"
    check_page(browser, page, screenshot=shot)
    im = Image.open(shot).convert("RGB")
    assert im.size == (1400, SCREENSHOT_MAX_HEIGHT)
    assert im.getpixel((10, 2990)) == (204, 0, 0) and im.getpixel((10, 3010)) == (0, 0, 204)
    assert im.getpixel((10, SCREENSHOT_MAX_HEIGHT - 1)) == (0, 0, 204)
