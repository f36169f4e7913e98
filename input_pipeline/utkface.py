"""UTKFace as a TFDS dataset, built from the manually downloaded archive or folder.

Build it from the command line (the `tfds` command needs apache-beam and mlcroissant):
  tfds build input_pipeline/utkface.py --manual_dir=/dir/with/UTKFace.tar.gz
  (another held-out share: --config '{"name": "test_share_20", "test_share": 0.2}')
or from Python:
  builder = tfds.builder("utk_face", config=utkface.config_for_test_share(0.1))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))

The archive is streamed, never extracted. Faces are split into train and test by a
hash of the file name, so a rebuild gives the same split whatever the file order.
"""

import collections
import dataclasses
import hashlib
import io
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

HOMEPAGE = "https://susanqq.github.io/UTKFace/"
ARCHIVE_NAME = "UTKFace.tar.gz"
FOLDER_NAME = "UTKFace"
MIN_AGE, MAX_AGE = 0, 120
UNKNOWN = -1  # Gender or race missing from a malformed file name.

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the "Aligned&Cropped Faces" archive {ARCHIVE_NAME} from {HOMEPAGE}
(it links to the files) and put it in `manual_dir`, or put its extracted
{FOLDER_NAME}/ folder there. Nothing is extracted: the archive is read as is.
"""

_AGE_PATTERN = re.compile(r"[0-9]{1,3}")

_CITATION = """\
@inproceedings{zhifei2017cvpr,
  title={Age Progression/Regression by Conditional Adversarial Autoencoder},
  author={Zhang, Zhifei and Song, Yang and Qi, Hairong},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2017}
}
"""


@dataclasses.dataclass(frozen=True)
class FaceLabels:
    """Labels parsed from `age_gender_race_datetime.jpg.chip.jpg`."""

    age: int
    gender: int  # 0 male, 1 female, -1 unknown.
    race: int  # 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others, -1 unknown.


def parse_file_name(file_name: str) -> FaceLabels | None:
    """Labels of a UTKFace file name, or None when it has no parseable age.

    Tolerates the real archive's malformed names: a missing race field
    (`39_1_20170116174525125.jpg.chip.jpg`), a space before the extension and a
    missing dot (`55_0_0_20170116232725357jpg.chip.jpg`). The age is not range-checked.
    """
    stem = posixpath.basename(file_name).split(".", 1)[0].strip()
    fields = stem.split("_")
    if not _AGE_PATTERN.fullmatch(fields[0]):
        return None
    # With four fields the race is the third; with three, the third is the datetime.
    gender = int(fields[1]) if len(fields) >= 3 and fields[1] in ("0", "1") else UNKNOWN
    has_race = len(fields) >= 4 and fields[2] in ("0", "1", "2", "3", "4")
    race = int(fields[2]) if has_race else UNKNOWN
    return FaceLabels(age=int(fields[0]), gender=gender, race=race)


def split_of(file_name: str, test_share: float) -> str:
    """'test' or 'train', from a hash of the file name (stable across builds and machines)."""
    digest = hashlib.sha256(posixpath.basename(file_name).encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2.0**64 < test_share else "train"


def jpeg_problem(data: bytes) -> str | None:
    """Why these bytes are not a complete, decodable JPEG, or None when they are."""
    if not data:
        return "empty_file"
    if not data.startswith(b"\xff\xd8"):
        return "not_jpeg"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                return "not_jpeg"
            image.load()
    except OSError as error:
        if str(error).startswith("image file is truncated"):
            return "truncated_image"
        return "undecodable_image"
    except (SyntaxError, ValueError, Image.DecompressionBombError):
        return "undecodable_image"
    return None


def is_safe_member(member: tarfile.TarInfo) -> bool:
    """Regular files whose path stays inside the archive; no links, devices or `..`."""
    parts = member.name.split("/")
    return member.isreg() and not posixpath.isabs(member.name) and ".." not in parts


# A source yields (path, read) per file; read() returns its bytes, or is None for a
# member refused as unsafe.
FileReader = Callable[[], bytes] | None


def find_source(manual_dir: epath.Path) -> epath.Path:
    """The archive or folder holding the faces in `manual_dir`."""
    for candidate in (manual_dir / ARCHIVE_NAME, manual_dir / FOLDER_NAME):
        if candidate.exists():
            return candidate
    if any(path.name.endswith(".jpg") for path in manual_dir.iterdir()):
        return manual_dir
    raise FileNotFoundError(
        f"Found neither {ARCHIVE_NAME}, a {FOLDER_NAME}/ folder nor .jpg files in {manual_dir}. "
        f"{MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )


def iter_source(source: epath.Path) -> Iterator[tuple[str, FileReader]]:
    """Files of the archive (streamed, nothing extracted) or folder, in stored order."""
    if source.is_dir():
        for path in sorted(source.iterdir()):
            if path.is_file():
                yield path.name, path.read_bytes
        return
    with source.open("rb") as archive_file, _open_tar_stream(archive_file, source) as tar:
        for member in tar:
            if member.isdir():
                continue
            if not is_safe_member(member):
                yield member.name, None
                continue
            # Stream mode: the member must be read before the next one is reached.
            yield member.name, tar.extractfile(member).read


def _open_tar_stream(archive_file, source: epath.Path) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=archive_file, mode="r|*")
    except tarfile.ReadError as error:
        raise ValueError(
            f"{source} is not a readable tar archive ({error}). {MANUAL_DOWNLOAD_INSTRUCTIONS}"
        ) from error


@dataclasses.dataclass(eq=False)
class UtkFaceConfig(tfds.core.BuilderConfig):
    """Which share of the faces is held out for testing."""

    test_share: float = 0.1


def config_for_test_share(test_share: float) -> UtkFaceConfig:
    """The builder config holding out `test_share` of the faces (0 < share < 1)."""
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"test_share must lie strictly between 0 and 1, got {test_share}")
    name = f"test_share_{test_share * 100:g}".replace(".", "_")
    for predefined in UtkFace.BUILDER_CONFIGS:
        if predefined.name == name:
            return predefined
    return UtkFaceConfig(name=name, test_share=test_share, description=_describe(test_share))


def _describe(test_share: float) -> str:
    return f"{test_share:.0%} of the faces held out in 'test', by a hash of the file name."


class UtkFace(tfds.core.GeneratorBasedBuilder):
    """UTKFace aligned-and-cropped faces (200x200) with age, gender and race."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Original JPEG bytes; train/test split by file-name hash."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        UtkFaceConfig(name="test_share_10", test_share=0.1, description=_describe(0.1))
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="UTKFace: over 20,000 faces aged 0 to 116, aligned and cropped.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "age": tfds.features.Scalar(np.int32, doc="Age in years, 0-120."),
                    "gender": tfds.features.Scalar(np.int32, doc="0 male, 1 female, -1 unknown."),
                    "race": tfds.features.Scalar(
                        np.int32, doc="0 White, 1 Black, 2 Asian, 3 Indian, 4 Others, -1 unknown."
                    ),
                    "file_name": tfds.features.Text(),
                }
            ),
            homepage=HOMEPAGE,
            citation=_CITATION,
            # Filled during the build: how many files were skipped, and why.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        source = find_source(dl_manager.manual_dir)
        return {split: self._generate_examples(source, split) for split in ("train", "test")}

    def _generate_examples(self, source: epath.Path, split: str):
        """Faces of `split`; the other split's files are passed over unread."""
        seen_names, num_files = set(), 0
        for path, read in iter_source(source):
            num_files += 1
            name = posixpath.basename(path)
            if split_of(name, self.builder_config.test_share) != split:
                continue
            labels, data = parse_file_name(name), None
            if read is None:
                problem = "unsafe_member"
            elif labels is None:
                problem = "unparseable_name"
            elif not MIN_AGE <= labels.age <= MAX_AGE:
                problem = "age_out_of_range"
            elif name in seen_names:
                problem = "duplicate_name"
            elif not name.endswith(".jpg"):
                problem = "not_jpeg"
            else:
                data = read()
                problem = jpeg_problem(data)
            if problem:
                self._skipped[problem] += 1
                continue
            seen_names.add(name)
            self._missing[f"{split}_without_race"] += labels.race == UNKNOWN
            self._missing[f"{split}_without_gender"] += labels.gender == UNKNOWN
            yield (
                name,
                {
                    "image": data,
                    "age": labels.age,
                    "gender": labels.gender,
                    "race": labels.race,
                    "file_name": name,
                },
            )
        if num_files == 0:
            raise ValueError(
                f"{source} holds no files; expected the UTKFace faces. "
                f"{MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        if not seen_names:
            raise ValueError(
                f"No usable face for the '{split}' split among the {num_files} files of {source} "
                f"(test_share {self.builder_config.test_share}); skipped so far: "
                f"{dict(self._skipped)}. Check the files, or use more faces."
            )

    def _download_and_prepare(self, dl_manager, download_config):
        self._skipped = collections.Counter()
        self._missing = collections.Counter()
        super()._download_and_prepare(dl_manager, download_config)
        self.info.metadata["skipped"] = dict(sorted(self._skipped.items()))
        self.info.metadata["kept_with_missing_labels"] = {
            key: count for key, count in sorted(self._missing.items()) if count
        }
        logging.log(
            logging.WARNING if self._skipped else logging.INFO,
            "%s",
            build_summary(self.info),
        )


def build_summary(info: tfds.core.DatasetInfo) -> str:
    """One paragraph on what a build kept and skipped."""
    kept = ", ".join(f"{name} {split.num_examples}" for name, split in info.splits.items())
    skipped = info.metadata.get("skipped", {})
    lines = [f"UTKFace build: kept {kept}."]
    if skipped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
        lines.append(f"Skipped {sum(skipped.values())} files: {reasons}.")
    if missing := info.metadata.get("kept_with_missing_labels"):
        counts = ", ".join(f"{key} {count}" for key, count in missing.items())
        lines.append(f"Kept with a label missing: {counts}.")
    return " ".join(lines)
