"""InputFormat: what a model's raw inputs look like, so a user's files can be read into the same shapes
without the data the model was trained on (it travels in checkpoints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .dataset import MultimodalDataset

TEXT_LENGTH = 32  # token ids per text when nothing says otherwise


@dataclass
class InputFormat:
    """Per modality, the shape of one raw sample (``image`` ``[C, S, S]``, ``video`` ``[T, C, S, S]``,
    ``audio`` ``[1, L]``, ...);
    for text, the number of token ids and the vocabulary that maps words to them."""

    modalities: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every modality but text
    text_length: int = TEXT_LENGTH
    vocabulary: list[str] | None = None
    sample_rate: int = 8000
    frame_rate: float | None = None  # video frames per second sampled from a clip's start (None: spread over it)

    @staticmethod
    def of(dataset: MultimodalDataset) -> InputFormat:
        """The format of ``dataset``'s samples. Text held as frozen-encoder features (floats) is read
        from strings again, so only token ids fix a text length."""
        text = dataset.data.get("text")
        return InputFormat(
            tuple(dataset.modalities),
            {m: tuple(dataset.data[m].shape[1:]) for m in dataset.modalities if m != "text"},
            text.shape[-1] if text is not None and not text.is_floating_point() else TEXT_LENGTH,
            dataset.metadata.get("vocabulary"),
            dataset.metadata.get("sample_rate", 8000),
            dataset.metadata.get("frame_rate"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> InputFormat:
        return InputFormat(
            tuple(d["modalities"]),
            {m: tuple(s) for m, s in d["shapes"].items()},
            d["text_length"],
            d["vocabulary"],
            d["sample_rate"],
            d.get("frame_rate"),  # absent from checkpoints written before video
        )
