"""SRC on any filesystem: a local path, a `file://` URI, or any pyarrow / fsspec filesystem URI.

pyarrow's own filesystems come first (`s3://`, `gs://`, `hdfs://`, `abfs://`, ...: C++ clients
with ranged reads, picklable to Ray workers); any other scheme goes through fsspec
(`fsspec.core.url_to_fs`, e.g. `az://`, `http(s)://`, `ssh://`, `memory://` when its
package is installed), wrapped as a pyarrow filesystem. Filesystem options travel in the URI's
query as pyarrow defines them (`s3://bucket/data?region=eu-west-1&endpoint_override=host:9000`);
credentials come from the environment as each client reads it (AWS_ACCESS_KEY_ID, ...), never
from the URI: the data location is written into run.json.

Only ingest reads SRC: it copies each image's bytes into the run's `images/` shards, so the
later stages read the run, never the source.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlparse

import pyarrow.fs as pafs

from .config import UserError
from .locations import local_path

# query parameters pyarrow would accept as credentials: refused, they would land in run.json
_SECRET_PARAMS = ("access_key", "secret_key", "session_token", "account_key", "sas_token", "client_secret")


@dataclass(frozen=True)
class Source:
    """An opened SRC: `fs` and `root` (a path inside fs) read it; `uri(rel)` names a file in it."""

    location: str  # as given (with its query): what the workers reopen
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
        """Every file and folder under the root (recursive; one paged LIST on object stores)."""
        return self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))


def is_uri(location: str) -> bool:
    return "://" in location


@functools.lru_cache(maxsize=16)
def open_source(location: str) -> Source:
    """Open SRC (cached per process: every Ray task of a shard reopens it by its string)."""
    if not is_uri(location) or location.lower().startswith("file://"):
        path = os.path.abspath(local_path(location, "data"))
        return Source(location, pafs.LocalFileSystem(), path, path)
    url = urlparse(location)
    secrets = [k for k, _ in parse_qsl(url.query) if k.lower() in _SECRET_PARAMS]
    if secrets:
        raise UserError(f"data {location.split('?')[0]}: '{secrets[0]}' in the URI would be written into run.json; "
                        f"give credentials through the environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    display = url._replace(query="", fragment="").geturl()
    try:
        fs, root = pafs.FileSystem.from_uri(location)
    except ValueError as exc:  # pyarrow.lib.ArrowInvalid
        if "Unrecognized filesystem type" not in str(exc):
            raise UserError(f"data {display}: {str(exc).splitlines()[0]}") from None
        fs, root = _fsspec(location, display)
    except OSError as exc:  # e.g. a bucket's region cannot be resolved
        raise UserError(f"data {display}: {str(exc).splitlines()[0]}") from None
    return Source(location, fs, root.rstrip("/"), display.rstrip("/"))


def _fsspec(location: str, display: str) -> tuple[pafs.FileSystem, str]:
    try:
        import fsspec
        import fsspec.core
    except ImportError:
        raise UserError(f"data {display}: pyarrow has no filesystem for {urlparse(location).scheme}:// "
                        f"and fsspec is not installed") from None
    try:
        fs, root = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as exc:  # unknown protocol, or its package missing
        raise UserError(f"data {display}: no pyarrow or fsspec filesystem for {urlparse(location).scheme}:// "
                        f"({str(exc).splitlines()[0]})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root


def check_exists(src: Source) -> pafs.FileInfo:
    """The root's FileInfo; 'data not found' as one line when it is missing or unreachable."""
    try:
        info = src.fs.get_file_info(src.root)
    except OSError as exc:
        raise UserError(f"data {src.display}: {str(exc).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"data not found: {src.display}")
    return info
