"""Alignment, the head mask and the paste-back, on arrays whose answers are known."""

import numpy as np
import pytest
import skimage.transform
from PIL import Image

from faceage_jax import alignment

TEMPLATE = alignment.FaceTemplate(
    np.array([[0.65, 0.45], [0.57, 0.45], [0.35, 0.45], [0.43, 0.45], [0.5, 0.6]]), 100, "test"
)


def test_the_template_is_the_mean_landmark_in_continuous_coordinates():
    landmarks = np.array([TEMPLATE.points * 64 - 0.5 + shift for shift in (-1.0, 1.0)] * 15)
    landmarks[0] = np.nan  # A chip without a face is left out.
    template = alignment.measure_template(landmarks, 64, "test")
    assert template.num_faces == 29
    np.testing.assert_allclose(template.points, TEMPLATE.points + 1 / 64 / 29, atol=1e-12)
    restored = alignment.FaceTemplate.from_json(template.to_json())
    np.testing.assert_array_equal(restored.points, template.points)


def test_too_few_faces_for_a_template_is_an_error_saying_how_many():
    landmarks = np.full((30, 5, 2), np.nan)
    landmarks[:3] = TEMPLATE.points * 64
    with pytest.raises(ValueError, match="only 3 of 30 training chips"):
        alignment.measure_template(landmarks, 64, "test")


def test_a_photo_face_is_mapped_onto_the_template():
    # The template's face, scaled 3x, turned 20 degrees and moved, in a 400 px photo.
    placed = skimage.transform.SimilarityTransform(
        scale=3, rotation=np.deg2rad(20), translation=(50, 30)
    )
    landmarks = placed(TEMPLATE.points * 64) - 0.5
    transform = alignment.chip_transform(landmarks, TEMPLATE, 64)
    np.testing.assert_allclose(transform(landmarks + 0.5), TEMPLATE.points * 64, atol=1e-9)
    assert transform.scale == pytest.approx(1 / 3)


def test_the_mask_is_one_at_the_face_zero_at_the_chip_border_and_hard_without_feather():
    mask = alignment.face_mask(TEMPLATE, 64)
    eyes = (TEMPLATE.eye_centres.mean(0) * 64).astype(int)
    assert mask[eyes[1], eyes[0]] == 1
    assert (mask[0] == 0).all() and (mask[-1] == 0).all()
    assert (mask[:, 0] == 0).all() and (mask[:, -1] == 0).all()
    assert 0 < mask.mean() < 1
    hard = alignment.face_mask(TEMPLATE, 64, feather=0)
    inner = hard[8:-8, 8:-8]
    assert set(np.unique(inner)) == {0.0, 1.0}
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        alignment.face_mask(TEMPLATE, 64, feather=1.5)


def test_a_chip_is_cut_where_the_transform_says():
    # A photo whose pixel value is its column index; the chip of the identity at scale 1/2.
    photo = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (256, 1, 3))
    transform = skimage.transform.SimilarityTransform(scale=0.5)
    chip = alignment.warp_to_chip(Image.fromarray(photo), transform, 64)
    # Chip column j covers photo columns [2j, 2j + 2): their mean is 2j + 0.5.
    np.testing.assert_allclose(chip[32, 5:60, 0], 2 * np.arange(5, 60) + 0.5, atol=1)


def test_the_change_lands_where_the_chip_was_cut_and_nowhere_else():
    photo = np.full((300, 400, 3), 100, np.uint8)
    transform = skimage.transform.SimilarityTransform(scale=0.25, translation=(-20, -10))
    change = np.zeros((32, 32, 3), np.float32)
    change[8:24, 8:24] = 50  # Chip [8, 24) -> photo x [112, 176), y [72, 136).
    out, region = alignment.paste_change(photo.copy(), change, transform)
    changed = (out != 100).any(-1)
    rows, cols = np.nonzero(changed)
    # Bilinear sampling spreads the edge by up to a chip pixel's half-width (2 px).
    assert 109 <= cols.min() <= 113 and 174 <= cols.max() <= 178
    assert 69 <= rows.min() <= 73 and 134 <= rows.max() <= 138
    assert out[120, 160, 0] == 150
    left, top, right, bottom = region
    assert left <= cols.min() and right > cols.max() and top <= rows.min() and bottom > rows.max()
