"""The run directory: paths, atomic writes, per-shard completion markers and run.json.

A shard's files are written to a temporary name and renamed into place (on object storage:
written locally, then uploaded as one object, which appears only when complete), and its stats
file (`stats/<stage>/part-NNNNN.json`) is written last: a shard whose stats file exists is
complete, which is what resume relies on. Nothing half-written is ever visible under a
final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def layer_dir(layer: str) -> str:
    """Directory name for a layer value; ':' kept out of paths for object stores and Windows."""
    return layer.replace(":", "@")


class RunDir:
    """A run: a local directory, or a folder on any pyarrow / fsspec filesystem (core/storage.py).

    `p(...)` names a file of the run: a local path, or for a remote run a URI without the query
    (`s3://bucket/runs/a/images/part-00000.parquet`); the functions below read and write either.
    `path` is what another process reopens the run by (the location as given for a remote run).
    """

    def __init__(self, path: str):
        from . import storage

        self.source = storage.open_location(path, "run directory")
        if not self.source.local:  # reachable, and its bucket there? one line now, not a traceback later
            from .config import UserError

            bucket = self.source.root.split("/", 1)[0] if self.source.display.split("://")[0] in ("s3", "gs", "gcs") else ""
            try:
                missing = self.source.fs.get_file_info(bucket).type == pafs.FileType.NotFound if bucket else False
            except OSError as exc:
                raise UserError(f"run directory {self.source.display}: {str(exc).splitlines()[0]}") from None
            if missing:
                raise UserError(f"run directory {self.source.display}: '{bucket}' does not exist there")
        storage.register(self.source)
        self.local = self.source.local
        self.path = self.source.root if self.local else self.source.location
        self.root = self.source.root if self.local else self.source.display

    def __str__(self) -> str:
        return self.root

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts) if self.local else "/".join((self.root,) + parts)

    # ---- run.json --------------------------------------------------------------------
    def exists(self) -> bool:
        return exists(self.p("run.json"))

    def read_meta(self) -> dict[str, Any]:
        """run.json, {} for a new run; a run.json that cannot be read stops the command (it must
        not pass for a new run: its fingerprint guards the shards already written)."""
        path = self.p("run.json")
        try:
            return json.loads(read_bytes(path))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            if not exists(path):
                return {}
            from .config import UserError

            raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None

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
        return read_json(self.stats_path(stage, index)) is not None

    def write_stats(self, stage: str, index: int, stats: dict[str, Any]) -> None:
        write_json_atomic(self.stats_path(stage, index), stats)

    def read_stats(self, stage: str) -> list[dict[str, Any]]:
        folder = self.p("stats", stage)
        out = [read_json(join(folder, name)) for name in listdir(folder) if name.endswith(".json")]
        return [s for s in out if s is not None]

    def create(self) -> None:
        makedirs(self.root)

    def wipe(self) -> None:
        """--overwrite: remove everything featscope wrote; refuse to delete a foreign folder."""
        if not exists(self.root):
            return
        if listdir(self.root) and not self.exists():
            from .config import UserError

            raise UserError(f"--overwrite refuses to delete {self.root}: it holds no run.json (not a featscope run)")
        if self.local:
            shutil.rmtree(self.root)
        else:
            fs, inside = _remote(self.root)
            if "/" in inside.strip("/"):
                fs.delete_dir(inside)
            else:  # a run at a bucket's root: empty the bucket, keep it
                fs.delete_dir_contents(inside)

    def parquet_files(self, *parts: str) -> list[str]:
        folder = self.p(*parts)
        return [join(folder, f) for f in listdir(folder) if f.endswith(".parquet")]


# ---- file operations on local paths and on the URIs of a remote run -----------------------------
def _remote(path: str):
    from . import storage

    return storage.resolve(path)


def join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if "://" in folder else os.path.join(folder, name)


def exists(path: str) -> bool:
    remote = _remote(path)
    if remote is None:
        return os.path.exists(path)
    fs, inside = remote
    return fs.get_file_info(inside).type != pafs.FileType.NotFound


def listdir(folder: str) -> list[str]:
    """Sorted names in a folder; [] when it does not exist."""
    remote = _remote(folder)
    if remote is None:
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    fs, inside = remote
    infos = fs.get_file_info(pafs.FileSelector(inside, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def getsize(path: str) -> int:
    remote = _remote(path)
    if remote is None:
        return os.path.getsize(path)
    fs, inside = remote
    return fs.get_file_info(inside).size


def file_stamp(path: str) -> tuple[int, int]:
    """(size, modification time in ns): what tells a rewritten file from the one an index was built on."""
    remote = _remote(path)
    if remote is None:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    info = remote[0].get_file_info(remote[1])
    return info.size, info.mtime_ns or 0


def file_sha256(path: str) -> str:
    """A local file's sha256 (weights, checkpoints), read in 1 MB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remove(path: str) -> None:
    remote = _remote(path)
    if remote is None:
        os.remove(path)
    else:
        remote[0].delete_file(remote[1])


def makedirs(path: str) -> None:
    if _remote(path) is None:  # object stores have no folders to make
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    remote = _remote(path)
    if remote is None:
        with open(path, "rb") as fh:
            return fh.read()
    with remote[0].open_input_stream(remote[1]) as fh:
        return fh.read()


def read_schema(path: str) -> pa.Schema:
    """The schema of one Parquet file (its footer only)."""
    remote = _remote(path)
    if remote is None:
        return pq.read_schema(path)
    return pq.read_schema(remote[1], filesystem=remote[0])


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file, or a folder of them."""
    remote = _remote(path)
    if remote is None:
        return pq.read_table(path, columns=columns)
    return pq.read_table(remote[1], columns=columns, filesystem=remote[0])


def parquet_dataset(files: list[str]):
    """pyarrow.dataset over some of the run's Parquet files (for filtered reads)."""
    import pyarrow.dataset as ds

    remote = _remote(files[0]) if files else None
    if remote is None:
        return ds.dataset(files, format="parquet")
    return ds.dataset([_remote(f)[1] for f in files], format="parquet", filesystem=remote[0])


@contextlib.contextmanager
def local_file(path: str):
    """A local path holding the file (a download for a remote run): for faiss and torch readers."""
    remote = _remote(path)
    if remote is None:
        yield path
        return
    fs, inside = remote
    fd, tmp = tempfile.mkstemp(prefix="featscope-", suffix="-" + os.path.basename(inside))
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(inside) as src:
            shutil.copyfileobj(src, out, 1 << 22)
        yield tmp
    finally:
        os.remove(tmp)


TMP_SUFFIX = ".tmp"


def _tmp_name(path: str) -> str:
    # a hidden name that matches no `*.parquet` / `*.json` glob: readers never see partial files
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def remove_stale_temporaries(root: str) -> int:
    """Temporary files left by a killed writer (its shard has no stats file, so it is redone).
    A remote run has none: its files are uploaded whole from local temporaries, and an upload
    a killed writer leaves unfinished never becomes an object."""
    removed = 0
    remote = _remote(root)
    if remote is not None:
        fs, inside = remote
        for info in fs.get_file_info(pafs.FileSelector(inside, recursive=True, allow_not_found=True)):
            if info.is_file and info.base_name.startswith(".") and info.base_name.endswith(TMP_SUFFIX):
                fs.delete_file(info.path)
                removed += 1
        return removed
    for folder, _, files in os.walk(root):
        for f in files:
            if f.startswith(".") and f.endswith(TMP_SUFFIX):
                os.remove(os.path.join(folder, f))
                removed += 1
    return removed


def _upload(tmp: str, path: str) -> None:
    """A finished local file -> its place in a remote run: uploaded under a hidden temporary
    name (matched by no glob), then moved into place (on object stores a server-side copy: the
    final object appears whole). An interrupted upload can leave only the temporary, which the
    next run removes, never a short file under the final name."""
    from .config import UserError

    fs, inside = _remote(path)
    staged = _tmp_name(inside)
    try:
        with open(tmp, "rb") as src, fs.open_output_stream(staged) as out:
            shutil.copyfileobj(src, out, 1 << 22)
        fs.move(staged, inside)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {str(exc).splitlines()[0]}") from None


def write_file_atomic(path: str, write) -> None:
    """`write(tmp_path)` writes the file (torch.save, faiss.write_index, ...); then it is renamed
    into place (uploaded, for a remote run)."""
    remote = _remote(path) is not None
    if remote:
        fd, tmp = tempfile.mkstemp(prefix=".featscope-", suffix=TMP_SUFFIX)
        os.close(fd)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = _tmp_name(os.path.abspath(path))
    try:
        write(tmp)
        if remote:
            _upload(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: str) -> Any:
    """A marker or stats file, or None when it is missing or unreadable (then the work is redone)."""
    try:
        return json.loads(read_bytes(path))
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    write_file_atomic(path, write)


def write_table_atomic(path: str, table: pa.Table) -> None:
    write_file_atomic(path, lambda tmp: pq.write_table(table, tmp))


class AtomicParquetWriter:
    """Stream row groups into a temporary file; `close()` renames it into place (uploads it).

    Used where a shard's output is too large to hold at once (full conv maps of big models).
    If the writer is abandoned (exception), `abort()` removes the temporary file.
    """

    def __init__(self, path: str, schema: pa.Schema):
        self.path, self.schema = path, schema
        if _remote(path) is not None:
            fd, self.tmp = tempfile.mkstemp(prefix=".featscope-", suffix=TMP_SUFFIX)
            os.close(fd)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.tmp = _tmp_name(path)
        self.writer = pq.ParquetWriter(self.tmp, schema)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()
        if _remote(self.path) is not None:
            try:
                _upload(self.tmp, self.path)
            finally:
                os.remove(self.tmp)
        else:
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
