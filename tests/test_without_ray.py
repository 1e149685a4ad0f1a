"""A run whose stages all run in this process starts no Ray (pipeline/runner.py needs_ray): ingest
one shard after another, extract in one CPU replica, index, analyze, report. Ray's start and stop
cost such a run ~5.5 s on 2 cores and gave it nothing. What it writes is what the Ray path writes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
import torch

import featscope
from featscope.core.config import UserError, build_config
from featscope.core.progress import progress
from featscope.core.rundir import RunDir, read_table
from featscope.pipeline import runner
from featscope.stages import ingest
from tests.test_connect import _env, _ray_processes_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "builtin:shapes?n=48&size=32"
RUN = ["run", "--data", DATA, "--model", "resnet18", "--image-size", "32", "--stages", "ingest,extract",
       "--set", "perturb=[]", "--set", "shard_size=16"]


def _cfg(**keys):
    return build_config(None, {"data": DATA, "model": "resnet18", **keys})


@pytest.fixture
def no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runner, "gpu_may_be_present", lambda: False)


def test_needs_ray_only_for_stages_that_use_it(no_cluster, monkeypatch):
    cfg = _cfg()
    assert not runner.needs_ray(cfg, ["ingest", "extract"])
    assert not runner.needs_ray(cfg, ["ingest", "train", "extract", "index", "analyze", "report"])
    assert runner.needs_ray(cfg, ["ingest", "extract", "knn"])  # the kNN stage's actors
    assert runner.needs_ray(_cfg(train_workers=2), ["train"])  # Ray Train
    assert not runner.needs_ray(_cfg(train_workers=2), ["ingest", "extract"])
    assert not runner.needs_ray(_cfg(train_workers=2), ["train"], trains=False)  # a model with weights

    class Checked(Exception):
        pass

    def stop(prep):  # the runner's callback sees whether training will run
        raise Checked(prep.needs_training)

    for model, trains in (("smallcnn", True), ("resnet18", False)):
        with pytest.raises(Checked) as info:
            runner.Prepared(_cfg(model=model), on_inputs_checked=stop)
        assert info.value.args == (trains,)
    assert runner.needs_ray(_cfg(extract_in="ray"), ["extract"])
    assert runner.needs_ray(_cfg(replicas=2), ["extract"])
    assert not runner.needs_ray(_cfg(extract_in="ray"), ["ingest", "index"])
    monkeypatch.setattr(runner, "gpu_may_be_present", lambda: True)  # a GPU: Ray places the replicas
    assert runner.needs_ray(cfg, ["extract"]) and not runner.needs_ray(_cfg(device="cpu"), ["extract"])
    monkeypatch.setattr(runner, "gpu_may_be_present", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster (or `ray job submit`) is always used
    assert runner.needs_ray(cfg, ["ingest"])


def test_hidden_gpus_are_no_gpus(monkeypatch):
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not runner.gpu_may_be_present()


def test_hidden_amd_gpus_are_no_gpus(monkeypatch):
    import glob

    real_exists = os.path.exists
    monkeypatch.setattr(glob, "glob", lambda pattern: [])  # no NVIDIA device node
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/kfd" or real_exists(p))  # ROCm's
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    assert runner.gpu_may_be_present()
    for name in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.setenv(name, "-1")
        assert not runner.gpu_may_be_present()
        monkeypatch.delenv(name)


def test_ingest_in_this_process_writes_what_ray_tasks_write(ray_session, tmp_path):
    cfg = _cfg(shard_size=16)
    plan = ingest.plan(cfg.data, cfg.shard_size)
    assert len(plan.shards) == 3
    tables = {}
    for on_ray in (True, False):
        run = RunDir(str(tmp_path / f"ray-{on_ray}"))
        run.create()
        res = ingest.run(run, cfg, plan, progress, on_ray=on_ray)
        assert res == {"shards": 3, "redone": 3, "rows": 48, "errors": 0}
        tables[on_ray] = [read_table(f) for f in run.parquet_files("images")]
    assert len(tables[True]) == len(tables[False]) == 3
    for a, b in zip(tables[True], tables[False]):
        assert a.equals(b)


def _embeddings(path: str) -> dict:
    run = featscope.open(path)
    return {layer["name"]: run.embeddings(layer["name"]) for layer in run.meta["layers"]}


def test_ingest_and_extract_start_no_ray_and_write_what_the_ray_path_writes(tmp_path):
    """Under a private RAY_TMPDIR: a Ray start there would make its session folder and processes."""
    temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # Ray's socket paths must fit in 107 bytes
    try:
        here = subprocess.run([sys.executable, "-m", "featscope.cli", *RUN, "--out", str(tmp_path / "here")],
                              cwd=ROOT, env=_env(RAY_TMPDIR=temp), capture_output=True, text=True, timeout=400)
        started_here = os.path.exists(os.path.join(temp, "ray"))
        # the same run with extraction asked for on Ray: ingest as Ray tasks, a Ray Data actor replica
        on_ray = subprocess.run([sys.executable, "-m", "featscope.cli", *RUN, "--set", "extract_in=ray",
                                 "--out", str(tmp_path / "ray")], cwd=ROOT, env=_env(RAY_TMPDIR=temp),
                                capture_output=True, text=True, timeout=400)
        started_on_ray = os.path.exists(os.path.join(temp, "ray"))
    finally:
        for p in _ray_processes_of(temp):
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)
    assert here.returncode == 0, here.stderr[-2000:]
    assert on_ray.returncode == 0, on_ray.stderr[-2000:]
    assert not started_here and started_on_ray  # the premise: the second did start Ray there
    here_meta, ray_meta = featscope.open(str(tmp_path / "here")).meta, featscope.open(str(tmp_path / "ray")).meta
    assert here_meta["ray"] == {"address": None, "nodes": 1, "cpus": len(os.sched_getaffinity(0)), "gpus": 0}
    assert ray_meta["ray"]["address"]
    for stage in ("ingest", "extract"):
        assert here_meta["stages"][stage]["rows"] == ray_meta["stages"][stage]["rows"] == 48
    for a, b in zip(RunDir(str(tmp_path / "here")).parquet_files("images"),
                    RunDir(str(tmp_path / "ray")).parquet_files("images")):
        assert read_table(a).equals(read_table(b))
    here_vecs, ray_vecs = _embeddings(str(tmp_path / "here")), _embeddings(str(tmp_path / "ray"))
    assert set(here_vecs) == set(ray_vecs) and len(here_vecs) >= 2
    for layer, (ids, vecs) in here_vecs.items():
        np.testing.assert_array_equal(ids, ray_vecs[layer][0])
        np.testing.assert_allclose(vecs, ray_vecs[layer][1], rtol=1e-5, atol=1e-5)


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.body(x)), 1))


class LockedNet(SmallNet):
    """A network holding a lock: it cannot be copied (nor pickled for Ray's workers)."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


_API = """
import sys, torch
from tests.test_without_ray import SmallNet
import featscope
torch.manual_seed(0)
run = featscope.run("%s", SmallNet(), out=sys.argv[1], stages=["ingest", "extract"], perturb=[], image_size=32,
                    quiet=True)
print("rows", run.meta["stages"]["extract"]["rows"], "ray imported", "ray" in sys.modules)
""" % DATA


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    """`code` in a fresh Python, with a private Ray temp dir (a Ray it started would show there)."""
    temp = tempfile.mkdtemp(prefix="ra", dir="/tmp")
    try:
        return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=_env(RAY_TMPDIR=temp),
                              capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_the_python_api_gives_the_one_replica_its_module_without_ray(tmp_path):
    """No object store without Ray: the module goes to the replica in this process as it is."""
    done = _python(_API, str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rows 48 ray imported False" in done.stdout


def test_a_module_that_cannot_be_copied_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="nn.Module LockedNet cannot be copied .*TypeError: cannot pickle"):
        featscope.run(DATA, LockedNet(), out=str(tmp_path / "run"), stages=["ingest", "extract"], perturb=[],
                      image_size=32, quiet=True)
    assert not (tmp_path / "run").exists()  # refused before anything was written


class _NoPickle:
    def __deepcopy__(self, memo):
        return _NoPickle()

    def __reduce__(self):
        raise TypeError("this object stays in its process")


class UnpicklableNet(SmallNet):
    """Copies, but cannot be pickled for Ray's workers."""

    def __init__(self):
        super().__init__()
        self.handle = _NoPickle()


_LATE_GPU = """
import sys, torch
torch.cuda.is_available = lambda: True  # a GPU the device-node probe did not see
from featscope.pipeline import runner
runner.gpu_may_be_present = lambda: False
from featscope.core.config import UserError
from tests.test_without_ray import UnpicklableNet
import featscope
try:
    featscope.run("%s", UnpicklableNet(), out=sys.argv[1], stages=["ingest", "extract"], perturb=[], image_size=32,
                  quiet=True)
except UserError as exc:
    import os
    print("UserError:", exc)
    print("run written:", os.path.exists(sys.argv[1]))
""" % DATA


def test_a_gpu_found_late_still_checks_that_the_module_can_go_to_ray(tmp_path):
    """When torch finds a GPU the device-node probe missed, the run uses Ray (the replicas go
    there): the module must pass the same pickling check as when Ray was planned from the start,
    before anything is written."""
    done = _python(_LATE_GPU, str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "UserError: the nn.Module UnpicklableNet cannot be sent to Ray workers" in done.stdout, done.stdout
    assert "run written: False" in done.stdout  # refused before any work
