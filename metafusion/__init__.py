from .errors import InputError, MissingFileError  # the errors a caller may want to catch
from .version import __version__


def load(path, device: str = "cpu"):
    """The adapted model ``metafusion fine-tune`` saved (``RUN/finetune/model.pt``, or the run folder):
    a ``Predictor`` with ``predict(dataset)`` and ``predict_files(folder_or_manifest)``."""
    from .engine.predictor import Predictor

    return Predictor.load(path, device)


def fine_tune(run, task: str = "heldout", *, seed: int = 0, steps: int | None = None, out=None, overwrite=False):
    """Adapt the meta-trained model of run folder ``run`` to ``task`` (a folder or manifest of labelled
    samples: ``data.shots`` per class are the support set, the rest queries; or ``"heldout"``), save it
    as ``out/model.pt`` (default ``run/finetune/model.pt``; an earlier one there is kept unless
    ``overwrite``) and return it loaded (``load``)."""
    from .engine.stages import stage_fine_tune

    result = stage_fine_tune(run, seed=seed, steps=steps, task=str(task), quiet=True, out=out, overwrite=overwrite)
    return load(result["model"])


__all__ = ["InputError", "MissingFileError", "__version__", "fine_tune", "load"]
