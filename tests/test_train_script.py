"""halfv_export/training's batch pipeline and stage-1 loss: batches drawn ahead in worker processes are the batches
drawn inline, and the digit-token loss cannot be won by answering "empty" everywhere."""

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from halfv_export.tasks.digits import DEFAULT_MIX
from halfv_export.graphs import get_adapter
from halfv_export.graphs.adapter import Processing

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train():
    from halfv_export.training import train as module

    return module


def test_prefetched_keeps_step_order(train):
    assert list(train.prefetched(math.factorial, range(9), workers=3)) == [math.factorial(i) for i in range(9)]
    assert list(train.prefetched(math.factorial, range(0), workers=2)) == []


def test_worker_batches_equal_inline_batches(train):
    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(None, seed=0)
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    train._MAKER.update(adapter=adapter, processing=processing, sizes=[(224, 224), (224, 336)],
                        phase_of=lambda step: (DEFAULT_MIX, (2, 6)), batch=3, seed=5, slot=28,
                        prefix=train.answer_prefix(adapter, processing), eos=loaded.tokenizer.eos_token_id,
                        pad=loaded.tokenizer.pad_token_id)
    inline = list(train.prefetched(train.make_answer_batch, range(3), workers=0))
    ahead = list(train.prefetched(train.make_answer_batch, range(3), workers=2))
    for (host_a, ans_a, valid_a, asked_a, _), (host_b, ans_b, valid_b, asked_b, _) in zip(inline, ahead, strict=True):
        assert torch.equal(host_a.input_ids, host_b.input_ids) and torch.equal(host_a.positions, host_b.positions)
        assert all(torch.equal(a, b) for a, b in zip(host_a.pixel_values, host_b.pixel_values, strict=True))
        assert torch.equal(ans_a, ans_b) and torch.equal(valid_a, valid_b) and torch.equal(asked_a, asked_b)
    assert [batch[0].bucket for batch in ahead] == [(224, 224), (224, 336), (224, 224)]  # buckets in turn


def test_balanced_token_loss_does_not_reward_all_empty(train):
    # 256 tokens per image (LLaVA's CLIP grid), 4 of them digits; a head that says "empty" everywhere
    targets = torch.full((2, 256), 10)
    targets[:, :4] = torch.tensor([3, 1, 4, 1])
    targets[:, -1] = -100  # a row that is not an image patch
    all_empty = torch.full((2, 256, 11), -8.0)
    all_empty[..., 10] = 8.0
    plain = F.cross_entropy(all_empty.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    balanced = train.balanced_token_loss(all_empty, targets)
    assert plain < 0.3 and balanced > 15  # the plain mean calls this nearly solved; the digit half is ~16 nats
    perfect = torch.full((2, 256, 11), -8.0).scatter(-1, targets.clamp(min=0)[..., None], 8.0)
    assert train.balanced_token_loss(perfect, targets) < 1e-5


def test_init_loads_what_the_script_saved(train, tmp_path):
    adapter = get_adapter("qwen2.5-vl")
    saved = adapter.load(None, seed=1)
    train.save_fp16(saved.model, tmp_path)
    fresh = adapter.load(None, seed=2)
    train.load_init(adapter, fresh, tmp_path / "model.safetensors")
    expected = saved.model.state_dict()
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(value, expected[name].half().float()), name


def _probe():
    spec = importlib.util.spec_from_file_location("localisation_probe", ROOT / "tools" / "localisation_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


@pytest.mark.parametrize("backbone,per_cell", [("qwen2.5-vl", 4), ("llava-1.5", 16)])
def test_localisation_probe_cells_cover_every_visual_row_once(train, backbone, per_cell):
    # tools/localisation_probe.py lays synthetic digits out by these cells: each of the 4x4 cells of a 224x224 image
    # owns the tokens its 56 px cover (2x2 merged Qwen tokens, 4x4 CLIP patches), and no token is in two cells
    probe = _probe()
    adapter = get_adapter(backbone)
    loaded = adapter.load(None, seed=0)
    cells = probe.cell_tokens(adapter, loaded, (224, 224))
    assert sorted(cells) == [(r, c) for r in range(4) for c in range(4)]
    assert all(len(rows) == per_cell for rows in cells.values())
    assert sorted(k for rows in cells.values() for k in rows) == list(range(16 * per_cell))


def test_set_overrides_reach_the_built_model_and_its_checkpoint(train, tmp_path):
    # --set edits the shipped text_config before the model is built: the rotary table and the projections follow,
    # and --init reloads weights saved from that model into the same edited config
    overrides = ["rope_parameters.rope_theta=10", "num_attention_heads=2", "num_key_value_heads=2",
                 "rope_parameters.mrope_section=[8,12,12]"]
    adapter = get_adapter("qwen2.5-vl")
    loaded = train.load_with(adapter, overrides, 0)
    text = loaded.model.model.language_model
    assert text.layers[0].self_attn.head_dim == 64 and text.layers[0].self_attn.q_proj.weight.shape == (128, 128)
    assert torch.allclose(text.rotary_emb.inv_freq, 10.0 ** (-torch.arange(0, 64, 2).float() / 64))
    shipped = adapter.load(None, seed=0).model.model.language_model  # untouched: its own heads and rotary base
    theta = json.loads((adapter.embedded_dir / "config.json").read_text())["text_config"]["rope_parameters"]["rope_theta"]
    assert shipped.layers[0].self_attn.head_dim == 32
    assert torch.allclose(shipped.rotary_emb.inv_freq, theta ** (-torch.arange(0, 32, 2).float() / 32))
    train.save_fp16(loaded.model, tmp_path)
    fresh = train.load_with(adapter, overrides, 1)
    train.load_init(adapter, fresh, tmp_path / "model.safetensors", overrides)
    assert torch.equal(fresh.model.model.language_model.layers[0].self_attn.q_proj.weight,
                       text.layers[0].self_attn.q_proj.weight.half().float())
    with pytest.raises(SystemExit, match="write KEY=JSON"):
        train.edited_config(adapter, ["rope_parameters.rope_thetaa=10"])


def test_localisation_probe_dense_grids():
    # dense grids fill each cell with probability FILL, digits uniform over 0-9
    probe = _probe()
    rng = np.random.default_rng(0)
    full = [probe.dense_grid(4, 4, 1.0, rng) for _ in range(50)]
    assert all(d is not None for g in full for line in g for d in line)
    assert {d for g in full for line in g for d in line} == set(range(10))
    half = [d for _ in range(200) for line in probe.dense_grid(4, 4, 0.5, rng) for d in line]
    assert 0.4 < sum(d is None for d in half) / len(half) < 0.6


def test_question_targets_name_what_the_answer_is_about(train):
    # parsed back from the prompt, the named row/column/digit reproduce the task's own answer
    from halfv_export.tasks.digits import answer_for, task_set

    samples = task_set(60, seed=11, split="train")
    targets = train.question_targets(samples)
    seen = set()
    for sample, (row, col, digit) in zip(samples, targets.tolist()):
        seen.add(sample.type)
        if sample.type == "digit_at":
            assert answer_for("digit_at", sample.grid, row + 1, col + 1) == sample.answer and digit == -100
        elif sample.type == "row_digits":
            assert answer_for("row_digits", sample.grid, row + 1) == sample.answer and col == digit == -100
        elif sample.type == "count_digit":
            assert answer_for("count_digit", sample.grid, digit=digit) == sample.answer and row == col == -100
        else:
            assert row == col == digit == -100
    assert seen == set(DEFAULT_MIX)


def test_question_probe_trains_only_the_layers_below_it(train):
    # the auxiliary loss reads the last prompt row after layer 2: layers 0-2 get its gradient, layers 3+ none
    from halfv_export.tasks.digits import task_set

    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(None, seed=0)
    stack = adapter.text_stack(loaded)
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    samples = task_set(4, seed=2, split="train", mix={"digit_at": 1.0})
    host = adapter.host_inputs(processing, [s.image for s in samples], [s.prompt for s in samples])
    answer, valid = train.answer_batch(processing, samples, train.answer_prefix(adapter, processing),
                                       loaded.tokenizer.eos_token_id, loaded.tokenizer.pad_token_id)
    gather = train.QuestionProbe(stack, 2, loaded.config.text_config.hidden_size, 4, 4)
    train.teacher_forced_loss(adapter, loaded, stack, host, answer, valid)
    aux = gather.loss(host.input_ids.shape[1], train.question_targets(samples))
    assert math.isfinite(aux.item()) and aux.item() > 0
    aux.backward()
    touched = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
               for layer in stack.layers]
    assert touched == [True, True, True] + [False] * (len(stack.layers) - 3)
    with pytest.raises(SystemExit, match="the LLM has layers 0..7"):
        train.QuestionProbe(stack, len(stack.layers), loaded.config.text_config.hidden_size, 4, 4)


def test_continued_run_records_the_runs_it_continues(train, tmp_path):
    # a model trained in two runs (the second with --init) ships with both commands, and the time of both
    common = ["--backbone", "qwen2.5-vl", "--steps", "1", "--batch", "2", "--vision-steps", "0", "--first-steps", "0",
              "--warm-steps", "0", "--eval-samples", "2", "--eval-every", "0", "--threads", "1"]
    train.main(common + ["--out", str(tmp_path / "first")])
    train.main(common + ["--init", str(tmp_path / "first" / "model.safetensors"), "--out", str(tmp_path / "second")])
    first = json.loads((tmp_path / "first" / "training.json").read_text())
    second = json.loads((tmp_path / "second" / "training.json").read_text())
    assert first["init_history"] == [] and first["total_train_seconds"] == first["train_seconds"]
    [earlier] = second["init_history"]
    assert earlier["command"] == first["command"] and "--init" in second["command"]
    assert earlier["sha256"] == hashlib.sha256((tmp_path / "first" / "model.safetensors").read_bytes()).hexdigest()
    assert earlier["held_out"] == {"accuracy": first["held_out"]["accuracy"], "count": 2}
    assert second["total_train_seconds"] == pytest.approx(first["train_seconds"] + second["train_seconds"], abs=0.11)


def test_mid_run_held_out_score_leaves_a_checkpoint_to_continue_from(train, tmp_path):
    # a run cut off after a held-out score still leaves those weights, and --init continues from them
    out = tmp_path / "run"
    train.main(["--backbone", "qwen2.5-vl", "--steps", "3", "--batch", "2", "--vision-steps", "0", "--first-steps", "0",
                "--warm-steps", "0", "--eval-samples", "2", "--eval-every", "2", "--threads", "1", "--out", str(out)])
    saved = json.loads((out / train.CHECKPOINT_DIR / "checkpoint.json").read_text())
    assert saved["step"] == 2 and saved["of_steps"] == 3 and 0 <= saved["held_out"]["accuracy"] <= 1
    assert saved["held_out"]["count"] == 2 and saved["command"].endswith(f"--out {out}")
    adapter = get_adapter("qwen2.5-vl")
    mid, final = (train.load_with(adapter, [], 0) for _ in range(2))
    train.load_init(adapter, mid, out / train.CHECKPOINT_DIR / train.EMBEDDED_WEIGHTS)
    train.load_init(adapter, final, out / train.EMBEDDED_WEIGHTS)
    weights = [(a, b) for a, b in zip(mid.model.parameters(), final.model.parameters())]
    assert any(not torch.equal(a, b) for a, b in weights)  # the checkpoint is step 2's, not the final step's


def test_eval_mix_scores_other_questions_than_the_training_mix(train, tmp_path):
    # training weighted towards one type still reports the held-out score on the mix it is asked for
    train.main(["--backbone", "qwen2.5-vl", "--steps", "1", "--batch", "2", "--vision-steps", "0", "--first-steps", "0",
                "--warm-steps", "0", "--eval-samples", "3", "--eval-every", "0", "--threads", "1",
                "--mix", "digit_at=1", "--eval-mix", "read_all=1", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["mix"] == {"digit_at": 1.0} and record["curriculum"][-1]["mix"] == {"digit_at": 1.0}
    assert record["held_out"]["mix"] == {"read_all": 1.0} and list(record["held_out"]["per_type"]) == ["read_all"]
    assert record["held_out"]["per_type"]["read_all"]["count"] == 3


def test_init_weights_without_their_record_warn_that_the_history_is_lost(train, tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert train.init_history(weights) == []
    assert f"no training.json beside {weights}" in capsys.readouterr().out
    (tmp_path / "training.json").write_text(json.dumps({"command": "python halfv_export/training ...",
                                                         "train_seconds": 5.0, "init_history": []}))
    assert train.init_history(weights) == [{"command": "python halfv_export/training ...", "train_seconds": 5.0}]
    assert capsys.readouterr().out == ""


def test_digit_targets_name_the_scan_under_each_token(train):
    """Oracle: the scans' own labels at the tokens whose centres lie inside each drawn digit's box."""
    from halfv_export.tasks.digits import scan, task_set

    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(None, seed=0)
    size = (448, 448)
    samples = task_set(6, seed=3, split="train", sizes=[size], task="page", augment=True)
    centres = train.token_centres(adapter, loaded, size)  # [256, 2]: merged 28-pixel tokens
    targets = train.token_targets(samples, centres)
    assert targets.shape == (6, 256)
    for sample, row in zip(samples, targets):
        expected = torch.full((256,), 10)
        for r, c, top, left, side in sample.boxes:
            y, x = (top + side / 2) // 28, (left + side / 2) // 28  # the token holding the box centre
            expected[int(y * 16 + x)] = scan(sample.scans[r][c])[1]
        # every digit's centre token names it; tokens far from every box say "empty"
        assert torch.equal(row[expected < 10], expected[expected < 10])
        assert (row < 10).sum() <= 4 * len(sample.boxes)


def test_digit_aux_teaches_the_tower_and_leaves_the_llm_to_the_answers(train, tmp_path):
    """One step from the shipped weights with and without --digit-aux, same seed and batch: the probe's loss reaches
    the vision tower (its weights move differently) and nothing else (the LLM's step is the answers' alone; Adam's
    first step is the gradient's sign, so clipping a larger total norm does not change it)."""
    shipped = ROOT / "halfv_export" / "graphs" / "embedded" / "qwen2_5_vl" / "model.safetensors"
    common = ["--backbone", "qwen2.5-vl", "--init", str(shipped), "--task", "page", "--image-size", "224x336",
              "--steps", "1", "--batch", "4", "--vision-steps", "0", "--first-steps", "0", "--warm-steps", "0",
              "--lr", "5e-2", "--vision-lr-scale", "1", "--warmup", "1", "--eval-samples", "1", "--eval-every", "0",
              "--threads", "1", "--augment"]
    train.main(common + ["--out", str(tmp_path / "plain")])
    train.main(common + ["--digit-aux", "2", "--out", str(tmp_path / "probed")])
    record = json.loads((tmp_path / "probed" / "training.json").read_text())
    assert record["augment"] is True and record["digit_aux"] == 2.0
    assert 0 <= record["log"][0]["digit_token_accuracy"] <= 1
    adapter = get_adapter("qwen2.5-vl")
    plain, probed = (train.load_with(adapter, [], 0) for _ in range(2))
    train.load_init(adapter, plain, tmp_path / "plain" / train.EMBEDDED_WEIGHTS)
    train.load_init(adapter, probed, tmp_path / "probed" / train.EMBEDDED_WEIGHTS)
    moved = {"vision": 0, "llm": 0}
    for (name, a), b in zip(plain.model.named_parameters(), probed.model.parameters()):
        part = "llm" if "language_model" in name or "lm_head" in name else "vision"
        moved[part] += int(not torch.allclose(a, b, atol=2e-2))  # an Adam step here moves a weight by 0.05
    assert moved["vision"] > 0 and moved["llm"] == 0, moved


def test_grow_keeps_the_function_and_adds_trainable_layers(train, tmp_path):
    # --grow continues trained weights in a deeper, wider language model: the grown model's logits over a real
    # image prompt equal the small model's, yet it has the new layers and MLP units, and they receive gradients
    from halfv_export.training.grow import layer_sources

    with pytest.raises(ValueError, match="grow by 0 to 8 layers"):
        layer_sources(8, 17)
    assert layer_sources(8, 12) == [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True),
                                    (4, False), (5, False), (5, True), (6, False), (7, False), (7, True)]
    adapter = get_adapter("qwen2.5-vl")
    small = adapter.load(None, seed=3)
    train.save_fp16(small.model, tmp_path)
    out = tmp_path / "grown"
    overrides = ["--set", "num_hidden_layers=12", "--set", "intermediate_size=400"]
    train.main(["--backbone", "qwen2.5-vl", "--init", str(tmp_path / "model.safetensors"), "--grow", *overrides,
                "--steps", "0", "--vision-steps", "0", "--eval-samples", "1", "--eval-every", "0", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())["text_config"]
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (12, 400)
    grown = train.load_with(adapter, ["num_hidden_layers=12", "intermediate_size=400"], 0)
    train.load_init(adapter, grown, out / "model.safetensors", ["num_hidden_layers=12", "intermediate_size=400"])
    small_half = adapter.load(None, seed=3)
    train.load_init(adapter, small_half, tmp_path / "model.safetensors")  # the fp16 weights the grown run started from
    layers = grown.model.model.language_model.layers
    assert len(layers) == 12 and layers[0].mlp.gate_proj.weight.shape == (400, 128)
    assert torch.count_nonzero(layers[2].self_attn.o_proj.weight) == 0  # an inserted copy adds nothing yet
    assert torch.count_nonzero(layers[0].mlp.down_proj.weight[:, 352:]) == 0
    from halfv_export.tasks.digits import task_set

    sample = task_set(1, seed=4, sizes=[(224, 224)])[0]

    def logits(loaded):  # transformers' own language model over the adapter's prompt (image rows included)
        inputs = adapter.prepare(loaded, [sample.image], [sample.prompt])
        hidden = loaded.model.model.language_model(inputs_embeds=inputs.embeds, position_ids=inputs.positions,
                                                   attention_mask=inputs.attention_mask).last_hidden_state
        return loaded.model.lm_head(hidden)

    with torch.no_grad():
        want = logits(small_half)
    got = logits(grown)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.square().mean().backward()
    assert layers[2].self_attn.o_proj.weight.grad.abs().sum() > 0  # the inserted layer starts to learn
    assert layers[0].mlp.down_proj.weight.grad[:, 352:].abs().sum() > 0
