"""The one greedy loop (base/greedy.py) that the eager reference, validate's engine run and the API share."""

import numpy as np
import torch

from halfv_export.base.greedy import Greedy
from halfv_export.graphs.halfv import HalfVReference

from .conftest import make_image

EOS = 9


class Scripted:
    """A stepper whose row r emits script[r] one token a step; records what the loop asked of it."""

    def __init__(self, script: list[list[int]]):
        self.script = script
        self.rows = list(range(len(script)))
        self.step = 0
        self.fed: list[list[int]] = []
        self.kept: list[list[int]] = []

    def argmax(self):
        return np.array([self.script[r][self.step] for r in self.rows])

    def advance(self, tokens):
        self.fed.append(list(tokens))
        self.step += 1

    def keep(self, positions):
        self.kept.append(list(positions))
        self.rows = [self.rows[p] for p in positions]


def test_rows_leave_on_eos_budget_and_cancel_and_the_rest_carry_on():
    stepper = Scripted([[1, EOS, 5, 5, 5], [2, 3, 4, 5, 6], [7, 7, 7, 7, 7], [8, 8, 8, 8, 8]])
    loop = Greedy(stepper, budgets=[5, 5, 2, 5], eos={EOS})
    assert loop.step() == [(0, 1, None), (1, 2, None), (2, 7, None), (3, 8, None)]
    loop.cancel([3])
    assert loop.rows == [0, 1, 2] and stepper.rows == [0, 1, 2]
    assert loop.step() == [(0, EOS, "stop"), (1, 3, None), (2, 7, "length")]
    assert stepper.fed == [[1, 2, 7]]  # the cancelled row's token is never fed
    assert loop.rows == [1] and stepper.rows == [1]
    loop.run()
    assert loop.generated == [[1, EOS], [2, 3, 4, 5, 6], [7, 7], [8]]
    assert loop.finish == ["stop", "length", "length", None]
    assert stepper.fed[1:] == [[3], [4], [5]]  # one row left: one token a step, no finished row fed
    np.testing.assert_array_equal(loop.tokens(), [[1, EOS, EOS, EOS, EOS], [2, 3, 4, 5, 6], [7, 7, 7, 7, 7],
                                                  [8, 8, 8, 8, 8]])


def test_eager_rows_that_finish_leave_the_cache_and_the_others_answer_as_alone(qwen):
    """Two prompts decoded together: when one stops, its cache rows are dropped, and the other's tokens are the
    ones it gets alone (the eager stepper's compaction moves no row onto another's cache)."""
    adapter, loaded, stack = qwen
    reference = HalfVReference(stack, None)
    images, prompts = [make_image(224, 224, 1), make_image(224, 224, 2)], ["How many digits are there?",
                                                                          "Read all digits."]
    inputs = adapter.prepare(loaded, images, prompts)
    free = reference.generate(inputs, 8).numpy()
    # a token the first prompt emits at step j (not before) and the second never does: make it the EOS
    j = next(j for j in range(1, 7) if free[0, j] not in free[1] and free[0, j] not in free[0, :j])
    both = reference.generate(inputs, 8, {int(free[0, j])}).numpy()
    np.testing.assert_array_equal(both[0], [*free[0, :j + 1], *[free[0, j]] * (7 - j)])  # stopped, EOS repeated
    np.testing.assert_array_equal(both[1], free[1])  # decoded alone after step j, same tokens
    alone = reference.generate(adapter.prepare(loaded, images[1:], prompts[1:]), 8).numpy()
    np.testing.assert_array_equal(free[1], alone[0])
    assert torch.is_tensor(reference.generate(inputs, 0)) and reference.generate(inputs, 0).shape == (2, 0)
