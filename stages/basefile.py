"""A layer's base set as a local scratch file, read through a memory map: the index and kNN
stages' ANN path streams N x d vectors instead of holding them in RAM beside the index.

`BaseFile.write` copies the `orig` vectors of a layer's Parquet shards (one shard in memory at a
time, through `vectors.orig_rows`; cosine rows normalised by `vectors.unit_rows`, as `load_base`
does) into a float32 file under the machine's temp dir (`TMPDIR`), maps it privately and unlinks
it at once: the mapping stays valid, and the file's disk space is freed when the process ends,
however it ends (a killed Ray actor leaves nothing behind). Each process that needs the base
makes its own copy from the run directory, so a worker on another node never depends on the
driver's disk.

Pages read through a map count in the process's resident memory until they are dropped, so the
readers call `release()` after each block (`madvise(MADV_DONTNEED)`: the pages leave the
process, the kernel keeps them in its page cache while memory allows). Measured in
benchmarks/RESULTS.md, `## knn`, memory against N.
"""
from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np

from featscope.core.config import UserError
from featscope.core.rundir import RunDir

from .vectors import feature_files, orig_rows, unit_rows


def return_freed_memory() -> None:
    """Hand the C heap's and Arrow's free pages back to the system (glibc `malloc_trim`).

    A FAISS index built and freed in the driver stays in its resident memory otherwise (glibc
    keeps freed heap for reuse), and the kNN actor then loads its own copy: twice the index at
    the stages' peak. A no-op where the C library has no malloc_trim."""
    import ctypes
    import ctypes.util

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class BaseFile:
    """(ids [N] int64 in RAM, rows [N, d] float32 through a private read-only-in-use map)."""

    def __init__(self, ids: np.ndarray, rows: np.ndarray, mm: mmap.mmap | None, fd: int | None = None):
        self.ids, self.rows, self._mm, self._fd = ids, rows, mm, fd

    @classmethod
    def write(cls, run: RunDir, features: str, metric: str, scratch_dir: str | None = None) -> "BaseFile":
        files = feature_files(run, features)
        scratch_dir = scratch_dir or tempfile.gettempdir()
        ids, dim, n, fd = [], None, 0, None
        try:
            fd, path = tempfile.mkstemp(prefix="featscope-base-", suffix=".f32", dir=scratch_dir)
            os.unlink(path)  # nothing to clean up later: the space goes with the last descriptor
            with os.fdopen(fd, "wb", closefd=False) as out:
                for file_ids, vecs in orig_rows(files):
                    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
                    if metric == "cosine":  # load_base's arithmetic, row by row the same bits
                        vecs = unit_rows(vecs)
                    dim = vecs.shape[1]
                    out.write(memoryview(vecs).cast("B"))
                    ids.append(file_ids)
                    n += len(vecs)
            if n == 0:
                raise UserError(f"layer '{features}' has no vectors with view 'orig' in {run.root}")
            mm = mmap.mmap(fd, n * dim * 4, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException as exc:
            if fd is not None:
                os.close(fd)
            if isinstance(exc, OSError):
                raise UserError(f"cannot write the scratch copy of layer '{features}' ({n} vectors so far) in "
                                f"{scratch_dir}: {exc.strerror or exc}; point TMPDIR at a disk with room") from None
            raise
        import pyarrow as pa

        pa.default_memory_pool().release_unused()  # the shards' read buffers (mimalloc keeps them otherwise)
        rows = np.frombuffer(mm, dtype=np.float32).reshape(n, dim)
        return cls(np.concatenate(ids).astype(np.int64, copy=False), rows, mm, fd)  # fd: for gather's preads

    def gather(self, pos: np.ndarray) -> np.ndarray:
        """rows[pos] for positions of any shape, by one pread per row (not through the map).

        Page cache folios here are 2 MB (transparent huge pages), and a fault maps a whole
        folio: one fancy index of a kNN block's ~22,000 random candidate rows through the map
        mapped the entire file into the process until the release (measured: 2 MB per row
        read alone, 244 kB per row over 2048 random rows of a 0.5 GB file; MADV_RANDOM and
        MADV_NOHUGEPAGE change nothing). pread copies only the rows: ~37 ms per 2048 x 11 rows."""
        flat = np.asarray(pos, dtype=np.int64).ravel()
        d = self.rows.shape[1]
        row = 4 * d
        data = b"".join([os.pread(self._fd, row, at) for at in (flat * row).tolist()])
        return np.frombuffer(data, np.float32).reshape(*np.shape(pos), d)

    def release(self) -> None:
        """Drop the pages read so far from this process's memory (they stay in the file)."""
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.rows = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view still exported (a caller keeps rows); freed with it
                pass
            self._mm = None
