"""Local locations: a plain path or a `file://` URI naming a path on this machine.

SRC and RUN may also be any pyarrow / fsspec URI (core/storage.py opens those). A local
path must name the same storage on every node of a cluster: a shared filesystem, or object
storage mounted at the same path everywhere (s3fs / mountpoint-s3, gcsfuse, blobfuse2, rclone).
"""
from __future__ import annotations

from urllib.parse import unquote, urlparse

from .config import UserError


def local_path(location: str, what: str) -> str:
    """`file:///abs/path` -> `/abs/path`; a plain path is returned as it is."""
    if "://" not in location:
        return location
    url = urlparse(location)
    if url.scheme.lower() != "file":
        raise ValueError(f"not a local location: {location}")  # storage.open_location routes the others
    if url.netloc not in ("", "localhost"):
        raise UserError(f"{what} {location}: a file:// URI names a path on this machine (file:///abs/path), "
                        f"not one on host '{url.netloc}'")
    return unquote(url.path)
