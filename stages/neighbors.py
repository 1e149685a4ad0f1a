"""Nearest-neighbour lookups in a finished run, by image id or by an image file.

    from stages.neighbors import neighbors
    neighbors("runs/digits-smallcnn", image_id=123, layer="conv", k=5)   # -> list of row dicts

A query file is embedded with the run's own model, checkpoint, layer, pooling and
preprocessing (the code path extraction uses), then searched in the layer's FAISS index.
A query by id excludes the image itself, as the kNN graph does; a query by file does not (a
file that is in the dataset finds itself at rank 1, distance ~0). Distances follow the
shared convention (stages/vectors.py) in the metric of the index json.
"""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import UserError
from pipeline.rundir import RunDir, exists, layer_dir, local_file, parquet_dataset, read_json

from .vectors import exact_distances, feature_files, prepare

def _ids(ids: list[int]) -> pa.Array:
    return pa.array(ids, pa.int64())


COLUMNS = ["rank", "image_id", "uri", "label", "label_name", "distance"]


def _layer_entry(run: RunDir, meta: dict, layer: str | None) -> dict:
    entries = {e["name"]: e for e in meta.get("index_layers", [])}
    if not entries:
        raise UserError(f"{run.root} has no index layers: run the index stage first")
    name = layer or ("conv" if "conv" in entries else next(iter(entries)))
    if name not in entries:
        raise UserError(f"unknown layer '{name}' (this run has: {', '.join(entries)})")
    return entries[name]


def _vectors(run: RunDir, features: str, image_ids: list[int]) -> dict[int, np.ndarray]:
    d = parquet_dataset(feature_files(run, features))
    t = d.to_table(columns=["image_id", "vec"], filter=(pc.field("view") == "orig")
                   & pc.field("image_id").isin(_ids(image_ids)))
    col = t.column("vec").combine_chunks()
    vecs = col.flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, col.type.list_size)
    return dict(zip(t.column("image_id").to_pylist(), vecs.astype(np.float32)))


def embed_file(run: RunDir, meta: dict, features: str, path: str) -> np.ndarray:
    """The file's vector for one layer, computed as extraction computes it."""
    import torch

    from .images import BadImage, decode_rgb, validate
    from .layers import FeatureExtractor, Layer, Traced, class_activation_map, head_weights, pool
    from .models import Preprocess, build_model

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise UserError(f"cannot read query image {path}: {exc.strerror or exc}") from None
    cfg = meta["config"]
    try:
        data, _, _ = validate(data, cfg["max_image_pixels"], cfg["min_image_side"])
        image = decode_rgb(data)
    except BadImage as exc:
        raise UserError(f"query image {path} is unusable: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
        raise UserError(f"query image {path} is unusable: {type(exc).__name__}: {exc}") from None
    weights = cfg.get("weights") or run.p("model", f"{cfg['model']}.pt")
    if not exists(weights):  # e.g. a randomly initialised model: its weights cannot be rebuilt
        raise UserError(f"cannot embed a query file: the run's model checkpoint {weights} is missing")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = build_model(cfg["model"], weights, cfg.get("num_classes") or len(meta["dataset"]["classes"]))
    pre = meta["preprocess"]
    prep = Preprocess(pre["image_size"], pre["resize"], pre["mean"], pre["std"])
    traced = Traced(model, pre["image_size"])
    layer = Layer(**next(l for l in meta["layers"] if l["name"] == features))
    cam_node = traced.names[traced.conv] if traced.cam_ok else None
    extractor = FeatureExtractor(traced, list(dict.fromkeys([layer.node] + ([cam_node] if cam_node else [])))).eval()
    device = torch.device("cuda" if cfg.get("device") != "cpu" and torch.cuda.is_available() else "cpu")
    extractor = extractor.to(device)
    with torch.inference_mode():
        outs = extractor(prep([image]).to(device))
        pred = outs[extractor.logits_name].float().argmax(dim=1)
        cam = None
        if layer.pooling == "cam":
            w, _ = head_weights(traced)
            cam = class_activation_map(outs[cam_node].float(), w.to(device), pred)
        return pool(outs[layer.node].float(), layer.pooling, cam).cpu().numpy()


def neighbors(run_path: str, image_id: int | None = None, image_file: str | None = None, layer: str | None = None,
              k: int = 10) -> list[dict]:
    """The k nearest images to one image id or image file in one layer: rows of COLUMNS."""
    import faiss

    run = RunDir(run_path)
    if not run.exists():
        raise UserError(f"not a featscope run (no run.json): {run_path}")
    if (image_id is None) == (image_file is None):
        raise UserError("give exactly one of an image id or an image file")
    if k < 1:
        raise UserError("k must be at least 1")
    meta = run.read_meta()
    entry = _layer_entry(run, meta, layer)
    base = run.p("index", layer_dir(entry["name"]))
    info = read_json(base + ".json")
    if info is None:
        raise UserError(f"layer '{entry['name']}' has no index in {run.root}: run the index stage first")
    metric = info["metric"]
    if image_id is not None:
        found = _vectors(run, entry["features"], [int(image_id)])
        if int(image_id) not in found:
            raise UserError(f"unknown image id {image_id} in layer '{entry['name']}'")
        q = found[int(image_id)][None, :]
    else:
        q = embed_file(run, meta, entry["features"], image_file)
    q = prepare(q, metric)
    with local_file(base + ".faiss") as path:
        index = faiss.read_index(path)
    if info.get("search_params"):
        faiss.ParameterSpace().set_index_parameters(
            index, ",".join(f"{key}={val}" for key, val in info["search_params"].items()))
    _, found_ids = index.search(q, k + (1 if image_id is not None else 0))
    nids = [int(i) for i in found_ids[0] if i >= 0 and i != image_id][:k]
    if not nids:
        return []
    # distances recomputed from the stored vectors: exact whatever the index compresses
    vecs = _vectors(run, entry["features"], nids)
    dist = exact_distances(q, prepare(np.stack([vecs[i] for i in nids]), metric)[None], metric)[0]
    order = sorted(range(len(nids)), key=lambda j: (dist[j], nids[j]))
    images = _images(run, nids)
    return [{"rank": r + 1, "image_id": nids[j], **images.get(nids[j], {}), "distance": float(dist[j])}
            for r, j in enumerate(order)]


def _images(run: RunDir, ids: list[int]) -> dict[int, dict]:
    files = run.parquet_files("images")
    if not files:
        return {}
    t = parquet_dataset(files).to_table(columns=["image_id", "uri", "label", "label_name"],
                                        filter=pc.field("image_id").isin(_ids(ids)))
    return {r["image_id"]: {"uri": r["uri"], "label": r["label"], "label_name": r["label_name"]}
            for r in t.to_pylist()}
