"""Synthetic faces in the exact UTKFace file format, with a visible, measurable age.

UTKFace cannot be downloaded here, so tests and the demo train on these. Each face
has identity traits (face shape, eye spacing, skin/hair/eye colours, a backdrop
from a palette) drawn independently of its age, and an age attribute that grows
with age and stays visible at 32x32: hair going from its dark base colour to
grey/white, skin getting paler and greyer, and dark wrinkle lines. `apparent_age`
measures the attribute from an image of any size, so a test can tell whether a
generator aged a face.
"""

import dataclasses
import datetime
import io

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 200  # UTKFace aligned-and-cropped faces are 200x200.
MAX_AGE = 116  # The oldest age in UTKFace.
YOUNG_AGES = (18, 29)
OLD_AGES = (60, MAX_AGE)
# Shares of young, old and other ages (0-17, 30-59) among generated faces.
AGE_GROUP_SHARES = (0.35, 0.35, 0.30)

# The hair patch `apparent_age` reads, as fractions of height and width: above the
# forehead of every generated face whatever its shape.
HAIR_PATCH_ROWS = (0.10, 0.17)
HAIR_PATCH_COLS = (0.40, 0.60)

_FACE_CENTER = (100, 118)
_HAIR_CENTER_Y = 100
_GREY_HAIR = np.array([0.90, 0.90, 0.88])
_PALE_SKIN = np.array([0.84, 0.82, 0.80])
_SKIN_TONES = np.array(
    [[0.96, 0.80, 0.69], [0.89, 0.69, 0.55], [0.76, 0.55, 0.40], [0.55, 0.37, 0.26]]
)
_HAIR_COLOURS = np.array(
    [[0.08, 0.06, 0.05], [0.20, 0.13, 0.08], [0.32, 0.20, 0.11], [0.30, 0.12, 0.06]]
)
_EYE_COLOURS = np.array([[0.25, 0.15, 0.08], [0.20, 0.35, 0.55], [0.25, 0.40, 0.25]])
# Backdrops, as in portrait photos: off-white, light and mid grey, dark and light blue,
# green, beige, brick. A palette, not uniform random colours: after instance
# normalization the generator rebuilds each image's colour from what it has seen, and
# colours from a continuum take far longer to learn (figures: README, "The demo's budget").
BACKDROPS = np.array(
    [
        [0.92, 0.92, 0.90],
        [0.70, 0.72, 0.74],
        [0.45, 0.47, 0.50],
        [0.30, 0.45, 0.65],
        [0.60, 0.74, 0.86],
        [0.38, 0.56, 0.40],
        [0.82, 0.72, 0.56],
        [0.62, 0.36, 0.30],
    ]
)
# Bumped whenever the faces that `face_specs` and `render_face` make change: a dataset
# built from older faces is then not reused (input_pipeline/dataset.py).
VERSION = 2  # 2: backdrops from BACKDROPS (1: uniform random colours).


@dataclasses.dataclass(frozen=True)
class FaceSpec:
    """One synthetic face: its UTKFace labels and its identity traits."""

    index: int
    age: int
    gender: int  # 0 male, 1 female (UTKFace's coding).
    race: int  # 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others.
    face_width: float  # Half-width of the face ellipse, pixels at 200x200.
    face_height: float  # Half-height of the face ellipse.
    eye_spacing: float  # Distance between the eye centres.
    skin_colour: tuple[float, float, float]  # RGB in [0, 1], before ageing.
    hair_colour: tuple[float, float, float]  # RGB in [0, 1], before greying.
    eye_colour: tuple[float, float, float]
    background_colour: tuple[float, float, float]

    @property
    def file_name(self) -> str:
        """`age_gender_race_datetime.jpg.chip.jpg`, unique per index."""
        taken = datetime.datetime(2017, 1, 4, 9) + datetime.timedelta(seconds=37 * self.index)
        stamp = f"{taken:%Y%m%d%H%M%S}{self.index % 1000:03d}"
        return f"{self.age}_{self.gender}_{self.race}_{stamp}.jpg.chip.jpg"


def sample_ages(num_faces: int, rng: np.random.Generator) -> np.ndarray:
    """Ages over 0-116: 35 % young (18-29), 35 % old (60-116), 30 % the others."""
    group = rng.choice(3, size=num_faces, p=AGE_GROUP_SHARES)
    young = rng.integers(YOUNG_AGES[0], YOUNG_AGES[1] + 1, size=num_faces)
    # Old faces thin out with age, as in UTKFace: 60 + |N(0, 20)|, capped at 116.
    old = np.minimum(OLD_AGES[0] + np.abs(rng.normal(0.0, 20.0, size=num_faces)), MAX_AGE)
    other_ages = np.concatenate([np.arange(0, YOUNG_AGES[0]), np.arange(30, OLD_AGES[0])])
    other = rng.choice(other_ages, size=num_faces)
    return np.select([group == 0, group == 1], [young, old.astype(int)], other).astype(int)


def face_specs(num_faces: int, seed: int = 0) -> list[FaceSpec]:
    """Deterministic faces; ages and identities come from separate random streams."""
    ages = sample_ages(num_faces, np.random.default_rng([seed, 0]))
    rng = np.random.default_rng([seed, 1])
    race = rng.integers(0, 5, size=num_faces)
    skin = _SKIN_TONES[rng.integers(0, len(_SKIN_TONES), size=num_faces)]
    skin = np.clip(skin + rng.normal(0.0, 0.03, size=skin.shape), 0.0, 1.0)
    traits = dict(
        gender=rng.integers(0, 2, size=num_faces),
        face_width=rng.uniform(52.0, 64.0, size=num_faces),
        face_height=rng.uniform(66.0, 78.0, size=num_faces),
        eye_spacing=rng.uniform(36.0, 50.0, size=num_faces),
        hair=_HAIR_COLOURS[rng.integers(0, len(_HAIR_COLOURS), size=num_faces)],
        eye=_EYE_COLOURS[rng.integers(0, len(_EYE_COLOURS), size=num_faces)],
    )
    # A stream of its own, so that the other traits are those of version 1.
    backdrop = np.random.default_rng([seed, 2]).integers(0, len(BACKDROPS), size=num_faces)
    traits["background"] = BACKDROPS[backdrop]
    return [
        FaceSpec(
            index=i,
            age=int(ages[i]),
            gender=int(traits["gender"][i]),
            race=int(race[i]),
            face_width=float(traits["face_width"][i]),
            face_height=float(traits["face_height"][i]),
            eye_spacing=float(traits["eye_spacing"][i]),
            skin_colour=tuple(map(float, skin[i])),
            hair_colour=tuple(map(float, traits["hair"][i])),
            eye_colour=tuple(map(float, traits["eye"][i])),
            background_colour=tuple(map(float, traits["background"][i])),
        )
        for i in range(num_faces)
    ]


def hair_greyness(age: float) -> float:
    """Share of grey in the hair: 0 up to 15 years, then linear to 1 at 110."""
    return float(np.clip((age - 15.0) / 95.0, 0.0, 1.0))


def _rgb(colour) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in np.clip(colour, 0.0, 1.0))


def render_face(spec: FaceSpec) -> np.ndarray:
    """Draws the face. Returns [200, 200, 3] uint8."""
    grey = hair_greyness(spec.age)
    hair = (1.0 - grey) * np.array(spec.hair_colour) + grey * _GREY_HAIR
    paleness = 0.45 * min(spec.age, MAX_AGE) / MAX_AGE
    skin = (1.0 - paleness) * np.array(spec.skin_colour) + paleness * _PALE_SKIN
    cx, cy = _FACE_CENTER
    rx, ry = spec.face_width, spec.face_height

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _rgb(spec.background_colour))
    draw = ImageDraw.Draw(image)
    neck = [cx - 0.6 * rx, cy + 0.6 * ry, cx + 0.6 * rx, IMAGE_SIZE]
    draw.rectangle(neck, fill=_rgb(skin * 0.85))
    hair_rx, hair_ry = rx + 14, ry + 30
    draw.ellipse(
        [cx - hair_rx, _HAIR_CENTER_Y - hair_ry, cx + hair_rx, _HAIR_CENTER_Y + hair_ry],
        fill=_rgb(hair),
    )
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_rgb(skin))

    eye_y = cy - 0.12 * ry
    for side in (-1, 1):
        ex = cx + side * spec.eye_spacing / 2
        draw.ellipse([ex - 10, eye_y - 5, ex + 10, eye_y + 5], fill=(240, 240, 235))
        draw.ellipse([ex - 4, eye_y - 4, ex + 4, eye_y + 4], fill=_rgb(spec.eye_colour))
        draw.line([ex - 12, eye_y - 13, ex + 12, eye_y - 15], fill=_rgb(hair * 0.8), width=4)
    draw.line([cx, eye_y + 8, cx - 5, cy + 0.3 * ry], fill=_rgb(skin * 0.75), width=3)
    mouth_y = cy + 0.5 * ry
    draw.arc([cx - 18, mouth_y - 8, cx + 18, mouth_y + 8], 20, 160, fill=(150, 60, 60), width=4)

    wrinkle = _rgb(skin * 0.5)
    num_wrinkles = int(np.clip((spec.age - 35) / 12, 0, 5))
    for k in range(min(num_wrinkles, 3)):  # Forehead lines.
        y = cy - 0.62 * ry + 7 * k
        draw.arc([cx - 0.55 * rx, y - 6, cx + 0.55 * rx, y + 6], 200, 340, fill=wrinkle, width=3)
    if num_wrinkles >= 4:  # Lines from the nose to the mouth corners.
        for side in (-1, 1):
            draw.line(
                [cx + side * 14, cy + 0.22 * ry, cx + side * 24, mouth_y + 4], fill=wrinkle, width=3
            )
    image = image.filter(ImageFilter.GaussianBlur(radius=1.0))
    return np.asarray(image)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an [H, W, 3] uint8 image."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def apparent_age(image: np.ndarray) -> float:
    """Apparent age score in [0, 1] of one aligned face: how grey its hair is.

    Args:
      image: [H, W, 3], uint8 in [0, 255] or float in [-1, 1], any size.

    Returns:
      The mean over the hair patch of the smallest RGB channel: near 0.1 for dark
      hair, near 0.9 for white hair; monotone in age on generated faces.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"apparent_age expects one [H, W, 3] image, got shape {image.shape}")
    if image.dtype == np.uint8:
        pixels = image.astype(np.float32) / 255.0
    else:
        pixels = (image.astype(np.float32) + 1.0) / 2.0
    height, width = image.shape[:2]
    top, bottom = _patch_bounds(HAIR_PATCH_ROWS, height)
    left, right = _patch_bounds(HAIR_PATCH_COLS, width)
    patch = np.clip(pixels[top:bottom, left:right], 0.0, 1.0)
    return float(patch.min(axis=-1).mean())


def _patch_bounds(fractions: tuple[float, float], size: int) -> tuple[int, int]:
    """Pixel bounds of a fractional band, at least one pixel wide at any size."""
    start = min(int(fractions[0] * size), size - 1)
    return start, max(start + 1, int(round(fractions[1] * size)))


def write_faces(directory: epath.PathLike, num_faces: int, seed: int = 0) -> list[FaceSpec]:
    """Writes `num_faces` JPEGs named like UTKFace into `directory` (local or gs://)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specs = face_specs(num_faces, seed)
    for spec in specs:
        (directory / spec.file_name).write_bytes(encode_jpeg(render_face(spec)))
    return specs
