"""Engine: building experiments from configs, the meta-train loop, evaluation, checkpoints, reports."""

from .build import Experiment, build_experiment, load_dataset
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import EvalResult, confidence_interval, meta_test
from .run_folder import RunFolderError
from .stages import stage_compare, stage_fine_tune, stage_meta_test, stage_meta_train, stage_run
from .train import NonFiniteLossError, TrainingStopped, meta_train

__all__ = [
    "Experiment",
    "build_experiment",
    "load_dataset",
    "load_checkpoint",
    "save_checkpoint",
    "EvalResult",
    "confidence_interval",
    "meta_test",
    "RunFolderError",
    "stage_compare",
    "stage_fine_tune",
    "stage_meta_test",
    "stage_meta_train",
    "stage_run",
    "NonFiniteLossError",
    "TrainingStopped",
    "meta_train",
]
