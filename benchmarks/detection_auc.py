"""Can a trained fusion tell a corrupted modality from a clean one? For one run meta-trained on corrupted data
(``data.corrupt_rate``), per modality: the AUC with which the fusion's per-sample weights rank the modality's
clean entries above its corrupted ones (0.5: chance, 1: every clean entry weighs more), over the query samples
of the fixed test episodes that carry every modality; and the same AUC for a cross-modal matcher trained apart
for ``--matcher-steps`` on the meta-train split's features from the run's encoders, with matched attention's
contrastive loss, scoring each test sample's entries by their mean cosine to its other modalities: what a
detector trained longer on the same features finds (0 steps: skipped).

    python benchmarks/detection_auc.py --run runs/fashion_fusion/fusion_corrupt0.3_protonet_matched
    python benchmarks/detection_auc.py --run RUN --episodes 600 --matcher-steps 0

A fusion that weighs every present modality alike (mean, transformer) scores 0.5 on the first line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from metafusion.config import from_dict
from metafusion.engine import build_experiment
from metafusion.engine.build import load_trained
from metafusion.engine.checkpoint import hardware, load_checkpoint, run_checkpoint
from metafusion.models.fusion import MatchedAttention


def auc(clean: torch.Tensor, corrupted: torch.Tensor) -> float:
    """P(a clean entry scores above a corrupted one), ties counting half (Mann-Whitney)."""
    wins = sum(
        ((part.unsqueeze(1) > corrupted).double() + 0.5 * (part.unsqueeze(1) == corrupted).double()).sum().item()
        for part in clean.split(1024)
    )
    return wins / (len(clean) * len(corrupted))


def line(label: str, scores: torch.Tensor, corrupted: torch.Tensor, modalities: tuple[str, ...]) -> str:
    """``scores``, ``corrupted``: ``[N, M]`` over samples that carry every modality."""
    aucs = "  ".join(
        f"{m} {auc(scores[~corrupted[:, i], i], scores[corrupted[:, i], i]):.3f}" for i, m in enumerate(modalities)
    )
    return f"{label:<34} AUC {aucs}   ({int(corrupted.sum())} corrupted of {corrupted.numel()} entries)"


@torch.no_grad()
def encode(model, dataset, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [model.encode(dataset.batch(chunk)) for chunk in rows.split(512)]
    return torch.cat([h for h, _ in parts]), torch.cat([m for _, m in parts])


def train_matcher(h: torch.Tensor, mask: torch.Tensor, steps: int, batch: int, seed: int) -> MatchedAttention:
    torch.manual_seed(seed)
    matcher = MatchedAttention(h.shape[1], h.shape[2])
    optimizer = torch.optim.Adam(matcher.matchers.parameters(), lr=1e-3)
    draw = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="matcher", leave=False):
        rows = torch.randint(len(h), (batch,), generator=draw)
        optimizer.zero_grad()
        matcher.auxiliary_loss(h[rows], mask[rows]).backward()
        optimizer.step()
    return matcher


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run folder meta-trained with data.corrupt_rate > 0")
    p.add_argument("--episodes", type=int, default=200, help="fixed test episodes (the run's first ones)")
    p.add_argument("--matcher-steps", type=int, default=3000, help="steps of the matcher trained apart (0: none)")
    p.add_argument("--matcher-batch", type=int, default=120, help="samples per step of the matcher trained apart")
    args = p.parse_args(argv)
    run = Path(args.run)
    state = load_checkpoint(run_checkpoint(run))
    exp = build_experiment(from_dict(state["config"]))
    if exp.corrupted is None:
        raise SystemExit(f"{run} was meta-trained without data.corrupt_rate; there is nothing to detect")
    load_trained(exp.algorithm, state)
    model, modalities = exp.algorithm.model, exp.algorithm.model.modalities
    print(f"{run.name}: {exp.cfg.algo.name}, fusion {exp.cfg.model.fusion}, {hardware(exp.cfg.train.device)}")
    if model.fusion.weighted:
        weights, corrupted = [], []
        for episode in tqdm(exp.test_episodes(args.episodes), desc="episodes", leave=False):
            w = exp.algorithm.evaluate(episode).weights
            full = episode.query.mask[:, [episode.query.modalities.index(m) for m in modalities]].all(1).cpu()
            weights.append(w[full])
            corrupted.append(exp.corrupted[torch.tensor(episode.indices[len(episode.support) :])][full])
        print(line(f"weights ({args.episodes} test episodes)", torch.cat(weights), torch.cat(corrupted), modalities))
    if args.matcher_steps:
        dataset = exp.dataset
        h, mask = encode(model, dataset, dataset.rows_of_classes(dataset.splits["train"]))
        matcher = train_matcher(h, mask, args.matcher_steps, args.matcher_batch, exp.cfg.train.seed)
        test = dataset.rows_of_classes(dataset.splits["test"])
        h, mask = encode(model, dataset, test)
        full = mask.all(1)
        with torch.no_grad():
            scores = matcher.match(h[full], mask[full])
        print(
            line(f"matcher trained apart ({args.matcher_steps} steps)", scores, exp.corrupted[test][full], modalities)
        )


if __name__ == "__main__":
    main()
