"""Real datasets (Omniglot images + strokes, FSDD) against the data under METAFUSION_DATA, and
bring-your-own data from the tiny example in tests/data."""

from pathlib import Path

import numpy as np
import pytest
import torch

from metafusion.data import DataError, EpisodeSampler
from metafusion.data.manifest import load_user_data
from metafusion.data.omniglot import encode_strokes, omniglot, omniglot_strokes, parse_strokes, render_drawing
from metafusion.errors import InputWarning

HERE = Path(__file__).parent / "data"


@pytest.mark.data
def test_omniglot_counts_match_upstream(data_root):
    ds = omniglot(data_root)
    names = ds.metadata["class_names"]
    assert sum(n.startswith("background/") for n in names) == 964
    assert sum(n.startswith("evaluation/") for n in names) == 659
    assert set(ds.class_counts().values()) == {20}  # 20 drawers per character
    assert ds.data["image"].shape == (32460, 1, 28, 28)
    assert 0.0 <= ds.data["image"].min() and ds.data["image"].max() <= 1.0
    assert ds.data["image"].mean() < 0.3  # inverted: ink is 1 on a 0 background
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 1100, "val": 100, "test": 423}


@pytest.mark.slow
@pytest.mark.data
def test_omniglot_rotations_and_lake_split(data_root):
    rot = omniglot(data_root, rotations=True)
    assert {k: len(v) for k, v in rot.splits.items()} == {"train": 4400, "val": 400, "test": 1692}
    c = rot.splits["train"][0]
    a = rot.data["image"][rot.targets == c][0]
    b = rot.data["image"][rot.targets == c + 1623][0]
    assert torch.equal(torch.rot90(a, 1, dims=(1, 2)), b)
    lake = omniglot(data_root, split="background")
    assert len(lake.splits["test"]) == 659 and len(lake.splits["train"]) + len(lake.splits["val"]) == 964


def test_stroke_parsing_and_encoding():
    text = "START\n0,0,0\n10,0,10\nBREAK\n0,-10,20\n0,-20,30\nBREAK\n"
    strokes = parse_strokes(text)
    assert len(strokes) == 2 and strokes[0].shape == (2, 3)
    enc = encode_strokes(strokes, length=5, image_width=100)
    # 20 px of ink in two 10 px strokes, 5 points evenly spaced along it: 0, 5, 10 | 15, 20 -> y = -raw y
    pts = np.cumsum(enc[:, :2].numpy() * 100, axis=0) + 50
    assert np.allclose(pts, [[0, 0], [5, 0], [10, 0], [0, 15], [0, 20]], atol=1e-5)
    assert enc[:, 2].tolist() == [0, 0, 1, 0, 1]  # pen lifts after the end of each stroke


@pytest.mark.data
def test_omniglot_image_and_strokes_dataset(data_root):
    ds = omniglot_strokes(data_root)
    assert ds.modalities == ("image", "strokes")
    assert len(ds.class_counts()) == 242 and len(ds) == 4840  # 8 background alphabets
    assert ds.data["strokes"].shape == (4840, 64, 3)
    assert set(ds.data["strokes"][:, :, 2].unique().tolist()) == {0.0, 1.0}
    assert (ds.data["strokes"][:, -1, 2] == 1).all()
    alphabets = {n.split("/")[1] for n in ds.metadata["class_names"]}
    assert alphabets == {
        "Balinese",
        "Early_Aramaic",
        "Greek",
        "Korean",
        "Latin",
        "Japanese_(katakana)",
        "Sanskrit",
        "Tagalog",
    }
    ep = EpisodeSampler(ds, "test", 5, 1, 5, seed=0).sample()
    assert ep.query.inputs["strokes"].shape == (25, 64, 3)


def test_a_drawing_video_shows_the_ink_laid_down_by_each_frames_time():
    # an 'L': a stroke down over 0-100 ms, a pause, a stroke right over 300-400 ms
    strokes = parse_strokes("START\n20,-20,0\n20,-80,100\nBREAK\n20,-80,300\n80,-80,400\nBREAK\n")
    video = render_drawing(strokes, frames=4, size=105).astype(float) / 255  # frames at 100, 200, 300, 400 ms
    vertical, horizontal = video[:, 0, 30:70, 18:23].mean((1, 2)), video[:, 0, 78:83, 40:75].mean((1, 2))
    assert (vertical > 0.9).all()  # drawn by the first frame's time
    assert (horizontal[:2] < 0.05).all() and horizontal[3] > 0.9  # the pause repeats frames; then the stroke
    assert (np.diff(video.reshape(4, -1), axis=0) >= 0).all()  # ink is never taken away


@pytest.mark.slow
@pytest.mark.data
def test_omniglot_drawing_videos_end_in_the_character_and_shuffle_per_sample(data_root):
    ds = omniglot_strokes(data_root, video_frames=4)
    assert ds.modalities == ("image", "strokes", "video") and ds.data["video"].shape == (4840, 4, 1, 28, 28)
    last, image = ds.data["video"][:, -1].flatten(1), ds.data["image"].flatten(1)
    agreement = torch.nn.functional.cosine_similarity(last - last.mean(), image - image.mean(), dim=1)
    assert agreement.mean() > 0.9  # the last frame is the drawing the image shows (rendered, not the PNG)
    shuffled = omniglot_strokes(data_root, video_frames=4, frame_order="shuffled").data["video"]
    assert torch.equal(shuffled.sort(1).values, ds.data["video"].sort(1).values)
    assert not torch.equal(shuffled, ds.data["video"])


@pytest.mark.data
def test_fsdd_loads(data_root):
    from metafusion.data.fsdd import fsdd

    ds = fsdd(data_root)
    assert ds.data["audio"].shape == (3000, 1, 8000)
    assert len(ds.class_counts()) == 60 and set(ds.class_counts().values()) == {50}
    assert sorted(set(ds.metadata["speakers"])) == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    test_speakers = {ds.metadata["speakers"][i] for i in ds.rows_of_classes(ds.splits["test"]).tolist()}
    train_speakers = {ds.metadata["speakers"][i] for i in ds.rows_of_classes(ds.splits["train"]).tolist()}
    assert test_speakers == {"yweweler"} and not test_speakers & train_speakers
    assert fsdd(data_root, label="digit").targets.max() == 9


def test_folder_layout_with_a_missing_file():
    ds = load_user_data(HERE / "tiny_folder")
    assert ds.modalities == ("image", "text", "tabular")
    assert ds.metadata["class_names"] == ["bird", "cat", "dog", "fish", "frog", "horse", "mouse", "owl"]
    assert ds.data["image"].shape == (24, 1, 28, 28) and ds.data["tabular"].shape == (24, 4)
    assert ds.present.sum() == 24 * 3 - 1  # frog2.png is missing -> image masked for that sample
    frog2 = 14
    assert not ds.present[frog2, 0] and (ds.data["image"][frog2] == 0).all()
    assert "meow" in ds.metadata["vocabulary"]


def test_manifest_with_inline_text_matches_folder():
    ds = load_user_data(HERE / "tiny_manifest.csv")
    assert ds.modalities == ("image", "text", "tabular")
    assert len(ds) == 24 and ds.present[:, 0].sum() == 23
    assert ds.metadata["texts"][0] == "inline meow purr whiskers"


def test_corrupt_file_is_named_or_skipped(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not a png")
    (tmp_path / "a" / "x.txt").write_text("hello")
    (tmp_path / "a" / "y.txt").write_text("world")
    (tmp_path / "a" / "y.png").write_bytes((HERE / "tiny_folder" / "cat" / "cat0.png").read_bytes())
    with pytest.raises(DataError, match=r"cannot read .*x\.png as an image"):
        load_user_data(tmp_path)
    with pytest.warns(InputWarning, match="skipped 1 unreadable files"):
        ds = load_user_data(tmp_path, skip_errors=True)
    assert ds.metadata["skipped"] == 1 and not ds.present[0, 0]


def test_bad_manifest_errors(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("class,image\nx,y.png\n")
    with pytest.raises(DataError, match="needs a 'label' column"):
        load_user_data(bad)
    with pytest.raises(DataError, match="no such manifest or folder"):
        load_user_data(tmp_path / "nothing")


def test_decoded_data_is_cached_once_and_rekeyed_when_a_source_changes(tmp_path, monkeypatch):
    import os

    from metafusion.data.cache import cached, files_key

    monkeypatch.setenv("METAFUSION_CACHE", str(tmp_path / "cache"))
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(3)}

    first, second = cached("kind/a.pt", build), cached("kind/a.pt", build)
    assert len(calls) == 1 and torch.equal(first["x"], second["x"])
    assert [p.name for p in (tmp_path / "cache" / "kind").iterdir()] == ["a.pt"]  # no temporary left behind
    src = tmp_path / "rec.wav"
    src.write_bytes(b"1234")
    key = files_key([src])
    src.write_bytes(b"12345")
    os.utime(src, (1, 1))
    assert files_key([src]) != key and files_key([src], 8000) != files_key([src])


def test_an_empty_or_header_only_wav_is_no_recording(tmp_path):
    import soundfile

    from metafusion.data.fsdd import read_wav

    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 8000)
    with pytest.raises(DataError, match="empty.wav holds no audio samples"):
        read_wav(tmp_path / "empty.wav", 8000)


def test_a_class_whose_files_sit_in_a_subfolder_is_named_not_dropped_silently(tmp_path):
    import shutil

    for c in ("cat", "dog"):
        shutil.copytree(HERE / "tiny_folder" / c, tmp_path / c)
    shutil.copytree(HERE / "tiny_folder" / "frog", tmp_path / "frog" / "photos")  # one level too deep
    with pytest.warns(InputWarning, match="class 'frog' has no sample files, only subfolders \\(photos\\)"):
        ds = load_user_data(tmp_path)
    assert ds.metadata["class_names"] == ["cat", "dog"]


def test_exif_orientation_is_applied_and_float_images_on_a_0_255_scale_are_not_white():
    import io

    from PIL import Image

    from metafusion.data.images import read_image

    pixels = np.zeros((20, 40), np.uint8)
    pixels[:5, :5] = 255  # a white block at the top left of a landscape photo
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: viewers rotate it 90 degrees clockwise
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, "JPEG", exif=exif.tobytes())
    upright = read_image(jpeg.getvalue(), 1, 8)[0]
    assert upright[0, -1] > 0.8 and upright[0, 0] < 0.1  # the block is at the top right, as viewers show it
    tiff = io.BytesIO()
    Image.fromarray(np.full((8, 8), 127.5, np.float32), mode="F").save(tiff, "TIFF")
    assert read_image(tiff.getvalue(), 1, 4) == pytest.approx(0.5)
