"""Meta-training throughput: metafusion's engine vs loops written the way learn2learn's examples write
them, side by side in one process, on the same tasks and the same model.

    python benchmarks/throughput.py                    # CPU, 2 threads, every variant (~6 min here)
    python benchmarks/throughput.py --quick            # fewer rounds, no memory children (~2 min)
    python benchmarks/throughput.py --device cuda      # on a GPU (no torch.distributed row)

For each variant it first checks, in float64, that metafusion's meta-gradient equals the reference
loop's (relative error <= 1e-5; a speedup with different gradients does not count), then times both
loops in alternating rounds (median tasks/s), counts FLOPs per task (torch's FlopCounterMode), and
compares achieved GFLOP/s with a large matmul timed in the same run. Peak memory comes from a fresh
child process per loop (RSS never shrinks, so one process cannot measure two loops). The episode
sampler and dataset loading are timed on Omniglot when ``$METAFUSION_DATA`` holds it.

The "metafusion, N ranks" rows run the engine's data-parallel meta-train step (torch.distributed,
gloo, one thread per rank: what ``torchrun --nproc_per_node N -m metafusion meta-train`` runs) on the
same tasks; ratios are always against the reference loop with all threads in one process.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from metafusion import _learn2learn as l2l
from metafusion.algorithms.protonet import proto_logits, prototypes
from metafusion.config import from_dict
from metafusion.engine import build_experiment, distributed
from metafusion.engine.checkpoint import hardware
from metafusion.engine.memory import peak_rss_mb

# name -> (algorithm, inner steps, what the reference loop is)
VARIANTS = {
    "maml-1": ("maml", 1, "l2l MAML second-order: clone / adapt / backward per task"),
    "maml-5": ("maml", 5, "l2l MAML second-order, 5 inner steps"),
    "fomaml-5": ("fomaml", 5, "l2l MAML first_order=True, 5 inner steps"),
    "reptile-5": ("reptile", 5, "deepcopy + inner Adam per task (l2l example), 5 steps"),
    "protonet": ("protonet", 0, "embed support+query, class means, distances"),
    "meta-test": ("maml", 10, "clone + 10 SGD steps without graph, predict query"),
    "meta-test-reptile": ("reptile", 50, "deepcopy + fresh inner Adam per episode, 50 steps, predict query"),
}
EVALUATION = ("meta-test", "meta-test-reptile")  # timed as episodes evaluated per second
MODELS = ("conv4", "multimodal")


# ---------------------------------------------------------------------------------------------------
# Setup: the same model and tasks for both loops
# ---------------------------------------------------------------------------------------------------
def experiment(
    model: str, variant: str, device: str, meta_batch: int, inner_optimizer: str = "adam", task_batched: bool = False
):
    algo, steps, _ = VARIANTS[variant]
    data = {
        "dataset": "synthetic",
        "num_classes": 60,
        "samples_per_class": 20,
        "ways": 5,
        "shots": 1,
        "queries": 15,
        "val_episodes": 1,
        "test_episodes": 1,
    }
    if model == "conv4":  # Omniglot-size tasks: 1x28x28 images, Conv4 (64 channels) + linear head
        data["modalities"] = ["image"]
    cfg = from_dict(
        {
            "data": data,
            "model": {"width": 64, "hidden": 64},
            "algo": {
                "name": algo,
                **({"inner_steps": steps, "inner_steps_test": steps} if steps else {}),
                **({"inner_lr": 0.4} if algo in ("maml", "fomaml") else {}),
                **({"inner_optimizer": inner_optimizer} if algo == "reptile" else {}),
                **(
                    {"task_batched": True}
                    if task_batched and variant not in EVALUATION and algo in ("maml", "fomaml")
                    else {}
                ),
            },
            "train": {"meta_batch": meta_batch, "device": device},
        }
    )
    return build_experiment(cfg)


def sample_tasks(exp, count: int, device: str, dtype: torch.dtype):
    return [exp.train_sampler.sample().to(device, dtype) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------
# Reference loops, written the way learn2learn's examples write them
# ---------------------------------------------------------------------------------------------------
def reference_network(model: torch.nn.Module) -> torch.nn.Module:
    """The same parameters in the network users write with learn2learn (its ``ConvBlock``): NCHW memory
    order and conv, BatchNorm, ReLU, max-pool. metafusion's encoders compute the same function in
    channels_last order with the ReLU after the pool (exact); the reference must not inherit those
    levers, or both columns would speed up together."""
    net = copy.deepcopy(model)
    for module in net.modules():
        if hasattr(module, "memory_format"):
            module.memory_format = torch.contiguous_format
        if isinstance(module, torch.nn.Sequential):
            layers = list(module)
            for i in range(len(layers) - 1):
                if isinstance(layers[i], (torch.nn.MaxPool1d, torch.nn.MaxPool2d)) and isinstance(
                    layers[i + 1], torch.nn.ReLU
                ):
                    module[i], module[i + 1] = layers[i + 1], layers[i]
    return net


class Reference:
    def __init__(self, exp, variant: str):
        self.variant = variant
        algo, self.steps, _ = VARIANTS[variant]
        a = exp.cfg.algo
        self.lr, self.lr_test = a.inner_lr, a.inner_lr_test
        self.model = reference_network(exp.model)
        if algo in ("maml", "fomaml"):
            self.maml = l2l.MAML(self.model, lr=self.lr, first_order=(algo == "fomaml"), allow_unused=True)
        self.inner_optimizer = a.options.get("inner_optimizer")

    def parameters(self):
        return list(self.model.parameters())

    def meta_backward(self, tasks):
        if self.variant == "reptile-5":
            return self._reptile(tasks)
        if self.variant == "protonet":
            return self._protonet(tasks)
        for task in tasks:
            learner = self.maml.clone()
            for _ in range(self.steps):
                learner.adapt(F.cross_entropy(learner(task.support), task.support.labels))
            F.cross_entropy(learner(task.query), task.query.labels).backward()
        for p in self.maml.parameters():
            if p.grad is not None:
                p.grad.data.mul_(1.0 / len(tasks))

    def _reptile(self, tasks):
        deltas = [torch.zeros_like(p) for p in self.model.parameters()]
        for task in tasks:
            learner = copy.deepcopy(self.model)
            opt = (
                torch.optim.Adam(learner.parameters(), lr=self.lr, betas=(0.0, 0.999))
                if self.inner_optimizer == "adam"
                else torch.optim.SGD(learner.parameters(), lr=self.lr)
            )
            for _ in range(self.steps):
                opt.zero_grad()
                F.cross_entropy(learner(task.support), task.support.labels).backward()
                opt.step()
            with torch.no_grad():
                for d, fast, slow in zip(deltas, learner.parameters(), self.model.parameters()):
                    d += fast - slow
        for p, d in zip(self.model.parameters(), deltas):
            p.grad = -d / len(tasks)

    def _protonet(self, tasks):
        for task in tasks:
            s, q = self.model.features(task.support), self.model.features(task.query)
            protos = prototypes(s, task.support.labels, task.ways)
            (F.cross_entropy(proto_logits(q, protos), task.query.labels) / len(tasks)).backward()

    def evaluate(self, episode):
        if self.variant == "meta-test-reptile":
            return self._reptile_evaluate(episode)
        learner = self.maml.clone()
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = F.cross_entropy(learner(episode.support), episode.support.labels)
                grads = torch.autograd.grad(loss, learner.parameters(), allow_unused=True)
                l2l.maml_update(learner, self.lr_test, [None if g is None else g.detach() for g in grads])
        with torch.no_grad():
            return learner(episode.query)

    def _reptile_evaluate(self, episode):
        learner = copy.deepcopy(self.model)
        opt = (
            torch.optim.Adam(learner.parameters(), lr=self.lr_test, betas=(0.0, 0.999))
            if self.inner_optimizer == "adam"
            else torch.optim.SGD(learner.parameters(), lr=self.lr_test)
        )
        with torch.enable_grad():
            for _ in range(self.steps):
                opt.zero_grad()
                F.cross_entropy(learner(episode.support), episode.support.labels).backward()
                opt.step()
        with torch.no_grad():
            return learner(episode.query)

    def evaluate_all(self, episodes):
        return [self.evaluate(e) for e in episodes]


class Ours:
    def __init__(self, exp, variant: str):
        self.variant, self.algo = variant, exp.algorithm

    def parameters(self):
        return list(self.algo.parameters())

    def meta_backward(self, tasks):
        self.algo.meta_backward(tasks)

    def evaluate(self, episode):
        learner = self.algo.adapt(episode.support)
        return self.algo.predict(learner, episode)

    def evaluate_all(self, episodes):  # what meta_test runs: batched where algo.batched_eval=auto says so
        return self.algo.evaluate_many(episodes)


# ---------------------------------------------------------------------------------------------------
# Gradient check (float64)
# ---------------------------------------------------------------------------------------------------
def gradient_check(model: str, variant: str, device: str, meta_batch: int, task_batched: bool = False) -> float:
    """||g_ours - g_ref|| / ||g_ref|| over all meta-parameters (one meta-batch, float64; per tensor it
    would divide float noise by float noise for the conv biases that BatchNorm cancels). For
    meta-test the compared quantity is the query logits. Reptile is checked with an SGD inner optimizer:
    metafusion keeps the inner Adam's moments across tasks as the paper's code does, the learn2learn
    example rebuilds Adam per task, so only a stateless inner optimizer can give equal updates."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        exp = experiment(model, variant, device, meta_batch, inner_optimizer="sgd", task_batched=task_batched)
        ref, ours = Reference(exp, variant), Ours(exp, variant)
        tasks = sample_tasks(exp, meta_batch, device, torch.float64)
        if variant in EVALUATION:
            a, b = ours.evaluate(tasks[0]), ref.evaluate(tasks[0])
            return float((a - b).norm() / b.norm())
        ours.meta_backward(tasks)
        ref.meta_backward(tasks)
        a = torch.cat([p.grad.flatten() for p in ours.parameters() if p.grad is not None])
        b = torch.cat([q.grad.flatten() for q in ref.parameters() if q.grad is not None])
        return float((a - b).norm() / b.norm())
    finally:
        torch.set_default_dtype(default)


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_iteration(loop, opt, batch, variant: str) -> None:
    if variant in EVALUATION:
        loop.evaluate_all(batch)
        return
    opt.zero_grad(set_to_none=True)
    loop.meta_backward(batch)
    opt.step()


def time_loops(loops: dict, batches, variant: str, device: str, rounds: int) -> dict[str, float]:
    """Median tasks/s per loop; the loops alternate within each round so drift hits both alike."""
    opts = {k: torch.optim.Adam(loop.parameters(), lr=1e-3) for k, loop in loops.items()}
    for k, loop in loops.items():  # warm-up (allocator, oneDNN primitive caches)
        one_iteration(loop, opts[k], batches[0], variant)
    rates = {k: [] for k in loops}
    order = list(loops)
    for r in range(rounds):
        for k in order if r % 2 == 0 else order[::-1]:
            sync(device)
            t = time.perf_counter()
            for batch in batches:
                one_iteration(loops[k], opts[k], batch, variant)
            sync(device)
            rates[k].append(sum(len(b) for b in batches) / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in rates.items()}


def flops_per_task(loop, batch, variant: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    opt = torch.optim.SGD(loop.parameters(), lr=0.0)
    with FlopCounterMode(display=False) as counter:
        one_iteration(loop, opt, batch, variant)
    return counter.get_total_flops() / len(batch)


def matmul_gflops(device: str, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def _rank_worker(
    rank: int,
    world: int,
    port: int,
    model: str,
    variant: str,
    meta_batch: int,
    iters: int,
    rounds: int,
    result_path: str,
) -> None:
    """One rank of the data-parallel meta-train step (what meta_train does per iteration)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1"
    )
    rank_info = distributed.init("cpu")
    exp = experiment(model, variant, "cpu", meta_batch)
    torch.set_num_threads(1)
    params = list(exp.algorithm.parameters())
    distributed.broadcast_parameters(params)
    opt = torch.optim.Adam(params, lr=1e-3)
    batches = [sample_tasks(exp, meta_batch, "cpu", torch.float32) for _ in range(iters)]

    def step(batch):
        mine = rank_info.shard(batch)
        opt.zero_grad(set_to_none=True)
        metrics = exp.algorithm.meta_backward(mine)
        distributed.all_reduce_meta_batch(params, len(mine), len(batch), metrics, False, 0.0)
        opt.step()

    step(batches[0])
    rates = []
    for _ in range(rounds):
        distributed.barrier()
        t = time.perf_counter()
        for batch in batches:
            step(batch)
        distributed.barrier()
        rates.append(iters * meta_batch / (time.perf_counter() - t))
    if rank_info.main:
        Path(result_path).write_text(
            json.dumps({"tasks_per_s": statistics.median(rates), "peak_rss_mb": peak_rss_mb()})
        )
    distributed.shutdown()


def time_distributed(model: str, variant: str, meta_batch: int, iters: int, rounds: int, world: int) -> dict:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank0.json")
        mp.spawn(
            _rank_worker, args=(world, port, model, variant, meta_batch, iters, rounds, path), nprocs=world, join=True
        )
        return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------------
# Peak memory, one child process per loop
# ---------------------------------------------------------------------------------------------------
def child_memory(model: str, variant: str, which: str, device: str, meta_batch: int) -> dict:
    exp = experiment(model, variant, device, meta_batch)
    loop = (Ours if which == "ours" else Reference)(exp, variant)
    opt = torch.optim.Adam(loop.parameters(), lr=1e-3)
    batches = [sample_tasks(exp, meta_batch, device, torch.float32) for _ in range(3)]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_mb()
    for b in batches:
        one_iteration(loop, opt, b, variant)
    out = {"peak_rss_mb": peak_rss_mb(), "setup_rss_mb": before}
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure_memory(model: str, variant: str, which: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        model,
        variant,
        which,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--meta-batch",
        str(args.meta_batch),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# Sampler and data loading
# ---------------------------------------------------------------------------------------------------
def time_sampler(n: int = 300) -> dict:
    from metafusion.config import default_data_root
    from metafusion.data import EpisodeSampler
    from metafusion.engine.build import load_dataset

    root = default_data_root()
    omniglot = root is not None and (Path(root) / "omniglot").is_dir()
    data = (
        {"dataset": "omniglot", "root": root, "rotations": True}
        if omniglot
        else {"dataset": "synthetic", "modalities": ["image"]}
    )
    cfg = from_dict({"data": data})
    t = time.perf_counter()
    dataset = load_dataset(cfg).dataset
    load_s = time.perf_counter() - t
    sampler = EpisodeSampler(dataset, "train", 5, 1, 15, seed=0)
    sampler.sample()
    t = time.perf_counter()
    for _ in range(n):
        sampler.sample()
    return {
        "dataset": data["dataset"],
        "load_s": load_s,
        "ms_per_episode": 1000 * (time.perf_counter() - t) / n,
        "samples": len(dataset),
    }


# ---------------------------------------------------------------------------------------------------
# Same final accuracy: the reference loop vs the engine (torchrun, N ranks), same seed and iterations
# ---------------------------------------------------------------------------------------------------
ACCURACY_ARGS = [
    "--set",
    "data.modalities=image",
    "--set",
    "data.num_classes=300",
    "--algo",
    "maml",
    "--meta-batch",
    "8",
    "--episodes",
    "600",
    "--set",
    "model.width=64",
    "--set",
    "model.hidden=64",
]


def accuracy_check(iterations: int, ranks: int, out: Path) -> dict:
    """Meta-train MAML (second order, 1 step) on Conv4 synthetic-image tasks for ``iterations`` with
    the reference loop (one process) and with ``torchrun -m metafusion meta-train`` (``ranks``
    processes), from the same seed on the same task stream; test both on the same 600 episodes."""
    from metafusion.cli import build_parser, config_from_args
    from metafusion.engine import meta_test

    args, extra = build_parser().parse_known_args(["meta-train", *ACCURACY_ARGS, "--iterations", str(iterations)])
    exp = build_experiment(config_from_args(args, extra))
    ref = Reference(exp, "maml-1")
    opt = torch.optim.Adam(ref.parameters(), lr=exp.cfg.train.meta_lr)
    t = time.perf_counter()
    for _ in range(iterations):
        tasks = [exp.train_sampler.sample() for _ in range(exp.cfg.train.meta_batch)]
        opt.zero_grad(set_to_none=True)
        ref.meta_backward(tasks)
        opt.step()
    ref_seconds = time.perf_counter() - t
    exp.model.load_state_dict(ref.model.state_dict())  # test the reference's weights with the same code
    reference = meta_test(exp.algorithm, exp.test_episodes())
    run = out / "accuracy_engine"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "-m",
        "metafusion",
        "meta-train",
        *ACCURACY_ARGS,
        "--iterations",
        str(iterations),
        "--set",
        f"train.val_interval={iterations}",
        "--out",
        str(run),
        "--overwrite",
        "--quiet",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "metafusion",
            "meta-test",
            "--run",
            str(run),
            "--checkpoint",
            str(run / "last.pt"),
            "--quiet",
        ],
        check=True,
        capture_output=True,
    )
    engine = json.loads((run / "results.json").read_text())
    train = json.loads((run / "train.json").read_text())
    return {
        "iterations": iterations,
        "ranks": ranks,
        "reference": {
            "accuracy": reference.accuracy_mean,
            "ci95": reference.accuracy_ci95,
            "seconds": ref_seconds,
            "fingerprint": reference.fingerprint,
        },
        "metafusion": {
            "accuracy": engine["accuracy_mean"],
            "ci95": engine["accuracy_ci95"],
            "seconds": train["seconds"],
            "fingerprint": engine["fingerprint"],
        },
    }


# ---------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of the one-process loops")
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=2, help="meta-batches per timed round")
    p.add_argument("--rounds", type=int, help="timed rounds (default 5, or 3 with --quick)")
    p.add_argument("--ranks", type=int, default=2, help="processes of the torch.distributed rows (CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--quick", action="store_true", help="3 rounds unless told, no memory children")
    p.add_argument(
        "--task-batched",
        action="store_true",
        help="metafusion's MAML/FOMAML rows use algo.task_batched (one vmapped network per meta-batch)",
    )
    p.add_argument("--out", default="runs/throughput", help="folder for results.json and results.md")
    p.add_argument(
        "--accuracy-iters",
        type=int,
        default=0,
        help="also train MAML this many iterations with both loops and compare test accuracy (CPU)",
    )
    p.add_argument("--child", nargs=3, metavar=("MODEL", "VARIANT", "LOOP"), help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(*args.child, args.device, args.meta_batch)))
        return
    args.rounds = args.rounds or (3 if args.quick else 5)
    cpu = args.device == "cpu"
    hw = hardware(args.device)
    ceiling = matmul_gflops(args.device)
    print(
        f"device {args.device} ({hw}), torch {torch.__version__}, {args.threads} threads, "
        f"matmul 2048^3: {ceiling:.0f} GFLOP/s",
        flush=True,
    )
    rows = []
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            rows.append(measure(model, variant, args, ceiling))
            print(format_row(rows[-1], args.ranks), flush=True)
    sampler = time_sampler()
    maml = next((r for r in rows if r["variant"] == "maml-1"), None)
    if maml:
        step_ms = 1000 / max(maml["metafusion_tasks_per_s"], maml.get("distributed_tasks_per_s", 0.0))
        sampler["fraction_of_maml1_task"] = sampler["ms_per_episode"] / step_ms
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    accuracy = accuracy_check(args.accuracy_iters, args.ranks, out) if args.accuracy_iters and cpu else None
    meta = {
        "device": args.device,
        "hardware": hw,
        "torch": torch.__version__,
        "threads": args.threads,
        "ranks": args.ranks,
        "meta_batch": args.meta_batch,
        "matmul_gflops": ceiling,
        "task_batched": args.task_batched,
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    }
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "sampler": sampler, "accuracy": accuracy}, indent=2)
    )
    table = markdown(meta, rows, sampler, accuracy)
    (out / "results.md").write_text(table)
    print("\n" + table)


def measure(model: str, variant: str, args: argparse.Namespace, ceiling: float) -> dict:
    """One row: the two loops' gradients compared, their tasks/s, FLOPs, the torch.distributed row on a CPU
    and (unless ``--quick``) each loop's peak memory in a child process."""
    cpu = args.device == "cpu"
    err = gradient_check(model, variant, args.device, min(args.meta_batch, 4), args.task_batched)
    exp = experiment(model, variant, args.device, args.meta_batch, task_batched=args.task_batched)
    loops = {"reference": Reference(exp, variant), "metafusion": Ours(exp, variant)}
    batches = [sample_tasks(exp, args.meta_batch, args.device, torch.float32) for _ in range(args.iters)]
    rates = time_loops(loops, batches, variant, args.device, args.rounds)
    flops = flops_per_task(loops["metafusion"], batches[0], variant)
    row = {
        "model": model,
        "variant": variant,
        "reference_loop": VARIANTS[variant][2],
        "grad_rel_err_fp64": err,
        "gflop_per_task": flops / 1e9,
        "reference_tasks_per_s": rates["reference"],
        "metafusion_tasks_per_s": rates["metafusion"],
    }
    if cpu and args.ranks > 1 and variant not in EVALUATION:
        d = time_distributed(model, variant, args.meta_batch, args.iters, args.rounds, args.ranks)
        row["distributed_tasks_per_s"] = d["tasks_per_s"]
        row["distributed_peak_mb_per_rank"] = d["peak_rss_mb"]
    best = max(row.get("distributed_tasks_per_s", 0.0), row["metafusion_tasks_per_s"])
    row["speedup"] = best / row["reference_tasks_per_s"]
    row["gflops_achieved"] = best * flops / 1e9
    row["fraction_of_matmul"] = row["gflops_achieved"] / ceiling
    if not args.quick:
        for which in ("reference", "ours"):
            m = measure_memory(model, variant, which, args)
            row[f"{'metafusion' if which == 'ours' else which}_peak_mb"] = m.get("peak_cuda_mb", m["peak_rss_mb"])
    return row


def format_row(r: dict, ranks: int) -> str:
    dist_txt = f", {ranks} ranks {r['distributed_tasks_per_s']:.1f}" if "distributed_tasks_per_s" in r else ""
    return (
        f"{r['model']:>10} {r['variant']:>9}: grad err {r['grad_rel_err_fp64']:.1e}, reference "
        f"{r['reference_tasks_per_s']:.1f} tasks/s, metafusion {r['metafusion_tasks_per_s']:.1f}{dist_txt} "
        f"-> {r['speedup']:.2f}x, {r['gflop_per_task']:.2f} GFLOP/task"
    )


def markdown(meta: dict, rows: list[dict], sampler: dict, accuracy: dict | None = None) -> str:
    dist = any("distributed_tasks_per_s" in r for r in rows)
    mem = any("reference_peak_mb" in r for r in rows)
    batched = " task-batched" if meta.get("task_batched") else ""
    head = [
        "model",
        "variant",
        "grad rel. err (fp64)",
        "GFLOP/task",
        "reference tasks/s",
        f"metafusion{batched} tasks/s ({meta['threads']} threads)",
    ]
    head += [f"metafusion, {meta['ranks']} ranks x 1 thread"] if dist else []
    head += ["speedup", "GFLOP/s (share of matmul)"]
    head += ["peak RSS MB: reference / metafusion" + (" / per rank" if dist else "")] if mem else []
    lines = [
        f"Device: {meta['device']} ({meta['hardware']}), torch {meta['torch']}, meta-batch {meta['meta_batch']}, "
        f"5-way 1-shot, 15 queries/class, fp32; matmul ceiling {meta['matmul_gflops']:.0f} GFLOP/s. "
        f"Command: `{meta['command']}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            r["model"],
            r["variant"],
            f"{r['grad_rel_err_fp64']:.1e}",
            f"{r['gflop_per_task']:.2f}",
            f"{r['reference_tasks_per_s']:.1f}",
            f"{r['metafusion_tasks_per_s']:.1f}",
        ]
        if dist:
            cells.append(f"{r['distributed_tasks_per_s']:.1f}" if "distributed_tasks_per_s" in r else "—")
        cells += [f"{r['speedup']:.2f}x", f"{r['gflops_achieved']:.0f} ({100 * r['fraction_of_matmul']:.0f} %)"]
        if mem:
            per_rank = r.get("distributed_peak_mb_per_rank")
            cells.append(
                f"{r['reference_peak_mb']:.0f} / {r['metafusion_peak_mb']:.0f}"
                + (f" / {per_rank:.0f}" if per_rank else "")
            )
        lines.append("| " + " | ".join(cells) + " |")
    s = sampler
    lines += [
        "",
        f"Episode sampler ({s['dataset']}, 5-way 1-shot 15 queries): {s['ms_per_episode']:.2f} ms/episode"
        + (
            f" = {100 * s['fraction_of_maml1_task']:.1f} % of a MAML-1 task's meta-train time"
            if "fraction_of_maml1_task" in s
            else ""
        )
        + f"; dataset load (cached tensors): {s['load_s']:.2f} s for {s['samples']} samples.",
    ]
    if accuracy:
        r, m = accuracy["reference"], accuracy["metafusion"]
        same = "same" if r["fingerprint"] == m["fingerprint"] else "DIFFERENT"
        lines += [
            "",
            f"Final accuracy after {accuracy['iterations']} MAML iterations from the same seed ({same} 600 "
            f"test episodes): reference loop {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} % "
            f"({r['seconds']:.0f} s), metafusion on {accuracy['ranks']} ranks "
            f"{100 * m['accuracy']:.2f} ± {100 * m['ci95']:.2f} % ({m['seconds']:.0f} s).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
