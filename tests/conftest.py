"""Shared fixtures: one Ray per test session (num_cpus=2), small data made on the spot."""
from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# tests/test_paths.py reads SRC from a local moto S3 server; the S3 client (in the Ray workers too,
# started below with this environment) needs some credentials and no EC2 metadata lookups
os.environ.setdefault("AWS_ACCESS_KEY_ID", "featscope-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "featscope-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from featscope.pipeline.runner import connect_ray

    connect_ray(num_cpus=2)
    yield ray
    ray.shutdown()


DIGITS = {"train_epochs": 4, "perturb": ["noise=0.02", "noise=0.05", "noise=0.1", "noise=0.2", "shift=2"]}


@pytest.fixture(scope="session")
def digits_run(ray_session, tmp_path_factory):
    """The embedded default (trained smallcnn on builtin:digits), made once for the session through
    the Python API (tests/test_api.py checks that `featscope run` makes the same tables)."""
    import featscope

    out = tmp_path_factory.mktemp("digits") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        featscope.run(out=str(out), quiet=True, **DIGITS)
    return str(out)
