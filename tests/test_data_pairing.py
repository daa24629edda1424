"""Tests of training.data.pairing: the pairing rules and the splits."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from tests.fixtures_data import tiny_dataset, tiny_stimuli  # noqa: F401  (session fixtures)
from training.data import (
    BrainRuns,
    DataError,
    Split,
    pair_runs,
    parse_episode,
    season_of,
    split_by_season,
    split_from_lists,
    split_runs,
)
from training.timebase import tr_boundaries

RATE = 1000  # a low sample rate keeps the in-memory waveforms small
TR = 1.49


def _brain(n_trs: dict[str, int], subject: str = "sub-01") -> BrainRuns:
    runs = {episode: np.full((n, 2), i, np.float32) for i, (episode, n) in enumerate(n_trs.items())}
    return BrainRuns(subject, TR, ["a", "b"], runs)


def _audio_for(n_trs: int, extra_samples: int = 0) -> np.ndarray:
    return np.zeros(int(tr_boundaries(n_trs, TR, RATE)[-1]) + extra_samples, np.float32)


def test_episode_ids():
    assert parse_episode("s01e02a") == (1, 2, "a")
    assert parse_episode("s10e21") == (10, 21, "")
    assert season_of("s04e11b") == 4
    with pytest.raises(DataError, match="'bourne01'"):
        parse_episode("bourne01")


def test_run_without_stimulus_is_skipped_with_a_warning():
    brain = _brain({"s01e01a": 20, "s01e01b": 20, "s01e02a": 20})
    audio = {"s01e01a": _audio_for(20), "s01e02a": _audio_for(20), "s05e01a": _audio_for(3)}
    with pytest.warns(UserWarning, match=r"sub-01: 1 run\(s\) have no stimulus and are skipped: s01e01b"):
        runs = pair_runs(brain, audio, sample_rate=RATE)
    assert [r.episode for r in runs] == ["s01e01a", "s01e02a"]  # the stimulus with no run is ignored
    assert all(r.trimmed_trs == 0 and r.n_trs == 20 for r in runs)
    assert runs[1].targets[0, 0] == 2.0 and runs[1].sample_rate == RATE and runs[1].tr == TR


def test_audio_shorter_than_the_run_trims_the_uncovered_trs():
    brain = _brain({"s01e01a": 40, "s01e01b": 40, "s01e02a": 40})
    audio = {
        "s01e01a": _audio_for(38, extra_samples=RATE // 2),  # 2 TRs short (+ half a TR): trimmed silently
        "s01e01b": _audio_for(34),  # 6 TRs short: trimmed with a warning
        "s01e02a": _audio_for(40)[:-1],  # one sample short: the last TR is not fully covered
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = {r.episode: r for r in pair_runs(brain, audio, sample_rate=RATE)}
    assert [str(w.message) for w in caught] == ["sub-01 s01e01b: audio shorter than the run, trimming 6 of 40 volumes"]
    assert (runs["s01e01a"].n_trs, runs["s01e01a"].trimmed_trs) == (38, 2)
    assert (runs["s01e01b"].n_trs, runs["s01e01b"].trimmed_trs) == (34, 6)
    assert (runs["s01e02a"].n_trs, runs["s01e02a"].trimmed_trs) == (39, 1)
    for run in runs.values():  # every kept TR is fully covered by audio
        assert run.boundaries()[-1] <= run.waveform.shape[0]


def test_audio_much_shorter_than_the_run_is_an_error():
    brain = _brain({"s01e01a": 60})
    with pytest.raises(DataError, match=r"sub-01 s01e01a: .* 30 volumes would be trimmed"):
        pair_runs(brain, {"s01e01a": _audio_for(30)}, sample_rate=RATE)
    # the limit is a parameter
    (run,) = pair_runs(brain, {"s01e01a": _audio_for(30)}, sample_rate=RATE, max_trim_trs=40, warn_trim_trs=40)
    assert run.n_trs == 30


def test_audio_longer_than_the_run_is_ignored():
    brain = _brain({"s01e01a": 10})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (run,) = pair_runs(brain, {"s01e01a": _audio_for(25)}, sample_rate=RATE)
    assert run.n_trs == 10 and run.trimmed_trs == 0 and run.waveform.shape[0] == _audio_for(25).shape[0]


def test_split_by_season_defaults_and_seed():
    episodes = [f"s{s:02d}e{e:02d}{h}" for s in (1, 2, 3, 4) for e in range(1, 7) for h in "ab"]
    split = split_by_season(reversed(episodes), seed=0)
    assert split.test == tuple(e for e in episodes if e.startswith("s04"))
    # 18 whole episodes in seasons 1-3: round(0.25 * 18) = 5 drawn for validation, both halves each
    assert len(split.validation) == 10 and len(split.train) == 26
    assert {e[:-1] for e in split.validation}.isdisjoint({e[:-1] for e in split.train})
    assert all(f"{e[:-1]}a" in split.validation and f"{e[:-1]}b" in split.validation for e in split.validation)
    assert set(split.train) | set(split.validation) == {e for e in episodes if not e.startswith("s04")}
    assert split == split_by_season(episodes, seed=0)  # order of the input does not matter
    assert split_by_season(episodes, seed=1).validation != split.validation
    assert split.part_of("s02e03b") in ("train", "validation") and split.part_of("s09e01a") is None
    assert split.as_dict()["test"][0] == "s04e01a"
    # configurable seasons; seasons in neither list are left out
    custom = split_by_season(episodes, train_seasons=[1], test_seasons=[3], val_fraction=0.0)
    assert custom.validation == () and all(e.startswith("s01") for e in custom.train)
    assert all(e.startswith("s03") for e in custom.test) and custom.part_of("s02e01a") is None
    with pytest.raises(ValueError, match="both train and test"):
        split_by_season(episodes, train_seasons=[1, 2], test_seasons=[2])
    # small pools still get one validation episode (with all its parts)
    assert split_by_season(["s01e01a", "s01e01b", "s01e02a", "s02e01a"], seed=0).validation in (
        ("s01e01a", "s01e01b"), ("s01e02a",))
    assert split_by_season(["s01e01a", "s01e01b", "s02e01a"]).validation == ()  # one episode: all train


def test_explicit_lists_must_be_disjoint():
    split = split_from_lists(["s01e02a", "s01e01a"], ["s01e03a"], ["s02e01a"])
    assert split.train == ("s01e01a", "s01e02a")
    with pytest.raises(DataError, match=r"\['s01e03a'\] are in both train and test"):
        Split(("s01e01a", "s01e03a"), (), ("s01e03a",))


def test_subject_specific_missing_runs_and_no_training_run(caplog):
    split = split_from_lists(["s01e01a", "s01e01b"], ["s01e02a"], ["s02e01a"])
    brain = _brain({"s01e01a": 12, "s01e02a": 12, "s02e01a": 12, "s03e01a": 12}, subject="sub-05")
    audio = {e: _audio_for(12) for e in brain.episodes}
    with caplog.at_level(logging.INFO, logger="training.data.pairing"):
        parts = split_runs(pair_runs(brain, audio, sample_rate=RATE), split)
    assert [r.episode for r in parts.train] == ["s01e01a"]
    assert parts.missing == {"train": ["s01e01b"], "validation": [], "test": []}
    assert parts.unused == ["s03e01a"]
    assert "sub-05 has no run for 1 train episode(s): s01e01b" in caplog.text

    test_only = _brain({"s02e01a": 12}, subject="sub-06")
    with pytest.raises(DataError, match="sub-06 has no training runs"):
        split_runs(pair_runs(test_only, audio, sample_rate=RATE), split)
    with pytest.raises(DataError, match="sub-07 has no training runs"):
        split_runs([], split, subject="sub-07")


def test_tiny_dataset_pairs_and_splits(tiny_dataset, tiny_stimuli):
    """Real readers end to end: the scanner's 2 extra volumes are trimmed silently."""
    split = split_by_season(tiny_stimuli.episodes(), seed=0)
    assert split.test == ("s03e01a", "s03e01b") and len(split.validation) == 2  # one whole episode
    assert {e[:-1] for e in split.validation}.isdisjoint({e[:-1] for e in split.train})
    for subject in tiny_dataset.subjects:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            runs = pair_runs(tiny_dataset.read_h5(subject), tiny_stimuli)
        assert [r.episode for r in runs] == list(tiny_dataset.runs[subject])
        assert all(r.trimmed_trs == 2 for r in runs)
        parts = split_runs(runs, split)
        missing = [e for part in parts.missing.values() for e in part]
        assert missing == ([] if subject == "sub-01" else ["s01e01a"])
        assert len(parts.test) == 2 and parts.train
