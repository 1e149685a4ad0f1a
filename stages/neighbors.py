"""Nearest-neighbour lookups in a finished run, by image id or by an image file.

    from featscope.stages.neighbors import neighbors
    neighbors("runs/digits-smallcnn", image_id=123, layer="conv", k=5)   # -> list of row dicts

A query image is embedded with the run's own model, checkpoint, layer, pooling and
preprocessing (the code path extraction uses), then searched in the layer's FAISS index.
A query by id excludes the image itself, as the kNN graph does; a query by file does not (a
file that is in the dataset finds itself at rank 1, distance ~0). Distances follow the
shared convention (stages/vectors.py) in the metric of the index json.
"""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featscope.core.config import UserError
from featscope.core.rundir import RunDir, exists, layer_dir, local_file, parquet_dataset, read_json

from .vectors import exact_distances, feature_files, prepare, vec_matrix

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
    return dict(zip(t.column("image_id").to_pylist(), vec_matrix(t).astype(np.float32)))


def image_bytes(image) -> tuple[bytes, str]:
    """A query image as encoded bytes and a name for messages: a path, bytes, a PIL image or an
    (H, W[, C]) uint8 array. Pictures are encoded losslessly (PNG), so every query takes the same
    validate + decode path as the run's own images."""
    import io
    import os

    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as fh:
                return fh.read(), str(image)
        except OSError as exc:
            raise UserError(f"cannot read query image {image}: {exc.strerror or exc}") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "the query bytes"
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise UserError(f"a query array must be uint8 (H, W) or (H, W, C), not {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), "the query image"
    raise UserError(f"a query image is a path, bytes, a PIL image or a uint8 array, not {type(image).__name__}")


def embed_file(run: RunDir, meta: dict, features: str, image, module=None) -> np.ndarray:
    """The image's vector for one layer, computed as extraction computes it (image: see image_bytes)."""
    import torch

    from .images import BadImage, decode_rgb, validate
    from .layers import Layer, class_activation_map, extractor_for, head_weights, pool, trace
    from .models import Preprocess, build_model, model_kind, state_sha256

    data, what = image_bytes(image)
    cfg = meta["config"]
    try:
        data, _, _ = validate(data, cfg["max_image_pixels"], cfg["min_image_side"])
        image = decode_rgb(data)
    except BadImage as exc:
        raise UserError(f"query image {what} is unusable: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
        raise UserError(f"query image {what} is unusable: {type(exc).__name__}: {exc}") from None
    weights = cfg.get("weights")
    trained = run.p("model", f"{cfg['model']}.pt")
    if not weights and exists(trained):  # the built-in CNN trained on the spot
        weights = trained
    # without weights the model was built under the fixed seed: build_model rebuilds the same one
    kind = model_kind(cfg["model"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = build_model(cfg["model"], weights, cfg.get("num_classes") or len(meta["dataset"]["classes"]),
                               module if kind == "object" else None, (meta.get("model") or {}).get("search_path"))
    recorded = (meta.get("model") or {}).get("sha256")
    if kind in ("factory", "object", "timm") and recorded and state_sha256(model) != recorded:
        raise UserError(f"the model built now for {cfg['model']} is not the one the run was made with "
                        f"(its weights differ from run.json's fingerprint)")
    pre = meta["preprocess"]
    prep = Preprocess(pre["image_size"], pre["resize"], pre["mean"], pre["std"])
    traced = trace(model, pre["image_size"])
    layer = Layer(**next(l for l in meta["layers"] if l["name"] == features))
    cam_node = traced.names[traced.conv] if traced.cam_ok else None
    extractor = extractor_for(traced, list(dict.fromkeys([layer.node] + ([cam_node] if cam_node else [])))).eval()
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


def neighbors(run_path: str, image_id: int | None = None, image_file=None, layer: str | None = None,
              k: int = 10, module=None) -> list[dict]:
    """The k nearest images to one image id or one image in one layer: rows of COLUMNS.

    image_file: a path, bytes, a PIL image or a uint8 array; module: the nn.Module of a run made
    from an object (featscope.run(model=net)), which cannot be rebuilt from run.json."""
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
        q = embed_file(run, meta, entry["features"], image_file, module)
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
