"""Reptile's test-time inner Adam, fresh vs warm (``algo.warm_test_optimizer``), on one checkpoint and the same
episodes: the measurement behind recipe R5 in docs/results.md.

    python benchmarks/reptile_test_optimizer.py --run RUN                        # validation episodes, both modes
    python benchmarks/reptile_test_optimizer.py --run RUN --split test --warm off --json OUT.json
    python benchmarks/reptile_test_optimizer.py --run RUN --shots 5            # a 1-shot run on 5-shot episodes
    python benchmarks/reptile_test_optimizer.py --run RUN --split test --episodes 100   # the first 100 test episodes

Meta-training's inner Adam (beta1 = 0) keeps its second moments across tasks; a fresh one takes a first step of
the full learning rate on every weight. ``warm`` starts each test-time adaptation from the trained moments
(read from the checkpoint), as the Reptile paper's code evaluates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metafusion.config import from_dict
from metafusion.engine import meta_test
from metafusion.engine.build import build_experiment, load_trained
from metafusion.engine.checkpoint import hardware, load_checkpoint, run_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a Reptile run folder (its best.pt, else last.pt)")
    ap.add_argument("--split", choices=("val", "test"), default="val", help="the run's fixed episodes of this split")
    ap.add_argument("--modes", default="transductive,non-transductive", help="evaluation modes, comma-separated")
    ap.add_argument("--warm", default="off,on", help="test-time Adam: off (fresh), on (trained moments), or both")
    ap.add_argument(
        "--shots",
        type=int,
        help="evaluate on episodes of this many shots instead of the run's (Reptile meta-trains on data.train_shots "
        "whatever the test shots, so a 1-shot run's checkpoint serves the 5-shot protocol too)",
    )
    ap.add_argument("--episodes", type=int, help="only the first N of the split's episodes (as meta-test --episodes)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    run = Path(args.run)
    state = load_checkpoint(run_checkpoint(run))
    cfg = from_dict(state["config"])
    cfg.data.shots = args.shots or cfg.data.shots
    exp = build_experiment(cfg)
    if exp.cfg.algo.name != "reptile":
        raise SystemExit(f"{run} is a {exp.cfg.algo.name} run; the test-time Adam is Reptile's")
    load_trained(exp.algorithm, state)
    episodes = exp.val_episodes[: args.episodes] if args.split == "val" else exp.test_episodes(args.episodes)
    rows = []
    for mode in args.modes.split(","):
        exp.algorithm.transductive = {"transductive": True, "non-transductive": False}[mode]
        for warm in args.warm.split(","):
            exp.algorithm.warm_test_optimizer = {"off": False, "on": True}[warm]
            r = meta_test(exp.algorithm, episodes, quiet=False, desc=f"{mode}, warm {warm}")
            rows.append({"mode": mode, "warm_test_optimizer": warm == "on", **r.to_dict()})
            print(
                f"{run.name} {args.split} {mode:>16} warm {warm:>3}: {100 * r.accuracy_mean:.2f} ± "
                f"{100 * r.accuracy_ci95:.2f} % ({r.episodes} episodes, fingerprint {r.fingerprint}, "
                f"{r.seconds:.0f} s)",
                flush=True,
            )
    if args.json:
        out = {"run": str(run), "split": args.split, "shots": cfg.data.shots, "hardware": hardware("cpu")}
        Path(args.json).write_text(json.dumps({**out, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
