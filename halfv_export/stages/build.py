"""build(): calibrate -> export -> engine -> validate into a staging folder beside `out`, gated on parity with the
fp32 eager reference; `out` is replaced only by a build that passed (base/staging.py)."""

from __future__ import annotations

from pathlib import Path

from ..base.errors import BadInput, HalfvError, RuntimeFailure
from ..base.staging import export_only_path, promote, staged_build
from ..engines import DEFAULT_TARGET
from ..graphs.pruning import VisionCut
from .calibrate import Probes, Search, calibrate
from .engine import engine
from .export import export
from .progress import ProgressCallback, ProgressEvent, Stage
from .results import Artifacts, Build, Calibration, Engines, Report
from .validate import DEFAULT_GATES_OVER, DEFAULT_GATES_UNDER, validate


class BuildFailed(RuntimeFailure):
    """The build ran to the end and its gates failed: `report` says how, `calibration` and `artifacts` what was
    built (their folder is gone); the previous build in `out` is kept."""

    def __init__(self, message: str, calibration: Calibration, artifacts: Artifacts, report: Report):
        super().__init__(message)
        self.calibration, self.artifacts, self.report = calibration, artifacts, report


class EngineStageFailed(HalfvError):
    """A target other than ONNX Runtime failed to build its engines (`cause`): the complete, unvalidated export is
    in `path` (OUT.export-only), and `out` is as it was. The exit code is the cause's."""

    def __init__(self, message: str, path: Path, cause: HalfvError):
        super().__init__(message)
        self.path, self.cause, self.exit_code = path, cause, cause.exit_code


def build(backbone: str, out: Path, *, model: Path | None = None, data: Path | None = None,
          image_sizes: list[tuple[int, int]] = (), target: str = DEFAULT_TARGET, precision: str = "fp32",
          paper_values: bool = False, random_weights: int | None = None, overrides: dict | None = None,
          search: Search | None = None, vision_cut: VisionCut | None = None, latency_runs: int | None = None,
          progress: ProgressCallback | None = None) -> Build:
    """-> Build in `out`. fp32 builds are gated (kept indices 1.0, greedy tokens 1.0, logits within 1e-3); fp16 /
    bf16 builds are reported, not gated. Raises BuildFailed (with the report) when a gate fails. When the engine
    stage of a target other than ONNX Runtime fails, the complete export goes to OUT.export-only/ and `out` stays
    as it was."""
    if random_weights is not None and model is not None:
        raise BadInput("--random-weights applies to the embedded default only; drop it or --model")
    say = progress or (lambda event: None)
    image_sizes = [tuple(s) for s in image_sizes]
    if search is not None and search.bucket is None and image_sizes:
        search = Search(search.target_ratio, search.ratio_kind, image_sizes[0])  # met where the build exports
    out = Path(out)
    with staged_build(out) as work:  # the previous build in `out` stays intact until this one has passed
        say(ProgressEvent(Stage.CALIBRATE, message="[1/4] calibrate"))
        calibration = calibrate(backbone, work, model=model, data=data, random_weights=random_weights,
                                paper_values=paper_values, overrides=overrides, search=search, probes=Probes(),
                                vision_cut=vision_cut,
                                progress=progress)
        say(ProgressEvent(Stage.EXPORT, message="[2/4] export"))
        artifacts = export(work / "schedule.json", work, model=model, image_sizes=image_sizes, precision=precision,
                           progress=progress)
        say(ProgressEvent(Stage.ENGINE, message=f"[3/4] engine ({target})"))
        try:
            engines = engine(work, target, progress=progress)
        except HalfvError as e:
            if target == DEFAULT_TARGET:
                raise
            # the export is complete but unvalidated: it goes beside `out` under a name that says so, never over
            # the previous (validated) build
            aside = export_only_path(out)
            promote(work, aside)
            raise EngineStageFailed(f"stopped after export: {e}. {out} is unchanged; this run's unvalidated ONNX "
                                    f"graphs are in {aside} (halfv-export engine --artifacts {aside} --target "
                                    "onnxruntime)", aside, e) from None
        say(ProgressEvent(Stage.VALIDATE, message="[4/4] validate"))
        gated = precision == "fp32"
        report = validate(work, model=model, fail_under=DEFAULT_GATES_UNDER if gated else (),
                          fail_over=DEFAULT_GATES_OVER if gated else (), target=target, latency_runs=latency_runs,
                          progress=progress)
        if report.failures:
            raise BuildFailed("validation failed: " + "; ".join(report.failures)
                              + f"; the previous build in {out} is kept", calibration, artifacts, report)
    # the folder was renamed into `out`: the results name the files where they now are
    return Build(out, Calibration(out, calibration.schedule, calibration.chosen_by, calibration.document),
                 Artifacts(out, artifacts.meta), Engines(out, engines.target, engines.info),
                 Report(out, report.data, report.failures))
