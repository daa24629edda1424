"""Where TRs fall in the audio: the time base, the evaluation windows, and a click's TR."""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction

import numpy as np
import pytest

from tests.fixtures_data import requires_ffmpeg, write_clicks
from training.batches import window_starts
from training.data import SAMPLE_RATE, BrainRuns, StimulusCache, pair_runs
from training.timebase import tr_boundaries, window_samples

TR = 1.49


def test_tr_boundaries_are_exact():
    bounds = tr_boundaries(1000, TR, SAMPLE_RATE)
    exact = [int(Fraction(149, 100) * SAMPLE_RATE * i + Fraction(1, 2)) for i in range(1001)]  # round half up
    assert bounds.tolist() == exact
    assert bounds[:4].tolist() == [0, 32855, 65709, 98564]  # 32,854.5 samples per TR
    assert tr_boundaries(3, TR, SAMPLE_RATE, start=2).tolist() == exact[2:6]
    lengths = np.diff(bounds)
    assert set(lengths.tolist()) == {32854, 32855}
    for n in (1, 2, 5, 70, 80):
        spans = bounds[n:] - bounds[:-n]
        assert spans.max() == window_samples(n, TR, SAMPLE_RATE) == int(np.ceil(n * 32854.5))


def test_evaluation_windows_cover_every_tr():
    assert window_starts(10, 4) == [0, 4, 6]  # the final partial window is shifted back
    assert window_starts(8, 4) == [0, 4]
    assert window_starts(3, 4) == []
    assert window_starts(4, 4) == [0]
    for n_trs in range(5, 40):
        covered = {t for start in window_starts(n_trs, 5) for t in range(start, start + 5)}
        assert covered == set(range(n_trs))
    with pytest.raises(ValueError, match="window_trs"):
        window_starts(10, 0)


@pytest.mark.parametrize("container", ["wav", pytest.param("mkv", marks=requires_ffmpeg)])
def test_a_click_arrives_at_the_expected_tr_and_sample(tmp_path, container):
    """A click at t seconds in the soundtrack lands in TR floor(t / TR), at sample round(t * 22050)."""
    stimuli = tmp_path / "stimuli"
    stimuli.mkdir()
    clicks = [10.30, 31.38]  # multiples of 20 ms: whole samples at 16,000 and at 22,050 Hz
    wav = stimuli / "friends_s01e01a.wav"
    write_clicks(wav, 60.0, clicks, rate=16000)
    if container == "mkv":
        mkv = stimuli / "friends_s01e01a.mkv"
        subprocess.run(
            [shutil.which("ffmpeg"), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
             "-i", "color=c=black:s=32x24:r=2:d=61", "-i", str(wav), "-map", "0:v", "-map", "1:a",
             "-c:v", "ffv1", "-c:a", "flac", str(mkv)],
            check=True,
        )  # fmt: skip
        wav.unlink()
    cache = StimulusCache(stimuli, tmp_path / "cache")
    assert cache.path("s01e01a").suffix == f".{container}"
    brain = BrainRuns("sub-01", TR, ["tr_index"], {"s01e01a": np.arange(41, dtype=np.float32)[:, None]})
    (run,) = pair_runs(brain, cache)
    assert run.n_trs == 40  # 40 * 1.49 = 59.6 s <= 60 s < 41 * 1.49

    bounds = run.boundaries()
    for t in clicks:
        click = round(t * SAMPLE_RATE)
        tr_index = int(t // TR)
        found = click - 20000 + int(np.argmax(np.abs(run.waveform[click - 20000 : click + 20000])))
        assert abs(found - click) <= 1  # resampling keeps the click at its time
        # it lies in TR tr_index's samples, and the volume paired with them is volume tr_index
        assert bounds[tr_index] <= found < bounds[tr_index + 1]
        assert run.targets[tr_index, 0] == tr_index
