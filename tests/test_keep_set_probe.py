"""tools/keep_set_probe.py cuts to a given row set through HalfVReference's force path; the cut must be exactly that."""

import importlib.util
from pathlib import Path

import pytest
import torch

from halfv_export.tasks.digits import task_set
from halfv_export.graphs import get_adapter
from halfv_export.graphs.halfv import HalfVReference

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("keep_set_probe", ROOT / "tools" / "keep_set_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


@pytest.mark.parametrize("backbone", ["llava-1.5", "qwen2.5-vl"])  # 256 and 64 visual rows
def test_a_given_row_set_is_kept_and_all_rows_change_nothing(backbone):
    adapter = get_adapter(backbone)
    loaded = adapter.load(None)
    stack = adapter.text_stack(loaded)
    sample = task_set(1, seed=0, split="eval", sizes=[(224, 224)])[0]
    inputs = adapter.prepare(loaded, [sample.image], [sample.prompt])
    n = inputs.num_visual
    given = HalfVReference(stack, probe.given_rows_cut(2, stack.num_layers))
    rows = torch.tensor([[0, 5, 17, n - 2, n - 1]])
    assert given.prefill(inputs, force={"ivr": rows}).kept["ivr"].tolist() == rows.tolist()
    # every row kept + a freeze of the last layer only = the unpruned model's answer logits
    everything = given.prefill(inputs, force={"ivr": torch.arange(n)[None]}).logits
    torch.testing.assert_close(everything, HalfVReference(stack, None).prefill(inputs).logits)


def test_keep_sets_split_digit_and_background_rows():
    sample = task_set(1, seed=3, split="eval", sizes=[(224, 224)])[0]
    sets = probe.keep_sets(sample, 256, 14, torch.Generator().manual_seed(0))
    digits, background = set(sets["digits only"]), set(sets["background only"])
    assert digits and not digits & background and digits | background == set(range(256))
    assert digits < set(sets["digits + 0.5 of the rest"]) and len(sets["random half"]) == 128
