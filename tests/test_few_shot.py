"""Few-shot curves (training.few_shot) and their paired statistics (training.few_shot_stats).

Embedding folders are written here in heareval's exact format (what its embeddings runner
writes: metadata, vocabulary, ground truth, per-file and per-split arrays, the done marker);
one end-to-end test runs heareval's real embeddings runner on a generated task.
"""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training import few_shot, few_shot_data, few_shot_predictors, few_shot_stats
from training.few_shot import PointStore, run_few_shot
from training.few_shot_data import FewShotError, SkipPoint, draw_indices, fold_plans, read_task_meta

ROOT = Path(__file__).resolve().parents[1]


# ---- heareval-format embedding folders ---------------------------------------------------------

def write_embedding_task(root: Path, name: str, splits: dict, *, vocabulary, evaluation=("top1_acc",),
                         prediction_type="multiclass", split_mode="trainvaltest",
                         embedding_type="scene", module="hear_module", evaluation_params=None) -> Path:
    """``root/<module>/<name>/`` as heareval's embeddings runner writes it.

    ``splits``: {split: (files, labels (lists, may hold ints), X (n, dim))}."""
    task = root / module / name
    task.mkdir(parents=True)
    meta = {"task_name": name.split("-")[0], "version": "v1", "embedding_type": embedding_type,
            "prediction_type": prediction_type, "split_mode": split_mode, "splits": list(splits),
            "sample_duration": 1.0, "evaluation": list(evaluation)}
    if evaluation_params:
        meta["evaluation_params"] = evaluation_params
    (task / "task_metadata.json").write_text(json.dumps(meta))
    (task / "labelvocabulary.csv").write_text("idx,label\n" + "".join(f"{i},{v}\n" for i, v in enumerate(vocabulary)))
    for split, (files, labels, X) in splits.items():
        (task / f"{split}.json").write_text(json.dumps(dict(zip(files, labels))))
        (task / split).mkdir()
        for f, label, x in zip(files, labels, X):
            np.save(task / split / f"{f}.embedding.npy", x.astype(np.float32))
            (task / split / f"{f}.target-labels.json").write_text(json.dumps(label))
        memmap = np.memmap(task / f"{split}.embeddings.npy", dtype=np.float32, mode="w+", shape=X.shape)
        memmap[:] = X
        memmap.flush()
        (task / f"{split}.embedding-dimensions.json").write_text(json.dumps(list(X.shape)))
        (task / f"{split}.target-labels.pkl").write_bytes(pickle.dumps(labels))
    (task / ".done.embeddings").write_text("")
    return task


def separable_split(rng, split: str, per_class: dict, dim: int, informative: bool, shift: float = 4.0):
    """Files of 4 classes; the informative embedding shifts each class along its own axis."""
    files, labels, rows = [], [], []
    for c, (label, n) in enumerate(per_class.items()):
        for i in range(n):
            x = rng.standard_normal(dim)
            if informative:
                x[c] += shift
            files.append(f"{split}_{label}_{i:03d}.wav")
            labels.append([label])
            rows.append(x)
    return files, labels, np.array(rows)


CLASSES = ("a", "b", "c", "d")


def separable_task(root: Path, informative: bool, *, train=16, valid=8, test=30, dim=16, seed=0,
                   name="sep-v1-full", **kwargs) -> Path:
    rng = np.random.default_rng(seed + (100 if informative else 0))
    sizes = {"train": train, "valid": valid, "test": test}
    splits = {s: separable_split(rng, s, {c: n if isinstance(n, int) else n[c] for c in CLASSES},
                                 dim, informative) for s, n in sizes.items() if n}
    return write_embedding_task(root, name, splits, vocabulary=CLASSES, **kwargs)


def quiet(_message: str) -> None:
    pass


# ---- known answer ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def known_answer(tmp_path_factory):
    root = tmp_path_factory.mktemp("known")
    dirs = {"carries": root / "carries", "lacks": root / "lacks"}
    separable_task(dirs["carries"], informative=True)
    separable_task(dirs["lacks"], informative=False)
    messages = []
    result = run_few_shot(dirs, root / "out", ks=(1, 4, 16), draws=4, seed=0, baseline="lacks",
                          progress=False, log=messages.append)
    return root, dirs, result, messages


def test_embedding_carrying_the_feature_wins_at_every_k_and_its_curve_rises(known_answer):
    _, _, result, _ = known_answer
    curve = result.scores.groupby(["checkpoint", "k"])["score"].mean().unstack("checkpoint")
    assert list(curve.index) == [1, 4, 16]
    assert (curve["carries"] > curve["lacks"] + 0.15).all(), curve
    carries = curve["carries"].to_numpy()
    assert carries[0] < carries[1] < carries[2] and carries[2] >= 0.85 and carries[0] <= 0.75, curve
    assert (curve["lacks"] < 0.45).all()  # chance is 0.25
    # One row per (checkpoint, k, draw): a trainvaltest task has the single fold 0.
    assert len(result.scores) == 2 * 3 * 4 and set(result.scores["fold"]) == {0}
    assert set(result.scores["metric"]) == {"top1_acc"}
    assert set(result.scores.loc[result.scores["k"] == 4, "n_train"]) == {16}


def test_outputs_table_plots_and_csv(known_answer):
    root, _, result, _ = known_answer
    out = root / "out"
    long = pd.read_csv(out / "few_shot.csv")
    assert list(long.columns[:7]) == ["checkpoint", "task", "k", "draw", "fold", "score", "metric"]
    pd.testing.assert_frame_equal(long, result.scores, check_dtype=False)
    md = (out / "few_shot.md").read_text()
    assert "| sep-v1-full" in md and "improved significantly on" in md
    assert "too few pairs for a test: 1 subjects' checkpoints" in md  # one compared checkpoint
    for name in ("few_shot_sep-v1-full.png", "few_shot_difference.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = pd.read_csv(out / "few_shot_curves.csv")
    row = curves[(curves["checkpoint"] == "carries") & (curves["k"] == 4)].iloc[0]
    assert row["n_draws"] == 4 and row["ci_low"] < row["mean"] < row["ci_high"]


def test_draws_are_reproducible_for_a_seed_and_independent_of_the_embeddings():
    labels = [(c,) for c in CLASSES for _ in range(10)]
    first = draw_indices(labels, 3, seed=7, task="t", fold=0, draw=2)
    assert np.array_equal(first, draw_indices(labels, 3, seed=7, task="t", fold=0, draw=2))
    assert not np.array_equal(first, draw_indices(labels, 3, seed=7, task="t", fold=0, draw=3))
    assert not np.array_equal(first, draw_indices(labels, 3, seed=8, task="t", fold=0, draw=2))
    assert [labels[i][0] for i in first] == [c for c in CLASSES for _ in range(3)]
    # Nested across k: the 3-shot set contains the 2-shot set of the same draw.
    assert set(draw_indices(labels, 2, seed=7, task="t", fold=0, draw=2)) <= set(first)


def test_the_same_draws_for_every_checkpoint(known_answer, tmp_path):
    root, dirs, result, _ = known_answer
    again = run_few_shot(dirs, tmp_path / "again", ks=(1, 4, 16), draws=4, seed=0, baseline="lacks",
                         progress=False, log=quiet)
    pd.testing.assert_frame_equal(again.scores, result.scores)
    other = run_few_shot(dirs, tmp_path / "seed1", ks=(1,), draws=4, seed=1, baseline=None,
                         progress=False, log=quiet)
    assert not np.allclose(other.scores["score"], result.scores.query("k == 1")["score"])


# ---- bad input and special tasks ---------------------------------------------------------------

def test_k_larger_than_the_smallest_class_is_skipped_with_a_message(tmp_path):
    small = {"a": 10, "b": 10, "c": 3, "d": 10}
    separable_task(tmp_path / "emb", True, train=small, valid=4, test=4)
    messages = []
    result = run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out", ks=(2, 3, 4, 8), draws=2,
                          baseline=None, progress=False, log=messages.append)
    assert sorted(set(result.scores["k"])) == [2, 3]
    skips = [m for m in messages if "smallest class" in m]
    assert skips == [f"task sep-v1-full: k={k} is larger than the smallest class ('c': 3 "
                     "training example(s)); point skipped" for k in (4, 8)]
    assert "k=8 is larger" in (tmp_path / "out" / "few_shot.md").read_text()
    with pytest.raises(SkipPoint, match="k=4"):
        draw_indices([(c,) for c, n in small.items() for _ in range(n)], 4, seed=0, task="t", fold=0, draw=0)


def test_task_without_validation_split_carves_a_seeded_stratified_one(tmp_path):
    separable_task(tmp_path / "emb", True, train=20, valid=0, test=10)
    meta = read_task_meta(tmp_path / "emb" / "hear_module" / "sep-v1-full")
    assert meta.splits == ("train", "test") and fold_plans(meta)[0].valid == ()
    messages = []
    result = run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out", ks=(1, 16, 17), draws=2,
                          baseline=None, progress=False, log=messages.append)
    assert any("no validation split; C is chosen on a seeded stratified 20% of train (16 files), "
               "the other 64 are the k-shot pool" in m for m in messages)
    # 20 per class minus the 4 carved out: 16 shots fit, 17 do not.
    assert sorted(set(result.scores["k"])) == [1, 16]
    assert any("k=17 is larger than the smallest class" in m for m in messages)
    pool, valid = few_shot_data.carve_validation(few_shot_data.read_split(meta, "train"), seed=0, task=meta.name, fold=0)
    assert not set(pool.files) & set(valid.files) and len(valid.files) == 16
    again = few_shot_data.carve_validation(few_shot_data.read_split(meta, "train"), seed=0, task=meta.name, fold=0)[1]
    assert again.files == valid.files


def test_integer_labels_are_compared_as_strings(tmp_path):
    rng = np.random.default_rng(3)
    pitches = [60, 61, 62]

    def split(name, n):
        labels = [[p] for p in pitches for _ in range(n)]  # JSON numbers, as hearpreprocess writes
        X = rng.standard_normal((len(labels), 8))
        X[np.arange(len(labels)), [pitches.index(l[0]) for l in labels]] += 6.0
        return [f"{name}_{i}.wav" for i in range(len(labels))], labels, X

    write_embedding_task(tmp_path / "emb", "pitch-v1-full", {"train": split("train", 6), "valid": split("valid", 3),
                                                            "test": split("test", 5)},
                         vocabulary=[str(p) for p in pitches], evaluation=("pitch_acc", "chroma_acc"))
    result = run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out", ks=(2,), draws=2, baseline=None,
                          progress=False, log=quiet)
    assert set(result.scores["metric"]) == {"pitch_acc"} and (result.scores["score"] >= 0.8).all()  # chance 0.33


def test_kfold_task_uses_heareval_folds_and_draws_within_each_training_pool(tmp_path):
    from heareval.predictions.task_predictions import get_splits_from_metadata

    rng = np.random.default_rng(5)
    folds = {f"fold{i:02d}": separable_split(rng, f"fold{i:02d}", {c: 4 for c in CLASSES}, 12, True, 5.0)
             for i in range(4)}
    write_embedding_task(tmp_path / "emb", "kf-v1-full", folds, vocabulary=CLASSES, split_mode="new_split_kfold")
    meta = read_task_meta(tmp_path / "emb" / "hear_module" / "kf-v1-full")
    ours = [{"train": list(p.train), "valid": list(p.valid), "test": list(p.test)} for p in fold_plans(meta)]
    assert ours == get_splits_from_metadata({"split_mode": "new_split_kfold", "splits": list(folds)})
    messages = []
    result = run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out", ks=(2, 8, 9), draws=2, baseline=None,
                          progress=False, log=messages.append)
    # Train = 2 folds of 4 per class: 8 fits, 9 does not (in every fold).
    assert sorted(set(result.scores["k"])) == [2, 8]
    assert set(result.scores["fold"]) == {0, 1, 2, 3} and len(result.scores) == 2 * 2 * 4
    assert [m for m in messages if "k=9 is larger" in m] == [
        f"task kf-v1-full (test fold fold0{i}): k=9 is larger than the smallest class ('a': 8 training "
        "example(s)); point skipped" for i in range(4)]
    assert result.scores.query("k == 8")["score"].mean() > 0.8
    curves = pd.read_csv(tmp_path / "out" / "few_shot_curves.csv")
    per_draw = result.scores.groupby(["k", "draw"])["score"].mean().groupby("k").mean()
    assert np.allclose(curves.set_index("k")["mean"].sort_index(), per_draw.sort_index())


def test_multilabel_task_draws_k_per_label_and_scores_map(tmp_path):
    rng = np.random.default_rng(9)
    vocab = ["x", "y", "z"]

    def split(name, n):
        files, labels, rows = [], [], []
        for i in range(n):
            present = [v for v in vocab if rng.random() < 0.4] or [vocab[i % 3]]
            x = rng.standard_normal(10)
            for v in present:
                x[vocab.index(v)] += 3.0
            files.append(f"{name}_{i:03d}.wav"), labels.append(present), rows.append(x)
        return files, labels, np.array(rows)

    write_embedding_task(tmp_path / "emb", "ml-v1-full", {"train": split("train", 60), "valid": split("valid", 30),
                                                         "test": split("test", 40)},
                         vocabulary=vocab, evaluation=("mAP", "d_prime"), prediction_type="multilabel")
    meta = read_task_meta(tmp_path / "emb" / "hear_module" / "ml-v1-full")
    train = few_shot_data.read_split(meta, "train")
    index = draw_indices(train.labels, 3, seed=0, task=meta.name, fold=0, draw=0, multilabel=True)
    counts = few_shot_data.class_counts([train.labels[i] for i in index])
    assert all(counts[v] >= 3 for v in vocab) and len(index) <= 9
    result = run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out", ks=(1, 8), draws=2, baseline=None,
                          progress=False, log=quiet)
    assert set(result.scores["metric"]) == {"mAP"}
    means = result.scores.groupby("k")["score"].mean()
    assert means[8] > 0.85 and means[8] > means[1]


@pytest.mark.parametrize("labels, clash", [(["60", "060", "61"], "60"), (["a", "7", "07.0"], None),
                                           (["x", "y", "x"], "x")])
def test_vocabulary_labels_that_collide_as_strings_are_refused(tmp_path, labels, clash):
    """pandas reads 60 and 060 both as 60: heareval would merge the two labels."""
    task = separable_task(tmp_path / "emb", True, train=2, valid=1, test=1)
    (task / "labelvocabulary.csv").write_text("idx,label\n" + "".join(f"{i},{v}\n" for i, v in enumerate(labels)))
    if clash is None:  # a column with text is read as text: 7 and 07.0 stay apart
        assert read_task_meta(task).vocabulary == tuple(labels)
        return
    with pytest.raises(FewShotError, match=rf"task sep-v1-full: .*labelvocabulary\.csv lists label\(s\) "
                                           rf"\['{clash}'\] more than once \(as heareval reads them: as strings\)"):
        read_task_meta(task)


def test_event_tasks_and_bad_folders_give_clear_messages(tmp_path):
    separable_task(tmp_path / "emb", True, embedding_type="event", name="ev-v1-full")
    with pytest.raises(FewShotError, match="no task to run"):
        run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out", ks=(1,), draws=1, baseline=None,
                     progress=False, log=quiet)
    with pytest.raises(FewShotError, match="no such embeddings folder"):
        run_few_shot({"m": tmp_path / "nowhere"}, tmp_path / "out", ks=(1,), baseline=None, progress=False,
                     log=quiet)
    with pytest.raises(FewShotError, match="ks must be integers >= 1"):
        few_shot.parse_ks("0,2")
    with pytest.raises(FewShotError, match="comma-separated integers"):
        few_shot.parse_ks("1,two")
    task = separable_task(tmp_path / "emb2", True)
    (task / "train" / "train_a_000.wav.embedding.npy").unlink()
    with pytest.raises(FewShotError, match=r"missing .*train_a_000\.wav\.embedding\.npy"):
        run_few_shot({"m": tmp_path / "emb2"}, tmp_path / "out2", ks=(1,), baseline=None, progress=False, log=quiet)
    with pytest.raises(FewShotError, match="baseline 'pretrained' is not one of"):
        run_few_shot({"m": tmp_path / "emb2"}, tmp_path / "out3", ks=(1,), progress=False, log=quiet)


# ---- resume ------------------------------------------------------------------------------------

def test_resume_computes_only_missing_points(tmp_path, monkeypatch):
    dirs = {"p": tmp_path / "p", "q": tmp_path / "q"}
    separable_task(dirs["p"], True)
    separable_task(dirs["q"], False)
    fits = []
    real = few_shot.fit_probe
    monkeypatch.setattr(few_shot, "fit_probe", lambda *a, **k: fits.append(1) or real(*a, **k))
    first = run_few_shot(dirs, tmp_path / "out", ks=(1, 2), draws=2, baseline="p", progress=False, log=quiet)
    assert len(fits) == 2 * 2 * 2 and first.computed == 8
    # A kill while a line was being written: the cut line is dropped and that point redone.
    points = tmp_path / "out" / few_shot.POINTS_FILE
    points.write_bytes(points.read_bytes() + b"q,sep-v1-full,4,0,0,0.5")
    fits.clear()
    full = run_few_shot(dirs, tmp_path / "out", ks=(1, 2, 4), draws=3, baseline="p", progress=False, log=quiet)
    assert len(fits) == 2 * 3 * 3 - 8 and full.computed == len(fits)
    fits.clear()
    again = run_few_shot(dirs, tmp_path / "out", ks=(1, 2, 4), draws=3, baseline="p", progress=False, log=quiet)
    assert fits == [] and again.computed == 0
    pd.testing.assert_frame_equal(again.scores, full.scores)
    fresh = run_few_shot(dirs, tmp_path / "fresh", ks=(1, 2, 4), draws=3, baseline="p", progress=False, log=quiet)
    pd.testing.assert_frame_equal(fresh.scores, full.scores)
    with pytest.raises(FewShotError, match="seed=0, not 1; use another output folder"):
        run_few_shot(dirs, tmp_path / "out", ks=(1,), draws=1, seed=1, baseline="p", progress=False, log=quiet)
    # Embeddings recomputed since (a new done marker): their old points must not be reused.
    import os
    marker = next(dirs["q"].glob("*/*/.done.embeddings"))
    os.utime(marker, ns=(marker.stat().st_atime_ns, marker.stat().st_mtime_ns + 10**9))
    with pytest.raises(FewShotError, match="embeddings of checkpoint 'q', task sep-v1-full .* were recomputed"):
        run_few_shot(dirs, tmp_path / "out", ks=(1,), draws=1, baseline="p", progress=False, log=quiet)


def test_point_store_rejects_a_foreign_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(FewShotError, match="not a few-shot points file"):
        PointStore(tmp_path / "x.csv")


def test_point_store_checks_the_header_before_cutting_anything(tmp_path):
    # No trailing newline: a points file would lose its cut last line, a foreign one nothing.
    foreign = b"name,size\nreport.pdf,120\nnotes.txt,4"
    (tmp_path / "x.csv").write_bytes(foreign)
    with pytest.raises(FewShotError, match=r"x\.csv: header \['name', 'size'\] .* not a few-shot points file"):
        PointStore(tmp_path / "x.csv")
    assert (tmp_path / "x.csv").read_bytes() == foreign
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(FewShotError, match="not a few-shot points file"):
        PointStore(tmp_path / "bin.csv")
    assert (tmp_path / "bin.csv").read_bytes() == b"\xff\xfe\x00binary"
    # A points file cut by a kill (its header included) loses only the cut part.
    cut = ",".join(few_shot.POINT_FIELDS).encode()[:20]
    (tmp_path / "cut.csv").write_bytes(cut)
    assert PointStore(tmp_path / "cut.csv").rows == {} and (tmp_path / "cut.csv").read_bytes() == b""


def test_point_store_reads_files_written_before_the_predictor_column(tmp_path):
    legacy = ",".join(few_shot.LEGACY_POINT_FIELDS) + "\nm,t,2,1,0,0.75,top1_acc,0.1,0.5,8\n"
    (tmp_path / "p.csv").write_text(legacy)
    store = PointStore(tmp_path / "p.csv")
    assert list(store.rows) == [("m", "t", 2, 1, 0, "probe")]
    assert store.rows[("m", "t", 2, 1, 0, "probe")]["score"] == 0.75
    assert (tmp_path / "p.csv").read_text().splitlines() == [",".join(few_shot.POINT_FIELDS),
                                                              "m,t,2,1,0,0.75,top1_acc,0.1,0.5,8,probe,"]


def test_skipped_points_are_stored_so_a_resume_reads_no_embeddings(tmp_path, monkeypatch):
    separable_task(tmp_path / "emb", True, train={"a": 6, "b": 6, "c": 3, "d": 6}, valid=4, test=4)
    first_messages = []
    first = run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out", ks=(2, 4, 8), draws=2, baseline=None,
                         progress=False, log=first_messages.append)
    stored = PointStore(tmp_path / "out" / few_shot.POINTS_FILE)
    skips = {key: row["skipped"] for key, row in stored.rows.items() if row["skipped"]}
    assert sorted(key[2:4] for key in skips) == [(4, 0), (4, 1), (8, 0), (8, 1)]
    assert skips[("m", "sep-v1-full", 8, 1, 0, "probe")] == (
        "task sep-v1-full: k=8 is larger than the smallest class ('c': 3 training example(s)); point skipped")
    md = (tmp_path / "out" / "few_shot.md").read_text()
    reads = []
    real = few_shot.read_split
    monkeypatch.setattr(few_shot, "read_split", lambda *a, **k: reads.append(a[1]) or real(*a, **k))
    again_messages = []
    again = run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out", ks=(2, 4, 8), draws=2, baseline=None,
                         progress=False, log=again_messages.append)
    assert reads == [] and again.computed == 0
    assert again_messages == first_messages and again.skipped == first.skipped
    assert (tmp_path / "out" / "few_shot.md").read_text() == md
    pd.testing.assert_frame_equal(again.scores, first.scores)
    assert set(again.scores["k"]) == {2}  # skips are not scores


def test_a_task_without_validation_split_says_so_again_on_resume_from_labels_alone(tmp_path, monkeypatch):
    separable_task(tmp_path / "emb", True, train=10, valid=0, test=4)
    first = run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out", ks=(1, 9), draws=1, baseline=None,
                         progress=False, log=quiet)
    loaded = []
    monkeypatch.setattr(few_shot_data.np, "load", lambda *a, **k: loaded.append(a) or np.zeros(1))
    again = run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out", ks=(1, 9), draws=1, baseline=None,
                         progress=False, log=quiet)
    assert loaded == [] and again.skipped == first.skipped
    assert any("no validation split" in m for m in again.skipped) and any("k=9 is larger" in m for m in again.skipped)


# ---- statistics --------------------------------------------------------------------------------

def synthetic_scores(effect: float, n_subjects: int, tasks=("t1", "t2", "t3"), draws=3, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for task in tasks:
        for k in (1, 4):
            base = rng.uniform(0.4, 0.6, size=draws)
            for draw in range(draws):
                rows.append(("pretrained", task, k, draw, 0, base[draw]))
            for s in range(n_subjects):
                shift = effect + rng.normal(0, 0.01)
                for draw in range(draws):
                    rows.append((f"sub-{s:02d}", task, k, draw, 0, base[draw] + shift + rng.normal(0, 0.005)))
    frame = pd.DataFrame(rows, columns=["checkpoint", "task", "k", "draw", "fold", "score"])
    return frame.assign(metric="top1_acc")


def test_stats_find_a_known_effect_and_no_false_one():
    effect = few_shot_stats.paired_stats(synthetic_scores(0.05, 8), "pretrained")
    assert len(effect) == 6 and (effect["n_pairs"] == 8).all()
    assert effect["improved"].all() and (effect["q"] < 0.05).all() and (effect["q"] >= effect["p"]).all()
    assert np.allclose(effect["mean_diff"], 0.05, atol=0.01)
    lines = few_shot_stats.summary_lines(effect)
    assert lines[0].startswith("k=1: improved significantly on 3 of 3 tasks, worse on 0")
    null = few_shot_stats.paired_stats(synthetic_scores(0.0, 8, seed=1), "pretrained")
    assert not null["significant"].any() and (null["p"] > 0.05).any()
    worse = few_shot_stats.paired_stats(synthetic_scores(-0.05, 8), "pretrained")
    assert worse["significant"].all() and not worse["improved"].any()
    assert few_shot_stats.summary_lines(worse)[1].startswith("k=4: improved significantly on 0 of 3 tasks, worse on 3")


def test_stats_say_when_there_are_too_few_subjects():
    table = few_shot_stats.paired_stats(synthetic_scores(0.05, 3), "pretrained")
    assert table["p"].isna().all() and not table["significant"].any()
    assert set(table["note"]) == {"too few pairs for a test: 3 subjects' checkpoints; the smallest possible "
                                  "two-sided p is 0.25 >= 0.05"}
    assert "3 task(s) without a test" in few_shot_stats.summary_lines(table)[0]
    # Pairs over draws instead: 8 draws of 3 checkpoints can be tested.
    draws = few_shot_stats.paired_stats(synthetic_scores(0.05, 3, draws=8), "pretrained", unit="draw")
    assert (draws["n_pairs"] == 8).all() and draws["improved"].all()


def test_stats_name_a_checkpoint_with_no_draws_in_common_with_the_baseline():
    scores = synthetic_scores(0.05, 7, tasks=("t",), draws=3)
    # sub-00's draws are 3..5, the baseline's 0..2: nothing to pair, it is left out and named.
    apart = pd.concat([scores[scores["checkpoint"] != "sub-00"],
                       scores[scores["checkpoint"] == "sub-00"].assign(draw=lambda f: f["draw"] + 3)])
    table = few_shot_stats.paired_stats(apart, "pretrained")
    assert (table["n_pairs"] == 6).all() and table["mean_diff"].notna().all()
    assert set(table["note"]) == {"no draws in common with pretrained: sub-00 (left out)"}
    assert table["improved"].all()  # the other 6 subjects still give a test
    alone = few_shot_stats.paired_stats(apart, "pretrained", ["sub-00"])
    assert (alone["n_pairs"] == 0).all() and alone["p"].isna().all() and alone["mean_diff"].isna().all()
    assert set(alone["note"]) == {"no draws in common with pretrained: sub-00 (left out)"}
    assert "1 task(s) without a test: no draws in common with pretrained: sub-00" in few_shot_stats.summary_lines(alone)[0]
    by_draw = few_shot_stats.paired_stats(apart, "pretrained", ["sub-00"], unit="draw")
    assert (by_draw["n_pairs"] == 0).all() and set(by_draw["note"]) == set(alone["note"])


def test_stats_average_folds_within_a_draw_and_pair_only_common_draws():
    scores = synthetic_scores(0.05, 6, tasks=("t",), draws=2)
    twice = pd.concat([scores, scores.assign(fold=1, score=scores["score"] + 0.1)])
    table = few_shot_stats.paired_stats(twice, "pretrained")
    assert np.allclose(table["mean_baseline"], few_shot_stats.paired_stats(scores, "pretrained")["mean_baseline"] + 0.05)
    missing = scores[~((scores["checkpoint"] == "sub-00") & (scores["draw"] == 1))]
    assert (few_shot_stats.paired_stats(missing, "pretrained")["n_pairs"] == 6).all()
    with pytest.raises(ValueError, match=r"\['ghost'\] have no few-shot scores"):
        few_shot_stats.paired_stats(scores, "pretrained", ["ghost"])


# ---- end to end: heareval's real embeddings runner --------------------------------------------

def test_end_to_end_from_heareval_embeddings_runner_and_the_command_line(tmp_path):
    from training.hear_tasks import scene_task

    tasks = tmp_path / "tasks"
    scene_task(tasks, per_class=4, duration=1.0)
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([sys.executable, "-m", "training.heareval_compat", "embeddings", "hear_brainsoundnet",
                          "--tasks-dir", str(tasks), "--embeddings-dir", str(tmp_path / "emb")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    cli = subprocess.run([sys.executable, "-m", "training.few_shot", f"pretrained={tmp_path / 'emb'}",
                          "--out", str(tmp_path / "fs"), "--few-shot", "1,2,4,8", "--draws", "3",
                          "--few-shot-baseline", "none", "--no-progress"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "k=8 is larger than the smallest class" in cli.stdout + cli.stderr
    scores = pd.read_csv(tmp_path / "fs" / "few_shot.csv")
    assert sorted(set(scores["k"])) == [1, 2, 4] and len(scores) == 9
    assert set(scores["task"]) == {"synth_scene-v1-full"} and set(scores["metric"]) == {"top1_acc"}
    # Four distinct synthetic scene classes: well above chance (0.25) from 4 examples each.
    assert scores.query("k == 4")["score"].mean() >= 0.75


def test_heareval_predictor_trains_on_the_probes_k_shot_files(tmp_path, monkeypatch):
    """heareval's own predictor end to end (its real predictions runner, hear-eval's tiny grid)
    on the very files the probe drew; both predictors' points share the folder, never mix."""
    from training.hear_tasks import SUITES

    task = separable_task(tmp_path / "emb", True, train=5, valid=3, test=6, dim=8,
                          evaluation_params={"task_specific_param_grid": SUITES["tiny"]["grid"]})
    dirs = {"m": tmp_path / "emb"}
    probe_files = {}
    real_fit = few_shot.fit_probe
    monkeypatch.setattr(few_shot, "fit_probe", lambda train, *a, **k: probe_files.setdefault(
        len(train.files) // 4, train.files) and real_fit(train, *a, **k))
    probe = run_few_shot(dirs, tmp_path / "out", ks=(1, 3), draws=1, baseline=None, progress=False, log=quiet)
    written = {}
    real_write = few_shot.write_heareval_task

    def keep_a_copy(meta, folder, train, valid, test):
        folder = real_write(meta, folder, train, valid, test)
        k = len(train.files) // 4
        shape = tuple(json.loads((folder / "train.embedding-dimensions.json").read_text()))
        written[k] = (json.loads((folder / "train.json").read_text()),
                      np.array(np.memmap(folder / "train.embeddings.npy", dtype=np.float32, mode="r", shape=shape)),
                      pickle.loads((folder / "train.target-labels.pkl").read_bytes()),
                      json.loads((folder / "task_metadata.json").read_text()))
        return folder

    monkeypatch.setattr(few_shot, "write_heareval_task", keep_a_copy)
    result = run_few_shot(dirs, tmp_path / "out", ks=(1, 3), draws=1, baseline=None, progress=False,
                          log=quiet, predictor="heareval", heareval_grid_points=1)
    assert result.computed == 2 and set(result.scores["predictor"]) == {"heareval"}
    assert ((result.scores["score"] >= 0) & (result.scores["score"] <= 1)).all(), result.scores
    assert list(result.scores["n_train"]) == [4, 12] and result.scores["C"].isna().all()
    for k in (1, 3):
        truth, X, labels, meta = written[k]
        assert tuple(truth) == probe_files[k] and len(truth) == 4 * k  # the probe's very files
        assert labels == [[f.split("_")[1]] for f in truth]
        assert np.array_equal(X, np.stack([np.load(task / "train" / f"{f}.embedding.npy") for f in truth]))
        assert meta["split_mode"] == "trainvaltest"
        assert meta["evaluation_params"]["task_specific_param_grid"]["max_epochs"] == [15]  # the task's grid
    work = tmp_path / "out" / few_shot.HEAREVAL_WORK / "m"
    assert not (work / "sep-v1-full").exists()  # the batch's folders are removed, its log kept
    assert "Final Test Results" in (work / "sep-v1-full.predictions.log").read_text()
    # Both predictors' points are kept, each run reports its own.
    store = PointStore(tmp_path / "out" / few_shot.POINTS_FILE)
    assert sorted(key[-1] for key in store.rows) == ["heareval"] * 2 + ["probe"] * 2
    assert "heareval predictor" in (tmp_path / "out" / "few_shot.md").read_text()
    again = run_few_shot(dirs, tmp_path / "out", ks=(1, 3), draws=1, baseline=None, progress=False, log=quiet)
    assert again.computed == 0 and set(again.scores["predictor"]) == {"probe"}
    pd.testing.assert_frame_equal(again.scores, probe.scores)
    with pytest.raises(FewShotError, match=r"heareval_grid=\{'grid': 'default', 'grid_points': 1\}, not"):
        run_few_shot(dirs, tmp_path / "out", ks=(1,), draws=1, baseline=None, progress=False, log=quiet,
                     predictor="heareval", heareval_grid_points=2)


def test_a_failed_heareval_run_names_its_log_and_keeps_finished_points(tmp_path, monkeypatch):
    import training.heareval_compat as compat

    separable_task(tmp_path / "emb", True, train=4, valid=2, test=2)
    # A runner that fails at once, writing no scores (what a crashed heareval leaves).
    monkeypatch.setattr(compat, "command", lambda runner, args: [
        sys.executable, "-c", "import sys; print('predictor crashed: out of memory'); sys.exit(3)"])
    with pytest.raises(FewShotError, match=r"(?s)task sep-v1-full: heareval predictions runner \(exit 3\) on "
                                           r".*k1_draw0_fold0.*wrote no .*test\.predicted-scores\.json.*"
                                           r"sep-v1-full\.predictions\.log.*predictor crashed: out of memory"):
        run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out", ks=(1,), draws=1, baseline=None,
                     progress=False, log=quiet, predictor="heareval")
    kept = tmp_path / "out" / few_shot.HEAREVAL_WORK / "m" / "sep-v1-full" / "k1_draw0_fold0" / "sep-v1-full"
    assert (kept / "train.embeddings.npy").is_file()  # left for inspection
    assert PointStore(tmp_path / "out" / few_shot.POINTS_FILE).rows == {}
    with pytest.raises(FewShotError, match=r"heareval grid must be one of \['default', 'fast', 'faster'\], got 'huge'"):
        run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out2", ks=(1,), baseline=None, progress=False,
                     log=quiet, predictor="heareval", heareval_grid="huge")
    with pytest.raises(FewShotError, match=r"predictor must be one of \['probe', 'heareval'\], got 'mlp'"):
        run_few_shot({"m": tmp_path / "emb"}, tmp_path / "out2", ks=(1,), baseline=None, progress=False,
                     log=quiet, predictor="mlp")


def test_probe_in_the_span_of_the_training_rows_equals_the_full_fit():
    """fit_probe fits in a basis of the training rows when n < d (exact for L2 penalties):
    the same test predictions as scikit-learn's plain fit on all dimensions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(11)
    vocab = list(CLASSES)
    splits = [few_shot_data.Split(*(lambda f, l, X: (tuple(f), tuple(map(tuple, l)), X.astype(np.float32)))(
        *separable_split(rng, s, {c: n for c in CLASSES}, 200, True, 1.5))) for s, n in
        (("train", 3), ("valid", 10), ("test", 25))]
    train, valid, test = splits
    y = [l[0] for l in train.labels]
    for C in (1e-2, 1.0, 100.0):
        ours = few_shot_predictors.fit_probe(train, valid, test, vocab, "top1_acc", False, [C])
        full = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, tol=1e-8)).fit(train.X, y)
        expected = np.mean(full.predict(test.X) == np.array([l[0] for l in test.labels]))
        assert ours.score == pytest.approx(expected) and ours.C == C and 0.3 < expected < 0.95


def test_hear_eval_style_arguments(known_answer, tmp_path):
    """What ``python -m training hear-eval ... --few-shot KS --draws N`` hands to run_from_args."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    few_shot.add_few_shot_arguments(parser)
    assert few_shot.run_from_args(parser.parse_args(["x"]), {}, tmp_path / "off") is None  # off by default
    _, dirs, result, _ = known_answer
    args = parser.parse_args(["x", "--few-shot", "4,1", "--draws", "2", "--few-shot-baseline", "lacks",
                              "--few-shot-compare", "carries", "--few-shot-unit", "draw"])
    args.few_shot_progress = False
    messages = []
    got = few_shot.run_from_args(args, dirs, tmp_path / "fs", tasks=["sep-v1-full"], log=messages.append)
    expected = result.scores.query("k in (1, 4) and draw < 2").reset_index(drop=True)
    pd.testing.assert_frame_equal(got.scores, expected)
    assert set(got.stats["unit"]) == {"draw"} and (got.stats["n_pairs"] == 2).all()
    assert got.summary[0].startswith("k=1: improved significantly on 0 of 1 tasks")


def test_hear_eval_passes_the_predictor_and_its_own_grid(monkeypatch, tmp_path):
    """``hear-eval ... --few-shot-predictor heareval`` runs heareval's predictor with the
    ``--grid`` / ``--grid-points`` of the full-data run, so the two are comparable."""
    from training.cli import build_parser

    seen = {}
    monkeypatch.setattr(few_shot, "run_few_shot", lambda *a, **k: seen.update(k) or "ran")
    args = build_parser().parse_args(["hear-eval", "x", "--few-shot", "1,2", "--grid", "fast", "--grid-points", "3",
                                      "--few-shot-predictor", "heareval"])
    assert few_shot.run_from_args(args, {"x": tmp_path}, tmp_path / "fs") == "ran"
    assert (seen["predictor"], seen["heareval_grid"], seen["heareval_grid_points"]) == ("heareval", "fast", 3)
    default = build_parser().parse_args(["hear-eval", "x", "--few-shot", "1"])
    few_shot.run_from_args(default, {"x": tmp_path}, tmp_path / "fs")
    assert (seen["predictor"], seen["heareval_grid"], seen["heareval_grid_points"]) == ("probe", "default", 1)


@pytest.mark.parametrize("options, message", [
    (["--few-shot", "0,2"], "ks must be integers >= 1"),
    (["--few-shot", "1,x"], "expected comma-separated integers"),
    (["--few-shot", "1", "--draws", "0"], "--draws must be at least 1"),
    (["--few-shot", "1", "--few-shot-seed", "-1"], "--few-shot-seed must be >= 0"),
    (["--few-shot", "1"], r"name \['pretrained'\], which are not among the checkpoints' labels \['mine'\]"),
])
def test_hear_eval_refuses_bad_few_shot_options_before_any_embedding(tmp_path, options, message):
    """A bad few-shot option stops ``hear-eval`` at once, before heareval runs (hours on real
    tasks), naming the option; nothing is written."""
    from training.cli import main

    with pytest.raises(SystemExit, match=message):
        main(["hear-eval", f"mine={tmp_path / 'absent.safetensors'}", "--tasks-dir", str(tmp_path / "tasks"),
              "--out", str(tmp_path / "out"), *options])
    assert not (tmp_path / "out").exists()
