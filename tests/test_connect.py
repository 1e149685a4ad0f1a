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
    done = subprocess.run([sys.executable, "-m", "featscope.cli", "run", *SMALL, "--out", str(out)], cwd=ROOT,
                          env=_env(RAY_TMPDIR=stale_ray_tmpdir), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "stats" / "extract").is_dir()
    for line in NOISE:  # nor any of Ray's notes
        assert line not in done.stderr, line
    assert "extract: 100%" in done.stderr  # what is not noise still comes through the filter


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
                           "--set", "perturb=[]", "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("randomly initialised") == 1, done.stderr[-2000:]
    assert "UserWarning" not in done.stderr
