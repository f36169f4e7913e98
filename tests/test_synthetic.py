"""Synthetic faces: UTKFace names, determinism, a measurable age, identity independent of age."""

import dataclasses
import re

import numpy as np
import pytest
from PIL import Image

from input_pipeline import synthetic

UTKFACE_NAME = re.compile(r"[0-9]{1,3}_[01]_[0-4]_[0-9]{17}\.jpg\.chip\.jpg")


@pytest.fixture(scope="module")
def specs():
    return synthetic.face_specs(2000, seed=0)


@pytest.fixture(scope="module")
def rendered():
    """300 faces and their ages."""
    faces = synthetic.face_specs(300, seed=1)
    return np.stack([synthetic.render_face(f) for f in faces]), np.array([f.age for f in faces])


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def test_file_names_follow_the_utkface_pattern_and_are_unique(specs):
    names = [spec.file_name for spec in specs]
    assert all(UTKFACE_NAME.fullmatch(name) for name in names)
    assert len(set(names)) == 2000
    assert specs[7].file_name.startswith(f"{specs[7].age}_{specs[7].gender}_{specs[7].race}_")


def test_same_seed_gives_same_faces_and_another_seed_others():
    assert synthetic.face_specs(10, seed=3) == synthetic.face_specs(10, seed=3)
    assert synthetic.face_specs(10, seed=3) != synthetic.face_specs(10, seed=4)
    first = synthetic.face_specs(1, seed=3)[0]
    np.testing.assert_array_equal(synthetic.render_face(first), synthetic.render_face(first))


def test_ages_spread_over_0_to_116_with_young_and_old_domains(specs):
    ages = np.array([spec.age for spec in specs])
    assert ages.min() == 0
    assert ages.max() == 116
    young_share = np.mean((ages >= 18) & (ages <= 29))
    old_share = np.mean(ages >= 60)
    assert 0.30 < young_share < 0.40
    assert 0.30 < old_share < 0.40
    assert np.sum(ages >= 90) >= 20


def test_rendered_faces_are_200x200_rgb(rendered):
    images, _ = rendered
    assert images.shape == (300, 200, 200, 3)
    assert images.dtype == np.uint8


def test_apparent_age_correlates_with_age(rendered):
    images, ages = rendered
    scores = np.array([synthetic.apparent_age(image) for image in images])
    assert np.corrcoef(scores, ages)[0, 1] > 0.95


@pytest.mark.parametrize("size", [64, 32])
def test_apparent_age_correlates_with_age_at_low_resolution(rendered, size):
    images, ages = rendered
    scores = np.array([synthetic.apparent_age(_resize(image, size)) for image in images])
    assert np.corrcoef(scores, ages)[0, 1] > 0.95


def test_apparent_age_separates_young_from_old_faces(rendered):
    images, ages = rendered
    scores = np.array([synthetic.apparent_age(_resize(image, 64)) for image in images])
    young = (ages >= 18) & (ages <= 29)
    old = ages >= 60
    assert scores[young].max() < 0.3 < scores[old].min()


def test_apparent_age_rises_with_age_for_the_same_identity():
    for spec in synthetic.face_specs(3, seed=5):
        scores = [
            synthetic.apparent_age(synthetic.render_face(dataclasses.replace(spec, age=age)))
            for age in (20, 40, 60, 80, 100)
        ]
        assert np.all(np.diff(scores) > 0.05), scores


def test_apparent_age_reads_uint8_and_unit_range_floats_alike(rendered):
    image = rendered[0][0]
    as_float = image.astype(np.float32) / 127.5 - 1.0
    expected = synthetic.apparent_age(image)
    assert synthetic.apparent_age(as_float) == pytest.approx(expected, abs=1e-6)


def test_apparent_age_wants_one_image():
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        synthetic.apparent_age(np.zeros([2, 64, 64, 3], np.uint8))


def test_identity_traits_do_not_depend_on_age(specs):
    ages = np.array([spec.age for spec in specs])
    traits = {
        "face_width": [spec.face_width for spec in specs],
        "face_height": [spec.face_height for spec in specs],
        "eye_spacing": [spec.eye_spacing for spec in specs],
        "skin_brightness": [np.mean(spec.skin_colour) for spec in specs],
        "hair_brightness": [np.mean(spec.hair_colour) for spec in specs],
        "background_brightness": [np.mean(spec.background_colour) for spec in specs],
        "gender": [spec.gender for spec in specs],
        "race": [spec.race for spec in specs],
    }
    for name, values in traits.items():
        assert abs(np.corrcoef(values, ages)[0, 1]) < 0.1, name


def test_backdrops_come_from_the_palette_and_fill_the_corners(specs, rendered):
    backdrops = np.array([spec.background_colour for spec in specs])
    palette_index = np.argmin(
        np.abs(backdrops[:, None] - synthetic.BACKDROPS[None]).sum(-1), axis=1
    )
    np.testing.assert_array_equal(backdrops, synthetic.BACKDROPS[palette_index])
    # Every backdrop is used, each by roughly its share.
    counts = np.bincount(palette_index, minlength=len(synthetic.BACKDROPS))
    assert counts.min() > 0.5 * len(specs) / len(synthetic.BACKDROPS)
    images, _ = rendered
    faces = synthetic.face_specs(len(images), seed=1)
    corners = images[:, :8, :8].reshape(len(images), -1, 3).mean(1) / 255
    expected = np.array([face.background_colour for face in faces])
    np.testing.assert_allclose(corners, expected, atol=1.5 / 255)


def test_write_faces_writes_decodable_jpegs_under_their_names(tmp_path):
    specs = synthetic.write_faces(tmp_path / "faces", 5, seed=0)
    assert sorted(p.name for p in (tmp_path / "faces").iterdir()) == sorted(
        spec.file_name for spec in specs
    )
    with Image.open(tmp_path / "faces" / specs[0].file_name) as image:
        assert image.format == "JPEG"
        assert image.size == (200, 200)
