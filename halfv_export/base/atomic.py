"""Artifacts are written to a temporary file beside the target and renamed into place, so a killed job never
leaves a half-written file that looks valid."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import BadInput


def prepare_out_dir(out: Path) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create output directory {out} ({e.strerror}); choose a writable --out") from None
    if not os.access(out, os.W_OK):
        raise BadInput(f"output directory {out} is not writable; choose a writable --out")
    return out


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise BadInput(f"cannot write {path} ({e.strerror}); free space or choose another --out") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())
