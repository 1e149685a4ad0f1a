"""Ingest: a source (ImageFolder, Hugging Face-style Parquet, builtin:NAME) -> `images/` shards.

The driver plans shards from a sorted listing (cheap: names and sizes, no pixels); Ray tasks
read, validate and convert each shard's images and write `images/part-NNNNN.parquet`
(the `images` table plus the image bytes extract reads), `errors/ingest-part-NNNNN.parquet`
and the shard's stats marker. `image_id` is a 63-bit hash of the image's key: its path
relative to the dataset root (`cat/001.png`, `data/train.parquet#17`, `builtin:digits/00042`),
so the same dataset gets the same ids on every run and every machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import UserError
from pipeline.locations import local_path
from pipeline.rundir import RunDir, shard_name, write_table_atomic

from . import builtin_data
from .images import IMAGE_EXTENSIONS, BadImage, validate

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("uri", pa.string()), ("label", pa.int32()), ("label_name", pa.string()),
    ("split", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("bytes", pa.binary()),
])
ERRORS_SCHEMA = pa.schema([("uri", pa.string()), ("stage", pa.string()), ("error", pa.string()),
                           ("message", pa.string())])


def image_id(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


@dataclass
class Plan:
    kind: str  # imagefolder | parquet | builtin
    root: str
    classes: list[str]
    shards: list[dict]  # small, picklable descriptions of each shard's inputs
    fingerprint: str
    n_inputs: int
    extra: dict = field(default_factory=dict)


# ---- planning ------------------------------------------------------------------------------
def plan(src: str, shard_size: int) -> Plan:
    if src.startswith("builtin:"):
        return _plan_builtin(src, shard_size)
    src = local_path(src, "data")
    if not os.path.exists(src):
        raise UserError(f"data not found: {src}")
    path = os.path.abspath(src)
    if os.path.isfile(path):
        if path.endswith(".parquet"):
            return _plan_parquet([path], os.path.dirname(path), shard_size)
        raise UserError(f"data must be an ImageFolder directory, a Parquet file/folder or builtin:NAME, not {src}")
    parquet = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".parquet"))
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if parquet and not any(_has_images(os.path.join(path, c)) for c in classes):
        return _plan_parquet(parquet, path, shard_size)
    return _plan_imagefolder(path, classes, shard_size)


def _has_images(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _plan_imagefolder(root: str, classes: list[str], shard_size: int) -> Plan:
    items = []
    for label, cls in enumerate(classes):
        for folder, dirs, files in os.walk(os.path.join(root, cls)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for f in files:
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    full = os.path.join(folder, f)
                    items.append((os.path.relpath(full, root).replace(os.sep, "/"), label, os.path.getsize(full)))
    if not items:
        raise UserError(f"no images found in {root} (expected one sub-folder per class holding "
                        f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files)")
    items.sort()
    digest = hashlib.sha256(json.dumps([classes, items]).encode()).hexdigest()[:16]
    shards = [{"kind": "imagefolder", "root": root, "classes": classes,
               "items": [(key, label) for key, label, _ in chunk]} for chunk in _chunks(items, shard_size)]
    return Plan("imagefolder", root, classes, shards, digest, len(items))


_IMAGE_COLUMNS = ("image", "img", "image_bytes", "bytes", "png", "jpg")
_LABEL_COLUMNS = ("label", "labels", "class", "target", "fine_label")


def _parquet_columns(schema: pa.Schema, file: str) -> tuple[str, str]:
    names = schema.names
    image_col = next((c for c in _IMAGE_COLUMNS if c in names), None)
    if image_col is None:
        image_col = next((f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
                          or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)), None)
    label_col = next((c for c in _LABEL_COLUMNS if c in names), None)
    if image_col is None:
        raise UserError(f"{file}: no image column (binary, or struct{{bytes, path}}) among {names}")
    if label_col is None:
        raise UserError(f"{file}: no label column (one of {', '.join(_LABEL_COLUMNS)}) among {names}")
    return image_col, label_col


def _hf_class_names(schema: pa.Schema, label_col: str) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][label_col]
        return [str(n) for n in feature["names"]] if feature.get("_type") == "ClassLabel" else None
    except (KeyError, TypeError, ValueError):
        return None


def _plan_parquet(files: list[str], root: str, shard_size: int) -> Plan:
    shards, sizes, class_names, string_labels, int_labels = [], [], None, set(), set()
    columns = None
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{file}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        schema = pf.schema_arrow
        image_col, label_col = _parquet_columns(schema, file)
        columns = columns or (image_col, label_col)
        class_names = class_names or _hf_class_names(schema, label_col)
        labels = pf.read(columns=[label_col]).column(0)
        if pa.types.is_integer(labels.type):
            int_labels.update(int(v) for v in labels.drop_null().to_pylist())
        else:
            string_labels.update(str(v) for v in labels.drop_null().to_pylist())
        n = pf.metadata.num_rows
        sizes.append((os.path.relpath(file, root), n, os.path.getsize(file)))
        rel = os.path.relpath(file, root).replace(os.sep, "/")
        base = os.path.basename(file).lower()
        split = next((s for s in ("train", "validation", "test", "val") if base.startswith(s)), None)
        for start in range(0, n, shard_size):
            shards.append({"kind": "parquet", "file": file, "rel": rel, "start": start,
                           "stop": min(start + shard_size, n), "image_col": image_col, "label_col": label_col,
                           "split": split})
    if string_labels:
        classes = sorted(string_labels | {str(v) for v in int_labels})
    elif class_names:
        classes = class_names
    else:
        classes = [str(v) for v in range(max(int_labels, default=-1) + 1)]
    for s in shards:
        s["classes"] = classes
        s["string_labels"] = bool(string_labels)
    if not shards:
        raise UserError(f"no rows in the Parquet data at {root}")
    digest = hashlib.sha256(json.dumps([classes, sizes]).encode()).hexdigest()[:16]
    return Plan("parquet", root, classes, shards, digest, sum(n for _, n, _ in sizes))


def _plan_builtin(src: str, shard_size: int) -> Plan:
    try:
        name, opts = builtin_data.parse_builtin(src)
    except ValueError:
        raise UserError(f"cannot read the options of {src} (expected builtin:NAME?key=int&...)") from None
    if name not in builtin_data.BUILTINS:
        raise UserError(f"unknown builtin dataset '{name}' (known: {', '.join(builtin_data.BUILTINS)})")
    n = builtin_data.builtin_size(name, opts)
    classes = builtin_data.builtin_classes(name)
    shards = [{"kind": "builtin", "name": name, "opts": opts, "start": s, "stop": min(s + shard_size, n),
               "classes": classes} for s in range(0, n, shard_size)]
    digest = hashlib.sha256(f"{name}:{sorted(opts.items())}".encode()).hexdigest()[:16]
    return Plan("builtin", src, classes, shards, digest, n)


# ---- one shard -----------------------------------------------------------------------------
def _records(shard: dict):
    """Yield dicts with key, uri, label_name, split and bytes (or an `error` instead of bytes)."""
    kind = shard["kind"]
    if kind == "builtin":
        yield from builtin_data.builtin_records(shard["name"], shard["opts"], shard["start"], shard["stop"])
    elif kind == "imagefolder":
        root, classes = shard["root"], shard["classes"]
        for key, label in shard["items"]:
            path = os.path.join(root, key)
            rec = {"key": key, "uri": path, "label_name": classes[label], "split": None}
            try:
                with open(path, "rb") as fh:
                    rec["bytes"] = fh.read()
            except OSError as exc:
                rec["error"] = BadImage("unreadable_file", str(exc))
            yield rec
    else:
        pf = pq.ParquetFile(shard["file"])
        image_col, label_col = shard["image_col"], shard["label_col"]
        cols = [image_col, label_col] + (["split"] if "split" in pf.schema_arrow.names else [])
        # read only the row groups that hold [start, stop)
        groups, offset, first = [], 0, None
        for g in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            if offset + rows > shard["start"] and offset < shard["stop"]:
                groups.append(g)
                first = offset if first is None else first
            offset += rows
        table = pf.read_row_groups(groups, columns=cols).slice(shard["start"] - first, shard["stop"] - shard["start"])
        classes = shard["classes"]
        for i, row in enumerate(table.to_pylist()):
            row_no = shard["start"] + i
            value, label = row[image_col], row[label_col]
            data = value.get("bytes") if isinstance(value, dict) else value
            if label is None:
                label_name = None
            elif shard["string_labels"] or isinstance(label, str):
                label_name = str(label)
            else:
                label_name = classes[int(label)] if 0 <= int(label) < len(classes) else None
            rec = {"key": f"{shard['rel']}#{row_no}", "uri": f"{shard['file']}#{row_no}",
                   "label_name": label_name, "split": row.get("split") or shard["split"], "bytes": data}
            if label_name is None:
                rec["error"] = BadImage("bad_label", f"label {label!r} is missing or outside the class list")
            elif data is None:
                rec["error"] = BadImage("empty_file", "image bytes are null")
            yield rec


def ingest_shard(run_path: str, index: int, shard: dict, max_pixels: int, min_side: int) -> dict:
    start = time.perf_counter()
    run = RunDir(run_path)
    class_index = {c: i for i, c in enumerate(shard["classes"])}
    rows = {name: [] for name in IMAGES_SCHEMA.names}
    errors = {name: [] for name in ERRORS_SCHEMA.names}
    for rec in _records(shard):
        err = rec.get("error")
        if err is None:
            try:
                data, width, height = validate(rec["bytes"], max_pixels, min_side)
            except BadImage as exc:
                err = exc
        if err is not None:
            for k, v in (("uri", rec["uri"]), ("stage", "ingest"), ("error", err.error), ("message", err.message)):
                errors[k].append(v)
            continue
        for k, v in (("image_id", image_id(rec["key"])), ("uri", rec["uri"]),
                     ("label", class_index[rec["label_name"]]), ("label_name", rec["label_name"]),
                     ("split", rec["split"]), ("width", width), ("height", height), ("bytes", data)):
            rows[k].append(v)
    name = shard_name(index)
    write_table_atomic(run.p("images", name + ".parquet"), pa.table(rows, schema=IMAGES_SCHEMA))
    if errors["uri"]:
        write_table_atomic(run.p("errors", f"ingest-{name}.parquet"), pa.table(errors, schema=ERRORS_SCHEMA))
    stats = {"shard": index, "rows": len(rows["image_id"]), "errors": len(errors["uri"]),
             "seconds": round(time.perf_counter() - start, 3)}
    run.write_stats("ingest", index, stats)
    return stats


def run(run: RunDir, cfg, plan_: Plan, progress) -> dict:
    """Ingest every shard not yet done; returns totals. `progress` wraps an iterable of futures."""
    import ray

    todo = [i for i in range(len(plan_.shards)) if not run.shard_done("ingest", i)]
    task = ray.remote(num_cpus=1)(ingest_shard)
    futures = [task.remote(run.path, i, plan_.shards[i], cfg.max_image_pixels, cfg.min_image_side) for i in todo]
    for _ in progress(futures, "ingest", len(plan_.shards) - len(todo)):
        pass
    stats = run.read_stats("ingest")
    _check_unique_ids(run)
    return {"shards": len(stats), "redone": len(todo), "rows": sum(s["rows"] for s in stats),
            "errors": sum(s["errors"] for s in stats)}


def _check_unique_ids(run: RunDir) -> None:
    files = run.parquet_files("images")
    if not files:
        return
    ids = pa.concat_arrays([pq.read_table(f, columns=["image_id"]).column(0).combine_chunks() for f in files])
    if len(ids) != len(pc.unique(ids)):
        raise RuntimeError("image_id collision in images/: two inputs share a key hash")
