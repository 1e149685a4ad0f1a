"""Run featscope on a Ray cluster of N one-CPU nodes made on this machine (ray.cluster_utils.Cluster).

    python tests/cluster_run.py CONFIG.yaml OUT NODES REPORT.json

A separate process, because a Cluster cannot share a process with another Ray (the test
session's own). REPORT.json maps every extract replica's pid to the node (0 = head) it ran
on, seen by watching each node's raylet's child processes while the run goes on.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import warnings

import psutil
import ray
from ray.cluster_utils import Cluster

from featscope.core.config import build_config
from featscope.pipeline.runner import run_pipeline


def raylet_pid(node) -> int:
    return node.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def main(config: str, out: str, nodes: int, report: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    raylets = [raylet_pid(n) for n in cluster.list_all_nodes()]
    seen: dict[int, int] = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for node, pid in enumerate(raylets):
                for p in psutil.Process(pid).children(recursive=True):
                    try:
                        if "ShardExtractor" in " ".join(p.cmdline()):
                            seen.setdefault(p.pid, node)
                    except psutil.Error:
                        pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        cfg = build_config(config, {"out": out})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_pipeline(cfg, quiet=True)
        alive = [n for n in ray.nodes() if n["Alive"]]
    finally:
        stop.set()
        watcher.join()
        ray.shutdown()
        cluster.shutdown()
    with open(report, "w") as fh:
        json.dump({"nodes": len(alive), "replica_node": {str(k): v for k, v in seen.items()}}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
