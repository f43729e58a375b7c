"""schedule.json: the static HalfV schedule, where each value came from, and the calibration curves.

Reading is strict: a malformed file, a value out of range, or a schedule made for another model is refused with
one line that names the field and the fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from ..base.errors import BadInput
from ..base.kinds import SSR_MODES, SSRMode
from ..graphs.pruning import PruneSchedule, VisionCut
from ..base.atomic import write_text_atomic

SCHEMA_VERSION = 2  # 2: chosen_by holds {"by", "why", "unplaced"} per field (1: one line of prose, still read)
READABLE_VERSIONS = (1, 2)
FIELDS = ("ivr_layer", "keep_ratio", "anchor_ratio", "ssr_layer", "ssr_mode", "ssr_ratio")
DEFAULT_SSR_RATIO = 0.05  # HalfV's sigma, for a topk schedule whose paper values give none (LLaVA)


MOVED = "; moved to L1 + 1"  # a paper L2 at or above the rules' L1, moved below it (rules.derive_schedule)


class ChosenBy(StrEnum):
    PAPER = "paper"  # the paper's value, at the model's relative depth
    RULE = "rule"  # a calibration rule read it off the measured curves or probes
    SEARCH = "search"  # the FLOPs-budget search
    CLI = "cli"  # the user's flag
    DEFAULT = "default"  # settled by another field: sigma unused in freeze mode, or HalfV's default sigma


@dataclass(frozen=True)
class Choice:
    """Where one schedule value came from. `unplaced`: a rule looked for this layer and the curve had no turn where
    it looked (why, in words); the value is then the paper's, and the CLI says so."""

    by: ChosenBy
    why: str = ""
    unplaced: str | None = None

    def to_json(self) -> dict:
        return {"by": self.by.value, "why": self.why, "unplaced": self.unplaced}

    @classmethod
    def from_json(cls, data) -> "Choice":
        if isinstance(data, str):  # schema 1: "cli", "rule: ...", "paper: ...; no <why>", "search: ...", other prose
            head, _, rest = data.partition(": ")
            if data == "cli":
                return cls(ChosenBy.CLI)
            if head in ("rule", "search"):
                return cls(ChosenBy(head), rest)
            if head == "paper":
                moved = rest.endswith(MOVED)
                why, found, unplaced = rest.removesuffix(MOVED).partition("; no ")
                return cls(ChosenBy.PAPER, why + (MOVED if moved else ""), unplaced if found else None)
            return cls(ChosenBy.DEFAULT, data)
        return cls(ChosenBy(data["by"]), data.get("why", ""), data.get("unplaced"))

    def __str__(self) -> str:
        text = f"{self.by}: {self.why}" if self.why else str(self.by)
        return text + (f" (no {self.unplaced})" if self.unplaced else "")


def apply_overrides(values: dict, overrides: dict) -> dict[str, Choice]:
    """Put the CLI's fields over `values`, then settle ssr_ratio for the resulting mode (None in freeze mode, HalfV's
    sigma in topk mode when nothing gave one). Returns {field: Choice} for every field this set."""
    why = {key: Choice(ChosenBy.CLI) for key, value in overrides.items() if value is not None}
    values.update({key: overrides[key] for key in why})
    if "ssr_ratio" not in why:
        if values.get("ssr_mode") == SSRMode.FREEZE:
            values["ssr_ratio"], why["ssr_ratio"] = None, Choice(ChosenBy.DEFAULT, "unused in freeze mode")
        elif values.get("ssr_ratio") is None:
            values["ssr_ratio"] = DEFAULT_SSR_RATIO
            why["ssr_ratio"] = Choice(ChosenBy.DEFAULT, "HalfV's default sigma (the paper gives none)")
    return why


def check_values(values: dict, depth: int | None, where: str = "schedule") -> PruneSchedule:
    """Range-check the six schedule fields (depth None: layers checked only against each other)."""
    for key in FIELDS:
        if key not in values:
            raise BadInput(f"{where}: field '{key}' is missing; re-run calibrate or add it")

    def ratio(key, optional=False):
        v = values[key]
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 1:
            raise BadInput(f"{where}: {key}={v!r} must be a number in (0, 1]")
        return float(v)

    def layer(key):
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise BadInput(f"{where}: {key}={v!r} must be an integer layer index")
        return v

    l1, l2 = layer("ivr_layer"), layer("ssr_layer")
    mode = values["ssr_mode"]
    if mode not in SSR_MODES:
        raise BadInput(f"{where}: ssr_mode={mode!r} must be one of {', '.join(SSR_MODES)}")
    sched = PruneSchedule(ivr_layer=l1, keep_ratio=ratio("keep_ratio"), anchor_ratio=ratio("anchor_ratio"),
                          ssr_layer=l2, ssr_mode=mode, ssr_ratio=ratio("ssr_ratio", optional=(mode == SSRMode.FREEZE)))
    if mode == SSRMode.TOPK and sched.ssr_ratio is None:
        raise BadInput(f"{where}: ssr_mode=topk needs ssr_ratio in (0, 1]")
    if l1 < 1:
        raise BadInput(f"{where}: ivr_layer={l1} must be >= 1 (IVR scores come from the layer before it)")
    if l2 <= l1:
        raise BadInput(f"{where}: ssr_layer={l2} must be greater than ivr_layer={l1}")
    if depth is not None and l2 >= depth:
        raise BadInput(f"{where}: ssr_layer={l2} must be below the model's depth {depth}")
    return sched


def paper_schedule(adapter, depth: int) -> PruneSchedule:
    """The paper's schedule for the adapter's backbone at this depth, sigma settled for its mode."""
    values = adapter.paper.at_depth(depth)
    apply_overrides(values, {})
    return check_values(values, depth, where="paper schedule")


def build_document(backbone: str, fingerprint: str, source: str, depth: int, values: dict,
                   chosen_by: dict[str, Choice], calibration: dict | None, tool_version: str,
                   vision_cut: VisionCut | None = None) -> dict:
    sched = check_values(values, depth)
    chosen = {key: choice.to_json() for key, choice in chosen_by.items()}
    if vision_cut is not None and "vision_cut" not in chosen:
        chosen["vision_cut"] = Choice(ChosenBy.CLI).to_json()
    return {
        "schema_version": SCHEMA_VERSION,
        "backbone": backbone,
        "model": {"fingerprint": fingerprint, "source": source, "num_layers": depth},
        "schedule": asdict(sched),
        # beyond the paper: a cut inside the vision tower (graphs/vision_cut.py); absent or null: none
        "vision_cut": None if vision_cut is None else asdict(vision_cut),
        "chosen_by": chosen,
        "calibration": calibration,
        "created_by": f"halfv-export {tool_version}",
    }


def write_schedule(path: Path, document: dict) -> None:
    write_text_atomic(Path(path), json.dumps(document, indent=2) + "\n")


def read_schedule(path: Path, backbone: str | None = None, fingerprint: str | None = None,
                  depth: int | None = None) -> tuple[PruneSchedule, dict]:
    """Parse and check a schedule.json; with backbone / fingerprint / depth given, it must be for that model."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"schedule {path} does not exist; run `halfv-export calibrate` to make one") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"schedule {path} is not valid JSON; re-run `halfv-export calibrate`") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("schedule"), dict) or not isinstance(doc.get("model"), dict):
        raise BadInput(f"schedule {path} lacks the 'schedule'/'model' sections; re-run `halfv-export calibrate`")
    if doc.get("schema_version") not in READABLE_VERSIONS:
        raise BadInput(f"schedule {path} has schema_version {doc.get('schema_version')!r}, this tool reads "
                       f"{' and '.join(map(str, READABLE_VERSIONS))}; re-run `halfv-export calibrate`")
    if backbone is not None and doc.get("backbone") != backbone:
        raise BadInput(f"schedule {path} is for backbone '{doc.get('backbone')}', not '{backbone}'; "
                       "calibrate this backbone or pass its schedule")
    if fingerprint is not None and doc["model"].get("fingerprint") != fingerprint:
        raise BadInput(f"schedule {path} was calibrated for another model (fingerprint mismatch); "
                       "re-run `halfv-export calibrate` on this model")
    recorded = doc["model"].get("num_layers")
    if recorded is not None and (isinstance(recorded, bool) or not isinstance(recorded, int) or recorded < 2):
        raise BadInput(f"schedule {path}: model.num_layers={recorded!r} must be the model's depth, an integer >= 2; "
                       "re-run `halfv-export calibrate`")
    sched = check_values(doc["schedule"], depth if depth is not None else recorded, where=f"schedule {path}")
    return sched, doc


def read_vision_cut(doc: dict, where: str = "schedule") -> VisionCut | None:
    """schedule.json's optional vision_cut {"block": int, "keep": (0, 1)} (None when absent or null); the tower
    checks the block when the graph is made (vision_cut.check_cut)."""
    raw = doc.get("vision_cut")
    if raw is None:
        return None
    block, keep = (raw.get("block"), raw.get("keep")) if isinstance(raw, dict) else (None, None)
    if (isinstance(block, bool) or not isinstance(block, int) or isinstance(keep, bool)
            or not isinstance(keep, (int, float)) or not 0 < keep < 1):
        raise BadInput(f"{where}: vision_cut={raw!r} must be {{\"block\": <int>, \"keep\": <number in (0, 1)>}} or "
                       "null; fix it or re-run calibrate with --vision-cut BLOCK:KEEP")
    return VisionCut(block, float(keep))


def read_choices(doc: dict) -> dict[str, Choice]:
    """schedule.json's chosen_by as data, whichever schema wrote it."""
    return {key: Choice.from_json(value) for key, value in (doc.get("chosen_by") or {}).items()}
