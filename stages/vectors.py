"""Vectors shared by the index, kNN and lookup code: loading a layer's base set, the metric
conventions, and the exact blocked top-k search.

Distance convention (shared with the SQL measures): `l2` = Euclidean distance (the square
root, not FAISS's squared L2) = DuckDB `array_distance`; `cosine` = 1 - cosine similarity =
DuckDB `array_cosine_distance`. Cosine vectors are L2-normalised once, so cosine search is an
inner-product search.

Exact search is blocked torch matmul + a two-stage top-k (`member_columns`: minima of
interleaved groups, then only the best groups' members, merged into a running top-k). Two
forms: `exact_candidates` (a block of queries against the whole base: the per-shard path, any
queries) and `self_join_candidates` (the base against itself, computing only the upper
triangle of the symmetric score matrix and feeding each tile to both sides: half the matmul).
For L2 the ranking score is ||b||^2 - 2 q.b per query block (`addmm` fuses the bias add), and
||a||^2 + ||b||^2 - 2 a.b in the self-join (both sides rank by it; its tiles go to torch's or
numpy's BLAS, whichever the first tiles show faster on this machine: `TileGemm`); the distances of the k
neighbours found are then recomputed directly, which is exact where the expanded form cancels
badly (a vector against itself). Figures: benchmarks/RESULTS.md, `## knn`.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pyarrow.compute as pc

from featscope.core.config import UserError
from featscope.core.rundir import RunDir, layer_dir, read_table

DISTANCE_NOTE = {"l2": "Euclidean distance (sqrt of squared L2) = DuckDB array_distance",
                 "cosine": "1 - cosine similarity = DuckDB array_cosine_distance"}
Q_BLOCK, B_CHUNK = 2048, 16384  # 2048 x 16384 float32 scores = 128 MB; measured flat above ~1024 x 8192
# the symmetric self-join's tiles: taller than Q_BLOCK because each column's share of the top-k work
# is the same however many rows it spans (4096 x 16384 measured ~5% faster than 2048 x 16384)
SYM_ROWS, SYM_COLS = 4096, 16384
GROUP, COL_GROUP = 16, 16  # scores per group in the first stage of member_columns / member_rows
GEMM_TRIALS = 2  # full-size self-join tiles each BLAS computes before the faster one takes the rest (TileGemm)
# where numpy's BLAS may compute the self-join's tiles (TileGemm): OpenBLAS's threads then stop
# spinning at once after a call instead of taking the cores from torch's top-k for ~0.1 s (read
# when numpy loads, so it is set in the kNN actor's environment from its start)
NUMPY_BLAS_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4"}


def feature_files(run: RunDir, features: str) -> list[str]:
    files = run.parquet_files("features", layer_dir(features))
    if not files:
        raise UserError(f"no features for layer '{features}' in {run.root}: run the extract stage first")
    return files


def vec_matrix(t) -> np.ndarray:
    """A table's `vec` column (fixed-size lists) as one (rows, dim) array, without Python rows."""
    col = t.column("vec").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, col.type.list_size)


def count_orig(files: list[str]) -> list[int]:
    """Rows with view 'orig' per features file (reads the `view` column only)."""
    return [int(pc.sum(pc.equal(read_table(f, columns=["view"]).column("view"), "orig")).as_py() or 0)
            for f in files]


def orig_rows(files: list[str], counts: list[int] | None = None):
    """(image_id int64 [m], vectors [m, d]) of each file's `orig` rows, one file in memory at a
    time, in file order; files without any are skipped (unread where `counts` says so). The one
    reading of a layer's base: `load_base` fills RAM from it, `basefile.BaseFile` a scratch file."""
    for i, f in enumerate(files):
        if counts is not None and counts[i] == 0:
            continue
        t = read_table(f, columns=["image_id", "view", "vec"])
        t = t.filter(pc.equal(t.column("view"), "orig"))
        if t.num_rows:
            yield t.column("image_id").to_numpy(), vec_matrix(t)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """x's rows divided by their L2 norms (a zero row stays zero): the cosine preparation, the
    same arithmetic wherever a base or a query is prepared, so their bits agree."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def load_base(run: RunDir, features: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(image_id int64 [N], vectors float32 [N, d]) of the `orig` views, in shard order.

    Filled in place into one array sized by a first pass over the `view` column: concatenating
    per-file arrays held the base twice at its peak (benchmarks/RESULTS.md, knn memory)."""
    files = feature_files(run, features)
    counts = count_orig(files)
    n = sum(counts)
    if n == 0:
        raise UserError(f"layer '{features}' has no vectors with view 'orig' in {run.root}")
    ids, base, pos = np.empty(n, np.int64), None, 0
    for file_ids, vecs in orig_rows(files, counts):
        if base is None:
            base = np.empty((n, vecs.shape[1]), np.float32)
        base[pos:pos + len(vecs)] = vecs
        ids[pos:pos + len(vecs)] = file_ids
        pos += len(vecs)
    if metric == "cosine":  # prepare()'s arithmetic (twins compare against it), in blocks
        for lo in range(0, n, 65536):  # np.linalg.norm's x * x temporary: a block, not the base
            base[lo:lo + 65536] = unit_rows(base[lo:lo + 65536])
    return ids, base


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """Cosine vectors are unit-normalised (a zero vector stays zero); L2 vectors are used as they are."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        x = unit_rows(x)
    return x.astype(np.float32, copy=False)


def base_signature(run: RunDir, features: str, metric: str) -> str:
    """Identity of a layer's base set without reading it: its files' names, sizes and mtimes.

    Resume compares it, so an index or kNN shard is redone when the features were rewritten.
    """
    from featscope.core.rundir import file_stamp

    h = hashlib.sha256(f"{features}|{metric}".encode())
    for f in feature_files(run, features):
        size, mtime_ns = file_stamp(f)
        h.update(f"{f.rsplit('/', 1)[-1]}:{size}:{mtime_ns};".encode())
    return h.hexdigest()[:16]


def exact_distances(q: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Distances between rows q[i] and b[i, j] (q: [m, d], b: [m, k, d]) in the shared convention."""
    if metric == "cosine":
        return (1.0 - np.einsum("md,mkd->mk", q, b)).astype(np.float32)
    diff = b - q[:, None, :]
    return np.sqrt(np.einsum("mkd,mkd->mk", diff, diff)).astype(np.float32)


def finish(q: np.ndarray, qids: np.ndarray | None, cand: np.ndarray, base: np.ndarray, ids: np.ndarray,
           k: int, metric: str, gather=None, distances=None) -> tuple[np.ndarray, np.ndarray]:
    """Candidate base positions [m, c] (-1 = none) -> (neighbour ids, distances) [m, k], sorted.

    Drops each query's own image id (not just rank 1: duplicates may tie with it), recomputes
    the distances exactly and orders by (distance, id) so that ties come out the same every run.
    gather: reads base rows by position instead of base[pos] (a memory-mapped base, `BaseFile.gather`);
    distances: the candidates' distances [m, c] in the shared convention when the caller already
    has them exactly (an IVF,Flat index computes them on the raw vectors; within ~1 ulp of ours).
    """
    m = len(q)
    valid = cand >= 0
    nid = np.where(valid, ids[np.maximum(cand, 0)], -1)
    if qids is not None:
        valid &= nid != qids[:, None]
    pos = np.maximum(cand, 0)
    if distances is not None:
        dist = distances.astype(np.float32, copy=False)
    else:
        dist = exact_distances(q, gather(pos) if gather is not None else base[pos], metric)
    dist = np.where(valid, dist, np.inf)
    order = np.lexsort((np.where(valid, nid, np.iinfo(np.int64).max), dist), axis=1)[:, :k]
    rows = np.arange(m)[:, None]
    return nid[rows, order], dist[rows, order]  # a row short of k candidates ends in (-1, inf)


def score_buffer(device: str = "cpu"):
    """One reusable scores buffer: a fresh 128 MB tensor per block costs page faults every time."""
    import torch

    return torch.empty(Q_BLOCK * B_CHUNK, dtype=torch.float32, device=device)


def member_columns(s, c: int, group: int, worst=None):
    """Column indices [m, M] among which each row of s [m, w] has its c smallest scores below
    `worst` [m] (a row's current c-th best, when it has one), or None when no score beats it.

    `topk` over a whole 16384-wide row costs ~15-20% of the matmul that made it, so the
    search is two-stage: the minima of `group` interleaved column groups (a vectorised
    reduction), then only the members of the c groups with the smallest minima (the c
    smallest scores lie in those groups: a score outside them is beaten by c group minima),
    plus the last w % group columns that no group covers. All columns when groups are few.
    """
    import torch

    m, w = s.shape
    span = w // group
    if span < 4 * c:
        return torch.arange(w, device=s.device).expand(m, -1)
    mins = s[:, :span * group].unflatten(1, (group, span)).amin(1)
    c = _groups_needed(mins < worst[:, None], 1, c) if worst is not None else c
    if c == 0:
        return None
    _, grp = mins.topk(c, dim=1, largest=False, sorted=False)
    return _members(grp, span, group, w)


def member_rows(s, c: int, group: int, worst=None):
    """Row indices [w, M] among which each column of s [h, w] has its c smallest scores below
    `worst` [w], or None (as `member_columns`).

    `member_columns` of the transpose without copying the tile (a copy costs more than the
    whole top-k): the group minima reduce over rows, vectorised along the contiguous columns,
    and only those minima, `group` times smaller than the tile, are transposed.
    """
    import torch

    h, w = s.shape
    span = h // group
    if span < 4 * c:
        return torch.arange(h, device=s.device).expand(w, -1)
    mins = s[:span * group].unflatten(0, (group, span)).amin(0)
    c = _groups_needed(mins < worst, 0, c) if worst is not None else c
    if c == 0:
        return None
    _, grp = mins.T.contiguous().topk(c, dim=1, largest=False, sorted=False)
    return _members(grp, span, group, h)


def _groups_needed(beats, dim: int, c: int) -> int:
    """How many groups the second stage must take: once a row's running top-k is full, only
    groups whose minimum beats its c-th best can change it, and after the first few tiles
    few do (a group that only ties it is a tie, and ties may go either way)."""
    return min(c, int(beats.sum(dim).max()))


def _members(grp, span: int, group: int, width: int):
    """Indices of every member of the chosen interleaved groups [m, c], plus the tail past
    span * group that no group covers: [m, c * group + width - span * group]."""
    import torch

    idx = (grp.unsqueeze(2) + torch.arange(0, span * group, span, device=grp.device)).flatten(1)
    if width > span * group:
        tail = torch.arange(span * group, width, device=grp.device).expand(len(grp), -1)
        idx = torch.cat([idx, tail], 1)
    return idx


class RunningTopK:
    """The c best (score, base position) seen so far for each of n rows: [n, c] each."""

    def __init__(self, n: int, c: int, device):
        import torch

        self.c = c
        self.scores = torch.full((n, c), float("inf"), device=device)
        self.pos = torch.full((n, c), -1, dtype=torch.int64, device=device)

    def worst(self, lo: int, hi: int):
        """The c-th best score of rows lo:hi (inf until c candidates have been seen)."""
        return self.scores[lo:hi].amax(1)

    def offer(self, lo: int, scores, pos) -> None:
        """Rows lo.. keep the c best of what they hold and new candidates (scores, positions) [m, M]:
        one top-k that both selects among a tile's group members and merges."""
        import torch

        hi = lo + len(scores)
        v, j = torch.cat([self.scores[lo:hi], scores], 1).topk(self.c, dim=1, largest=False, sorted=False)
        self.pos[lo:hi] = torch.cat([self.pos[lo:hi], pos], 1).gather(1, j)
        self.scores[lo:hi] = v


def squared_norms(base_t, release=None):
    """||b||^2 [N] in blocks (b * b of the whole base would be a second N x d array)."""
    import torch

    out = torch.empty(len(base_t), dtype=base_t.dtype, device=base_t.device)
    for lo in range(0, len(base_t), B_CHUNK):
        b = base_t[lo:lo + B_CHUNK]
        torch.sum(b * b, dim=1, out=out[lo:lo + B_CHUNK])  # row by row what (base * base).sum(1) gives
        if release is not None:
            release()
    return out


def exact_candidates(q, base_t, base_sq, c: int, metric: str, buf=None, release=None):
    """Positions [m, c] of the c best base rows for each query row, by blocked matmul + top-k.

    q, base_t: torch tensors on the same device ([m <= Q_BLOCK, d] and [N, d]); base_sq:
    ||b||^2 [N] (L2 only); buf: a `score_buffer()` to write the scores into; release: called
    after each base chunk (a memory-mapped base drops the pages it read, `basefile.BaseFile`).
    """
    import torch

    n, m = base_t.shape[0], q.shape[0]
    best = RunningTopK(m, min(c, n), q.device)
    with torch.inference_mode():
        for lo in range(0, n, B_CHUNK):
            b = base_t[lo:lo + B_CHUNK]
            out = buf[: m * len(b)].view(m, len(b)) if buf is not None else torch.empty(m, len(b), device=q.device)
            if metric == "cosine":
                s = torch.mm(q, b.T, out=out).neg_()  # largest similarity = smallest score, as for L2
            else:
                s = torch.addmm(base_sq[lo:lo + B_CHUNK], q, b.T, alpha=-2.0, out=out)
            cols = member_columns(s, best.c, GROUP, best.worst(0, m))
            if cols is not None:
                best.offer(0, s.gather(1, cols), cols + lo)
            if release is not None:
                release()
    return best.pos.cpu().numpy()


def symmetric_scores(base_t, base_sq, lo: int, hi: int, clo: int, chi: int, metric: str, out):
    """Scores of rows lo:hi against rows clo:chi, symmetric so that both sides rank by them:
    ||a||^2 + ||b||^2 - 2 a.b for L2 (the bias of both sides), -a.b for cosine."""
    import torch

    a, b = base_t[lo:hi], base_t[clo:chi]
    if metric == "cosine":
        return torch.mm(a, b.T, out=out).neg_()
    s = torch.addmm(base_sq[clo:chi], a, b.T, alpha=-2.0, out=out)  # the bias add fused in the matmul
    return s.add_(base_sq[lo:hi, None])


def numpy_rows_side(base: np.ndarray, base_sq: np.ndarray | None, lo: int, hi: int, metric: str) -> np.ndarray:
    """Rows lo:hi as the left side of `symmetric_scores_numpy`'s GEMM: [-2a, ||a||^2, 1] for L2, -a for cosine."""
    a = base[lo:hi]
    if metric == "cosine":
        return -a
    d = a.shape[1]
    ax = np.empty((len(a), d + 2), np.float32)
    np.multiply(a, -2.0, out=ax[:, :d])
    ax[:, d], ax[:, d + 1] = base_sq[lo:hi], 1.0
    return ax


def symmetric_scores_numpy(base: np.ndarray, base_sq: np.ndarray | None, lo: int, hi: int, clo: int, chi: int,
                           metric: str, out: np.ndarray, rows_side: np.ndarray | None = None) -> None:
    """`symmetric_scores` by numpy's BLAS, into out [hi - lo, chi - clo]: one GEMM with the biases
    inside it, [-2a, ||a||^2, 1] . [b, 1, ||b||^2] for L2 (two more columns, no pass over the tile
    after it), -a . b for cosine. rows_side: `numpy_rows_side(base, base_sq, lo, hi, metric)`, if made."""
    ax = numpy_rows_side(base, base_sq, lo, hi, metric) if rows_side is None else rows_side
    b = base[clo:chi]
    if metric == "cosine":
        np.matmul(ax, b.T, out=out)
        return
    d = b.shape[1]
    bx = np.empty((len(b), d + 2), np.float32)
    bx[:, :d], bx[:, d], bx[:, d + 1] = b, 1.0, base_sq[clo:chi]
    np.matmul(ax, bx.T, out=out)


class TileGemm:
    """Computes the self-join's tiles with torch's BLAS or numpy's, whichever is faster here.

    The two are different libraries (torch's x86 wheels carry MKL, numpy's OpenBLAS) and which
    is faster depends on the CPU: on the AMD EPYC (AVX-512) of 2026-12-04 a 4096 x 16384 x 512
    tile, biases included, ran at 214-234 GFLOP/s through numpy against 178-189 through torch,
    where the host of the sessions before had FAISS's OpenBLAS and torch.mm at par. On a CPU
    the first full-size tiles alternate between the two, each timed with the top-k work that
    follows it (`tile_done`: OpenBLAS's threads spin after a call and slow what comes next
    unless OPENBLAS_THREAD_TIMEOUT is small, which is why numpy is a candidate only where it is
    set, as the kNN actor's environment does: `NUMPY_BLAS_ENV`); the other tiles meanwhile go
    to torch. After GEMM_TRIALS of each, the faster one (by its best time) computes every tile.
    On a GPU, torch. The two round differently in the last bit, so of candidates tied to
    float32 rounding either may be kept; the distances written are recomputed (`finish`).
    """

    def __init__(self, base_t, base_sq, metric: str, full: tuple[int, int], numpy_blas: bool | None = None):
        self.base_t, self.base_sq, self.metric, self.full = base_t, base_sq, metric, full
        if numpy_blas is None:
            numpy_blas = base_t.device.type == "cpu" and os.environ.get("OPENBLAS_THREAD_TIMEOUT") == \
                NUMPY_BLAS_ENV["OPENBLAS_THREAD_TIMEOUT"]
        self.seconds = {"torch": [], "numpy": []} if numpy_blas else {"torch": []}
        self.chosen = None if numpy_blas else "torch"
        self._timing = None  # the BLAS of the tile in progress, while it is a trial
        self._rows_key = self._rows_side = None  # numpy's side of the current row block (_rows)
        if numpy_blas:
            self.base_np = base_t.numpy()
            self.sq_np = base_sq.numpy() if base_sq is not None else None

    def scores(self, lo: int, hi: int, clo: int, chi: int, out):
        # a trial: a full-size tile off the diagonal (a diagonal square does half the top-k work)
        trial = self.chosen is None and (hi - lo, chi - clo) == self.full and clo >= hi
        name = self.chosen or (min(self.seconds, key=lambda n: len(self.seconds[n])) if trial else "torch")
        self._timing = name if trial else None
        if name == "numpy":
            symmetric_scores_numpy(self.base_np, self.sq_np, lo, hi, clo, chi, self.metric, out.numpy(),
                                   self._rows(lo, hi))
            return out
        return symmetric_scores(self.base_t, self.base_sq, lo, hi, clo, chi, self.metric, out)

    def tile_done(self, seconds: float) -> None:
        """The last tile's time, its scores and top-k together (counted only for a trial)."""
        if self._timing is not None:
            self.seconds[self._timing].append(seconds)
            self._timing = None
            if all(len(v) >= GEMM_TRIALS for v in self.seconds.values()):
                self.chosen = min(self.seconds, key=lambda n: min(self.seconds[n]))

    @property
    def name(self) -> str:
        """The BLAS computing the tiles now ("torch" until the trials are done)."""
        return self.chosen or "torch"

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        """The row block's side of the numpy GEMM, made once per row block (its tiles share it)."""
        if self._rows_key != (lo, hi):
            self._rows_key, self._rows_side = (lo, hi), numpy_rows_side(self.base_np, self.sq_np, lo, hi, self.metric)
        return self._rows_side


def self_join_candidates(base_t, base_sq, c: int, metric: str, rows: int | None = None,
                         cols: int | None = None, gemm: TileGemm | None = None):
    """Exact self-join by the upper triangle of the score matrix: yields (lo, hi, positions
    [hi - lo, c]) for consecutive row blocks, each row's c best base rows (itself included).

    Scores are symmetric, so tile (rows I, columns J) serves both sides: its rows update
    block I's running top-k, its columns (transposed) block J's. Only tiles J >= I are
    computed (half the matmul); row block I's diagonal square updates its rows only (its
    columns are the same pairs). After row block I, block I has seen every pair: it is
    final and yielded, so results come out progressively, in order. gemm: what computes the
    tiles (default a new `TileGemm`: the faster of torch's and numpy's BLAS).
    """
    import torch

    n = base_t.shape[0]
    c = min(c, n)
    rows, cols = rows or SYM_ROWS, cols or SYM_COLS
    best = RunningTopK(n, c, base_t.device)
    buf = torch.empty(min(n, rows) * min(n, max(rows, cols)), device=base_t.device)  # once per layer
    gemm = TileGemm(base_t, base_sq, metric, (rows, cols)) if gemm is None else gemm
    with torch.inference_mode():
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            for clo, chi in [(lo, hi)] + [(j, min(n, j + cols)) for j in range(hi, n, cols)]:
                t0 = time.perf_counter()
                out = buf[: (hi - lo) * (chi - clo)].view(hi - lo, chi - clo)
                s = gemm.scores(lo, hi, clo, chi, out)
                at = member_columns(s, c, GROUP, best.worst(lo, hi))
                if at is not None:
                    best.offer(lo, s.gather(1, at), at + clo)
                if clo >= hi:  # off the diagonal: the same tile, seen from its columns
                    at = member_rows(s, c, COL_GROUP, best.worst(clo, chi))
                    if at is not None:
                        best.offer(clo, s.T.gather(1, at), at + lo)
                gemm.tile_done(time.perf_counter() - t0)
            yield lo, hi, best.pos[lo:hi].cpu().numpy()


def exact_search(queries: np.ndarray, base: np.ndarray, ids: np.ndarray, k: int, metric: str,
                 query_ids: np.ndarray | None = None, device: str = "cpu",
                 release=None, gather=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest base rows of each query (its own id excluded when query_ids is given).
    release, gather: as in `exact_candidates` and `finish` (a memory-mapped base)."""
    import torch

    base_t = torch.from_numpy(base).to(device)
    base_sq = squared_norms(base_t, release)
    buf = score_buffer(device)
    extra = 1 if query_ids is not None else 0
    k = min(k, len(base) - extra)
    out_n, out_d = [], []
    for lo in range(0, len(queries), Q_BLOCK):
        q = queries[lo:lo + Q_BLOCK]
        cand = exact_candidates(torch.from_numpy(q).to(device), base_t, base_sq, k + extra, metric, buf, release)
        n, d = finish(q, None if query_ids is None else query_ids[lo:lo + Q_BLOCK], cand, base, ids, k, metric,
                      gather)
        if release is not None:
            release()
        out_n.append(n)
        out_d.append(d)
    return np.concatenate(out_n), np.concatenate(out_d)
