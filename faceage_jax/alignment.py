"""Aligning a photo's face to the training chips' layout, and adding a chip's change back.

The generators only know faces laid out as in their training chips (UTKFace's
aligned 200x200 crops, or the synthetic faces drawn in that format). A photo's
face is mapped onto that layout by the similarity transform (rotation, uniform
scale, shift) that takes its 5 dlib landmarks closest, in least squares, to the
`FaceTemplate`: the mean position of the same 5 landmarks over the training
faces, measured on them with the same detector and landmark model (see
`measure_template`). So the template is a property of the training data, not a
constant guessed for it: a model trained on UTKFace gets UTKFace's layout, the
demo model the synthetic faces'.

Coordinates are continuous: pixel (i, j) covers [j, j + 1) x [i, i + 1), so
its centre is (j + 0.5, i + 0.5) (dlib's landmarks are pixel indices; Pillow's
affine transforms use continuous coordinates).

The change is pasted back as a residual: (generated chip - chip) x strength x a
soft mask around the head, warped back into the photo at its own resolution
and added to it. Where the warped change is exactly 0 (outside the mask's
support) the photo's pixels are untouched, byte for byte.
"""

import dataclasses
import json

import numpy as np
import skimage.transform
from PIL import Image

# The measured template is refused if fewer training faces than this were found.
MIN_TEMPLATE_FACES = 20
# The head mask, an ellipse in units of the template's eye distance d: centred
# MASK_CENTRE_BELOW_EYES * d below the eyes' midpoint, MASK_HALF_WIDTH * d wide
# and MASK_HALF_HEIGHT * d high on each side. A face is ~2.4 d wide and the eyes
# sit about half-way between the chin and the top of the head, 1.8 d from each,
# so the ellipse holds the face, the hair at the sides and above the forehead,
# and the chin (grey hair and wrinkles are what aging changes most).
MASK_CENTRE_BELOW_EYES = 0.1
MASK_HALF_WIDTH = 1.45
MASK_HALF_HEIGHT = 1.95
DEFAULT_FEATHER = 0.3  # The outer share of the ellipse's radius where the mask falls to 0.
# The mask also falls to 0 over this share of the chip's side at the chip's border,
# so the pasted change never ends in a step where the chip ends.
CHIP_BORDER_TAPER = 0.06


@dataclasses.dataclass(frozen=True)
class FaceTemplate:
    """Where the 5 landmarks lie in a training chip, as fractions of the chip's side."""

    points: np.ndarray  # [5, 2] x, y in dlib's order: one eye's 2 corners, the other's, nose
    num_faces: int  # The training faces it was measured on.
    source: str  # Which faces: dataset and split.

    @property
    def eye_centres(self) -> np.ndarray:  # [2, 2]
        return np.stack([self.points[0:2].mean(0), self.points[2:4].mean(0)])

    def to_json(self) -> str:
        return json.dumps(
            {"points": self.points.tolist(), "num_faces": self.num_faces, "source": self.source},
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> "FaceTemplate":
        data = json.loads(text)
        points = np.asarray(data["points"], np.float64)
        if points.shape != (5, 2) or not np.isfinite(points).all():
            raise ValueError(f"A face template holds 5 finite (x, y) points, not {data['points']}")
        return cls(points, int(data["num_faces"]), str(data["source"]))


def measure_template(landmarks: np.ndarray, image_size: int, source: str) -> FaceTemplate:
    """The mean landmark position over chips of `image_size`: `landmarks` [N, 5, 2] (NaN: none)."""
    found = np.isfinite(landmarks).all(axis=(1, 2))
    if found.sum() < MIN_TEMPLATE_FACES:
        raise ValueError(
            f"Faces were found in only {int(found.sum())} of {len(landmarks)} training chips of "
            f"{source}; the face template needs at least {MIN_TEMPLATE_FACES}. Are they faces?"
        )
    points = (landmarks[found] + 0.5) / image_size  # Pixel indices -> continuous fractions.
    return FaceTemplate(points.mean(0), int(found.sum()), source)


def chip_transform(landmarks: np.ndarray, template: FaceTemplate, size: int):
    """The similarity transform from a photo's continuous coordinates to a `size` chip's.

    `landmarks`: [5, 2] dlib pixel indices in the photo.
    """
    return skimage.transform.SimilarityTransform.from_estimate(
        np.asarray(landmarks, np.float64) + 0.5, template.points * size
    )


def _affine_data(transform) -> tuple[float, ...]:
    """Pillow's AFFINE coefficients: output (x, y) -> input (a x + b y + c, d x + e y + f)."""
    return tuple(np.asarray(transform.params[:2]).reshape(-1))


def warp_to_chip(photo: Image.Image, transform, size: int) -> np.ndarray:
    """The aligned chip, uint8 [size, size, 3], of an RGB photo; `transform`: photo -> chip.

    A face larger than the chip is first box-reduced (Image.reduce) to between 1x
    and 2x the chip's scale, then warped to twice the chip's size (bilinear) and
    averaged down 2x, so the chip is antialiased like a resized training image.
    Pixels beyond the photo's edge are black.
    """
    corners = transform.inverse(np.array([[0, 0], [size, 0], [0, size], [size, size]], float))
    left, top = np.floor(corners.min(0)).astype(int) - 1
    right, bottom = np.ceil(corners.max(0)).astype(int) + 1
    region = photo.crop((left, top, right, bottom))  # Filled with black beyond the photo.
    reduction = max(1, int(1 / (2 * transform.scale)))
    if reduction > 1:
        region = region.reduce(reduction)
    # chip2 (twice the chip) -> region: undo the 2x, the chip transform, the crop, the reduction.
    to_region = skimage.transform.AffineTransform(
        translation=(-left, -top)
    ) + skimage.transform.AffineTransform(scale=1 / reduction)
    chip2_to_region = skimage.transform.AffineTransform(scale=0.5) + transform.inverse + to_region
    chip2 = region.transform(
        (2 * size, 2 * size), Image.AFFINE, _affine_data(chip2_to_region), Image.BILINEAR
    )
    return np.asarray(chip2.resize((size, size), Image.BOX))


def face_mask(template: FaceTemplate, size: int, feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """The soft head mask of a `size` chip, float32 [size, size] in [0, 1].

    1 inside the ellipse's inner (1 - feather) share of its radius, falling
    smoothly to exactly 0 at the ellipse (and at the chip's border).
    """
    if not 0 <= feather <= 1:
        raise ValueError(
            f"The mask feather is a share of the mask's radius in [0, 1], not {feather}"
        )
    eyes = template.eye_centres
    eye_distance = np.linalg.norm(eyes[0] - eyes[1])
    centre = eyes.mean(0) + [0.0, MASK_CENTRE_BELOW_EYES * eye_distance]
    axes = np.array([MASK_HALF_WIDTH, MASK_HALF_HEIGHT]) * eye_distance
    y, x = (np.mgrid[:size, :size] + 0.5) / size
    radius = np.hypot((x - centre[0]) / axes[0], (y - centre[1]) / axes[1])
    if feather == 0:
        mask = (radius < 1).astype(np.float64)
    else:
        t = np.clip((1 - radius) / feather, 0, 1)
        mask = t * t * (3 - 2 * t)
    to_border = np.minimum.reduce([x, 1 - x, y, 1 - y]) * size
    taper = np.clip((to_border - 1) / (CHIP_BORDER_TAPER * size), 0, 1)
    return (mask * taper).astype(np.float32)


def paste_change(photo: np.ndarray, change: np.ndarray, transform) -> tuple[np.ndarray, tuple]:
    """Adds a chip's `change` into the photo through the inverse of `transform`.

    `photo`: uint8 [H, W, 3], changed in place. `change`: float32 [S, S, 3] in
    uint8 units, already scaled by the strength and the mask, 0 where nothing may
    change. Returns the photo and the (left, top, right, bottom) region touched.
    Pixels where the warped change is 0 are left as they are.
    """
    support = np.argwhere(np.abs(change).max(-1) > 0)
    if not len(support):
        return photo, (0, 0, 0, 0)
    rows, cols = support[:, 0], support[:, 1]
    chip_box = np.array(
        [
            [cols.min(), rows.min()],
            [cols.max() + 1, rows.min()],
            [cols.min(), rows.max() + 1],
            [cols.max() + 1, rows.max() + 1],
        ],
        float,
    )
    corners = transform.inverse(chip_box)
    height, width = photo.shape[:2]
    left, top = np.clip(np.floor(corners.min(0)).astype(int) - 1, 0, [width, height])
    right, bottom = np.clip(np.ceil(corners.max(0)).astype(int) + 1, 0, [width, height])
    if right <= left or bottom <= top:
        return photo, (0, 0, 0, 0)
    region_to_chip = skimage.transform.AffineTransform(translation=(left, top)) + transform
    data = _affine_data(region_to_chip)
    warped = np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(change[..., c]), "F").transform(
                    (right - left, bottom - top), Image.AFFINE, data, Image.BILINEAR
                )
            )
            for c in range(3)
        ],
        axis=-1,
    )
    region = photo[top:bottom, left:right]
    region[...] = np.clip(np.rint(region + warped), 0, 255).astype(np.uint8)
    return photo, (int(left), int(top), int(right), int(bottom))


def warp_mask_to_photo(mask: np.ndarray, transform, photo_shape) -> np.ndarray:
    """A chip's float [S, S] mask in the photo's pixels, float32 [H, W] (for tests and views)."""
    height, width = photo_shape[:2]
    photo_to_chip = _affine_data(transform)
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(mask, np.float32), "F").transform(
            (width, height), Image.AFFINE, photo_to_chip, Image.BILINEAR
        )
    )
