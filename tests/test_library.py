"""The library the CLI mirrors: the README's script runs as written and prints what the README shows; a stage
returns its result instead of printing or exiting, reports progress as well-formed events, and writes the same
files as the command that wraps it."""

import json
import re
import shutil

import pytest

import halfv_export as hx
from halfv_export.stages.progress import Stage
from tests.test_api import documented_example

ACCURACY_LINE = re.compile(r"work/: accuracy (?P<full>[\d.]+) -> (?P<halfv>[\d.]+) of (?P<count>\d+), "
                        r"FLOPs ratio (?P<ratio>[\d.]+)x")


@pytest.mark.slow
def test_the_readme_library_script_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    """The README's block, verbatim, on the embedded default: calibrate, export, engine and validate through the
    library alone. Every line but the accuracies must match exactly; the accuracies come from greedy answers of
    the eager and exported models, which a CPU with other SIMD kernels could flip on a near-tie, so they may differ
    by at most two answers of the count shown."""
    code, shown = documented_example("library-example")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "library-example", "exec"), {"__name__": "__readme__"})
    captured = capsys.readouterr()
    assert captured.err == ""  # the library prints nothing: no bars, no logs, not transformers' loading bar
    printed, shown = captured.out.splitlines(), shown.splitlines()
    assert len(printed) == len(shown) == 5, (printed, shown)
    assert printed[:4] == shown[:4]
    got, want = ACCURACY_LINE.fullmatch(printed[4]), ACCURACY_LINE.fullmatch(shown[4])
    assert got and want, (printed[4], shown[4])
    assert (got["count"], got["ratio"]) == (want["count"], want["ratio"])
    for key in ("full", "halfv"):
        assert abs(float(got[key]) - float(want[key])) <= 2 / int(want["count"]) + 1e-9, (printed[4], shown[4])
    # what the script's validate wrote is what the returned result says
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    assert report["accuracy"]["count"] == int(got["count"]) and f"{report['flops']['ratio']:.2f}" == got["ratio"]


def test_calibrate_returns_what_the_cli_writes(tmp_path, run_cli):
    """The library stage and the command write the same schedule; the result carries it typed, chosen_by as data."""
    calibration = hx.calibrate("qwen2.5-vl", tmp_path / "lib", paper_values=True, overrides={"ssr_layer": 5})
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--paper-values", "--ssr-layer", 5,
                     "--out", tmp_path / "cli")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "cli" / "schedule.json").read_text())
    assert calibration.document == written == json.loads(calibration.path.read_text())
    assert calibration.schedule.ssr_layer == 5 and calibration.chosen_by["ssr_layer"].by == "cli"
    assert calibration.chosen_by["ivr_layer"].by == "paper" and calibration.search is None


def test_validate_returns_failed_gates_and_reports_progress(exported, tmp_path):
    """A failed gate is data on the result, not an exit: the report is written, `passed` is False and the failure
    names the metric. The progress events are well formed: every task that starts ends, counts never pass their
    total, and only the validate stage reports."""
    artifacts = shutil.copytree(exported, tmp_path / "art")
    hx.engine(artifacts)
    events = []
    report = hx.validate(artifacts, fail_under=[("parity.greedy_tokens_match", 1.01)], latency_runs=1,
                         progress=events.append)
    assert not report.passed and len(report.failures) == 1 and "parity.greedy_tokens_match" in report.failures[0]
    on_disk = json.loads((artifacts / "report.json").read_text())
    assert on_disk["thresholds"]["failures"] == report.failures and on_disk == report.data
    assert report.flops_ratio == on_disk["flops"]["ratio"] > 1
    assert {e.stage for e in events} == {Stage.VALIDATE}
    started = [e.task for e in events if e.task and e.done is None and not e.finished]
    ended = [e.task for e in events if e.finished]
    assert started and sorted(started) == sorted(ended)
    for e in events:
        if e.done is not None and e.total is not None:
            assert 0 <= e.done <= e.total, e


def test_a_stage_error_is_raised_not_printed(tmp_path, capsys):
    """Bad input reaches a library caller as BadInput with the one-line message the CLI prints, and nothing else."""
    with pytest.raises(hx.BadInput, match="schedule .* does not exist; run `halfv-export calibrate`"):
        hx.export(tmp_path / "missing.json", tmp_path / "out")
    assert capsys.readouterr() == ("", "")


def test_bad_library_arguments_are_refused_before_any_work(tmp_path):
    """What the CLI refuses is refused by the library too: a seed for a checkpoint's weights, a misspelt schedule
    field (which would otherwise leave the rules' value in place), an unknown ratio kind."""
    with pytest.raises(hx.BadInput, match="--random-weights applies to the embedded default only"):
        hx.calibrate("qwen2.5-vl", tmp_path / "a", model=tmp_path, random_weights=0)
    with pytest.raises(hx.BadInput, match=r"overrides \['ssr_layers'\]: not schedule fields"):
        hx.calibrate("qwen2.5-vl", tmp_path / "b", paper_values=True, overrides={"ssr_layers": 5})
    with pytest.raises(hx.BadInput, match="--ratio-kind 'decode'"):
        hx.Search(2.0, "decode")
    assert hx.Search(2.0, "ttft").ratio_kind is hx.RatioKind.TTFT
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "schedule.json").exists()


def test_the_cli_progress_renderer_finishes_what_it_started():
    """RichProgress over a stage's events: counted tasks end at their total, steps without a count leave no bar,
    messages print above the bars."""
    from rich.console import Console

    from halfv_export.cli import render
    from halfv_export.stages.progress import Reporter

    console = Console(record=True, width=100, force_terminal=False)
    original, render.console = render.console, console
    try:
        with render.RichProgress() as bars:
            report = Reporter(Stage.EXPORT, bars)
            with report.status("loading the model"):
                pass
            list(report.tracker("exporting")(range(3)))
            report.message("  embed.onnx: 1.0 s")
            tasks = {t.description: (t.completed, t.total) for t in bars.bars.tasks}
    finally:
        render.console = original
    assert tasks == {"exporting": (3, 3)}
    assert "embed.onnx: 1.0 s" in console.export_text()


@pytest.mark.slow
def test_a_build_whose_gate_fails_keeps_the_previous_build(run_cli, tiny_qwen_dir, tmp_path, monkeypatch):
    """BuildFailed through the CLI: exit 1, the summary table of the failed build, one line naming the gate, and
    the previous folder untouched."""
    import halfv_export.stages.build as stage

    out = tmp_path / "build"
    out.mkdir()
    (out / "previous.txt").write_text("the last good build")
    monkeypatch.setattr(stage, "DEFAULT_GATES_UNDER", (("parity.greedy_tokens_match", 1.01),))
    result = run_cli("build", "--backbone", "qwen2.5-vl", "--model", tiny_qwen_dir, "--image-size", "252x336",
                     "--paper-values", "--latency-runs", 1, "--out", out)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "parity.greedy_tokens_match" in errors[0] and "previous build" in errors[0]
    assert "halfv-export build" in result.output and "greedy_tokens_match" in result.output  # the table
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert not list(tmp_path.glob(".build.partial-*"))
