"""Uploaded media decoded for analysis: audio of any container to mono 16 kHz, video to RGB frames at a chosen rate;
what is not media is refused clearly. The media are made here with the same FFmpeg (PyAV) encoders."""

from __future__ import annotations

import io
import wave
from fractions import Fraction

import av
import numpy as np
import pytest

from services.kzone.decoding import UndecodableMedia, decode_audio, decode_video_frames


def _tone(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _wav(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    pcm = (np.repeat(samples[:, None], channels, axis=1) * 32767).astype("<i2").tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(pcm)
    return buffer.getvalue()


def _encoded_audio(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate, layout="mono")
        assert isinstance(stream, av.audio.stream.AudioStream)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


def _video(seconds: float, fps: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        stream = output.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = Fraction(1, fps)
        for index in range(int(seconds * fps)):
            image = np.full((48, 64, 3), index * 4 % 256, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


def _dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * rate / len(samples))


def test_a_stereo_44k_wav_becomes_mono_16k_with_its_pitch() -> None:
    decoded = decode_audio(_wav(_tone(2.0, 44_100), 44_100, channels=2))
    assert decoded.sample_rate == 16_000
    assert decoded.duration == pytest.approx(2.0, abs=0.02)
    assert _dominant_hz(decoded.samples, 16_000) == pytest.approx(440, rel=0.01)
    assert 0.3 < float(np.max(np.abs(decoded.samples))) <= 1.0


@pytest.mark.parametrize(
    ("container", "codec"), [("flac", "flac"), ("mp3", "libmp3lame"), ("webm", "libopus"), ("ipod", "aac")]
)
def test_compressed_audio_decodes(container: str, codec: str) -> None:
    rate = 48_000 if codec == "libopus" else 44_100
    decoded = decode_audio(_encoded_audio(_tone(1.5, rate, 330.0), rate, container, codec))
    assert decoded.duration == pytest.approx(1.5, abs=0.1)
    assert _dominant_hz(decoded.samples, 16_000) == pytest.approx(330, rel=0.02)


def test_long_audio_is_cut_at_the_limit() -> None:
    decoded = decode_audio(_wav(_tone(3.0, 16_000), 16_000), max_seconds=1.0)
    assert decoded.duration == pytest.approx(1.0)


def test_video_frames_come_thinned_to_the_rate_with_timestamps() -> None:
    frames = list(decode_video_frames(_video(2.0, 30), frames_per_second=10))
    assert len(frames) == pytest.approx(20, abs=1)
    assert frames[0].rgb.shape == (48, 64, 3)
    gaps = np.diff([frame.timestamp for frame in frames])
    assert np.allclose(gaps, 0.1, atol=0.034)


@pytest.mark.parametrize("data", [b"", b"not media at all", b"RIFF\x00\x00\x00\x00WAVEjunk"])
def test_what_is_not_media_is_refused(data: bytes) -> None:
    with pytest.raises(UndecodableMedia):
        decode_audio(data)
    with pytest.raises(UndecodableMedia):
        list(decode_video_frames(data))


def test_audio_without_video_and_video_without_audio_are_refused() -> None:
    with pytest.raises(UndecodableMedia, match="no video stream"):
        list(decode_video_frames(_wav(_tone(0.5, 16_000), 16_000)))
    with pytest.raises(UndecodableMedia, match="no audio stream"):
        decode_audio(_video(0.5, 10))
