"""The real text (CLINC150) and product (fashion: RGB photo + masked title + attributes) datasets."""

import csv
import zipfile

import pytest
import torch

from metafusion.data import DataError, EpisodeSampler
from metafusion.data.clinc150 import clinc150
from metafusion.data.fashion import attribute_vector, class_words, fashion, mask_title


@pytest.mark.slow
@pytest.mark.data
def test_clinc150_pools_150_utterances_per_intent_and_splits_over_intents(data_root):
    ds = clinc150(data_root)
    assert len(ds.metadata["class_names"]) == 150 and set(ds.class_counts().values()) == {150}
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 90, "val": 30, "test": 30}
    assert ds.data["text"].dtype == torch.long and len(ds.metadata["texts"]) == len(ds) == 22500
    assert "oos" not in ds.metadata["class_names"]  # out-of-scope utterances are not a class
    again = clinc150(data_root)
    assert again.splits == ds.splits and clinc150(data_root, seed=1).splits != ds.splits


@pytest.mark.data
def test_clinc150_cross_domain_split_tests_on_unseen_domains(data_root):
    ds = clinc150(data_root, split="cross-domain")
    domains = {s: {ds.metadata["domains"][c] for c in cs} for s, cs in ds.splits.items()}
    assert [len(domains[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert not (domains["train"] & domains["test"]) and not (domains["train"] & domains["val"])
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 90, "val": 30, "test": 30}
    with pytest.raises(DataError, match="cross-domain"):
        clinc150(data_root, split="background")


def test_title_masking_removes_every_class_names_words_in_any_number():
    words = class_words(["Tshirts", "Casual Shoes", "Watches", "Dresses", "Sunglasses", "Track Pants"])
    assert mask_title("Puma Men Grey T-Shirt", words) == "Puma Men Grey"
    assert mask_title("Titan Women Silver Watch", words) == "Titan Women Silver"
    assert mask_title("Nike Men Casual Shoe", words) == "Nike Men"
    assert mask_title("Fastrack Unisex Sunglasses", words) == "Fastrack Unisex"
    assert mask_title("Gini and Jony Girls Pink Dress", words) == "Gini and Jony Girls Pink"
    assert mask_title("Adidas Black Track Pant", words) == "Adidas Black"
    assert mask_title("Puma Shirt", words) == "Puma Shirt"  # 'shirt' is no class word here ('tshirt' is)


def test_attributes_are_one_hot_with_empty_cells_all_zero():
    rows = [
        {"gender": "Men", "baseColour": "Blue", "season": "", "usage": "Casual", "year": "2012"},
        {"gender": "Women", "baseColour": "Blue", "season": "Fall", "usage": "Casual", "year": ""},
    ]
    x, names = attribute_vector(rows)
    assert names == ["gender=Men", "gender=Women", "baseColour=Blue", "season=Fall", "usage=Casual", "year=2012"]
    assert x.tolist() == [[1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 1, 0]]


@pytest.fixture(scope="module")
def few_products(data_root, tmp_path_factory):
    """A fashion folder with 6 products of each of 5 article types (one photo left out), from the real files."""
    src = data_root / "fashion"
    if not (src / "styles.csv").is_file():
        pytest.skip(f"fashion data absent under {data_root}")
    with (src / "styles.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    kinds = ["Tshirts", "Watches", "Casual Shoes", "Handbags", "Jeans"]
    chosen = [r for k in kinds for r in [r for r in rows if r["articleType"] == k and r["has_image"] == "1"][:6]]
    out = tmp_path_factory.mktemp("fashion")
    with (out / "styles.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(chosen)
    with zipfile.ZipFile(src / "images.zip") as z, zipfile.ZipFile(out / "images.zip", "w") as w:
        for r in chosen[1:]:  # the first product has no photo here: its image modality is masked
            w.writestr(f"images/{r['id']}.jpg", z.read(f"images/{r['id']}.jpg"))
    return out, chosen


@pytest.mark.data
def test_fashion_products_are_rgb_photo_masked_title_and_attributes(few_products, monkeypatch, tmp_path):
    monkeypatch.setenv("METAFUSION_CACHE", str(tmp_path))
    root, rows = few_products
    ds = fashion(root, image_size=16, min_products=5)
    assert ds.modalities == ("image", "text", "tabular") and len(ds) == 30
    assert ds.data["image"].shape == (30, 3, 16, 16) and 0 <= ds.data["image"].min() <= ds.data["image"].max() <= 1
    colour = ds.data["image"][1:]
    assert (colour[:, 0] - colour[:, 2]).abs().max() > 0.1  # colour survives: the channels differ
    assert ds.present[:, 0].tolist() == [False] + [True] * 29 and ds.present[:, 1:].all()
    leaks = {"tshirt", "watch", "shoe", "handbag", "jean", "casual"}
    for text, row in zip(ds.metadata["texts"], rows):
        words = {w.lower().replace("-", "").rstrip("s") for w in text.split()}
        assert not words & leaks, (text, row["productDisplayName"])
    assert sum(len(t.split()) for t in ds.metadata["texts"]) < sum(len(r["productDisplayName"].split()) for r in rows)
    assert ds.data["tabular"].sum(1).max() <= 5  # one value per attribute at most
    assert len(ds.metadata["class_names"]) == 5
    episode = EpisodeSampler(ds, "train", ways=len(ds.splits["train"]), shots=1, queries=1, seed=0).sample()
    assert episode.support.inputs["image"].shape[1:] == (3, 16, 16)
    with pytest.raises(DataError, match="only 0 article types have 7"):
        fashion(root, image_size=16, min_products=7)


def test_text_in_any_script_tokenises_into_its_words_or_characters():
    from metafusion.data.manifest import token_ids, tokenize

    assert tokenize("Éveillé, it's 42!") == ["éveillé", "it's", "42"]
    assert tokenize("שלום עולם") == ["שלום", "עולם"] and tokenize("Привет мир") == ["привет", "мир"]
    assert tokenize("我喜欢机器学习") == list("我喜欢机器学习")  # no spaces between words: characters
    ids, vocab = token_ids(["שלום עולם", "我喜欢"], 4)
    assert len(vocab) == 6 and (ids > 0).sum() == 5  # every word or character has an id: not chance accuracy
