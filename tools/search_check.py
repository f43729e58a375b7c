"""A searched schedule beside the paper's on held-out questions, without exporting anything.

    halfv-export calibrate --backbone qwen2.5-vl --target-ratio 3 --bucket 448x448 --out /tmp/s448
    halfv-export make-task --backbone qwen2.5-vl --image-size 448x448 --count 200 --out /tmp/eval448
    python tools/search_check.py --schedule /tmp/s448/schedule.json --data /tmp/eval448

`validate` runs the same check (report.json "search_check") on artifacts built from a searched schedule; this runs it
eagerly at a size nobody exported, which is how the README's schedule-search table is measured. Prints the check as
JSON: per schedule (searched, paper) the FLOPs ratio at the search's bucket, KL, top-1 agreement and task accuracy,
and the unpruned model's accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from halfv_export.base.data import load_data
from halfv_export.base.errors import BadInput
from halfv_export.calibration.schedule import read_schedule
from halfv_export.graphs.checkpoint import config_fingerprint
from halfv_export.calibration.search import held_out_check
from halfv_export.graphs import get_adapter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", type=Path, required=True, help="schedule.json written by calibrate --target-ratio")
    parser.add_argument("--data", type=Path, required=True, help="prompts.jsonl (with answers) or its folder")
    parser.add_argument("--model", type=Path, help="the checkpoint it was calibrated on (default: the embedded one)")
    args = parser.parse_args(argv)
    _, doc = read_schedule(args.schedule)
    if not doc.get("search"):
        parser.error(f"{args.schedule} was not searched; calibrate with --target-ratio R")
    adapter = get_adapter(doc["backbone"])
    loaded = adapter.load(args.model)
    schedule, _ = read_schedule(args.schedule, backbone=adapter.name, fingerprint=config_fingerprint(loaded.config),
                                depth=adapter.text_stack(loaded).num_layers)
    check = held_out_check(adapter, loaded, load_data(args.data), schedule, doc["search"])
    print(json.dumps(check, indent=2))


if __name__ == "__main__":
    try:
        main()
    except BadInput as error:  # one line and exit 2, as the CLI does
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
