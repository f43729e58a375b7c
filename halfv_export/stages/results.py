"""What each library stage returns: the files it wrote and what they hold, typed for the fields a caller reads most,
with the whole JSON document beside them for everything else."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..base.kinds import SSRMode
from ..calibration.schedule import FIELDS, Choice, read_choices
from ..graphs.pruning import PruneSchedule


@dataclass(frozen=True)
class Calibration:
    """calibrate(): schedule.json (and tme.png, with a search pareto.png) in `out`."""

    out: Path
    schedule: PruneSchedule
    chosen_by: dict[str, Choice]
    document: dict  # schedule.json as written

    @classmethod
    def from_document(cls, out: Path, document: dict) -> "Calibration":
        return cls(Path(out), PruneSchedule(**{k: document["schedule"][k] for k in FIELDS}), read_choices(document),
                   document)

    @property
    def path(self) -> Path:
        return self.out / "schedule.json"

    @property
    def search(self) -> dict | None:
        """The search record (schedule.json "search") when calibrate searched under a FLOPs budget."""
        return self.document.get("search")

    def unplaced(self) -> dict[str, str]:
        """{layer field: why} for each layer the TME rules could not place (the paper's value stands)."""
        return {key: c.unplaced for key, c in self.chosen_by.items() if c.unplaced}

    def describe(self) -> str:
        s = self.schedule
        text = (f"IVR before layer {s.ivr_layer} keep {s.keep_ratio} (anchors {s.anchor_ratio}), "
                f"SSR {s.ssr_mode} from layer {s.ssr_layer}")
        text += f" keep {s.ssr_ratio}" if s.ssr_mode is SSRMode.TOPK else ""
        cut = self.document.get("vision_cut")
        return text + (f"; vision cut after tower block {cut['block']} keeping {cut['keep']} (the ratios above apply "
                       "to the tokens it keeps)" if cut else "")


@dataclass(frozen=True)
class Bucket:
    size: tuple[int, int]
    num_visual: int  # N
    k1: int  # kept by IVR
    k2: int  # visual rows from the SSR layer on


@dataclass(frozen=True)
class Artifacts:
    """export(): the ONNX graphs, weights.bin, artifacts.json and manifest.json in `path`."""

    path: Path
    meta: dict  # artifacts.json

    @property
    def graphs(self) -> list[str]:
        return list(self.meta["graphs"])

    @property
    def buckets(self) -> list[Bucket]:
        return [Bucket(tuple(b["size"]), b["num_visual"], b["k1"], b["k2"]) for b in self.meta["buckets"]]

    @property
    def schedule(self) -> PruneSchedule:
        return PruneSchedule(**self.meta["schedule"])


@dataclass(frozen=True)
class Engines:
    """engine(): what the target built (its engine.json) for the artifacts in `path`."""

    path: Path
    target: str
    info: dict

    @property
    def providers(self) -> list[str]:
        return list(self.info.get("providers", []))


@dataclass(frozen=True)
class Report:
    """validate(): report.json / report.md / latency.png (and kept.png) in `path`; `failures` lists the thresholds
    that failed (empty: the gate passed)."""

    path: Path
    data: dict  # report.json
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def accuracy(self) -> dict | None:
        """{"full", "halfv", "engine", "retention", "count", "stderr", ...} when the samples carried answers."""
        return self.data.get("accuracy")

    @property
    def flops_ratio(self) -> float:
        """LLM prefill FLOPs, unpruned / HalfV, at the largest bucket."""
        return self.data["flops"]["ratio"]

    @property
    def prefill_time_ratio(self) -> float:
        """Measured engine prefill time, unpruned / HalfV, at the largest bucket."""
        latency = self.data["latency_ms"]
        return latency["engine_full_prefill"] / latency["engine_halfv_prefill"]

    @property
    def parity(self) -> dict:
        return self.data["parity"]


@dataclass(frozen=True)
class Build:
    """build(): everything the four stages wrote, in `path` (the previous build there was replaced only because
    this one passed its gates)."""

    path: Path
    calibration: Calibration
    artifacts: Artifacts
    engines: Engines
    report: Report
