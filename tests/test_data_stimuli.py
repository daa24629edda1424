"""Tests of training.data.stimuli: decoding, resampling, the memory-mapped cache."""

from __future__ import annotations

import os
import pickle
import subprocess

import numpy as np
import pytest
import soundfile as sf

from tests.fixtures_data import requires_ffmpeg, tiny_dataset, tiny_stimuli  # noqa: F401  (session fixtures)
from training.data import SAMPLE_RATE, DataError, StimulusCache, decode_audio, find_stimuli


def _tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _to_mkv(wav, out) -> None:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "color=c=black:s=32x24:r=2:d=4",
         "-i", str(wav), "-map", "0:v", "-map", "1:a", "-c:v", "ffv1", "-c:a", "flac", str(out)],
        check=True,
    )  # fmt: skip


def test_wav_and_flac_are_resampled_to_22050(tmp_path):
    tone = _tone(2.0, 16000)
    sf.write(tmp_path / "a.wav", tone, 16000, subtype="FLOAT")
    sf.write(tmp_path / "a.flac", tone, 16000)
    for name in ("a.wav", "a.flac"):
        wave = decode_audio(tmp_path / name)
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert wave.shape[0] == pytest.approx(2.0 * SAMPLE_RATE, abs=1)
        # a 440 Hz tone stays a 440 Hz tone of the same amplitude
        spectrum = np.abs(np.fft.rfft(wave[2000:-2000]))
        assert np.fft.rfftfreq(wave.size - 4000, 1 / SAMPLE_RATE)[np.argmax(spectrum)] == pytest.approx(440, abs=2)
        assert np.abs(wave[2000:-2000]).max() == pytest.approx(0.5, abs=0.02)
    # already at 22,050 Hz: returned unchanged
    sf.write(tmp_path / "b.wav", _tone(1.0, SAMPLE_RATE), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(decode_audio(tmp_path / "b.wav"), _tone(1.0, SAMPLE_RATE))


def test_stereo_is_averaged_to_mono(tmp_path):
    left = _tone(1.0, SAMPLE_RATE)
    sf.write(tmp_path / "s.wav", np.stack([left, np.zeros_like(left)], axis=1), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(decode_audio(tmp_path / "s.wav"), left / 2, atol=1e-7)


@requires_ffmpeg
def test_video_soundtrack_decodes_like_the_wav(tmp_path):
    """Same PCM in a wav and in an mkv (FLAC): one resampler, so the same waveform."""
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "x.wav", 0.3 * rng.standard_normal(3 * 16000), 16000, subtype="PCM_16")
    _to_mkv(tmp_path / "x.wav", tmp_path / "x.mkv")
    np.testing.assert_allclose(decode_audio(tmp_path / "x.mkv"), decode_audio(tmp_path / "x.wav"), atol=1e-6)


def test_find_stimuli_names_and_preferences(tmp_path):
    (tmp_path / "s1").mkdir()
    for name in ("s1/friends_s01e02a.mkv", "s1/friends_s01e02a.wav", "friends_s01e10b.mp4", "s02e01a.flac",
                 "friends_s01e03a.txt", "notes.wav", ".friends_s01e04a.wav"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    found = find_stimuli(tmp_path)
    assert list(found) == ["s01e02a", "s01e10b", "s02e01a"]
    assert found["s01e02a"].name == "friends_s01e02a.wav"  # audio wins over video
    with pytest.raises(DataError, match="stimuli folder not found"):
        find_stimuli(tmp_path / "missing")


def test_full_episodes_other_films_and_unfetched_links(tmp_path):
    """friends.stimuli / Algonauts layouts: halves are episodes; a full-episode file beside
    them, Movie10 films and transcripts are not; an unfetched annex link is reported."""
    from tests.fixtures_data import annex_link
    from training.data import scan_stimuli

    friends = tmp_path / "movies" / "friends"
    for name in ("s1/friends_s01e01a.mkv", "s1/friends_s01e01b.mkv", "s1/friends_s01e01.mkv",
                 "s1/friends_s01e02.mkv", "s2/friends_s02e01a.mkv", "../movie10/bourne/bourne01.mkv",
                 "../../transcripts/friends/s1/friends_s01e01a.tsv"):  # fmt: skip
        (friends / name).parent.mkdir(parents=True, exist_ok=True)
        (friends / name).write_bytes(b"x")
    annex_link(friends / "s2" / "friends_s02e02a.mkv", tmp_path)
    annex_link(friends / "s2" / "friends_s02e02.mkv", tmp_path)  # full episode, unfetched
    found, unfetched = scan_stimuli(tmp_path)
    # s01e02 has no halves here: kept (a release cut that way pairs with s01e02 runs)
    assert list(found) == ["s01e01a", "s01e01b", "s01e02", "s02e01a"]
    assert list(unfetched) == ["s02e02a"]
    cache = StimulusCache(tmp_path, tmp_path / "cache")
    assert cache.episodes() == list(found) and cache.unfetched == unfetched
    link = friends / "s2" / "friends_s02e02a.mkv"
    with pytest.raises(DataError, match=f"{link}: stimulus of s02e02a not fetched: datalad get {link}"):
        cache.waveform("s02e02a")
    with pytest.raises(DataError, match="no stimulus file for episode 's09e01a'"):
        cache.path("s09e01a")


def test_cache_is_memory_mapped_and_reused(tiny_dataset, tiny_stimuli, tmp_path):
    ds = tiny_dataset
    assert tiny_stimuli.episodes() == list(ds.episodes)
    wave = tiny_stimuli.waveform("s02e01a")
    assert isinstance(wave, np.memmap) and wave.dtype == np.float32 and not wave.flags.writeable
    info = sf.info(ds.stimuli_dir / "friends_s02e01a.wav")
    assert wave.shape[0] == pytest.approx(info.frames * SAMPLE_RATE / info.samplerate, abs=1)
    np.testing.assert_allclose(wave, decode_audio(ds.stimuli_dir / "friends_s02e01a.wav"))
    cached = tiny_stimuli.cache_path("s02e01a")
    stamp = cached.stat().st_mtime_ns
    # a new object over the same folders decodes nothing
    again = StimulusCache(ds.stimuli_dir, tiny_stimuli.cache_dir)
    again.prepare()
    assert again.n_decoded == 0 and cached.stat().st_mtime_ns == stamp
    assert len(again) == len(ds.episodes) and "s02e01a" in again and again.n_samples("s02e01a") == wave.shape[0]
    # picklable for DataLoader workers
    clone = pickle.loads(pickle.dumps(again))
    np.testing.assert_array_equal(clone.waveform("s02e01a"), wave)
    assert not list(tiny_stimuli.cache_dir.glob("*.tmp")) and not list(tiny_stimuli.cache_dir.glob(".*"))


def test_changed_source_is_decoded_again(tmp_path):
    stimuli = tmp_path / "stimuli"
    stimuli.mkdir()
    sf.write(stimuli / "friends_s01e01a.wav", _tone(1.0, 16000), 16000)
    cache = StimulusCache(stimuli, tmp_path / "cache")
    first = np.array(cache.waveform("s01e01a"))
    sf.write(stimuli / "friends_s01e01a.wav", _tone(1.5, 16000, 880.0), 16000)
    os.utime(stimuli / "friends_s01e01a.wav", ns=(1, 2_000_000_000_000_000_000))
    fresh = StimulusCache(stimuli, tmp_path / "cache")
    second = fresh.waveform("s01e01a")
    assert fresh.n_decoded == 1 and second.shape[0] != first.shape[0]
    assert len(list((tmp_path / "cache").glob("s01e01a_*.npy"))) == 1  # the stale version is gone


@pytest.mark.parametrize("suffix", [".wav", pytest.param(".mkv", marks=requires_ffmpeg)])
def test_undecodable_stimulus_is_an_error_naming_it(tmp_path, suffix):
    stimuli = tmp_path / "stimuli"
    stimuli.mkdir()
    bad = stimuli / f"friends_s01e01a{suffix}"
    bad.write_bytes(b"RIFF\x00\x00 this is not audio" * 20)
    cache = StimulusCache(stimuli, tmp_path / "cache")
    with pytest.raises(DataError, match="cannot decode") as error:
        cache.waveform("s01e01a")
    assert str(bad) in str(error.value)
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written
    with pytest.raises(DataError, match="no stimulus file for episode 's09e01a'"):
        cache.waveform("s09e01a")


def _resident_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_pages_of_a_decoded_soundtrack_are_dropped_after_use(tmp_path):
    """A memory-mapped soundtrack read once does not stay in the process's memory: at full
    scale (36 h, 11 GB decoded) that would be the whole soundtrack."""
    from training.data._io import drop_resident_pages

    path = tmp_path / "wave.npy"
    np.save(path, np.random.default_rng(0).standard_normal(8_000_000).astype(np.float32))  # 32 MB
    waveform = np.load(path, mmap_mode="r")
    assert float(np.abs(waveform).sum()) > 0  # every page read
    assert _resident_kb(path) > 30_000
    drop_resident_pages(waveform)
    assert _resident_kb(path) < 1_000
    assert float(np.abs(waveform).sum()) > 0  # still readable: paged in again from disk
    drop_resident_pages(np.zeros(4))  # an array in memory: nothing to do
