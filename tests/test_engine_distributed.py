"""Data-parallel meta-training (torch.distributed, gloo): 2 ranks give the meta-gradient of 1 process on
the same tasks, and `torchrun -m metafusion meta-train` trains the same model as a single process."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from test_cli import TINY, run_cli

from metafusion.config import from_dict
from metafusion.engine import build_experiment, distributed
from metafusion.engine.checkpoint import load_checkpoint

CFG = {
    "data": {"num_classes": 30, "samples_per_class": 10, "queries": 2, "val_episodes": 2, "test_episodes": 2},
    "model": {"width": 8, "hidden": 8},
    "train": {"meta_batch": 5},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meta_gradient(algo: str, rank: distributed.Rank) -> list[torch.Tensor]:
    """This rank's view of the meta-gradient of one meta-batch (float64), after the all-reduce."""
    torch.set_default_dtype(torch.float64)
    own = {"inner_optimizer": "sgd"} if algo == "reptile" else {}  # Reptile: SGD, so ranks keep no Adam state
    exp = build_experiment(from_dict({**CFG, "algo": {"name": algo, **own}}))
    # the synthetic data is float32; make the whole computation float64
    tasks = [exp.train_sampler.sample().to("cpu", torch.float64) for _ in range(exp.cfg.train.meta_batch)]
    params = list(exp.algorithm.parameters())
    mine = rank.shard(tasks)
    metrics = exp.algorithm.meta_backward(mine)
    distributed.all_reduce_meta_batch(params, len(mine), len(tasks), metrics, False, 0.0)
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]  # None: unused here


ALGOS = ["maml", "fomaml", "reptile", "protonet"]


def _worker(rank: int, world: int, port: int, path: str) -> None:
    """Everything the two-rank tests check, in one job (starting ranks is the slow part): each algorithm's
    all-reduced meta-gradient, then an all-reduce where the ranks' clocks and stop requests differ."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    r = distributed.init("cpu")
    out = {algo: _meta_gradient(algo, r) for algo in ALGOS}
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.full((3,), float(rank))
    # Rank 1's own clock runs ahead (it also counts rank 0's validations); rank 0 asks to stop.
    got = distributed.all_reduce_meta_batch([param], 1, 2, {"loss": 1.0 + rank}, r.main, 1199.25 + 100 * rank)
    out["clock"] = (got[0]["loss"], got[1], got[2], param.grad.tolist())
    torch.save(out, f"{path}.{rank}")
    distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """What each of two ranks computed (``_worker``), by rank."""
    path = str(tmp_path_factory.mktemp("ranks") / "rank")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    return [torch.load(f"{path}.{rank}") for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGOS)
def test_two_ranks_give_the_one_process_meta_gradient(algo, two_ranks):
    # 5 tasks over 2 ranks (3 + 2): unequal shares must still give the mean over all 5 tasks.
    default = torch.get_default_dtype()
    try:
        single = _meta_gradient(algo, distributed.Rank())
    finally:
        torch.set_default_dtype(default)
    split = two_ranks[0][algo]
    assert len(split) == len(single)
    for a, b in zip(split, single):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()


def test_every_rank_takes_rank_0s_clock_and_stop_request(two_ranks):
    """So a linear meta-lr (Reptile's epsilon) or a first-order warm-up changes at the same iteration on
    every rank, and the ranks' weights never drift apart."""
    for rank in (0, 1):
        loss, stop, clock, grad = two_ranks[rank]["clock"]
        assert (loss, stop, grad) == (1.5, True, [0.5, 0.5, 0.5])
        assert abs(clock - 1199.25) < 1e-3


@pytest.mark.slow
def test_torchrun_meta_train_matches_one_process(tmp_path):
    """The real launcher end to end: same weights after 4 iterations as one process (fp32, so up to
    summation order), one run folder written by rank 0, and the job reports its ranks."""
    # The CLI tests' tiny run; later flags override earlier ones.
    common = ["meta-train", *TINY, "--meta-batch", "4", "--iterations", "4", "--set", "train.val_interval=2"]
    assert run_cli(*common, "--out", tmp_path / "one") == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "metafusion",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "over 2 ranks" in done.stdout
    assert json.loads((tmp_path / "two" / "train.json").read_text())["ranks"] == 2
    from metafusion.engine.stages import load_run_config

    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    assert len(losses[0]) == len(losses[1]) >= 2 and all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(*losses))
    # Same function after training. (Not the same bias of each conv: BatchNorm cancels those biases, so
    # their gradients are float noise that Adam scales up, differently for two summation orders.)
    exp = build_experiment(load_run_config(tmp_path / "one"))
    logits = []
    for run in ("one", "two"):
        state = load_checkpoint(tmp_path / run / "last.pt")
        assert state["step"] == 4
        exp.algorithm.module.load_state_dict(state["module"])
        with torch.no_grad():
            logits.append(exp.model(exp.val_episodes[0].query))
    assert torch.allclose(logits[0], logits[1], rtol=1e-3, atol=1e-4)


def test_torchrun_refuses_commands_that_are_not_data_parallel(monkeypatch, capsys):
    from metafusion.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["meta-test", "--run", "nowhere"]) == 2
    assert "only meta-train runs data-parallel" in capsys.readouterr().err


def test_a_meta_batch_smaller_than_the_job_is_refused(small_synthetic, monkeypatch):
    from metafusion.engine import meta_train

    exp = build_experiment(from_dict({**CFG, "train": {"meta_batch": 1, "iterations": 1}}), dataset=small_synthetic)
    monkeypatch.setattr(distributed, "current", lambda: distributed.Rank(0, 2))
    with pytest.raises(ValueError, match="smaller than the 2 ranks"):
        meta_train(exp, quiet=True)
