"""engine(): build the target's engines for this machine from verified artifacts."""

from __future__ import annotations

from pathlib import Path

from ..base.manifest import verify_manifest, write_manifest
from ..engines import DEFAULT_TARGET, EngineOptions, get_target
from .progress import ProgressCallback, Reporter, Stage
from .results import Engines


def engine(artifacts: Path, target: str = DEFAULT_TARGET, options: EngineOptions | None = None,
           progress: ProgressCallback | None = None) -> Engines:
    """-> Engines: every artifact's sha256 checked, then `target` (onnxruntime or tensorrt) builds into its folder
    under `artifacts` and records what it built (engine.json); the manifest is rewritten to cover it."""
    report = Reporter(Stage.ENGINE, progress)
    options = options or EngineOptions()
    engine_target = get_target(target)
    with report.status("checking every artifact's sha256"):
        verified = verify_manifest(artifacts)
    with report.status(f"building {target} engines"):
        info = engine_target.build(artifacts, options, report.message)
    extra = engine_target.manifest_extra(artifacts, options) if engine_target.manifest_extra else None
    write_manifest(artifacts, extra, verified=verified)
    return Engines(Path(artifacts), target, info)
