"""Free Spoken Digit Dataset (Jakobovski et al.): 3,000 8 kHz wavs, 6 speakers x 10 digits x 50 takes.

Wavs are read with ``soundfile`` (torchaudio >= 2.9 routes ``load`` through torchcodec, which is not
a dependency here); torchaudio computes the features inside the audio encoder. Each recording is
trimmed or zero-padded (centred) to ``seconds`` and decoded once, cached as one tensor on disk
(``metafusion.data.cache``).

Labels: ``label="digit"`` (10 classes), or ``label="digit_speaker"`` (default for episodes): one class per
(digit, speaker) pair, 60 classes of 50 takes, split by speaker (4 train / 1 val / 1 test speakers), so
test episodes ask to tell apart the digits of a speaker never seen in meta-training. The digit and
speaker of every row are kept in ``metadata`` either way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import torch

from ..config import DataConfig, NoOptions
from .cache import cached, files_key
from .dataset import DataError, MultimodalDataset
from .sources import DATASETS, require_root

SAMPLE_RATE = 8000
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
SPEAKER_SPLIT = {"train": ("george", "jackson", "lucas", "nicolas"), "val": ("theo",), "test": ("yweweler",)}


def find_recordings(root: str | Path) -> Path:
    root = Path(root)
    for candidate in (root / "fsdd" / "recordings", root / "recordings", root):
        if candidate.is_dir() and any(candidate.glob("*_*_*.wav")):
            return candidate
    raise DataError(f"no FSDD recordings under {root}: expected {root}/fsdd/recordings/<digit>_<speaker>_<n>.wav")


def read_wav(path: Path, length: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A mono recording at ``sample_rate``, trimmed or zero-padded (centred) to ``length`` samples."""
    try:
        wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not len(wave):  # a header without samples is no recording (not a present, silent one)
        raise DataError(f"{path} holds no audio samples (an empty or header-only file)")
    wave = wave.mean(1)
    if rate != sample_rate:  # a recording at another rate, brought to the model's (band-limited resampling)
        import torchaudio

        wave = torchaudio.functional.resample(torch.from_numpy(wave), rate, sample_rate).numpy()
    if len(wave) >= length:
        start = (len(wave) - length) // 2
        return wave[start : start + length]
    out = np.zeros(length, dtype=np.float32)
    start = (length - len(wave)) // 2
    out[start : start + len(wave)] = wave
    return out


def fsdd(root: str | Path, seconds: float = 1.0, label: str = "digit_speaker") -> MultimodalDataset:
    folder = find_recordings(root)
    files = sorted(
        folder.glob("*_*_*.wav"),
        key=lambda p: (int(p.stem.split("_")[0]), p.stem.split("_")[1], int(p.stem.split("_")[2])),
    )
    length = int(seconds * SAMPLE_RATE)
    digits = [int(p.stem.split("_")[0]) for p in files]
    speakers = [p.stem.split("_")[1] for p in files]
    unknown = sorted(set(speakers) - set(SPEAKERS))
    if unknown:
        raise DataError(f"{folder}: unknown speakers {unknown}; expected {SPEAKERS}")
    audio = cached(
        f"fsdd/audio_{length}_{files_key(files)}.pt",
        lambda: torch.from_numpy(np.stack([read_wav(p, length) for p in files]))[:, None],
    )  # (N, 1, T)
    if label == "digit":
        targets = torch.tensor(digits)
        splits = {}
        names = [str(d) for d in range(10)]
    elif label == "digit_speaker":
        targets = torch.tensor([d * len(SPEAKERS) + SPEAKERS.index(s) for d, s in zip(digits, speakers)])
        splits = {
            split: sorted(d * len(SPEAKERS) + SPEAKERS.index(s) for d in range(10) for s in who)
            for split, who in SPEAKER_SPLIT.items()
        }
        names = [f"{d}/{s}" for d in range(10) for s in SPEAKERS]
    else:
        raise DataError(f"unknown FSDD label {label!r}; choose digit or digit_speaker")
    return MultimodalDataset.of_one_modality(
        "audio",
        audio,
        targets,
        splits,
        {"sample_rate": SAMPLE_RATE, "digits": digits, "speakers": speakers, "class_names": names},
        "fsdd",
    )


def check_fsdd(root: Path) -> str:
    n = len(list(find_recordings(root).glob("*_*_*.wav")))
    return f"ok: {n} recordings" + ("" if n == 3000 else " (upstream has 3000)")


@DATASETS.register("fsdd", expects="fsdd/recordings/{digit}_{speaker}_{index}.wav", check=check_fsdd)
def fsdd_dataset(cfg: DataConfig, opts: NoOptions) -> MultimodalDataset:
    return fsdd(require_root(cfg, ""))
