"""The report (stages/report/): one offline page per run, its numbers equal to `featscope query`,
every picture a real image, every string from the data escaped; in Debian's chromium with the
network off: no console error, every image drawn, the interactive map's points painted."""
from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.browser import bokeh_drawn_points, check_page, chromium_missing, injected_elements, offline_browser, page_text

SECTIONS = ["summary", "layers", "distances", "maps", "neighbors", "continuity", "errors"]
EVIL = "<img src=x onerror=alert(1)>"
DOCS_SCREENSHOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "report.png")


class Page(html.parser.HTMLParser):
    """The parts of a report page the tests look at: section ids, <img> sources, the cells
    (exact values) of every table with an id, <script> sources, <a href>s."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.sections, self.images, self.scripts, self.links = [], [], [], []
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self._table, self._row, self._cell = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "img":
            self.images.append(a.get("src"))
        elif tag == "script":
            self.scripts.append(a.get("src"))
        elif tag in ("a", "link"):
            self.links.append(a.get("href"))
        elif tag == "table" and a.get("id"):
            self._table = self.tables.setdefault(a["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = [a.get("data-value"), ""]
            self._row.append(self._cell)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def rows(self, table_id: str) -> list[dict]:
        """A table as dicts: header text -> (exact value from data-value, else the text)."""
        head, *body = self.tables[table_id]
        names = [t for _, t in head]
        return [{n: (v if v is not None else t) for n, (v, t) in zip(names, r)} for r in body]


def _featscope(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featscope.cli", *args], capture_output=True, text=True, timeout=600)


def _query(run: str, measure: str) -> list[dict]:
    res = _featscope("query", run, measure, "--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _png_size(uri: str) -> tuple[int, int]:
    head, data = uri.split(",", 1)
    assert head.startswith("data:image/") and head.endswith(";base64")
    with Image.open(io.BytesIO(base64.b64decode(data))) as img:
        img.load()
        return img.size


@pytest.fixture(scope="module")
def digits_page(digits_run):
    path = os.path.join(digits_run, "report", "index.html")
    assert os.path.isfile(path), "featscope run ends with the report stage"
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return path, text, Page(text)


def test_every_section_and_figure(digits_page):
    _, text, p = digits_page
    assert p.sections == SECTIONS
    assert "needs the" not in text  # a finished run: no section waits for a stage
    figures = [s for s in p.images if s.startswith("data:image/png")]
    assert len(figures) >= 12
    for src in p.images:
        w, h = _png_size(src)
        assert w > 0 and h > 0
    # figures are not blank: each PNG has more than one colour
    for src in figures:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert len(img.convert("RGB").getcolors(1 << 20) or [0, 0]) > 1


def test_offline_self_contained(digits_page):
    _, text, p = digits_page
    assert not [s for s in p.images + p.scripts + p.links if s and re.match(r"(https?:)?//", s)]
    # in the markup itself (BokehJS's code carries a MathJax CDN loader for TeX labels, which it
    # runs only for a TeX label: the page has none, and the browser test sees no request go out)
    markup = re.sub(r"<script\b[^>]*>.*?</script>", "", text, flags=re.S)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", markup)
    assert not re.search(r"https?://", markup.split("<nav>", 1)[1])  # nothing after the title links out
    assert not [s for s in p.scripts if s]  # every script inline: BokehJS itself too
    assert "Bokeh.embed.embed_items" in text


def test_numbers_equal_featscope_query(digits_run, digits_page):
    _, _, p = digits_page
    for table_id, measure, key in (("layer-comparison", "layer_comparison", ("layer",)),
                                   ("continuity-table", "continuity", ("layer", "view"))):
        want = [r for r in _query(digits_run, measure) if r.get("scope", "all") == "all"]
        got = p.rows(table_id)
        assert len(got) == len(want)
        by_key = {tuple(r[k] for k in key): r for r in want}
        for row in got:
            ref = by_key[tuple(row[k] for k in key)]
            for col, value in row.items():
                if col in key:
                    continue
                if ref[col] is None:  # (the explanation columns of feature rows)
                    assert value in (None, "–"), (table_id, col)
                elif isinstance(ref[col], (int, float)) and not isinstance(ref[col], bool):
                    assert float(value) == pytest.approx(ref[col], rel=1e-12, abs=0), (table_id, col)
                else:
                    assert value == ref[col], (table_id, col)
    summary = {row[0][1]: row[1][0] if row[1][0] is not None else row[1][1] for row in p.tables["summary-table"]}
    sql = lambda q: json.loads(_featscope("sql", digits_run, q, "--format", "json").stdout)[0]["n"]  # noqa: E731
    assert int(summary["images"]) == sql("SELECT count(*) AS n FROM images")
    assert int(summary["errors"]) == sql("SELECT count(*) AS n FROM errors")
    assert int(summary["classes"]) == sql("SELECT count(DISTINCT label) AS n FROM images")
    meta = json.load(open(os.path.join(digits_run, "run.json")))
    assert float(summary["held-out accuracy"]) == meta["stages"]["train"]["held_out_accuracy"]


def test_pictures_read_the_measures(digits_run):
    """The histograms' counts add up to class_distances' own, and the kNN scope's are numpy's
    histogram of the knn view; per-image agreement averages to knn_agreement; per-image continuity
    averages to continuity."""
    import duckdb

    res = lambda m: pq.read_table(os.path.join(digits_run, "results", m + ".parquet")).to_pylist()  # noqa: E731
    hist, cd = res("distance_histogram"), res("class_distances")
    for row in cd:
        bins = [h for h in hist if h["layer"] == row["layer"] and h["scope"] == row["scope"]]
        assert len(bins) == 100
        assert sum(b["same_n"] for b in bins) == row["same_n"]
        assert sum(b["diff_n"] for b in bins) == row["diff_n"]
    con = duckdb.connect()
    layer = cd[0]["layer"]
    edges = con.execute(f"""SELECT k.distance::DOUBLE AS d, q.label = n.label AS same
        FROM read_parquet('{digits_run}/knn/*/*.parquet') k
        JOIN read_parquet('{digits_run}/images/*.parquet') q ON q.image_id = k.query_id
        JOIN read_parquet('{digits_run}/images/*.parquet') n ON n.image_id = k.neighbor_id
        WHERE k.layer = ?""", [layer]).fetchnumpy()
    d, same = edges["d"], edges["same"].astype(bool)
    bins = [h for h in hist if h["layer"] == layer and h["scope"] == "knn"]
    edges_np = np.linspace(d.min(), d.max(), 101)
    for flag, col in ((True, "same_n"), (False, "diff_n")):
        counts, _ = np.histogram(d[same == flag], bins=edges_np)
        ours = np.array([b[col] for b in bins])
        assert np.abs(counts - ours).sum() <= 2  # a distance on a bin edge may round to either side
        assert counts.sum() == ours.sum()
    agree = res("image_agreement")
    overall = {r["layer"]: r for r in res("knn_agreement") if r["scope"] == "all"}
    for lay, ref in overall.items():
        vals = [r["agreement"] for r in agree if r["layer"] == lay]
        assert len(vals) == ref["n"]
        assert np.mean(vals) == pytest.approx(ref["agreement"], rel=1e-12)
    cont = [r for r in res("continuity") if r["scope"] == "all"]
    per = res("continuity_images")
    for ref in cont:
        rows = [r for r in per if r["layer"] == ref["layer"] and r["view"] == ref["view"]]
        assert len(rows) == ref["n"]
        assert np.mean([r["lipschitz"] for r in rows]) == pytest.approx(ref["lipschitz_mean"], rel=1e-9)
        assert np.mean([r["continuous"] for r in rows]) == pytest.approx(ref["continuity_accuracy"], rel=1e-12)
        assert np.mean([r["flipped"] for r in rows]) == pytest.approx(ref["flip_rate"], rel=1e-12)


def test_sampled_map_says_so(digits_run, tmp_path):
    res = _featscope("report", digits_run, "--out", str(tmp_path), "--set", "report_points=300",
                     "--set", "report_thumbnails=50", "--format", "json")
    assert res.returncode == 0, res.stderr
    recap = json.loads(res.stdout)
    assert recap["map_points"] == 300 and recap["map_sampled"] == 1
    text = (tmp_path / "index.html").read_text()
    assert "300 points: a seeded sample (seed 0) of the 1,797 images" in text
    # the sample is seeded: the same seed draws the same images, another seed others
    from featscope.stages.report.data import RunData

    ids = RunData(digits_run).image_ids()
    a, b = RunData(digits_run), RunData(digits_run, {"seed": 1})
    assert np.array_equal(a.sample(ids, 300, salt=1), RunData(digits_run).sample(ids, 300, salt=1))
    assert not np.array_equal(a.sample(ids, 300, salt=1), b.sample(ids, 300, salt=1))
    assert len(np.unique(a.sample(ids, 300, salt=1))) == 300


def test_report_errors(tmp_path, digits_run):
    res = _featscope("report", str(tmp_path / "nothing"))
    assert res.returncode == 2 and "not a featscope run" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = _featscope("report", digits_run, "--set", "report_points=-1")
    assert res.returncode == 2 and "report_points must be >= 0" in res.stderr


def test_stage_skipped_when_finished(digits_run):
    from featscope.core.config import Config
    from featscope.core.rundir import RunDir
    from featscope.stages import report

    path = os.path.join(digits_run, "report", "index.html")
    before = os.stat(path).st_mtime_ns
    cfg = Config(**{k: v for k, v in RunDir(digits_run).read_meta()["config"].items()})
    res = report.run(RunDir(digits_run), cfg, lambda it, **kw: it)
    assert res.get("skipped") == 1 and os.stat(path).st_mtime_ns == before


@pytest.fixture(scope="module")
def evil_run(ray_session, tmp_path_factory):
    """An ImageFolder whose class and file names are markup: they must reach the page as text."""
    import featscope
    from tests.imagegen import rgb

    root = tmp_path_factory.mktemp("evil")
    data = root / "data"
    for c, name in enumerate([EVIL, 'plain & "quoted"']):
        (data / name).mkdir(parents=True)
        for i in range(12):
            rgb(100 * c + i, 24).save(data / name / f"{'x<b onmouseover=alert(2)>' if i == 0 else i}.png")
    (data / EVIL / "bad<i>.png").write_bytes(b"not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        featscope.run(str(data), out=str(root / "run"), quiet=True, k=3, train_epochs=1,
                      perturb=["shift=1"])
    return str(root / "run")


def test_strings_from_the_data_are_escaped(evil_run):
    text = open(os.path.join(evil_run, "report", "index.html"), encoding="utf-8").read()
    body = re.sub(r"<script\b[^>]*>.*?</script>", "", text, flags=re.S)  # Bokeh's doc JSON: checked in the browser
    assert EVIL not in body and "&lt;img src=x onerror=alert(1)&gt;" in body
    assert "<b onmouseover" not in body and "bad<i>" not in body
    assert Page(text).sections == SECTIONS


def test_partial_run_says_what_is_missing(ray_session, tmp_path):
    import featscope

    run = tmp_path / "partial"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        featscope.run(out=str(run), quiet=True, stages=["ingest"])
    res = _featscope("report", str(run))
    assert res.returncode == 0, res.stderr
    text = (run / "report" / "index.html").read_text()
    p = Page(text)
    assert p.sections == SECTIONS
    assert "needs the <b>analyze</b> stage" in text and "needs the <b>extract</b> stage" in text \
        and "needs the <b>knn</b> stage" in text
    assert "1,797" in text  # the summary of what exists


@pytest.fixture(scope="module")
def second_run(ray_session, digits_run, tmp_path_factory):
    """The same network on the same data, measured on other vector sets (conv:cam beside penultimate)."""
    import featscope

    out = tmp_path_factory.mktemp("second") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        featscope.run(out=str(out), quiet=True, weights=os.path.join(digits_run, "model", "smallcnn.pt"),
                      layers=["conv:cam", "penultimate"], perturb=["noise=0.05"], stages=["ingest", "extract", "index",
                                                                                          "knn", "analyze"])
    return str(out)


def test_compare_html(digits_run, second_run, tmp_path):
    out = tmp_path / "cmp.html"
    res = _featscope("compare", digits_run, second_run, "--html", str(out), "--format", "json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    text = out.read_text()
    p = Page(text)
    assert p.sections == ["summary", "layers", "distances", "maps", "continuity", "errors"]
    # the page's delta table is the rows `featscope compare` prints
    got = p.rows("compare-layers")
    assert len(got) == len(rows)
    for g, w in zip(got, rows):
        for col, v in w.items():
            if isinstance(v, float):
                assert float(g[col]) == pytest.approx(v, rel=1e-12)
            elif v is None:
                assert g[col] == "–"
            else:
                assert str(g[col]).replace(",", "") == str(v)
    for src in p.images:
        assert _png_size(src)[0] > 0
    assert "<h3>penultimate</h3>" in text  # the one layer both runs measured


# ---- in the browser --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    why = chromium_missing()
    if why:
        pytest.skip(why)
    with offline_browser() as driver:
        yield driver


def test_page_in_the_browser(browser, digits_page, tmp_path):
    path, _, _ = digits_page
    shot = tmp_path / "report.png"
    r = check_page(browser, path, screenshot=str(shot))
    assert r["console_errors"] == [] and r["alerts"] == []
    assert r["broken_images"] == [] and r["images"] >= 100
    assert r["bokeh"] == "idle"
    meta = json.load(open(os.path.join(os.path.dirname(path), "report.json")))
    assert bokeh_drawn_points(browser) >= meta["map_points"]  # every point (plus the rings of disagreement)
    with Image.open(shot) as img:
        assert img.size[0] >= 1000 and img.size[1] > 2000
        if os.environ.get("FEATSCOPE_SCREENSHOT"):  # README's picture: the top of the page
            top = img.crop((0, 0, img.size[0], min(img.size[1], 2300)))
            top.resize((top.size[0] // 2, top.size[1] // 2), Image.LANCZOS).save(DOCS_SCREENSHOT, optimize=True)


def test_escaping_in_the_browser(browser, evil_run):
    r = check_page(browser, os.path.join(evil_run, "report", "index.html"))
    assert r["alerts"] == [] and r["console_errors"] == []
    assert injected_elements(browser, "img[src=x]") == 0
    assert EVIL in page_text(browser)
    assert r["bokeh"] == "idle" and bokeh_drawn_points(browser) > 0


def test_compare_page_in_the_browser(browser, digits_run, second_run, tmp_path):
    out = tmp_path / "cmp.html"
    assert _featscope("compare", digits_run, second_run, "--html", str(out)).returncode == 0
    r = check_page(browser, str(out))
    assert r["console_errors"] == [] and r["broken_images"] == [] and r["images"] >= 4
