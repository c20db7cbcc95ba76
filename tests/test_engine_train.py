"""The meta-train loop's own behaviour: automatic validation that stays a small share of the run, the
run's progress handed to the algorithm."""

import json

from metafusion.config import load_config
from metafusion.engine import build_experiment, meta_train
from metafusion.engine.train import MIN_VAL_EPISODES, ValidationPlan, choose_validation


def test_cheap_validation_runs_ten_times_on_every_episode():
    # 1000 steps of 1 s; 100 episodes of 0.01 s: 1 s a validation, 100 s allowed -> capped at 10.
    assert choose_validation(1000, 1.0, 0.01, 100, 0.1) == ValidationPlan(100, 100, auto=True)


def test_validation_that_fits_a_few_times_runs_that_often():
    # 1000 s of training, 100 s allowed, 25 s a validation -> 4 validations, every 250 steps.
    assert choose_validation(1000, 1.0, 0.25, 100, 0.1) == ValidationPlan(250, 100, auto=True)


def test_expensive_validation_runs_once_at_the_end_on_fewer_episodes():
    # The case: 20 Reptile steps of 0.7 s, validation episodes of 1.25 s (100 would take 125 s).
    plan = choose_validation(20, 0.7, 1.25, 100, 0.1)
    assert plan == ValidationPlan(20, MIN_VAL_EPISODES, auto=True)
    # 200 s of training allow 20 s: 40 episodes of 0.5 s, once.
    assert choose_validation(20, 10.0, 0.5, 100, 0.1) == ValidationPlan(20, 40, auto=True)


def test_a_run_with_automatic_validation_validates_at_its_end(tmp_path, small_synthetic):
    cfg = load_config(
        None,
        {
            "algo.name": "reptile",
            "model.width": 8,
            "model.hidden": 8,
            "data.queries": 2,
            "data.val_episodes": 30,
            "train.iterations": 7,
            "train.meta_batch": 2,
        },
    )
    assert cfg.train.val_interval == 0  # automatic by default
    exp = build_experiment(cfg, small_synthetic.select_modalities(["tabular", "text"]))
    result = meta_train(exp, tmp_path, quiet=True)
    plan = ValidationPlan(**result["validation"])
    assert plan.auto and MIN_VAL_EPISODES <= plan.episodes <= 30 and 1 <= plan.interval <= 7
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validated = [r["step"] for r in records if "val_accuracy" in r]
    assert validated[-1] == 7 and all(s % plan.interval == 0 or s == 7 for s in validated)
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()


def test_maml_meta_trains_first_order_for_the_warmup_share_of_the_run(tmp_path, small_synthetic):
    settings = {"algo.name": "maml", "algo.first_order_warmup": 0.5, "model.width": 8, "model.hidden": 8}
    cfg = load_config(None, {**settings, "data.queries": 2, "train.iterations": 4, "train.val_interval": 4})
    exp = build_experiment(cfg, small_synthetic.select_modalities(["tabular", "text"]))
    algo, first_order = exp.algorithm, []
    backward = algo.meta_backward

    def spy(tasks):
        first_order.append(algo.first_order_now)
        return backward(tasks)

    algo.meta_backward = spy
    meta_train(exp, tmp_path, quiet=True)
    assert first_order == [True, True, False, False]  # progress 0, 1/4 | 2/4, 3/4
