"""SOLOv2 learning-rate schedule: mmcv linear warmup, then step decay or cosine annealing.

Official recipe (mmdet v1 `lr_config`, WXinlong/SOLO configs): `policy='step'`, `warmup='linear'`,
`warmup_iters=500`, `warmup_ratio=0.01`, `step=[9, 11]` epochs of 12. The recipe speaks in epochs;
the trainer knows steps, so epoch boundaries map to steps as `round(epoch / epochs * total_steps)`,
half up (:func:`schedule_from_config`).

At step `t` (0-based, the value of `optimizer.iterations` when the update is made):

- regular lr: step policy `lr * decay ** #{b in boundaries : t >= b}`; cosine policy
  `lr * 0.5 * (1 + cos(pi * t / total_steps))` (mmcv `CosineAnnealing`, min_lr 0);
- warmup (mmcv `_get_warmup_lr`, linear) for `t < warmup_steps`:
  `regular * (1 - (1 - t / warmup_steps) * (1 - warmup_ratio))`, i.e. `warmup_ratio * lr` at
  step 0, rising linearly to the regular lr at `warmup_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import ops

from models.config import TrainConfig


@keras.saving.register_keras_serializable(package="solov2")
class WarmupDecaySchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, then step decay or cosine annealing (see the module docstring).

    Args:
      learning_rate: peak lr (already scaled to the global batch).
      total_steps: length of the run (the cosine period).
      warmup_steps: linear warmup length; 0 disables warmup.
      warmup_ratio: lr at step 0 as a fraction of the regular lr.
      boundaries: steps at which the step policy multiplies the lr by `decay`.
      decay: step-policy factor.
      policy: "step" or "cosine".
    """

    def __init__(
        self,
        learning_rate: float,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.01,
        boundaries: Sequence[int] = (),
        decay: float = 0.1,
        policy: str = "step",
    ):
        if policy not in ("step", "cosine"):
            raise ValueError(f"policy must be 'step' or 'cosine', got {policy!r}")
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1, warmup_steps >= 0 ({total_steps=})")
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_ratio = float(warmup_ratio)
        self.boundaries = tuple(int(b) for b in boundaries)
        self.decay = float(decay)
        self.policy = policy

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.policy == "step":
            num_decays = sum(ops.cast(step >= b, "float32") for b in self.boundaries)
            regular = self.learning_rate * ops.power(self.decay, num_decays)
        else:
            progress = ops.minimum(step / self.total_steps, 1.0)
            regular = self.learning_rate * 0.5 * (1.0 + ops.cos(math.pi * progress))
        if not self.warmup_steps:
            return regular
        k = (1.0 - step / self.warmup_steps) * (1.0 - self.warmup_ratio)
        return ops.where(step < self.warmup_steps, regular * (1.0 - k), regular)

    def get_config(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_ratio": self.warmup_ratio,
            "boundaries": list(self.boundaries),
            "decay": self.decay,
            "policy": self.policy,
        }


def epoch_boundaries(lr_steps: Sequence[int], epochs: int, total_steps: int) -> tuple[int, ...]:
    """Recipe epochs -> step boundaries: `epoch / epochs * total_steps` rounded half up."""
    return tuple(math.floor(epoch * total_steps / epochs + 0.5) for epoch in lr_steps)


def schedule_from_config(train: TrainConfig, total_steps: int) -> WarmupDecaySchedule:
    """The recipe's schedule over a run of `total_steps` at `train.learning_rate` (batch-scaled)."""
    return WarmupDecaySchedule(
        learning_rate=train.learning_rate,
        total_steps=total_steps,
        warmup_steps=train.warmup_iters,
        warmup_ratio=train.warmup_ratio,
        boundaries=epoch_boundaries(train.lr_steps, train.epochs, total_steps)
        if train.schedule == "step"
        else (),
        decay=train.lr_decay,
        policy=train.schedule,
    )
