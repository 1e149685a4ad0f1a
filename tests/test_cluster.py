"""Ray cluster behaviour: cluster.yaml, `ray job submit` to a loopback head, a two-node cluster,
a worker killed mid-extract (exactly-once output) and a driver killed mid-run (resume).

Every Ray here other than the session's own (tests/conftest.py) runs in child processes that
the test starts and stops by pid. Never `ray stop`: it would stop every Ray on the machine.
Heads get their own --temp-dir so that a plain `ray.init()` elsewhere does not attach to them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from featscope.core.catalog import connect
from featscope.core.config import build_config
from featscope.pipeline.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
# 12 shards of 64 images, each shard a few hundred ms of work: long enough to be killed inside
SMALL = {"data": "builtin:shapes?n=768&size=64", "model": "smallcnn", "train_epochs": 0, "shard_size": 64,
         "batch_size": 16, "image_size": 64, "layers": ["conv", "penultimate"], "perturb": ["noise=0.05"], "stages": ["ingest", "extract"]}
N_SHARDS = 12


# ---- helpers -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(run: str, sql: str) -> list[tuple]:
    return connect(run).execute(sql).fetchall()


def features(run: str) -> list[tuple]:
    """Every stored vector and prediction, in a fixed order (floats exactly as stored)."""
    return (rows(run, "SELECT layer, image_id, view, vec FROM embeddings ORDER BY layer, image_id, view")
            + rows(run, "SELECT image_id, view, pred, prob FROM predictions ORDER BY image_id, view"))


def assert_exactly_once(run: str, n_images: int) -> None:
    """Each image once per layer and view in every extract output, and no shard missing."""
    assert rows(run, "SELECT count(*) FROM images") == [(n_images,)]
    dup = rows(run, "SELECT layer, image_id, view, count(*) FROM embeddings GROUP BY ALL HAVING count(*) <> 1")
    assert dup == []
    per_layer = rows(run, "SELECT layer, view, count(*), count(DISTINCT image_id) FROM embeddings GROUP BY ALL "
                          "ORDER BY ALL")
    assert per_layer == [(layer, view, n_images, n_images) for layer in ("conv", "penultimate")
                         for view in ("noise:0.05", "orig")]
    assert rows(run, "SELECT count(*), count(DISTINCT (image_id, view)) FROM cams") == [(2 * n_images, 2 * n_images)]
    stats = sorted(Path(run, "stats", "extract").glob("part-*.json"))
    assert len(stats) == N_SHARDS and sum(json.loads(p.read_text())["rows"] for p in stats) == n_images


def run_here(out: Path, **extra) -> str:
    cfg = build_config(None, {"out": str(out)}, [f"{k}={json.dumps(v)}" for k, v in {**SMALL, **extra}.items()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pipeline(cfg, quiet=True)
    return str(out)


def write_config(folder: Path, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **extra}))
    return path


def featscope_cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "featscope.cli", "run", str(config), "--out", str(out), "--format", "json"]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    return env


def family(proc: subprocess.Popen) -> list[psutil.Process]:
    """A process we started and every process below it (psutil handles: safe against pid reuse)."""
    try:
        top = psutil.Process(proc.pid)
        return [top] + top.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            if p.is_running():
                p.kill()
        except psutil.NoSuchProcess:
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    kill_all(family(proc))
    proc.wait(timeout=60)


def wait_for(predicate, what: str, limit: float = 300.0, proc: subprocess.Popen | None = None):
    """Poll until predicate() is truthy; a liveness guard, not a timing assertion."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


def status(run: Path) -> dict[str, tuple]:
    """`featscope status RUN`: stage -> (status, shards, redone)."""
    done = subprocess.run([sys.executable, "-m", "featscope.cli", "status", str(run), "--format", "json"],
                          env=child_env(), capture_output=True, text=True, check=True)
    return {r["stage"]: (r["status"], r["shards"], r["redone"]) for r in json.loads(done.stdout)}


def temporaries(run: str, folder: str) -> list[Path]:
    base = Path(run, folder)
    return list(base.rglob(".*.tmp")) if base.exists() else []


# ---- cluster.yaml ------------------------------------------------------------------------------
def test_cluster_yaml_validates_against_rays_own_schema():
    import jsonschema
    import ray

    schema = json.loads(Path(ray.__file__).parent.joinpath("autoscaler", "ray-schema.json").read_text())
    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "local"
    assert "HEAD_NODE_ADDRESS" in config["provider"]["head_ip"]
    assert all("WORKER_NODE_ADDRESS" in w for w in config["provider"]["worker_ips"])
    assert any("pip install" in c and "featscope" in c for c in config["setup_commands"])
    assert "ray start --head" in " ".join(config["head_start_ray_commands"])
    # token auth on every node (set before ray start), with the one token copied from the launcher
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert all("RAY_AUTH_MODE=token ray start" in c for c in commands if "ray start" in c)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # the commented cloud GPU node type is a valid config too, once uncommented
    tail = text[text.index("\n# provider:") + 1:].splitlines()
    cloud = yaml.safe_load("\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in tail))
    assert cloud["available_node_types"]["gpu_worker"]["resources"] == {"GPU": 1}
    jsonschema.validate({**config, **cloud}, schema)


# ---- faults ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_here(ray_session, tmp_path_factory):
    """An uninterrupted run in the session's Ray: one CPU replica on one node, so in the driver's
    process (extract_in=auto)."""
    out = run_here(tmp_path_factory.mktemp("ref") / "run")
    assert {json.loads(p.read_text())["replica_pid"] for p in Path(out, "stats", "extract").glob("*.json")} \
        == {os.getpid()}
    return out


def test_worker_killed_mid_extract_is_retried_exactly_once(ray_session, reference_here, tmp_path):
    out = tmp_path / "run"
    killed: list[int] = []

    def kill_a_replica_mid_shard():
        stats = out / "stats" / "extract"
        # a replica's pid is in its first finished shard's stats; kill it while it writes another
        first = wait_for(lambda: stats.exists() and sorted(stats.glob("part-*.json")), "a finished shard")
        pid = json.loads(first[0].read_text())["replica_pid"]
        wait_for(lambda: temporaries(str(out), "features"), "a shard being written")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_a_replica_mid_shard, daemon=True)
    killer.start()
    run_here(out, extract_in="ray")  # an actor pool: the replica killed is Ray's, and Ray restarts it
    killer.join(timeout=60)
    assert killed, "no replica was killed"
    pids = {json.loads(p.read_text())["replica_pid"] for p in (out / "stats" / "extract").glob("*.json")}
    assert killed[0] in pids and len(pids) >= 2  # the rest was done by the restarted replica
    assert_exactly_once(str(out), 768)
    # the same bits from Ray actors as from the replica in the driver's process
    assert features(str(out)) == features(reference_here)


def test_driver_killed_mid_run_resumes_without_recomputing(tmp_path):
    config = write_config(tmp_path / "cfg")
    ref = subprocess.run(featscope_cmd(config, tmp_path / "ref"), env=child_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "run"
    stats = out / "stats" / "extract"
    proc = subprocess.Popen(featscope_cmd(config, out), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: stats.exists() and len(list(stats.glob("part-*.json"))) >= 2, "two finished shards",
                 proc=proc)
    finally:
        kill_tree(proc)
    done = sorted(p.stem for p in stats.glob("part-*.json"))
    assert 2 <= len(done) < N_SHARDS, "the driver must die in the middle of extraction"
    finished = [out / "stats" / "extract" / f"{d}.json" for d in done]
    finished += [out / "features" / layer / f"{d}.parquet" for d in done for layer in ("conv", "penultimate")]
    before = {p: p.stat().st_mtime_ns for p in finished}
    assert status(out)["extract"][:2] == ("partial", len(done))

    again = subprocess.run(featscope_cmd(config, out), env=child_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == before  # finished shards untouched
    summary = json.loads(again.stdout)
    assert summary["extract"]["redone"] == N_SHARDS - len(done)
    meta = json.loads((out / "run.json").read_text())
    assert meta["stages"]["extract"]["redone"] == N_SHARDS - len(done)
    assert temporaries(str(out), ".") == []  # the killed writer's temporaries were removed
    assert status(out)["extract"][:3] == ("done", N_SHARDS, N_SHARDS - len(done))
    assert_exactly_once(str(out), 768)
    assert features(str(out)) == features(str(tmp_path / "ref"))
    assert rows(str(out), "SELECT * FROM images ORDER BY image_id") == \
        rows(str(tmp_path / "ref"), "SELECT * FROM images ORDER BY image_id")


# ---- a real head: ray start + ray job submit ---------------------------------------------------
# the whole pipeline (train, extract, index, knn, analyze) on a small set, so the job is short
TINY = {"data": "builtin:shapes?n=240&size=32", "train_epochs": 1, "shard_size": 80, "perturb": ["noise=0.05"],
        "deep_k": 50, "continuity_queries": 100}


def readme_cluster_commands() -> list[str]:
    """The bash block after `<!-- cluster-commands -->` in README.md, one command per line."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- cluster-commands -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def session_processes(sid: int) -> list[psutil.Process]:
    """Every process of a session: `ray start` daemons leave their shell but keep its session."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return out


@pytest.fixture
def no_ray_in_this_process():
    """The README's head takes Ray's default ports (6379, 8265 and the dashboard agent's 52365),
    and an embedded Ray such as this test session's holds 8265 and 52365 too (its head's job
    server then has "No available agent"): the session's Ray steps aside and comes back after."""
    import ray

    from featscope.pipeline.runner import connect_ray

    was = ray.is_initialized()
    if was:
        ray.shutdown()
    yield
    if was:
        connect_ray(num_cpus=2)


def test_readme_cluster_commands_run_as_written(no_ray_in_this_process, tmp_path):
    """The README's cluster block, pasted into a shell on a machine that has never run Ray (empty
    HOME: no ~/.ray/auth_token). The old block (ray start --head; export RAY_AUTH_MODE=token;
    ray job submit) failed here with "Token authentication is enabled but no authentication
    token was found": `ray start --head` turns token auth on only when a token file exists."""
    commands = readme_cluster_commands()
    assert commands[-1].startswith("ray job submit") and "featscope run CONFIG.yaml" in commands[-1], commands
    home, work, out = tmp_path / "home", tmp_path / "work", tmp_path / "run"
    home.mkdir()
    work.mkdir()
    (work / "CONFIG.yaml").write_text(yaml.safe_dump({
        "data": "builtin:shapes?n=48&size=32", "train_epochs": 1, "perturb": [], "out": str(out),
        "stages": ["ingest", "train", "extract"]}))
    temp = Path(f"/tmp/fs-rd-{os.getpid()}")  # RAY_TMPDIR: the head's address file stays out of /tmp/ray
    env = {k: v for k, v in child_env().items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_TMPDIR=str(temp))
    exports = [c for c in commands if c.startswith("export ")]

    def shell(lines: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-e", "-c", "\n".join(lines)], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)

    # a session of its own for the head's daemons, so that they (and only they) are stopped after
    keeper = subprocess.Popen(["bash", "-c", "\n".join(commands[:-1]) + "\nexec sleep 3600"], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: any("gcs_server" in p.name() for p in session_processes(keeper.pid)
                             if p.is_running()) and any(p.name() == "sleep" for p in session_processes(keeper.pid)),
                 "the head started by the README's commands", proc=keeper)

        def submitted():
            # the job server can answer before its agent has registered: a refused submission ran nothing
            job = shell(exports + commands[-1:], timeout=600)
            refused = job.returncode != 0 and "No available agent" in job.stdout + job.stderr
            return None if refused else job

        job = wait_for(submitted, "a job server that takes the job", proc=keeper)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
    finally:
        procs = session_processes(keeper.pid)
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        kill_all(procs)
        keeper.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
    meta = json.loads((out / "run.json").read_text())
    assert meta["ray"]["address"].endswith(":6379")  # the README's head, not an embedded Ray
    assert all(meta["stages"][s]["status"] == "done" for s in ("ingest", "train", "extract"))


def test_ray_job_submit_to_a_loopback_head(ray_session, tmp_path):
    import secrets

    port, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    # token auth (Ray's default) with a token of our own, so nothing is read from or written to ~/.ray
    env = {**child_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp = Path(f"/tmp/fs-ray-{secrets.token_hex(3)}")  # short: Ray's unix socket paths must stay < 108 bytes
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             # ports that default to fixed numbers, which another Ray on the machine may hold
                             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
                             "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    work = tmp_path / "job"
    write_config(work, **{k: v for k, v in TINY.items()}, stages=None)
    out = tmp_path / "run"
    # the user's own network, in a module of the job's working directory: the job ships it
    own = tmp_path / "own-job"
    write_config(own, **{**TINY, "model": "mynets:make_net", "image_size": 32, "stages": ["ingest", "extract"]})
    shutil.copy(ROOT / "tests" / "custom_nets.py", own / "mynets.py")
    own_out = tmp_path / "own-run"
    try:
        def submit(folder: Path, target: Path):
            cmd = ["ray", "job", "submit", "--address", address, "--working-dir", str(folder), "--",
                   "featscope", "run", "config.yaml", "--out", str(target)]

            def submitted():
                # the job server answers before its agent has registered; a refused submission ran nothing
                job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                refused = job.returncode != 0 and ("No available agent" in job.stderr or "Connection" in job.stderr
                                                   and "Job '" not in job.stdout + job.stderr)
                return None if refused else job

            job = wait_for(submitted, "a job server that accepts the job", proc=head)
            assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
            assert "succeeded" in job.stdout + job.stderr

        submit(work, out)
        submit(own, own_out)
    finally:
        started = family(head)
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        kill_all(started)  # whatever did not stop with it
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
    meta = json.loads((out / "run.json").read_text())
    assert meta["ray"]["address"].endswith(f":{port}")  # ran on the head, not on an embedded Ray
    assert all(meta["stages"][s]["status"] == "done" for s in ("ingest", "train", "extract", "index", "knn"))
    run = str(out)
    assert rows(run, "SELECT count(*) FROM images") == [(240,)]
    assert rows(run, "SELECT layer, view, count(*) FROM embeddings GROUP BY ALL ORDER BY ALL") == [
        (layer, view, 240) for layer in ("conv", "penultimate") for view in ("noise:0.05", "orig")]
    assert rows(run, "SELECT layer, count(DISTINCT query_id), count(*) FROM knn GROUP BY 1 ORDER BY 1") == [
        ("conv", 240, 2400), ("penultimate", 240, 2400)]
    # the shipped factory built the same (seeded) network as the test module's own factory does here
    own_meta = json.loads((own_out / "run.json").read_text())
    assert own_meta["model"]["kind"] == "factory" and own_meta["ray"]["address"].endswith(f":{port}")
    import featscope

    here = featscope.run(TINY["data"], "tests.custom_nets:make_net", ["conv", "penultimate"], str(tmp_path / "here"),
                         image_size=32, shard_size=TINY["shard_size"], perturb=TINY["perturb"],
                         stages=["ingest", "extract"], quiet=True)
    assert own_meta["model"]["sha256"] == here.meta["model"]["sha256"]
    for layer in ("conv", "penultimate"):
        np.testing.assert_allclose(featscope.open(str(own_out)).embeddings(layer)[1], here.embeddings(layer)[1],
                                   atol=1e-6)


# ---- two nodes on one machine ------------------------------------------------------------------
def test_extraction_on_two_nodes_equals_one_node(tmp_path):
    config = write_config(tmp_path / "cfg", **{**SMALL, "data": "builtin:shapes?n=384&size=32", "image_size": None,
                                               "shard_size": 32, "stages": ["ingest", "extract", "index", "knn"]})
    reports = {}
    for nodes in (2, 1):
        report = tmp_path / f"report{nodes}.json"
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_run.py"), str(config),
                               str(tmp_path / f"run{nodes}"), str(nodes), str(report)],
                              env=child_env(), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        reports[nodes] = json.loads(report.read_text())
    two, one = str(tmp_path / "run2"), str(tmp_path / "run1")
    assert reports[2]["nodes"] == 2
    stats = [json.loads(p.read_text()) for p in Path(two, "stats", "extract").glob("*.json")]
    used = {reports[2]["replica_node"][str(s["replica_pid"])] for s in stats}
    assert used == {0, 1}  # shards were extracted on the head and on the worker node
    # one-CPU nodes both times: the same torch threads per replica, so the vectors are bitwise equal
    assert features(two) == features(one)
    assert rows(two, "SELECT * FROM knn ORDER BY ALL") == rows(one, "SELECT * FROM knn ORDER BY ALL")
