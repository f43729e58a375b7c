"""The samples a stage runs on when the user gives no --data, and the make-task stage that writes a task set."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..base.atomic import prepare_out_dir
from ..base.errors import BadInput
from ..graphs.adapter import get_adapter, read_training_record
from ..tasks.digits import DEFAULT_SLOT, parse_mix, task_set, write_task_set


def trained_task(meta: dict) -> tuple[str, int]:
    """(task kind, digit slot) an embedded default's training record names; grids before the page task existed."""
    task = meta.get("task", {})
    return task.get("kind", "grid"), task.get("slot", DEFAULT_SLOT)


def default_samples(loaded, count: int, seed: int, split: str, sizes: list | None = None,
                    any_size: bool = False) -> list | None:
    """Data for a stage run without --data on the trained embedded default: its own task (digit grids or pages, as
    its training record says, with answers), at `sizes` or else the image sizes it was trained on; `split` scans:
    "train" for calibration, "eval" for validation. None for any other model, or (unless any_size) sizes it was
    not trained on."""
    trained = [tuple(s) for s in loaded.meta.get("image_sizes", [])]
    sizes = [tuple(s) for s in sizes] if sizes else trained
    if not trained or not (any_size or all(s in trained for s in sizes)):
        return None
    kind, slot = trained_task(loaded.meta)
    return task_set(count, seed=seed, split=split, sizes=sizes, slot=slot, task=kind)


def task_kind(data: Path | None, loaded) -> str | None:
    """Which digit task the answers come from: the data folder's task.json (make-task), else the embedded
    default's own task (what default_samples drew)."""
    if data is None:
        return trained_task(loaded.meta)[0]
    info = (Path(data) if Path(data).is_dir() else Path(data).parent) / "task.json"
    return json.loads(info.read_text()).get("task", "grid") if info.exists() else None


def task_settings(backbone: str | None, image_sizes: list[tuple[int, int]], slot: int | None,
                  task: str | None = None) -> tuple[list[tuple[int, int]], int, str]:
    """Image sizes, digit slot and task kind of a task set: as given (sizes checked against the backbone's processor
    when one is named), else what the backbone's embedded default was trained on, else 224x224, the default slot
    and the page task."""
    if backbone is None:
        return image_sizes or [(224, 224)], slot or DEFAULT_SLOT, task or "page"
    adapter = get_adapter(backbone)
    record = read_training_record(adapter.embedded_dir)
    trained_kind, trained_slot = trained_task(record)
    slot, task = slot or trained_slot, task or trained_kind
    if not image_sizes:
        if not record.get("image_sizes"):
            raise BadInput(f"the embedded {backbone} has no training record; pass --image-size HxW")
        return [tuple(s) for s in record["image_sizes"]], slot, task
    processing = adapter.load_processing(adapter.embedded_dir)
    for size in image_sizes:
        bucket, _ = adapter.bucket_for(processing, size)
        if bucket != tuple(size):
            raise BadInput(f"--image-size {size[0]}x{size[1]}: {backbone}'s image processor turns it into "
                           f"{bucket[0]}x{bucket[1]} (resize/crop would move the grid cells); use "
                           f"--image-size {bucket[0]}x{bucket[1]}")
    return image_sizes, slot, task


@dataclass(frozen=True)
class TaskSet:
    """make_task(): images/*.png, prompts.jsonl and task.json in `out`."""

    out: Path
    info: dict  # task.json
    types: dict[str, int]  # questions per type

    @property
    def kind(self) -> str:
        return self.info["task"]


def make_task(out: Path, *, backbone: str | None = None, image_sizes: list[tuple[int, int]] = (), count: int = 200,
              seed: int = 0, split: str = "eval", mix: str | None = None, slot: int | None = None,
              task: str | None = None) -> TaskSet:
    """Write a fixed evaluation set of the digit task (pages or grids) with answers."""
    sizes, slot, task = task_settings(backbone, list(image_sizes), slot, task)
    mix_weights = parse_mix(mix)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "task.json").exists():
        raise BadInput(f"{out} is not empty and holds no earlier task; choose an empty or new --out")
    samples = task_set(count, seed=seed, split=split, sizes=sizes, mix=mix_weights, slot=slot, task=task)
    prepare_out_dir(out)
    (out / "prompts.jsonl").unlink(missing_ok=True)  # an interrupted rewrite leaves no stale, complete-looking set
    shutil.rmtree(out / "images", ignore_errors=True)
    info = {"generator": "halfv_export.tasks.digits", "task": task, "seed": seed, "split": split, "count": count,
            "image_sizes": [list(s) for s in sizes], "slot": slot, "mix": mix_weights, "backbone": backbone}
    write_task_set(samples, out, info)
    return TaskSet(out, info, {t: sum(s.type == t for s in samples) for t in mix_weights})
