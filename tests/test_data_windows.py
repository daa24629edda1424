"""Tests of training.data.windows: TR/sample arithmetic, windows, history, alignment."""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.fixtures_data import requires_ffmpeg, write_clicks
from training.data import (
    SAMPLE_RATE,
    BrainRuns,
    PairedRun,
    StimulusCache,
    WindowDataset,
    make_example,
    pair_runs,
    tr_boundaries,
    window_samples,
    window_starts,
)

TR = 1.49


def _run(n_trs: int, n_samples: int | None = None, episode: str = "s01e01a") -> PairedRun:
    """A run whose target column 0 is the TR index and whose audio is the sample index."""
    n_samples = n_samples or int(tr_boundaries(n_trs, TR, SAMPLE_RATE)[-1]) + 100
    targets = np.repeat(np.arange(n_trs, dtype=np.float32)[:, None], 3, axis=1)
    return PairedRun("sub-01", episode, targets, np.arange(n_samples, dtype=np.float32), TR, SAMPLE_RATE)


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


def test_window_start_rules():
    assert window_starts(10, 4) == [0, 4, 6]  # the final partial window is shifted back
    assert window_starts(10, 4, last="drop") == [0, 4]
    assert window_starts(8, 4) == [0, 4]
    assert window_starts(3, 4) == []
    with pytest.raises(ValueError):
        window_starts(10, 0)


def test_examples_carry_real_history_and_aligned_targets():
    run = _run(50)
    history = 40000
    dataset = WindowDataset([run], window_trs=8, history_samples=history)
    assert [first for _, first, _ in dataset.index] == [0, 8, 16, 24, 32, 40, 42]
    bounds = tr_boundaries(50, TR, SAMPLE_RATE)
    for item in dataset:
        first = item["first_tr"]
        assert item["waveform"].shape == (history + dataset.window_samples,)
        np.testing.assert_array_equal(item["targets"][:, 0].numpy(), np.arange(first, first + 8))
        # sample k of the episode sits at k - b(first) + history in the waveform
        start = bounds[first] - history
        expected = np.arange(start, start + history + dataset.window_samples, dtype=np.float32)
        padded = max(0, -start)
        assert item["padded_samples"] == padded and item["history_samples"] == history
        np.testing.assert_array_equal(item["waveform"][padded:].numpy(), expected[padded:])
        assert not item["waveform"][:padded].any()  # zeros only before the episode starts
        np.testing.assert_array_equal(item["tr_boundaries"].numpy(), bounds[first : first + 9] - start)
        assert item["tr_boundaries"][0] == history


def test_whole_run_examples_and_batches():
    runs = [_run(30, episode="s01e01a"), _run(21, episode="s01e01b")]
    whole = WindowDataset(runs, window_trs=None, history_samples=1000)
    assert len(whole) == 2 and whole.window_samples is None
    item = whole[1]
    assert item["targets"].shape == (21, 3)
    assert item["waveform"].shape[0] == 1000 + tr_boundaries(21, TR, SAMPLE_RATE)[-1]

    dataset = WindowDataset(runs, window_trs=10, history_samples=5000)
    loader = DataLoader(dataset, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    assert batch["waveform"].shape == (3, 5000 + dataset.window_samples)
    assert batch["targets"].shape == (3, 10, 3) and batch["tr_boundaries"].shape == (3, 11)
    assert len(batch["episode"]) == 3 and batch["first_tr"].shape == (3,)


def test_runs_shorter_than_a_window_are_reported():
    with pytest.warns(UserWarning, match=r"s01e01b \(5 TRs\)"):
        dataset = WindowDataset([_run(20), _run(5, episode="s01e01b")], window_trs=8, history_samples=0)
    assert {position for position, _, _ in dataset.index} == {0}
    with pytest.raises(ValueError, match="outside"):
        make_example(_run(20), 15, 8, 0)


def test_window_past_the_audio_end_is_zero_padded():
    run = _run(10, n_samples=int(tr_boundaries(10, TR, SAMPLE_RATE)[-1]))  # audio ends exactly at the last TR
    dataset = WindowDataset([run], window_trs=5, history_samples=0)
    last = dataset[1]
    end = last["tr_boundaries"][-1]
    assert end <= last["waveform"].shape[0]
    assert not last["waveform"][end:].any()


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

    history = 5 * 32768  # receptive field + kernel, in samples
    dataset = WindowDataset([run], window_trs=5, history_samples=history)
    items = {item["first_tr"]: item for item in dataset}
    for t in clicks:
        click = round(t * SAMPLE_RATE)
        tr_index = int(t // TR)
        # resampling keeps the click at its time
        assert abs(int(np.argmax(np.abs(run.waveform[click - 20000 : click + 20000]))) - 20000) <= 1
        first = tr_index - tr_index % 5
        item = items[first]
        offset = click - int(tr_boundaries(0, TR, SAMPLE_RATE, start=first)[0]) + history
        found = int(torch.argmax(item["waveform"].abs()))
        assert abs(found - offset) <= 1
        j = tr_index - first
        assert item["tr_boundaries"][j] <= found < item["tr_boundaries"][j + 1]
        assert item["targets"][j, 0] == tr_index  # and the volume there is volume tr_index
        # the next window sees the same click in its history, at the matching offset
        following = items[first + 5]
        in_history = click - int(tr_boundaries(0, TR, SAMPLE_RATE, start=first + 5)[0]) + history
        assert 0 <= in_history < history and following["padded_samples"] == 0
        assert abs(int(torch.argmax(following["waveform"][:history].abs())) - in_history) <= 1
