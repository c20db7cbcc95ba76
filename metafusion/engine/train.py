"""The meta-train loop: sample a meta-batch, let the algorithm fill .grad, step, log, validate, checkpoint."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import to_dict
from . import distributed
from .build import Experiment
from .checkpoint import library_versions, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .evaluate import meta_test
from .report import MetricsLog, PeakMemory, peak_memory_mb


class NonFiniteLossError(RuntimeError):
    """Meta-training produced a NaN/inf loss or gradient (and the config says stop)."""


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr) if name == "adam" else torch.optim.SGD(params, lr=lr)


def _finite(metrics: dict, params: list[torch.Tensor]) -> bool:
    if not math.isfinite(metrics["loss"]):
        return False
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def meta_train(exp: Experiment, run_dir: Path | None = None, *, resume: bool = False, quiet: bool = False,
               stop_at: int | None = None) -> dict:
    """Meta-train ``exp`` for ``train.iterations`` (or until ``train.budget_minutes``), writing
    metrics, TensorBoard events and ``last.pt`` / ``best.pt`` (by meta-validation accuracy) into
    ``run_dir``. ``resume`` continues from ``run_dir/last.pt`` and reproduces the uninterrupted run
    exactly. ``stop_at`` ends after that iteration (as an interruption would; used by tests).

    Under torchrun the meta-batch is split across ranks (see ``distributed``); only rank 0 writes."""
    cfg, algo = exp.cfg.train, exp.algorithm
    rank = distributed.current()
    if cfg.meta_batch < rank.world:
        raise ValueError(f"train.meta_batch={cfg.meta_batch} is smaller than the {rank.world} ranks: "
                         f"every rank needs at least one task")
    params = list(algo.parameters())
    if not params:  # nothing to meta-learn (centroid): validate once and checkpoint, so every stage works
        return _without_meta_parameters(exp, run_dir if rank.main else None)
    opt = make_optimizer(cfg.optimizer, params, cfg.meta_lr)
    state = {"step": 0, "best": -1.0, "elapsed": 0.0}
    # Linear schedule: the meta lr (Reptile's epsilon) falls from meta_lr to 0 over the run. With a
    # time budget the run's end is whichever comes first, iterations or minutes, so the schedule
    # follows the further along of the two: a budget-cut run still anneals to 0 (as the papers' did).
    total, budget_s = cfg.iterations, 60 * cfg.budget_minutes if cfg.budget_minutes else None

    def progress(step: int) -> float:
        return max(step / total, state["elapsed"] / budget_s if budget_s else 0.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda s: max(0.0, 1 - progress(s)))
                                              if cfg.schedule == "linear" else (lambda s: 1.0))
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        algo.module.load_state_dict(ckpt["module"])
        algo.load_state_dict(ckpt["algorithm"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        exp.train_sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        state.update(step=ckpt["step"], best=ckpt["best_val_accuracy"], elapsed=ckpt["elapsed"])
    distributed.broadcast_parameters(params)
    if not rank.main:
        run_dir = None  # rank 0 alone logs, validates and writes checkpoints
    log = MetricsLog(run_dir, resume_step=state["step"]) if run_dir else None
    bar = tqdm(total=total, initial=state["step"], desc=f"meta-train {exp.cfg.algo.name}",
               disable=True if quiet or not rank.main else None, dynamic_ncols=True)
    with PeakMemory() as memory:
        try:
            _loop(exp, opt, sched, params, state, run_dir, log, bar, stop_at, rank)
        finally:
            bar.close()
            if log:
                log.close()
    return {"iterations": state["step"], "seconds": state["elapsed"],
            "tasks_per_s": state["step"] * cfg.meta_batch / max(state["elapsed"], 1e-9),
            "best_val_accuracy": state["best"], "peak_memory_mb": memory.peak_mb}


def _loop(exp: Experiment, opt, sched, params, state: dict, run_dir: Path | None, log, bar, stop_at,
          rank: distributed.Rank) -> None:
    """The loop itself; ``state`` (step, best, elapsed) is updated in place."""
    cfg, algo = exp.cfg.train, exp.algorithm
    last_path = run_dir / "last.pt" if run_dir else None
    # ``elapsed`` counts meta-training only: validation time is excluded from the budget and tasks/s.
    start, elapsed_before, val_acc, val_seconds = time.perf_counter(), state["elapsed"], float("nan"), 0.0

    def clock() -> float:
        return elapsed_before + time.perf_counter() - start - val_seconds

    while state["step"] < cfg.iterations:
        # Every rank draws the whole meta-batch (identical samplers) and adapts its own share.
        tasks = [exp.train_sampler.sample() for _ in range(cfg.meta_batch)]
        mine = [t.to(cfg.device) for t in rank.shard(tasks)]
        opt.zero_grad(set_to_none=True)
        metrics = algo.meta_backward(mine)
        out_of_time = rank.main and cfg.budget_minutes is not None and clock() >= 60 * cfg.budget_minutes
        metrics, out_of_time = distributed.all_reduce_meta_batch(params, len(mine), len(tasks), metrics,
                                                                 out_of_time)
        state["step"] = step = state["step"] + 1
        if not _finite(metrics, params):
            if cfg.on_nan == "stop":
                where = last_path if last_path and last_path.exists() else "none written yet"
                raise NonFiniteLossError(f"non-finite meta-loss or gradient at iteration {step} "
                                         f"(loss={metrics['loss']}); last good checkpoint: {where}. "
                                         f"Lower the learning rates, add train.clip, or set train.on_nan=skip.")
            tqdm.write(f"iteration {step}: non-finite meta-loss/gradient, step skipped (train.on_nan=skip)")
        else:
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
        state["elapsed"] = elapsed = clock()
        record = {"step": step, "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 3),
                  "tasks_per_s": step * cfg.meta_batch / max(elapsed, 1e-9), **metrics}
        sched.step()
        validate = rank.main and (step % cfg.val_interval == 0 or step == cfg.iterations or out_of_time
                                  or step == stop_at)
        if validate:
            val = meta_test(algo, exp.val_episodes, device=cfg.device)
            val_acc, val_seconds = val.accuracy_mean, val_seconds + val.seconds
            record["val_accuracy"] = val_acc
            if val_acc > state["best"]:
                state["best"] = val_acc
                if run_dir:
                    save_checkpoint(run_dir / "best.pt", _payload(exp, opt, sched, state))
        if log and (validate or step % cfg.log_interval == 0):
            log.write(record)
        if validate and run_dir:
            save_checkpoint(last_path, _payload(exp, opt, sched, state))
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", val=f"{val_acc:.3f}")
        if out_of_time or step == stop_at:
            break


def _without_meta_parameters(exp: Experiment, run_dir: Path | None) -> dict:
    val = meta_test(exp.algorithm, exp.val_episodes, device=exp.cfg.train.device)
    state = {"step": 0, "best": val.accuracy_mean, "elapsed": 0.0}
    if run_dir:
        log = MetricsLog(run_dir)
        log.write({"step": 0, "loss": val.loss, "val_accuracy": val.accuracy_mean})
        log.close()
        for name in ("best.pt", "last.pt"):
            save_checkpoint(run_dir / name, _payload(exp, None, None, state))
    return {"iterations": 0, "seconds": 0.0, "tasks_per_s": 0.0, "best_val_accuracy": val.accuracy_mean,
            "peak_memory_mb": peak_memory_mb()}


def _payload(exp: Experiment, opt, sched, state: dict) -> dict:
    return {"module": exp.algorithm.module.state_dict(), "algorithm": exp.algorithm.state_dict(),
            "optimizer": opt.state_dict() if opt else {}, "scheduler": sched.state_dict() if sched else {},
            "sampler": exp.train_sampler.state_dict(), "rng": rng_state(), "step": state["step"],
            "best_val_accuracy": state["best"], "elapsed": state["elapsed"], "config": to_dict(exp.cfg),
            "versions": library_versions()}
