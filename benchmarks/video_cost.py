"""What reading video costs: decoding + sampling a clip, and frames through the frozen image network.

    python benchmarks/video_cost.py --decode 10 --out runs/video_cost/decode_10s   # a 10 s 720p clip
    python benchmarks/video_cost.py --features 80 --out runs/video_cost/lite0_80   # Lite0 frames/s at 80 px

``--decode S`` writes an S-second 1280x720 h264 clip (25 fps, a keyframe every 2 s, a sliding texture with
grain, x264 ``veryfast``: a phone clip's bitrate), then reads ``--frames`` frames of it at 64 px with
``read_video``, ``--repeats`` times, each in a fresh child process pinned to one core; it reports the
median time, the frames decoded, and the child's peak resident memory above what it held before reading
(``VmHWM`` minus ``VmRSS`` after imports). ``--features N`` times EfficientNet-Lite0's frozen part on
8-frame 28x28 clips at input size N on one thread. Either writes ``results_video.json`` into ``--out``
(what benchmarks/reproduce.py keeps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    return platform.processor()


def write_clip(path: Path, seconds: float, fps: int = 25) -> Path:
    """A textured 720p clip whose content moves every frame (so the decoder does real work)."""
    import av

    rng = np.random.default_rng(0)
    texture = (rng.random((720 // 2, (1280 + 1600) // 2, 3)) * 255).astype(np.uint8).repeat(2, 0).repeat(2, 1)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"preset": "veryfast", "g": str(2 * fps)}
        for i in range(int(seconds * fps)):
            shift = (4 * i) % 1600  # the texture slides 4 pixels a frame
            grain = rng.integers(0, 12, (720, 1280, 1), dtype=np.uint8)  # sensor noise: a camera's bitrate
            frame = np.ascontiguousarray(texture[:, shift : shift + 1280]) // 2 + grain
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def child(path: str, frames: int) -> dict:
    """One read in this (fresh, one-core) process: seconds, frames decoded, peak memory added (MiB)."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import av  # noqa: F401  (imported before the baseline: its libraries are not the clip's cost)

    from metafusion.data.video import DecodeCount, read_video

    before = _memory_kib("VmRSS:")
    count = DecodeCount()
    start = time.perf_counter()
    video = read_video(path, frames=frames, size=64, channels=3, count=count)
    seconds = time.perf_counter() - start
    assert video.shape == (frames, 3, 64, 64)
    return {"seconds": seconds, "decoded": count.decoded, "peak_mib": (_memory_kib("VmHWM:") - before) / 1024}


def decode(seconds: float, frames: int, repeats: int, folder: Path) -> dict:
    clip = folder / f"clip_{seconds:g}s.mp4"
    if not clip.exists():
        write_clip(clip, seconds)
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(clip), str(frames)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    median = statistics.median(r["seconds"] for r in runs)
    return {
        "measure": "decode",
        "clip_seconds": seconds,
        "clip_frames": int(seconds * 25),
        "clip_mb": clip.stat().st_size / 1e6,
        "frames": frames,
        "seconds_per_clip": median,
        "decoded": runs[0]["decoded"],
        "frames_per_s": runs[0]["decoded"] / median,  # frames decoded per second
        "peak_mib": max(r["peak_mib"] for r in runs),
        "repeats": repeats,
        "hardware": cpu_name() + " (one core)",
    }


def features(input_size: int, clips: int) -> dict:
    import torch

    from metafusion.models.encoders.efficientnet import FrozenEfficientNet

    torch.set_num_threads(1)
    part = FrozenEfficientNet("efficientnet-lite0", input_size, 0)
    batch = torch.rand(clips, 8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    part(batch[:2])  # warm-up
    start = time.perf_counter()
    for i in range(0, clips, 4):  # 32 frames a call, as engine.features runs it
        part(batch[i : i + 4])
    seconds = time.perf_counter() - start
    return {
        "measure": "features",
        "input_size": input_size,
        "frames_timed": clips * 8,
        "frames_per_s": clips * 8 / seconds,
        "ms_per_clip": 1000 * seconds / clips,
        "hardware": cpu_name() + " (one thread)",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decode", type=float, metavar="SECONDS", help="length of the 720p clip to read")
    p.add_argument("--features", type=int, metavar="INPUT_SIZE", help="EfficientNet-Lite0 input size")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per clip")
    p.add_argument("--repeats", type=int, default=5, help="reads of the clip, each in a fresh process")
    p.add_argument("--clips", type=int, default=64, help="8-frame clips through the network (--features)")
    p.add_argument("--out", default="runs/video_cost", help="folder for results_video.json (and the clip)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    if (args.decode is None) == (args.features is None):
        p.error("give one of --decode SECONDS or --features INPUT_SIZE")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = (
        decode(args.decode, args.frames, args.repeats, out)
        if args.decode is not None
        else features(args.features, args.clips)
    )
    (out / "results_video.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
