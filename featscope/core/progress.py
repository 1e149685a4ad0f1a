"""Progress bars (tqdm.auto: a widget in Jupyter, text on stderr elsewhere), silenced for
`--format json` and for `quiet=True` in the Python API."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

QUIET = False


def set_quiet(quiet: bool) -> None:
    global QUIET
    QUIET = quiet


def progress(items, desc: str, done: int = 0, total: int | None = None, unit: str = "shard"):
    """Yield from `items` (an iterable, or a list of Ray object refs completed as they finish)."""
    if _object_refs(items):
        import ray

        total = total if total is not None else done + len(items)
        bar = tqdm(total=total, initial=done, desc=desc, unit=unit, disable=QUIET, file=sys.stderr, leave=False)
        pending = list(items)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                yield ray.get(ref)
                bar.update(1)
        bar.close()
        return
    bar = tqdm(items, total=total, initial=done, desc=desc, unit=unit, disable=QUIET, file=sys.stderr, leave=False)
    yield from bar
    bar.close()


def _object_refs(items) -> bool:
    if not isinstance(items, list) or "ray" not in sys.modules:  # no refs without Ray imported
        return False
    import ray

    return not items or isinstance(items[0], ray.ObjectRef)


def say(*args) -> None:
    """A line on stderr, above any progress bar that is drawing."""
    if not QUIET:
        tqdm.write(" ".join(str(a) for a in args), file=sys.stderr)
