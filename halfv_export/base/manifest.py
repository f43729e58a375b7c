"""manifest.json: versions, the schedule, and the sha256 of every artifact, checked before anything is loaded.

Two levels of checking (verify_manifest):
  full   (validate, engine): the sha256 of every listed file is recomputed.
  fast   (run): every listed file must exist with its recorded size; files up to SAMPLE_ALL_BYTES are hashed in full
         (graphs, configs, tokenizer: everything but the weights); a larger file (weights.bin) is checked by the
         sha256 of SAMPLES blocks of SAMPLE_BYTES at evenly spaced offsets, first and last block included.
         Catches a missing, truncated, extended, replaced or re-exported file and any change to a graph; it does not
         catch a same-size in-place edit of a large file that misses every sampled block (run `validate` for that).
"""

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
SAMPLE_ALL_BYTES = 64 << 20
SAMPLE_BYTES = 1 << 20
SAMPLES = 64


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sampled_sha256(path: Path) -> str:
    """sha256 over the size and SAMPLES blocks of SAMPLE_BYTES at evenly spaced offsets (first and last included);
    reads SAMPLES MiB whatever the file size."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256(str(size).encode())
    last = max(size - SAMPLE_BYTES, 0)
    with open(path, "rb") as f:
        for i in range(SAMPLES):
            f.seek(last * i // (SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def artifact_files(out: Path) -> list[Path]:
    return sorted(p for p in Path(out).rglob("*") if p.is_file() and p.name not in _SKIP
                  and not p.name.startswith(".") and not any(part.startswith(".") for part in p.relative_to(out).parts))


_STANDARD = {"tool", "versions", "python", "schedule", "files", "sizes", "samples"}


def write_manifest(out: Path, extra: dict | None = None, verified: dict | None = None) -> dict:
    """Hash everything; keys beyond the standard ones (e.g. "trtexec") carry over unless `extra` replaces them.

    `verified` (what verify_manifest(full=True) returned in this process) lets unchanged files keep their hash: a file
    whose size and mtime are what they were when it was verified is not read again."""
    out = Path(out)
    previous = {}
    if (out / MANIFEST).exists():
        try:
            previous = {k: v for k, v in json.loads((out / MANIFEST).read_text()).items() if k not in _STANDARD}
        except (json.JSONDecodeError, AttributeError):
            previous = {}
    schedule = json.loads((out / "schedule.json").read_text()) if (out / "schedule.json").exists() else None
    known = (verified or {}).get("_verified_stats", {})
    files, samples, sizes = {}, {}, {}
    for p in artifact_files(out):
        name = str(p.relative_to(out))
        stat = p.stat()
        if known.get(name) == [stat.st_size, stat.st_mtime_ns]:
            files[name] = verified["files"][name]
            sample = verified.get("samples", {}).get(name)
        else:
            files[name] = sha256_file(p)
            sample = None
        sizes[name] = stat.st_size
        if stat.st_size > SAMPLE_ALL_BYTES:
            samples[name] = sample or sampled_sha256(p)
    manifest = {
        "tool": f"halfv-export {VERSION}",
        "versions": {pkg: _version(pkg) for pkg in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime",
                                                     "onnxruntime-gpu", "tensorrt")},
        "python": platform.python_version(),
        "schedule": schedule["schedule"] if schedule else None,
        "files": files, "sizes": sizes, "samples": samples,
        **previous, **(extra or {}),
    }
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(out: Path, only: list[str] | None = None, full: bool = True) -> dict:
    """Check the listed files (default: all in the manifest): full=True recomputes every sha256, full=False is the
    fast check described in the module docstring. One line names the first bad file."""
    out = Path(out)
    path = out / MANIFEST
    if not path.exists():
        raise BadInput(f"{out} has no {MANIFEST}; re-run `halfv-export export` (or build) into it")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        sizes = manifest.get("sizes", {})
        samples = manifest.get("samples", {})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise BadInput(f"{path} is unreadable; re-run `halfv-export export`") from None
    stats = {}
    for name in only if only is not None else files:
        if name not in files:
            continue
        target = out / name
        if not target.exists():
            raise BadInput(f"{target} is missing (listed in {MANIFEST}); re-run `halfv-export export`")
        stat = target.stat()
        damaged = BadInput(f"{target} does not match its sha256 in {MANIFEST} (modified or damaged); "
                           "re-run `halfv-export export`")
        if name in sizes and stat.st_size != sizes[name]:
            raise damaged
        if full or name not in samples or name not in sizes:
            if sha256_file(target) != files[name]:
                raise damaged
            stats[name] = [stat.st_size, stat.st_mtime_ns]
        elif sampled_sha256(target) != samples[name]:
            raise damaged
    if full:
        manifest["_verified_stats"] = stats
    return manifest
