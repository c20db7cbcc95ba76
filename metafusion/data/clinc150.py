"""CLINC150 (Larson et al., EMNLP 2019, CC BY 3.0): 150 intents in 10 domains; a text-only few-shot set.

Reads ``data_full.json`` (``[text, intent]`` pairs under ``train``, ``val``, ``test``) and
``domains.json`` (domain -> intents) under ``root`` or ``root/clinc150``. The three lists are pooled per
intent (150 utterances each); out-of-scope utterances (``oos_*``) are not a class and are left out.

Class splits, both over intents (never over utterances):
- ``protocol``: the 150 intents shuffled with ``seed`` and cut 60/20/20 (90/30/30 intents);
- ``cross-domain``: the 10 domains shuffled with ``seed`` and cut 6/2/2, so meta-test intents come from
  domains never seen in meta-training (e.g. banking and travel intents tested after small talk and
  kitchen ones).

The text modality is token ids (the default ``tokens`` encoder); the utterances themselves are kept in
``metadata["texts"]``, so ``--encoder text=minilm`` replaces them with frozen MiniLM features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..config import DataConfig
from .dataset import DataError, MultimodalDataset, find_data_folder, split_classes
from .manifest import token_ids
from .sources import DATASETS, require_root

SPLITS = ("protocol", "cross-domain")


def find_clinc150(root: str | Path) -> Path:
    return find_data_folder(
        root, "clinc150", "data_full.json", "data_full.json and domains.json (https://github.com/clinc/oos-eval, data/)"
    )


def clinc150(root: str | Path, split: str = "protocol", text_length: int = 32, seed: int = 0) -> MultimodalDataset:
    if split not in SPLITS:
        raise DataError(f"clinc150: data.split={split!r} is not valid; choose one of: {', '.join(SPLITS)}")
    base = find_clinc150(root)
    try:
        lists = json.loads((base / "data_full.json").read_text())
        domains = json.loads((base / "domains.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"clinc150: cannot read {base}: {e}") from None
    pairs = [(text, intent) for part in ("train", "val", "test") for text, intent in lists.get(part, [])]
    names = sorted({intent for _, intent in pairs})
    if not names:
        raise DataError(f"clinc150: {base / 'data_full.json'} has no train/val/test utterances")
    index = {n: i for i, n in enumerate(names)}
    texts = [text for text, _ in pairs]
    ids, vocab = token_ids(texts, text_length)
    domain_of = {intent: d for d, intents in domains.items() for intent in intents}
    unknown = [n for n in names if n not in domain_of]
    if unknown:
        raise DataError(f"clinc150: intents without a domain in domains.json: {', '.join(unknown[:5])}")
    if split == "protocol":
        splits = split_classes(list(range(len(names))), (0.6, 0.2, 0.2), seed)
    else:
        by_domain = split_classes(list(range(len(domains))), (0.6, 0.2, 0.2), seed)
        domain_names = sorted(domains)
        splits = {s: sorted(index[i] for d in ds for i in domains[domain_names[d]]) for s, ds in by_domain.items()}
    metadata = {
        "class_names": names,
        "texts": texts,
        "vocabulary": vocab,
        "domains": [domain_of[n] for n in names],
        "split_domains": {}
        if split == "protocol"
        else {s: sorted({domain_of[names[c]] for c in cs}) for s, cs in splits.items()},
    }
    return MultimodalDataset.of_one_modality(
        "text", ids, torch.tensor([index[i] for _, i in pairs]), splits, metadata, "clinc150"
    )


def check_clinc150(root: Path) -> str:
    data = json.loads((find_clinc150(root) / "data_full.json").read_text())
    return f"ok: {sum(len(data.get(s, [])) for s in ('train', 'val', 'test'))} utterances"


@dataclass
class Clinc150Options:
    # intents shuffled with data_seed, 90/30/30; or cross-domain: the 10 domains, 6/2/2 (test intents come
    # from domains never seen in meta-training)
    split: Literal["protocol", "cross-domain"] = "protocol"


@DATASETS.register(
    "clinc150", options=Clinc150Options, expects="clinc150/data_full.json + clinc150/domains.json", check=check_clinc150
)
def clinc150_dataset(cfg: DataConfig, opts: Clinc150Options) -> MultimodalDataset:
    return clinc150(require_root(cfg, ""), opts.split, seed=cfg.data_seed)
