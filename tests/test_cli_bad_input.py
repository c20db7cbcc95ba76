"""Bad input is bad input: every error caused by the user's files, flags or environment is one line on
stderr and exit 2, naming the file or flag -- never metafusion's internal-error traceback. One case per
kind of input, parametrised; the silently-wrong cases (that used to give a number) are errors or warnings."""

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_manifest
from PIL import Image
from test_cli import TINY, run_cli

from metafusion.data.images import read_image
from metafusion.data.manifest import load_user_data
from metafusion.errors import InputWarning

DATA = Path(__file__).resolve().parent / "data"


def _copy_data(tmp: Path) -> Path:
    shutil.copytree(DATA / "tiny_folder", tmp / "tiny_folder")
    shutil.copy(DATA / "tiny_manifest.csv", tmp / "m.csv")
    return tmp / "m.csv"


def _manifest_run(path: Path) -> list:
    return ["meta-train", "--dataset", "manifest", "--data-root", path, "--ways", "2", "--queries", "1", "--out"]


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def latin1_manifest(t):
    m = _copy_data(t)
    m.write_bytes(m.read_bytes().replace(b"cat,train", "caté,train".encode("latin-1"), 1))
    return [*_manifest_run(m), t / "r"]


def latin1_text_file(t):
    _copy_data(t)
    (t / "tiny_folder" / "cat" / "cat0.txt").write_bytes("miaou, ça".encode("latin-1"))
    return [*_manifest_run(t / "tiny_folder"), t / "r"]


def every_image_path_wrong(t):
    m = _copy_data(t)
    rows = _rows(m)
    for r in rows:
        r["image"] = r["image"].replace("tiny_folder/", "tiny-folder/")
    return [*_manifest_run(write_manifest(m, rows)), t / "r"]


def ragged_csv(t):
    m = _copy_data(t)
    m.write_text(m.read_text() + "cat,train,tiny_folder/cat/cat0.png\n")
    return [*_manifest_run(m), t / "r"]


def jsonl_with_a_list(t):
    _copy_data(t)
    (t / "m.jsonl").write_text('{"label": "cat", "image": "tiny_folder/cat/cat0.png"}\n[1, 2]\n')
    return [*_manifest_run(t / "m.jsonl"), t / "r"]


def header_only(t):
    (t / "m.csv").write_text("label,image\n")
    return [*_manifest_run(t / "m.csv"), t / "r"]


def column_twice(t):
    m = _copy_data(t)
    lines = m.read_text().splitlines()
    lines[0] = lines[0].replace("text", "image", 1)  # two 'image' columns
    m.write_text("\n".join(lines) + "\n")
    return [*_manifest_run(m), t / "r"]


def _npy_run(t, array):
    m = _copy_data(t)
    np.save(t / "tiny_folder" / "cat" / "cat0.npy", array)
    return [*_manifest_run(m), t / "r"]


def complex_npy(t):
    return _npy_run(t, np.ones(4, dtype=np.complex64) * (1 + 2j))


def datetime_npy(t):
    return _npy_run(t, np.array(["2026-01-01"] * 4, dtype="datetime64[D]"))


def huge_value(t):
    return _npy_run(t, np.array([1.0, 1e300, 0.0, 0.0]))


def semicolon_csv(t):
    m = _copy_data(t)
    m.write_text(m.read_text().replace(",", ";"))
    return [*_manifest_run(m), t / "r"]


def wrong_shape_npy(t):
    return _npy_run(t, np.ones(7, np.float32))


def sequence_of_mixed_dims(t):
    m = _copy_data(t)
    rows = _rows(m)
    for i, r in enumerate(rows):
        np.save(t / f"s{i}.npy", np.ones((5, 2) if i else 5, np.float32))
        r["sequence"] = f"s{i}.npy"
    return [*_manifest_run(write_manifest(m, rows)), t / "r"]


def out_under_a_file(t):
    (t / "file").write_text("x")
    return ["meta-train", *TINY, "--iterations", 1, "--out", t / "file" / "run"]


def bad_plugin(t):
    (t / "badplugin.py").write_text("raise RuntimeError('boom')\n")
    return ["meta-train", *TINY, "--iterations", 1, "--out", t / "r"]


CASES = {
    "manifest not UTF-8": (latin1_manifest, "m.csv is not UTF-8 text (byte"),
    "text file not UTF-8": (latin1_text_file, "cat0.txt is not UTF-8 text"),
    "every image path wrong": (every_image_path_wrong, "none of the 23 'image' paths is a file"),
    "ragged CSV row": (ragged_csv, "m.csv:26: the row has another number of cells than the header"),
    "JSONL line not an object": (jsonl_with_a_list, "m.jsonl:2: expected a JSON object"),
    "manifest without rows": (header_only, "m.csv: manifest has no rows"),
    "a column named twice": (column_twice, "m.csv:1: column 'image' appears twice"),
    "complex .npy": (complex_npy, "cat0.npy holds complex numbers"),
    "datetime .npy": (datetime_npy, "cat0.npy holds datetime64[D] values, not numbers"),
    "a value beyond float32": (huge_value, "1 values beyond float32's range (±3.4e38): 1e+300"),
    "a manifest separated by ;": (semicolon_csv, "m.csv:1: the header is separated by ';', not commas"),
    "an array of another shape": (wrong_shape_npy, "sample tiny_folder/cat/cat0.png (tabular) has shape (7,)"),
    "an image given as the manifest": (
        lambda t: [*_manifest_run(DATA / "tiny_folder" / "cat" / "cat0.png"), t / "r"],
        "cat0.png: a manifest must be .csv or .jsonl",
    ),
    "image size 0": (lambda t: ["meta-train", "--set", "data.dataset=manifest", "--set", "data.image_size=0"],
                     "data.image_size must be in [4, 4096] pixels (got 0)"),  # fmt: skip
    "a sequence column of 1-D and 2-D arrays": (sequence_of_mixed_dims, "sequence mixes 1-D and 2-D arrays (sample"),
    "a width of 1e9": (lambda t: ["meta-train", "--set", "model.width=1000000000"], "more than the largest supported"),
    "compare an algorithm twice": (lambda t: ["compare", "--algos", "maml,maml"], "names maml twice"),
    "compare no algorithm": (lambda t: ["compare", "--algos", ","], "--algos ',' names no algorithm"),
    "a class too small, by name": (
        lambda t: [*_manifest_run(DATA / "tiny_manifest.csv"), t / "r", "--shots", "5"],
        "classes have fewer than shots + queries = 5 + 1 = 6 samples ('",
    ),
    "model is a CSV": (lambda t: ["predict", "--model", DATA / "tiny_task.csv", "--data", DATA], "not a model (not a"),
    "model missing": (lambda t: ["predict", "--model", t / "none.pt", "--data", DATA], "model not found"),
    "checkpoint is a folder": (lambda t: ["meta-test", "--checkpoint", DATA], "is a folder, not a checkpoint file"),
    "out under a file": (out_under_a_file, "Not a directory"),
    "out is a file": (lambda t: ["meta-train", *TINY, "--out", DATA / "tiny_task.csv"], "is a file, not a folder"),
    "plugin raises on import": (bad_plugin, "plugin 'badplugin' (METAFUSION_PLUGINS) failed while importing: Runt"),
    "encoder of another modality": (lambda t: ["meta-train", "--encoder", "image=melcnn"], "reads audio, not image"),
    "text encoder on images": (lambda t: ["meta-train", "--encoder", "image=minilm"], "reads text, not image"),
    "encoders not pairs": (lambda t: ["meta-train", "--set", "model.encoders=image"], "expected name=value pairs"),
    "more threads than cores": (lambda t: ["meta-train", "--threads", 4096], "this machine has"),
    "zero iterations": (lambda t: ["meta-train", "--iterations", 0], "train.iterations must be >= 1"),
    "zero inner steps": (lambda t: ["meta-train", "--inner-steps", 0], "algo.inner_steps must be >= 1"),
    "zero test steps": (lambda t: ["meta-train", "--algo", "reptile", "--inner-steps-test", 0], "steps_test must"),
    "zero fine-tune steps": (lambda t: ["fine-tune", "--run", t, "--steps", 0], "--steps must be >= 1"),
    "zero episodes": (lambda t: ["meta-train", "--episodes", 0], "data.test_episodes must be >= 1"),
    "resume of no run": (lambda t: ["meta-train", "--resume", t / "none"], "run folder"),
    "fine-tune of a file": (lambda t: ["fine-tune", "--run", DATA / "tiny_task.csv"], "is a file"),
    "protocol contradiction": (
        lambda t: ["meta-test", "--run", t, "--protocol", "support", "--non-transductive"], "contradicts"
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_it_and_exit_2(name, tmp_path, capsys, monkeypatch):
    case, message = CASES[name]
    if name == "plugin raises on import":
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("METAFUSION_PLUGINS", "badplugin")
    assert run_cli(*case(tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "internal error" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_decompression_bomb_is_refused_and_can_be_skipped(tmp_path, monkeypatch):
    manifest = _copy_data(tmp_path)
    Image.new("L", (64, 64), 255).save(tmp_path / "tiny_folder" / "cat" / "cat0.png")  # the one large image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 28 x 28 photos fit, 64 x 64 is over twice the limit
    with pytest.raises(Exception, match=r"cat0.png: refused, more than 1,500 pixels"):
        load_user_data(manifest)
    Image.new("L", (40, 40), 255).save(tmp_path / "tiny_folder" / "cat" / "cat0.png")  # over the limit, under 2x
    with pytest.raises(Exception, match="decompression bomb"):
        load_user_data(manifest)
    with pytest.warns(InputWarning, match="skipped 1 unreadable files"):
        ds = load_user_data(manifest, skip_errors=True)
    assert not ds.present[0, ds.modalities.index("image")] and ds.present[:, 0].sum() == 22  # of 23 images


def test_16_bit_grey_images_are_read_at_their_depth(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    grey = read_image(tmp_path / "deep.png", channels=1, size=64)
    np.testing.assert_allclose(grey[0], ramp / 65535.0, atol=1e-4)  # not clipped to white
    rgb = read_image(tmp_path / "deep.png", channels=3, size=32)
    assert rgb.shape == (3, 32, 32) and 0.4 < rgb.mean() < 0.6 and np.array_equal(rgb[0], rgb[2])


def test_transparent_pixels_are_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert read_image(tmp_path / "clear.png", channels=3, size=8).min() == 1.0


def test_paths_that_name_no_file_are_counted_and_warned(tmp_path):
    manifest = _copy_data(tmp_path)
    rows = _rows(manifest)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    rows[0]["image"], rows[1]["image"], rows[2]["image"] = "tiny_folder/cat", "tiny_folder/cat/cat9.png", "loop"
    with pytest.warns(InputWarning, match=r"3 of 23 'image' paths are not files \(first: .*cat, a folder"):
        ds = load_user_data(write_manifest(manifest, rows))
    assert not ds.present[:3, 0].any() and ds.present[3:, 0].sum() == 20  # (frog2 has no image cell)


def test_repeated_rows_are_warned(tmp_path):
    manifest = _copy_data(tmp_path)
    rows = _rows(manifest)
    with pytest.warns(InputWarning, match="2 samples repeat an earlier one's files and text"):
        load_user_data(write_manifest(manifest, rows + rows[:2]))


def test_fine_tuning_on_meta_train_classes_or_repeated_samples_is_warned(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--dataset", "manifest", "--data-root", DATA / "tiny_manifest.csv", "--ways", "2", "--queries", "1"]
    assert run_cli("meta-train", *args, "--set", "data.val_episodes=2", "--episodes", "2", "--iterations", 1,
                   "--set", "model.width=8", "--meta-batch", "2", "--out", run, "--quiet") == 0  # fmt: skip
    rows = _rows(DATA / "tiny_manifest.csv")
    cats = [r for r in rows if r["label"] in ("cat", "dog")]
    for r in cats:
        r.update({k: str(DATA / v) for k, v in r.items() if k in ("image", "tabular") and v})
    cats.append(dict(cats[0]))  # a query equal to cat's support sample
    task = write_manifest(tmp_path / "task.csv", [{k: v for k, v in r.items() if k != "split"} for r in cats])
    assert run_cli("fine-tune", "--run", run, "--task", task, "--quiet") == 0
    err = capsys.readouterr().err
    assert "classes 'cat', 'dog' were meta-training classes" in err
    assert "1 query samples equal a support sample" in err


def test_label_cells_that_spreadsheets_would_run_are_quoted(tmp_path):
    import torch

    from metafusion.engine.predictor import Predictions

    p = Predictions(["=1+1", "@SUM(A1)"], ["-cmd", "+x"], torch.tensor([[0.9, 0.1], [0.2, 0.8]]), ("m",),
                    torch.ones(2, 1, dtype=torch.bool), None, ["-cmd", "+x"])  # fmt: skip
    rows = _rows(p.write(tmp_path / "p.csv"))
    assert [r["id"] for r in rows] == ["'=1+1", "'@SUM(A1)"] and rows[0]["predicted"] == "'-cmd"
    assert rows[1]["label"] == "'+x" and rows[0]["prob_-cmd"] == "0.9"  # numbers stay numbers


def test_evaluation_episodes_stream_instead_of_being_held(small_synthetic):
    from metafusion.data import fixed_episodes

    episodes = fixed_episodes(small_synthetic, "test", 5, 1, 2, count=10**9, seed=3)
    assert len(episodes) == 10**9  # nothing drawn yet
    first = [e.fingerprint() for e in episodes[:3]]
    assert first == [e.fingerprint() for e in list(episodes[:5])[:3]] and episodes[2].fingerprint() == first[2]


def test_a_plugin_that_is_not_installed_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METAFUSION_PLUGINS", "no_such_plugin_module")
    assert run_cli("meta-train", *TINY, "--out", tmp_path / "r") == 2
    assert "METAFUSION_PLUGINS names 'no_such_plugin_module', which cannot be imported" in capsys.readouterr().err
    assert "no_such_plugin_module" not in sys.modules
