"""The encoding model: TR -> frame alignment, conditions, BatchNorm modes, exact feature caching."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from hear_brainsoundnet.soundnet import SoundNet8, frame_geometry
from tests.signals import natural_like
from training.batches import EpisodeSet
from training.data import Episode
from training.model import (CONDITIONS, EncodingModel, EpisodeGeometry, WindowBatchNorm, plain_backbone,
                            prefix_layer, trained_layers)
from training.timebase import tr_frames

TR = 1.49
SR = 22050


def make_model(condition: str = "conv4", batchnorm: str = "frozen-eval", seed: int = 0,
               subjects: dict[str, int] | None = None, kernel: int = 3) -> EncodingModel:
    torch.manual_seed(seed)
    model = EncodingModel(subjects or {"sub-01": 4}, kernel_trs=kernel, condition=condition,
                          batchnorm=batchnorm)
    with torch.no_grad():  # non-zero heads, so predictions depend on the features
        for head in model.heads.values():
            head.conv.weight.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def episode() -> Episode:
    n_trs = 36
    wave = natural_like(n_trs * TR + 0.7, seed=3)
    return Episode("s01e01a", wave, {"sub-01": np.zeros((n_trs, 4), np.float32)})


def test_tr_frame_is_the_frame_centred_nearest_the_tr_middle() -> None:
    geometry = frame_geometry("conv7")
    frames = tr_frames(3000, TR)
    middles = (np.arange(3000) + 0.5) * TR * SR
    centres = float(geometry.first_centre) + frames * geometry.hop
    # nearest centre, at every TR of a 75-minute run: no drift
    assert np.all(np.abs(centres - middles) <= geometry.hop / 2)
    brute = np.argmin(np.abs(float(geometry.first_centre) + np.arange(3100)[None, :] * geometry.hop
                             - middles[:, None]), axis=1)
    np.testing.assert_array_equal(frames, brute)
    steps = np.diff(frames)
    # one frame per TR, plus one skipped frame each time 86.5 samples per TR add up to a hop
    assert set(steps.tolist()) == {1, 2}
    assert (steps == 2).sum() == pytest.approx(3000 * (TR * SR - geometry.hop) / geometry.hop, abs=1)
    assert frames[0] == 1  # frame 0 is centred before the audio starts


def test_a_click_moves_the_frame_of_its_tr_most() -> None:
    """An impulse in the middle of TR t changes conv7 frame tr_frames(t) more than any other."""
    torch.manual_seed(1)
    net = SoundNet8().eval()
    n_trs = 12
    base = torch.from_numpy(natural_like(n_trs * TR, seed=5))[None] * 0.1
    with torch.no_grad():
        reference = net(base)["conv7"][0]
        for t in (2, 7):
            clicked = base.clone()
            middle = int(Fraction(2 * t + 1, 2) * Fraction("1.49") * SR)
            clicked[0, middle - 8:middle + 8] += 0.9
            change = (net(clicked)["conv7"][0] - reference).abs().sum(dim=0)
            assert int(change.argmax()) == tr_frames(n_trs, TR)[t]


def test_conditions_train_the_right_layers() -> None:
    assert trained_layers("head") == () and trained_layers("null") == ()
    assert trained_layers("conv4") == ("conv4", "conv5", "conv6", "conv7")
    assert trained_layers("conv7") == ("conv7",)
    assert prefix_layer("conv4") == "conv3" and prefix_layer("head") == "conv7"
    for condition in CONDITIONS:
        model = make_model(condition)
        trained = {name.split(".")[2] for name, p in model.named_parameters()
                   if p.requires_grad and name.startswith("backbone.")}
        assert trained == set(trained_layers(condition))
        # a conv bias before window-statistics BN has a zero gradient: not trained
        assert not any(p.requires_grad for name, p in model.named_parameters()
                       if name.startswith("backbone.") and name.endswith("conv.bias"))
        assert all(p.requires_grad for p in model.heads.parameters())
    with pytest.raises(ValueError, match="unknown condition 'conv3'"):
        make_model("conv3")


def test_frozen_layers_stay_in_eval_mode_unless_asked() -> None:
    model = make_model("conv5").train()
    modes = {name: block.training for name, block in model.backbone.blocks.items()}
    assert modes == {"conv1": False, "conv2": False, "conv3": False, "conv4": False,
                     "conv5": True, "conv6": True, "conv7": True}
    assert model.prefix_cacheable
    study = make_model("conv5", batchnorm="batch-stats").train()
    assert all(block.training for block in study.backbone.blocks.values())
    assert not study.prefix_cacheable
    frozen_stats = make_model("conv5", batchnorm="eval").train()
    assert not any(block.training for block in frozen_stats.backbone.blocks.values())


def test_window_batchnorm_is_per_window_and_batch_invariant() -> None:
    torch.manual_seed(0)
    bn = WindowBatchNorm(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 50) * 3 + 1
    joint = bn.train()(x)
    running_joint = bn.running_mean.clone(), bn.running_var.clone()
    bn.reset_running_stats()
    apart = torch.cat([bn(x[:1]), bn(x[1:])])
    torch.testing.assert_close(joint, apart)
    # window 0 is normalised by its own statistics only
    own = (x[0] - x[0].mean(1, keepdim=True)) / torch.sqrt(x[0].var(1, unbiased=False, keepdim=True) + bn.eps)
    torch.testing.assert_close(joint[0], own * bn.weight[:, None] + bn.bias[:, None])
    # running statistics move once per call, towards the mean over windows (what DDP averages)
    m = bn.momentum
    expected_mean = (1 - m) * 0 + m * x.mean(2).mean(0)
    torch.testing.assert_close(running_joint[0], expected_mean)
    expected_var = (1 - m) * 1 + m * x.var(2, unbiased=True).mean(0)
    torch.testing.assert_close(running_joint[1], expected_var)


@pytest.mark.parametrize("condition", ["head", "conv6", "conv4"])
def test_cached_features_equal_computed_ones(episode: Episode, condition: str) -> None:
    """The frozen-feature cache gives the numbers the network computes on the window's audio,
    and both equal conv7 over the whole episode (eval mode), to float rounding."""
    model = make_model(condition, batchnorm="eval").eval()
    cached = EpisodeSet("train", [episode], model, TR, 16, use_cache=True)
    cached.build_cache()
    direct = EpisodeSet("train", [episode], model, TR, 16, use_cache=False)
    geometry = cached.geometries[0]
    whole = model.episode_features(episode.waveform, geometry, "conv7")
    with torch.no_grad():
        for start in (0, 1, 11, 20):  # run start (zero context), inside, end of the run
            items = [(0, start)]
            a, valid = model.features_from_prefix(cached.batch(items).prefix, cached.batch(items).windows)
            b, _ = model.features_from_prefix(direct.batch(items).prefix, direct.batch(items).windows)
            first = max(0, start - 2)
            expected = torch.zeros_like(a[0])
            expected[:, valid[0]] = whole[:, geometry.frames[first:start + 16]]
            scale = float(expected.abs().max())
            assert float((a[0] - b[0]).abs().max()) <= 1e-5 * scale
            assert float((a[0] - expected).abs().max()) <= 1e-5 * scale
            assert int((~valid[0]).sum()) == max(0, 2 - start)


def test_cache_is_used_only_where_exact(episode: Episode) -> None:
    study = make_model("conv4", batchnorm="batch-stats")
    assert not EpisodeSet("train", [episode], study, TR, 16, use_cache=True).use_cache
    assert EpisodeSet("train", [episode], make_model("conv4"), TR, 16, use_cache=True).use_cache


def test_windows_of_a_batch_have_one_shape_and_real_history(episode: Episode) -> None:
    model = make_model("conv4")
    geometry = EpisodeGeometry(episode.n_trs, len(episode.waveform), tr=TR, prefix="conv3", context=2,
                               window_trs=16)
    slices = [geometry.window(start) for start in range(0, episode.n_trs - 15)]
    assert {s.prefix_stop - s.prefix_start for s in slices} == {geometry.prefix_length}
    assert all(s.prefix_start % geometry.ratio == 0 for s in slices)  # on the conv7 frame grid
    # inside the run the head's context is real audio: no zero columns
    assert [s.n_zero for s in slices[:4]] == [2, 1, 0, 0]
    with pytest.raises(ValueError, match="fewer than train.window_trs"):
        EpisodeGeometry(10, 20 * SR, tr=TR, prefix="conv3", context=2, window_trs=16)
    assert model.kernel_trs == 3


def test_predict_run_matches_the_training_path(episode: Episode) -> None:
    model = make_model("conv6", batchnorm="eval").eval()
    predicted = model.predict_run(episode.waveform, episode.n_trs, "sub-01", tr=TR)
    assert predicted.shape == (episode.n_trs, 4) and np.isfinite(predicted).all()
    episodes = EpisodeSet("validation", [episode], model, TR, 16, use_cache=False)
    with torch.no_grad():
        batch = episodes.batch([(0, 20)])
        window = model(batch.prefix, batch.windows, batch.rows)["sub-01"][0].numpy()
    np.testing.assert_allclose(window, predicted[20:36], rtol=1e-4, atol=1e-5 * np.abs(predicted).max())


def test_group_model_has_one_head_per_subject() -> None:
    model = make_model("conv4", subjects={"sub-01": 4, "sub-02": 7})
    assert model.subjects == ["sub-01", "sub-02"]
    assert model.heads["sub-02"].n_targets == 7
    backbone = {n for n, _ in model.named_parameters() if n.startswith("backbone.")}
    assert len(backbone) == len({n for n, _ in make_model("conv4").named_parameters() if n.startswith("backbone.")})
    with pytest.raises(KeyError, match="no head for subject 'sub-03'"):
        model.head("sub-03", torch.zeros(1, 1024, 5))


def test_head_standardises_with_a_floor() -> None:
    model = make_model("head")
    head = model.heads["sub-01"]
    std = torch.ones(1024)
    std[:10] = 0.0  # channels silent in training
    head.set_input_statistics(torch.zeros(1024), std)
    assert float(head.input_scale.min()) == pytest.approx(0.1 * float(std.mean()))
    fresh = EncodingModel({"sub-01": 3}, kernel_trs=2, condition="head")
    assert float(fresh.heads["sub-01"].conv.weight.detach().abs().sum()) == 0  # heads start at zero
    assert plain_backbone(model).blocks["conv4"].bn.__class__ is torch.nn.BatchNorm1d
    assert math.isclose(float(head.input_scale.max()), 1.0)


def test_recalibration_sets_running_statistics_to_the_window_average(episode: Episode) -> None:
    from training.batches import recalibrate_batchnorm

    model = make_model("conv6")
    episodes = EpisodeSet("train", [episode], model, TR, 16, use_cache=True)
    episodes.build_cache()
    recalibrate_batchnorm(model, episodes, "cpu")
    bn = model.backbone.blocks["conv6"].bn
    assert bn.momentum == 0.1  # restored
    # expected: the mean over the tiling's windows of each window's own statistics at conv6
    starts = episodes.geometries[0].windows(0)
    batch = episodes.batch([(0, s) for s in starts])
    with torch.no_grad():  # the trunk's input (conv5's output, cached) through conv6's convolution
        pre_bn = model.backbone.blocks["conv6"].conv(batch.prefix)
    torch.testing.assert_close(bn.running_mean, pre_bn.mean(2).mean(0), rtol=1e-4, atol=1e-5)
    n = pre_bn.shape[2]
    torch.testing.assert_close(bn.running_var, (pre_bn.var(2, unbiased=False) * n / (n - 1)).mean(0),
                               rtol=1e-4, atol=1e-5)


def test_the_fused_inference_copy_is_not_part_of_the_model(episode: Episode) -> None:
    model = make_model("conv4")
    keys = set(model.state_dict())
    EpisodeSet("train", [episode], model, TR, 16).build_cache()  # builds the fused prefix
    assert set(model.state_dict()) == keys
    assert not any("fast" in name for name, _ in model.named_modules())


@pytest.mark.parametrize("damage", ["truncated", "not an array", "wrong shape"])
def test_a_damaged_feature_cache_file_is_recomputed_with_a_warning_naming_it(episode: Episode, tmp_path,
                                                                             damage: str) -> None:
    """The on-disk feature cache is only a cache: a file cut short (a full disk, a killed copy)
    or of the wrong content is named in a warning, removed and recomputed, never a raw numpy
    error that stops the run."""
    model = make_model("conv4").eval()
    first = EpisodeSet("train", [episode], model, TR, 16, use_cache=True)
    first.build_cache(folder=tmp_path)
    (path,) = tmp_path.glob("*.npy")
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "not an array":
        path.write_bytes(b"garbage")
    else:
        np.save(path, np.zeros(5, dtype=np.float32))
    again = EpisodeSet("train", [episode], model, TR, 16, use_cache=True)
    with pytest.warns(UserWarning, match=f"{path.name}: unreadable feature-cache file .*recomputing it"):
        again.build_cache(folder=tmp_path)
    assert torch.equal(again.cache[0], first.cache[0])
    assert path.read_bytes() == good  # rewritten, complete


# ---- files: save_pretrained / from_pretrained -------------------------------------------------

def test_save_pretrained_then_from_pretrained_predicts_identically(episode: Episode, tmp_path) -> None:
    """A group model in a trained condition, with input statistics and target names, survives
    the round trip bit for bit, as a HEAR checkpoint whose backbone the plugin serves."""
    from hear_brainsoundnet.checkpoints import load_checkpoint

    model = make_model("conv5", subjects={"sub-01": 4, "sub-02": 2}, kernel=4).eval()
    with torch.no_grad():
        model.backbone.blocks["conv6"].conv.weight.mul_(1.5)  # not the pretrained or a default init
        for head in model.heads.values():
            head.set_input_statistics(torch.rand(1024), torch.rand(1024) + 0.5)
    model.target_names = {"sub-01": ["a", "b", "c", "d"], "sub-02": ["e", "f"]}
    model.tr = 2.0
    path = model.save_pretrained(tmp_path / "model.safetensors", provenance={"metrics": {"r": 0.5}})
    state = torch.get_rng_state()
    loaded = EncodingModel.from_pretrained(path)
    assert torch.equal(torch.get_rng_state(), state)  # loading does not move the caller's seed
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert (loaded.condition, loaded.batchnorm, loaded.kernel_trs, loaded.tr) == ("conv5", "frozen-eval", 4, 2.0)
    assert loaded.target_names == model.target_names and loaded.provenance["metrics"] == {"r": 0.5}
    assert not loaded.training
    for subject in ("sub-01", "sub-02"):
        a = model.predict_run(episode.waveform, episode.n_trs, subject, tr=TR)
        b = loaded.predict_run(episode.waveform, episode.n_trs, subject, tr=TR)
        assert np.array_equal(a, b) and np.abs(a).max() > 0, subject
    checkpoint = load_checkpoint(path)  # what hear_brainsoundnet.load_model reads
    for key, value in plain_backbone(model).state_dict().items():
        assert torch.equal(value, checkpoint.model.state_dict()[key]), key
    assert sorted(checkpoint.extra) == sorted(f"head.{s}.{n}" for s in ("sub-01", "sub-02")
                                              for n in ("weight", "bias", "input_mean", "input_scale"))
    folder = tmp_path / "hub"  # a folder, as on the Hub: model.safetensors inside
    folder.mkdir()
    assert loaded.save_pretrained(folder) == folder / "model.safetensors"
    again = EncodingModel.from_pretrained(folder)
    assert again.provenance == loaded.provenance and again.subjects == ["sub-01", "sub-02"]


def test_from_pretrained_refuses_a_checkpoint_without_brain_heads(tmp_path) -> None:
    from hear_brainsoundnet.checkpoints import CheckpointError, save_checkpoint

    path = save_checkpoint(tmp_path / "plain.safetensors", SoundNet8())
    with pytest.raises(CheckpointError, match=r"plain\.safetensors: no brain head in this checkpoint"):
        EncodingModel.from_pretrained(path)
    with pytest.raises(ValueError, match="target_names of 'sub-01': 2 names for a subject with 4 targets"):
        EncodingModel({"sub-01": 4}, target_names={"sub-01": ["a", "b"]})
