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
import sys
import json
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow.fs import FileType

from featscope.core.config import UserError
from featscope.core.storage import Source, check_exists, open_source
from featscope.core.rundir import RunDir, read_table, shard_name, write_table_atomic

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
    source = open_source(src)
    info = check_exists(source)
    if info.type == FileType.File and source.root.endswith(".parquet"):
        return _plan_parquet(source, [(source.root, info.size)], source.root.rsplit("/", 1)[0], shard_size)
    # one recursive listing: names and sizes, no pixels (an http "file" may be a folder's index page)
    try:
        listing = source.listing() if info.type == FileType.Directory or not source.local else []
    except OSError as exc:  # not a folder after all, or unreadable
        if info.type != FileType.File:
            raise UserError(f"data {source.display}: cannot list it ({str(exc).splitlines()[0]})") from None
        listing = []
    if info.type == FileType.File and not listing:
        raise UserError(f"data must be an ImageFolder directory, a Parquet file/folder or builtin:NAME, not {src}")
    files, classes = [], set()
    for entry in listing:
        parts = source.rel(entry.path.rstrip("/")).split("/")
        if entry.type == FileType.Directory:
            if len(parts) == 1 and not parts[0].startswith("."):
                classes.add(parts[0])
        elif entry.type == FileType.File:
            files.append((parts, entry))
            if len(parts) > 1 and not parts[0].startswith("."):
                classes.add(parts[0])  # object stores list no folders of their own
    classes = sorted(classes)
    parquet = sorted((e.path, e.size) for _, e in files if e.path.endswith(".parquet"))
    with_images = {p[0] for p, _ in files if len(p) > 1 and p[-1].lower().endswith(IMAGE_EXTENSIONS)}
    if parquet and not with_images & set(classes):
        return _plan_parquet(source, parquet, source.root, shard_size)
    return _plan_imagefolder(source, classes, files, shard_size)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _plan_imagefolder(source: Source, classes: list[str], files: list, shard_size: int) -> Plan:
    label_of = {c: i for i, c in enumerate(classes)}
    items = []
    for parts, entry in files:
        # class folder / any non-hidden sub-folders / a non-hidden image file
        if len(parts) > 1 and parts[0] in label_of and not any(p.startswith(".") for p in parts[1:]) \
                and parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            items.append(("/".join(parts), label_of[parts[0]], entry.size))
    if not items:
        raise UserError(f"no images found in {source.display} (expected one sub-folder per class holding "
                        f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files)")
    items.sort()
    digest = hashlib.sha256(json.dumps([classes, items]).encode()).hexdigest()[:16]
    shards = [{"kind": "imagefolder", "src": source.location, "classes": classes,
               "items": [(key, label) for key, label, _ in chunk]} for chunk in _chunks(items, shard_size)]
    return Plan("imagefolder", source.display, classes, shards, digest, len(items))


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


def _plan_parquet(source: Source, files: list[tuple[str, int]], root: str, shard_size: int) -> Plan:
    """`files`: (path inside source.fs, size); keys and uris are relative to `root`."""
    shards, sizes, class_names, string_labels, int_labels = [], [], None, set(), set()
    columns = None
    for file, size in files:
        rel = file[len(root.rstrip("/")) + 1:]
        try:
            pf = pq.ParquetFile(source.fs.open_input_file(file))
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{source.uri(source.rel(file)) if file != source.root else source.display}: "
                            f"not a readable Parquet file ({str(exc).splitlines()[0]})") from None
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
        sizes.append((rel, n, size))
        base = rel.rsplit("/", 1)[-1].lower()
        split = next((s for s in ("train", "validation", "test", "val") if base.startswith(s)), None)
        file_uri = source.display if file == source.root else source.uri(source.rel(file))
        for start in range(0, n, shard_size):
            shards.append({"kind": "parquet", "src": source.location, "file": file, "file_uri": file_uri, "rel": rel,
                           "start": start, "stop": min(start + shard_size, n), "image_col": image_col,
                           "label_col": label_col, "split": split})
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
        raise UserError(f"no rows in the Parquet data at {source.display}")
    digest = hashlib.sha256(json.dumps([classes, sizes]).encode()).hexdigest()[:16]
    return Plan("parquet", source.display, classes, shards, digest, sum(n for _, n, _ in sizes))


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
        source, classes = open_source(shard["src"]), shard["classes"]
        for key, label in shard["items"]:
            rec = {"key": key, "uri": source.uri(key), "label_name": classes[label], "split": None}
            try:
                rec["bytes"] = source.read_bytes(key)
            except OSError as exc:
                rec["error"] = BadImage("unreadable_file", str(exc).splitlines()[0] if str(exc) else repr(exc))
            yield rec
    else:
        pf = pq.ParquetFile(open_source(shard["src"]).fs.open_input_file(shard["file"]))
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
            rec = {"key": f"{shard['rel']}#{row_no}", "uri": f"{shard['file_uri']}#{row_no}",
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


def run(run: RunDir, cfg, plan_: Plan, progress, on_ray: bool | None = None) -> dict:
    """Ingest every shard not yet done; returns totals. `progress` wraps an iterable (of futures).

    `on_ray` (default: whether this process is connected to Ray): the shards as Ray tasks, on every
    node of a cluster; else one after another in this process. On one 2-core machine the two take
    about the same time (16,000 PNGs in 4 shards: 1.5-2.6 s as tasks on 2 warm workers, 1.9-3.0 s
    here; benchmarks/RESULTS.md, `## extract`), so the runner starts no Ray for ingest alone."""
    todo = [i for i in range(len(plan_.shards)) if not run.shard_done("ingest", i)]
    done = len(plan_.shards) - len(todo)
    if on_ray is None:
        on_ray = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if on_ray:
        import ray

        task = ray.remote(num_cpus=1)(ingest_shard)
        futures = [task.remote(run.path, i, plan_.shards[i], cfg.max_image_pixels, cfg.min_image_side) for i in todo]
        for _ in progress(futures, "ingest", done):
            pass
    else:
        for i in progress(todo, "ingest", done, len(plan_.shards)):
            ingest_shard(run.path, i, plan_.shards[i], cfg.max_image_pixels, cfg.min_image_side)
    stats = run.read_stats("ingest")
    _check_unique_ids(run)
    return {"shards": len(stats), "redone": len(todo), "rows": sum(s["rows"] for s in stats),
            "errors": sum(s["errors"] for s in stats)}


def _check_unique_ids(run: RunDir) -> None:
    files = run.parquet_files("images")
    if not files:
        return
    ids = pa.concat_arrays([read_table(f, columns=["image_id"]).column(0).combine_chunks() for f in files])
    if len(ids) != len(pc.unique(ids)):
        raise RuntimeError("image_id collision in images/: two inputs share a key hash")
