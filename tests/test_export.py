"""The exported generators: equal to the checkpoint's, loadable without the training code."""

import json
import zipfile

import jax
import numpy as np
import pytest

from faceage_jax import alignment, checkpointing, export, train
from tests import helpers


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A 2-step run of the test config and its exported file (made by the command line)."""
    root = tmp_path_factory.mktemp("export")
    config = helpers.make_config(data_dir=str(root / "tfds"), num_train_steps=2)
    train.train_and_evaluate(config, str(root / "run"))
    path = root / "generators.faceage"
    result = helpers.run_python(
        "-m", "faceage_jax.export", "--workdir", root / "run", "-o", path, cwd=root
    )
    assert result.returncode == 0, result.stdout
    assert f"Exported step 2 of {root / 'run'} to {path}" in result.stdout
    return {"root": root, "workdir": root / "run", "config": config, "path": path}


def chips(num: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num, size, size, 3), dtype=np.uint8)


@pytest.mark.slow
def test_training_writes_the_config_that_export_reads(run):
    config = checkpointing.load_config(run["workdir"])
    assert config.to_dict() == run["config"].to_dict()


@pytest.mark.slow
def test_the_exported_generators_equal_the_checkpoints(run):
    in_process = export.from_checkpoint(run["workdir"])
    loaded = export.load(run["path"])
    assert (loaded.step, loaded.image_size) == (2, 32)
    assert loaded.description == in_process.description
    np.testing.assert_array_equal(loaded.template.points, in_process.template.points)
    images = chips(5)
    for direction in export.DIRECTIONS:
        # Same program, same weights: equal to float32 rounding (measured: bitwise equal).
        np.testing.assert_allclose(
            loaded(images, direction), in_process(images, direction), rtol=0, atol=1e-6
        )


@pytest.mark.slow
def test_any_batch_size_gives_each_image_the_same_output(run):
    loaded = export.load(run["path"])
    images = chips(11)
    one_by_one = np.concatenate([loaded(images[i : i + 1], "young_to_old") for i in range(11)])
    # Each padded batch size is its own compiled program, with its own float32 rounding
    # (measured: up to 3e-6, 4e-4 of a uint8 level).
    np.testing.assert_allclose(loaded(images, "young_to_old"), one_by_one, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_face_template_is_measured_on_the_training_faces(run):
    template = alignment.FaceTemplate.from_json((run["workdir"] / export.TEMPLATE_FILE).read_text())
    assert template.num_faces >= alignment.MIN_TEMPLATE_FACES
    eyes = template.eye_centres
    # The synthetic faces' eyes lie level, about a fifth of the chip apart, above the nose.
    assert abs(eyes[0, 1] - eyes[1, 1]) < 0.02
    assert 0.15 < abs(eyes[0, 0] - eyes[1, 0]) < 0.3
    assert template.points[4, 1] > eyes[:, 1].max() + 0.1


@pytest.mark.slow
def test_the_file_loads_without_tensorflow_or_the_training_code(run):
    script = f"""
import sys
import numpy as np
from faceage_jax import export
generators = export.load({str(run["path"])!r})
out = generators(np.zeros((3, 32, 32, 3), np.uint8), "old_to_young")
assert out.shape == (3, 32, 32, 3) and np.isfinite(out).all()
heavy = [m for m in ("tensorflow", "faceage_jax.train", "faceage_jax.cyclegan", "flax",
                     "orbax") if m in sys.modules]
print("heavy modules:", heavy)
"""
    result = helpers.run_python("-c", script, cwd=run["root"])
    assert result.returncode == 0, result.stdout
    assert "heavy modules: []" in result.stdout


@pytest.mark.slow
def test_the_photo_tool_runs_from_a_workdir_and_from_the_file_alike(run, tmp_path):
    import skimage.data
    from PIL import Image

    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    outputs = []
    config_file = helpers.REPO_ROOT / "configs" / "test.py"
    for model in (
        ["--workdir", run["workdir"]],
        ["--exported", run["path"]],
        ["--workdir", run["workdir"], "--config", config_file],  # A run's config file given.
    ):
        out = tmp_path / f"aged-{len(outputs)}.png"
        result = helpers.run_python(
            "-m", "faceage_jax.age_photo", *model, photo, "-o", out, cwd=tmp_path
        )
        assert result.returncode == 0, result.stdout
        assert "1 aged, 0 without a face, 0 failed" in result.stdout
        assert "checkpoint step 2" in result.stdout
        outputs.append(np.asarray(Image.open(out)))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])


def test_a_file_that_is_not_an_export_is_refused(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8 not a zip")
    with pytest.raises(export.ExportError, match="is not an exported model"):
        export.load(tmp_path / "photo.jpg")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("manifest.json", json.dumps({"format": "something else"}))
    with pytest.raises(export.ExportError, match="not an exported faceage-jax model"):
        export.load(tmp_path / "other.zip")
    with zipfile.ZipFile(tmp_path / "future.zip", "w") as archive:
        archive.writestr(
            "manifest.json", json.dumps({"format": export.FORMAT, "format_version": 99})
        )
    with pytest.raises(export.ExportError, match="format version 99"):
        export.load(tmp_path / "future.zip")


def test_a_restarted_run_replaces_its_config(tmp_path):
    checkpointing.save_config(tmp_path, helpers.make_config(num_train_steps=2))
    checkpointing.save_config(tmp_path, helpers.make_config(num_train_steps=5))
    assert checkpointing.load_config(tmp_path).num_train_steps == 5
    assert [p.name for p in tmp_path.iterdir()] == [checkpointing.CONFIG_FILE]


def test_a_workdir_without_a_run_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass the run's config with --config"):
        checkpointing.load_config(tmp_path)


def damaged_copies(path, tmp_path):
    """The exported file with one part missing, wrong or undecodable."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members["manifest.json"])
    no_entry = dict(manifest, generators={"young_to_old": manifest["generators"]["young_to_old"]})
    cases = {
        "no generator entry": {**members, "manifest.json": json.dumps(no_entry)},
        "no weights": {k: v for k, v in members.items() if k != "old_to_young.npz"},
        "junk function": {**members, "young_to_old.jax_export": b"\x00junk" * 10},
        "a list manifest": {**members, "manifest.json": "[1, 2]"},
    }
    for case, content in cases.items():
        target = tmp_path / f"{case.replace(' ', '_')}.faceage"
        with zipfile.ZipFile(target, "w") as archive:
            for name, data in content.items():
                archive.writestr(name, data)
        yield case, target


@pytest.mark.slow
def test_a_damaged_export_is_an_export_error_not_a_traceback(run, tmp_path):
    for case, path in damaged_copies(run["path"], tmp_path):
        with pytest.raises(export.ExportError, match="damaged|not an exported"):
            export.load(path)
        del case


@pytest.mark.slow
def test_the_platform_is_named_as_jax_export_names_it(run, monkeypatch):
    # On an NVIDIA GPU jax's backend is 'gpu' and the export's platform 'cuda'.
    monkeypatch.setattr(jax.export, "default_export_platform", lambda: "cuda")
    assert export.load(run["path"]).step == 2
    monkeypatch.setattr(jax.export, "default_export_platform", lambda: "rocm")
    with pytest.raises(export.ExportError, match=r"exported for \('cpu', 'cuda', 'tpu'\)"):
        export.load(run["path"])
