"""RUN locations (and local SRC): a local path or a `file://` URI, the same on every node.

SRC may also be any pyarrow / fsspec URI (pipeline/storage.py): only ingest reads it. RUN is
written by every stage on every node and read by DuckDB by path, so it must live on storage all
nodes see under the same name: a shared filesystem, or object storage mounted at the same path
on every node (s3fs / mountpoint-s3, gcsfuse, blobfuse2, rclone mount). Other schemes for RUN
(s3://, gs://, ...) are refused with one clear line rather than half supported.
"""
from __future__ import annotations

from urllib.parse import unquote, urlparse

from .config import UserError

MOUNT_HINT = ("mount it at the same path on every node (s3fs or mountpoint-s3, gcsfuse, blobfuse2, rclone mount, "
              "NFS) and give that path")


def local_path(location: str, what: str) -> str:
    """`file:///abs/path` -> `/abs/path`; a plain path is returned as it is; other schemes: UserError."""
    if "://" not in location:
        return location
    url = urlparse(location)
    if url.scheme.lower() != "file":
        raise UserError(f"{what} {location}: {url.scheme}:// is not written directly (only data is read from such "
                        f"URIs); {MOUNT_HINT}")
    if url.netloc not in ("", "localhost"):
        raise UserError(f"{what} {location}: a file:// URI names a path on this machine (file:///abs/path), "
                        f"not one on host '{url.netloc}'")
    return unquote(url.path)
