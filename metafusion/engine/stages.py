"""The three stages (meta-train, meta-test, fine-tune) and `compare`, each writing into a run folder.

A run folder holds: config.yaml (resolved), metrics.jsonl, tensorboard/, last.pt, best.pt,
results.json, results.md, learning_curve.png, attention.png (with a weighing fusion also task_weights.csv/.png,
and corrupted_weights.png on corrupted data; finetune/ after fine-tuning).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml

from ..algorithms.base import classification_metrics
from ..algorithms.test_time import SupportTuning
from ..config import RunConfig, from_dict, to_dict
from ..data import Episode, EpisodeSampler
from ..errors import InputError, warn
from . import distributed
from .analysis import Analysis
from .build import Experiment, TrainedModel, build_experiment, load_trained
from .checkpoint import git_commit, hardware, library_versions, load_checkpoint, run_checkpoint
from .evaluate import centroid_accuracies, meta_test, paired_difference
from .memory import peak_memory_mb
from .predictor import PREDICT_PROTOCOL, Predictions, Predictor
from .report import plot_run, write_compare, write_results, write_task_weights
from .resolve import resolve
from .run_folder import RunFolderError, check_out, is_run_folder, locked, new_run_folder
from .selection import select_run
from .train import meta_train, stop_requests

# Where meta-test writes each protocol's results (the names of the published protocols' files stay).
RESULTS_STEM = {"transductive": "results", "alone": "results_nontransductive", "support": "results_support"}


def require_checkpoint(run_dir: Path) -> Path:
    """``run_dir/last.pt``, or a RunFolderError saying why the run cannot be continued."""
    if not (run_dir / "last.pt").is_file():
        if not run_dir.is_dir():
            raise RunFolderError(f"cannot resume: run folder {run_dir} does not exist")
        raise RunFolderError(
            f"cannot resume: {run_dir / 'last.pt'} does not exist (the run stopped before its first checkpoint); "
            f"start it again with --overwrite"
        )
    return run_dir / "last.pt"


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
        "transductive": exp.algorithm.transductive,
        "protocol": exp.algorithm.evaluation_protocol,
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


def _check_unedited(cfg: RunConfig, began: dict[str, Any], run_dir: Path) -> None:
    """A resumed run continues as it began: its config.yaml may differ from the checkpoint's config in its
    length (``--iterations`` writes it) and nothing else."""

    def flat(values: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in values.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    now, then = flat(to_dict(cfg)), flat(to_dict(from_dict(began)))
    edited = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k) and k != "train.iterations")
    if edited:
        raise InputError(
            f"{run_dir}/config.yaml was edited since the run began ({', '.join(edited[:5])}); --resume continues "
            f"the run as it began: undo the edit, or start a new run with the new config"
        )


def stage_meta_train(
    cfg: RunConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
    stop_at: int | None = None,
    experiment: Experiment | None = None,
    iterations: int | None = None,
) -> tuple[Experiment, dict[str, Any], Path]:
    """Meta-train into ``out``. Launched by torchrun, every rank runs this; rank 0 owns the folder.

    Data and model are built before the folder is touched, so bad input leaves an existing folder as it
    was. From the moment the folder is made, SIGINT/SIGTERM end the run after its next step with
    ``last.pt`` written (resumable); a run that fails before its first checkpoint removes what it wrote.
    ``iterations`` (with ``resume``): the resumed run's new length, at least the steps it has taken."""
    run_dir = Path(out)
    if resume:
        require_checkpoint(run_dir)
        cfg = load_run_config(run_dir)
        last = load_checkpoint(run_dir / "last.pt")
        _check_unedited(cfg, last["config"], run_dir)
        if iterations is not None:
            done = last["step"]
            if iterations < done:
                raise InputError(f"--iterations {iterations}: the run has already taken {done} steps")
            cfg.train.iterations = iterations
            save_config(cfg, run_dir)  # the run's own config says how long it now is
    cfg = cfg if cfg is not None else experiment.cfg
    rank = distributed.init(cfg.train.device)
    if rank.main and not resume:
        check_out(run_dir, overwrite, kind="meta-train")  # before the data loads: a taken folder fails in a second
    cfg.train.device = distributed.device_for(cfg.train.device)
    exp = experiment or build_experiment(cfg)
    created = not run_dir.exists()
    if not rank.main:
        folder = nullcontext()
    else:
        folder = locked(run_dir) if resume else new_run_folder(run_dir, overwrite, kind="meta-train")
    with stop_requests(), folder:
        distributed.barrier()
        if rank.main and not resume:
            save_config(exp.cfg, run_dir)
        try:
            train = meta_train(exp, run_dir, resume=resume, quiet=quiet, stop_at=stop_at)
        except BaseException:
            if rank.main and not resume and not (run_dir / "last.pt").exists():
                _remove_unfinished(run_dir, created)
            raise
        train["ranks"] = rank.world
        train["hardware"] = hardware(cfg.train.device)
        if rank.main:
            chosen = select_run(exp, run_dir, (train.get("validation") or {}).get("episodes"), quiet=quiet)
            if chosen is not None:
                train["selection"] = {k: v for k, v in chosen.to_dict().items() if k != "candidates"}
            (run_dir / "train.json").write_text(json.dumps(train, indent=2) + "\n")
    return exp, train, run_dir


def _remove_unfinished(run_dir: Path, created: bool) -> None:
    """What a run that failed before its first checkpoint wrote: nothing in it can be resumed."""
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:  # the user's (empty) folder, or one --overwrite emptied: left empty
        for entry in run_dir.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    print(f"metafusion: removed {run_dir}: the run stopped before its first checkpoint", file=sys.stderr)


def stage_meta_test(
    run_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    episodes: int | None = None,
    protocol: str | None = None,
    quiet: bool = False,
    experiment: Experiment | None = None,
    tune: bool = False,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint (``run_checkpoint``: the selected model, or ``checkpoint``) on the fixed test
    episodes, with the untrained centroid on the same episodes and the paired difference.

    ``protocol`` (default: the run's ``algo.transductive``) says how queries are classified
    (``MetaAlgorithm.predict_with_weights``); ``tune``: fine-tune on each support set first
    (``SupportTuning``). Each protocol's results have their own files (``RESULTS_STEM``: ``results.json`` for
    the transductive one), suffixed with another checkpoint's name (``results_last.json``) and ``_tuned``."""
    run_dir = Path(run_dir)
    ckpt_path = Path(checkpoint) if checkpoint else run_checkpoint(run_dir)
    state = load_checkpoint(ckpt_path)
    exp = experiment or build_experiment(from_dict(state["config"]))
    load_trained(exp.algorithm, state)
    exp.algorithm.evaluation_protocol = exp.algorithm.protocol(protocol)
    if tune and exp.algorithm.meta_parameters:
        exp.algorithm.tuning = SupportTuning(exp.cfg.tune)
    stem = RESULTS_STEM[exp.algorithm.evaluation_protocol]
    if ckpt_path.resolve() != run_checkpoint(run_dir).resolve():
        stem += f"_{ckpt_path.stem}"
    if exp.algorithm.tuning is not None:
        stem += "_tuned"
    if not is_run_folder(run_dir):  # results are written beside the checkpoint: only into a run folder
        raise RunFolderError(
            f"meta-test writes its results into {run_dir}, which is not a run folder; copy the checkpoint into a "
            f"folder of its own and test it there"
        )
    with locked(run_dir):
        tests = exp.test_episodes(episodes)
        analysis = Analysis(exp.algorithm, exp.corrupted)
        device = exp.cfg.train.device
        result = meta_test(exp.algorithm, tests, quiet=quiet, device=device, observe=analysis.add)
        train_path = run_dir / "train.json"
        train = json.loads(train_path.read_text()) if train_path.exists() else None
        summary = _summary(exp, result, train, run_dir) | analysis.summary()
        summary["checkpoint"] = str(ckpt_path)
        summary["selection"] = state.get("selection")
        tuning = exp.algorithm.tuning
        summary["tuned"] = tuning is not None
        if tuning is not None:  # how often each learning rate won (0: the meta-learned weights kept)
            summary["tuning_rates"] = {f"{lr:g}": n for lr, n in sorted(tuning.chosen.items())}
        summary["seconds_per_episode"] = result.seconds / max(result.episodes, 1)
        summary["stem"] = stem
        if exp.algorithm.meta_parameters:  # the untrained baseline on the same episodes, paired
            centroid = centroid_accuracies(exp.algorithm, tests, device)
            summary["centroid_accuracy"] = sum(centroid) / len(centroid)
            summary["vs_centroid"] = paired_difference(result.accuracies, centroid)
        write_results(run_dir, summary, stem)
        per_task = analysis.rows()
        if per_task:
            write_task_weights(run_dir, per_task)
        plot_run(run_dir, summary, per_task)
    return summary


def stage_fine_tune(
    run_dir: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    task: str = "heldout",
    quiet: bool = False,
    out: str | Path | None = None,
    overwrite: bool = False,
    tune: bool = False,
) -> dict[str, Any]:
    """Adapt the meta-learned model to one new task and save it as a self-describing adapted model
    (``out/model.pt``, by default ``RUN/finetune/model.pt``, read by ``metafusion predict`` and
    ``metafusion.load``). An earlier adapted model in ``out`` is kept unless ``overwrite``.

    ``task="heldout"``: one N-way K-shot task drawn (with ``seed``) from the test classes.
    Otherwise ``task`` is a path to a user's folder or manifest (see docs/datasets.md); each of its
    classes gives ``shots`` support samples and the rest are queries. A user's task needs no training
    data: the checkpoint rebuilds the model and its input pipeline. ``tune`` (or the run's ``tune.enabled``):
    fine-tune the model on the support set first, with a learning-rate search that includes 0.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} {'is a file' if run_dir.exists() else 'does not exist'}")
    out = Path(out) if out is not None else run_dir / "finetune"
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise RunFolderError(f"--out {out} would hold the run folder {run_dir}; choose a folder of its own")
    check_out(out, overwrite, kind="fine-tune")  # before the work: an earlier adapted model is kept unless --overwrite
    trained, episode, classes, query_ids = _task_to_adapt(load_checkpoint(run_checkpoint(run_dir)), task, seed)
    if tune and trained.algorithm.meta_parameters:
        trained.algorithm.tuning = SupportTuning(trained.cfg.tune)
    episode = episode.to(trained.cfg.train.device)
    learner = trained.algorithm.task_learner(episode.support, steps)
    logits = trained.algorithm.predict(learner, episode, PREDICT_PROTOCOL)  # as the saved model will predict
    metrics = classification_metrics(logits, episode.query.labels, episode.ways)
    finite = torch.isfinite(logits).all(1).tolist()
    if not all(finite):  # a model that answers NaN is no model: nothing is saved
        raise InputError(
            f"the adapted model's outputs are not finite on {finite.count(False)} of {len(finite)} query samples "
            f"(it diverged); nothing saved. Fewer --steps, a lower algo.inner_lr_test, or features that vary "
            f"on the meta-train data (constant ones) are the usual fixes"
        )
    inside = run_dir.resolve() in out.resolve().parents
    with locked(run_dir) if inside else nullcontext(), new_run_folder(out, overwrite, kind="fine-tune"):
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
            "protocol": PREDICT_PROTOCOL,
            "diverged": metrics["diverged"],
            "query_ids": query_ids,
            "query_predictions": [classes[i] if ok else None for i, ok in zip(logits.argmax(1).tolist(), finite)],
            "steps": steps if steps is not None else trained.cfg.algo.inner_steps_test,
            "tuned": trained.algorithm.tuning is not None,
            "centroid_weight": trained.algorithm.centroid_weight,
            "model": str(model_path),
            "predict": f"metafusion predict --model {model_path} --data YOUR_FILES --out {out / 'predictions.csv'}",
        }
        (out / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _task_to_adapt(state: dict, task: str, seed: int) -> tuple[TrainedModel, Episode, list[str], list[str] | None]:
    """The trained model a checkpoint holds and the task to adapt it to: one drawn from the test classes
    (``"heldout"``), or a user's folder or manifest; with the task's class names and its queries' ids."""
    if task == "heldout" or "model_args" not in state:  # checkpoints from before model_args rebuild from the data
        exp = build_experiment(from_dict(state["config"]))
        load_trained(exp.algorithm, state)
        trained = TrainedModel.of(exp)
    else:
        trained = TrainedModel.restore(state)
    d = trained.cfg.data
    if task != "heldout":
        return trained, *user_task(task, trained, d.shots)
    episode = EpisodeSampler(exp.dataset, "test", d.ways, d.shots, d.queries, seed=seed).sample()
    names = exp.dataset.metadata.get("class_names")
    return trained, episode, [str(names[c]) if names else f"class {c}" for c in episode.classes], None


def stage_predict(
    model: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    force: bool = False,
    protocol: str = PREDICT_PROTOCOL,
    skip_unreadable: bool = False,
    device: str = "cpu",
) -> tuple[Predictions, Path]:
    """Label the samples of ``data`` (a folder or manifest) with the adapted model ``model`` and write the
    predictions to ``out`` (default: ``predictions.csv`` beside the model). ``out`` never replaces the
    model or a file of the data, and replaces another existing file only with ``force``."""
    from ..data.manifest import load_user_data

    predictor = Predictor.load(model, device)
    model_file = predictor.path
    out = Path(out) if out else model_file.with_name("predictions.csv")
    samples = load_user_data(
        data, predictor.modalities, like=predictor.trained.inputs, skip_errors=skip_unreadable, labelled=False
    )
    target, data = out.resolve(), Path(data).resolve()
    if target == model_file.resolve() or str(target) in samples.metadata["files"] or target == data:
        raise InputError(f"--out {out} is the model or one of the files it predicts; choose another file")
    if data.is_dir() and data in target.parents:
        raise InputError(f"--out {out} is inside the data folder {data} (it would become part of the data)")
    predictions = predictor.predict(samples, protocol)
    diverged = int(predictions.diverged.sum())
    if diverged:  # no file of NaN probabilities and empty labels
        raise InputError(
            f"the model's outputs are not finite for {diverged} of {len(predictions)} samples (first: "
            f"{predictions.ids[int(predictions.diverged.nonzero()[0])]}); nothing written"
        )
    return predictions, predictions.write(out, overwrite=force)


def user_task(path: str, trained: TrainedModel, shots: int) -> tuple[Episode, list[str], list[str]]:
    """A user's folder/manifest as one episode (first ``shots`` samples per class -> support, the rest
    -> queries), its class names and the ids of its queries."""
    from ..data.manifest import load_user_data

    raw = load_user_data(path, modalities=trained.inputs.modalities, like=trained.inputs)
    data = trained.prepare(raw)
    names = data.metadata["class_names"]
    if len(set(data.labels)) < 2:
        raise InputError(
            f"{path}: a task needs at least 2 classes to tell apart, it has {len(set(data.labels))} "
            f"({', '.join(map(repr, names)) or 'none'})"
        )
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
    seen = sorted(set(names) & set(trained.train_class_names or []))
    if seen:
        warn(
            f"{path}: classes {', '.join(map(repr, seen))} were meta-training classes of this model: its accuracy "
            f"on them is not a few-shot result on new classes"
        )
    _warn_support_repeats(path, data, s, q)
    ways = len(support_rows)
    trained.set_ways(ways)  # the task's own number of classes
    support, query = data.batch(s), data.batch(q)
    rows = tuple(torch.cat([s, q]).tolist())
    episode = Episode(support, query, ways, shots, len(q) // ways, tuple(range(ways)), rows)
    return episode, list(names), [data.metadata["ids"][i] for i in q.tolist()]


def _warn_support_repeats(path: str, data, support: torch.Tensor, query: torch.Tensor) -> None:
    """Queries equal to a support sample (the same inputs): they are scored on what the model adapted to."""

    def key(row: int) -> tuple:
        return tuple(
            data.data[m][row].numpy().tobytes() if present else None
            for m, present in zip(data.modalities, data.present[row].tolist())
        )

    shown = {key(r) for r in support.tolist()}
    repeats = [r for r in query.tolist() if key(r) in shown]
    if repeats:
        warn(
            f"{path}: {len(repeats)} query samples equal a support sample (first: {data.metadata['ids'][repeats[0]]}); "
            f"their accuracy says nothing of new samples"
        )


def stage_run(cfg: RunConfig, out: str | Path, *, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """All three stages for one config."""
    exp, _, run_dir = stage_meta_train(cfg, out, overwrite=overwrite, quiet=quiet)
    with locked(run_dir):  # one writer from the first stage to the last
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
    ``baseline`` adds the rows a user tries first (frozen features + nearest class mean, seconds to run):
    ``centroid`` on the model's modalities and, where there are several, on each modality alone -- the
    numbers every meta-learner in the table has to beat, and what fusing is worth without learning."""
    if baseline and "centroid" not in algos:
        algos = [*algos, "centroid"]
    configs = []
    for name in algos:  # every algorithm's settings are checked before anything runs or is written
        c = copy.deepcopy(cfg)
        c.algo.name = name
        configs.append(resolve(c))
    out = check_out(out, overwrite, kind="compare")
    first = build_experiment(configs[0])  # bad data fails here, before the folder is touched
    folders = [c.algo.name for c in configs]
    if baseline and len(first.model.modalities) > 1:
        for m in first.model.modalities:
            c = copy.deepcopy(cfg)
            c.algo.name, c.model.modalities = "centroid", [m]
            configs.append(resolve(c))
            folders.append(f"centroid-{m}")
    with new_run_folder(out, overwrite, kind="compare"):
        rows, centroid_data = [], None
        for i, (c, folder) in enumerate(zip(configs, folders)):
            given = None
            if i == 0:
                given = first
            elif folder != c.algo.name:  # the centroid on one modality: the data the fused centroid row loaded
                given = build_experiment(c, centroid_data)
            exp, _, run_dir = stage_meta_train(c, out / folder, quiet=quiet, experiment=given)
            if folder == "centroid":
                centroid_data = exp.data
            rows.append(stage_meta_test(run_dir, quiet=quiet, experiment=exp))
        if len({r["fingerprint"] for r in rows}) != 1:  # internal invariant: the comparison would be unfair
            raise AssertionError("algorithms were tested on different episodes")
        return rows, write_compare(out, rows)
