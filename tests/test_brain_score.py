"""brain-score: any HEAR module (and built-in feature sources) under a lagged ridge, on the tiny
synthetic dataset's held-out season; feature alignment and chunking; bad inputs."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from hear_brainsoundnet.checkpoints import load_pretrained
from hear_brainsoundnet.soundnet import SoundNet8
from tests.fixtures_data import tiny_dataset  # noqa: F401  (session fixture)
from training.brain_score import check_held_out, data_annotations, main, make_source, ridge_scores
from training.config import ConfigError, load_config
from training.data.loading import load_splits
from training.evaluate import read_table
from training.features import (FeatureError, HearModuleFeatures, LogMelFeatures, SoundNetFeatures, TRPooler,
                               load_soundnet)
from training.model import EncodingModel, EpisodeGeometry
from training.ridge import RidgeEncodingModel

# A third-party-style HEAR plugin: random timestamp embeddings every 50 ms at 16 kHz (so the
# 22,050 Hz audio is resampled), with options to break the API on purpose.
FAKE_MODULE = textwrap.dedent('''
    """A HEAR plugin with random embeddings (tests only)."""
    import torch

    class RandomEmbedding(torch.nn.Module):
        def __init__(self, seed=0, hop_ms=50.0, stop_fraction=1.0, sample_rate=16000, size=32):
            super().__init__()
            self.seed, self.hop_ms, self.stop_fraction, self.size = seed, hop_ms, stop_fraction, size
            if sample_rate is not None:
                self.sample_rate = sample_rate
            self.timestamp_embedding_size = self.scene_embedding_size = size
            self.calls = 0

    def load_model(model_file_path="", **options):
        return RandomEmbedding(**options)

    def get_timestamp_embeddings(audio, model):
        duration_ms = audio.shape[1] / model.sample_rate * 1000
        stamps = torch.arange(0.0, duration_ms * model.stop_fraction, model.hop_ms)
        model.calls += 1
        generator = torch.Generator().manual_seed(model.seed * 1000 + model.calls)
        embeddings = torch.randn(audio.shape[0], len(stamps), model.size, generator=generator)
        return embeddings, stamps.expand(audio.shape[0], -1)

    def get_scene_embeddings(audio, model):
        return torch.zeros(audio.shape[0], model.size)
''')
NOT_HEAR_MODULE = "def load_model(model_file_path='', **options):\n    return None\n"


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "fake_hear_random.py").write_text(FAKE_MODULE)
    (folder / "fake_not_hear.py").write_text(NOT_HEAR_MODULE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        yield folder


@pytest.fixture(scope="module")
def setting(tiny_dataset, tmp_path_factory):  # noqa: F811
    """The tiny dataset's config (both subjects, 3-TR lags), its splits and annotations."""
    folder = tmp_path_factory.mktemp("brain-score")
    config = load_config(None, ["data.source=synthetic", "data.synthetic_size=tiny", f"data.root={tiny_dataset.root}",
                                f"data.cache_dir={folder / 'cache'}", "model.kernel_trs=3", "subjects.mode=group",
                                "subjects.ids=['sub-01', 'sub-02']", "run.progress=false"])
    path = folder / "tiny.toml"
    path.write_text(config.to_toml())
    splits = load_splits(config)
    return config, path, splits, data_annotations(config, splits)


def _auditory_mean_r(score, kinds):
    auditory = np.asarray(kinds) == "auditory"
    return {s: float(v.mean("r")[auditory].mean()) for s, v in score.scores.items()}


@pytest.fixture(scope="module")
def random_and_pretrained(setting, plugins):
    config, _, splits, _ = setting
    random = ridge_scores(make_source("fake_hear_random", config), splits, lags=3)
    pretrained = ridge_scores(make_source("hear_brainsoundnet.models.pretrained", config), splits, lags=3)
    return random, pretrained


def test_random_embeddings_stay_within_noise_of_zero_in_every_parcel(random_and_pretrained):
    random, _ = random_and_pretrained
    for subject, scores in random.scores.items():
        z = scores.mean("r") / random.chance_sd[subject]
        # 10 parcels x 2 subjects: |z| < 3.5 everywhere holds with probability ~0.99 at chance
        assert np.all(np.abs(z) < 3.5), (subject, np.round(z, 2))
        assert np.all(random.chance_sd[subject] > 0.05)  # 2 runs of ~40 autocorrelated TRs


def test_pretrained_soundnet_beats_random_embeddings_in_auditory_parcels(random_and_pretrained, setting):
    random, pretrained = random_and_pretrained
    kinds = setting[3][0]
    auditory = np.asarray(kinds) == "auditory"
    random_r, pretrained_r = _auditory_mean_r(random, kinds), _auditory_mean_r(pretrained, kinds)
    for subject in pretrained.scores:
        assert pretrained_r[subject] > random_r[subject] + 0.1, (pretrained_r, random_r)
        wins = pretrained.scores[subject].mean("r")[auditory] > random.scores[subject].mean("r")[auditory]
        assert wins.sum() >= 5, (subject, wins)


def test_oracle_bounds_the_feature_extractors(setting, random_and_pretrained):
    config, _, splits, (kinds, ceilings, _) = setting
    oracle = ridge_scores(make_source(":oracle", config), splits, lags=3)
    _, pretrained = random_and_pretrained
    oracle_r, pretrained_r = _auditory_mean_r(oracle, kinds), _auditory_mean_r(pretrained, kinds)
    auditory = np.asarray(kinds) == "auditory"
    for subject in oracle.scores:
        assert oracle_r[subject] > pretrained_r[subject] + 0.1, (oracle_r, pretrained_r)
        # the oracle reaches most of the held-out noise ceiling, and cannot pass it by much
        fraction = oracle.scores[subject].mean("r")[auditory] / ceilings[subject]["r"][auditory]
        assert 0.75 < np.median(fraction) < 1.1, fraction


def test_command_writes_table_models_and_maps_for_this_packages_module(setting, tmp_path, capsys):
    _, config_path, splits, _ = setting
    out = tmp_path / "out"
    assert main(["hear_brainsoundnet", "--config", str(config_path), "--out", str(out), "--threads", "2"]) == 0
    assert "## Summary" in capsys.readouterr().out
    table = read_table(out / "encoding_table.csv")
    assert set(table["subject"]) == {"sub-01", "sub-02"} and len(table) == 20
    assert {"r", "r2", "z", "chance_sd_r", "kind", "ceiling_r", "best_alpha"} <= set(table.columns)
    markdown = (out / "encoding_table.md").read_text()
    assert "mean_r_auditory" in markdown and "of 6" in markdown
    assert f"Command: `python -m training.brain_score hear_brainsoundnet --config {config_path} --out" in markdown
    for subject in ("sub-01", "sub-02"):
        assert (out / "maps" / f"map_r_{subject}.png").stat().st_size > 1000
        assert (out / "maps" / f"map_r_{subject}.html").is_file()
    # the saved model reproduces the held-out scores from the features alone
    model = RidgeEncodingModel.load(out / "models" / "sub-01")
    assert model.config["source"]["module"] == "hear_brainsoundnet" and model.lags == 3
    assert model.config["held_out_runs"] == [e.name for e in splits.test]
    source = make_source("hear_brainsoundnet", setting[0])
    episode = splits.test[0]
    features = source.episode_features(episode.name, episode.waveform, episode.n_trs, splits.tr)
    prediction = model.predict(features[:episode.targets["sub-01"].shape[0]])
    r = [np.corrcoef(prediction[:, j], episode.targets["sub-01"][:, j])[0, 1] for j in range(10)]
    scores = read_table(out / "scores.csv", dtype={"run": str, "target": str})
    stored = scores[(scores["subject"] == "sub-01") & (scores["run"] == episode.name)]["r"].to_numpy()
    np.testing.assert_allclose(r, stored, atol=1e-5)


# ---- alignment and chunking --------------------------------------------------------------------

def test_conv7_features_are_what_the_fine_tuned_head_reads(setting):
    _, _, splits, _ = setting
    episode, tr = splits.train[0], splits.tr
    network = load_pretrained()
    features = SoundNetFeatures(network, "conv7").episode_features(episode.name, episode.waveform, episode.n_trs, tr)
    backbone = SoundNet8()
    backbone.load_state_dict({k: v for k, v in network.state_dict().items() if k.startswith("blocks.")})
    model = EncodingModel({"sub-01": 10}, kernel_trs=3, condition="head", backbone=backbone).eval()
    geometry = EpisodeGeometry(episode.n_trs, len(episode.waveform), tr=tr, prefix="conv7", context=2,
                               window_trs=1)
    head_input = model.episode_features(episode.waveform, geometry, "conv7")[:, geometry.frames].T.numpy()
    np.testing.assert_allclose(features, head_input, rtol=1e-4, atol=1e-5 * np.abs(head_input).max())


def test_hear_chunks_give_the_frames_of_one_pass(setting):
    config, _, splits, _ = setting
    episode = splits.test[0]
    whole = HearModuleFeatures("hear_brainsoundnet", chunk_seconds=600)
    chunked = HearModuleFeatures("hear_brainsoundnet", chunk_seconds=7.0, context_seconds=1.0)
    a = whole.episode_features(episode.name, episode.waveform, episode.n_trs, splits.tr)
    b = chunked.episode_features(episode.name, episode.waveform, episode.n_trs, splits.tr)
    assert a.shape == (episode.n_trs, 128)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    mel = LogMelFeatures(chunk_seconds=600).episode_features(episode.name, episode.waveform, episode.n_trs, splits.tr)
    mel_chunked = LogMelFeatures(chunk_seconds=3.3).episode_features(episode.name, episode.waveform,
                                                                     episode.n_trs, splits.tr)
    np.testing.assert_allclose(mel, mel_chunked, rtol=1e-5, atol=1e-4)
    assert mel.shape == (episode.n_trs, 64)


def test_timestamps_are_pooled_into_their_tr():
    pooler = TRPooler(3, 1.5)
    pooler.add(np.array([[1.0], [3.0], [10.0], [20.0], [99.0]]), np.array([0.0, 1.49, 1.5, 4.4, 4.6]))
    np.testing.assert_allclose(pooler.result("x"), [[2.0], [10.0], [20.0]])  # 4.6 s is past the run


def test_a_fine_tuned_runs_backbone_is_a_feature_source(tmp_path):
    backbone = SoundNet8()
    model = EncodingModel({"sub-01": 4}, kernel_trs=3, condition="conv4", backbone=backbone)
    model.save_pretrained(tmp_path / "run" / "best.safetensors")
    network, label = load_soundnet(tmp_path / "run")
    assert label == "run"
    for key, value in network.state_dict().items():
        assert torch.equal(value, backbone.state_dict()[key]), key
    with pytest.raises(FeatureError, match="without best.safetensors"):
        load_soundnet(tmp_path)


# ---- bad inputs ----------------------------------------------------------------------------------

def test_a_module_that_is_not_a_hear_module_is_named(setting, plugins):
    config = setting[0]
    with pytest.raises(FeatureError, match=r"'fake_not_hear' is not a HEAR module: it has no "
                                           r"get_timestamp_embeddings function"):
        make_source("fake_not_hear", config)
    with pytest.raises(FeatureError, match="its model has no sample_rate attribute"):
        make_source("fake_hear_random", config, model_options={"sample_rate": None})
    with pytest.raises(FeatureError, match=r"model.sample_rate = 22050.0; HEAR needs a Python int"):
        make_source("fake_hear_random", config, model_options={"sample_rate": 22050.0})
    with pytest.raises(FeatureError, match="HEAR module 'no_such_plugin_xyz' cannot be imported"):
        make_source("no_such_plugin_xyz", config)
    with pytest.raises(FeatureError, match=r"load_model\(.*\{'colour': 'red'\}\) failed"):
        make_source("fake_hear_random", config, model_options={"colour": "red"})


def test_timestamps_that_do_not_cover_the_run_are_refused(setting, plugins, tmp_path, capsys):
    config, config_path, splits, _ = setting
    source = make_source("fake_hear_random", config, model_options={"stop_fraction": 0.5})
    episode = splits.test[0]
    with pytest.raises(FeatureError, match=rf"fake_hear_random, episode {episode.name}: the timestamps do "
                                           r"not cover the run: \d+ of \d+ TRs .* hold no timestamp"):
        source.episode_features(episode.name, episode.waveform, episode.n_trs, splits.tr)
    code = main(["fake_hear_random", "--config", str(config_path), "--out", str(tmp_path),
                 "--model-options", '{"hop_ms": 2000}'])
    assert code == 2 and "do not cover the run" in capsys.readouterr().err


def test_a_held_out_season_that_overlaps_training_is_refused(setting, tmp_path, capsys):
    config, config_path, _, _ = setting
    code = main([":log-mel", "--config", str(config_path), "--out", str(tmp_path),
                 "--set", "data.test_seasons=[2]", "--set", "data.train_seasons=[1, 2]"])
    assert code == 2
    assert "data.test_seasons = [2] overlaps data.train_seasons = [1, 2] (season 2)" in capsys.readouterr().err
    mixed = load_config(None, [f"data.root={config.data.root}", "data.source=synthetic", "data.synthetic_size=tiny",
                               f"data.cache_dir={config.data.cache_dir}", "data.train_episodes=['s01e01b', 's03e01b']",
                               "data.val_episodes=['s02e01a']", "data.test_episodes=['s03e01a']"])
    with pytest.raises(ConfigError, match=r"held-out run s03e01a is from season 3, which also has "
                                          r"training/validation runs \['s03e01b'\]"):
        check_held_out(mixed, load_splits(mixed))


def test_the_oracle_exists_only_for_synthetic_data(setting, tmp_path):
    config = load_config(None, ["data.source=algonauts", f"data.root={tmp_path}"])
    with pytest.raises(FeatureError, match="data.source = 'algonauts': only simulated data have an oracle"):
        make_source(":oracle", config)
    with pytest.raises(FeatureError, match="unknown built-in feature source ':mfcc'"):
        make_source(":mfcc", config)
    with pytest.raises(SystemExit):
        main([":log-mel"])  # --config is required


def test_finer_layers_are_averaged_over_the_frames_inside_each_tr(setting):
    from hear_brainsoundnet.soundnet import frame_geometry

    _, _, splits, _ = setting
    episode, tr = splits.test[1], splits.tr
    network = load_pretrained()
    features = SoundNetFeatures(network, "conv5", chunk_seconds=20).episode_features(
        episode.name, episode.waveform, episode.n_trs, tr)
    n_samples = int(np.ceil((episode.n_trs + 1) * tr * 22050))
    audio = torch.zeros(1, n_samples)
    audio[0, :len(episode.waveform)] = torch.from_numpy(np.array(episode.waveform, dtype=np.float32))[:n_samples]
    with torch.no_grad():
        frames = network(audio, layers=("conv5",))["conv5"][0].T.numpy()  # one pass, plain network
    centres = frame_geometry("conv5").centre_seconds(len(frames)).numpy()
    for t in (0, 7, episode.n_trs - 1):
        inside = (centres >= t * tr) & (centres < (t + 1) * tr)
        assert 3 <= inside.sum() <= 5  # conv5 hop 0.37 s: 4 frames per 1.49 s TR
        np.testing.assert_allclose(features[t], frames[inside].mean(axis=0), rtol=1e-4,
                                   atol=1e-5 * np.abs(frames).max())
