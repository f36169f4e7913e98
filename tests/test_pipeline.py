"""The tf.data pipeline on synthetic faces: domains, batches, determinism, processes, resume."""

import json
import pathlib
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from configs import test as test_config
from input_pipeline import dataset, pipeline, synthetic, utkface

NUM_FACES = 200  # configs/test.py


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    config = test_config.get_config()
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
    assert config.num_synthetic_faces == NUM_FACES
    dataset.prepare_dataset(config)
    return config


@pytest.fixture(scope="module")
def builder(config):
    return dataset.prepare_dataset(config)


def _expected_train_ages(config) -> np.ndarray:
    """Ages of the train faces, from the generator and the name hash, not the pipeline."""
    specs = synthetic.face_specs(NUM_FACES, dataset.SYNTHETIC_FACES_SEED)
    return np.array(
        [s.age for s in specs if utkface.split_of(s.file_name, config.test_share) == "train"]
    )


def _with(config, **fields):
    changed = config.copy_and_resolve_references()
    for name, value in fields.items():
        setattr(changed, name, value)
    return changed


def _take(iterator, num_batches):
    return [next(iterator) for _ in range(num_batches)]


def _assert_batches_equal(batches, other_batches):
    for batch, other in zip(batches, other_batches, strict=True):
        for domain in dataset.DOMAINS:
            np.testing.assert_array_equal(batch[domain], other[domain])


def test_synthetic_faces_are_generated_once_into_the_data_dir(config, builder):
    assert builder.data_dir_root == (
        pathlib.Path(config.data_dir) / f"synthetic_faces_v{synthetic.VERSION}_{NUM_FACES}"
    )
    faces = list(pathlib.Path(builder.data_dir_root, "manual", "UTKFace").iterdir())
    assert len(faces) == NUM_FACES
    assert sum(split.num_examples for split in builder.info.splits.values()) == NUM_FACES
    written_at = faces[0].stat().st_mtime_ns
    assert dataset.prepare_dataset(config).is_prepared()
    assert faces[0].stat().st_mtime_ns == written_at


def test_domain_counts_match_the_ages_of_the_train_faces(config, builder):
    ages = _expected_train_ages(config)
    assert dataset.count_domain_faces(builder, "train", config) == {
        "young": np.count_nonzero((ages >= 18) & (ages <= 29)),
        "old": np.count_nonzero(ages >= 60),
        "all": len(ages),
    }


def test_select_ages_keeps_only_the_inclusive_range(config, builder):
    records = dataset.select_ages(dataset.read_faces(builder, "train"), (18, 29))
    ages = np.array([record["age"] for record in records.as_numpy_iterator()])
    assert ages.min() >= 18
    assert ages.max() <= 29
    expected = _expected_train_ages(config)
    assert len(ages) == np.count_nonzero((expected >= 18) & (expected <= 29))


def test_steps_per_epoch_is_the_larger_domain_over_the_global_batch(config, builder):
    ages = _expected_train_ages(config)
    larger = max(np.count_nonzero((ages >= 18) & (ages <= 29)), np.count_nonzero(ages >= 60))
    assert dataset.steps_per_epoch(builder, config) == larger // 4


def test_train_batches_are_host_local_float32_in_unit_range(config, builder):
    batch = next(pipeline.create_train_iterator(builder, config))  # jax's process index and count.
    assert set(batch) == {"young", "old"}
    for images in batch.values():
        assert images.shape == (4, 32, 32, 3)
        assert images.dtype == np.float32
        assert images.min() >= -1.0
        assert images.max() <= 1.0
        assert images.std() > 0.1


def test_each_process_gets_the_global_batch_over_the_process_count(config, builder):
    batch = next(pipeline.create_train_iterator(builder, config, process_index=1, process_count=2))
    assert batch["young"].shape == (2, 32, 32, 3)


def test_global_batch_must_divide_over_processes(config, builder):
    with pytest.raises(ValueError, match="must divide evenly over 3 processes"):
        pipeline.create_train_iterator(builder, config, process_index=0, process_count=3)


def test_young_batches_hold_young_faces_and_old_batches_old(config, builder):
    # Without the random crop, which can move skin into the measured hair patch.
    uncropped = _with(config, load_size=config.image_size)
    batches = _take(
        pipeline.create_train_iterator(builder, uncropped, process_index=0, process_count=1), 5
    )
    scores = {
        domain: [synthetic.apparent_age(image) for batch in batches for image in batch[domain]]
        for domain in dataset.DOMAINS
    }
    assert max(scores["young"]) < 0.3 < min(scores["old"])


def _face() -> tf.Tensor:
    return tf.constant(synthetic.render_face(synthetic.face_specs(1)[0]))


def test_jitter_crops_the_image_size_from_the_load_size(config):
    view = pipeline.jitter(_face(), tf.constant([0, 0], tf.int64), config)
    assert view.shape == (32, 32, 3)
    assert view.dtype == tf.float32
    centre = tf.image.resize(_face(), [32, 32], antialias=True)
    assert not np.allclose(view, centre, atol=1.0)


def test_jitter_is_fixed_by_its_seed_and_varies_with_it(config):
    views = [pipeline.jitter(_face(), tf.constant([0, i], tf.int64), config) for i in range(8)]
    again = pipeline.jitter(_face(), tf.constant([0, 3], tf.int64), config)
    np.testing.assert_array_equal(views[3], again)
    # 5 x 5 crop offsets times 2 flips: 8 seeds rarely hit the same view twice.
    distinct = {np.asarray(view).tobytes() for view in views}
    assert len(distinct) >= 6


def test_jitter_flips_some_views(config):
    """With load_size == image_size there is nothing to crop: views are the face or its mirror."""
    no_crop = _with(config, load_size=32)
    face = tf.image.resize(_face(), [32, 32], antialias=True)
    mirrored = tf.image.flip_left_right(face)
    views = [pipeline.jitter(_face(), tf.constant([1, i], tf.int64), no_crop) for i in range(16)]
    flipped = [np.allclose(view, mirrored, atol=1e-3) for view in views]
    unflipped = [np.allclose(view, face, atol=1e-3) for view in views]
    assert all(f != u for f, u in zip(flipped, unflipped, strict=True))
    assert 0 < sum(flipped) < 16


def test_same_seed_gives_equal_batches(config, builder):
    first = _take(
        pipeline.create_train_iterator(builder, config, process_index=0, process_count=1), 4
    )
    second = _take(
        pipeline.create_train_iterator(builder, config, process_index=0, process_count=1), 4
    )
    _assert_batches_equal(first, second)


def test_another_seed_gives_other_batches(config, builder):
    first = next(pipeline.create_train_iterator(builder, config, process_index=0, process_count=1))
    other_config = _with(config, seed=config.seed + 1)
    other = next(
        pipeline.create_train_iterator(builder, other_config, process_index=0, process_count=1)
    )
    assert not np.array_equal(first["young"], other["young"])


def test_training_never_runs_out(config, builder):
    iterator = pipeline.create_train_iterator(builder, config, process_index=0, process_count=1)
    steps = 3 * dataset.steps_per_epoch(builder, config)
    assert len(_take(iterator, steps)) == steps


def test_two_processes_get_disjoint_equal_shares_that_cover_the_train_split(builder):
    names = {
        index: [
            record["file_name"]
            for record in dataset.read_faces(
                builder, pipeline.train_split(index, 2)
            ).as_numpy_iterator()
        ]
        for index in (0, 1)
    }
    all_names = {r["file_name"] for r in dataset.read_faces(builder, "train").as_numpy_iterator()}
    assert len(names[0]) == len(names[1]) == len(all_names) // 2
    assert not set(names[0]) & set(names[1])
    assert len(all_names - set(names[0]) - set(names[1])) == len(all_names) % 2


def test_iterator_resumes_where_it_was_saved(config, tmp_path, builder):
    iterator = pipeline.create_train_iterator(builder, config, process_index=0, process_count=1)
    _take(iterator, 3)
    iterator.save(tmp_path / "process_0")
    expected = _take(iterator, 4)

    restored = pipeline.create_train_iterator(builder, config, process_index=0, process_count=1)
    restored.restore(tmp_path / "process_0")
    _assert_batches_equal(_take(restored, 4), expected)


def test_iterator_resumed_again_and_again_draws_the_uninterrupted_batches(
    config, tmp_path, builder
):
    # Each restored iterator is saved and restored in turn, as a run preempted many times.
    uninterrupted = _take(
        pipeline.create_train_iterator(builder, config, process_index=0, process_count=1), 25
    )
    resumed = []
    iterator = pipeline.create_train_iterator(builder, config, process_index=0, process_count=1)
    for resume in range(6):
        resumed += _take(iterator, 4)
        iterator.save(tmp_path / str(resume))
        iterator = pipeline.create_train_iterator(builder, config, process_index=0, process_count=1)
        iterator.restore(tmp_path / str(resume))
    resumed.append(next(iterator))
    # 25 batches of 4 cross the epochs of both domains (57 and 63 faces).
    _assert_batches_equal(resumed, uninterrupted)


def test_iterator_position_is_the_number_of_faces_drawn_per_domain(config, tmp_path, builder):
    iterator = pipeline.create_train_iterator(builder, config, process_index=0, process_count=1)
    _take(iterator, 3)
    iterator.save(tmp_path)
    saved = json.loads((tmp_path / "position.json").read_text())
    assert saved["images_read"] == 3 * 4
    assert (tmp_path / "position.json").stat().st_size < 200
    assert [path.name for path in tmp_path.iterdir()] == ["position.json"]


def test_each_epoch_of_a_domain_shows_every_face_once_in_a_new_order():
    seed = tf.constant([0, 1], tf.int64)
    order = [int(pipeline.draw_order(tf.constant(p, tf.int64), 10, seed)) for p in range(30)]
    epochs = [order[0:10], order[10:20], order[20:30]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert epochs[0] != epochs[1] != epochs[2]


def test_restore_without_a_position_says_where_it_looked(config, tmp_path, builder):
    iterator = pipeline.create_train_iterator(builder, config, process_index=0, process_count=1)
    with pytest.raises(pipeline.DataPositionError, match="No data position in .*position.json"):
        iterator.restore(tmp_path / "empty")


@pytest.mark.parametrize(
    "content", ["{not json", '{"faces": 3}', '{"images_read": -4}', '{"images_read": "12"}']
)
def test_malformed_position_is_refused_at_restore(config, tmp_path, content, builder):
    (tmp_path / "position.json").write_text(content)
    iterator = pipeline.create_train_iterator(builder, config, process_index=0, process_count=1)
    with pytest.raises(pipeline.DataPositionError, match="Malformed data position"):
        iterator.restore(tmp_path)


def test_eval_dataset_holds_held_out_faces_of_one_domain_without_jitter(config, builder):
    batches = list(
        pipeline.create_eval_dataset(builder, config, "old", process_index=0, process_count=1)
    )
    again = list(
        pipeline.create_eval_dataset(builder, config, "old", process_index=0, process_count=1)
    )
    assert batches[0]["image"].shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(batches[0]["image"], again[0]["image"])
    for batch in batches:
        assert np.all(batch["age"].numpy() >= 60)
        for name in batch["file_name"].numpy():
            assert utkface.split_of(name.decode(), config.test_share) == "test"


def test_sample_faces_are_fixed_held_out_faces_per_domain(config, builder):
    faces = pipeline.load_sample_faces(builder, config)
    again = pipeline.load_sample_faces(builder, config)
    assert faces["young"].shape == faces["old"].shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(faces["old"], again["old"])


def test_pipelines_run_without_the_autotuning_thread(config, builder):
    # Deleting an iterator waits out that thread's current sleep, which grows with the
    # iterator's age: a preempted run ended 25 s after its last checkpoint with it.
    datasets = [
        pipeline.train_dataset(
            pipeline.load_train_faces(builder, config, process_index=0, process_count=1),
            4,
            0,
            config,
        ),
        pipeline.create_eval_dataset(builder, config, "young", process_index=0, process_count=1),
    ]
    for data in datasets:
        assert data.options().autotune.enabled is False
        assert data.options().deterministic is True


def test_empty_domain_names_the_age_ranges_and_the_counts(config, builder):
    empty_config = _with(config, young_age_min=117, young_age_max=120)
    with pytest.raises(ValueError, match="young domain is empty") as error:
        pipeline.create_train_iterator(builder, empty_config, process_index=0, process_count=1)
    assert "young 117-120, old 60-116" in str(error.value)
    assert "found young 0, old " in str(error.value)


def test_real_dataset_without_manual_dir_says_where_to_download_it(tmp_path):
    config = _with(test_config.get_config(), dataset="utk_face", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="config.manual_dir is empty") as error:
        dataset.prepare_dataset(config)
    assert utkface.HOMEPAGE in str(error.value)
    config.manual_dir = str(tmp_path / "UTKFace.tar.gz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dataset.prepare_dataset(config)
    (tmp_path / "faces.tar.gz").write_bytes(b"")
    config.manual_dir = str(tmp_path / "faces.tar.gz")
    with pytest.raises(ValueError, match="is a file but not UTKFace.tar.gz"):
        dataset.prepare_dataset(config)


def test_real_dataset_builds_from_the_archive_path(tmp_path):
    synthetic.write_faces(tmp_path / "faces", 20, seed=0)
    with tarfile.open(tmp_path / "UTKFace.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "faces", arcname="UTKFace")
    config = _with(
        test_config.get_config(),
        dataset="utk_face",
        data_dir=str(tmp_path / "tfds"),
        manual_dir=str(tmp_path / "UTKFace.tar.gz"),
    )
    builder = dataset.prepare_dataset(config)
    assert sum(split.num_examples for split in builder.info.splits.values()) == 20
