"""The baseline of benchmarks/queries.py: the five measures computed with pandas + numpy (and
scikit-learn's roc_auc_score), the way a Python user would, from the same Parquet files, with
the defaults of the SQL files (every neighbour, seed 0, 100,000 pairs and triplets, top 20).

Like the SQL suite (per_class.sql and layer_comparison.sql read the results of
knn_agreement.sql and class_distances.sql), this computes the per-edge and per-image frames once
and aggregates them for every measure.
"""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from featscope.core.rundir import RunDir, layer_dir

PAIRS = TRIPLETS = 100_000
TOP, MIN_PROB, MAX_AGREEMENT = 20, 0.5, 0.5


def draws(path: str, seed: int = 0) -> dict:
    """The raw hashes of the seeded pairs and triplets (the scheme documented in class_distances.sql)."""
    con = duckdb.connect()
    out = {}
    for role in ("pair-a", "pair-b", "triplet-a", "triplet-p", "triplet-n"):
        h = con.execute(f"SELECT hash(i, {seed}, '{role}')::VARCHAR AS h FROM range({PAIRS}) r(i) ORDER BY i").fetchnumpy()
        out[role] = np.array([int(v) for v in h["h"]], dtype=object)
    return out


def _load(path: str):
    run = RunDir(path)
    meta = run.read_meta()
    images = pd.read_parquet(run.p("images"), columns=["image_id", "uri", "label", "label_name"])
    layers = meta["index_layers"]
    feats = {}
    for features in {l["features"] for l in layers}:
        t = pq.read_table(run.p("features", layer_dir(features)), columns=["image_id", "view", "pred", "prob", "vec"])
        t = t.filter(pc.equal(t.column("view"), "orig"))
        col = t.column("vec").combine_chunks()
        feats[features] = (t.column("image_id").to_numpy(), t.column("pred").to_numpy(), t.column("prob").to_numpy(),
                           col.flatten().to_numpy().reshape(t.num_rows, -1))
    knn = pd.concat([pd.read_parquet(run.p("knn", layer_dir(l["name"]))) for l in layers])
    deep = pd.concat([pd.read_parquet(run.p("knn_deep", layer_dir(l["name"]))) for l in layers])
    return meta, images, feats, knn, deep


def pandas_suite(path: str, sample: dict) -> dict:
    meta, images, feats, knn, deep = _load(path)
    layers = meta["index_layers"]
    index = pd.Index(images["image_id"].to_numpy())
    label = images["label"].to_numpy()
    ids0, pred0, prob0, _ = feats[layers[0]["features"]]
    pred = np.full(len(images), -1, np.int64)
    prob = np.full(len(images), np.nan)
    rows0 = index.get_indexer(ids0)
    pred[rows0], prob[rows0] = pred0, prob0
    names = images.drop_duplicates("label").set_index("label")["label_name"]

    # ---- per edge, per image --------------------------------------------------------------
    q = index.get_indexer(knn["query_id"].to_numpy())
    e = pd.DataFrame({"layer": knn["layer"].to_numpy(), "query_id": knn["query_id"].to_numpy(),
                      "rank": knn["rank"].to_numpy(), "distance": knn["distance"].to_numpy().astype(np.float64),
                      "label": label[q], "nb": label[index.get_indexer(knn["neighbor_id"].to_numpy())]})
    e["same"] = e["nb"] == e["label"]
    e["same_pred"] = e["nb"] == pred[q]
    e["rank_same"] = np.where(e["same"], e["rank"], 0)
    per = e.groupby(["layer", "query_id"], sort=False).agg(
        label=("label", "first"), n=("rank", "size"), same=("same", "sum"), same_pred=("same_pred", "sum"),
        rank_sum=("rank_same", "sum")).reset_index()
    votes = e.groupby(["layer", "query_id", "nb"], sort=False).agg(votes=("rank", "size"), nearest=("rank", "min"))
    votes = votes.reset_index().sort_values(["layer", "query_id", "votes", "nearest"], ascending=[True, True, False, True])
    voted = votes.drop_duplicates(["layer", "query_id"])[["layer", "query_id", "nb"]].rename(columns={"nb": "voted"})
    per = per.merge(voted, on=["layer", "query_id"])
    per["agreement"] = per["same"] / per["n"]
    per["pred_agreement"] = per["same_pred"] / per["n"]
    per["knn_correct"] = (per["voted"] == per["label"]).astype(float)

    # ---- Musgrave et al. from knn_deep ---------------------------------------------------------
    sizes = pd.Series(label[rows0]).value_counts()
    d = pd.DataFrame({"layer": deep["layer"].to_numpy(), "query_id": deep["query_id"].to_numpy(),
                      "rank": deep["rank"].to_numpy()})
    d["label"] = label[index.get_indexer(d["query_id"].to_numpy())]
    if "hit" in deep.columns:  # as the analyze stage stores it
        d["hit"] = deep["hit"].to_numpy()
    else:
        d["hit"] = label[index.get_indexer(deep["neighbor_id"].to_numpy())] == d["label"]
    d = d[d["rank"].to_numpy() < sizes.reindex(d["label"].to_numpy()).to_numpy()]
    d = d.sort_values(["layer", "query_id", "rank"])
    d["prec"] = np.where(d["hit"], d.groupby(["layer", "query_id"])["hit"].cumsum() / d["rank"], 0.0)
    d["p1"] = d["hit"] & (d["rank"] == 1)
    mq = d.groupby(["layer", "query_id"]).agg(label=("label", "first"), r=("rank", "size"), hits=("hit", "sum"),
                                              prec=("prec", "sum"), p1=("p1", "sum")).reset_index()
    mq["precision_at_1"] = mq["p1"].astype(float)
    mq["r_precision"] = mq["hits"] / mq["r"]
    mq["map_at_r"] = mq["prec"] / mq["r"]

    def agreement_table(keys):
        a = per.groupby(keys).agg(n=("n", "size"), agreement=("agreement", "mean"),
                                  pred_agreement=("pred_agreement", "mean"), knn_accuracy=("knn_correct", "mean"))
        m = mq.groupby(keys).agg(precision_at_1=("precision_at_1", "mean"), r_precision=("r_precision", "mean"),
                                 map_at_r=("map_at_r", "mean"), deep_n=("r", "size"))
        return a.join(m).reset_index()

    # ---- pairs: kNN edges and the seeded global sample --------------------------------------------
    order = np.lexsort((images["image_id"].to_numpy()[rows0], label[rows0]))
    numbered = rows0[order]  # image row of each number
    nlab = label[numbered]
    n = len(numbered)
    start = pd.Series(np.arange(n)).groupby(nlab).min()
    size = pd.Series(nlab).value_counts()
    a = (sample["pair-a"] % n).astype(np.int64)
    b = (sample["pair-b"] % (n - 1)).astype(np.int64)
    b = b + (b >= a)
    ta = (sample["triplet-a"] % n).astype(np.int64)
    c = nlab[ta]
    cs, st = size.reindex(c).to_numpy(), start.reindex(c).to_numpy()
    ok = (cs > 1) & (n > cs)
    pj = np.array([int(h) % int(m - 1) if o else 0 for h, m, o in zip(sample["triplet-p"], cs, ok)])
    nj = np.array([int(h) % int(n - m) if o else 0 for h, m, o in zip(sample["triplet-n"], cs, ok)])
    tp = st + pj + (pj >= ta - st)
    tn = nj + np.where(nj >= st, cs, 0)
    ta, tp, tn = ta[ok], tp[ok], tn[ok]
    pairs, trips = [e[["layer", "label", "distance", "same"]].assign(scope="knn")], []
    kt = per.assign(n_same=per["same"], triplets=per["same"] * (per["n"] - per["same"]),
                    violations=per["rank_sum"] - per["same"] * (per["same"] + 1) / 2)
    trips.append(kt[["layer", "label", "violations", "triplets"]].assign(scope="knn"))
    vec_rows = {}
    for layer in layers:
        fid, _, _, vec = feats[layer["features"]]
        vrow = np.empty(len(images), np.int64)
        vrow[index.get_indexer(fid)] = np.arange(len(fid))
        v = vec[vrow[numbered]].astype(np.float64)
        vec_rows[layer["name"]] = v
        dist = (lambda x, y: 1 - (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)) \
            if layer["metric"] == "cosine" else (lambda x, y: np.sqrt(((x - y) ** 2).sum(1)))
        pairs.append(pd.DataFrame({"layer": layer["name"], "label": nlab[a], "distance": dist(v[a], v[b]),
                                   "same": nlab[a] == nlab[b], "scope": "global"}))
        viol = dist(v[ta], v[tp]) >= dist(v[ta], v[tn])
        trips.append(pd.DataFrame({"layer": layer["name"], "label": nlab[ta], "violations": viol.astype(float),
                                   "triplets": 1, "scope": "global"}))
    pairs, trips = pd.concat(pairs), pd.concat(trips)

    def distance_table(keys, full):
        out = []
        for key, g in pairs.groupby(keys):
            same, diff = g["distance"][g["same"]].to_numpy(), g["distance"][~g["same"]].to_numpy()
            row = dict(zip(keys, key), pairs=len(g), same_mean=same.mean() if len(same) else np.nan,
                       diff_mean=diff.mean() if len(diff) else np.nan)
            row["same_diff_ratio"] = row["same_mean"] / row["diff_mean"]
            row["auc"] = roc_auc_score(g["same"], -g["distance"]) if 0 < len(same) < len(g) else np.nan
            if full:
                for name, x in (("same", same), ("diff", diff)):
                    row.update({f"{name}_n": len(x), f"{name}_std": x.std(ddof=1),
                                **{f"{name}_p{int(p * 100):02d}": np.quantile(x, p) for p in (0.05, 0.5, 0.95)}})
            out.append(row)
        t = trips.groupby(keys)[["violations", "triplets"]].sum().reset_index()
        t["triplet_violation_rate"] = t["violations"] / t["triplets"].replace(0, np.nan)
        return pd.DataFrame(out).merge(t.drop(columns="violations"), on=keys, how="left")

    def wide(dist):
        keys = [k for k in dist.columns if k in ("layer", "label")]
        cols = ["pairs", "same_mean", "diff_mean", "same_diff_ratio", "auc", "triplet_violation_rate"]
        parts = [dist[dist["scope"] == s].set_index(keys)[cols].add_prefix(f"{s}_") for s in ("knn", "global")]
        return parts[0].join(parts[1]).reset_index()

    out = {}
    ka_all = agreement_table(["layer"]).assign(scope="all")
    ka_cls = agreement_table(["layer", "label"])
    ka_cls["scope"] = names.reindex(ka_cls["label"]).to_numpy()
    out["knn_agreement"] = pd.concat([ka_all, ka_cls.drop(columns="label")])
    out["class_distances"] = distance_table(["layer", "scope"], True)
    pc_ = ka_cls.merge(wide(distance_table(["layer", "scope", "label"], False)), on=["layer", "label"], how="left")
    out["per_class"] = pc_.rename(columns={"scope": "class"}).drop(columns="label")
    out["layer_comparison"] = ka_all.drop(columns="scope").merge(wide(distance_table(["layer", "scope"], False)),
                                                                 on="layer")
    # ---- suspicious ----------------------------------------------------------------------------
    s = per.assign(prob=prob[index.get_indexer(per["query_id"].to_numpy())])
    s = s[(s["prob"] >= MIN_PROB) & (s["agreement"] <= MAX_AGREEMENT)]
    s = s.assign(suspicion=s["prob"] * (1 - s["agreement"])).sort_values(
        ["layer", "suspicion", "query_id"], ascending=[True, False, True])
    out["suspicious"] = s.groupby("layer").head(TOP).rename(columns={"query_id": "image_id"})[
        ["layer", "image_id", "suspicion", "agreement"]]
    return out


def same_results(sql: dict, pd_out: dict) -> bool:
    """Every figure of every measure equal. Global-scope figures get a looser tolerance: SQL
    computes those distances in float32 (list_distance), pandas in float64."""
    keys = {"knn_agreement": ["layer", "scope"], "class_distances": ["layer", "scope"],
            "per_class": ["layer", "class"], "layer_comparison": ["layer"], "suspicious": ["layer", "image_id"]}
    for m, k in keys.items():
        a, b = sql[m].set_index(k), pd_out[m].set_index(k)
        if sorted(a.index.tolist()) != sorted(b.index.tolist()):
            raise AssertionError(f"{m}: different rows")
        is_global = np.array(["global" in str(i) for i in a.index]) if m == "class_distances" else np.zeros(len(a), bool)
        missing = [c for c in b.columns if c not in a.columns]
        if missing:  # a renamed or dropped SQL column must not fall out of the comparison
            raise AssertionError(f"{m}: SQL lacks {missing}")
        for col in b.columns:
            x, y = a[col].astype(float).to_numpy(), b[col].reindex(a.index).astype(float).to_numpy()
            loose = is_global | col.startswith("global_")
            for mask, rtol, atol in ((loose, 1e-5, 1e-4), (~loose, 1e-9, 1e-12)):
                if not np.allclose(x[mask], y[mask], rtol=rtol, atol=atol, equal_nan=True):
                    raise AssertionError(f"{m}.{col}: SQL and pandas differ (max abs diff "
                                         f"{np.nanmax(np.abs(x[mask] - y[mask]))})")
    return True
