"""Video files: frame sampling against the frames written, every container, seeking that bounds the work
on long clips, rotation metadata, a user's clips in a folder or manifest, and bad input as one-line errors.
Every clip is written here with PyAV (no binary fixtures)."""

import struct

import av
import numpy as np
import pytest

from metafusion.data.dataset import DataError
from metafusion.data.manifest import load_user_data
from metafusion.data.video import VIDEO_EXTENSIONS, DecodeCount, read_video, write_video

STEP = 12  # grey level of frame i is i * STEP: a decoded frame says which frame it is


def grey_levels(n: int, size: int = 16):
    for i in range(n):
        yield np.full((size, size, 3), (i * STEP) % 256, np.uint8)


def frame_index(video: np.ndarray) -> np.ndarray:
    """The written frame each sampled frame shows (its mean grey level / STEP)."""
    return video.mean(axis=(1, 2, 3)) * 255 / STEP


CONTAINERS = {".mp4": "mpeg4", ".avi": "mpeg4", ".mov": "mpeg4", ".mkv": "mpeg4", ".webm": "libvpx-vp9", ".gif": "gif"}


def test_every_extension_is_a_container_written_and_read_here():
    assert set(CONTAINERS) == set(VIDEO_EXTENSIONS)


@pytest.mark.parametrize("ext", sorted(CONTAINERS))
def test_frames_are_sampled_at_the_centres_of_equal_spans(tmp_path, ext):
    clip = write_video(tmp_path / f"clip{ext}", grey_levels(20), fps=10, codec=CONTAINERS[ext])
    video = read_video(clip, frames=4, size=8, channels=3)
    assert video.shape == (4, 3, 8, 8) and video.dtype == np.float32
    # 2 s at 10 fps, 4 spans: centres at 0.25, 0.75, 1.25, 1.75 s -> frames 2, 7, 12, 17 (lossy: +-0.5)
    np.testing.assert_allclose(frame_index(video), [2, 7, 12, 17], atol=0.5)


def test_h264_and_a_fixed_frame_rate(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", grey_levels(20), fps=10, codec="libx264")
    np.testing.assert_allclose(frame_index(read_video(clip, 4, 8)), [2, 7, 12, 17], atol=0.5)
    # 5 frames a second from the start: 0, 0.2, 0.4, 0.6 s -> frames 0, 2, 4, 6
    np.testing.assert_allclose(frame_index(read_video(clip, 4, 8, frame_rate=5)), [0, 2, 4, 6], atol=0.5)
    # past the clip's end: its last frame repeated
    np.testing.assert_allclose(frame_index(read_video(clip, 3, 8, frame_rate=0.5))[1:], [19, 19], atol=0.5)


def test_a_clip_of_unknown_length_is_decoded_once_into_a_bounded_buffer(tmp_path):
    clip = write_video(tmp_path / "clip.h264", grey_levels(20), fps=10, codec="libx264")  # raw stream: no duration
    count = DecodeCount()
    index = frame_index(read_video(clip, 4, 8, count=count))
    assert count.decoded == 20
    # the kept frames (every 4th after two halvings) nearest the centres 2, 7, 12, 17
    np.testing.assert_allclose(index, [0, 8, 12, 16], atol=0.5)


def test_an_hour_long_clip_costs_a_few_keyframe_spans_not_the_hour(tmp_path):
    clip = write_video(tmp_path / "hour.mp4", grey_levels(3600, size=16), fps=1, codec="mpeg4", gop=30)
    count = DecodeCount()
    index = frame_index(read_video(clip, 8, 8, count=count))
    assert count.decoded < 0.05 * 3600  # seeks to the keyframe before each sampled frame
    expected = [((k + 0.5) * 3600 / 8) % (256 / STEP) for k in range(8)]  # levels wrap every 256 / STEP frames
    np.testing.assert_allclose(index, expected, atol=0.5)


def test_sparse_keyframes_decode_on_and_still_give_the_right_frames(tmp_path):
    # one keyframe for 120 frames: a seek would go back to the start each time
    clip = write_video(tmp_path / "sparse.mp4", grey_levels(120), fps=10, codec="mpeg4", gop=1000)
    count = DecodeCount()
    index = frame_index(read_video(clip, 4, 8, count=count))
    np.testing.assert_allclose(index % (256 / STEP), [(15 + 30 * k) % (256 / STEP) for k in range(4)], atol=0.5)
    assert count.decoded <= 2 * 120


def test_rotation_metadata_is_applied(tmp_path):
    def corner(n):
        for _ in range(n):
            a = np.zeros((32, 48, 3), np.uint8)
            a[:8, :8] = 255  # top-left
            yield a

    upright = write_video(tmp_path / "upright.mp4", corner(5), fps=5)
    data = bytearray(upright.read_bytes())
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    at = data.find(identity, data.find(b"tkhd"))
    data[at : at + 36] = struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)  # 90 deg clockwise
    (tmp_path / "rotated.mp4").write_bytes(bytes(data))
    plain, rotated = read_video(upright, 1, 8, 1)[0, 0], read_video(tmp_path / "rotated.mp4", 1, 8, 1)[0, 0]
    np.testing.assert_allclose(rotated, np.rot90(plain, -1), atol=1e-6)
    assert rotated[0, -1] > 0.9 and rotated[-1, 0] < 0.1  # the corner went to the top right


def _one_line_error(path, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        read_video(path, 4, 8, **kwargs)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    return message


def test_bad_clips_are_one_line_errors_naming_the_file(tmp_path):
    clip = write_video(tmp_path / "good.mkv", grey_levels(100), fps=10, codec="mpeg4", gop=10)
    data = clip.read_bytes()
    (tmp_path / "truncated.mkv").write_bytes(data[: len(data) // 2])
    assert "truncated" in _one_line_error(tmp_path / "truncated.mkv")
    (tmp_path / "cut.mp4").write_bytes(write_video(tmp_path / "x.mp4", grey_levels(10)).read_bytes()[:300])
    _one_line_error(tmp_path / "cut.mp4")
    (tmp_path / "headers_only.mkv").write_bytes(data[: data.find(bytes.fromhex("1F43B675"))])  # no cluster
    _one_line_error(tmp_path / "headers_only.mkv")
    (tmp_path / "notes.mp4").write_text("this is text, not a video\n" * 20)
    _one_line_error(tmp_path / "notes.mp4")
    (tmp_path / "unknown_codec.mkv").write_bytes(data.replace(b"V_MPEG4/ISO/ASP", b"V_QQQQQ/ISO/ASP"))
    assert "codec" in _one_line_error(tmp_path / "unknown_codec.mkv")
    huge = write_video(tmp_path / "8k.mp4", [np.zeros((4320, 7680, 3), np.uint8)], fps=1)
    assert "7680x4320" in _one_line_error(huge)


def test_an_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "speech.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=8000)
        for _ in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 8000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert "no video stream" in _one_line_error(path)


def _clip_folder(root, classes=5, per_class=3, bad=None):
    """``root/<class>/<i>.mp4`` plus a .png of each sample's first frame; ``bad``: a class/file with text."""
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            level = 20 + 23 * c + 5 * i
            frames = [np.full((12, 12, 3), (level + 3 * t) % 256, np.uint8) for t in range(6)]
            write_video(root / f"c{c}" / f"{i}.mp4", frames, fps=6)
            from PIL import Image

            Image.fromarray(frames[0]).save(root / f"c{c}" / f"{i}.png")
    if bad is not None:
        (root / bad).write_text("not a video")
    return root


def test_a_folder_of_clips_and_images_is_a_two_modality_dataset(tmp_path):
    root = _clip_folder(tmp_path / "clips")
    ds = load_user_data(root, video_frames=3, video_size=8)
    assert ds.modalities == ("image", "video")
    assert ds.data["video"].shape == (15, 3, 3, 8, 8) and ds.present.all()
    levels = ds.data["video"].mean((1, 2, 3, 4)) * 255
    assert ds.targets.tolist() == sorted(ds.targets.tolist()) and levels[0] < levels[-1]
    (root / "c2" / "1.mp4").unlink()  # a sample without its clip: video masked, image kept
    ds = load_user_data(root, video_frames=3, video_size=8)
    row = ds.metadata["ids"].index("c2/1")
    assert ds.present[row].tolist() == [True, False] and ds.data["video"][row].abs().sum() == 0
    assert int(ds.present[:, 1].sum()) == 14


def test_an_unreadable_clip_is_named_or_masked_and_counted(tmp_path):
    root = _clip_folder(tmp_path / "clips", bad="c1/0.mp4")
    with pytest.raises(DataError, match="c1/0.mp4"):
        load_user_data(root, video_frames=3, video_size=8)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = load_user_data(root, video_frames=3, video_size=8, skip_errors=True)
    assert ds.metadata["skipped"] == 1 and int((~ds.present[:, ds.modalities.index("video")]).sum()) == 1


def test_clips_meta_train_fine_tune_and_predict_like_any_modality(tmp_path, capsys):
    """A user's clips end to end: meta-train on a folder of clips, fine-tune on a task of clips, predict on
    unlabelled ones; an unreadable clip stops predict with one line, or is masked with --skip-unreadable."""
    import csv

    from metafusion.cli import main

    train = _clip_folder(tmp_path / "train", classes=10, per_class=3)
    run = tmp_path / "run"
    small = ["--set", "model.width=8", "--set", "model.hidden=8", "--set", "model.video.channels=4"]
    args = ["--dataset", "manifest", "--data-root", str(train), "--set", "data.video_frames=3",
            "--set", "data.video_size=16", "--ways", "2", "--shots", "1", "--queries", "1", "--meta-batch", "2",
            "--iterations", "2", "--set", "data.val_episodes=2", "--episodes", "4", "--algo", "protonet",
            *small]  # fmt: skip
    assert main(["meta-train", *args, "--out", str(run), "--quiet"]) == 0
    task = _clip_folder(tmp_path / "task", classes=2, per_class=3)
    assert main(["fine-tune", "--run", str(run), "--task", str(task), "--quiet"]) == 0
    new = tmp_path / "new"
    new.mkdir()
    for i, level in enumerate((20, 60)):
        write_video(new / f"clip{i}.mp4", [np.full((20, 30, 3), level + 3 * t, np.uint8) for t in range(9)], fps=3)
    (new / "broken.mp4").write_text("not a video")
    capsys.readouterr()
    assert main(["predict", "--model", str(run), "--data", str(new), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.mp4" in err and "\n" not in err and not (tmp_path / "p.csv").exists()
    assert main(["predict", "--model", str(run), "--data", str(new), "--out", str(tmp_path / "p.csv"),
                 "--skip-unreadable"]) == 2  # fmt: skip
    assert "no readable modality" in capsys.readouterr().err  # the broken clip is all that sample has
    (new / "broken.mp4").unlink()
    assert main(["predict", "--model", str(run), "--data", str(new), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["id"] for r in rows] == ["clip0", "clip1"] and {r["predicted"] for r in rows} <= {"c0", "c1"}
