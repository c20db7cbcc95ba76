"""Shared fixtures: small synthetic data, tiny models, and the real data root (skips only where absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from metafusion.data import make_synthetic
from metafusion.models import ModelSpec, build_model

REPO = Path(__file__).resolve().parents[1]

# Two threads for the 2-core machines CI runs on; one per worker where pytest-xdist runs two workers.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _threads_restored():
    """Commands and benchmark scripts run in this process set torch's thread count as a process of their own
    would (``--threads``, a benchmark's one thread); the next test gets the suite's count back, so two workers
    never oversubscribe the cores."""
    yield
    torch.set_num_threads(THREADS)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """``rows`` (column -> value) as a CSV manifest at ``path``."""
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def real_data_root() -> Path | None:
    """$METAFUSION_DATA, else ../shared/data beside the repository (where CI has it)."""
    env = os.environ.get("METAFUSION_DATA")
    if env:
        return Path(env)
    shared = REPO.parent / "shared" / "data"
    return shared if shared.is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = real_data_root()
    if root is None or not root.is_dir():
        pytest.skip("real data absent: set METAFUSION_DATA (or place ../shared/data beside the repo)")
    return root


@pytest.fixture(scope="session")
def small_synthetic():
    """40 classes x 20 samples, all four modalities (train/val/test = 24/8/8 classes)."""
    return make_synthetic(num_classes=40, samples_per_class=20, seed=0)


def tabular_spec(features: int = 4, modalities: int = 2) -> ModelSpec:
    return ModelSpec({f"tab{i}": (features,) for i in range(modalities)})


def tiny_tabular_model(
    ways: int = 3, fusion: str = "attention", width: int = 4, hidden: int = 5, modalities: int = 2, dtype=torch.float64
):
    """A tiny two-modality MLP + fusion model (float64) for gradient reference tests."""
    spec = tabular_spec(modalities=modalities)
    model = build_model(
        spec, ways, width=width, hidden=hidden, fusion=fusion, encoders={m: "mlp" for m in spec.input_shapes}
    )
    return model.to(dtype)


def tiny_episode(
    ways: int = 3, shots: int = 2, queries: int = 3, modalities: int = 2, seed: int = 0, dtype=torch.float64
):
    """A random, separable-ish tabular episode with every modality present."""
    from metafusion.data import Batch, Episode

    g = torch.Generator().manual_seed(seed)
    names = tuple(f"tab{i}" for i in range(modalities))
    centres = torch.randn(ways, 4, generator=g, dtype=dtype) * 2

    def batch(k):
        labels = torch.arange(ways).repeat_interleave(k)
        inputs = {m: centres[labels] + 0.3 * torch.randn(len(labels), 4, generator=g, dtype=dtype) for m in names}
        return Batch(inputs, torch.ones(len(labels), modalities, dtype=torch.bool), labels, names)

    return Episode(batch(shots), batch(queries), ways, shots, queries, tuple(range(ways)))
