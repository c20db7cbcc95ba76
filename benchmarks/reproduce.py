"""Rerun the measured rows of docs/results.md and rewrite its tables from the run folders.

    python benchmarks/reproduce.py --list                     # every row and its exact commands
    python benchmarks/reproduce.py --tables multimodal        # rerun one table's rows, rewrite it
    python benchmarks/reproduce.py                            # every CPU row of docs/results.md (~10.2 h on 2 cores)
    python benchmarks/reproduce.py --report-only              # rewrite the tables from existing runs

``make reproduce-quick`` runs the last-but-one line. Each row's commands are exactly what produced its
numbers: the table cell shows them verbatim, with ``metafusion`` meaning ``python -m metafusion``.
Rows whose flags say ``--threads 1`` may run two at a time (``--jobs 2``): each then owns one core.
Rows with ``--threads 2`` or torchrun take both cores and always run alone.
Each row's run folder is its first command's ``--out`` (results.json, learning_curve.png, metrics.jsonl);
a rerun deletes it first.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = Path("runs")
RESULTS_MD = REPO / "docs" / "results.md"
# Runs before the engine recorded its hardware in train.json were all made on this machine.
UNRECORDED_HARDWARE = "AMD EPYC, 2 cores (not recorded; from the session notes)"

# Published numbers (papers' tables) and the issue's measurements of learn2learn-example loops given
# 20 minutes on this machine: what each of our rows is compared against.
PAPER = {
    "maml": ("98.7 %", "Finn et al. 2017, Table 1"),
    "fomaml": ("98.3 %", "Finn et al. 2017, Table 1"),
    "reptile": ("97.68 % / 95.39 % non-transd.", "Nichol et al. 2018, Table 1"),
}
L2L_LOOP_20MIN = {
    "maml": "92.6 % / 90.0 % (2,020 it.)",
    "fomaml": "92.0 % / 88.0 % (3,740 it.)",
    "reptile": "89.2 % / 86.9 % (7,222 it.)",
}


@dataclass
class Row:
    name: str
    table: str
    commands: list[list[str]]
    labels: dict = field(default_factory=dict)
    exclusive: bool = True  # takes both cores

    @property
    def out(self) -> Path:
        """The run folder: the first command's ``--out``."""
        first = self.commands[0]
        return Path(first[first.index("--out") + 1])


def _torchrun_meta_train(cfg: str) -> list[str]:
    """meta-train on both cores as 2 torch.distributed ranks (docs/performance.md)."""
    return ["torchrun", "--nproc_per_node", "2", "-m", "metafusion", "meta-train", "--config", cfg]


def _omniglot_rows() -> list[Row]:
    """Omniglot 5-way 1-shot, 20 minutes of meta-training: one process with 2 threads (``run``), or
    torch.distributed over the two cores (``torchrun``, then ``meta-test``; docs/performance.md)."""
    cfg = "benchmarks/configs/omniglot_5w1s.yaml"
    strided = ["--encoder", "image=conv4s", "--set", "model.width=256"]  # the reference code's Omniglot net
    specs = [
        ("omniglot_5w1s_maml_cpu20", "maml", "one process", []),
        ("omniglot_5w1s_fomaml_cpu20", "fomaml", "one process", []),
        ("omniglot_5w1s_fomaml_conv4s_cpu20", "fomaml", "torchrun", [*strided, "--set", "train.val_interval=1000"]),
        ("omniglot_5w1s_reptile_cpu20", "reptile", "torchrun", ["--set", "train.val_interval=1000"]),
    ]
    rows = []
    for name, algo, launcher, extra in specs:
        out = str(RUNS / name)
        if launcher == "torchrun":
            cmds = [
                [
                    *_torchrun_meta_train(cfg),
                    "--algo",
                    algo,
                    "--budget",
                    "20",
                    *extra,
                    "--out",
                    out,
                ],
                ["metafusion", "meta-test", "--run", out],
            ]
        else:
            cmds = [
                [
                    "metafusion",
                    "run",
                    "--config",
                    cfg,
                    "--algo",
                    algo,
                    "--budget",
                    "20",
                    "--threads",
                    "2",
                    *extra,
                    "--out",
                    out,
                ]
            ]
        cmds.append(["metafusion", "meta-test", "--run", out, "--non-transductive"])
        network = "Conv4 strided (reference code)" if "image=conv4s" in extra else "Conv4 max-pool (paper text)"
        rows.append(Row(name, "omniglot-cpu", cmds, {"algorithm": algo, "network": network}))
    return rows


# The fast recipes (benchmarks/configs/omniglot_<protocol>_fast.yaml) that have been run, by (protocol,
# algorithm), and the paper's number for each (MAML, FOMAML: Finn et al. 2017, Table 1; Reptile: Nichol
# et al. 2018, Table 1, transductive / non-transductive).
FAST = {
    ("5w1s", "maml"): "98.7 %",
    ("5w1s", "fomaml"): "98.3 %",
    ("5w1s", "reptile"): "97.68 % / 95.39 % non-transd.",
    ("5w5s", "maml"): "99.9 %",
    ("5w5s", "fomaml"): "99.2 %",
    ("5w5s", "reptile"): "99.48 % / 98.90 % non-transd.",
    ("20w1s", "maml"): "95.8 %",
    ("20w1s", "fomaml"): "89.4 %",
    ("20w1s", "reptile"): "89.43 % / 88.14 % non-transd.",
    ("20w5s", "maml"): "98.9 %",
}
# Non-transductive evaluation classifies each query alone: on 20-way episodes 600 of them take longer
# than the 20-minute run itself, so those rows report the first episodes of the same fixed 600 (20-way
# 5-shot: five times the support images in each of those passes, so fewer episodes).
FAST_NONTRANSDUCTIVE_EPISODES = {"20w1s": 100, "20w5s": 10}


def _fast_rows() -> list[Row]:
    """The fastest recipe found for each protocol and algorithm, 20 minutes on 2 ranks, and the centroid
    baseline on the same episodes (docs/results.md, "Paper accuracy in 20 CPU-minutes")."""
    rows = []
    for protocol in dict.fromkeys(p for p, _ in FAST):
        cfg = f"benchmarks/configs/omniglot_{protocol}_fast.yaml"
        subset = FAST_NONTRANSDUCTIVE_EPISODES.get(protocol)
        episodes = ["--episodes", str(subset)] if subset else []
        for algo in (a for p, a in FAST if p == protocol):
            out = str(RUNS / f"omniglot_{protocol}_fast_{algo}_cpu20")
            cmds = [
                [*_torchrun_meta_train(cfg), "--algo", algo, "--budget", "20", "--out", out],
                ["metafusion", "meta-test", "--run", out],
                ["metafusion", "meta-test", "--run", out, "--non-transductive", *episodes],
            ]
            labels = {"protocol": protocol, "algorithm": algo}
            rows.append(Row(f"omniglot_{protocol}_fast_{algo}_cpu20", "omniglot-fast", cmds, labels))
        out = str(RUNS / f"omniglot_{protocol}_fast_centroid")
        cmd = ["metafusion", "run", "--config", cfg, "--algo", "centroid", "--threads", "1", "--out", out, "--quiet"]
        labels = {"protocol": protocol, "algorithm": "centroid"}
        rows.append(Row(f"omniglot_{protocol}_fast_centroid", "omniglot-fast", [cmd], labels, False))
    return rows


def _multimodal_rows() -> list[Row]:
    rows = []
    cfg = "benchmarks/configs/omniglot_strokes_5w1s.yaml"
    variants = [("image", "attention"), ("strokes", "attention")] + [
        ("image,strokes", f) for f in ("attention", "concat", "mean", "late", "transformer")
    ]
    for algo, iterations in (("maml", 250), ("reptile", 600)):
        for modalities, fusion in variants:
            name = f"omniglot_strokes_{algo}_{modalities.replace(',', '+')}" + (
                f"_{fusion}" if "," in modalities else ""
            )
            cmd = [
                "metafusion",
                "run",
                "--config",
                cfg,
                "--algo",
                algo,
                "--set",
                f"model.modalities={modalities}",
                "--fusion",
                fusion,
                "--encoder",
                "image=conv4s",
                "--iterations",
                str(iterations),
                "--set",
                f"train.val_interval={iterations}",
                "--threads",
                "1",
                "--out",
                str(RUNS / "multimodal" / name),
                "--quiet",
            ]
            rows.append(
                Row(
                    name,
                    "multimodal",
                    [cmd],
                    {"algorithm": algo, "modalities": modalities, "fusion": fusion if "," in modalities else "—"},
                    exclusive=False,
                )
            )
    return rows


def _synthetic_rows() -> list[Row]:
    rows = []
    cfg = "benchmarks/configs/demo.yaml"  # the demo's budget: 150 iterations, meta-batch 4, width 32
    for missing in (0.0, 0.3):
        for modalities in ("image", "audio", "text", "tabular", "image,audio,text,tabular"):
            name = f"synthetic_missing{int(100 * missing)}_{modalities.replace(',', '+')}"
            cmd = [
                "metafusion",
                "run",
                "--config",
                cfg,
                "--algo",
                "maml",
                "--set",
                f"model.modalities={modalities}",
                "--set",
                f"data.missing_rate={missing}",
                "--episodes",
                "300",
                "--threads",
                "1",
                "--out",
                str(RUNS / "synthetic" / name),
                "--quiet",
            ]
            rows.append(Row(name, "synthetic", [cmd], {"missing": missing, "modalities": modalities}, exclusive=False))
    return rows


def _baseline_rows() -> list[Row]:
    """The centroid baseline (frozen features + nearest class mean, nothing trained) on the episodes of
    the three tables above: seconds per row, shown in a table of its own under each."""
    rows = [
        Row(
            "omniglot_5w1s_centroid",
            "omniglot-centroid",
            [
                [
                    "metafusion",
                    "run",
                    "--config",
                    "benchmarks/configs/omniglot_5w1s.yaml",
                    "--algo",
                    "centroid",
                    "--set",
                    "model.modalities=image",
                    "--threads",
                    "1",
                    "--out",
                    str(RUNS / "omniglot_5w1s_centroid"),
                    "--quiet",
                ]
            ],
            {"modalities": "image"},
            exclusive=False,
        )
    ]
    for modalities in ("image", "strokes", "image,strokes"):
        name = f"omniglot_strokes_centroid_{modalities.replace(',', '+')}"
        rows.append(
            Row(
                name,
                "multimodal-centroid",
                [
                    [
                        "metafusion",
                        "run",
                        "--config",
                        "benchmarks/configs/omniglot_strokes_5w1s.yaml",
                        "--algo",
                        "centroid",
                        "--set",
                        f"model.modalities={modalities}",
                        "--threads",
                        "1",
                        "--out",
                        str(RUNS / "multimodal" / name),
                        "--quiet",
                    ]
                ],
                {"modalities": modalities},
                exclusive=False,
            )
        )
    for missing in (0.0, 0.3):
        for modalities in ("image", "audio", "text", "tabular", "image,audio,text,tabular"):
            name = f"synthetic_missing{int(100 * missing)}_centroid_{modalities.replace(',', '+')}"
            rows.append(
                Row(
                    name,
                    "synthetic-centroid",
                    [
                        [
                            "metafusion",
                            "run",
                            "--config",
                            "benchmarks/configs/demo.yaml",
                            "--algo",
                            "centroid",
                            "--set",
                            f"model.modalities={modalities}",
                            "--set",
                            f"data.missing_rate={missing}",
                            "--episodes",
                            "300",
                            "--threads",
                            "1",
                            "--out",
                            str(RUNS / "synthetic" / name),
                            "--quiet",
                        ]
                    ],
                    {"missing": missing, "modalities": modalities},
                    exclusive=False,
                )
            )
    return rows


CLINC_ALGOS = "protonet,maml,anil,reptile,finetune"  # compare adds the centroid row


def _clinc_rows() -> list[Row]:
    """CLINC150 5-way 1/5-shot, seeded intent split and cross-domain split: one `compare` per setting,
    so every algorithm (and the centroid baseline) is tested on the identical episodes."""
    rows = []
    for split in ("protocol", "cross-domain"):
        for shots in (1, 5):
            name = f"clinc150_{split}_5w{shots}s"
            cmd = [
                "metafusion",
                "compare",
                "--config",
                f"benchmarks/configs/clinc150_5w{shots}s.yaml",
                "--algos",
                CLINC_ALGOS,
                "--set",
                f"data.split={split}",
                "--threads",
                "1",
                "--out",
                str(RUNS / "clinc150" / name),
                "--quiet",
            ]
            rows.append(Row(name, "clinc150", [cmd], {"split": split, "shots": shots}, exclusive=False))
    return rows


def _fashion_rows() -> list[Row]:
    """Fashion products 5-way 1/5-shot: each modality alone and fused, centroid / ProtoNet / MAML."""
    singles = [("image", "attention"), ("text", "attention"), ("tabular", "attention")]
    fused = "image,text,tabular"
    plan = {
        1: {
            "centroid": singles + [(fused, "attention")],
            "protonet": singles + [(fused, f) for f in ("attention", "concat", "mean", "transformer")],
            "maml": singles + [(fused, f) for f in ("attention", "concat", "mean", "late", "transformer")],
        },
        5: {algo: singles + [(fused, "attention")] for algo in ("centroid", "protonet", "maml")},
    }
    rows = []
    for shots, algos in plan.items():
        for algo, variants in algos.items():
            for modalities, fusion in variants:
                several = "," in modalities
                name = f"fashion_5w{shots}s_{algo}_{modalities.replace(',', '+')}" + (f"_{fusion}" if several else "")
                cmd = [
                    "metafusion",
                    "run",
                    "--config",
                    f"benchmarks/configs/fashion_5w{shots}s.yaml",
                    "--algo",
                    algo,
                    "--set",
                    f"model.modalities={modalities}",
                    "--fusion",
                    fusion,
                    "--threads",
                    "1",
                    "--out",
                    str(RUNS / "fashion" / name),
                    "--quiet",
                ]
                rows.append(
                    Row(
                        name,
                        "fashion",
                        [cmd],
                        {
                            "shots": shots,
                            "algorithm": algo,
                            "modalities": modalities,
                            "fusion": fusion if several and algo != "centroid" else "—",
                        },
                        exclusive=False,
                    )
                )
    return rows


ROWS = (
    _omniglot_rows()
    + _fast_rows()
    + _multimodal_rows()
    + _synthetic_rows()
    + _baseline_rows()
    + _clinc_rows()
    + _fashion_rows()
)
TABLES = (
    "omniglot-cpu",
    "omniglot-fast",
    "multimodal",
    "synthetic",
    "omniglot-centroid",
    "multimodal-centroid",
    "synthetic-centroid",
    "clinc150",
    "fashion",
)


def shown(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def executable(cmd: list[str]) -> list[str]:
    if cmd[0] == "metafusion":
        return [sys.executable, "-m", "metafusion", *cmd[1:]]
    if cmd[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    return cmd


def run_row(row: Row) -> None:
    import shutil

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    shutil.rmtree(REPO / row.out, ignore_errors=True)  # a rerun replaces the row's run folder
    (REPO / row.out).parent.mkdir(parents=True, exist_ok=True)
    log = REPO / row.out.parent / f"{row.name}.log"
    with log.open("w") as f:
        for cmd in row.commands:
            f.write(f"$ {shown(cmd)}\n")
            f.flush()
            t = time.perf_counter()
            subprocess.run(executable(cmd), check=True, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            f.write(f"# {time.perf_counter() - t:.0f} s\n")
    print(f"done: {row.name} ({log})", flush=True)


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------
# What keep_artifacts saves of a fast-recipe run's files, by key of benchmarks/results/<row>.json.
RAW_KEYS = {"results": "transductive", "results_nontransductive": "nontransductive", "train": "train"}


def _raw_path(row: Row) -> Path:
    return REPO / "benchmarks" / "results" / f"{row.name}.json"


def _load(row: Row, stem: str = "results") -> dict | None:
    """A run's ``stem``.json from its run folder; where the folder is not on this machine, from the raw
    numbers committed for it (fast-recipe rows), so that their table can be rewritten without every run."""
    path = REPO / row.out / f"{stem}.json"
    if path.exists():
        return json.loads(path.read_text())
    raw = _raw_path(row)
    if not (REPO / row.out).is_dir() and raw.exists():
        return json.loads(raw.read_text()).get(RAW_KEYS[stem])
    return None


def _acc(r: dict | None) -> str:
    return "not run" if r is None else f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_ci95']:.2f} %"


def _commands(row: Row) -> str:
    return "<br>".join(f"`{shown(c)}`" for c in row.commands)


def _train_cells(row: Row, unrecorded: str, one_process: str) -> tuple[str, str]:
    """From the row's train.json: its "iterations | meta-train time | tasks/s" cells (dashes for a row that
    trained nothing or has not run) and its hardware cell (CPU, then ranks or threads)."""
    train = _load(row, "train") or {}
    ranks = train.get("ranks", 1)
    hw = train.get("hardware", unrecorded) + (f", {ranks} ranks × 1 thread" if ranks > 1 else one_process)
    if not train.get("iterations"):
        return "— | — | —", hw
    return f"{train['iterations']:,} | {train['seconds']:.0f} s | {train['tasks_per_s']:.1f}", hw


def table_omniglot(rows: list[Row]) -> str:
    out = [
        "| algorithm | network | paper (5w1s) | learn2learn-example loop, 20 min here | metafusion, transductive | "
        "metafusion, non-transductive | iterations | meta-train time | tasks/s | hardware | commands |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        algo = row.labels["algorithm"]
        t, n = _load(row), _load(row, "results_nontransductive")
        trained, hw = _train_cells(row, UNRECORDED_HARDWARE, ", 2 threads")
        out.append(
            f"| {algo} | {row.labels['network']} | {PAPER[algo][0]} ({PAPER[algo][1]}) | {L2L_LOOP_20MIN[algo]} | "
            f"{_acc(t)} | {_acc(n)} | {trained} | {hw} | {_commands(row)} |"
        )
    return "\n".join(out)


def table_fast(rows: list[Row]) -> str:
    out = [
        "| protocol | algorithm | paper (Table 1) | transductive | non-transductive | "
        "iterations | meta-train time | tasks/s | hardware | commands |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        protocol, algo = row.labels["protocol"], row.labels["algorithm"]
        t, n = _load(row), _load(row, "results_nontransductive")
        nontransductive = "—" if algo == "centroid" else _acc(n)
        if n and n["episodes"] != (t or n)["episodes"]:
            nontransductive += f" (first {n['episodes']} episodes)"
        trained, hw = _train_cells(row, "—", "")
        out.append(
            f"| {protocol} | {algo} | {FAST.get((protocol, algo), '—')} | {_acc(t)} | {nontransductive} | "
            f"{trained} | {hw} | {_commands(row)} |"
        )
    return "\n".join(out)


def _seconds(r: dict | None) -> str:
    return f"{r['train_seconds']:.0f} s" if r else "—"


def _weights(r: dict | None) -> str:
    w = (r or {}).get("modality_weights") or {}
    return ", ".join(f"{m} {v:.2f}" for m, v in w.items()) or "—"


def _modality_table(
    rows: list[Row], lead: dict[str, Callable[[dict], str]], episodes: int, test_time: bool = False
) -> str:
    """Rows of single-modality vs fused runs: the ``lead`` columns (header -> cell from the row's labels),
    then accuracy, modality weights, iterations, time (and with ``test_time`` the meta-test's) and the
    command."""
    head = [
        *lead,
        f"accuracy (the same {episodes} test episodes)",
        "modality weights",
        "iterations",
        "meta-train time",
        *(["meta-test time"] if test_time else []),
        "command",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        r = _load(row)
        cells = [cell(row.labels) for cell in lead.values()]
        cells += [_acc(r), _weights(r), str((r or {}).get("iterations", "—")), _seconds(r)]
        cells += [f"{r['seconds']:.0f} s" if r else "—"] if test_time else []
        out.append("| " + " | ".join(cells + [_commands(row)]) + " |")
    return "\n".join(out)


def table_multimodal(rows: list[Row]) -> str:
    return _modality_table(
        rows,
        {
            "algorithm": lambda x: x["algorithm"],
            "modalities": lambda x: x["modalities"],
            "fusion": lambda x: x["fusion"],
        },
        600,
    )


def table_synthetic(rows: list[Row]) -> str:
    return _modality_table(
        rows,
        {"missing modalities": lambda x: f"{100 * x['missing']:.0f} %", "modalities": lambda x: x["modalities"]},
        300,
    )


def table_baseline(rows: list[Row]) -> str:
    lead = {"baseline": lambda x: "centroid", "modalities": lambda x: x["modalities"]}
    if "missing" in rows[0].labels:
        lead = {"missing modalities": lambda x: f"{100 * x['missing']:.0f} %", **lead}
    return _modality_table(rows, lead, 300 if "missing" in rows[0].labels else 600, test_time=True)


def _compare_results(row: Row) -> list[dict]:
    """The per-algorithm results of a ``compare`` row, in the order it ran them (centroid last)."""
    names = [*CLINC_ALGOS.split(","), "centroid"]
    return [r for r in (_load_path(REPO / row.out / n / "results.json") for n in names) if r]


def _load_path(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def table_clinc(rows: list[Row]) -> str:
    out = [
        "| class split | shots | algorithm | accuracy (600 test episodes) | vs centroid | iterations | "
        "meta-train time | meta-test time | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        results = _compare_results(row)
        base = next((r for r in results if r["algorithm"] == "centroid"), None)
        if not results:
            out.append(f"| {row.labels['split']} | {row.labels['shots']} | all | not run | | | | | {_commands(row)} |")
        for i, r in enumerate(results):
            delta = "—" if base is None or r is base else f"{100 * (r['accuracy_mean'] - base['accuracy_mean']):+.2f}"
            out.append(
                f"| {row.labels['split']} | {row.labels['shots']} | {r['algorithm']} | {_acc(r)} | {delta} | "
                f"{r['iterations']} | {r['train_seconds']:.0f} s | {r['seconds']:.0f} s | "
                f"{_commands(row) if i == 0 else '〃'} |"
            )
    return "\n".join(out)


def table_fashion(rows: list[Row]) -> str:
    return _modality_table(
        rows,
        {
            "shots": lambda x: str(x["shots"]),
            "algorithm": lambda x: x["algorithm"],
            "modalities": lambda x: x["modalities"],
            "fusion": lambda x: x["fusion"],
        },
        600,
        test_time=True,
    )


def _episodes_note(rows: list[Row], which: str = "Every row above") -> str:
    """Whether every row of a table was tested on the identical episodes (their fingerprint)."""
    if rows and rows[0].table == "clinc150":  # `compare` itself refuses to test on different episodes
        return "".join(
            f"\n\n{row.labels['split']}, {row.labels['shots']}-shot: every algorithm was tested on the "
            f"identical episodes (fingerprint `{results[0]['fingerprint']}`)."
            for row in rows
            if (results := _compare_results(row))
        )
    for key, name in (("shots", "Every {}-shot row"), ("protocol", "Every {} row")):
        groups = sorted({str(row.labels[key]) for row in rows if key in row.labels})
        if len(groups) > 1:  # rows with different shots or ways cannot share episodes
            return "".join(_episodes_note([r for r in rows if str(r.labels[key]) == k], name.format(k)) for k in groups)
    prints = {r["fingerprint"] for r in map(_load, rows) if r}
    if not prints:
        return ""
    if len(prints) == 1:
        return f"\n\n{which} was tested on the identical episodes (fingerprint `{prints.pop()}`)."
    return f"\n\nWARNING: these rows were tested on {len(prints)} different sets of episodes."


RENDER = {
    "omniglot-cpu": table_omniglot,
    "omniglot-fast": table_fast,
    "multimodal": table_multimodal,
    "synthetic": table_synthetic,
    "omniglot-centroid": table_baseline,
    "multimodal-centroid": table_baseline,
    "synthetic-centroid": table_baseline,
    "clinc150": table_clinc,
    "fashion": table_fashion,
}


def rewrite_tables(path: Path, tables: list[str]) -> list[str]:
    """Replace the text between ``<!-- BEGIN table -->`` and ``<!-- END table -->`` in ``path``; return the
    tables rewritten. A table with a row that has neither a run folder here nor committed raw numbers is left
    as it is: the committed numbers came from runs on another machine or day, and blanking them would lose
    them."""
    text, rewritten = path.read_text(), []
    for name in tables:
        begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{path} has no {begin} ... {end} markers")
        rows = [r for r in ROWS if r.table == name]
        missing = [r.name for r in rows if not (REPO / r.out).is_dir() and not _raw_path(r).exists()]
        if missing:
            print(f"kept {name} as it was: no run folder or raw numbers for {', '.join(missing)}", file=sys.stderr)
            continue
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        body = RENDER[name](rows) + _episodes_note(rows)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
        rewritten.append(name)
    path.write_text(text)
    return rewritten


def keep_artifacts(rows: list[Row]) -> None:
    """The learning curve of each headline (Omniglot) row, into docs/img/; for each fast-recipe row also
    its raw numbers (commands, train.json, both meta-test results, the validation curve), into
    benchmarks/results/ (the centroid baseline's too), since the run folders themselves are not committed."""
    import shutil

    for row in rows:
        src = REPO / row.out / "learning_curve.png"
        trained = "centroid" not in row.name  # the baseline has no learning curve worth a picture
        if row.table in ("omniglot-cpu", "omniglot-fast") and trained and src.exists():
            shutil.copyfile(src, REPO / "docs" / "img" / f"{row.name}.png")
        if row.table == "omniglot-fast" and (REPO / row.out / "train.json").exists():
            from metafusion.engine.report import read_metrics

            raw = {
                "commands": [shown(c) for c in row.commands],
                "train": _load(row, "train"),
                "transductive": _load(row),
                "nontransductive": _load(row, "results_nontransductive"),
                "validation": [
                    {k: r[k] for k in ("step", "elapsed_s", "val_accuracy") if k in r}  # a baseline has no clock
                    for r in read_metrics(REPO / row.out)
                    if "val_accuracy" in r
                ],
            }
            _raw_path(row).write_text(json.dumps(raw, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated subset of {', '.join(TABLES)}")
    p.add_argument("--rows", help="comma-separated row names (default: every row of the chosen tables)")
    p.add_argument("--jobs", type=int, default=2, help="single-thread rows run this many at a time")
    p.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the tables from existing run folders")
    args = p.parse_args()
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        p.error(f"unknown table {', '.join(unknown)}; choose from {', '.join(TABLES)}")
    rows = [r for r in ROWS if r.table in tables]
    if args.rows:
        wanted = set(args.rows.split(","))
        rows = [r for r in rows if r.name in wanted]
        if len(rows) != len(wanted):
            p.error(f"unknown row(s): {', '.join(wanted - {r.name for r in rows})}")
    if args.list:
        for r in rows:
            print(f"[{r.table}] {r.name}\n" + "\n".join(f"    {shown(c)}" for c in r.commands))
        return
    if not args.report_only:
        for r in (r for r in rows if r.exclusive):
            run_row(r)
        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            list(pool.map(run_row, [r for r in rows if not r.exclusive]))
    keep_artifacts(rows)
    rewritten = rewrite_tables(RESULTS_MD, tables)
    print(f"rewrote {', '.join(rewritten) or 'no table'} in {RESULTS_MD.relative_to(REPO)}")


if __name__ == "__main__":
    main()
