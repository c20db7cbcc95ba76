"""`metafusion` command line: parses flags into a config and calls the engine's stages. Nothing else."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .errors import InputError

# Named flags -> (dotted config key, type). Everything else can be set with `key=value` or --set key=value.
FLAGS = {
    "dataset": ("data.dataset", str),
    "data_root": ("data.root", str),
    "algo": ("algo.name", str),
    "ways": ("data.ways", int),
    "shots": ("data.shots", int),
    "queries": ("data.queries", int),
    "modalities": ("data.modalities", str),
    "fusion": ("model.fusion", str),
    "inner_steps": ("algo.inner_steps", int),
    "inner_steps_test": ("algo.inner_steps_test", int),
    "inner_lr": ("algo.inner_lr", float),
    "meta_lr": ("train.meta_lr", float),
    "meta_batch": ("train.meta_batch", int),
    "iterations": ("train.iterations", int),
    "episodes": ("data.test_episodes", int),
    "seed": ("train.seed", int),
    "device": ("train.device", str),
    "budget": ("train.budget_minutes", float),
    "threads": ("train.threads", int),
}
BUG_REPORTS = "the project's issue tracker (issues)"
TUNE_HELP = (
    "fine-tune the model on each support set first, learning rates tune.lrs (0 included: kept unless beaten on "
    "held-out or augmented support samples); see docs/commands.md"
)


def _registered() -> dict[str, str]:
    """Flag -> the names its registry holds (help lists what is registered now, plugins included)."""
    from .algorithms import ALGORITHMS
    from .data import DATASETS
    from .models import ENCODERS, FUSIONS
    from .models.encoders import DEFAULT_ENCODERS

    def reads(name: str) -> str:
        modalities = ENCODERS.get(name).modalities
        default = "/".join(m for m, e in DEFAULT_ENCODERS.items() if e == name)
        return f"{name} ({'/'.join(modalities or ['any vector'])}{'; default for ' + default if default else ''})"

    return {
        "dataset": ", ".join(DATASETS.names()),
        "algo": ", ".join(ALGORITHMS.names()),
        "fusion": ", ".join(FUSIONS.names()),
        "encoder": ", ".join(reads(n) for n in ENCODERS.names()),
    }


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (flags override the YAML file)")
    g.add_argument("--config", help="YAML config file (optional: flags alone run the synthetic dataset)")
    names = _registered()
    for flag, (key, kind) in FLAGS.items():
        g.add_argument(
            "--" + flag.replace("_", "-"),
            dest=flag,
            type=kind,
            metavar=flag.split("_")[-1].upper(),
            help=f"sets {key}" + (f": {names[flag]}" if flag in names else ""),
        )
    g.add_argument(
        "--encoder",
        action="append",
        default=[],
        metavar="MODALITY=NAME",
        help=f"encoder for one modality, e.g. --encoder text=minilm (repeatable): {names['encoder']}",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. --set train.meta_lr=0.0005 (repeatable)",
    )
    g.add_argument("--out", help="run folder (default: runs/<algo>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_protocol_flags(p: argparse.ArgumentParser, default: str) -> None:
    from .algorithms.base import PROTOCOLS

    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        help=f"how query samples are classified: transductive (normalised together), alone (each in a batch of "
        f"its own with the support set), support (with the support set's statistics); default: {default}",
    )
    p.add_argument("--non-transductive", action="store_true", help="the same as --protocol alone")


def _protocol(args: argparse.Namespace) -> str | None:
    if args.non_transductive and args.protocol not in (None, "alone"):
        raise InputError(f"--non-transductive is --protocol alone; it contradicts --protocol {args.protocol}")
    return "alone" if args.non_transductive else args.protocol


def pretrained_recipes() -> str:
    """The help text that says which settings a pretrained encoder brings, per algorithm."""
    from .algorithms import ALGORITHMS
    from .models.encoders import ENCODERS
    from .models.encoders.pretrained import PretrainedEncoder

    pretrained = [n for n in ENCODERS.names() if issubclass(ENCODERS.get(n), PretrainedEncoder)]
    lines = [
        f"With a pretrained encoder ({', '.join(pretrained)}), each algorithm takes the recipe measured best "
        "on pretrained features (docs/results.md) for every setting the config and flags leave unset:"
    ]
    for name in ALGORITHMS.names():
        recipe = ALGORITHMS.get(name).pretrained_defaults
        if recipe:
            lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in recipe.items()))
    lines.append(
        "Every run then hands over the model that selection on validation keeps among the start, the trained "
        "weights, their interpolations (select.alphas) and mixtures with the untrained centroid "
        "(select.centroid_weights): never below the start on validation. Test-time fine-tuning on each support "
        "set (meta-test/fine-tune --tune, tune.*) is off: on the tables it rarely beat rate 0 (docs/results.md)."
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metafusion",
        description="Few-shot meta-learning (MAML, Reptile, ...) on multimodal data with learned fusion.",
        epilog="Run 'metafusion COMMAND --help' for a command's flags. Docs: docs/commands.md",
    )
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"metafusion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    recipe = dict(epilog=pretrained_recipes(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p = sub.add_parser("meta-train", help="meta-train a model; writes a run folder", **recipe)
    p.set_defaults(func=cmd_meta_train)
    _add_config_flags(p)
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from RUN/last.pt")

    p = sub.add_parser("meta-test", help="evaluate a run on the fixed test episodes (mean ± 95%% CI)")
    p.set_defaults(func=cmd_meta_test)
    p.add_argument("--run", help="run folder written by meta-train")
    p.add_argument("--checkpoint", help="checkpoint to test (default: RUN/best.pt); results go beside it")
    p.add_argument("--episodes", type=int, help="number of test episodes (default: the run's config)")
    _add_protocol_flags(p, "the run's algo.transductive (transductive by default)")
    p.add_argument("--tune", action="store_true", help=TUNE_HELP)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("fine-tune", help="adapt a meta-learned model to one new task and save it")
    p.set_defaults(func=cmd_fine_tune)
    p.add_argument("--run", required=True, help="run folder written by meta-train")
    p.add_argument(
        "--task",
        default="heldout",
        help="'heldout' (an N-way K-shot task from the test classes) or a folder/manifest path",
    )
    p.add_argument("--seed", type=int, default=0, help="which held-out task to draw")
    p.add_argument("--steps", type=int, help="adaptation steps, >= 1 (default: algo.inner_steps_test)")
    p.add_argument("--out", help="folder for the adapted model (default: RUN/finetune)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapted model already in --out")
    p.add_argument("--tune", action="store_true", help=TUNE_HELP)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("predict", help="label new samples with a fine-tuned model (class names, probabilities)")
    p.set_defaults(func=cmd_predict)
    p.add_argument("--model", required=True, help="RUN/finetune/model.pt written by fine-tune (or its run folder)")
    p.add_argument("--data", required=True, help="folder or manifest of samples to label (labels optional)")
    p.add_argument("--out", help="predictions file, .csv or .jsonl (default: predictions.csv beside the model)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (never the model or the data)")
    _add_protocol_flags(p, "support: each sample's prediction independent of the others")
    p.add_argument("--skip-unreadable", action="store_true", help="mask unreadable files instead of stopping")
    p.add_argument("--device", default="cpu", help="cpu or cuda")

    p = sub.add_parser("run", help="meta-train, meta-test and fine-tune for one config", **recipe)
    p.set_defaults(func=cmd_run)
    _add_config_flags(p)

    p = sub.add_parser(
        "compare", help="train several algorithms on the same stream, test on identical episodes", **recipe
    )
    p.set_defaults(func=cmd_compare)
    _add_config_flags(p)
    p.add_argument("--algos", default="maml,reptile", help="comma-separated algorithms (default: maml,reptile)")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="leave out the centroid row (frozen features + nearest class mean) that every table gets",
    )

    p = sub.add_parser("datasets", help="list datasets, where each expects its files, and verify them")
    p.set_defaults(func=cmd_datasets)
    p.add_argument("--data-root", help="data root (default: $METAFUSION_DATA)")
    return parser


def config_from_args(args: argparse.Namespace, extra: list[str]):
    from .config import load_config
    from .errors import ConfigError

    overrides: dict[str, Any] = {}
    for flag, (key, _) in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if args.encoder:
        overrides["model.encoders"] = ",".join(args.encoder)
    for item in list(args.set) + extra:
        if "=" not in item:
            raise ConfigError(f"unrecognised argument {item!r}: expected a flag or KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    try:
        import_plugins()  # before the parser, whose help lists what the registries hold
    except InputError as e:
        print(f"metafusion: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown or (extra and args.command not in ("meta-train", "run", "compare")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")

    from .engine import TrainingStopped

    show_input_warnings(args.command)
    try:
        from .engine import distributed

        if distributed.launched_by_torchrun() and args.command != "meta-train":
            raise InputError(
                f"under torchrun only meta-train runs data-parallel; run '{args.command}' as a single "
                f"process (e.g. meta-test the run folder afterwards)"
            )
        return args.func(args, extra)
    except InputError as e:  # the project's own error for bad input (config, data, files, run folders)
        print(f"metafusion {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # SIGINT/SIGTERM during meta-training: last.pt written
        print(f"metafusion {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"metafusion {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): nothing left to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (so the interpreter's final flush stays quiet)
        return 0
    except Exception as e:
        if isinstance(e, OSError) and e.filename is not None:  # the system refused a file: permissions, full disk
            print(f"metafusion {args.command}: error: {e.filename}: {e.strerror}", file=sys.stderr)
            return 2
        import traceback  # not an input problem: a bug, shown with its traceback

        traceback.print_exc()
        print(
            f"metafusion {args.command}: internal error (a bug in metafusion, not in your input). Please report "
            f"it with the command and the traceback above: {BUG_REPORTS}",
            file=sys.stderr,
        )
        return 1


def show_input_warnings(command: str) -> None:
    """Print each InputWarning as one line on stderr (Python's default adds the source line)."""
    import warnings

    from .errors import InputWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, InputWarning):
            print(f"metafusion {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", InputWarning)


def import_plugins() -> None:
    """Import the modules named in $METAFUSION_PLUGINS (comma-separated), so that the datasets,
    encoders, fusions and algorithms they register are known to every command (docs/extending.md)."""
    import importlib

    for name in filter(None, (n.strip() for n in os.environ.get("METAFUSION_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise InputError(f"METAFUSION_PLUGINS names {name!r}, which cannot be imported: {e}") from None
        except Exception as e:  # the plugin's own code failed: its bug, not metafusion's
            raise InputError(
                f"plugin {name!r} (METAFUSION_PLUGINS) failed while importing: {type(e).__name__}: {e}; fix the "
                f"plugin or remove it from METAFUSION_PLUGINS"
            ) from None


# -- one handler per command (build_parser registers each with set_defaults(func=...)) -----------------
def cmd_datasets(args: argparse.Namespace, extra: list[str]) -> int:
    from .data.verify import describe_datasets

    print(describe_datasets(args.data_root))
    return 0


def cmd_meta_test(args: argparse.Namespace, extra: list[str]) -> int:
    from .engine import report, stages

    if not (args.run or args.checkpoint):
        raise InputError("meta-test needs --run RUN or --checkpoint PATH")
    run = args.run or str(Path(args.checkpoint).parent)
    r = stages.stage_meta_test(
        run,
        checkpoint=args.checkpoint,
        episodes=args.episodes,
        protocol=_protocol(args),
        quiet=args.quiet,
        tune=args.tune,
    )
    stem = r["stem"]
    print(report.results_summary(r) + f"\nresults written to {run}/{stem}.json and {stem}.md")
    return 0


def cmd_fine_tune(args: argparse.Namespace, extra: list[str]) -> int:
    from .engine import report, stages

    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be >= 1 (adaptation steps), got {args.steps}")
    r = stages.stage_fine_tune(
        args.run,
        seed=args.seed,
        steps=args.steps,
        task=args.task,
        quiet=args.quiet,
        out=args.out,
        overwrite=args.overwrite,
        tune=args.tune,
    )
    print(report.fine_tune_summary(r, args.task))
    return 0


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> int:
    from .engine import report, stages
    from .engine.predictor import PREDICT_PROTOCOL

    pred, out = stages.stage_predict(
        args.model,
        args.data,
        args.out,
        force=args.force,
        protocol=_protocol(args) or PREDICT_PROTOCOL,
        skip_unreadable=args.skip_unreadable,
        device=args.device,
    )
    print(report.prediction_summary(pred, out))
    return 0


def cmd_meta_train(args: argparse.Namespace, extra: list[str]) -> int:
    from .engine import distributed, report, stages

    if args.resume:
        ignored = [f"--{f.replace('_', '-')}" for f in FLAGS if f != "iterations" and getattr(args, f) is not None]
        ignored += ["--encoder"] * bool(args.encoder) + ["--set"] * bool(args.set or extra)
        ignored += [f"--{f}" for f in ("config", "out", "overwrite") if getattr(args, f)]
        if ignored:
            raise InputError(
                f"--resume continues the run with its own config ({args.resume}/config.yaml); {', '.join(ignored)} "
                f"would not apply: drop {'them' if len(ignored) > 1 else 'it'} (--iterations may lengthen the run)"
            )
        exp, train, run_dir = stages.stage_meta_train(
            None, args.resume, resume=True, quiet=args.quiet, iterations=args.iterations
        )
    else:
        cfg = config_from_args(args, extra)
        out = args.out or f"runs/{cfg.algo.name}"
        exp, train, run_dir = stages.stage_meta_train(cfg, out, overwrite=args.overwrite, quiet=args.quiet)
    main_rank = distributed.current().main
    distributed.shutdown()
    if main_rank:
        print(report.meta_train_summary(exp.cfg.algo.name, train, run_dir))
    return 0


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    from .engine import report, stages

    cfg = config_from_args(args, extra)
    out = args.out or f"runs/{cfg.algo.name}"
    r = stages.stage_run(cfg, out, overwrite=args.overwrite, quiet=args.quiet)
    print(report.results_summary(r))
    print(f"fine-tune: query accuracy {100 * r['finetune']['query_accuracy']:.2f} %; run folder: {out}")
    return 0


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> int:
    from .algorithms import ALGORITHMS
    from .engine import stages

    cfg = config_from_args(args, extra)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    if not algos:
        raise InputError(f"--algos {args.algos!r} names no algorithm; e.g. --algos maml,reptile")
    twice = sorted({a for a in algos if algos.count(a) > 1})
    if twice:
        raise InputError(f"--algos names {', '.join(twice)} twice; name each algorithm once")
    bad = [a for a in algos if a not in ALGORITHMS.names()]
    if bad:
        raise InputError(f"unknown algorithm {', '.join(bad)}; valid: {', '.join(ALGORITHMS.names())}")
    out = args.out or "runs/compare"
    rows, table = stages.stage_compare(
        cfg, algos, out, overwrite=args.overwrite, quiet=args.quiet, baseline=not args.no_baseline
    )
    print(f"\n{table}\nwritten to {out}/compare.md and compare.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
