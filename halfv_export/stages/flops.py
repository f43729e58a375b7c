"""flops(): the LLM prefill FLOPs of a published config, full vs HalfV (and with the vision tower, time to first
token), for a schedule.json, explicit fields or the backbone's paper schedule."""

from __future__ import annotations

from pathlib import Path

from ..base.errors import BadInput
from ..base.kinds import SSRMode
from ..calibration.schedule import FIELDS, apply_overrides, check_values, read_schedule
from ..graphs.adapter import adapter_for_model_type
from ..graphs.checkpoint import read_config_json
from ..measure.flops import LMShape, prefill_flops
from ..graphs.pruning import VisionCut
from ..measure.vision_flops import check_vision_cut, vision_flops


def describe(values: dict) -> str:
    text = (f"IVR before layer {values['ivr_layer']} keep {values['keep_ratio']} anchors {values['anchor_ratio']}; "
            f"SSR {values['ssr_mode']} from layer {values['ssr_layer']}")
    return text + (f" keep {values['ssr_ratio']}" if values["ssr_mode"] == SSRMode.TOPK else "")


def flops_table(config_path: Path, schedule_path: Path | None, overrides: dict, visual: list[int],
                text_tokens: int, end_to_end: bool = False,
                vision_cut: VisionCut | None = None) -> tuple[list[dict], str]:
    """-> (one row per visual-token count, the schedule in words). A vision cut implies end_to_end: its rows add
    the cut tower's FLOPs, the LLM prefill on the K kept tokens under the same schedule, and their TTFT ratio."""
    config = read_config_json(config_path)
    shape = LMShape.from_config(config)
    if schedule_path is not None:
        sched, _ = read_schedule(schedule_path, depth=shape.layers)
        values = {key: getattr(sched, key) for key in FIELDS}
    else:
        adapter = adapter_for_model_type(str(config.get("model_type")))
        if adapter is not None:
            values = adapter.paper.at_depth(shape.layers)
        elif all(overrides.get(k) is not None for k in FIELDS if k != "ssr_ratio"):
            values = {}
        else:
            raise BadInput(f"no paper schedule for model_type '{config.get('model_type')}'; pass --schedule or "
                           "--ivr-layer/--keep-ratio/--anchor-ratio/--ssr-layer/--ssr-mode")
    apply_overrides(values, overrides)
    sched = check_values(values, shape.layers, where="flops schedule")
    if vision_cut is not None:  # refused before any row, whatever the token counts
        check_vision_cut(config, vision_cut)
    rows = []
    for n in visual:
        f = prefill_flops(shape, n, text_tokens, sched)
        row = {"visual": n, "text": text_tokens, "full": f.full, "halfv": f.halfv, "overhead": f.overhead,
               "ratio": f.ratio, "ratio_with_overhead": f.ratio_with_overhead}
        if end_to_end or vision_cut is not None:  # TTFT; LLM-only HalfV leaves the vision encoder as it is
            v = vision_flops(config, shape.hidden, n)
            row.update({"vision": v.total, "vision_windowed_attention": v.windowed_attention,
                        "vision_full_attention": v.full_attention, "vision_grid": list(v.grid),
                        "e2e_full": v.total + f.full, "e2e_halfv": v.total + f.halfv,
                        "e2e_ratio": (v.total + f.full) / (v.total + f.halfv)})
        if vision_cut is not None and n > 0:
            cut = vision_flops(config, shape.hidden, n, cut=vision_cut)
            llm = prefill_flops(shape, cut.kept, text_tokens, sched)
            row.update({"cut_tokens": cut.kept, "vision_cut": cut.total, "halfv_cut": llm.halfv,
                        "e2e_cut": cut.total + llm.halfv, "e2e_cut_ratio": (v.total + f.full) / (cut.total + llm.halfv)})
        rows.append(row)
    text = describe(values)
    if vision_cut is not None:
        text += f"; vision cut after block {vision_cut.block} keep {vision_cut.keep}"
    return rows, text
