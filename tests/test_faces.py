"""The face models shipped in PyPI packages, on a real photo and on images without a face."""

import numpy as np
import pytest
import skimage.data
from PIL import Image

from faceage_jax import faces


@pytest.fixture(scope="module")
def models():
    return faces.FaceModels()


def astronaut_crop(size: int) -> np.ndarray:
    """scikit-image's astronaut (public domain), cropped to the head like a UTKFace chip."""
    crop = skimage.data.astronaut()[0:300, 100:400]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))


def test_reads_a_real_face_at_every_training_size(models):
    for size in (64, 128, 200):
        analysis = models.analyse(astronaut_crop(size)[None])
        assert analysis.found.tolist() == [True]
        # Eileen Collins was about 40 when photographed; the estimator reads her 30-37.
        assert 20 <= analysis.ages[0] <= 60, analysis.ages
        assert analysis.female[0] > 0.5
        assert np.isfinite(analysis.embeddings).all()
        assert np.linalg.norm(analysis.embeddings[0]) == pytest.approx(1.45, abs=0.1)
        # The landmarks lie on the face, in the input image's pixels.
        left, top, right, bottom = analysis.boxes[0]
        points = analysis.landmarks[0]
        assert (points[:, 0] > left).all() and (points[:, 0] < right).all()
        assert (points[:, 1] > top).all() and (points[:, 1] < bottom).all()
        assert right <= size * 1.05


def test_the_same_person_at_two_sizes_is_within_dlibs_threshold(models):
    analysis = models.analyse(np.stack([astronaut_crop(64), astronaut_crop(64)]))
    small = models.analyse(astronaut_crop(64)[None])
    large = models.analyse(astronaut_crop(200)[None])
    distance = np.linalg.norm(small.embeddings[0] - large.embeddings[0])
    assert distance < faces.SAME_PERSON_DISTANCE
    np.testing.assert_array_equal(analysis.embeddings[0], analysis.embeddings[1])


def test_images_without_a_face_are_not_scored(models):
    rng = np.random.default_rng(0)
    blank = np.full((64, 64, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    analysis = models.analyse(np.stack([blank, astronaut_crop(64), noise]))
    assert analysis.found.tolist() == [False, True, False]
    for field in (analysis.ages, analysis.female, analysis.embeddings, analysis.landmarks):
        assert np.isnan(field[[0, 2]]).all()
        assert np.isfinite(field[1]).all()
    taken = analysis.take(np.array([1]))
    assert taken.found.tolist() == [True]
    restored = faces.FaceAnalysis.from_arrays(analysis.to_arrays())
    np.testing.assert_array_equal(restored.embeddings, analysis.embeddings)


def test_without_the_age_models_the_rest_still_runs(monkeypatch):
    monkeypatch.setattr(faces, "AGE_GENDER_PACKAGE", "no_such_package")
    models = faces.FaceModels()
    assert "no_such_package is not installed" in models.age_gender_missing
    analysis = models.analyse(astronaut_crop(64)[None])
    assert analysis.found.tolist() == [True]
    assert np.isnan(analysis.ages).all() and np.isfinite(analysis.embeddings).all()


def test_a_missing_model_file_says_how_to_install_it():
    with pytest.raises(faces.MissingModelError, match="pip install face-recognition-models"):
        faces.package_file(faces.FACE_MODELS_PACKAGE, "models/no_such_file.dat")
    with pytest.raises(faces.MissingModelError, match="pip install no_such_package"):
        faces.package_file("no_such_package", "x")
