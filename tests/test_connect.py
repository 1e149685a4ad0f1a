"""Connecting to Ray never hangs and says nothing a featscope user cannot act on: a stale cluster
address in Ray's temp dir is ignored (an embedded Ray starts), an address nothing answers on is
one line within seconds, and three of Ray's own notes are not printed: token auth on, its
progress bars off (Python loggers), and Ray Data's "constructor arguments in the object store ...
ray-project/ray#53727", which Ray's C++ core worker writes to fd 2 for every actor pool with
max_restarts > 0 (featscope/core/native_lines.py filters the descriptor)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import socket
import tempfile
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("Token authentication is enabled", "Progress bars disabled", "Failed to connect to GCS",
         "constructor arguments in the object store", "53727")
SMALL = ["--data", "builtin:shapes?n=48&size=32", "--stages", "ingest,train,extract", "--set", "train_epochs=1",
         "--set", "perturb=[]"]


@pytest.fixture
def stale_ray_tmpdir():
    """A RAY_TMPDIR whose ray/ray_current_cluster names a cluster that is gone (as a killed
    `ray start --head` leaves it). Short: Ray's socket paths must fit in 107 bytes."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    os.makedirs(os.path.join(tmp, "ray"))
    with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as fh:
        fh.write("127.0.0.1:6399")
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TQDM_"))}
    return {**env, **extra}


def test_the_stale_address_is_what_ray_itself_would_use(stale_ray_tmpdir):
    """The premise: a bare ray.init() under this RAY_TMPDIR goes for the dead address."""
    # the address file a bare ray.init() reads after `ray start` (find_bootstrap_address); running
    # GCS processes come first there, so a live test-session Ray must not decide the premise
    code = "import ray._private.services as s; print(s.find_bootstrap_address(None))"
    done = subprocess.run([sys.executable, "-c", code], env=_env(RAY_TMPDIR=stale_ray_tmpdir), capture_output=True,
                          text=True, timeout=120)
    assert "6399" in done.stdout + done.stderr


def test_run_ignores_a_stale_cluster_address(stale_ray_tmpdir, tmp_path):
    out = tmp_path / "run"
    # extraction on Ray: ingest, train and extract alone would start no Ray (tests/test_without_ray.py)
    done = subprocess.run([sys.executable, "-m", "featscope.cli", "run", *SMALL, "--set", "extract_in=ray",
                           "--out", str(out)], cwd=ROOT, env=_env(RAY_TMPDIR=stale_ray_tmpdir),
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "stats" / "extract").is_dir()
    for line in NOISE:  # nor any of Ray's notes
        assert line not in done.stderr, line
    # what is not noise still comes through the filter: the stage's bar (its 100% frame only when
    # the stage outlasts tqdm's 0.1 s refresh, which one 48-image shard in this process does not)
    assert "extract:   0%" in done.stderr


def test_an_unreachable_cluster_is_one_line(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "featscope.cli", "run", *SMALL, "--out", str(out)], cwd=ROOT,
                          env=_env(RAY_ADDRESS="127.0.0.1:1"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Ray cluster at 127.0.0.1:1 (RAY_ADDRESS)" in lines[0]
    assert not out.exists()  # checked before the run directory is made


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never sends a byte (a hung GCS)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for c in held + [server]:
        c.close()


def test_a_cluster_that_accepts_but_never_answers_is_one_line_in_bounded_time(silent_port, tmp_path):
    """Without the gRPC handshake probe ray.init waits on such a port for good (measured: > 100 s)."""
    out = tmp_path / "run"
    address = f"127.0.0.1:{silent_port}"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "featscope.cli", "run", *SMALL, "--out", str(out)], cwd=ROOT,
                          env=_env(RAY_ADDRESS=address), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the Ray cluster at {address}" in lines[0], lines
    assert "does not answer as a Ray cluster" in lines[0]
    assert time.monotonic() - start < 60
    assert not out.exists()


def test_auto_is_probed_at_the_address_ray_would_pick(silent_port, monkeypatch):
    """RAY_ADDRESS=auto means the cluster Ray finds (a running GCS, else its temp dir's last
    cluster, perhaps a hung one): that address is probed like any other. Which one Ray finds
    depends on what runs on the machine, so Ray's lookup is pinned here."""
    import ray._private.services as services

    from featscope.core.config import UserError
    from featscope.pipeline.runner import check_reachable

    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda addr, temp_dir=None: f"127.0.0.1:{silent_port}")
    start = time.monotonic()
    with pytest.raises(UserError, match=f"cluster at 127.0.0.1:{silent_port} .*does not answer as a Ray cluster"):
        check_reachable("auto", timeout=2)
    assert time.monotonic() - start < 30


def test_check_reachable_leaves_local_to_ray():
    from featscope.pipeline.runner import check_reachable

    check_reachable("local")  # nothing to probe: Ray starts one


def test_a_model_without_weights_is_said_once_not_once_per_replica(tmp_path):
    """The driver warns that a model without --weights is randomly initialised; each extract
    replica used to repeat it through Ray's log forwarding (a UserWarning with a source line)."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "featscope.cli", "run", "--data", "builtin:shapes?n=24&size=32",
                           "--model", "resnet18", "--image-size", "32", "--stages", "ingest,extract",
                           "--set", "perturb=[]", "--set", "extract_in=ray", "--out", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("randomly initialised") == 1, done.stderr[-2000:]
    assert "UserWarning" not in done.stderr


# The embedded Ray starts in a thread while the driver imports torch and builds the model
# (pipeline/runner.py start_ray_in_background). Two ways that goes wrong, each seen.

_BACKGROUND = """
import signal, sys, time
import psutil
from featscope.pipeline.runner import connect_ray, start_ray_in_background
start_ray_in_background()
import torch  # the driver's own work meanwhile
connect_ray()
time.sleep(3)  # the starting thread's work is long done
ray_children = [p for p in psutil.Process().children(recursive=True)
                if any(n in p.name() for n in ("gcs_server", "raylet"))]
alive = [p.name() for p in ray_children if p.status() != psutil.STATUS_ZOMBIE]
print("alive", sorted(alive))
print("sigterm", signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None))
"""


def test_ray_started_in_the_background_outlives_the_thread_that_started_it(tmp_path):
    """Ray ties its GCS and raylet to their parent with PR_SET_PDEATHSIG, which on Linux is the
    thread that started them: a starting thread that ends kills them (the driver then fails with
    "Failed to connect to GCS within 60 seconds" a minute later)."""
    temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # Ray's socket paths must fit in 107 bytes
    try:
        done = subprocess.run([sys.executable, "-c", _BACKGROUND], cwd=ROOT, env=_env(RAY_TMPDIR=temp),
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "alive ['gcs_server', 'raylet']" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "sigterm True" in done.stdout  # as ray.init sets it from the main thread: SIGTERM exits via atexit
    assert "SIGTERM handler is not set" not in done.stderr  # Ray's note about the thread, not the user's business


def _ray_processes_of(temp: str) -> list:
    """The processes holding files under `temp` open (Ray's own, whose logs are there; its agents
    retitle themselves `ray::DashboardAgent`, so command lines do not say whose they are)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and any(f.path.startswith(temp) for f in p.open_files()):
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


def test_a_run_refused_while_ray_starts_leaves_no_process_behind(tmp_path):
    """A bad model name is found after the data check, when Ray is already starting: the error
    line comes at once, and the exit waits for Ray's start and stops it (cut off instead, the
    agents its raylet had started stay behind, re-parented to init, for a minute or more: without
    the exit hook this test failed 5 runs of 6, the refusal landing at another point of Ray's start)."""
    temp = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    try:
        done = subprocess.run([sys.executable, "-m", "featscope.cli", "run", "--data", "builtin:shapes?n=24&size=32",
                               "--model", "resnet1800", "--out", str(tmp_path / "run")], cwd=ROOT,
                              env=_env(RAY_TMPDIR=temp), capture_output=True, text=True, timeout=300)
        time.sleep(1)
        left = [p.name() for p in _ray_processes_of(temp)]
        started = os.path.isdir(os.path.join(temp, "ray"))
    finally:
        for p in _ray_processes_of(temp):  # a failing test leaves nothing either
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'resnet1800'" in lines[0], lines
    assert started  # the premise: Ray was starting when the run was refused
    assert left == []
    assert not (tmp_path / "run").exists()
