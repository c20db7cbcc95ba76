"""Does cross-modal agreement pay when it counts for more? Meta-test one trained ``agreement`` or ``matched``
run (the fusion's weights: ``softmax(W_a h_i + b_a + beta * s_i)``, ``s_i`` how well modality i of a sample
agrees with its other modalities: ``log g_i`` about which samples of the episode it resembles, or the
learned matcher's mean cosine ``c_i``) with ``beta`` set by hand, on the same fixed test episodes, and print
each setting's accuracy and, on corrupted data, the mean weight of corrupted and clean modalities.

    python benchmarks/agreement_scale.py --run runs/fashion_fusion/fusion_corrupt0.3_protonet_agreement
    python benchmarks/agreement_scale.py --run RUN --betas 0,1,4 --episodes 600

``beta = 0`` is the seed's attention with the run's weights; the run's own (meta-learned) beta is printed
first. If a larger beta separates corrupted from clean modalities but costs accuracy, the signal is too
noisy to weigh by, whatever meta-training makes of it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from metafusion.config import from_dict
from metafusion.engine import build_experiment, meta_test
from metafusion.engine.analysis import Analysis
from metafusion.engine.build import load_trained
from metafusion.engine.checkpoint import hardware, load_checkpoint, run_checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run folder meta-trained with --fusion agreement or matched")
    p.add_argument("--betas", default="0,2,4,8", help="comma-separated values of beta to test")
    p.add_argument("--episodes", type=int, default=200, help="fixed test episodes (the run's first ones)")
    args = p.parse_args(argv)
    run = Path(args.run)
    state = load_checkpoint(run_checkpoint(run))
    exp = build_experiment(from_dict(state["config"]))
    if exp.cfg.model.fusion not in ("agreement", "matched"):
        raise SystemExit(
            f"{run} was trained with fusion {exp.cfg.model.fusion!r}; this benchmark needs 'agreement' or 'matched'"
        )
    load_trained(exp.algorithm, state)
    model = exp.algorithm.model
    learned = model.fusion.beta.item()
    print(f"{run.name}: {exp.cfg.algo.name}, {args.episodes} test episodes, {hardware(exp.cfg.train.device)}")
    for beta in [learned, *map(float, args.betas.split(","))]:
        with torch.no_grad():
            model.fusion.beta.fill_(beta)
        analysis = Analysis(exp.algorithm, exp.corrupted)
        r = meta_test(exp.algorithm, exp.test_episodes(args.episodes), observe=analysis.add)
        split = analysis.summary()["corrupted_weights"]
        weights = f"  weight corrupted {split['corrupted']:.3f} / clean {split['clean']:.3f}" if split else ""
        label = f"beta {beta:.3f}" + (" (learned)" if beta == learned else "")
        print(f"{label:<22} accuracy {100 * r.accuracy_mean:.2f} ± {100 * r.accuracy_ci95:.2f} %{weights}", flush=True)


if __name__ == "__main__":
    main()
