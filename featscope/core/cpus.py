"""How many cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

`os.sched_getaffinity` alone says 64 in a `docker run --cpus=2` container on a 64-core host, and
64 torch threads on a 2-core quota run far slower than 2 (they are throttled in turn). Ray's own
count (`ray._private.utils.get_num_cpus`) reads the quota of the cgroup root only, truncates a
fractional one and ignores a `taskset` affinity; here the count is the quota of this process's
cgroup and its ancestors (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up
(1.5 cores is 2 threads), never more than the affinity allows, and the embedded Ray is started
with it so both agree.
"""
from __future__ import annotations

import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"


def usable_cpus(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> int:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    quota = cgroup_quota(cgroup_root, proc_cgroup)
    return max(1, min(affinity, math.ceil(quota))) if quota else max(1, affinity)


def cgroup_quota(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPU quota (cores) of this process's cgroup and its ancestors, the smallest; None
    when there is none (or no cgroup file system)."""
    quotas = [q for q in (_v2_quota(d) for d in _own_dirs(cgroup_root, proc_cgroup, "")) if q]
    quotas += [q for q in (_v1_quota(d) for d in _own_dirs(os.path.join(cgroup_root, "cpu"), proc_cgroup, "cpu"))
               if q]
    return min(quotas) if quotas else None


def _own_dirs(root: str, proc_cgroup: str, controller: str) -> list[str]:
    """The cgroup folders from this process's own up to the root (the root is what a container
    sees of its own cgroup when the namespace hides the host's path)."""
    rel = ""
    try:
        with open(proc_cgroup) as fh:
            for line in fh:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                names = ctrls.split(",")
                if (controller and controller in names) or (not controller and ctrls == ""):
                    rel = path.strip("/")
                    break
    except OSError:
        pass
    dirs, parts = [], rel.split("/") if rel else []
    for i in range(len(parts), -1, -1):
        d = os.path.join(root, *parts[:i])
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    return dirs


def _v2_quota(folder: str) -> float | None:
    try:
        with open(os.path.join(folder, "cpu.max")) as fh:
            quota, period = fh.read().split()[:2]
    except (OSError, ValueError):
        return None
    return float(quota) / float(period) if quota.isdigit() and period.isdigit() and int(period) > 0 else None


def _v1_quota(folder: str) -> float | None:
    try:
        with open(os.path.join(folder, "cpu.cfs_quota_us")) as q, open(os.path.join(folder, "cpu.cfs_period_us")) as p:
            quota, period = int(q.read()), int(p.read())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
