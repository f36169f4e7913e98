"""Age the faces in a person's own photos, and get the whole photo back.

    python -m faceage_jax.age_photo --workdir DIR [--step N] photo.jpg -o aged.jpg
    python -m faceage_jax.age_photo --exported model.faceage photos/ -o aged/

Each photo is decoded with its EXIF orientation applied, its faces found
(`faces.FaceFinder`: the largest, or all with --all-faces), each aligned onto
the training chips' layout (`alignment`), translated by the generator at the
model's size, and the change the generator made, scaled by --strength and a
soft head mask, warped back and added to the photo at its own resolution.
Pixels outside the mask are the input's, byte for byte; --strength 0 gives the
input back. Photos go through the generator in batches (one jitted call per
batch, `export.Generators`).

A file that cannot be aged (not an image, truncated, no face, a face too small,
too many pixels) gets one line saying why and what to do; the others are still
processed, and the exit status is non-zero only if none was.
"""

import argparse
import contextlib
import dataclasses
import functools
import io
import os
import pathlib
import sys
import time
import warnings
from collections import defaultdict

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from faceage_jax import alignment, export, faces

DEFAULT_MAX_MEGAPIXELS = 100.0
# Faces narrower than this (dlib's box, in the photo's pixels) are not aged: the
# detector's smallest faces are ~40 px, and below ~64 px a 128 px chip is mostly
# upsampling.
MIN_FACE_SIZE = 64
DEFAULT_JPEG_QUALITY = 95
DEFAULT_BATCH = 8  # Photos decoded, aligned and translated together.


class PhotoError(ValueError):
    """A photo that cannot be aged; str() is one line naming the file and what to do."""


class NotAnImageError(PhotoError):
    """Pillow cannot identify the file as an image."""


class CorruptImageError(PhotoError):
    """An image that cannot be decoded: truncated or corrupt."""


class TooManyPixelsError(PhotoError):
    """More pixels than the limit (a decompression bomb, or just too large)."""


class NoFaceError(PhotoError):
    """No face (large enough) was found in the photo."""


@dataclasses.dataclass
class Photo:
    """A decoded photo, upright."""

    name: str
    rgb: np.ndarray  # uint8 [H, W, 3]
    alpha: np.ndarray | None  # uint8 [H, W], kept for PNG and WebP outputs
    icc_profile: bytes | None


@dataclasses.dataclass
class Face:
    box: np.ndarray  # [4] left, top, right, bottom, photo pixels
    landmarks: np.ndarray  # [5, 2]
    transform: object  # photo -> chip similarity (alignment.chip_transform)
    chip: np.ndarray  # uint8 [S, S, 3], the aligned input
    aged_chip: np.ndarray | None = None  # uint8 [S, S, 3], the generator's output


@dataclasses.dataclass
class AgedPhoto:
    photo: Photo
    image: np.ndarray  # uint8 [H, W, 3]
    faces: list[Face]


class Timings:
    """Seconds per stage, for the benchmark (`with timings("decode"): ...`)."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


@functools.cache
def _register_heif() -> None:
    """Lets Pillow open HEIC/HEIF, the format iPhones take photos in (pillow-heif)."""
    import pillow_heif

    pillow_heif.register_heif_opener()


def _rgb_profile(icc_profile: bytes | None) -> bytes | None:
    """The ICC profile if it describes RGB (a CMYK or grey one would mislabel the RGB output)."""
    if not icc_profile:
        return None
    from PIL import ImageCms

    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile)).profile
    except (OSError, ImageCms.PyCMSError):
        return None
    return icc_profile if profile.xcolor_space.strip() == "RGB" else None


def _to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale scaled to 8 bits (Pillow's convert('RGB') would clip them)."""
    if image.mode not in ("I;16", "I;16L", "I;16B", "I", "F"):
        return image
    values = np.asarray(image, np.float64)
    top = 1.0 if image.mode == "F" and values.max(initial=0) <= 1.0 else 65535.0
    if image.mode == "I" and values.max(initial=0) <= 255:
        top = 255.0
    scaled = np.clip(np.rint(values / top * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, "L")


def read_photo(source, name: str, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> Photo:
    """Decodes a file path or bytes (anything Pillow reads, HEIC too), upright, as RGB (+ alpha)."""
    _register_heif()
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except UnidentifiedImageError:
        raise NotAnImageError(
            f"{name} is not an image Pillow can read: give a JPEG, PNG or WebP."
        ) from None
    except Image.DecompressionBombError as error:
        raise TooManyPixelsError(f"{name} has too many pixels ({error}).") from None
    except OSError as error:
        raise CorruptImageError(f"{name} cannot be read ({error}).") from None
    with image:
        width, height = image.size
        megapixels = width * height / 1e6
        if megapixels > max_megapixels:
            raise TooManyPixelsError(
                f"{name} is {width}x{height} = {megapixels:.0f} megapixels, over the limit of "
                f"{max_megapixels:g}: resize it, or raise --max-megapixels if you trust the file."
            )
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except Exception as error:  # Pillow raises many kinds for damaged data (struct.error...).
            raise CorruptImageError(
                f"{name} could not be decoded ({error}): it is truncated or corrupt; copy or "
                "download it again."
            ) from None
        icc_profile = _rgb_profile(image.info.get("icc_profile"))
    upright = _to_8_bits(upright)
    alpha = None
    if upright.mode in ("RGBA", "LA", "PA") or (
        upright.mode == "P" and "transparency" in upright.info
    ):
        rgba = upright.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3].copy()
        upright = rgba
    rgb = np.asarray(upright.convert("RGB"))
    return Photo(name, np.ascontiguousarray(rgb), alpha, icc_profile)


def find_faces(finder, photo: Photo, generators, all_faces: bool = False) -> list[Face]:
    """The photo's largest face (or every face) found and aligned; PhotoError if none."""
    found = finder.find_in_photo(photo.rgb)
    if not found:
        raise NoFaceError(
            f"{photo.name}: no face found. The detector finds faces that look towards the "
            f"camera, at least {MIN_FACE_SIZE} px wide; try a photo of the face from the front."
        )
    large = [(box, points) for box, points in found if box[2] - box[0] >= MIN_FACE_SIZE]
    if not large:
        width = found[0][0][2] - found[0][0][0]
        raise NoFaceError(
            f"{photo.name}: the face found is {width:.0f} px wide; faces of at least "
            f"{MIN_FACE_SIZE} px are aged. Use a larger photo, or one taken closer."
        )
    if not all_faces:
        large = large[:1]
    image = Image.fromarray(photo.rgb)
    size = generators.image_size
    chosen = []
    for box, points in large:
        transform = alignment.chip_transform(points, generators.template, size)
        if not transform:  # skimage's failed estimate: the 5 points are degenerate.
            raise NoFaceError(f"{photo.name}: the face's landmarks could not be aligned.")
        chosen.append(Face(box, points, transform, alignment.warp_to_chip(image, transform, size)))
    return chosen


def paste_back(
    photo: Photo, faces_: list[Face], outputs, strength: float, feather: float, template
) -> np.ndarray:
    """The photo with each face's change (output - chip) x strength x mask added back."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength is in [0, 1], not {strength}")
    image = photo.rgb.copy()
    if strength == 0:
        return image
    mask = alignment.face_mask(template, outputs.shape[1], feather)[..., None]
    for face, output in zip(faces_, outputs, strict=True):
        change = (output - (face.chip.astype(np.float32) / 127.5 - 1)) * 127.5
        alignment.paste_change(image, change * (strength * mask), face.transform)
    return image


def age_photos(
    photos: list[Photo],
    generators,
    finder,
    *,
    direction="young_to_old",
    strength=1.0,
    feather=alignment.DEFAULT_FEATHER,
    all_faces=False,
    timings=None,
) -> list:
    """Each photo aged (an AgedPhoto) or why not (a PhotoError); one generator call for all."""
    timings = timings or Timings()
    found = []
    for photo in photos:
        try:
            with timings("detect_align"):
                found.append(find_faces(finder, photo, generators, all_faces))
        except PhotoError as error:
            found.append(error)
    chips = [face.chip for item in found if not isinstance(item, PhotoError) for face in item]
    with timings("generator"):
        outputs = generators(np.stack(chips), direction) if chips else None
    results, used = [], 0
    for photo, item in zip(photos, found, strict=True):
        if isinstance(item, PhotoError):
            results.append(item)
            continue
        own = outputs[used : used + len(item)]
        used += len(item)
        for face, output in zip(item, own, strict=True):
            face.aged_chip = faces.to_uint8(output)
        with timings("paste_back"):
            image = paste_back(photo, item, own, strength, feather, generators.template)
        results.append(AgedPhoto(photo, image, item))
    return results


# What outputs can be: formats that keep every pixel outside the mask (GIF's palette
# would not), and the lossy ones a photo usually is.
OUTPUT_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".heic": "HEIF",
    ".heif": "HEIF",
}


def output_format(path: pathlib.Path) -> str:
    extension = path.suffix.lower()
    if extension not in OUTPUT_FORMATS:
        known = ", ".join(sorted(OUTPUT_FORMATS))
        raise PhotoError(
            f"{path}: cannot write {extension or 'a file without extension'} ({known} can be)."
        )
    _register_heif()
    return OUTPUT_FORMATS[extension]


def encode(
    aged: AgedPhoto, path: pathlib.Path, *, quality=DEFAULT_JPEG_QUALITY, side_by_side=False
) -> bytes:
    """The aged photo in the format of `path`'s extension (before | after with side_by_side)."""
    image = aged.image
    alpha = aged.photo.alpha
    if side_by_side:
        image = np.concatenate([aged.photo.rgb, image], axis=1)
        alpha = None if alpha is None else np.concatenate([alpha, alpha], axis=1)
    picture = Image.fromarray(image)
    image_format = output_format(path)
    if alpha is not None and image_format in ("PNG", "WEBP", "TIFF"):
        picture = Image.fromarray(np.dstack([image, alpha]), "RGBA")
    options = {}
    if aged.photo.icc_profile:
        options["icc_profile"] = aged.photo.icc_profile
    if image_format in ("JPEG", "WEBP", "HEIF"):
        options["quality"] = quality
    buffer = io.BytesIO()
    picture.save(buffer, image_format, **options)
    return buffer.getvalue()


def write_atomically(path: pathlib.Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_bytes(data)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


# ------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faceage-age-photo",
        description="Age (or rejuvenate) the faces in photos; the whole photo comes back, "
        "changed only around the face.",
    )
    parser.add_argument("inputs", nargs="+", help="Photos, or folders of photos.")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="Output file (one input), or folder (several, or a folder).",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="A training run's directory (its newest checkpoint).")
    model.add_argument("--exported", help="A file written by python -m faceage_jax.export.")
    parser.add_argument("--step", type=int, help="With --workdir: the checkpoint step.")
    parser.add_argument(
        "--config",
        help="With --workdir: the run's config file (default: the workdir's config.json).",
    )
    parser.add_argument("--direction", choices=export.DIRECTIONS, default="young_to_old")
    parser.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="How much of the generator's change is applied, in [0, 1]: 0 returns the photo "
        "unchanged, 1 the full change, 0.5 half of it. It scales the change; it is not a "
        "target age.",
    )
    parser.add_argument(
        "--all-faces", action="store_true", help="Age every face, not just the largest."
    )
    parser.add_argument(
        "--side-by-side", action="store_true", help="Write before | after in one image."
    )
    parser.add_argument(
        "--save-chips",
        action="store_true",
        help="Also write each face's aligned chip in and out, beside the output.",
    )
    parser.add_argument(
        "--mask-feather",
        type=float,
        default=alignment.DEFAULT_FEATHER,
        help="Share of the head mask's radius over which it fades out, in [0, 1].",
    )
    parser.add_argument(
        "--quality", type=int, default=DEFAULT_JPEG_QUALITY, help="JPEG/WebP quality."
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace existing output files (the input too, if it is the output).",
    )
    parser.add_argument(
        "--max-megapixels",
        type=float,
        default=DEFAULT_MAX_MEGAPIXELS,
        help="Refuse larger images (decompression bombs).",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="Photos per batch.")
    return parser


def _check(parser, args) -> None:
    if not 0 <= args.strength <= 1:
        parser.error(f"--strength is in [0, 1] (a share of the change), not {args.strength}")
    if not 0 <= args.mask_feather <= 1:
        parser.error(f"--mask-feather is in [0, 1], not {args.mask_feather}")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality is in [1, 100], not {args.quality}")
    if args.batch_size < 1 or args.max_megapixels <= 0:
        parser.error("--batch-size and --max-megapixels must be positive")
    if args.exported and (args.step is not None or args.config):
        parser.error("--step and --config go with --workdir, not --exported")


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    readable = set(Image.registered_extensions())
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in readable)


def plan_outputs(inputs: list[str], output: str, overwrite: bool):
    """[(input, output path or PhotoError)]: -o is a file for one input file, else a folder.

    Outputs keep their inputs' names; two inputs of one name get -1, -2, ...; an
    existing file (the input included) is only replaced with `overwrite`.
    """
    _register_heif()  # So that .heic files count as images in a folder.
    paths = []
    for name in inputs:
        path = pathlib.Path(name)
        paths.extend(_image_files(path) if path.is_dir() else [path])
    output_path = pathlib.Path(output)
    to_folder = len(inputs) > 1 or pathlib.Path(inputs[0]).is_dir() or output_path.is_dir()
    if to_folder and output_path.exists() and not output_path.is_dir():
        raise PhotoError(f"{output} is a file; with several photos, -o names a folder.")
    plan, taken = [], set()
    for path in paths:
        target = output_path / path.name if to_folder else output_path
        stem, suffix, number = target.stem, target.suffix, 0
        while target in taken:
            number += 1
            target = target.with_name(f"{stem}-{number}{suffix}")
        taken.add(target)
        if target.exists() and not overwrite:
            same = target.resolve() == path.resolve()
            what = "is the input" if same else "exists"
            plan.append((path, PhotoError(f"{target} {what}; pass --overwrite to replace it.")))
        else:
            plan.append((path, target))
    return plan, to_folder


def load_generators(exported=None, workdir=None, step=None, config_file=None):
    """`export.Generators` from an exported file, or from a training run's checkpoint."""
    if exported:
        return export.load(exported)
    config = load_config_file(config_file) if config_file else None
    return export.from_checkpoint(workdir, step, config)


def load_config_file(path: str):
    """The ConfigDict of a config file (`configs/<name>.py`), as --config reads it."""
    from ml_collections.config_flags import config_flags

    if not os.path.isfile(path.split(":", 1)[0]):
        raise FileNotFoundError(f"The config file {path} does not exist.")
    return config_flags.ConfigFileFlagParser("config", lock_config=False).parse(path)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    from tqdm import tqdm

    for name in args.inputs:
        if not os.path.exists(name):
            parser.error(f"{name} does not exist")
    try:
        plan, to_folder = plan_outputs(args.inputs, args.output, args.overwrite)
    except PhotoError as error:
        parser.error(str(error))
    if not plan:
        parser.error(f"no image files in {', '.join(args.inputs)}")
    try:
        generators = load_generators(args.exported, args.workdir, args.step, args.config)
    except (FileNotFoundError, export.ExportError, faces.MissingModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finder = faces.FaceFinder()
    if to_folder:
        pathlib.Path(args.output).mkdir(parents=True, exist_ok=True)
    counts = {"aged": 0, "no face": 0, "failed": 0}
    progress = tqdm(total=len(plan), unit="photo", file=sys.stderr, disable=None)

    def report(error: PhotoError) -> None:
        counts["no face" if isinstance(error, NoFaceError) else "failed"] += 1
        progress.write(f"skipped: {error}", file=sys.stderr)
        progress.update()

    for start in range(0, len(plan), args.batch_size):
        photos, targets = [], []
        for path, target in plan[start : start + args.batch_size]:
            try:
                if isinstance(target, PhotoError):
                    raise target
                output_format(target)
                photos.append(read_photo(path, str(path), args.max_megapixels))
                targets.append(target)
            except PhotoError as error:
                report(error)
        results = age_photos(
            photos,
            generators,
            finder,
            direction=args.direction,
            strength=args.strength,
            feather=args.mask_feather,
            all_faces=args.all_faces,
        )
        for aged, target in zip(results, targets, strict=True):
            if isinstance(aged, PhotoError):
                report(aged)
                continue
            try:
                data = encode(aged, target, quality=args.quality, side_by_side=args.side_by_side)
                chips = {}
                if args.save_chips:  # Named after the output, so they are as unique as it is.
                    for index, face in enumerate(aged.faces):
                        for kind, chip in (("in", face.chip), ("out", face.aged_chip)):
                            chips[target.with_name(f"{target.name}.face{index}.{kind}.png")] = chip
                for chip_path in chips:
                    if chip_path.exists() and not args.overwrite:
                        raise PhotoError(f"{chip_path} exists; pass --overwrite to replace it")
                write_atomically(target, data)
                for chip_path, chip in chips.items():
                    write_atomically(chip_path, encode_png(chip))
            except (OSError, PhotoError) as error:
                report(PhotoError(f"{target} could not be written ({error})."))
                continue
            counts["aged"] += 1
            progress.update()
    progress.close()
    print(
        f"{counts['aged']} aged, {counts['no face']} without a face, {counts['failed']} failed "
        f"({generators.description})"
    )
    return 0 if counts["aged"] else 1


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def run():
    """The console script `faceage-age-photo` and `python -m faceage_jax.age_photo`."""
    sys.exit(main())


if __name__ == "__main__":
    run()
