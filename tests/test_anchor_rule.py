"""The calibration rule for the IVR anchor share alpha (calibration/rules.py): the probed share whose prefill stays
closest to the unpruned model wins; ties keep the paper's; the CLI's choice is never replaced."""

from halfv_export.calibration.rules import ANCHOR_PROBE, choose_anchor_ratio, measure_anchor_ratios

from .conftest import make_image

PAPER = {"ivr_layer": 1, "keep_ratio": 0.25, "anchor_ratio": 0.1, "ssr_layer": 6, "ssr_mode": "freeze",
         "ssr_ratio": None}


def _probe(kls: dict) -> dict:
    return {str(a): {"kl_mean": kl, "top1_agreement": 1.0} for a, kl in kls.items()}


def test_the_share_with_the_lowest_kl_wins_and_is_recorded():
    values, chosen = dict(PAPER), {}
    choose_anchor_ratio(values, chosen, _probe({0.1: 1.7, 0.25: 0.31, 0.5: 0.064, 1.0: 3.7}), {})
    assert values["anchor_ratio"] == 0.5
    assert chosen["anchor_ratio"].by == "rule" and "0.5: 0.064" in chosen["anchor_ratio"].why


def test_a_tie_keeps_the_papers_share_and_the_cli_wins():
    values, chosen = dict(PAPER), {}
    choose_anchor_ratio(values, chosen, _probe({0.1: 0.2, 0.25: 0.2, 0.5: 0.3, 1.0: 0.2}), {})
    assert values["anchor_ratio"] == 0.1
    values, chosen = dict(PAPER), {"anchor_ratio": "cli"}
    choose_anchor_ratio(values, chosen, _probe({0.1: 1.0, 0.5: 0.0}), {"anchor_ratio": 0.1})
    assert values["anchor_ratio"] == 0.1 and chosen == {"anchor_ratio": "cli"}


def test_the_probe_scores_every_share_on_the_real_model(qwen):
    """On the embedded default: one score per probed share plus the schedule's own, each the KL of that schedule's
    prefill to the unpruned one (0 only if the cut changes nothing, which keeping a quarter of the rows does)."""
    adapter, loaded, stack = qwen

    inputs = [adapter.prepare(loaded, [make_image(224, 224, i)], ["What is the digit in row 1, column 2?"])
              for i in range(2)]
    probe = measure_anchor_ratios(stack, inputs, {**PAPER, "anchor_ratio": 0.2})
    assert set(probe) == {str(a) for a in sorted(set(ANCHOR_PROBE) | {0.2})}
    assert all(score["kl_mean"] > 0 for score in probe.values())
    assert len({round(score["kl_mean"], 9) for score in probe.values()}) > 1  # the share changes the selection
    assert measure_anchor_ratios(stack, [adapter.prepare(loaded, [None], ["hi"])], PAPER) is None
