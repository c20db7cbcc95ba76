"""docs/extending.md's promise: a new dataset, encoder, fusion or algorithm is one definition plus its
registration line, options of its own included. Here all four are defined in this file alone, take
options from the command line and go through every stage."""

import copy
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import metafusion
from metafusion.algorithms import ALGORITHMS, MetaAlgorithm
from metafusion.algorithms.base import TaskTally
from metafusion.cli import main
from metafusion.config import DataConfig
from metafusion.data import DATASETS, MultimodalDataset, split_classes
from metafusion.models import FUSIONS
from metafusion.models.encoders import ENCODERS, Encoder
from metafusion.models.fusion import Fusion


@pytest.fixture
def registries(monkeypatch):
    """Registrations made by a test vanish after it (so registry-wide tests elsewhere never see them)."""
    for registry in (DATASETS, ENCODERS, FUSIONS, ALGORITHMS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_info", dict(registry._info))


@dataclass
class ToySignalsOptions:
    per_class: int = 10  # samples per class


@dataclass
class ZeroStepOptions:
    test_momentum: float = 0.0  # momentum of the test-time SGD


def register_toys() -> None:
    @DATASETS.register("toy-signals", options=ToySignalsOptions, expects="(generated; no files)")
    def toy_signals(cfg: DataConfig, opts: ToySignalsOptions) -> MultimodalDataset:
        """12 classes of ``per_class`` samples: a 6-number 'signal' and a 16-number 'tabular' vector each."""
        g, n = torch.Generator().manual_seed(cfg.data_seed), 12 * opts.per_class
        targets = torch.arange(12).repeat_interleave(opts.per_class)
        signal = torch.randn(12, 6, generator=g)[targets] + 0.3 * torch.randn(n, 6, generator=g)
        tabular = torch.randn(12, 16, generator=g)[targets] + 0.3 * torch.randn(n, 16, generator=g)
        splits = split_classes(list(range(12)), (0.5, 0.25, 0.25), cfg.data_seed)
        present = torch.ones(n, 2, dtype=torch.bool)
        return MultimodalDataset(
            {"signal": signal, "tabular": tabular}, present, targets, ("signal", "tabular"), splits
        )

    @ENCODERS.register("toy-linear")
    class ToyLinear(Encoder):
        def __init__(self, out_dim: int, hidden: int = 64, input_shape: tuple[int, ...] = (6,)):
            super().__init__()
            self.linear, self.out_dim = nn.Linear(input_shape[-1], out_dim), out_dim

        def forward(self, x):
            return torch.relu(self.linear(x))

    @FUSIONS.register("toy-max")
    class MaxFusion(Fusion):
        """Element-wise maximum over the present modalities (no weights)."""

        def __init__(self, num_modalities: int, dim: int):
            super().__init__()
            self.out_dim = dim

        def forward(self, h, mask):
            return h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1), None

    @ALGORITHMS.register("toy-zero-step")
    class ZeroStep(MetaAlgorithm):
        """Meta-trains the query loss without an inner loop; adapts a copy with SGD at test time."""

        name = "toy-zero-step"
        defaults = dict(inner_lr=0.1, inner_steps=0, inner_steps_test=5, meta_batch=4, meta_lr=1e-2)
        defaults.update(optimizer="adam", schedule="constant")
        Options = ZeroStepOptions

        def meta_backward(self, tasks):
            tally = TaskTally()
            for task in tasks:
                logits = self.model(task.query)
                loss = F.cross_entropy(logits, task.query.labels)
                (loss / len(tasks)).backward()
                tally.add(loss.item(), logits.detach(), task.query.labels)
            return tally.metrics()

        def adapt(self, support, steps=None):
            learner = copy.deepcopy(self.model)
            opt = torch.optim.SGD(learner.parameters(), lr=self.inner_lr_test, momentum=self.options.test_momentum)
            with torch.enable_grad():
                for _ in range(self.inner_steps_test if steps is None else steps):
                    opt.zero_grad()
                    F.cross_entropy(learner(support), support.labels).backward()
                    opt.step()
            return learner


@pytest.mark.slow
def test_a_dataset_encoder_fusion_and_algorithm_defined_in_one_file_run_every_stage(tmp_path, registries, capsys):
    register_toys()
    run = tmp_path / "run"
    common = ["--dataset", "toy-signals", "--encoder", "signal=toy-linear", "--fusion", "toy-max", "--ways", "3"]
    args = [*common, "--algo", "toy-zero-step", "--iterations", "30", "--queries", "3", "--quiet"]
    options = ["--set", "data.per_class=14", "--set", "algo.test_momentum=0.5"]  # each component's own
    assert (
        main(["meta-train", *args, *options, "--set", "data.val_episodes=5", "--episodes", "20", "--out", str(run)])
        == 0
    )
    assert main(["meta-test", "--run", str(run), "--quiet"]) == 0
    assert main(["fine-tune", "--run", str(run)]) == 0
    assert main(["datasets"]) == 0 and "toy-signals" in capsys.readouterr().out

    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == "toy-zero-step" and results["episodes"] == 20
    assert results["accuracy_mean"] > 0.6  # learning happens (chance: 1/3)
    model = metafusion.load(run)  # the adapted model rebuilds from the registered names alone
    assert isinstance(model.trained.model.fusion, FUSIONS.get("toy-max"))
    assert type(model.trained.model.encoders["signal"]).__name__ == "ToyLinear"
    assert model.algorithm.options.test_momentum == 0.5  # the option reached the algorithm, and travels with the model
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["per_class"] == 14 and saved["algo"]["test_momentum"] == 0.5
    assert len(exp_dataset(saved)) == 12 * 14


def exp_dataset(saved: dict):
    from metafusion.config import from_dict
    from metafusion.engine.build import raw_dataset

    return raw_dataset(from_dict(saved))


def test_a_components_unknown_option_lists_the_valid_ones(tmp_path, registries, capsys):
    register_toys()
    args = ["--dataset", "toy-signals", "--encoder", "signal=toy-linear", "--algo", "toy-zero-step"]
    assert main(["meta-train", *args, "--set", "algo.test_momentun=0.5", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'algo.test_momentun' for algorithm toy-zero-step" in err and "algo.test_momentum" in err
    assert main(["meta-train", *args, "--set", "data.per_class=many", "--out", str(tmp_path / "r")]) == 2
    assert "data.per_class: expected an integer, got 'many'" in capsys.readouterr().err


def test_an_algorithm_rejects_arguments_it_does_not_take():
    from conftest import tiny_tabular_model

    with pytest.raises(TypeError, match="unexpected keyword argument 'inner_batch'"):
        ALGORITHMS.build(
            "maml",
            tiny_tabular_model(),
            inner_lr=0.1,
            inner_steps=1,
            inner_lr_test=0.1,
            inner_steps_test=1,
            inner_batch=4,
        )


def test_plugins_named_in_the_environment_register_before_the_command_runs(tmp_path, registries, monkeypatch):
    (tmp_path / "my_fusions.py").write_text(
        "from metafusion.models import FUSIONS\n"
        "from metafusion.models.fusion import ConcatFusion\n"
        "FUSIONS.register('plugged-concat')(type('PluggedConcat', (ConcatFusion,), {}))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("METAFUSION_PLUGINS", "my_fusions")
    tiny = ["--set", "data.num_classes=30", "--set", "data.samples_per_class=4", "--queries", "1", "--quiet"]
    args = [*tiny, "--modalities", "tabular,text", "--fusion", "plugged-concat", "--iterations", "1"]
    assert main(["meta-train", *args, "--set", "data.val_episodes=1", "--out", str(tmp_path / "run")]) == 0
    monkeypatch.setenv("METAFUSION_PLUGINS", "no_such_module")
    assert main(["meta-train", *args, "--out", str(tmp_path / "other")]) == 2
