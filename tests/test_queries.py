"""The measures in queries/*.sql against independent code on the same embeddings: Musgrave's
figures against pytorch-metric-learning, agreement and votes against numpy, AUC against
scikit-learn, on a synthetic run (tests/synthetic.py) whose kNN graph numpy computed exactly."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from featscope import queries
from featscope.core import catalog
from featscope.cli import main
from featscope.core.config import UserError
from featscope.core.rundir import RunDir
from featscope.stages.analyze import write_deep_knn, write_knn_labels
from tests.synthetic_measures import INDEX_LAYERS, K, Synthetic, write_run

SEED, PAIRS, TRIPLETS = 3, 20000, 20000
MINE = ("knn_agreement", "class_distances", "per_class", "suspicious", "layer_comparison")  # continuity: test_continuity


def _make(path, syn):
    write_run(str(path), syn)
    run = RunDir(str(path))
    write_deep_knn(run, run.read_meta(), 20000, 1000, 0)
    assert write_knn_labels(run) > 0  # the measures below read the stored labelled edges
    return str(path)


@pytest.fixture(scope="module")
def syn():
    return Synthetic(seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory, syn):
    return _make(tmp_path_factory.mktemp("syn") / "run", syn)


def measure(run, name, **params):
    con = catalog.connect(run, locked=True)
    rel = queries.relation(con, name, params, RunDir(run).read_meta())
    return [dict(zip(rel.columns, r)) for r in rel.fetchall()]


def by(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


# ---- knn_agreement ------------------------------------------------------------------
def test_musgrave_figures_equal_pytorch_metric_learning(run, syn):
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    def knn_in_float64(knn):
        # AccuracyCalculator hands its kNN the embeddings as float32 (lossless here: the vectors
        # are float32), and PML's float32 distances order near-equal neighbours differently from
        # one process to the next (seen: MAP@R off by 2e-5 in one run of four); its own kNN on
        # float64 copies is exact and steady, as the run's deep search is
        return lambda query, k, reference, ref_includes_query=False: knn(
            query.double(), k, reference.double(), ref_includes_query)

    rows = by(measure(run, "knn_agreement"), "layer", "scope")
    for layer in INDEX_LAYERS:
        dist = CosineSimilarity() if layer["metric"] == "cosine" else LpDistance(normalize_embeddings=False)
        knn = knn_in_float64(CustomKNN(dist))
        calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                                  k="max_bin_count", knn_func=knn, return_per_class=True)
        x = torch.from_numpy(syn.vectors[layer["features"]].astype(np.float64))
        res = calc.get_accuracy(x, torch.from_numpy(syn.labels), ref_includes_query=True)
        overall = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                                     k="max_bin_count", knn_func=knn).get_accuracy(
            x, torch.from_numpy(syn.labels), ref_includes_query=True)
        got = rows[(layer["name"], "all")]
        assert got["deep_n"] == len(syn.labels) - 1  # the lone image is left out, as PML does
        assert got["precision_at_1"] == pytest.approx(overall["precision_at_1"], abs=1e-6)
        assert got["r_precision"] == pytest.approx(overall["r_precision"], abs=1e-6)
        assert got["map_at_r"] == pytest.approx(overall["mean_average_precision_at_r"], abs=1e-6)
        for c, name in enumerate(syn.names[:-1]):  # the last class is the lone image
            cls = rows[(layer["name"], name)]
            assert cls["precision_at_1"] == pytest.approx(res["precision_at_1"][c], abs=1e-6)
            assert cls["r_precision"] == pytest.approx(res["r_precision"][c], abs=1e-6)
            assert cls["map_at_r"] == pytest.approx(res["mean_average_precision_at_r"][c], abs=1e-6)


def test_musgrave_figures_with_a_shallow_deep_search_equal_numpy(tmp_path, syn):
    """knn_deep shallower than R (deep_k=5 here, classes of 6+): R is capped at the depth, as
    the file says; numpy computes the same figures from the exact neighbour order."""
    run = str(tmp_path / "run")
    write_run(run, syn)
    write_deep_knn(RunDir(run), RunDir(run).read_meta(), 20000, 5, 0)
    rows = by(measure(run, "knn_agreement"), "layer", "scope")
    sizes = np.bincount(syn.labels)
    for layer in INDEX_LAYERS:
        order, _ = syn.knn(layer, 5)
        hit = syn.labels[order] == syn.labels[:, None]
        r = np.minimum(sizes[syn.labels] - 1, 5)
        keep = r > 0
        p1, rp, mapr = [], [], []
        for row, rr in zip(hit[keep], r[keep]):
            h = row[:rr]
            p1.append(float(h[0]))
            rp.append(h.sum() / rr)
            mapr.append((np.cumsum(h) / np.arange(1, rr + 1))[h].sum() / rr)
        got = rows[(layer["name"], "all")]
        assert got["deep_n"] == keep.sum()
        assert got["precision_at_1"] == pytest.approx(np.mean(p1), abs=1e-12)
        assert got["r_precision"] == pytest.approx(np.mean(rp), abs=1e-12)
        assert got["map_at_r"] == pytest.approx(np.mean(mapr), abs=1e-12)
        assert np.any(r[keep] < sizes[syn.labels][keep] - 1)  # the cap is exercised


def test_knn_labels_stored_by_analyze_are_the_edges_labels_and_a_stale_file_is_not_read(tmp_path, run, syn):
    """knn_labels (stored by the analyze stage) is every knn edge with the query's label and
    prediction and the neighbour's label; a run without the file gets the same rows from the
    catalog's join and the same figures; once the knn files change, the old file is not read
    (the catalog joins again) until write_knn_labels makes it anew."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from featscope.core.rundir import layer_dir

    label = dict(zip(syn.ids, syn.labels))
    pred = dict(zip(syn.ids, syn.pred))

    def rows(path):
        con = catalog.connect(path, locked=True)
        return con.execute("SELECT layer, query_id, rank, distance, label, pred, neighbor_label FROM knn_labels "
                           "ORDER BY layer, query_id, rank").fetchall()

    def reads_stored(path, layer=None):  # the catalog reads the stored file (of that layer, or any)
        return f"knn_labels/{layer_dir(layer) + '/' if layer else ''}" in catalog.catalog_sql(RunDir(path)).replace("\\", "/")

    stored = rows(run)
    assert all(reads_stored(run, layer["name"]) for layer in INDEX_LAYERS)
    for layer in INDEX_LAYERS:  # against the knn files and the synthetic labels, read apart
        t = pq.read_table(RunDir(run).p("knn", layer_dir(layer["name"]))).sort_by([("query_id", "ascending"), ("rank", "ascending")])
        want = [(layer["name"], q, r, d, int(label[q]), int(pred[q]), int(label[n])) for q, r, n, d in zip(
            t.column("query_id").to_pylist(), t.column("rank").to_pylist(), t.column("neighbor_id").to_pylist(),
            t.column("distance").to_pylist())]
        assert [r for r in stored if r[0] == layer["name"]] == want
    assert any(r[4] != r[6] for r in stored) and any(r[4] != r[5] for r in stored)

    plain = str(tmp_path / "plain")  # a run from before knn_labels/
    shutil.copytree(run, plain)
    shutil.rmtree(RunDir(plain).p("knn_labels"))
    assert not reads_stored(plain) and rows(plain) == stored
    def same(a, b):  # (averages summed in another order: the last bit may differ)
        return len(a) == len(b) and all(x == pytest.approx(y, rel=1e-12, abs=1e-12) for x, y in zip(a, b))

    want = {m: measure(run, m) for m in ("knn_agreement", "class_distances", "suspicious")}
    for m, got in want.items():
        assert same(measure(plain, m), got), m

    # the knn stage runs again (here: the first layer's neighbours reversed per query)
    first = INDEX_LAYERS[0]["name"]
    stale = str(tmp_path / "stale")
    shutil.copytree(run, stale)
    for f in RunDir(stale).parquet_files("knn", layer_dir(first)):
        t = pq.read_table(f)
        reversed_ids = pa.array(t.column("neighbor_id").to_numpy()[::-1].copy())
        pq.write_table(t.set_column(t.schema.get_field_index("neighbor_id"), "neighbor_id", reversed_ids), f)
    assert not reads_stored(stale, first) and reads_stored(stale, INDEX_LAYERS[1]["name"])  # the stale one is not read
    fresh = str(tmp_path / "fresh")
    shutil.copytree(stale, fresh)
    shutil.rmtree(RunDir(fresh).p("knn_labels"))
    assert rows(stale) == rows(fresh) != stored
    changed = measure(stale, "knn_agreement")
    assert same(changed, measure(fresh, "knn_agreement")) and not same(changed, want["knn_agreement"])
    assert write_knn_labels(RunDir(stale)) == sum(r[0] == first for r in stored)  # only the stale layer
    assert reads_stored(stale, first) and rows(stale) == rows(fresh)


def test_deep_hits_stored_by_analyze_and_computed_for_older_files_agree(tmp_path, run, syn):
    """knn_deep (stored by the analyze stage) lists each query's R = class size - 1 nearest
    (capped at the depth), with hit (the neighbour's label against the query's) and hits (the
    hits at that rank or nearer); knn_deep files in the two earlier formats (every query to the
    same depth, with hit or without it) get hit, hits and the cut from the catalog view, with
    the same figures."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from featscope.core.rundir import layer_dir, read_json
    from featscope.stages.analyze import deep_search

    rd = RunDir(run)
    index = {i: lab for i, lab in zip(syn.ids, syn.labels)}
    sizes = np.bincount(syn.labels)
    for layer in INDEX_LAYERS:
        t = pq.read_table(rd.p("knn_deep", layer_dir(layer["name"]))).sort_by([("query_id", "ascending"), ("rank", "ascending")])
        depth = read_json(rd.p("knn_deep", layer_dir(layer["name"]) + ".json"))["deep_k"]
        q, n = t.column("query_id").to_numpy(), t.column("neighbor_id").to_numpy()
        want = np.array([index[a] == index[b] for a, b in zip(q, n)])
        assert t.column("hit").to_pylist() == want.tolist() and want.any() and not want.all()
        qs, counts = np.unique(q, return_counts=True)
        assert counts.tolist() == [min(sizes[index[i]] - 1, depth) for i in qs] and len(set(counts)) > 1
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        cum = np.concatenate([np.cumsum(want[s:s + c]) for s, c in zip(starts, counts)])
        assert t.column("hits").to_numpy().tolist() == cum.tolist()
    want = measure(run, "knn_agreement")
    for keep_hit in (True, False):
        old = str(tmp_path / f"old-{keep_hit}")
        shutil.copytree(run, old)
        for layer in INDEX_LAYERS:  # as the analyze stage wrote them before: every query to the depth
            folder = layer_dir(layer["name"])
            stored = pq.read_table(RunDir(old).p("knn_deep", folder))
            depth = read_json(RunDir(old).p("knn_deep", folder + ".json"))["deep_k"]
            qids, nbr, dist = deep_search(RunDir(old), layer["features"], layer["metric"],
                                          np.unique(stored.column("query_id").to_numpy()), depth)
            cols = {"layer": pa.array([layer["name"]] * nbr.size), "query_id": np.repeat(qids, depth),
                    "rank": np.tile(np.arange(1, depth + 1, dtype=np.int32), len(qids)),
                    "neighbor_id": nbr.ravel(), "distance": dist.ravel()}
            if keep_hit:
                cols["hit"] = np.array([index[a] == index[b] for a, b in zip(cols["query_id"], cols["neighbor_id"])])
            assert nbr.size > stored.num_rows  # the old files go deeper for the smaller classes
            for f in RunDir(old).parquet_files("knn_deep", folder):
                pq.write_table(pa.table(cols), f)
        got = measure(old, "knn_agreement")
        assert len(got) == len(want) > len(INDEX_LAYERS)
        for a, b in zip(got, want):  # (averages summed in another order: the last bit may differ)
            assert a == pytest.approx(b, rel=1e-12, abs=1e-12)


def _numpy_agreement(syn, layer, k):
    order, _ = syn.knn(layer, k)
    nb = syn.labels[order]
    agreement = (nb == syn.labels[:, None]).mean(1)
    pred_agreement = (nb == syn.pred[:, None]).mean(1)
    voted, ties = np.empty(len(nb), dtype=nb.dtype), 0
    for i, row in enumerate(nb):
        counts = {c: (row == c).sum() for c in set(row)}
        top = max(counts.values())
        tied = [c for c in counts if counts[c] == top]
        ties += len(tied) > 1
        voted[i] = min(tied, key=lambda c: np.argmax(row == c))  # the tied label that occurs nearest
    return agreement, pred_agreement, voted == syn.labels, ties


@pytest.mark.parametrize("k", [K, 3])
def test_agreement_and_knn_accuracy_equal_numpy(run, syn, k):
    rows = by(measure(run, "knn_agreement", k=k), "layer", "scope")
    for layer in INDEX_LAYERS:
        agreement, pred_agreement, correct, ties = _numpy_agreement(syn, layer, k)
        if k == K:
            assert ties >= 3  # the tie rule is exercised
        for scope, mask in [("all", np.ones(len(correct), bool))] + \
                [(n, syn.labels == c) for c, n in enumerate(syn.names)]:
            got = rows[(layer["name"], scope)]
            assert got["n"] == mask.sum()
            assert got["agreement"] == pytest.approx(agreement[mask].mean(), abs=1e-12)
            assert got["pred_agreement"] == pytest.approx(pred_agreement[mask].mean(), abs=1e-12)
            assert got["knn_accuracy"] == pytest.approx(correct[mask].mean(), abs=1e-12)


# ---- class_distances ----------------------------------------------------------------
def _stats(d):
    return {"n": len(d), "mean": d.mean(), "std": d.std(ddof=1),
            "p05": np.quantile(d, 0.05), "p50": np.quantile(d, 0.5), "p95": np.quantile(d, 0.95)}


def _check_stats(got, same, diff, rel=1e-6):
    for name, d in (("same", same), ("diff", diff)):
        for stat, v in _stats(d).items():
            assert got[f"{name}_{stat}"] == pytest.approx(v, rel=rel, abs=1e-9), (name, stat)
    assert got["pairs"] == len(same) + len(diff)
    assert got["same_diff_ratio"] == pytest.approx(same.mean() / diff.mean(), rel=rel)


def test_knn_scope_equals_numpy_and_sklearn(run, syn):
    rows = by(measure(run, "class_distances"), "layer", "scope")
    for layer in INDEX_LAYERS:
        order, dist = syn.knn(layer)
        same = syn.labels[order] == syn.labels[:, None]
        d = dist.astype(np.float64)
        got = rows[(layer["name"], "knn")]
        _check_stats(got, d[same], d[~same])
        assert got["auc"] == pytest.approx(roc_auc_score(same.ravel(), -d.ravel()), abs=1e-9)
        # every (query, same neighbour, different neighbour) triple; the rank orders them
        viol = total = 0
        for row in same:
            for p in np.flatnonzero(row):
                for n in np.flatnonzero(~row):
                    total += 1
                    viol += n < p
        assert got["triplets"] == total
        assert got["triplet_violation_rate"] == pytest.approx(viol / total, abs=1e-12)


def _draws(syn, seed, pairs, triplets):
    """The documented sampling scheme, evaluated by DuckDB's hash() alone (not by the measure)."""
    ids_sorted = sorted(zip(syn.labels, syn.ids))
    lab = np.array([l for l, _ in ids_sorted])
    pos_of = {i: p for p, (_, i) in enumerate(ids_sorted)}
    order = np.array([pos_of[i] for i in syn.ids])  # numbered position of each synthetic row
    row_at = np.argsort(order)
    n = len(lab)
    con = duckdb.connect()
    a, b = np.array(con.execute(f"SELECT hash(i, {seed}, 'pair-a') % {n}, hash(i, {seed}, 'pair-b') % {n - 1} "
                                f"FROM range({pairs}) r(i) ORDER BY i").fetchall(), dtype=np.int64).T
    b = b + (b >= a)
    h = np.array(con.execute(f"SELECT hash(t, {seed}, 'triplet-a')::HUGEINT, hash(t, {seed}, 'triplet-p')::HUGEINT, "
                             f"hash(t, {seed}, 'triplet-n')::HUGEINT FROM range({triplets}) r(t) ORDER BY t").fetchall(),
                 dtype=object)
    start = {int(c): int(np.flatnonzero(lab == c)[0]) for c in set(lab)}
    size = {int(c): int((lab == c).sum()) for c in set(lab)}
    trip = []
    for ha, hp, hn in h:
        ai = int(ha) % n
        c = int(lab[ai])
        if size[c] < 2 or n == size[c]:
            continue
        pj, nj = int(hp) % (size[c] - 1), int(hn) % (n - size[c])
        p = start[c] + pj + (pj >= ai - start[c])
        ng = nj + (size[c] if nj >= start[c] else 0)
        trip.append((ai, p, ng))
    t = np.array(trip)
    return row_at[a], row_at[b], row_at[t[:, 0]], row_at[t[:, 1]], row_at[t[:, 2]]


def test_global_scope_equals_sklearn_on_the_same_pairs(run, syn):
    rows = by(measure(run, "class_distances", seed=SEED, pairs=PAIRS, triplets=TRIPLETS), "layer", "scope")
    pa, pb, ta, tp, tn = _draws(syn, SEED, PAIRS, TRIPLETS)
    for layer in INDEX_LAYERS:
        dist = syn.distances(layer)
        d = dist[pa, pb]
        same = syn.labels[pa] == syn.labels[pb]
        got = rows[(layer["name"], "global")]
        _check_stats(got, d[same], d[~same], rel=1e-5)  # SQL distances are float32
        assert got["auc"] == pytest.approx(roc_auc_score(same, -d), abs=1e-6)
        assert got["triplets"] == len(ta)
        viol = (dist[ta, tp] >= dist[ta, tn]).mean()
        assert got["triplet_violation_rate"] == pytest.approx(viol, abs=2 / len(ta))


def test_auc_counts_ties_as_half_per_scope_and_per_class(tmp_path):
    """Vectors on a half-integer grid: many kNN edges and sampled pairs at exactly equal
    distances, same-class and different-class pairs among them. Every AUC, of the whole scope and
    of each class of anchors, equals scikit-learn's (which counts a tie as 1/2) on the same pairs."""
    syn = Synthetic(seed=1)
    for name in syn.vectors:
        syn.vectors[name] = (np.round(syn.vectors[name] / 2) + 0.5).astype(np.float32)  # no zero vector
    run = _make(tmp_path / "ties", syn)
    params = dict(seed=SEED, pairs=PAIRS, triplets=TRIPLETS)
    rows = by(measure(run, "class_distances", **params), "layer", "scope")
    per_class = by(measure(run, "per_class", **params), "layer", "class")
    pa, pb, _, _, _ = _draws(syn, SEED, PAIRS, TRIPLETS)
    mixed_ties = 0
    for layer in INDEX_LAYERS:
        order, dist = syn.knn(layer)
        knn = (np.repeat(np.arange(len(order)), order.shape[1]), order.ravel(), dist.ravel().astype(np.float64))
        full = syn.distances(layer)
        glob = (pa, pb, full[pa, pb].astype(np.float32).astype(np.float64))  # SQL: float32 distances
        # global distances are SQL's float32 arithmetic: exact on the grid for l2 only
        for scope, (a, b, d) in (("knn", knn), ("global", glob))[:2 if layer["metric"] == "l2" else 1]:
            same = syn.labels[a] == syn.labels[b]
            mixed_ties += len(np.intersect1d(d[same], d[~same]))
            assert rows[(layer["name"], scope)]["auc"] == pytest.approx(roc_auc_score(same, -d), abs=1e-12), (layer, scope)
            for c, cname in enumerate(syn.names):
                mine = syn.labels[a] == c
                if same[mine].all() or not same[mine].any():
                    continue
                got = per_class[(layer["name"], str(cname))][f"{scope}_auc"]
                assert got == pytest.approx(roc_auc_score(same[mine], -d[mine]), abs=1e-12), (scope, cname)
    assert mixed_ties > 20  # equal distances with same- and different-class pairs: ties are exercised


def test_class_numbering_past_the_integer_range_stops_with_one_clear_line(run):
    """class_distances numbers each (block, class) as one INTEGER for its per-class window; labels
    so large that blocks x classes pass 2^31 stop with its own error, not a cast failure deep in
    the window (an images view shadowed in this connection with labels shifted by 2^30)."""
    con = catalog.connect(run, locked=True)
    meta = RunDir(run).read_meta()
    queries.run_measure(con, "knn_agreement", {}, meta)
    body = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'images' AND NOT temporary").fetchone()[0]
    body = body.split(" AS ", 1)[1].rstrip().rstrip(";")  # CREATE VIEW images AS <select>;
    con.execute(f"CREATE TEMP VIEW images AS SELECT * REPLACE (label + 1073741824 AS label) FROM ({body})")
    with pytest.raises(duckdb.Error, match="too many classes x layers"):
        queries.run_measure(con, "class_distances", {}, meta)
    con.execute("DROP VIEW temp.images")
    assert queries.run_measure(con, "class_distances", {}, meta).num_rows > 0  # the same connection, real labels


def test_seeded_samples_are_deterministic(run):
    a = measure(run, "class_distances", seed=1, pairs=5000, triplets=5000)
    b = measure(run, "class_distances", seed=1, pairs=5000, triplets=5000)
    c = measure(run, "class_distances", seed=2, pairs=5000, triplets=5000)
    for ra, rb, rc in zip(a, b, c):
        assert ra.keys() == rb.keys()
        for key in ra:
            if isinstance(ra[key], float):
                assert ra[key] == pytest.approx(rb[key], rel=1e-12), key
        if ra["scope"] == "knn":
            assert ra["auc"] == rc["auc"]
        else:
            assert (ra["same_n"], ra["same_mean"]) != (rc["same_n"], rc["same_mean"])


# ---- per_class, layer_comparison, suspicious --------------------------------------------
def test_per_class_and_layer_comparison_agree_with_the_two_measures(run):
    params = dict(seed=SEED, pairs=PAIRS, triplets=TRIPLETS)
    agreement = by(measure(run, "knn_agreement"), "layer", "scope")
    distances = by(measure(run, "class_distances", **params), "layer", "scope")
    per_class = measure(run, "per_class", **params)
    comparison = by(measure(run, "layer_comparison", **params), "layer")
    assert set(comparison) == {(l["name"],) for l in INDEX_LAYERS}
    figures = ("n", "agreement", "pred_agreement", "knn_accuracy", "precision_at_1", "r_precision", "map_at_r", "deep_n")
    for (layer,), row in comparison.items():
        for f in figures:
            assert row[f] == pytest.approx(agreement[(layer, "all")][f], nan_ok=True), f
        for scope in ("knn", "global"):
            for f in ("same_mean", "diff_mean", "same_diff_ratio", "auc", "triplet_violation_rate"):
                assert row[f"{scope}_{f}"] == pytest.approx(distances[(layer, scope)][f]), (scope, f)
    for row in per_class:
        for f in figures:
            assert row[f] == pytest.approx(agreement[(row["layer"], row["class"])][f], nan_ok=True), f
    # a class's pairs are those its images anchor: the classes add up to the whole
    for layer in comparison:
        rows = [r for r in per_class if r["layer"] == layer[0]]
        assert sum(r["global_pairs"] for r in rows) == distances[(layer[0], "global")]["pairs"]
        assert sum(r["knn_pairs"] for r in rows) == distances[(layer[0], "knn")]["pairs"]


def test_suspicious_lists_the_planted_mislabel_first(run, syn):
    rows = measure(run, "suspicious", top=5)
    planted = int(syn.ids[syn.planted])
    for layer in INDEX_LAYERS:
        mine = [r for r in rows if r["layer"] == layer["name"]]
        assert 0 < len(mine) <= 5 and [r["rank"] for r in mine] == list(range(1, len(mine) + 1))
        top = mine[0]
        assert top["image_id"] == planted
        assert (top["label_name"], top["pred_name"], top["knn_label"]) == ("class1", "class0", "class0")
        assert top["neighbor_labels"] == ["class0"] * K and len(top["neighbor_ids"]) == K
        assert all(r["prob"] >= 0.5 and r["agreement"] <= 0.5 for r in mine)
        assert [r["suspicion"] for r in mine] == sorted((r["suspicion"] for r in mine), reverse=True)


def test_suspicious_equals_numpy_for_every_candidate(run, syn):
    """Loose thresholds list every candidate: its agreement, vote (ties to the nearer), neighbour
    lists and place in the ranking equal a numpy computation, with k below the run's k."""
    k, min_prob, max_agreement = 3, 0.4, 0.7
    rows = measure(run, "suspicious", k=k, top=len(syn.ids), min_prob=min_prob, max_agreement=max_agreement)
    for layer in INDEX_LAYERS:
        order, _ = syn.knn(layer, k)
        agreement, _, _, _ = _numpy_agreement(syn, layer, k)
        nb = syn.labels[order]
        keep = np.flatnonzero((syn.prob >= np.float32(min_prob)) & (agreement <= max_agreement))
        suspicion = syn.prob[keep].astype(np.float64) * (1 - agreement[keep])
        ranked = keep[np.lexsort((syn.ids[keep], -suspicion))]
        mine = [r for r in rows if r["layer"] == layer["name"]]
        assert len(ranked) > 10 and [r["image_id"] for r in mine] == syn.ids[ranked].tolist()
        for r, i in zip(mine, ranked):
            counts = {c: (nb[i] == c).sum() for c in set(nb[i])}
            tied = [c for c in counts if counts[c] == max(counts.values())]
            voted = min(tied, key=lambda c: np.argmax(nb[i] == c))
            assert r["agreement"] == pytest.approx(agreement[i], abs=1e-12)
            assert r["knn_label"] == syn.names[voted]
            assert r["neighbor_labels"] == syn.names[nb[i]].tolist()
            assert r["neighbor_ids"] == syn.ids[order[i]].tolist()
            assert r["pred_name"] == syn.names[syn.pred[i]] and r["label_name"] == syn.names[syn.labels[i]]


# ---- plain DuckDB, parameters, the command line -----------------------------------------------
def _plain_read(con, measure, upto=None):
    """`.read queries/<measure>.sql` in the DuckDB CLI (its first `upto` statements): the
    relation of the last statement run, a SELECT left unread."""
    for s in duckdb.extract_statements(open(queries.sql_path(measure)).read())[:upto]:
        rel = con.sql(s.query)
    return rel


@pytest.mark.parametrize("name", MINE)
def test_sql_files_run_in_plain_duckdb(run, name):
    """What a user does in the DuckDB CLI: .read RUN/catalog.sql, SET VARIABLE, .read the file
    (after the files whose results it reads, in order, as its header says)."""
    catalog.write_catalog(RunDir(run))
    con = duckdb.connect()
    con.execute(open(RunDir(run).p("catalog.sql")).read())
    con.execute("SET VARIABLE k = 4")

    def read(measure):
        return _plain_read(con, measure)

    if name in queries.READS:  # without its inputs the file says which to .read first
        with pytest.raises(duckdb.Error, match=f"{queries.READS[name][0]}.sql first"):
            read(name)
        for dep in queries.READS[name]:
            read(dep)
    rel = read(name)
    plain = rel.fetchall()
    assert plain
    loader = measure(run, name, k=4)
    assert len(plain) == len(loader)
    assert [r[0] for r in plain] == [r["layer"] for r in loader]


def test_kept_results_are_not_read_after_a_run_that_stopped_halfway_or_a_new_catalog(run):
    """knn_agreement.sql replaces three tables one after the other and says last for which
    parameters they hold: a run of it with k = 2 that stops after its first table must not leave
    the k = 3 parameters standing over k = 2 edges; and reading a catalog.sql again (in the CLI,
    perhaps another run's) forgets every kept figure."""
    catalog.write_catalog(RunDir(run))
    con = duckdb.connect()
    con.execute(open(RunDir(run).p("catalog.sql")).read())

    def read(measure, upto=None):
        _plain_read(con, measure, upto)

    con.execute("SET VARIABLE k = 3")
    read("knn_agreement")
    read("class_distances")
    full = con.sql("SELECT * FROM results_class_distances ORDER BY ALL").fetchall()
    con.execute("SET VARIABLE k = 2")
    statements = duckdb.extract_statements(open(queries.sql_path("knn_agreement")).read())
    upto = next(i for i, s in enumerate(statements) if "results_knn_agreement_edges AS" in s.query) + 1
    read("knn_agreement", upto)  # stops after the edges (Ctrl-C, out of memory, ...)
    con.execute("SET VARIABLE k = 3")
    with pytest.raises(duckdb.Error, match="knn_agreement.sql first"):
        read("class_distances")
    read("knn_agreement")  # run whole again: the figures are those of a fresh session
    read("class_distances")
    assert _rows_close(con.sql("SELECT * FROM results_class_distances ORDER BY ALL").fetchall(), full)

    con.execute(open(RunDir(run).p("catalog.sql")).read())
    for name in ("class_distances", "per_class", "suspicious"):
        with pytest.raises(duckdb.Error, match="first"):
            read(name)


def test_the_pairs_that_distance_histogram_bins_are_those_class_distances_measured(run):
    """class_distances' pairs view reads knn_agreement's edges where they lie: once
    knn_agreement.sql has replaced them (another k), distance_histogram.sql must not bin the new
    edges under the old figures' parameters; run through featscope (every layer, or one that is
    not the first in name order), both are computed again, the histogram's counts add up to the
    figures' counts and the kNN-scope counts are the knn view's, layer by layer."""
    catalog.write_catalog(RunDir(run))
    con = duckdb.connect()
    con.execute(open(RunDir(run).p("catalog.sql")).read())
    con.execute("SET VARIABLE k = 3")
    _plain_read(con, "knn_agreement")
    _plain_read(con, "class_distances")
    con.execute("SET VARIABLE k = 2")
    _plain_read(con, "knn_agreement")
    con.execute("SET VARIABLE k = 3")
    with pytest.raises(duckdb.Error, match="class_distances.sql first"):
        _plain_read(con, "distance_histogram").fetchall()

    con = catalog.connect(run, locked=False)
    expected = {(layer, same): n for layer, same, n in con.sql(
        "SELECT k.layer, q.label = nb.label, count(*) FROM knn k JOIN images q ON q.image_id = k.query_id "
        "JOIN images nb ON nb.image_id = k.neighbor_id WHERE k.rank <= 3 GROUP BY ALL").fetchall()}
    layers = sorted({layer for layer, _ in expected})
    assert len(layers) > 1
    for given in ({}, {"layer": layers[-1]}):
        queries.run_measure(con, "class_distances", {"k": 3, **given})
        queries.run_measure(con, "knn_agreement", {"k": 2, **given})
        hist = queries.run_measure(con, "distance_histogram", {"k": 3, **given}).to_pandas()
        figures = queries.run_measure(con, "class_distances", {"k": 3, **given}).to_pandas()
        assert sorted(set(figures.layer)) == ([given["layer"]] if given else layers)
        sums = hist.groupby(["layer", "scope"])[["same_n", "diff_n"]].sum()
        for r in figures.itertuples():
            assert (sums.loc[(r.layer, r.scope), "same_n"], sums.loc[(r.layer, r.scope), "diff_n"]) == (r.same_n, r.diff_n)
            if r.scope == "knn":
                assert (r.same_n, r.diff_n) == (expected.get((r.layer, True), 0), expected.get((r.layer, False), 0))


def _rows_close(a, b, rel=1e-9):
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if isinstance(u, float) and isinstance(v, float):
                if abs(u - v) > rel * max(1.0, abs(v)):
                    return False
            elif u != v:
                return False
    return True


def test_parameters_are_declared_with_their_types():
    declared = {m: {p.name: p.type for p in queries.params(m)} for m in MINE}
    assert declared["knn_agreement"] == {"layer": "VARCHAR", "k": "INTEGER"}
    assert declared["class_distances"] == {"layer": "VARCHAR", "k": "INTEGER", "seed": "BIGINT",
                                           "pairs": "BIGINT", "triplets": "BIGINT"}
    assert "layer" not in declared["layer_comparison"]


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown measure 'nope'"),
    (["knn_agreement", "--param", "layer=fc9"], "unknown layer 'fc9'"),
    (["knn_agreement", "--param", "k=ten"], "parameter k='ten'"),
    (["knn_agreement", "--param", "k=0"], "parameter k='0'"),
    (["knn_agreement", "--param", f"k={K + 1}"], "more than the run's k"),
    (["class_distances", "--param", "colour=red"], "unknown parameter 'colour'"),
    (["class_distances", "--param", "pairs"], "--param expects name=value"),
])
def test_query_errors_are_one_line_and_exit_2(run, capsys, args, message):
    assert main(["query", run] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_query_cli_prints_rows(run, capsys):
    assert main(["query", run, "knn_agreement", "--param", "layer=penultimate:cosine", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["layer"] for r in rows} == {"penultimate:cosine"} and rows[0]["scope"] == "all"
    assert main(["query", run, "layer_comparison", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("layer,features,pooling,metric,dim,n,agreement")


def test_compare_gives_the_figures_side_by_side_with_deltas(run, tmp_path, capsys):
    other = _make(tmp_path / "noisier", Synthetic(seed=0, spread=2.0))
    assert main(["compare", run, other, "--measure", "knn_agreement", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    a = by(measure(run, "knn_agreement"), "layer", "scope")
    b = by(measure(other, "knn_agreement"), "layer", "scope")
    names = [c for c in rows[0] if c not in ("layer", "scope", "figure")]
    assert names == ["run", "noisier", "delta_noisier"]
    for r in rows:
        va, vb = a[(r["layer"], r["scope"])][r["figure"]], b[(r["layer"], r["scope"])][r["figure"]]
        if va is None or vb is None or va != va or vb != vb:
            continue
        assert (r["run"], r["noisier"]) == (pytest.approx(va), pytest.approx(vb))
        assert r["delta_noisier"] == pytest.approx(vb - va)
    agreement = [r for r in rows if r["figure"] == "agreement" and r["scope"] == "all"]
    assert len(agreement) == len(INDEX_LAYERS) and all(r["delta_noisier"] < 0 for r in agreement)
    with pytest.raises(UserError, match="lists images"):
        from featscope.queries.compare import compare

        compare([run, other], "suspicious")
