"""What a run leaves behind for people: results.json/.md, plots, the side-by-side comparison tables
(Markdown + CSV) and what the command line prints."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .metrics_log import read_metrics


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
        *([f"| vs centroid (same episodes) | {against_centroid(r)} |"] if r.get("vs_centroid") else []),
        *([f"| selection (validation) | {selection_cell(r['selection'])} |"] if r.get("selection") else []),
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


def against_centroid(r: dict[str, Any]) -> str:
    """The paired difference with the untrained centroid on the same test episodes, in points."""
    d = r["vs_centroid"]
    return f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f} points (centroid {100 * r['centroid_accuracy']:.2f} %)"


def selection_cell(s: dict[str, Any]) -> str:
    """What selection kept: alpha (0 = the start) and the centroid's weight (1 = the centroid alone)."""
    return f"alpha {s['alpha']:g}, centroid weight {s['centroid_weight']:g}"


# -- what the command line prints -------------------------------------------------------------------
def results_summary(r: dict[str, Any]) -> str:
    """A meta-test's accuracy, interval, protocol and attention weights, with a warning for diverged episodes."""
    lines = [
        f"\n{r['algorithm']} on {r['dataset']} ({', '.join(r['modalities'])}), {r['ways']}-way {r['shots']}-shot: "
        f"accuracy {100 * r['accuracy_mean']:.2f} % ± {100 * r['accuracy_ci95']:.2f} (95% CI, "
        f"{r['episodes']} episodes, {r.get('protocol', 'transductive')} protocol), macro-F1 {r['macro_f1']:.3f}"
    ]
    if r.get("episodes_diverged"):
        lines.append(
            f"warning: {r['episodes_diverged']} of {r['episodes']} episodes diverged (non-finite logits; their "
            f"queries count as wrong): lower algo.inner_lr_test or algo.inner_steps_test"
        )
    if r.get("vs_centroid"):
        lines.append(f"against the untrained centroid on the same episodes (paired 95% CI): {against_centroid(r)}")
    if r.get("selection"):
        lines.append(f"model kept by selection on validation: {selection_cell(r['selection'])}")
    if r.get("modality_weights"):
        lines.append("attention weights: " + ", ".join(f"{m} {w:.3f}" for m, w in r["modality_weights"].items()))
    if split := r.get("corrupted_weights"):
        lines.append(
            f"weight of a corrupted modality {split['corrupted']:.3f} against a clean one {split['clean']:.3f} "
            f"(mean over {split['samples']} query samples holding both)"
        )
    if per_task := r.get("task_weights"):
        cells = [
            f"{m} r {'n/a' if v['correlation'] is None else format(v['correlation'], '+.2f')}"
            for m, v in per_task["modalities"].items()
        ]
        lines.append(
            f"weights per task against each modality's accuracy alone ({per_task['tasks']} tasks): correlation "
            + ", ".join(cells)
            + (
                f"; the most weighted modality is the most accurate alone in {100 * per_task['best_weighted']:.0f} %"
                " of tasks"
                if per_task["best_weighted"] is not None
                else ""
            )
        )
    return "\n".join(lines)


def meta_train_summary(algorithm: str, train: dict[str, Any], run_dir: Path) -> str:
    ranks = f" over {train['ranks']} ranks" if train["ranks"] > 1 else ""
    return (
        f"meta-trained {algorithm} for {train['iterations']} iterations in {train['seconds']:.1f} s "
        f"({train['tasks_per_s']:.1f} tasks/s{ranks}); "
        f"best meta-val accuracy {100 * train['best_val_accuracy']:.2f} %; run folder: {run_dir}"
    )


def fine_tune_summary(r: dict[str, Any], task: str) -> str:
    lines = [
        f"fine-tuned on {r['ways']}-way {r['shots']}-shot task ({task}; classes: {', '.join(r['classes'])}): "
        f"query accuracy {100 * r['query_accuracy']:.2f} % on {r['queries']} queries"
    ]
    if r["diverged"]:
        lines.append("warning: some query logits are not finite (adaptation diverged; they count as wrong)")
    lines.append(f"adapted model saved to {r['model']}\nlabel new files with:\n  {r['predict']}")
    return "\n".join(lines)


def prediction_summary(pred, out: Path) -> str:
    """Counts per predicted class; with labels, the accuracy and the confusion matrix (printed, and a PNG
    beside ``out``)."""
    counts = {c: pred.predicted.count(c) for c in pred.classes}
    lines = [f"predicted {len(pred)} samples: " + ", ".join(f"{c} {n}" for c, n in counts.items())]
    if int(pred.diverged.sum()):
        lines.append(f"warning: {int(pred.diverged.sum())} samples got non-finite logits (no prediction)")
    if pred.labels is not None:
        matrix = pred.confusion()
        png = plot_confusion(Path(out).with_suffix(".png"), matrix, pred.classes)
        width = max(len(c) for c in pred.classes)
        lines.append(f"accuracy {100 * pred.accuracy:.2f} % on {len(pred)} labelled samples; confusion (row = true):")
        lines.append(" " * (width + 2) + " ".join(f"{c:>{width}}" for c in pred.classes))
        lines += [
            f"  {c:>{width}}" + "".join(f" {n:>{width}}" for n in row) for c, row in zip(pred.classes, matrix.tolist())
        ]
        lines.append(f"confusion matrix: {png}")
    lines.append(f"predictions written to {out}")
    return "\n".join(lines)


def write_task_weights(run_dir: Path, rows: list[dict[str, float]]) -> Path:
    """task_weights.csv: per test task, each modality's mean weight and its accuracy alone on the task."""
    path = Path(run_dir) / "task_weights.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", *rows[0]])
        writer.writeheader()
        writer.writerows({"task": t, **row} for t, row in enumerate(rows))
    return path


def plot_run(run_dir: Path, results: dict[str, Any], per_task: Sequence[dict[str, float]] = ()) -> list[Path]:
    """learning_curve.png (meta-train loss, meta-val accuracy), attention.png (modality weights); with
    corrupted modalities, corrupted_weights.png (histograms of the weights of corrupted and clean ones); with
    ``per_task`` (``TaskWeights.rows``), task_weights.png (per modality, each task's weight against the
    modality's accuracy alone on it). Each is drawn where its numbers exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    plots = {
        "learning_curve.png": _learning_curve,
        "attention.png": _attention,
        "corrupted_weights.png": _corrupted_weights,
        "task_weights.png": _task_weights,
    }
    written = []
    for name, draw in plots.items():
        fig = draw(plt, run_dir, results, per_task)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(run_dir / name, dpi=110)
            plt.close(fig)
            written.append(run_dir / name)
    return written


def _learning_curve(plt, run_dir: Path, results: dict, per_task):
    records = read_metrics(run_dir)
    if not records:
        return None
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
    return fig


def _attention(plt, run_dir: Path, results: dict, per_task):
    weights = results.get("modality_weights") or {}
    if not weights:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(list(weights), list(weights.values()), color="tab:green")
    ax.set_ylabel("mean attention weight")
    ax.set_title("per-modality attention (meta-test queries)")
    return fig


def _corrupted_weights(plt, run_dir: Path, results: dict, per_task):
    """How the fusion weighs corrupted against clean modalities of the same query samples."""
    split = results.get("corrupted_weights") or {}
    if not split:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3))
    edges = [i / 10 for i in range(11)]
    for kind, color in (("clean", "tab:green"), ("corrupted", "tab:red")):
        ax.stairs(split[f"{kind}_histogram"], edges, color=color, label=f"{kind} (mean {split[kind]:.2f})")
    ax.set_xlabel("modality weight")
    ax.set_ylabel("query samples")
    ax.legend()
    return fig


def _task_weights(plt, run_dir: Path, results: dict, per_task):
    """Does a task's weight on a modality follow what that modality is worth on the task?"""
    if not per_task:
        return None
    summary = (results.get("task_weights") or {}).get("modalities", {})
    modalities = results["modalities"]
    fig, axes = plt.subplots(1, len(modalities), figsize=(3 * len(modalities), 3), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], modalities):
        ax.scatter([r[f"weight_{m}"] for r in per_task], [r[f"accuracy_alone_{m}"] for r in per_task], s=6, alpha=0.4)
        correlation = (summary.get(m) or {}).get("correlation")
        ax.set_title(m if correlation is None else f"{m} (r = {correlation:+.2f})", fontsize=9)
        ax.set_xlabel("mean weight in the task")
    axes[0][0].set_ylabel("accuracy alone in the task")
    return fig


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
    "modalities",
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
    head = [
        "algorithm",
        "modalities",
        "accuracy (95% CI)",
        "vs centroid (paired)",
        "macro-F1",
        "meta-train time",
        "tasks/s",
        "peak mem",
        "episodes",
    ] + [f"w[{m}]" for m in modalities]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["algorithm"],
            "+".join(r["modalities"]),
            f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_ci95']:.2f} %",
            _paired_cell(r),
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


def _paired_cell(r: dict[str, Any]) -> str:
    d = r.get("vs_centroid")
    return f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f}" if d else "—"


def write_compare(out: Path, rows: list[dict[str, Any]]) -> str:
    table = compare_table(rows)
    (Path(out) / "compare.md").write_text(table)
    with (Path(out) / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "modalities": "+".join(r["modalities"])} for r in rows)
    return table
