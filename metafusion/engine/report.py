"""What a run leaves behind for people: metrics.jsonl, TensorBoard events, results.json/.md, plots,
and the side-by-side comparison tables (Markdown + CSV)."""

from __future__ import annotations

import csv
import json
import os
import resource
import threading
from pathlib import Path
from typing import Any

import torch


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    fork and exec, so a process started by a bigger one would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (CPU) or peak allocated GPU memory, in MiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


class PeakMemory:
    """Peak resident memory (MiB) during a ``with`` block, sampled every 20 ms from /proc/self/statm.

    The process-wide maximum (``peak_memory_mb``) never resets, so when several stages share one
    process (``compare``) each stage's own peak has to be sampled.
    """

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        try:
            with open("/proc/self/statm") as f:
                self.peak_mb = max(self.peak_mb, int(f.read().split()[1]) * self._page_mb)
        except OSError:  # not Linux: fall back to the process-wide peak
            self.peak_mb = peak_memory_mb()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> PeakMemory:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20


class MetricsLog:
    """Appends one JSON object per logged iteration to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard. On resume, records after the checkpoint's step (from the interrupted run) are dropped."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step and self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def write_results(run_dir: Path, results: dict[str, Any], stem: str = "results") -> None:
    """``results.json`` (machine-readable) and ``results.md`` (for people) in ``run_dir``."""
    run_dir = Path(run_dir)
    (run_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (run_dir / f"{stem}.md").write_text(results_markdown(results))


def results_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# {r.get('name', 'run')}: {r['algorithm']} on {r['dataset']} ({r['ways']}-way {r['shots']}-shot)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {100 * r['accuracy_mean']:.2f} % ± {100 * r['accuracy_ci95']:.2f} (95% CI) |",
        f"| episodes | {r['episodes']} (fingerprint `{r['fingerprint']}`), "
        f"{'transductive' if r.get('transductive', True) else 'non-transductive'} |",
        f"| macro-F1 | {r['macro_f1']:.4f} |",
        f"| meta-train iterations | {r.get('iterations', '-')} |",
        f"| meta-train time | {r.get('train_seconds', 0):.1f} s |",
        f"| tasks/s | {r.get('tasks_per_s', 0):.2f} |",
        f"| peak memory | {r.get('peak_memory_mb', 0):.0f} MiB |",
        "",
    ]
    if r.get("modality_weights"):
        lines += [
            "Mean attention weight per modality (query samples, after adaptation):",
            "",
            "| modality | weight |",
            "|---|---|",
        ]
        lines += [f"| {m} | {w:.3f} |" for m, w in r["modality_weights"].items()]
        lines.append("")
    lines += [
        f"Versions: {', '.join(f'{k} {v}' for k, v in r.get('versions', {}).items())}; "
        f"git commit: {r.get('git_commit') or 'unknown'}",
        "",
    ]
    return "\n".join(lines)


def plot_run(run_dir: Path, results: dict[str, Any]) -> list[Path]:
    """learning_curve.png (meta-train loss, meta-val accuracy) and attention.png (modality weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    written = []
    records = read_metrics(run_dir)
    if records:
        fig, ax1 = plt.subplots(figsize=(6, 3.5))
        ax1.plot([r["step"] for r in records], [r["loss"] for r in records], color="tab:blue", lw=1)
        ax1.set_xlabel("meta-train iteration")
        ax1.set_ylabel("meta-train loss", color="tab:blue")
        val = [r for r in records if "val_accuracy" in r]
        if val:
            ax2 = ax1.twinx()
            ax2.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "o-", color="tab:red")
            ax2.set_ylabel("meta-val accuracy", color="tab:red")
        ax1.set_title(f"{results['algorithm']} on {results['dataset']}")
        fig.tight_layout()
        fig.savefig(run_dir / "learning_curve.png", dpi=110)
        plt.close(fig)
        written.append(run_dir / "learning_curve.png")
    weights = results.get("modality_weights") or {}
    if weights:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.bar(list(weights), list(weights.values()), color="tab:green")
        ax.set_ylabel("mean attention weight")
        ax.set_title("per-modality attention (meta-test queries)")
        fig.tight_layout()
        fig.savefig(run_dir / "attention.png", dpi=110)
        plt.close(fig)
        written.append(run_dir / "attention.png")
    return written


def plot_confusion(path: Path, matrix: torch.Tensor, classes: list[str]) -> Path:
    """A confusion matrix as a PNG: row = true class, column = predicted class, counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n, 1.0 + 0.5 * n))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    correct = int(matrix.diagonal().sum())
    ax.set_title(f"{correct} / {int(matrix.sum())} right", fontsize=9)
    dark = matrix.max().item() / 2
    for i in range(n):
        for j in range(n):
            colour = "white" if matrix[i, j] > dark else "black"
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8, color=colour)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


COMPARE_COLUMNS = [
    "algorithm",
    "accuracy_mean",
    "accuracy_ci95",
    "macro_f1",
    "train_seconds",
    "tasks_per_s",
    "peak_memory_mb",
    "episodes",
    "fingerprint",
]


def compare_table(rows: list[dict[str, Any]]) -> str:
    """Side-by-side Markdown table of several runs' results."""
    modalities = sorted({m for r in rows for m in (r.get("modality_weights") or {})})
    head = ["algorithm", "accuracy (95% CI)", "macro-F1", "meta-train time", "tasks/s", "peak mem", "episodes"] + [
        f"w[{m}]" for m in modalities
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["algorithm"],
            f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_ci95']:.2f} %",
            f"{r['macro_f1']:.3f}",
            f"{r['train_seconds']:.1f} s",
            f"{r['tasks_per_s']:.1f}",
            f"{r['peak_memory_mb']:.0f} MiB",
            str(r["episodes"]),
        ]
        weights = r.get("modality_weights") or {}
        cells += [f"{weights[m]:.3f}" if m in weights else "—" for m in modalities]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_compare(out: Path, rows: list[dict[str, Any]]) -> str:
    table = compare_table(rows)
    (Path(out) / "compare.md").write_text(table)
    with (Path(out) / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return table
