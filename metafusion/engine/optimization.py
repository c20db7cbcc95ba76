"""The meta-learning loop's outer optimizer and learning-rate schedule, by name (``train.optimizer``,
``train.schedule``): adding one is a registration here."""

from __future__ import annotations

import torch

from ..registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")  # (parameters, learning rate) -> torch optimizer
OPTIMIZERS.register("adam")(lambda params, lr: torch.optim.Adam(params, lr=lr))
OPTIMIZERS.register("sgd")(lambda params, lr: torch.optim.SGD(params, lr=lr))

SCHEDULES: Registry = Registry("schedule")  # how far the run is (0 to 1) -> factor on the meta learning rate
SCHEDULES.register("constant")(lambda progress: 1.0)
SCHEDULES.register("linear")(lambda progress: max(0.0, 1.0 - progress))  # anneals to 0 (Reptile's epsilon)
