"""Ingest: every SRC form, stable ids, and every kind of bad input."""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featscope.core.catalog import connect
from featscope.core.config import build_config
from featscope.pipeline.runner import run_pipeline
from featscope.stages import builtin_data
from featscope.stages.ingest import image_id

from .imagegen import bad_images, convertible_images, encode, rgb, write


def ingest(src, out, **sets):
    cfg = build_config(None, {"data": str(src), "out": str(out), "stages": ["ingest"]},
                       [f"{k}={v}" for k, v in sets.items()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pipeline(cfg, quiet=True)
    return connect(str(out))


def rows(con, sql):
    return con.sql(sql).fetchall()


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "folder"
    for i, ext in enumerate(["png", "PNG", "jpg", "JPEG", "bmp", "webp", "Tif"]):
        fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP", "webp": "WEBP", "tif": "TIFF"}[ext.lower()]
        write(str(root / "cat" / "nested" / "deeper" / f"c{i}.{ext}"), encode(rgb(i), fmt))
        write(str(root / "dog" / f"d{i}.{ext}"), encode(rgb(100 + i), fmt))
    write(str(root / "dog" / "notes.txt"), b"not an image and not an image extension: ignored")
    return root


def test_imagefolder_nested_any_case(ray_session, imagefolder, tmp_path):
    con = ingest(imagefolder, tmp_path / "run")
    got = rows(con, "SELECT label_name, label, count(*) FROM images GROUP BY ALL ORDER BY 1")
    assert got == [("cat", 0, 7), ("dog", 1, 7)]
    uris = [u for (u,) in rows(con, "SELECT uri FROM images")]
    assert any("nested/deeper/c1.PNG" in u for u in uris)
    assert rows(con, "SELECT count(*) FROM errors") == [(0,)]
    assert rows(con, "SELECT min(width), max(height) FROM images") == [(24, 24)]


def test_symlinked_folders_are_not_followed_but_a_linked_class_folder_is(ray_session, imagefolder, tmp_path):
    os.symlink("..", imagefolder / "cat" / "up")  # a loop: followed, it would list cat/up/cat/up/...
    elsewhere = tmp_path / "elsewhere"
    write(str(elsewhere / "e0.png"), encode(rgb(7), "PNG"))
    os.symlink(elsewhere, imagefolder / "emu")  # a class folder that is a link: read, as os.walk(cls) did
    con = ingest(imagefolder, tmp_path / "run")
    assert rows(con, "SELECT label_name, count(*) FROM images GROUP BY 1 ORDER BY 1") == [
        ("cat", 7), ("dog", 7), ("emu", 1)]


def test_image_ids_stable_across_runs_and_locations(ray_session, imagefolder, tmp_path):
    a = ingest(imagefolder, tmp_path / "a")
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(imagefolder, moved)
    b = ingest(moved, tmp_path / "b", shard_size=3)  # other machine, other sharding: same ids
    q = "SELECT image_id, label_name, split_part(uri, '/', -1) FROM images ORDER BY 1"
    assert rows(a, q) == rows(b, q)
    # the id is a function of the path relative to the dataset root, nothing else
    assert (image_id("cat/nested/deeper/c0.png"),) in rows(a, "SELECT image_id FROM images")


def _hf_parquet(path, image_struct: bool, string_labels: bool, with_split: bool):
    blobs = [encode(rgb(i), "PNG") for i in range(12)]
    labels = [["ant", "bee", "cow"][i % 3] for i in range(12)] if string_labels else [i % 3 for i in range(12)]
    if image_struct:
        images = pa.array([{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(blobs)],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        images = pa.array(blobs, pa.binary())
    cols = {"image": images, "label": pa.array(labels)}
    if with_split:
        cols["split"] = pa.array(["train"] * 9 + ["test"] * 3)
    table = pa.table(cols)
    if not string_labels:  # the Hugging Face export keeps ClassLabel names in the schema metadata
        hf = {"info": {"features": {"image": {"_type": "Image"},
                                    "label": {"_type": "ClassLabel", "names": ["ant", "bee", "cow"]}}}}
        table = table.replace_schema_metadata({"huggingface": json.dumps(hf)})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=5)


@pytest.mark.parametrize("image_struct,string_labels", [(True, False), (False, True)])
def test_parquet_hf_shape(ray_session, tmp_path, image_struct, string_labels):
    src = tmp_path / "hf" / "data" / "train-00000-of-00001.parquet"
    _hf_parquet(str(src), image_struct, string_labels, with_split=image_struct)
    # a folder of Parquet files and a single file are both accepted
    con = ingest(tmp_path / "hf" if image_struct else src, tmp_path / "run", shard_size=4)
    assert rows(con, "SELECT label_name, count(*) FROM images GROUP BY 1 ORDER BY 1") == [
        ("ant", 4), ("bee", 4), ("cow", 4)]
    splits = dict(rows(con, "SELECT split, count(*) FROM images GROUP BY 1"))
    assert splits == ({"train": 9, "test": 3} if image_struct else {"train": 12})  # column, else file name
    assert rows(con, "SELECT count(DISTINCT image_id) FROM images") == [(12,)]


def test_builtin_digits_and_shapes(ray_session, tmp_path):
    con = ingest("builtin:digits", tmp_path / "digits")
    assert rows(con, "SELECT count(*), count(DISTINCT label) FROM images") == [(1797, 10)]
    con = ingest("builtin:shapes?n=240", tmp_path / "shapes")
    assert rows(con, "SELECT count(*), count(DISTINCT label_name) FROM images") == [(240, 12)]


def test_shapes_same_class_images_differ_in_nearly_every_pixel():
    imgs = {}
    for i in range(0, 12 * 6):
        p = builtin_data.shape_params(i)
        imgs.setdefault(p["cls"], []).append(np.asarray(builtin_data.render_shape(p)).astype(int))
    assert len(builtin_data.SHAPE_CLASSES) >= 10
    shares = [np.mean(np.any(a != b, axis=-1)) for same in imgs.values() for a, b in zip(same, same[1:])]
    assert np.mean(shares) > 0.9
    # and redrawing on another background keeps the object: the pixels of the shape itself stay
    p = builtin_data.shape_params(5)
    a = np.asarray(builtin_data.render_shape(p, background="flat", bg_seed=1))
    b = np.asarray(builtin_data.render_shape(p, background="flat", bg_seed=2))
    obj = np.all(a == np.array(p["color"]), axis=-1)
    assert obj.sum() > 50 and np.array_equal(a[obj], b[obj])


def test_bad_inputs_become_one_error_row_each(ray_session, tmp_path, capsys):
    root = tmp_path / "mixed"
    good = {f"good{i}.png": encode(rgb(10 + i), "PNG") for i in range(3)}
    for name, data in {**good, **convertible_images()}.items():
        write(str(root / "ok" / name), data)
    bad = bad_images()
    for name, (data, _) in bad.items():
        write(str(root / "bad" / name), data)
    cfg = build_config(None, {"data": str(root), "out": str(tmp_path / "run"), "stages": ["ingest"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pipeline(cfg, quiet=False)
    assert f"{3 + len(convertible_images())} images, {len(bad)} errors" in capsys.readouterr().err
    con = connect(str(tmp_path / "run"))
    # every convertible image is in, as RGB of its own size
    names = {u.rsplit("/", 1)[1] for (u,) in rows(con, "SELECT uri FROM images")}
    assert names == set(good) | set(convertible_images())
    errs = {u.rsplit("/", 1)[1]: e for u, e in rows(con, "SELECT uri, error FROM errors")}
    assert errs == {name: code for name, (_, code) in bad.items()}
    assert rows(con, "SELECT count(*) FROM errors WHERE stage = 'ingest' AND message <> ''") == [(len(bad),)]
    # nothing in both views, nothing twice
    assert rows(con, "SELECT count(*) FROM images i JOIN errors e USING (uri)") == [(0,)]
    assert rows(con, "SELECT count(*) - count(DISTINCT uri) FROM images") == [(0,)]

