"""Drop lines that native code (Ray's C++ core worker) writes straight to file descriptor 2.

Python's logging filters cannot reach them: glog writes to the descriptor, not to sys.stderr.
The CLI routes fd 2 through a pipe and a thread that forwards everything except lines holding
one of the given texts. Each native message is one write() of less than PIPE_BUF bytes, so it
arrives whole in one read; everything else (tracebacks, progress bars' carriage returns) is
forwarded as it comes, byte for byte.
"""
from __future__ import annotations

import atexit
import os
import re
import select
import sys
import threading

# Ray Data's actor pools keep their constructor arguments in the object store, and Ray's core
# worker then warns for every actor with max_restarts > 0 (ray-project/ray#53727); featscope
# wants the restarts (a replica killed mid-shard is retried) and a user can do nothing about it
RAY_NATIVE_NOISE = ("has constructor arguments in the object store and max_restarts > 0",)

_installed = False


def drop_native_lines(texts: tuple[str, ...] = RAY_NATIVE_NOISE) -> None:
    """Install once per process; a no-op where fd 2 cannot be redirected."""
    global _installed
    if _installed:
        return
    try:
        sys.stderr.flush()
        original = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:
        return
    _installed = True
    pattern = re.compile(b"[^\n]*(?:" + b"|".join(re.escape(t.encode()) for t in texts) + b")[^\n]*\n?")
    wake_read, wake_write = os.pipe()  # restore() says "exiting" through it

    def forward():
        exiting = False
        while True:
            # once the process is exiting, stop at the first pause: Ray's children may still hold
            # the pipe's write end, so no end-of-file would ever come
            ready, _, _ = select.select([read_end] if exiting else [read_end, wake_read], [], [],
                                        0.05 if exiting else None)
            if wake_read in ready:
                exiting = True
                continue
            if not ready:
                return
            chunk = os.read(read_end, 65536)
            if not chunk:
                return
            chunk = pattern.sub(b"", chunk)
            if chunk:
                os.write(original, chunk)

    thread = threading.Thread(target=forward, name="featscope-stderr", daemon=True)
    thread.start()

    def restore():
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(original, 2)  # later writes go straight out; what is in the pipe drains
        os.write(wake_write, b"x")
        thread.join(timeout=2)

    atexit.register(restore)  # registered before Ray is imported: runs after Ray's own shutdown
