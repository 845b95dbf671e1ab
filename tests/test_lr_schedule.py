"""Learning-rate schedules (train.lr_schedule, train.min_lr_ratio, train.wsd_decay_fraction), built by transformers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from tailkd_ray.config import ConfigError, TrainConfig, load_config
from tailkd_ray.train.strategies import lr_scheduler


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)


def learning_rates(scheduler, steps: int) -> list[float]:
    """The learning rate of optimizer steps 0..steps-1 (what each step trains with)."""
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


# lr = 1, warmup 2, max_steps 10, min_lr_ratio 0.1: the values of transformers' formulas at steps 0, 1, 2, 6, 8, 9
# (cosine: 0.1 + 0.9 · ½(1 + cos(π · progress)); wsd: decay over the last 2 steps, 0.2 of max_steps).
EXPECTED = {
    "cosine": {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.55, 8: 0.1 + 0.45 * (1 + math.cos(0.75 * math.pi)),
               9: 0.1 + 0.45 * (1 + math.cos(0.875 * math.pi))},
    "linear": {0: 0.1, 1: 0.55, 2: 1.0, 6: 0.55, 8: 0.325, 9: 0.2125},
    "constant": {0: 0.0, 1: 0.5, 2: 1.0, 6: 1.0, 8: 1.0, 9: 1.0},
    "wsd": {0: 0.1, 1: 0.55, 2: 1.0, 6: 1.0, 8: 1.0, 9: 0.55},
}


@pytest.mark.parametrize("schedule", sorted(EXPECTED))
def test_each_schedule_follows_transformers_formula(schedule):
    train = TrainConfig(max_steps=10, warmup_steps=2, lr_schedule=schedule, wsd_decay_fraction=0.2,
                        min_lr_ratio=0.0 if schedule == "constant" else 0.1)
    train.validate()
    rates = learning_rates(lr_scheduler(optimizer(), train), 10)
    for step, expected in EXPECTED[schedule].items():
        assert rates[step] == pytest.approx(expected, abs=1e-9), (schedule, step, rates)


@pytest.mark.parametrize("schedule, reference", [("cosine", get_cosine_schedule_with_warmup),
                                                 ("linear", get_linear_schedule_with_warmup)])
def test_floor_zero_equals_transformers_plain_schedules(schedule, reference):
    train = TrainConfig(max_steps=12, warmup_steps=3, lr_schedule=schedule)
    ours = learning_rates(lr_scheduler(optimizer(), train), 12)
    assert ours == pytest.approx(learning_rates(reference(optimizer(), 3, 12), 12), abs=1e-12)


@pytest.mark.parametrize("schedule", sorted(EXPECTED))
def test_resume_continues_the_schedule_from_its_checkpointed_state(schedule):
    train = TrainConfig(max_steps=10, warmup_steps=2, lr_schedule=schedule, wsd_decay_fraction=0.3,
                        min_lr_ratio=0.0 if schedule == "constant" else 0.2)
    straight = learning_rates(lr_scheduler(optimizer(), train), 10)
    first = lr_scheduler(optimizer(), train)
    before = learning_rates(first, 4)
    resumed = lr_scheduler(optimizer(), train)
    resumed.load_state_dict(first.state_dict())  # what strategies.TorchStrategy.save / load carry
    assert before + learning_rates(resumed, 6) == pytest.approx(straight, abs=1e-12)


@pytest.mark.parametrize("overrides, match", [
    (["train.min_lr_ratio=1.5"], r"train.min_lr_ratio must be in \[0, 1\]"),
    (["train.min_lr_ratio=-0.1"], r"train.min_lr_ratio must be in \[0, 1\]"),
    (["train.lr_schedule=constant", "train.min_lr_ratio=0.1"], "has no effect with train.lr_schedule = constant"),
    (["train.wsd_decay_fraction=0"], r"train.wsd_decay_fraction must be in \(0, 1\]"),
    (["train.lr_schedule=wsd", "train.max_steps=20", "train.warmup_steps=15", "train.wsd_decay_fraction=0.5"],
     r"warmup_steps \(15\) plus the decay \(10 steps"),
    (["train.lr_schedule=exponential"], "train.lr_schedule must be one of cosine, linear, constant, wsd"),
])
def test_bad_schedule_settings_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
