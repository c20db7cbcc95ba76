"""Reading one video file the way every dataset does: T frames, resized on the fly, in bounded memory.

Decoding uses PyAV (FFmpeg bundled in its wheel). Only the sampled frames are converted and resized (by
FFmpeg's scaler, straight from the decoder's YUV), so a clip never lies in memory at full resolution.
Sampling is ``frames`` frames spread uniformly over the clip (the centre of each of ``frames`` equal
spans; the default), or ``frames`` frames at ``frame_rate`` per second from the clip's start (a clip
shorter than that repeats its last frame). Between far-apart sampled frames the reader seeks to the
keyframe before the next one instead of decoding everything in between, so a long clip costs about as
much as a short one; when seeking would go back (keyframes sparser than the sampled frames) it decodes
on. A clip whose length the container does not record is decoded once, keeping at most ``2 * frames``
evenly spaced frames. Rotation metadata (phone clips) is applied. Frames are squashed to
``size x size`` as images are (``images.read_image``).

Bad input is a one-line ``DataError`` naming the file: not a video container, no video stream (an
audio-only file), a codec this FFmpeg cannot decode, frames above ``MAX_FRAME_PIXELS``, no decodable
frame, or a stream that ends well before its recorded length (a truncated file).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .dataset import DataError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
MAX_FRAME_PIXELS = 4096 * 2160  # DCI 4K; larger frames (8K) are refused: ~50 MB a decoded frame
SEEK_GAP = 1.0  # seconds: a sampled frame further ahead than this is reached by seeking


@dataclass
class DecodeCount:
    """How many frames the decoder produced for one clip (what seeking saves; benchmarks and tests read it)."""

    decoded: int = 0


def read_video(
    path: str | Path,
    frames: int = 8,
    size: int = 64,
    channels: int = 3,
    frame_rate: float | None = None,
    where: str | None = None,
    count: DecodeCount | None = None,
) -> np.ndarray:
    """``[frames, channels, size, size]`` float32 in [0, 1] sampled from the video at ``path`` (see the module
    docstring). Raises DataError naming ``where`` (default: the path)."""
    import av
    from av.video.reformatter import VideoReformatter

    where = where or str(path)
    count = count if count is not None else DecodeCount()
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise DataError(f"cannot read {where} as a video: {_reason(e)}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {where} as a video: {e}") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no"]
            raise DataError(f"{where}: no video stream (it has {', '.join(kinds)} streams)")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None or ctx.codec is None:
            raise DataError(f"{where}: its video codec is not one FFmpeg here can decode; re-encode it (h264, vp9)")
        if ctx.width * ctx.height > MAX_FRAME_PIXELS:
            raise DataError(
                f"{where}: refused, {ctx.width}x{ctx.height} frames (more than {MAX_FRAME_PIXELS:,} pixels); "
                f"downscale it first, e.g. ffmpeg -i in -vf scale=1280:-2 out.mp4"
            )
        duration = _duration(container, stream)
        convert = partial(_to_array, size=size, channels=channels, reformatter=VideoReformatter())
        try:
            if duration is None and frame_rate is None:
                picked = _evenly_spaced(container, stream, frames, convert, count)
            else:
                times = _sample_times(frames, duration, frame_rate)
                picked = _at_times(container, stream, times, duration, convert, count, where)
        except av.FFmpegError as e:
            raise DataError(f"cannot decode {where}: {_reason(e)}") from None
        if not picked:
            raise DataError(f"{where}: no decodable video frame")
        return np.stack(picked)


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _duration(container, stream) -> float | None:
    """The clip's length in seconds, from the stream, else the container, else frames / rate; None if unknown."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    if stream.frames and stream.average_rate:
        return float(stream.frames / stream.average_rate)
    return None


def _sample_times(frames: int, duration: float | None, frame_rate: float | None) -> list[float]:
    """Seconds from the clip's start at which to take each frame."""
    if frame_rate is not None:
        return [k / frame_rate for k in range(frames)]
    return [(k + 0.5) * duration / frames for k in range(frames)]


def _at_times(container, stream, times: list[float], duration: float | None, convert, count: DecodeCount, where: str):
    """The frame showing at each of ``times`` (the first whose time reaches it, less half a frame), each
    ``convert``-ed; a DataError naming ``where`` if the stream ends well before its recorded length."""
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    rate = float(stream.average_rate) if stream.average_rate else 25.0
    half = 0.5 / rate
    picked: list = []
    position = -np.inf  # time of the last decoded frame
    last = None  # the last decoded frame
    may_seek = True
    while len(picked) < len(times):
        target = start + times[len(picked)]
        jumped = may_seek and target - max(position, start) > SEEK_GAP
        if jumped:
            container.seek(int(target / stream.time_base), stream=stream, backward=True)
        first, ahead = True, False
        for frame in container.decode(stream):
            count.decoded += 1
            t = frame.time if frame.time is not None else position + 1.0 / rate
            if first and jumped and t <= position:
                may_seek = False  # the keyframe before the target lies behind us: seeking does not pay here
            first = False
            position, last = t, frame
            if t < start + times[len(picked)] - half:
                continue
            array = convert(frame)
            while len(picked) < len(times) and t >= start + times[len(picked)] - half:
                picked.append(array)
            if len(picked) == len(times):
                break
            if may_seek and start + times[len(picked)] - t > SEEK_GAP:  # far to the next: seek there
                ahead = True
                break
        if not ahead:
            break  # the stream ended
    if len(picked) < len(times) and last is not None:
        end = duration if duration is not None else position - start
        if position - start < end - 2.0 / rate - 0.05 * end:
            raise DataError(f"{where}: the video stream ends at {position - start:.2f} s of {end:.2f} s (truncated?)")
        picked += [convert(last)] * (len(times) - len(picked))  # past the clip's end: its last frame
    return picked


def _evenly_spaced(container, stream, frames: int, convert, count: DecodeCount) -> list:
    """``frames`` frames spread evenly over a clip of unknown length, decoded once, at most ``2 * frames``
    kept at a time (every ``stride``-th frame; the stride doubles whenever the buffer fills); each sampled
    frame is the kept one nearest the centre of its span."""
    kept, stride, n = [], 1, 0
    for n, frame in enumerate(container.decode(stream), 1):
        count.decoded += 1
        if (n - 1) % stride == 0:
            kept.append((n - 1, convert(frame)))
            if len(kept) == 2 * frames:
                kept, stride = kept[::2], stride * 2
    if not kept:
        return []
    centres = [(k + 0.5) * n / frames - 0.5 for k in range(frames)]
    return [min(kept, key=lambda kf: abs(kf[0] - c))[1] for c in centres]


def _to_array(frame, size: int, channels: int, reformatter) -> np.ndarray:
    """A decoded frame -> ``[channels, size, size]`` in [0, 1], resized by FFmpeg's scaler, rotation applied.
    One ``reformatter`` per clip keeps FFmpeg's scaler set up between frames (setting it up costs more than
    scaling); its bilinear filter widens to the source footprint when it shrinks, so it does not alias."""
    fmt = "rgb24" if channels == 3 else "gray"
    array = reformatter.reformat(frame, width=size, height=size, format=fmt, interpolation="BILINEAR").to_ndarray()
    turns = round((frame.rotation or 0) / 90) % 4  # the display matrix's counter-clockwise rotation
    if turns:
        array = np.rot90(array, turns)
    array = np.asarray(array, dtype=np.float32) / 255.0
    return array.transpose(2, 0, 1) if channels == 3 else array[None]


def write_video(path: str | Path, frames, fps: float = 25.0, codec: str = "mpeg4", gop: int | None = None) -> Path:
    """Encode ``frames`` (an iterable of ``[H, W, 3]`` uint8 arrays) as a video at ``path`` (the container
    from its extension): what tests and benchmarks write their clips with. ``gop``: frames between keyframes."""
    from fractions import Fraction

    import av

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = None
        for image in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
                stream.height, stream.width = image.shape[:2]
                stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
                if gop is not None:
                    stream.codec_context.gop_size = gop
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return path
