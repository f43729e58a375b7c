"""Where a Qwen2.5-VL page-task checkpoint loses its answers: the vision tower or the language model.

    python tools/page_diagnosis.py --weights run/qwen-pageD/checkpoint/model.safetensors

1. Tower: a linear probe, fitted on the frozen tower's output at the tokens under training-split digits, names the
   digit under held-out (evaluation-split) digits. Near 1.0: the tower tells the held-out digits apart, so the
   answers are lost after it.
2. Memorising or underfitting: unpruned greedy exact match on page questions drawn from the training scans and on
   questions drawn from the evaluation scans (plain scans both; other seeds than training's held-out set). Equal
   scores mean the model has not learnt its training scans better than new ones.

One thread; about five minutes at 448x448 on the 2-core box.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from halfv_export.graphs import get_adapter  # noqa: E402
from halfv_export.graphs.adapter import Processing  # noqa: E402
from halfv_export.tasks.digits import parse_mix, task_set  # noqa: E402
from halfv_export.training import train  # noqa: E402

EVAL_MIX = "digit_at=0.3,row_digits=0.2,count_digit=0.2,count_all=0.1,read_all=0.2"


def digit_token_features(adapter, loaded, processing, centres, split: str, count: int, seed: int, size):
    """RMS-normalised tower features at the tokens under a digit, and the digits: ([T, D], [T])."""
    features, labels = [], []
    for i in range(0, count, 16):
        samples = task_set(16, seed=seed + i, split=split, sizes=[size], task="page")
        host = adapter.host_inputs(processing, [s.image for s in samples], ["x"] * len(samples))
        with torch.no_grad():
            feats = adapter.vision_batch(loaded, host.pixel_values, host.bucket)
        feats = F.rms_norm(feats, (feats.shape[-1],))
        targets = train.token_targets(samples, centres)
        digit = targets < 10
        features.append(feats[digit])
        labels.append(targets[digit])
    return torch.cat(features), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="model.safetensors the training script wrote")
    parser.add_argument("--image-size", default="448x448")
    parser.add_argument("--pages", type=int, default=320, help="training pages for the probe (half as many held out)")
    parser.add_argument("--questions", type=int, default=100, help="questions per split for the exact match")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    size = train.parse_size(args.image_size)
    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(None)
    train.load_init(adapter, loaded, args.weights)
    loaded.model.eval()
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    centres = train.token_centres(adapter, loaded, size)

    fit_x, fit_y = digit_token_features(adapter, loaded, processing, centres, "train", args.pages, 1000, size)
    test_x, test_y = digit_token_features(adapter, loaded, processing, centres, "eval", args.pages // 2, 5000, size)
    head = torch.nn.Linear(fit_x.shape[1], 10)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(500):
        loss = F.cross_entropy(head(fit_x), fit_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        fit, held = ((head(x).argmax(-1) == y).float().mean().item() for x, y in ((fit_x, fit_y), (test_x, test_y)))
    print(f"tower probe: digit tokens {len(fit_y)} training / {len(test_y)} held out; accuracy {fit:.3f} / {held:.3f}")

    stack = adapter.text_stack(loaded)
    for split, seed in (("train", 777), ("eval", 888)):
        samples = task_set(args.questions, seed=seed, split=split, sizes=[size], mix=parse_mix(EVAL_MIX), task="page")
        result = train.held_out_accuracy(adapter, loaded, stack, samples)
        p = result["accuracy"]
        types = ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in result["per_type"].items())
        print(f"exact match, {split} scans: {p:.3f} ± {(p * (1 - p) / result['count']) ** 0.5:.3f} "
              f"({result['count']} questions; {types})")


if __name__ == "__main__":
    main()
