"""The meta-train loop: sample a meta-batch, let the algorithm fill .grad, step, log, validate, checkpoint."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import to_dict
from ..errors import InputError
from . import distributed
from .build import Experiment, load_trained, model_args
from .checkpoint import CHECKPOINT_FORMAT, library_versions, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .evaluate import meta_test
from .memory import PeakMemory, peak_memory_mb
from .metrics_log import MetricsLog
from .optimization import OPTIMIZERS, SCHEDULES
from .selection import loaded


class NonFiniteLossError(InputError, RuntimeError):
    """Meta-training produced a NaN/inf loss or gradient (and the config says stop)."""


class TrainingStopped(RuntimeError):
    """SIGINT/SIGTERM ended meta-training after a step; ``last.pt`` holds that step."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# Automatic validation (train.val_interval = 0): timed on a few episodes, then at most this many
# validations over the run, never fewer episodes than MIN_VAL_EPISODES (fewer cannot rank checkpoints:
# the 95 % CI of 20 five-way episodes is already several points wide).
PROBE_EPISODES, MAX_VALIDATIONS, MIN_VAL_EPISODES = 2, 10, 20


@dataclass
class ValidationPlan:
    interval: int  # validate every `interval` iterations (and at the end)
    episodes: int  # on the first `episodes` of the fixed validation episodes
    auto: bool


@dataclass
class TrainState:
    """Where a run is (checkpointed with the weights, optimizer and RNG states)."""

    step: int = 0
    best: float = -1.0  # best meta-validation accuracy so far
    best_step: int = -1  # the step best.pt holds (0: the start, before any meta-update)
    start_accuracy: float | None = None  # the start's accuracy on the first validation's episodes
    elapsed: float = 0.0  # seconds of meta-training; validation time is not counted
    plan: ValidationPlan | None = None  # None until planned (train.val_interval = 0)


@dataclass
class _Session:
    """The objects one call of ``meta_train`` works with, beyond the experiment and its state."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    run_dir: Path | None  # None on ranks other than 0: they neither log nor write
    log: MetricsLog | None
    bar: tqdm
    rank: distributed.Rank
    stop: dict  # stop_requests()'s record of a signal
    stop_at: int | None
    progress: Callable[[int], float]  # how far the run is after that many iterations, 0 to 1
    val_seconds: float = 0.0  # time spent validating in this call (not meta-training time)
    start: dict | None = None  # the checkpoint of the weights before any meta-update (a call begun at step 0)


def plan_validation(exp: Experiment, step_seconds: float) -> tuple[ValidationPlan, float]:
    """The automatic plan for ``exp``, from the last step's time and a validation episode's time
    (measured here on ``PROBE_EPISODES``). Returns the plan and the seconds the measurement took."""
    cfg = exp.cfg.train
    start = time.perf_counter()
    meta_test(exp.algorithm, exp.val_episodes[:PROBE_EPISODES], device=cfg.device)
    probe = time.perf_counter() - start
    per_episode = probe / min(PROBE_EPISODES, len(exp.val_episodes))
    iterations = cfg.iterations
    if cfg.budget_minutes:
        iterations = min(iterations, math.ceil(60 * cfg.budget_minutes / max(step_seconds, 1e-9)))
    return choose_validation(iterations, step_seconds, per_episode, len(exp.val_episodes), cfg.val_fraction), probe


def choose_validation(
    iterations: int, step_seconds: float, episode_seconds: float, episodes: int, fraction: float
) -> ValidationPlan:
    """Validation within ``fraction`` of the run's meta-training time: up to ``MAX_VALIDATIONS`` on all
    ``episodes`` if they fit, else one, at the end, on fewer episodes (never below ``MIN_VAL_EPISODES``)."""
    allowed = fraction * iterations * step_seconds  # seconds of validation in the whole run
    count = min(MAX_VALIDATIONS, int(allowed // (episodes * episode_seconds)))
    if count < 1:
        count, episodes = 1, min(episodes, max(MIN_VAL_EPISODES, int(allowed // episode_seconds)))
    return ValidationPlan(max(1, math.ceil(iterations / count)), episodes, auto=True)


_stop_record: dict | None = None  # the active stop_requests() block's record (blocks nest: the outer one counts)


@contextmanager
def stop_requests() -> Iterator[dict]:
    """While active, SIGINT and SIGTERM only record themselves (``requests["signum"]``) so the loop can
    finish its step and write ``last.pt``; a second signal acts as usual (e.g. Ctrl-C twice kills).
    A nested block shares the outer block's record. Outside the main thread signals cannot be caught,
    and nothing changes."""
    global _stop_record
    if _stop_record is not None:
        yield _stop_record
        return
    requests: dict = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def record(signum, frame):
        requests["signum"] = signum
        for s, handler in previous.items():
            signal.signal(s, handler)

    for s in previous:
        signal.signal(s, record)
    _stop_record = requests
    try:
        yield requests
    finally:
        _stop_record = None
        for s, handler in previous.items():
            signal.signal(s, handler)


def _finite(metrics: dict, params: list[torch.Tensor]) -> bool:
    if not math.isfinite(metrics["loss"]):
        return False
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def meta_train(
    exp: Experiment,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    quiet: bool = False,
    stop_at: int | None = None,
) -> dict:
    """Meta-train ``exp`` for ``train.iterations`` (or until ``train.budget_minutes``), writing
    metrics, TensorBoard events and ``last.pt`` / ``best.pt`` (by meta-validation accuracy) into
    ``run_dir``. ``resume`` continues from ``run_dir/last.pt`` and reproduces the uninterrupted run
    exactly. ``stop_at`` ends after that iteration (as an interruption would; used by tests).

    Validation runs every ``train.val_interval`` iterations on every validation episode, or, with
    ``val_interval = 0`` (the default), as ``plan_validation`` decides after the second iteration.
    SIGINT/SIGTERM end the run after the current step, write ``last.pt`` and raise ``TrainingStopped``.

    Under torchrun the meta-batch is split across ranks (see ``distributed``); only rank 0 writes."""
    cfg, algo = exp.cfg.train, exp.algorithm
    rank = distributed.current()
    if cfg.meta_batch < rank.world:
        raise InputError(
            f"train.meta_batch={cfg.meta_batch} is smaller than the {rank.world} ranks: "
            f"every rank needs at least one task"
        )
    params = list(algo.parameters())
    if not params:  # nothing to meta-learn (centroid): validate once and checkpoint, so every stage works
        return _without_meta_parameters(exp, run_dir if rank.main else None)
    opt = OPTIMIZERS.build(cfg.optimizer, params, cfg.meta_lr)
    state = TrainState(
        plan=ValidationPlan(cfg.val_interval, len(exp.val_episodes), auto=False) if cfg.val_interval else None
    )
    # The schedule reads how far the run is (Reptile's epsilon falls linearly to 0). With a
    # time budget the run's end is whichever comes first, iterations or minutes, so the schedule
    # follows the further along of the two: a budget-cut run still anneals to 0 (as the papers' did).
    total, budget_s = cfg.iterations, 60 * cfg.budget_minutes if cfg.budget_minutes else None

    def progress(step: int) -> float:
        return max(step / total, state.elapsed / budget_s if budget_s else 0.0)

    factor = SCHEDULES.get(cfg.schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor(progress(s)))
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        load_trained(algo, ckpt)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        exp.train_sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        state.step, state.best, state.elapsed = ckpt["step"], ckpt["best_val_accuracy"], ckpt["elapsed"]
        state.best_step = ckpt.get("best_step", -1)
        state.start_accuracy = ckpt.get("start_accuracy")
        if ckpt.get("validation"):  # the interrupted run's plan, so the resumed run validates where it would have
            state.plan = ValidationPlan(**ckpt["validation"])
    distributed.broadcast_parameters(params)
    if not rank.main:
        run_dir = None  # rank 0 alone logs, validates and writes checkpoints
    log = MetricsLog(run_dir, resume_step=state.step) if run_dir else None
    bar = tqdm(
        total=total,
        initial=state.step,
        desc=f"meta-train {exp.cfg.algo.name}",
        disable=True if quiet or not rank.main else None,
        dynamic_ncols=True,
    )
    with PeakMemory() as memory, stop_requests() as stop:
        try:
            _loop(exp, state, _Session(opt, sched, params, run_dir, log, bar, rank, stop, stop_at, progress))
        finally:
            bar.close()
            if log:
                log.close()
    return {
        "iterations": state.step,
        "seconds": state.elapsed,
        "tasks_per_s": state.step * cfg.meta_batch / max(state.elapsed, 1e-9),
        "best_val_accuracy": state.best,
        "best_step": state.best_step,
        "start_val_accuracy": state.start_accuracy,
        "peak_memory_mb": memory.peak_mb,
        "validation": asdict(state.plan) if state.plan else None,
    }


def _loop(exp: Experiment, state: TrainState, session: _Session) -> None:
    """The loop itself; ``state`` is updated in place. ``elapsed`` counts meta-training only: validation time
    is excluded from the budget and from tasks/s."""
    cfg, bar = exp.cfg.train, session.bar
    start, elapsed_before, val_acc, session.val_seconds = time.perf_counter(), state.elapsed, float("nan"), 0.0

    def clock() -> float:
        return elapsed_before + time.perf_counter() - start - session.val_seconds

    if state.step == 0 and session.rank.main:
        _save_start(exp, state, session)

    while state.step < cfg.iterations:
        step_started = clock()
        metrics, out_of_time, state.elapsed = _meta_step(exp, state, session, clock)
        step = state.step
        record = {
            "step": step,
            "lr": session.optimizer.param_groups[0]["lr"],
            "elapsed_s": round(state.elapsed, 3),
            "tasks_per_s": step * cfg.meta_batch / max(state.elapsed, 1e-9),
            **metrics,
        }
        session.scheduler.step()
        if session.rank.main and state.plan is None and step >= min(2, cfg.iterations):  # the 2nd step is warm
            _plan_validation(exp, state, session, state.elapsed - step_started)
        plan = state.plan
        validate = session.rank.main and (
            (plan is not None and step % plan.interval == 0)
            or step == cfg.iterations
            or out_of_time
            or step == session.stop_at
        )
        if validate:
            record["val_accuracy"] = val_acc = _validate(exp, state, session)
        if session.log and (validate or step % cfg.log_interval == 0):
            session.log.write(record)
        if validate and session.run_dir:
            save_checkpoint(session.run_dir / "last.pt", _payload(exp, state, session.optimizer, session.scheduler))
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", val=f"{val_acc:.3f}")
        if out_of_time or step == session.stop_at:
            break
        _stop_if_requested(exp, state, session, saved=validate)


def _meta_step(exp: Experiment, state: TrainState, session: _Session, clock: Callable[[], float]) -> tuple:
    """One meta-update: every rank draws the whole meta-batch (identical samplers) and adapts its own share;
    the gradients are averaged over ranks and applied unless non-finite. Returns the metrics, whether the
    time budget is spent and rank 0's clock (which every rank takes, so the schedules agree)."""
    cfg, algo, opt, params = exp.cfg.train, exp.algorithm, session.optimizer, session.params
    tasks = [exp.train_sampler.sample() for _ in range(cfg.meta_batch)]
    mine = [t.to(cfg.device) for t in session.rank.shard(tasks)]
    opt.zero_grad(set_to_none=True)
    algo.set_progress(session.progress(state.step))
    metrics = algo.meta_backward(mine) | algo.auxiliary_backward(mine)
    now = clock()
    out_of_time = session.rank.main and cfg.budget_minutes is not None and now >= 60 * cfg.budget_minutes
    metrics, out_of_time, now = distributed.all_reduce_meta_batch(
        params, len(mine), len(tasks), metrics, out_of_time, now
    )
    state.step += 1
    if _finite(metrics, params):
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
    elif cfg.on_nan == "stop":
        last = session.run_dir / "last.pt" if session.run_dir else None
        raise NonFiniteLossError(
            f"non-finite meta-loss or gradient at iteration {state.step} (loss={metrics['loss']}); last good "
            f"checkpoint: {last if last and last.exists() else 'none written yet'}. "
            f"Lower the learning rates, add train.clip, or set train.on_nan=skip."
        )
    else:
        tqdm.write(f"iteration {state.step}: non-finite meta-loss/gradient, step skipped (train.on_nan=skip)")
    return metrics, out_of_time, now


def _plan_validation(exp: Experiment, state: TrainState, session: _Session, step_seconds: float) -> None:
    state.plan, probe_seconds = plan_validation(exp, step_seconds)
    session.val_seconds += probe_seconds
    if not session.bar.disable:
        session.bar.write(
            f"validation: every {state.plan.interval} iterations on {state.plan.episodes} "
            f"episodes (~{exp.cfg.train.val_fraction:.0%} of the run; set train.val_interval to choose)"
        )


def _save_start(exp: Experiment, state: TrainState, session: _Session) -> None:
    """``start.pt``: the weights before any meta-update (a candidate for ``best.pt``, validated with the first
    validation, and where selection interpolates from)."""
    session.start = _payload(exp, state)
    session.start["module"] = {k: v.clone() for k, v in session.start["module"].items()}
    if session.run_dir:
        save_checkpoint(session.run_dir / "start.pt", session.start)


def _validate(exp: Experiment, state: TrainState, session: _Session) -> float:
    """Meta-validate (on the plan's episodes), keeping ``best.pt`` when it is the best so far. The first
    validation also scores the start on the same episodes: it is a candidate like every later state, so a
    run that meta-training only made worse hands back where it started."""
    episodes = exp.val_episodes[: state.plan.episodes if state.plan else None]
    device = exp.cfg.train.device
    if state.best_step < 0 and session.start is not None:
        with loaded(exp.algorithm.module, session.start["module"]):
            start = meta_test(exp.algorithm, episodes, device=device)
        session.val_seconds += start.seconds
        state.start_accuracy, state.best, state.best_step = start.accuracy_mean, start.accuracy_mean, 0
        if session.run_dir:
            kept = {"best_val_accuracy": state.best, "best_step": 0, "start_accuracy": state.start_accuracy}
            save_checkpoint(session.run_dir / "best.pt", {**session.start, **kept})
    val = meta_test(exp.algorithm, episodes, device=device)
    session.val_seconds += val.seconds
    if val.accuracy_mean > state.best:
        state.best, state.best_step = val.accuracy_mean, state.step
        if session.run_dir:
            save_checkpoint(session.run_dir / "best.pt", _payload(exp, state, session.optimizer, session.scheduler))
    return val.accuracy_mean


def _stop_if_requested(exp: Experiment, state: TrainState, session: _Session, saved: bool) -> None:
    """After a SIGINT/SIGTERM: write ``last.pt`` (unless this step ``saved`` it) and raise ``TrainingStopped``."""
    if session.stop["signum"] is None:
        return
    name, run_dir = signal.Signals(session.stop["signum"]).name, session.run_dir
    if not run_dir:
        raise TrainingStopped(f"stopped by {name} after iteration {state.step}", session.stop["signum"])
    if not saved:
        save_checkpoint(run_dir / "last.pt", _payload(exp, state, session.optimizer, session.scheduler))
    raise TrainingStopped(
        f"stopped by {name} after iteration {state.step}; {run_dir / 'last.pt'} holds it. Continue "
        f"with: metafusion meta-train --resume {run_dir}",
        session.stop["signum"],
    )


def _without_meta_parameters(exp: Experiment, run_dir: Path | None) -> dict:
    val = meta_test(exp.algorithm, exp.val_episodes, device=exp.cfg.train.device)
    state = TrainState(best=val.accuracy_mean)
    if run_dir:
        log = MetricsLog(run_dir)
        log.write({"step": 0, "loss": val.loss, "val_accuracy": val.accuracy_mean})
        log.close()
        for name in ("best.pt", "last.pt"):
            save_checkpoint(run_dir / name, _payload(exp, state))
    return {
        "iterations": 0,
        "seconds": 0.0,
        "tasks_per_s": 0.0,
        "best_val_accuracy": val.accuracy_mean,
        "peak_memory_mb": peak_memory_mb(),
    }


def _payload(exp: Experiment, state: TrainState, opt=None, sched=None) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "module": exp.algorithm.module.state_dict(),
        "algorithm": exp.algorithm.state_dict(),
        "optimizer": opt.state_dict() if opt else {},
        "scheduler": sched.state_dict() if sched else {},
        "sampler": exp.train_sampler.state_dict(),
        "rng": rng_state(),
        "step": state.step,
        "best_val_accuracy": state.best,
        "best_step": state.best_step,
        "start_accuracy": state.start_accuracy,
        "elapsed": state.elapsed,
        "config": to_dict(exp.cfg),
        "model_args": model_args(exp),
        "validation": asdict(state.plan) if state.plan else None,
        "versions": library_versions(),
    }
