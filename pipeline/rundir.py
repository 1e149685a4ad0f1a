"""The run directory: paths, atomic writes, per-shard completion markers and run.json.

A shard's files are written to a temporary name and renamed into place, and its stats file
(`stats/<stage>/part-NNNNN.json`) is written last: a shard whose stats file exists is
complete, which is what resume relies on. Nothing half-written is ever visible under a
final name.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def layer_dir(layer: str) -> str:
    """Directory name for a layer value; ':' kept out of paths for object stores and Windows."""
    return layer.replace(":", "@")


class RunDir:
    def __init__(self, path: str):
        from .locations import local_path

        self.path = os.path.abspath(local_path(path, "run directory"))

    def __str__(self) -> str:
        return self.path

    def p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # ---- run.json --------------------------------------------------------------------
    def exists(self) -> bool:
        return os.path.exists(self.p("run.json"))

    def read_meta(self) -> dict[str, Any]:
        try:
            with open(self.p("run.json")) as fh:
                return json.load(fh)
        except FileNotFoundError:
            return {}

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json_atomic(self.p("run.json"), meta)

    def update_stage(self, stage: str, **status: Any) -> None:
        meta = self.read_meta()
        meta.setdefault("stages", {}).setdefault(stage, {}).update(status)
        self.write_meta(meta)

    # ---- shard markers -------------------------------------------------------------
    def stats_path(self, stage: str, index: int) -> str:
        return self.p("stats", stage, shard_name(index) + ".json")

    def shard_done(self, stage: str, index: int) -> bool:
        return os.path.exists(self.stats_path(stage, index))

    def write_stats(self, stage: str, index: int, stats: dict[str, Any]) -> None:
        write_json_atomic(self.stats_path(stage, index), stats)

    def read_stats(self, stage: str) -> list[dict[str, Any]]:
        folder = self.p("stats", stage)
        if not os.path.isdir(folder):
            return []
        out = []
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                with open(os.path.join(folder, name)) as fh:
                    out.append(json.load(fh))
        return out

    def wipe(self) -> None:
        """--overwrite: remove everything featscope wrote; refuse to delete a foreign folder."""
        if not os.path.exists(self.path):
            return
        if os.listdir(self.path) and not self.exists():
            from .config import UserError

            raise UserError(f"--overwrite refuses to delete {self.path}: it holds no run.json (not a featscope run)")
        shutil.rmtree(self.path)

    def parquet_files(self, *parts: str) -> list[str]:
        folder = self.p(*parts)
        if not os.path.isdir(folder):
            return []
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))


TMP_SUFFIX = ".tmp"


def _tmp_name(path: str) -> str:
    # a hidden name that matches no `*.parquet` / `*.json` glob: readers never see partial files
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def remove_stale_temporaries(root: str) -> int:
    """Temporary files left by a killed writer (its shard has no stats file, so it is redone)."""
    removed = 0
    for folder, _, files in os.walk(root):
        for f in files:
            if f.startswith(".") and f.endswith(TMP_SUFFIX):
                os.remove(os.path.join(folder, f))
                removed += 1
    return removed


def write_file_atomic(path: str, write) -> None:
    """`write(tmp_path)` writes the file (torch.save, faiss.write_index, ...); then it is renamed into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(os.path.abspath(path))
    try:
        write(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    """A marker or stats file, or None when it is missing or unreadable (then the work is redone)."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def write_table_atomic(path: str, table: pa.Table) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_name(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class AtomicParquetWriter:
    """Stream row groups into a temporary file; `close()` renames it into place.

    Used where a shard's output is too large to hold at once (full conv maps of big models).
    If the writer is abandoned (exception), `abort()` removes the temporary file.
    """

    def __init__(self, path: str, schema: pa.Schema):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.schema = path, schema
        self.tmp = _tmp_name(path)
        self.writer = pq.ParquetWriter(self.tmp, schema)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
