"""The held-out evaluation: in the training loop, from the command line, and its measures."""

import json
import math

import jax
import numpy as np
import pytest

from faceage_jax import cyclegan, evaluate, train
from faceage_jax.metrics import inception
from tests import helpers
from tests.reference import seeded

REPORT_FILES = [
    "ages.png",
    "faces_old_to_young.csv",
    "faces_young_to_old.csv",
    "grid.png",
    "identity.png",
    "metrics.json",
    "report.md",
]


# Session scope: xdist may run other modules' tests between this group's on its worker,
# which would tear a module-scoped fixture down and build it again.
@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A 5-step run of the test config that evaluated itself at steps 2 and 4, and at its end."""
    root = tmp_path_factory.mktemp("evaluate")
    config = helpers.make_config(
        data_dir=str(root / "tfds"),
        num_train_steps=5,
        keep_checkpoints=3,  # 2, 4 and 5.
        eval_every_steps=2,
        eval_bootstrap_resamples=20,
    )
    state = train.train_and_evaluate(config, str(root / "run"))
    return {"root": root, "workdir": root / "run", "config": config, "state": state}


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """The FID Inception's weights file with seeded random values (the real one is 95 MB)."""
    shapes = {
        key: value.shape
        for key, value in inception.state_dict_from_variables(
            jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), inception.expected_variables())
        ).items()
    }
    path = tmp_path_factory.mktemp("inception") / "seeded_inception.npz"
    np.savez(path, **seeded.state_dict(shapes))
    return path


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


@pytest.mark.slow
@pytest.mark.xdist_group("evaluate")
def test_training_evaluates_every_eval_every_steps_into_reports_and_tensorboard(trained):
    workdir = trained["workdir"]
    # Every 2 steps, and the last step's model (5) too.
    assert sorted(p.name for p in (workdir / "eval").iterdir()) == ["2", "4", "5", "cache"]
    for step in ("2", "4", "5"):
        assert sorted(p.name for p in (workdir / "eval" / step).iterdir()) == REPORT_FILES
    scalars = helpers.logged_scalars(workdir, ("eval/",))
    assert sorted(scalars) == [2, 4, 5]
    for direction in evaluate.DIRECTIONS:
        assert finite(scalars[4][f"eval/{direction}/border_delta_e"])
        assert finite(scalars[4][f"eval/{direction}/cycle_l1"])


@pytest.mark.slow
@pytest.mark.xdist_group("evaluate")
def test_the_report_counts_faces_without_a_face_and_scores_only_the_others(trained):
    metrics = json.loads((trained["workdir"] / "eval" / "4" / "metrics.json").read_text())
    assert metrics["step"] == 4
    for direction, (source, _) in evaluate.DIRECTIONS.items():
        figures = metrics[direction]["all"]
        found, total = metrics["faces_found"][f"test_{source}"]
        assert figures["faces"] == total
        assert figures["no_face_in_input"] == total - found
        # Faces are scored only where a face was detected in the input (and the output).
        scored = figures["predicted_age"]["floor"]["n"]
        assert scored == found
        assert figures["skin_delta_e"]["model"]["n"] == found
        both = figures["age_shift_mean"]["model"]["n"]
        assert both == found - figures["no_face_in_output"]
        # Border colour, RGB shift and the cycle need no face: every face counts.
        for name in ("border_delta_e", "cycle_l1", "rgb_shift"):
            assert figures[name]["model"]["n"] == total
            assert finite(figures[name]["model"]["value"])
        interval = figures["border_delta_e"]["model"]
        assert interval["low"] <= interval["value"] <= interval["high"]
        assert finite(figures["hair_greyness"]["ceiling"]["value"])  # Synthetic faces.
        assert metrics[direction]["inception"]["missing"].startswith("no Inception weights")
        assert sum(g["faces"] for g in metrics[direction]["subgroups"].values()) == total
    report = (trained["workdir"] / "eval" / "4" / "report.md").read_text()
    assert "| measure | floor (do nothing) | model | ceiling (real old) | N |" in report
    assert "synthetic faces" in report


@pytest.mark.slow
@pytest.mark.xdist_group("evaluate")
def test_the_command_line_evaluates_a_checkpoint_with_fid_and_kid(trained, inception_weights):
    workdir, config = trained["workdir"], trained["config"]
    args = [
        "-m",
        "faceage_jax.evaluate",
        "--config",
        helpers.REPO_ROOT / "configs" / "test.py",
        "--workdir",
        workdir,
        f"--config.data_dir={config.data_dir}",
        f"--config.inception_weights={inception_weights}",
        "--config.eval_bootstrap_resamples=10",
        "--step",
        "2",
    ]
    result = helpers.run_python(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Report: {workdir / 'eval' / '2' / 'report.md'}" in result.stdout
    assert "young → old: predicted age" in result.stdout
    metrics = json.loads((workdir / "eval" / "2" / "metrics.json").read_text())
    for direction in evaluate.DIRECTIONS:
        fid = metrics[direction]["inception"]["fid"]
        kid = metrics[direction]["inception"]["kid"]
        for column in ("floor", "model", "ceiling"):
            assert finite(fid[column]["value"]) and fid[column]["value"] >= 0
            assert fid[column]["low"] <= fid[column]["value"] <= fid[column]["high"]
            assert finite(kid[column]["value"])
    # The real faces' features were cached, keyed by the weights file's digest.
    cached = sorted(p.name for p in (workdir / "eval" / "cache").iterdir())
    assert len([name for name in cached if name.startswith("inception_")]) == 4
    assert len([name for name in cached if name.startswith("faces_")]) == 4


@pytest.mark.slow
@pytest.mark.xdist_group("evaluate")
def test_a_missing_checkpoint_or_weights_file_is_a_clear_message(trained, tmp_path):
    config = trained["config"]
    common = [
        "-m",
        "faceage_jax.evaluate",
        "--config",
        helpers.REPO_ROOT / "configs" / "test.py",
        f"--config.data_dir={config.data_dir}",
    ]
    result = helpers.run_python(*common, "--workdir", tmp_path / "never_trained")
    assert result.returncode != 0
    assert "No checkpoint in" in result.stderr and "train first" in result.stderr
    result = helpers.run_python(*common, "--workdir", trained["workdir"], "--step", "3")
    assert result.returncode != 0
    assert "No checkpoint of step 3" in result.stderr and "[2, 4, 5]" in result.stderr
    # Unreadable weights: FID and KID are reported missing with the reason; the rest runs.
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a torch file")
    metrics = evaluate.evaluate(
        _with(config, inception_weights=str(bad)),
        tmp_path / "run",
        trained["state"].generator_params,
        4,
        num_faces=3,
    ).metrics
    for direction in evaluate.DIRECTIONS:
        assert "could not be read" in metrics[direction]["inception"]["missing"]
        assert finite(metrics[direction]["all"]["border_delta_e"]["model"]["value"])


def _with(config, **overrides):
    config = config.copy_and_resolve_references()
    config.update(overrides)
    return config


@pytest.mark.slow
@pytest.mark.xdist_group("evaluate")
def test_restored_generator_params_equal_the_trained_state(trained):
    params, step = evaluate.restore_generator_params(trained["config"], trained["workdir"])
    assert step == 5
    expected = jax.device_get(trained["state"].generator_params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected)


def test_colour_regions_of_an_aligned_face():
    border = evaluate.border_mask(100)
    assert border[0].all() and border[:, -1].all() and not border[50, 50]
    assert border.mean() == pytest.approx(1 - (1 - 2 * evaluate.BORDER_SHARE) ** 2, abs=0.01)
    # dlib's 5 points: right eye corners, left eye corners, the base of the nose.
    points = np.array([[30, 40], [40, 40], [70, 40], [60, 40], [50, 60]], float)
    skin = evaluate.skin_mask(100, points)
    assert skin[50, 50] and not skin[40, 35] and not skin[40, 65]  # Between, not on, the eyes.
    assert not (skin & border).any()


def test_colour_change_is_zero_for_an_unchanged_face_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    points = np.array([[[20, 26], [26, 26], [44, 26], [38, 26], [32, 38]]], float)
    same = evaluate.colour_changes(image, image, points)
    assert same["skin_delta_e"][0] == 0 and same["border_delta_e"][0] == 0
    brighter = np.clip(image.astype(int) + 20, 0, 255).astype(np.uint8)
    changed = evaluate.colour_changes(image, brighter, points)
    assert changed["skin_delta_e"][0] > 1 and changed["border_delta_e"][0] > 1
    assert (changed["rgb_shift"][0] > 0).all()
    no_face = evaluate.colour_changes(image, brighter, np.full((1, 5, 2), np.nan))
    assert np.isnan(no_face["skin_delta_e"][0]) and no_face["border_delta_e"][0] > 1


def test_impostor_pairs_are_pairs_of_different_faces():
    embeddings = np.eye(5)
    distances = evaluate.impostor_distances(embeddings, np.array([1, 1, 1, 0, 1], bool))
    assert len(distances) == 6  # All pairs of the 4 found faces.
    np.testing.assert_allclose(distances, np.sqrt(2))


def test_means_and_shares_have_percentile_intervals_that_cover_them():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 1.0, 400)
    entry = evaluate._mean(np.append(values, np.nan), 200)
    assert entry["n"] == 400
    assert entry["low"] < 3.0 < entry["high"]
    assert entry["high"] - entry["low"] == pytest.approx(2 * 1.96 / 20, rel=0.25)
    assert evaluate._mean([np.nan], 100) == {"value": None, "n": 0}
    assert "low" not in evaluate._mean(values, 0)


@pytest.mark.slow
def test_a_real_face_dataset_is_read_by_the_face_models(tmp_path):
    """UTKFace-format files of a real photo (the astronaut, varied) through the evaluation."""
    import skimage.data
    from PIL import Image, ImageEnhance

    from input_pipeline import dataset

    photo = Image.fromarray(skimage.data.astronaut()[0:300, 100:400]).resize((200, 200))
    faces_dir = tmp_path / "manual" / "UTKFace"
    faces_dir.mkdir(parents=True)
    for index in range(40):
        # The same face, lighter or darker, mirrored or not: files of distinct content.
        image = ImageEnhance.Brightness(photo).enhance(0.8 + 0.01 * index)
        if index % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        age = 25 if index < 20 else 65  # The labels; the photo is one adult woman.
        image.save(faces_dir / f"{age}_1_0_20170101{index:09d}.jpg.chip.jpg", quality=92)
    config = _with(
        helpers.make_config(),
        dataset="utk_face",
        data_dir=str(tmp_path / "tfds"),
        manual_dir=str(faces_dir),
        test_share=0.5,
        image_size=64,
        load_size=72,
        eval_bootstrap_resamples=20,
    )
    builder = dataset.prepare_dataset(config)
    generator = cyclegan.create_networks(config).generator
    params = {
        name: generator.init(jax.random.key(i), np.zeros((1, 64, 64, 3), np.float32))
        for i, name in enumerate(cyclegan.GENERATORS)
    }
    result = evaluate.evaluate(config, tmp_path / "run", params, 0, builder=builder)
    metrics = result.metrics
    for key in ("test_young", "test_old", "train_young", "train_old"):
        found, total = metrics["faces_found"][key]
        assert total >= 3 and found == total, metrics["faces_found"]  # A real face: always found.
    for direction in evaluate.DIRECTIONS:
        ages = metrics[direction]["all"]["predicted_age"]
        for column in ("floor", "ceiling"):
            assert 20 <= ages[column]["value"] <= 60, ages  # She was about 40.
        assert metrics[direction]["embedding"]["floor"]["value"] is not None
    assert (result.directory / "report.md").exists()
    assert "hair greyness" not in (result.directory / "report.md").read_text()
