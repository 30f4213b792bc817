"""The weights' moving average that training checkpoints: its warm-up and its update."""

from __future__ import annotations

import pytest
import torch

from ditarkit.training.ema import averaged, ema_decay


def test_the_decay_warms_up_then_holds():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.999, 10**6) == 0.999


def test_the_average_copies_first_then_follows_with_the_warmed_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    average = averaged(model, 0.999)
    seen = []
    for value in (2.0, 4.0, 8.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update_parameters(model)
        seen.append(average.module.weight.item())
    first = 2.0  # the first update copies
    second = first + (1 - ema_decay(0.999, 1)) * (4.0 - first)
    third = second + (1 - ema_decay(0.999, 2)) * (8.0 - second)
    assert seen == pytest.approx([first, second, third], rel=1e-6)
    assert model.weight.item() == 8.0  # the weights being trained are left alone


def test_a_decay_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="EMA decay"):
        averaged(torch.nn.Linear(1, 1), 1.0)
