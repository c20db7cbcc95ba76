"""Prediction speed: an adapted model labelling many samples of a cached dataset at once.

    python benchmarks/predict.py                 # Omniglot Conv4 MAML, 1000 test-class images
    python benchmarks/predict.py --samples 200 --config ''   # the default synthetic 4-modality model

Meta-trains for a few iterations (prediction costs the same whatever the weights are), adapts to one
held-out task with ``fine-tune``, loads the saved model as a user would (``metafusion.load``) and times
``predict`` on ``--samples`` raw samples of the test classes under each protocol: ``support`` (the
default: the support set's normalisation statistics, one batch), ``transductive`` (one batch normalised
over itself) and ``alone`` (each sample in a batch of its own with the support set). Prints the CPU/GPU
with the figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import metafusion
from metafusion.config import load_config
from metafusion.data import MultimodalDataset
from metafusion.engine import stage_fine_tune, stage_meta_train
from metafusion.engine.build import raw_dataset
from metafusion.engine.checkpoint import hardware


def raw_test_samples(cfg, count: int) -> MultimodalDataset:
    """``count`` samples of the test classes, as a user's files would load (before the model's pipeline)."""
    d = raw_dataset(cfg)
    if cfg.data.modalities:
        d = d.select_modalities(cfg.data.modalities)
    return d.unlabelled(d.rows_of_classes(d.splits["test"])[:count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="benchmarks/configs/omniglot_5w1s.yaml")
    parser.add_argument("--algo", default="maml")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    overrides = {"algo.name": args.algo, "train.iterations": 2, "train.meta_batch": 2, "data.val_episodes": 2}
    overrides |= {"select.alphas": [1.0], "select.centroid_weights": [0.0]}  # the weights do not matter here
    cfg = load_config(args.config or None, overrides)
    with tempfile.TemporaryDirectory() as run:
        stage_meta_train(cfg, run, overwrite=True, quiet=True)
        stage_fine_tune(run, quiet=True)
        model = metafusion.load(run)
        data = raw_test_samples(model.trained.cfg, args.samples)
        where = f"{hardware('cpu')}, {torch.get_num_threads()} threads"
        print(f"{cfg.data.dataset} {args.algo}, {len(data)} samples; {where}")
        for protocol in ("support", "transductive", "alone"):
            start = time.perf_counter()
            predictions = model.predict(data, protocol)
            seconds = time.perf_counter() - start
            print(f"  {protocol}: {seconds:.2f} s ({len(predictions) / seconds:.0f} samples/s)")


if __name__ == "__main__":
    main()
