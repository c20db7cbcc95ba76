"""The three stages (meta-train, meta-test, fine-tune) and `compare`, each writing into a run folder.

A run folder holds: config.yaml (resolved), metrics.jsonl, tensorboard/, last.pt, best.pt,
results.json, results.md, learning_curve.png, attention.png (and finetune/ after fine-tuning).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from ..algorithms.base import classification_metrics
from ..config import RunConfig, from_dict, resolve, to_dict
from ..data import Episode, EpisodeSampler
from ..errors import InputError
from . import distributed
from .build import Experiment, TrainedModel, build_experiment, load_trained
from .checkpoint import git_commit, hardware, library_versions, load_checkpoint
from .evaluate import meta_test
from .predictor import Predictor
from .report import peak_memory_mb, plot_run, write_compare, write_results
from .train import meta_train


class RunFolderError(InputError, FileExistsError):
    """A run folder would be overwritten, or is missing what a stage needs."""


def check_run_dir(out: str | Path, overwrite: bool = False) -> None:
    """Refuse a taken run folder unless ``overwrite``; writes nothing."""
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--out {run_dir} is a file, not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise RunFolderError(f"run folder {run_dir} already exists; pass --overwrite or choose another --out")


def prepare_run_dir(out: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    run_dir = Path(out)
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise RunFolderError(f"cannot resume: {run_dir / 'last.pt'} does not exist")
        return run_dir
    check_run_dir(run_dir, overwrite)
    if run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_config(cfg: RunConfig, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (no config.yaml)")
    return from_dict(yaml.safe_load(path.read_text()))


def _summary(exp: Experiment, result, train: dict[str, Any] | None, run_dir: Path) -> dict[str, Any]:
    cfg = exp.cfg
    return {
        "name": run_dir.name,
        "algorithm": cfg.algo.name,
        "dataset": cfg.data.dataset,
        "modalities": list(exp.model.modalities),
        "fusion": cfg.model.fusion,
        "ways": cfg.data.ways,
        "shots": cfg.data.shots,
        "queries": cfg.data.queries,
        **result.to_dict(),
        "transductive": cfg.algo.transductive,
        "iterations": (train or {}).get("iterations"),
        "train_seconds": (train or {}).get("seconds", 0.0),
        "tasks_per_s": (train or {}).get("tasks_per_s", 0.0),
        "best_val_accuracy": (train or {}).get("best_val_accuracy"),
        "peak_memory_mb": (train or {}).get("peak_memory_mb", peak_memory_mb()),
        "device": cfg.train.device,
        "hardware": hardware(cfg.train.device),
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
        "git_commit": git_commit(),
    }


def stage_meta_train(
    cfg: RunConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
    stop_at: int | None = None,
    experiment: Experiment | None = None,
) -> tuple[Experiment, dict[str, Any], Path]:
    """Meta-train into ``out``. Launched by torchrun, every rank runs this; rank 0 owns the folder."""
    if resume:
        run_dir = prepare_run_dir(out, resume=True)  # only checks that last.pt exists
        cfg = load_run_config(run_dir)
    cfg = cfg if cfg is not None else experiment.cfg
    rank = distributed.init(cfg.train.device)
    if rank.main and not resume:
        check_run_dir(out, overwrite)  # before the data loads: a taken folder fails in a second
    cfg.train.device = distributed.device_for(cfg.train.device)
    # Data and model come first: a command that fails on bad input leaves an existing run folder untouched.
    exp = experiment or build_experiment(cfg)
    if rank.main and not resume:
        prepare_run_dir(out, overwrite)
    distributed.barrier()
    run_dir = Path(out)
    if rank.main:
        save_config(exp.cfg, run_dir)
    train = meta_train(exp, run_dir, resume=resume, quiet=quiet, stop_at=stop_at)
    train["ranks"] = rank.world
    train["hardware"] = hardware(cfg.train.device)
    if rank.main:
        (run_dir / "train.json").write_text(json.dumps(train, indent=2) + "\n")
    return exp, train, run_dir


def stage_meta_test(
    run_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    episodes: int | None = None,
    transductive: bool | None = None,
    quiet: bool = False,
    experiment: Experiment | None = None,
) -> dict[str, Any]:
    """Evaluate a run's best checkpoint (or ``checkpoint``) on the fixed test episodes.

    ``transductive=False`` classifies each query sample alone with the support set; its results are
    written as ``results_nontransductive.json/.md`` beside the run's default results."""
    run_dir = Path(run_dir)
    ckpt_path = (
        Path(checkpoint)
        if checkpoint
        else (run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt")
    )
    state = load_checkpoint(ckpt_path)
    exp = experiment or build_experiment(from_dict(state["config"]))
    load_trained(exp.algorithm, state)
    if transductive is not None:
        exp.cfg.algo.transductive = exp.algorithm.transductive = transductive
    tests = exp.test_episodes(episodes)
    result = meta_test(exp.algorithm, tests, quiet=quiet, device=exp.cfg.train.device)
    train_path = run_dir / "train.json"
    train = json.loads(train_path.read_text()) if train_path.exists() else None
    summary = _summary(exp, result, train, run_dir)
    summary["checkpoint"] = str(ckpt_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_results(run_dir, summary, "results" if exp.algorithm.transductive else "results_nontransductive")
    plot_run(run_dir, summary)
    return summary


def stage_fine_tune(
    run_dir: str | Path, *, seed: int = 0, steps: int | None = None, task: str = "heldout", quiet: bool = False
) -> dict[str, Any]:
    """Adapt the meta-learned model to one new task and save it as a self-describing adapted model
    (``finetune/model.pt``, read by ``metafusion predict`` and ``metafusion.load``).

    ``task="heldout"``: one N-way K-shot task drawn (with ``seed``) from the test classes.
    Otherwise ``task`` is a path to a user's folder or manifest (see docs/datasets.md); each of its
    classes gives ``shots`` support samples and the rest are queries. A user's task needs no training
    data: the checkpoint rebuilds the model and its input pipeline.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    state = load_checkpoint(run_dir / ("best.pt" if (run_dir / "best.pt").exists() else "last.pt"))
    query_ids = None
    if task == "heldout" or "model_args" not in state:  # checkpoints from before model_args rebuild from the data
        exp = build_experiment(from_dict(state["config"]))
        load_trained(exp.algorithm, state)
        trained = TrainedModel.of(exp)
    else:
        trained = TrainedModel.restore(state)
    d = trained.cfg.data
    if task == "heldout":
        episode = EpisodeSampler(exp.dataset, "test", d.ways, d.shots, d.queries, seed=seed).sample()
        names = exp.dataset.metadata.get("class_names")
        classes = [str(names[c]) if names else f"class {c}" for c in episode.classes]
    else:
        episode, classes, query_ids = user_task(task, trained, d.shots)
    episode = episode.to(trained.cfg.train.device)
    learner = trained.algorithm.adapt(episode.support, steps)
    logits = trained.algorithm.predict(learner, episode)
    metrics = classification_metrics(logits, episode.query.labels, episode.ways)
    finite = torch.isfinite(logits).all(1).tolist()
    out = run_dir / "finetune"
    model_path = Predictor(trained, learner, episode.support, classes).save(
        out / "model.pt", task=task, seed=seed, steps=steps
    )
    result = {
        "task": task,
        "seed": seed,
        "ways": episode.ways,
        "shots": episode.shots,
        "queries": len(episode.query),
        "classes": classes,
        "query_accuracy": metrics["accuracy"],
        "diverged": metrics["diverged"],
        "query_ids": query_ids,
        "query_predictions": [classes[i] if ok else None for i, ok in zip(logits.argmax(1).tolist(), finite)],
        "steps": steps if steps is not None else trained.cfg.algo.inner_steps_test,
        "model": str(model_path),
        "predict": f"metafusion predict --model {model_path} --data YOUR_FILES --out {out / 'predictions.csv'}",
    }
    (out / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def user_task(path: str, trained: TrainedModel, shots: int) -> tuple[Episode, list[str], list[str]]:
    """A user's folder/manifest as one episode (first ``shots`` samples per class -> support, the rest
    -> queries), its class names and the ids of its queries."""
    from ..data.manifest import load_user_data

    raw = load_user_data(path, modalities=trained.inputs.modalities, like=trained.inputs)
    data = trained.prepare(raw)
    names = data.metadata["class_names"]
    support_rows, query_rows = [], []
    for c in sorted(set(data.labels)):
        rows = torch.nonzero(data.targets == c).flatten()
        if len(rows) <= shots:
            raise InputError(
                f"{path}: class {names[c]!r} has {len(rows)} samples; "
                f"fine-tuning needs more than shots={shots} (the rest are queries)"
            )
        support_rows.append(rows[:shots])
        query_rows.append(rows[shots:])
    s, q = torch.cat(support_rows), torch.cat(query_rows)
    ways = len(support_rows)
    trained.set_ways(ways)  # the task's own number of classes
    support, query = data.batch(s), data.batch(q)
    rows = tuple(torch.cat([s, q]).tolist())
    episode = Episode(support, query, ways, shots, len(q) // ways, tuple(range(ways)), rows)
    return episode, list(names), [data.metadata["ids"][i] for i in q.tolist()]


def stage_run(cfg: RunConfig, out: str | Path, *, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """All three stages for one config."""
    exp, _, run_dir = stage_meta_train(cfg, out, overwrite=overwrite, quiet=quiet)
    summary = stage_meta_test(run_dir, quiet=quiet, experiment=exp)
    summary["finetune"] = stage_fine_tune(run_dir, quiet=quiet)
    write_results(run_dir, summary)
    return summary


def stage_compare(
    cfg: RunConfig,
    algos: list[str],
    out: str | Path,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    baseline: bool = True,
) -> tuple[list[dict[str, Any]], str]:
    """Meta-train each algorithm on the same meta-train stream (same seed) and test all of them on the
    identical fixed test episodes; write compare.md / compare.csv and one run folder per algorithm.
    ``baseline`` adds the ``centroid`` row (frozen features + nearest class mean, seconds to run): the
    number every meta-learner in the table has to beat."""
    if baseline and "centroid" not in algos:
        algos = [*algos, "centroid"]
    configs = []
    for name in algos:  # every algorithm's settings are checked before anything runs or is written
        c = copy.deepcopy(cfg)
        c.algo.name = name
        configs.append(resolve(c))
    check_run_dir(out, overwrite)
    first = build_experiment(configs[0])  # bad data fails here, before the folder is touched
    out = prepare_run_dir(out, overwrite)
    rows = []
    for i, c in enumerate(configs):
        exp, _, run_dir = stage_meta_train(c, out / c.algo.name, quiet=quiet, experiment=first if i == 0 else None)
        rows.append(stage_meta_test(run_dir, quiet=quiet, experiment=exp))
    if len({r["fingerprint"] for r in rows}) != 1:  # internal invariant: the comparison would be unfair
        raise AssertionError("algorithms were tested on different episodes")
    return rows, write_compare(out, rows)
