"""SRC and RUN locations: a local path or a `file://` URI, the same on every node.

On a cluster every node reads SRC and writes RUN under the same name, so both must live on
storage all nodes see: a shared filesystem, or object storage mounted at the same path on
every node (s3fs / mountpoint-s3, gcsfuse, blobfuse2, rclone mount). Other URI schemes
(s3://, gs://, ...) are refused with one clear line rather than half supported: the stages
read and write RUN through the local filesystem API and DuckDB reads it by path.
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
        raise UserError(f"{what} {location}: {url.scheme}:// locations are not read directly; {MOUNT_HINT}")
    if url.netloc not in ("", "localhost"):
        raise UserError(f"{what} {location}: a file:// URI names a path on this machine (file:///abs/path), "
                        f"not one on host '{url.netloc}'")
    return unquote(url.path)
