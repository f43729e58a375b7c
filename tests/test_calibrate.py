"""calibrate end to end through the CLI, the rules, and schedule.json strictness."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from halfv_export.base.errors import BadInput
from halfv_export.calibration.rules import choose_ssr_mode, derive_schedule, measure_ssr_modes
from halfv_export.calibration.schedule import ChosenBy, Choice
from halfv_export.calibration.schedule import read_schedule
from halfv_export.graphs import get_adapter
from tests.conftest import EMBEDDED_KIND, make_image


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from click.testing import CliRunner

    from halfv_export.cli.main import cli

    out = tmp_path_factory.mktemp("calib")
    result = CliRunner().invoke(cli, ["calibrate", "--backbone", "qwen2.5-vl", "--samples", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_calibrate_writes_schedule_and_plot(calibrated):
    doc = json.loads((calibrated / "schedule.json").read_text())
    assert doc["schema_version"] == 2 and doc["backbone"] == "qwen2.5-vl"
    assert doc["model"]["num_layers"] == 8 and doc["model"]["fingerprint"].startswith("sha256:")
    curves = doc["calibration"]["curves"]
    assert len(curves["visual"]) == len(curves["text"]) == len(curves["whole"]) == 9
    assert len(curves["kl_visual_update"]) == 8
    assert all(0 < v < np.log(50) for v in curves["whole"])
    assert doc["chosen_by"]["ssr_mode"]["by"] == "rule"
    if EMBEDDED_KIND == "trained":
        # the shipped weights' visual curve rises through points 1..6, so it has no stage-I peak in 1..2 and no
        # stage-III minimum in 2..6: both layers are the paper's at depth 8 (Qwen 2/28, 21/28 -> 1, 6)
        visual = curves["visual"]
        assert all(visual[i] < visual[i + 1] for i in range(1, 6)), visual
        assert (doc["schedule"]["ivr_layer"], doc["schedule"]["ssr_layer"]) == (1, 6)
        assert doc["chosen_by"]["ivr_layer"]["unplaced"] == ("peak of visual TME over points 1..2: it still rises "
                                                             "at point 3 (stage I outlasts the window)")
        assert doc["chosen_by"]["ssr_layer"]["unplaced"] == ("minimum of visual TME over points 2..6: the lowest, "
                                                             "point 2, is on a slope (no stage III found)")
    modes = doc["calibration"]["ssr_modes"]
    assert doc["schedule"]["ssr_mode"] == min(modes, key=lambda m: modes[m]["kl_mean"])
    png = (calibrated / "tme.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not list(calibrated.glob(".*.tmp"))  # no temp file left behind
    adapter = get_adapter("qwen2.5-vl")
    sched, _ = read_schedule(calibrated / "schedule.json", backbone="qwen2.5-vl",
                             fingerprint=doc["model"]["fingerprint"], depth=8)
    assert 1 <= sched.ivr_layer < sched.ssr_layer < 8
    assert adapter.paper.keep_ratio == sched.keep_ratio


@pytest.mark.parametrize("visual,layers,why", [
    # a peak at 2 that the curve falls from (1.3 -> 1.2), the lowest of 3..6 at 4 between falls and rises
    ([1.0, 1.1, 1.3, 1.2, 0.9, 1.0, 1.1, 1.2, 1.3], (2, 4),
     ({"by": "rule", "why": "peak of visual TME over points 1..2 (end of stage I)", "unplaced": None},
      {"by": "rule", "why": "minimum of visual TME over points 3..6 (start of stage III)", "unplaced": None})),
    # rising everywhere: no turn to place either layer, so both are the paper's at depth 8 (2/28, 21/28 -> 1, 6)
    ([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8], (1, 6),
     ({"by": "paper", "why": "Qwen2.5-VL-7B-Instruct (layers scaled 28->8)",
       "unplaced": "peak of visual TME over points 1..2: it still rises at point 3 (stage I outlasts the window)"},
      {"by": "paper", "why": "Qwen2.5-VL-7B-Instruct (layers scaled 28->8)",
       "unplaced": "minimum of visual TME over points 2..6: the lowest, point 2, is on a slope (no stage III "
                   "found)"})),
])
def test_calibrate_writes_the_layers_a_known_curve_places(run_cli, tmp_path, monkeypatch, visual, layers, why):
    """Hand-built curves in place of the measured ones: schedule.json holds the layers worked out by hand above."""
    import halfv_export.stages.calibrate as stage

    curves = {"visual": visual, "text": [2.0] * 9, "whole": [2.5] * 9, "kl_visual_update": None}
    monkeypatch.setattr(stage, "measure_probes", lambda *args, **kwargs: curves)
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--samples", 1, "--no-kl-probe", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "schedule.json").read_text())
    assert doc["calibration"]["curves"] == curves
    assert (doc["schedule"]["ivr_layer"], doc["schedule"]["ssr_layer"]) == layers
    assert (doc["chosen_by"]["ivr_layer"], doc["chosen_by"]["ssr_layer"]) == why


def test_cli_overrides_and_paper_values(run_cli, tmp_path):
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--paper-values", "--ssr-layer", 5,
                     "--keep-ratio", 0.5, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "schedule.json").read_text())
    assert doc["schedule"] == {"ivr_layer": 1, "keep_ratio": 0.5, "anchor_ratio": 0.1, "ssr_layer": 5,
                               "ssr_mode": "topk", "ssr_ratio": 0.05}
    assert doc["chosen_by"]["ssr_layer"]["by"] == "cli" and doc["chosen_by"]["ivr_layer"]["by"] == "paper"
    assert doc["calibration"] is None and not (tmp_path / "tme.png").exists()


def test_tiny_checkpoint_loads_through_model_flag(run_cli, tiny_qwen_dir, tmp_path, calibrated):
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--model", tiny_qwen_dir, "--samples", "2",
                     "--out", tmp_path)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "schedule.json").read_text())
    assert doc["model"]["num_layers"] == 6 and doc["model"]["source"] == str(tiny_qwen_dir.resolve())
    embedded = json.loads((calibrated / "schedule.json").read_text())
    assert doc["model"]["fingerprint"] != embedded["model"]["fingerprint"]
    # a schedule for one model is refused for the other
    adapter = get_adapter("qwen2.5-vl")
    from halfv_export.graphs.checkpoint import config_fingerprint

    tiny = adapter.load(tiny_qwen_dir)
    assert tiny.config.text_config.hidden_size == 96
    with pytest.raises(BadInput, match="another model"):
        read_schedule(calibrated / "schedule.json", fingerprint=config_fingerprint(tiny.config))


def test_data_folder_with_odd_images(run_cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    make_image(300, 200).convert("L").save(data / "gray.png")
    make_image(250, 250).convert("RGBA").save(data / "rgba.png")
    Image.fromarray((np.arange(200 * 160).reshape(160, 200) % 65535).astype(np.uint16)).save(data / "deep.png")
    lines = [{"image": "gray.png", "prompt": "What is this?"}, {"image": "rgba.png", "prompt": "Describe it."},
             {"image": "deep.png", "prompt": "Any text?"}]
    (data / "prompts.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--data", data, "--no-kl-probe", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "o" / "schedule.json").read_text())
    assert doc["calibration"]["samples"] == ["gray.png", "rgba.png", "deep.png"]
    assert doc["calibration"]["curves"]["kl_visual_update"] is None


class _Adapter:
    paper = get_adapter("qwen2.5-vl").paper


def test_rules_pick_stage_boundaries():
    depth = 12
    visual = [1.0, 1.1, 1.3, 1.2, 1.0, 0.9, 0.8, 0.6, 0.7, 0.9, 1.0, 1.1, 1.2]  # peak at 2, minimum at 7
    values, chosen = derive_schedule({"visual": visual, "kl_visual_update": [1e-6] * 12}, depth, _Adapter, {})
    assert (values["ivr_layer"], values["ssr_layer"]) == (2, 7)
    # the per-layer KL curve no longer picks the mode: the paper's (Qwen: topk) stands until the whole-cut probe
    assert values["ssr_mode"] == "topk" and values["ssr_ratio"] == 0.05 and chosen["ssr_mode"].by is ChosenBy.PAPER
    # no curves -> paper values at the same relative depth (Qwen 2/28, 21/28 -> 1/12, 9/12)
    values, chosen = derive_schedule(None, depth, _Adapter, {})
    assert (values["ivr_layer"], values["ssr_layer"]) == (1, 9) and chosen["ssr_layer"].by is ChosenBy.PAPER
    values, _ = derive_schedule(None, 28, _Adapter, {})
    assert (values["ivr_layer"], values["ssr_layer"]) == (2, 21)


@pytest.mark.parametrize("visual,expected,rules", [
    # the trained LLaVA-1.5 default's curve (the 0.915 weights; the 0.875 ones had the same shape): rising through
    # points 1..2 (no peak), then L2's window 2..6 has its lowest value at 2, on the rise (no minimum): both layers
    # are the paper's at depth 8 (Qwen 2/28, 21/28 -> 1, 6)
    ([1.13, 1.67, 1.86, 1.91, 1.92, 1.91, 1.90, 1.76, 1.76], (1, 6), (False, False)),
    # the trained LLaVA-NeXT default's (the 0.925 weights, like the 0.895 ones before them): rising everywhere
    ([1.48, 1.72, 1.81, 1.90, 1.94, 2.05, 2.12, 2.15, 2.18], (1, 6), (False, False)),
    # a peak inside the window and a minimum still falling at the window's end (the true one at 7): L1 only
    ([1.0, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.75], (1, 6), (True, False)),
    # a peak at the window's end that the curve falls from: a turn, kept; then a real minimum at 4
    ([1.0, 1.1, 1.3, 1.2, 0.9, 1.0, 1.1, 1.2, 1.3], (2, 4), (True, True)),
])
def test_a_pick_on_a_slope_is_no_stage_boundary(visual, expected, rules):
    values, chosen = derive_schedule({"visual": visual, "kl_visual_update": None}, 8, _Adapter, {})
    assert (values["ivr_layer"], values["ssr_layer"]) == expected
    assert (chosen["ivr_layer"].by is ChosenBy.RULE, chosen["ssr_layer"].by is ChosenBy.RULE) == rules
    if not rules[0]:
        assert chosen["ivr_layer"].by is ChosenBy.PAPER and "still rises at point 3" in chosen["ivr_layer"].unplaced


def test_a_paper_l2_above_the_measured_l1_moves_below_it(capsys):
    """A backbone whose paper cut its second stage shallow (L2 3 of 28 -> 1 at depth 8, kept at L1 + 1 = 2 by
    at_depth) while the curve places L1 at 2: the paper's L2 would cut at or above IVR, so it moves to L1 + 1."""
    import dataclasses

    class Shallow:
        paper = dataclasses.replace(_Adapter.paper, ssr_layer=3)

    visual = [1.0, 1.1, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8, 0.85]  # a peak at 2, still falling at 6: no stage-III minimum
    values, chosen = derive_schedule({"visual": visual}, 8, Shallow, {})
    assert (values["ivr_layer"], values["ssr_layer"]) == (2, 3)
    assert chosen["ivr_layer"].by is ChosenBy.RULE and chosen["ssr_layer"].why.endswith("; moved to L1 + 1")
    from halfv_export.cli.render import layer_fallbacks
    from halfv_export.graphs.pruning import PruneSchedule
    from halfv_export.stages.results import Calibration

    layer_fallbacks(Calibration(Path("."), PruneSchedule(**values), chosen, {}))
    assert capsys.readouterr().out.startswith("note: ssr_layer 3 is L1 + 1 (the paper's was not below IVR's layer): "
                                              "no minimum of visual TME")


def test_calibrate_says_which_layers_the_curve_could_not_place(capsys):
    from halfv_export.cli.render import layer_fallbacks
    from halfv_export.graphs.pruning import PruneSchedule
    from halfv_export.stages.results import Calibration

    visual = [1.0, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.75]  # a stage-I peak at 1, no stage-III minimum before 7
    values, chosen = derive_schedule({"visual": visual}, 8, _Adapter, {})
    layer_fallbacks(Calibration(Path("."), PruneSchedule(**values), chosen, {}))
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["note: ssr_layer 6 is the paper's: no minimum of visual TME over points 2..6: the lowest, point "
                     "6, is on a slope (no stage III found); --target-ratio R picks the layers by measurement instead"]


@pytest.mark.parametrize("topk_kl,freeze_kl,paper,expected", [
    (0.9, 0.3, "topk", "freeze"), (0.3, 0.9, "topk", "topk"), (0.5, 0.5, "topk", "topk"),
    (0.5, 0.5, "freeze", "freeze"), (0.2, 0.6, "freeze", "topk")])
def test_ssr_mode_is_the_cut_with_the_lower_kl(topk_kl, freeze_kl, paper, expected):
    values = {"ivr_layer": 2, "keep_ratio": 0.5, "anchor_ratio": 0.2, "ssr_layer": 3, "ssr_mode": paper,
              "ssr_ratio": 0.05 if paper == "topk" else None}
    chosen: dict = {}
    probe = {"topk": {"kl_mean": topk_kl}, "freeze": {"kl_mean": freeze_kl}}
    choose_ssr_mode(values, chosen, probe, {})
    assert values["ssr_mode"] == expected and chosen["ssr_mode"].by is ChosenBy.RULE
    assert values["ssr_ratio"] == (0.05 if expected == "topk" else None)  # sigma settled for the mode kept
    forced = dict(values, ssr_mode="topk", ssr_ratio=0.05)
    choose_ssr_mode(forced, {}, {"topk": {"kl_mean": 9.0}, "freeze": {"kl_mean": 0.0}}, {"ssr_mode": "topk"})
    assert forced["ssr_mode"] == "topk"  # --ssr-mode on the CLI wins over the probe
    sigma = dict(values, ssr_mode="freeze", ssr_ratio=0.1)
    choose_ssr_mode(sigma, {}, {"topk": {"kl_mean": 0.1}, "freeze": {"kl_mean": 0.2}}, {"ssr_ratio": 0.1})
    assert (sigma["ssr_mode"], sigma["ssr_ratio"]) == ("topk", 0.1)  # a CLI sigma is what topk keeps when it wins


def test_ssr_mode_probe_scores_the_schedules_it_compares():
    """The probe's KLs are those of the eager HalfV prefill with each mode, on a real (trained) model."""
    from halfv_export.graphs.halfv import HalfVReference
    from halfv_export.graphs.pruning import PruneSchedule
    from halfv_export.graphs.tme import kl_last_token
    from halfv_export.stages.data import default_samples

    adapter = get_adapter("llava-1.5")
    loaded = adapter.load(None)
    samples = default_samples(loaded, 2, seed=0, split="train")
    values = {"ivr_layer": 2, "keep_ratio": 0.5, "anchor_ratio": 0.2, "ssr_layer": 3, "ssr_mode": "freeze",
              "ssr_ratio": None}
    stack = adapter.text_stack(loaded)
    prepared = [adapter.prepare(loaded, [s.image], [s.prompt]) for s in samples]
    probe = measure_ssr_modes(stack, prepared, values)
    for mode, sigma in (("topk", 0.05), ("freeze", None)):
        kls = []
        for inputs in prepared:
            full = HalfVReference(stack, None).prefill(inputs).logits
            cut = HalfVReference(stack, PruneSchedule(2, 0.5, 0.2, 3, mode, sigma)).prefill(inputs).logits
            kls.append(float(kl_last_token(full, cut)[0]))
        assert probe[mode]["kl_mean"] == pytest.approx(np.mean(kls), rel=1e-4, abs=1e-7)
    assert probe["topk"]["kl_mean"] != pytest.approx(probe["freeze"]["kl_mean"])


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["schedule"].update(keep_ratio=1.5), "keep_ratio=1.5 must be a number in \\(0, 1\\]"),
    (lambda d: d["schedule"].update(keep_ratio=0), "keep_ratio=0 must be"),
    (lambda d: d["schedule"].update(ivr_layer=0), "ivr_layer=0 must be >= 1"),
    (lambda d: d["schedule"].update(ssr_layer=1, ivr_layer=1), "ssr_layer=1 must be greater than ivr_layer=1"),
    (lambda d: d["schedule"].update(ssr_layer=8), "below the model's depth 8"),
    (lambda d: d["schedule"].update(ssr_mode="skip"), "ssr_mode='skip'"),
    (lambda d: d["schedule"].pop("anchor_ratio"), "field 'anchor_ratio' is missing"),
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.update(backbone="llava-1.5"), "for backbone 'llava-1.5'"),
])
def test_malformed_schedules_are_refused_with_one_line(calibrated, tmp_path, edit, message):
    doc = json.loads((calibrated / "schedule.json").read_text())
    edit(doc)
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BadInput, match=message) as err:
        read_schedule(path, backbone="qwen2.5-vl")
    assert "\n" not in str(err.value)


def test_truncated_schedule_file(tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text('{"schema_version": 1, "sched')
    with pytest.raises(BadInput, match="not valid JSON"):
        read_schedule(path)


def test_same_seed_same_weights_other_seed_other_weights():
    adapter = get_adapter("qwen2.5-vl")
    a, b, c = (adapter.load(None, seed=s).model.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_paper_values_read_no_weights(run_cli, tmp_path, tiny_qwen_dir, monkeypatch):
    """--paper-values needs the depth and the config fingerprint only: on a 7B checkpoint, loading the weights (fp32
    by default) would need 30 GB. The schedule it writes is the one export accepts for that checkpoint."""
    from halfv_export.graphs.adapter import BackboneAdapter
    from halfv_export.graphs.checkpoint import config_fingerprint

    def no_weights(*args, **kwargs):
        raise AssertionError("calibrate --paper-values loaded the weights")

    monkeypatch.setattr(BackboneAdapter, "load", no_weights)
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--model", tiny_qwen_dir, "--paper-values",
                     "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    monkeypatch.undo()
    doc = json.loads((tmp_path / "s" / "schedule.json").read_text())
    loaded = get_adapter("qwen2.5-vl").load(tiny_qwen_dir)
    assert doc["model"]["fingerprint"] == config_fingerprint(loaded.config)
    assert doc["model"]["source"] == loaded.source and doc["calibration"] is None


def test_schema_1_prose_is_read_as_data(tmp_path):
    """A schedule.json written before chosen_by was data still reads, its prose parsed into Choice records."""
    from halfv_export.calibration.schedule import read_choices, read_schedule

    doc = {"schema_version": 1, "backbone": "qwen2.5-vl", "model": {"fingerprint": "x", "num_layers": 8},
           "schedule": {"ivr_layer": 1, "keep_ratio": 0.25, "anchor_ratio": 0.5, "ssr_layer": 6, "ssr_mode": "topk",
                        "ssr_ratio": 0.05},
           "chosen_by": {"ivr_layer": "paper: Qwen2.5-VL-7B-Instruct (layers scaled 28->8); no peak of visual TME",
                         "keep_ratio": "paper: Qwen2.5-VL-7B-Instruct (layers scaled 28->8)",
                         "anchor_ratio": "rule: the anchor share closest to the unpruned model",
                         "ssr_layer": "paper: LLaVA; no minimum of visual TME: on a slope; moved to L1 + 1",
                         "ssr_mode": "search: top-1 agreement", "ssr_ratio": "unused in freeze mode"}}
    (tmp_path / "schedule.json").write_text(json.dumps(doc))
    _, read = read_schedule(tmp_path / "schedule.json")
    assert read_choices(read) == {
        "ivr_layer": Choice(ChosenBy.PAPER, "Qwen2.5-VL-7B-Instruct (layers scaled 28->8)", "peak of visual TME"),
        "keep_ratio": Choice(ChosenBy.PAPER, "Qwen2.5-VL-7B-Instruct (layers scaled 28->8)"),
        "anchor_ratio": Choice(ChosenBy.RULE, "the anchor share closest to the unpruned model"),
        "ssr_layer": Choice(ChosenBy.PAPER, "LLaVA; moved to L1 + 1", "minimum of visual TME: on a slope"),
        "ssr_mode": Choice(ChosenBy.SEARCH, "top-1 agreement"),
        "ssr_ratio": Choice(ChosenBy.DEFAULT, "unused in freeze mode")}
