"""manifest.json: versions, the schedule, and the sha256 of every artifact. `validate` and `run` check it before
they load anything, so a tampered or half-copied file is refused."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from .version import VERSION
from .errors import BadInput
from .atomic import write_text_atomic

MANIFEST = "manifest.json"
_SKIP = {MANIFEST}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def artifact_files(out: Path) -> list[Path]:
    return sorted(p for p in Path(out).rglob("*") if p.is_file() and p.name not in _SKIP
                  and not p.name.startswith(".") and not any(part.startswith(".") for part in p.relative_to(out).parts))


_STANDARD = {"tool", "versions", "python", "schedule", "files"}


def write_manifest(out: Path, extra: dict | None = None) -> dict:
    """Re-hash everything; keys beyond the standard ones (e.g. "trtexec") carry over unless `extra` replaces them."""
    out = Path(out)
    previous = {}
    if (out / MANIFEST).exists():
        try:
            previous = {k: v for k, v in json.loads((out / MANIFEST).read_text()).items() if k not in _STANDARD}
        except (json.JSONDecodeError, AttributeError):
            previous = {}
    schedule = json.loads((out / "schedule.json").read_text()) if (out / "schedule.json").exists() else None
    manifest = {
        "tool": f"halfv-export {VERSION}",
        "versions": {pkg: _version(pkg) for pkg in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime",
                                                     "onnxruntime-gpu", "tensorrt")},
        "python": platform.python_version(),
        "schedule": schedule["schedule"] if schedule else None,
        "files": {str(p.relative_to(out)): sha256_file(p) for p in artifact_files(out)},
        **previous, **(extra or {}),
    }
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(out: Path, only: list[str] | None = None) -> dict:
    """Check sha256 of the listed files (default: all in the manifest). One line names the first bad file."""
    out = Path(out)
    path = out / MANIFEST
    if not path.exists():
        raise BadInput(f"{out} has no {MANIFEST}; re-run `halfv-export export` (or build) into it")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BadInput(f"{path} is unreadable; re-run `halfv-export export`") from None
    for name in only if only is not None else files:
        if name not in files:
            continue
        target = out / name
        if not target.exists():
            raise BadInput(f"{target} is missing (listed in {MANIFEST}); re-run `halfv-export export`")
        if sha256_file(target) != files[name]:
            raise BadInput(f"{target} does not match its sha256 in {MANIFEST} (modified or damaged); "
                           "re-run `halfv-export export`")
    return manifest
