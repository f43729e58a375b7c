"""A build happens next to its output folder and replaces it only when it completed:

    out/                      the previous good build, untouched while the new one runs
    .out.partial-<pid>/       the build in progress (left behind if the job is killed; removed by the next run)
    .out.previous/            only for the instant between the two renames of the swap
    out.export-only/          a build whose engine stage failed: its complete ONNX export, unvalidated; `out` is
                              left as it was

So a build killed at any stage (SIGINT, SIGKILL) leaves the previous build exactly as it was, and a rerun completes.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInput


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out: Path) -> None:
    """Undo what a killed build may have left: a half-done swap, stale partial folders."""
    out = Path(out)
    previous = out.parent / f".{out.name}.previous"
    if previous.exists():
        if out.exists():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            previous.rename(out)  # killed between the two renames: the old build comes back
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)) or int(pid) == os.getpid():
            shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def staged_build(out: Path):
    """Yields the folder to build into; on success it becomes `out` (the previous one is removed)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create {out.parent} ({e.strerror}); choose a writable --out") from None
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; choose a directory")
    recover(out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        partial.mkdir()
    except OSError as e:
        raise BadInput(f"cannot write next to {out} ({e.strerror}); choose a writable --out") from None
    try:
        yield partial
    except BaseException:  # a failed or interrupted (SIGINT) build: drop it, keep the previous one
        shutil.rmtree(partial, ignore_errors=True)
        raise
    promote(partial, out)


def export_only_path(out: Path) -> Path:
    """Where a build whose engine stage failed leaves its complete, unvalidated export: beside `out`, never in it."""
    return out.parent / f"{out.name}.export-only"


def promote(partial: Path, out: Path) -> None:
    """Make `partial` the new `out`: two renames, the previous folder parked under .NAME.previous between them."""
    previous = out.parent / f".{out.name}.previous"
    if out.exists():
        out.rename(previous)
    partial.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
