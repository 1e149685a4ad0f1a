"""What the report shows, read from the run: stored results, small SQL over the catalog, seeded
samples of vectors and images. Nothing here measures anything itself: the figures are the
analyze stage's `results/<measure>.parquet` (the SQL measures), the pictures' data their
per-pair and per-image tables (distance_histogram, image_agreement, continuity_images).

Every read is bounded by the report's budgets (config report_points, report_thumbnails,
report_queries), not by the run's size: the per-image tables are read through pyarrow filters on
a seeded sample of ids, the group-bys are DuckDB's over the Parquet files.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featscope.core import catalog
from featscope.core.rundir import RunDir, exists, layer_dir, parquet_dataset, read_table

# which stage each section needs, for the notes of a partly finished run
NEEDS = {"summary": "ingest", "layers": "analyze", "distances": "analyze", "maps": "extract",
         "neighbors": "knn", "continuity": "analyze", "errors": "ingest"}


class RunData:
    """One run, opened read-only for the report."""

    def __init__(self, path: str, settings: dict | None = None):
        self.run = RunDir(path)
        if not self.run.exists():
            from featscope.core.config import UserError

            raise UserError(f"not a featscope run (no run.json): {path}")
        self.meta = self.run.read_meta()
        cfg = self.meta.get("config") or {}
        settings = settings or {}
        self.seed = int(settings.get("seed", cfg.get("seed", 0)) or 0)
        self.points = int(settings.get("report_points", cfg.get("report_points", 50_000)))
        self.thumbnails = int(settings.get("report_thumbnails", cfg.get("report_thumbnails", 2_000)))
        self.queries = int(settings.get("report_queries", cfg.get("report_queries", 6)))
        self.umap_points = int(settings.get("report_umap_points", cfg.get("report_umap_points", 10_000)))
        self._con = None
        self._classes = None
        self._ids = None

    # ---- what exists --------------------------------------------------------------------
    def done(self, stage: str) -> bool:
        if stage == "ingest":
            return bool(self.run.parquet_files("images"))
        status = (self.meta.get("stages") or {}).get(stage, {}).get("status") == "done"
        if stage == "extract":
            return status or bool(self.feature_layers())
        if stage == "knn":
            return status or any(self.run.parquet_files("knn", layer_dir(l)) for l in self.index_layers())
        if stage == "analyze":
            return exists(self.run.p("results", "layer_comparison.parquet"))
        return status

    def result(self, measure: str) -> pa.Table | None:
        path = self.run.p("results", measure + ".parquet")
        return read_table(path) if exists(path) else None

    def index_layers(self) -> list[str]:
        return [k["name"] for k in self.meta.get("index_layers", [])]

    def feature_layers(self) -> list[str]:
        return [l["name"] for l in self.meta.get("layers", []) if self.run.parquet_files("features", layer_dir(l["name"]))]

    def layer_entry(self, name: str) -> dict:
        return next(k for k in self.meta.get("index_layers", []) if k["name"] == name)

    @property
    def con(self):
        if self._con is None:
            self._con = catalog.connect(self.run.path, locked=True)
        return self._con

    def sql(self, query: str, params: list | None = None) -> pa.Table:
        return self.con.sql(query, params=params or None).fetch_arrow_table()

    # ---- summary --------------------------------------------------------------------------
    def classes(self) -> dict[int, str]:
        if self._classes is None:
            t = self.sql("SELECT DISTINCT label, label_name FROM images ORDER BY label")
            self._classes = dict(zip(t.column("label").to_pylist(), t.column("label_name").to_pylist()))
        return self._classes

    def summary(self) -> list[tuple[str, object]]:
        """(field, value) rows: model, weights fingerprint, data, images, errors, layers, views, accuracy."""
        m, cfg = self.meta, self.meta.get("config") or {}
        model = m.get("model") or {}
        counts = self.sql("SELECT count(*) AS n, count(DISTINCT label) AS classes FROM images").to_pylist()[0]
        errors = self.sql("SELECT count(*) AS n FROM errors").to_pylist()[0]["n"]
        rows: list[tuple[str, object]] = [
            ("model", f"{model.get('name', cfg.get('model'))} ({model.get('kind', '?')}, "
                      f"{model.get('num_classes', '?')} outputs)"),
            ("weights", self.weights_fingerprint()),
            ("data", (m.get("dataset") or {}).get("source", cfg.get("data"))),
            ("dataset fingerprint", (m.get("dataset") or {}).get("fingerprint")),
            ("images", counts["n"]), ("classes", counts["classes"]), ("errors", errors),
            ("layers", ", ".join(f"{l['name']} ({l['node']}, {l['pooling']}, dim {l['dim']})" for l in m.get("layers", []))),
            ("index layers", ", ".join(f"{k['name']} ({k['metric']})" for k in m.get("index_layers", []))),
            ("views", ", ".join(m.get("views") or []) or "none"),
            ("image size", (m.get("preprocess") or {}).get("image_size")),
            ("k", cfg.get("k")),
        ]
        train = (m.get("stages") or {}).get("train") or {}
        if train.get("held_out_accuracy") is not None:
            rows.append(("held-out accuracy", train["held_out_accuracy"]))
            rows.append(("trained on", f"{train.get('train_images')} images, {train.get('held_out_images')} held out"))
        elif self.done("extract") and model.get("num_classes") == counts["classes"]:
            acc = self.sql("SELECT avg((p.pred = i.label)::INTEGER) AS a FROM predictions p JOIN images i "
                           "USING (image_id) WHERE p.view = 'orig'").to_pylist()[0]["a"]
            rows.append(("accuracy (predictions vs labels, all images; not held out)", acc))
        else:
            rows.append(("held-out accuracy", "not measured (the model was not trained by this run)"))
        rows.append(("created", m.get("created")))
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())))
        return rows

    def weights_fingerprint(self) -> str:
        from featscope.core.rundir import file_sha256  # (not stages.models: the report needs no torch)

        model, cfg = self.meta.get("model") or {}, self.meta.get("config") or {}
        trained = self.run.p("model", f"{cfg.get('model')}.pt")
        if cfg.get("weights") and os.path.isfile(cfg["weights"]):
            return f"sha256 {file_sha256(cfg['weights'])[:16]} ({os.path.basename(cfg['weights'])})"
        if self.run.local and os.path.isfile(trained):
            return f"sha256 {file_sha256(trained)[:16]} (trained by this run: model/{os.path.basename(trained)})"
        if model.get("sha256"):
            return f"network state sha256 {model['sha256'][:16]}"
        return "none: randomly initialised (seeded)"

    def errors(self, limit: int = 500) -> tuple[int, pa.Table]:
        n = self.sql("SELECT count(*) AS n FROM errors").to_pylist()[0]["n"]
        return n, self.sql(f"SELECT uri, stage, error, message FROM errors ORDER BY stage, uri LIMIT {int(limit)}")

    # ---- samples ----------------------------------------------------------------------------
    def image_ids(self) -> np.ndarray:
        """Every image with an original's vector (the points a map may show), sorted (read once)."""
        if self._ids is None:
            layers = self.feature_layers()
            if not layers:
                return np.zeros(0, np.int64)
            files = self.run.parquet_files("features", layer_dir(layers[0]))
            t = parquet_dataset(files).to_table(columns=["image_id"], filter=pc.field("view") == "orig")
            self._ids = np.sort(t.column("image_id").to_numpy())
        return self._ids

    def sample(self, ids: np.ndarray, n: int, salt: int = 0) -> np.ndarray:
        if len(ids) <= n:
            return ids
        return np.sort(np.random.default_rng([self.seed, salt]).choice(ids, n, replace=False))

    def vectors(self, features: str, ids: np.ndarray) -> np.ndarray:
        """The originals' vectors of `ids` (sorted), read shard by shard through a filter."""
        files = self.run.parquet_files("features", layer_dir(features))
        want = pa.array(ids, pa.int64())
        out, got = None, np.zeros(0, np.int64)
        parts_ids, parts_vec = [], []  # shard by shard: only the sampled rows are kept
        ds = parquet_dataset(files)
        for batch in ds.to_batches(columns=["image_id", "vec"],
                                   filter=(pc.field("view") == "orig") & pc.field("image_id").isin(want)):
            if batch.num_rows == 0:
                continue
            vec = batch.column("vec")
            dim = vec.type.list_size if hasattr(vec.type, "list_size") else len(vec[0])
            parts_vec.append(vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32))
            parts_ids.append(batch.column("image_id").to_numpy())
        if parts_ids:
            got = np.concatenate(parts_ids)
            out = np.concatenate(parts_vec)
            order = np.argsort(got)
            got, out = got[order], out[order]
        if out is None or len(got) != len(ids) or not np.array_equal(got, ids):
            raise ValueError(f"features/{features}: some sampled images have no original's vector")
        return out

    def rows_for(self, measure: str, ids: np.ndarray, layer: str | None = None, columns=None) -> pa.Table:
        """The rows of a per-image results table for some image ids (and one layer)."""
        path = self.run.p("results", measure + ".parquet")
        flt = pc.field("image_id").isin(pa.array(ids, pa.int64()))
        if layer is not None:
            flt = flt & (pc.field("layer") == layer)
        return parquet_dataset([path]).to_table(columns=columns, filter=flt)

    def image_rows(self, ids) -> dict[int, dict]:
        """image_id -> {uri, label_name, label, bytes} for a few images."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        t = parquet_dataset(self.run.parquet_files("images")).to_table(
            columns=["image_id", "uri", "label", "label_name", "bytes"],
            filter=pc.field("image_id").isin(pa.array(ids, pa.int64())))
        return {r["image_id"]: r for r in t.to_pylist()}

    def image_rows_light(self, ids: np.ndarray) -> dict[int, tuple[int]]:
        """image_id -> (label,) for many images (no bytes read)."""
        t = parquet_dataset(self.run.parquet_files("images")).to_table(
            columns=["image_id", "label"], filter=pc.field("image_id").isin(pa.array(ids, pa.int64())))
        return {i: (l,) for i, l in zip(t.column("image_id").to_pylist(), t.column("label").to_pylist())}

    def thumbnails_of(self, ids, size: int = 48) -> dict[int, str | None]:
        """image_id -> a data: URI of a small thumbnail (None when the bytes do not decode)."""
        return {i: thumbnail_uri(r.get("bytes"), size) for i, r in self.image_rows(ids).items()}

    @staticmethod
    def thumb(row: dict, size: int = 48) -> str | None:
        return thumbnail_uri(row.get("bytes"), size)

    def result_exists(self, measure: str) -> bool:
        return exists(self.run.p("results", measure + ".parquet"))

    # ---- tables behind the pictures ----------------------------------------------------------
    def confusion(self, against: str, layer: str | None = None) -> tuple[list[int], np.ndarray]:
        """(labels, counts[label, other]) of the labels against the predictions ('pred') or the
        kNN vote of `layer` ('knn', from results/image_agreement)."""
        classes = sorted(self.classes())
        pos = {c: i for i, c in enumerate(classes)}
        if against == "pred":
            t = self.sql("SELECT i.label, p.pred AS other, count(*) AS n FROM predictions p JOIN images i "
                         "USING (image_id) WHERE p.view = 'orig' GROUP BY ALL")
        else:
            path = self.run.p("results", "image_agreement.parquet")
            # read by DuckDB straight from the results file (inside the run: the connection is confined to it)
            t = self.sql("SELECT label, knn_label AS other, count(*) AS n FROM read_parquet(?) WHERE layer = ? "
                         "GROUP BY ALL", [path, layer])
        m = np.zeros((len(classes), len(classes) + 1), np.int64)  # last column: a class the dataset lacks
        for label, other, n in zip(*(t.column(c).to_pylist() for c in ("label", "other", "n"))):
            if label in pos:
                m[pos[label], pos.get(other, len(classes))] += n
        return classes, m

    def histogram(self, layer: str) -> dict[str, pa.Table]:
        t = self.result("distance_histogram")
        if t is None:
            return {}
        t = t.filter(pc.field("layer") == layer)
        return {s: t.filter(pc.field("scope") == s) for s in ("knn", "global") if
                t.filter(pc.field("scope") == s).num_rows}

    def neighbor_lists(self, layer: str, ids) -> dict[int, list[tuple[int, int, float]]]:
        """query_id -> [(rank, neighbor_id, distance)] from the knn view."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        t = self.sql("SELECT query_id, rank, neighbor_id, distance FROM knn WHERE layer = ? AND "
                     "query_id IN (SELECT unnest(?::BIGINT[])) ORDER BY query_id, rank", [layer, ids])
        out: dict[int, list] = {}
        for q, r, nb, d in zip(*(t.column(c).to_pylist() for c in ("query_id", "rank", "neighbor_id", "distance"))):
            out.setdefault(q, []).append((r, nb, d))
        return out

    def predictions_of(self, ids) -> dict[int, tuple[int, float]]:
        """image_id -> (pred, prob) of the original, read through a filter (the predictions view's file)."""
        layers = self.feature_layers()
        if not len(ids) or not layers:
            return {}
        t = parquet_dataset(self.run.parquet_files("features", layer_dir(layers[0]))).to_table(
            columns=["image_id", "pred", "prob"],
            filter=(pc.field("view") == "orig") & pc.field("image_id").isin(pa.array(np.asarray(ids, np.int64))))
        return {i: (p, pr) for i, p, pr in zip(*(t.column(c).to_pylist() for c in ("image_id", "pred", "prob")))}

    def cams(self, ids) -> dict[tuple[int, str], np.ndarray]:
        """(image_id, view) -> the CAM (H, W) of the original's predicted class."""
        ids = [int(i) for i in ids]
        if not ids or not self.run.parquet_files("maps", "cam"):
            return {}
        t = self.sql("SELECT image_id, view, height, width, cam FROM cams WHERE image_id IN (SELECT unnest(?::BIGINT[]))",
                     [ids])
        return {(r["image_id"], r["view"]): np.asarray(r["cam"], np.float32).reshape(r["height"], r["width"])
                for r in t.to_pylist()}

    def stamp(self) -> dict:
        """What the page was made from: a finished report with the same stamp is not redone. The
        results' bytes (the analyze stage rewrites the same bytes when nothing changed), the run's
        fingerprint, which stages are done, how many shards each input folder has, the settings."""
        import hashlib

        from featscope.core.rundir import read_bytes

        from featscope.core.rundir import file_sha256

        from .maps import umap_available

        def digest(f: str) -> str:  # local files in 1 MB chunks (results grow with N); remote ones whole
            return (file_sha256(f) if self.run.local else hashlib.sha256(read_bytes(f)).hexdigest())[:16]

        results = {os.path.basename(f): digest(f) for f in sorted(self.run.parquet_files("results"))}
        stages = sorted(s for s, v in (self.meta.get("stages") or {}).items()
                        if v.get("status") == "done" and s != "report")
        folders = {f: len(self.run.parquet_files(f)) for f in ("images", "errors")}
        folders.update({f"features/{l}": len(self.run.parquet_files("features", layer_dir(l))) for l in self.feature_layers()})
        return {"fingerprint": self.meta.get("fingerprint"), "stages": stages, "results": results, "folders": folders,
                "points": self.points, "thumbnails": self.thumbnails, "queries": self.queries,
                "umap_points": self.umap_points, "seed": self.seed, "umap": umap_available(),
                "versions": _versions()}


def _versions() -> dict:
    """The libraries that draw the page: another version, another page."""
    import importlib.metadata as md

    out = {}
    for pkg in ("featscope", "bokeh", "matplotlib", "umap-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def thumbnail_uri(data: bytes | None, size: int = 48) -> str | None:
    """Image bytes -> a data: URI of a thumbnail no larger than size x size (the smaller of PNG
    and JPEG), or None when the bytes are not an image."""
    import base64

    from PIL import Image

    if not data:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = img.convert("RGB")
        px = np.asarray(img)
        if (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all():
            img = img.convert("L")  # a grey image: a third of the bytes
    except Exception:  # noqa: BLE001 - any undecodable bytes get a placeholder, not a failed report
        return None
    scale = size / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    # smaller images stay as they are: the page scales them up (image-rendering: pixelated)
    best = None
    for fmt, kw in (("PNG", {"optimize": True}), ("JPEG", {"quality": 75, "optimize": True})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        if best is None or buf.tell() < len(best[1]):
            best = (fmt.lower(), buf.getvalue())
    return f"data:image/{best[0]};base64," + base64.b64encode(best[1]).decode()
