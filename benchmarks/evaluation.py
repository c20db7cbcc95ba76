"""Evaluation speed: meta-test with every episode adapted on its own (the per-episode loop, the form
learn2learn's examples use) vs all episodes adapted together under vmap (``algo.batched_eval=on``),
side by side in one process on the same fixed episodes and the same weights.

    python benchmarks/evaluation.py                      # the rows of docs/performance.md (~6 min here)
    python benchmarks/evaluation.py --episodes 600 --rows omniglot-maml

Each row prints both times, their ratio, and both accuracies (they must agree: the batched form
computes the loop's predictions, up to float rounding). The weights are the untrained initial ones:
adaptation costs the same whatever the weights are. ``algo.batched_eval=auto`` picks batched exactly
where ``metafusion.models.execution.episodes_vmap_pays`` says so; the table shows where that is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from metafusion.config import load_config
from metafusion.engine import build_experiment, meta_test
from metafusion.engine.checkpoint import hardware
from metafusion.models.execution import episodes_vmap_pays

OMNIGLOT = "benchmarks/configs/omniglot_5w1s.yaml"
# name -> (config file or None, overrides)
ROWS = {
    "omniglot-maml": (OMNIGLOT, {"algo.name": "maml"}),  # Conv4, 10 SGD steps at test
    "omniglot-reptile": (OMNIGLOT, {"algo.name": "reptile"}),  # Conv4, 50 Adam steps at test
    "synthetic-maml": (None, {"algo.name": "maml"}),  # the default 4-modality model (2-D CNNs inside)
    "synthetic-reptile": (None, {"algo.name": "reptile"}),
    "tabular+text-maml": (None, {"algo.name": "maml", "data.modalities": ["text", "tabular"]}),
    "tabular+text-reptile": (None, {"algo.name": "reptile", "data.modalities": ["text", "tabular"]}),
    "tabular+text-finetune": (None, {"algo.name": "finetune", "data.modalities": ["text", "tabular"]}),
    "tabular+text-protonet": (None, {"algo.name": "protonet", "data.modalities": ["text", "tabular"]}),
}


def measure(name: str, episodes: int, device: str) -> dict:
    path, overrides = ROWS[name]
    cfg = load_config(
        path, {**overrides, "data.val_episodes": 1, "data.test_episodes": episodes, "train.device": device}
    )
    exp = build_experiment(cfg)
    tests = exp.test_episodes()
    meta_test(exp.algorithm, tests[:2], device=device)  # warm-up (allocator, oneDNN primitive caches)
    row = {
        "row": name,
        "episodes": episodes,
        "inner_steps_test": exp.cfg.algo.inner_steps_test,
        "auto_batched": episodes_vmap_pays(exp.model, device),
    }
    for mode in ("off", "on"):
        exp.algorithm.batched_eval = mode
        torch.manual_seed(0)  # the fine-tune baseline draws its fresh heads from the global RNG
        r = meta_test(exp.algorithm, tests, device=device)
        row[mode] = {"seconds": r.seconds, "accuracy": r.accuracy_mean}
    row["speedup"] = row["off"]["seconds"] / row["on"]["seconds"]
    print(
        f"{name:24s} loop {row['off']['seconds']:7.1f} s  batched {row['on']['seconds']:7.1f} s  "
        f"x{row['speedup']:.2f}  acc {row['off']['accuracy']:.4f} / {row['on']['accuracy']:.4f}  "
        f"auto={'batched' if row['auto_batched'] else 'loop'}",
        flush=True,
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/evaluation_speed.json")
    args = p.parse_args()
    machine = hardware(args.device)
    print(f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = [measure(name, args.episodes, args.device) for name in args.rows.split(",")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"hardware": machine, "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
