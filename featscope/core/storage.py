"""SRC and RUN on any filesystem: a local path, a `file://` URI, or any pyarrow / fsspec URI.

pyarrow's own filesystems come first (`s3://`, `gs://`, `hdfs://`, `abfs://`, ...: C++ clients
with ranged reads, picklable to Ray workers); any other scheme goes through fsspec
(`fsspec.core.url_to_fs`, e.g. `http(s)://`, `az://`, `ssh://` when its package is
installed), wrapped as a pyarrow filesystem. Filesystem options travel in the URI's
query as pyarrow defines them (`s3://bucket/data?region=eu-west-1&endpoint_override=host:9000`);
credentials come from the environment as each client reads it (AWS_ACCESS_KEY_ID, ...), never
from the URI: the data location is written into run.json.

Only ingest reads SRC: it copies each image's bytes into the run's `images/` shards, so the
later stages read the run, never the source. RUN on such a URI is opened once per process
(`RunDir`), which registers its root here: from then on the run's paths are plain URIs without
the query (`s3://bucket/runs/a/images/part-00000.parquet`, what DuckDB reads too) and
`resolve(path)` gives the filesystem and the path inside it (core/rundir.py does the I/O).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlparse

import pyarrow.fs as pafs

from .config import UserError
from .locations import local_path

# query parameters pyarrow would accept as credentials: refused, they would land in run.json
_SECRET_PARAMS = ("access_key", "secret_key", "session_token", "account_key", "sas_token", "client_secret")


@dataclass(frozen=True)
class Source:
    """An opened SRC: `fs` and `root` (a path inside fs) read it; `uri(rel)` names a file in it."""

    location: str  # what the workers reopen: a URI as given (with its query), or an absolute path
    fs: pafs.FileSystem
    root: str
    display: str  # the root as a user reads it: a local path, or the URI without its query

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def rel(self, path: str) -> str:
        return path[len(self.root.rstrip("/")) + 1:]

    def uri(self, rel: str) -> str:
        return os.path.join(self.display, rel) if self.local else f"{self.display.rstrip('/')}/{quote(rel)}"

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read()

    def listing(self) -> list[pafs.FileInfo]:
        """Every file and folder under the root (recursive; one paged LIST on object stores).
        Locally symlinked folders are not descended (a link to `..` would loop), except the
        class folders right under the root, as `os.walk` of each class folder did before."""
        if not self.local:
            return self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
        out, tops = [], [self.root]
        for entry in os.scandir(self.root):
            if entry.is_dir() and entry.is_symlink():
                out.append(pafs.FileInfo(entry.path, pafs.FileType.Directory))
                tops.append(entry.path)
        for top in tops:
            for folder, dirs, files in os.walk(top):
                out += [pafs.FileInfo(os.path.join(folder, d), pafs.FileType.Directory) for d in dirs]
                for f in files:
                    path = os.path.join(folder, f)
                    try:
                        out.append(pafs.FileInfo(path, pafs.FileType.File, size=os.path.getsize(path)))
                    except OSError:  # a broken link: not an input
                        pass
        return out


def is_uri(location: str) -> bool:
    return "://" in location


@functools.lru_cache(maxsize=16)
def open_source(location: str) -> Source:
    """Open SRC (cached per process: every Ray task of a shard reopens it by its string)."""
    return open_location(location, "data")


def open_location(location: str, what: str) -> Source:
    """A local path / file:// URI, or a pyarrow or fsspec URI; `what` names it in errors."""
    if not is_uri(location) or location.lower().startswith("file://"):
        path = os.path.abspath(local_path(location, what))  # absolute: workers have other working dirs
        return Source(path, pafs.LocalFileSystem(), path, path)
    url = urlparse(location)
    if url.password or (url.username and url.scheme.lower() in ("s3", "gs", "gcs", "abfs", "abfss")):
        raise UserError(f"{what} {url.scheme}://{url.hostname or ''}{url.path}: credentials in the URI would be "
                        f"written into run.json; give them through the environment (e.g. AWS_ACCESS_KEY_ID / "
                        f"AWS_SECRET_ACCESS_KEY)")
    secrets = [k for k, _ in parse_qsl(url.query) if k.lower() in _SECRET_PARAMS]
    if secrets:
        raise UserError(f"{what} {location.split('?')[0]}: '{secrets[0]}' in the URI would be written into run.json; "
                        f"give credentials through the environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    display = url._replace(query="", fragment="").geturl()
    try:
        fs, root = pafs.FileSystem.from_uri(location)
    except ValueError as exc:  # pyarrow.lib.ArrowInvalid
        if "Unrecognized filesystem type" not in str(exc):
            raise UserError(f"{what} {display}: {str(exc).splitlines()[0]}") from None
        fs, root = _fsspec(location, display, what)
    except OSError as exc:  # e.g. a bucket's region cannot be resolved
        raise UserError(f"{what} {display}: {str(exc).splitlines()[0]}") from None
    if isinstance(fs, pafs.LocalFileSystem):  # e.g. local:///abs/path: a local path after all
        return Source(root, fs, root, root)
    return Source(location, fs, root.rstrip("/"), display.rstrip("/"))


def _fsspec(location: str, display: str, what: str) -> tuple[pafs.FileSystem, str]:
    try:
        import fsspec
        import fsspec.core
    except ImportError:
        raise UserError(f"{what} {display}: pyarrow has no filesystem for {urlparse(location).scheme}:// "
                        f"and fsspec is not installed") from None
    url = urlparse(location)  # URIs are percent-encoded (pyarrow decodes them); fsspec takes raw paths
    target = f"{url.scheme}://{url.netloc}{unquote(url.path)}" + (f"?{url.query}" if url.query else "")
    try:
        fs, root = fsspec.core.url_to_fs(target)
    except (ImportError, ValueError) as exc:  # unknown protocol, or its package missing
        raise UserError(f"{what} {display}: no pyarrow or fsspec filesystem for {urlparse(location).scheme}:// "
                        f"({str(exc).splitlines()[0]})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root


# ---- RUN roots registered in this process ---------------------------------------------------
_ROOTS: dict[str, Source] = {}  # display root (URI without query) -> the opened location


def register(source: Source) -> None:
    if not source.local:
        _ROOTS[source.display] = source


def resolve(path: str) -> tuple[pafs.FileSystem, str] | None:
    """(filesystem, path inside it) for a path under a registered remote root; None for local paths."""
    if "://" not in path:
        return None
    for display, source in sorted(_ROOTS.items(), key=lambda kv: -len(kv[0])):  # the longest root first
        if path == display or path.startswith(display + "/"):
            return source.fs, source.root + path[len(display):]
    raise RuntimeError(f"{path}: no run opened in this process holds this URI")  # a bug, not user input


def fsspec_for_duckdb(source: Source):
    """The run's filesystem as fsspec, for DuckDB's `register_filesystem`: DuckDB then reads the
    run's URIs itself, with no `httpfs` extension (which would need a network install)."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    scheme = source.display.split("://", 1)[0]

    class RunFS(ArrowFSWrapper):
        protocol = scheme

        @classmethod
        def _strip_protocol(cls, path):
            path = path[0] if isinstance(path, list) else path
            prefix = f"{scheme}://"
            path = path[len(prefix):] if path.startswith(prefix) else path
            return _inside(source, prefix + path).rstrip("/")

    return RunFS(source.fs)


def _inside(source: Source, uri: str) -> str:
    return source.root + uri[len(source.display):] if uri.startswith(source.display) else uri.split("://", 1)[-1]


def check_exists(src: Source) -> pafs.FileInfo:
    """The root's FileInfo; 'data not found' as one line when it is missing or unreachable."""
    try:
        info = src.fs.get_file_info(src.root)
    except OSError as exc:
        raise UserError(f"data {src.display}: {str(exc).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"data not found: {src.display}")
    return info
