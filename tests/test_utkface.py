"""The utk_face TFDS builder: names, the hash split, skipped files, archive safety, errors."""

import io
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from input_pipeline import synthetic, utkface
from input_pipeline.utkface import FaceLabels
from tests import helpers

NUM_FACES = 40
# Kept from helpers.write_malformed_files: the 3 names without race, the space, the missing dot.
NUM_KEPT_MALFORMED = 5
EXPECTED_SKIPPED = {
    "age_out_of_range": 1,
    "empty_file": 1,
    "not_jpeg": 1,
    "truncated_image": 1,
    "undecodable_image": 1,
    "unparseable_name": 1,
}


@pytest.mark.parametrize(
    "name, labels",
    [
        ("25_0_2_20170116174525125.jpg.chip.jpg", FaceLabels(age=25, gender=0, race=2)),
        ("1_1_4_20161221193016140.jpg.chip.jpg", FaceLabels(age=1, gender=1, race=4)),
        ("116_0_0_20170120134921760.jpg.chip.jpg", FaceLabels(age=116, gender=0, race=0)),
        ("UTKFace/80_1_3_20170110131953974.jpg.chip.jpg", FaceLabels(age=80, gender=1, race=3)),
    ],
)
def test_parses_well_formed_names(name, labels):
    assert utkface.parse_file_name(name) == labels


@pytest.mark.parametrize(
    "name, labels",
    [
        # The three real names without a race field.
        ("39_1_20170116174525125.jpg.chip.jpg", FaceLabels(age=39, gender=1, race=-1)),
        ("61_1_20170109142408075.jpg.chip.jpg", FaceLabels(age=61, gender=1, race=-1)),
        ("61_1_20170109150557335.jpg.chip.jpg", FaceLabels(age=61, gender=1, race=-1)),
        # A space before the extension.
        ("24_0_1_20170116220224657 .jpg.chip.jpg", FaceLabels(age=24, gender=0, race=1)),
        # No dot before "jpg".
        ("55_0_0_20170116232725357jpg.chip.jpg", FaceLabels(age=55, gender=0, race=0)),
        # An age outside 0-120 still parses; the build skips it.
        ("150_0_1_20170116220224001.jpg.chip.jpg", FaceLabels(age=150, gender=0, race=1)),
        # A gender outside 0/1 is unknown, the age is kept.
        ("30_7_1_20170116220224001.jpg.chip.jpg", FaceLabels(age=30, gender=-1, race=1)),
    ],
)
def test_parses_malformed_names_keeping_the_age(name, labels):
    assert utkface.parse_file_name(name) == labels


@pytest.mark.parametrize(
    "name",
    ["x_0_1_20170116220224000.jpg.chip.jpg", "_0_1_2017.jpg", ".jpg.chip.jpg", "-5_0_1_2017.jpg"],
)
def test_names_without_a_parseable_age_give_none(name):
    assert utkface.parse_file_name(name) is None


def test_split_is_fixed_by_the_file_name_hash():
    # Pinned: changing the hash would move faces between train and test in existing builds.
    assert utkface.split_of("1_0_0_20161219140623097.jpg.chip.jpg", 0.1) == "test"
    assert utkface.split_of("25_0_2_20170116174525125.jpg.chip.jpg", 0.1) == "train"
    assert utkface.split_of("25_0_2_20170116174525125.jpg.chip.jpg", 0.5) == "test"
    assert utkface.split_of("30_0_0_20170117001226468.jpg.chip.jpg", 0.5) == "train"
    # Only the base name counts, not the folder it is in.
    assert utkface.split_of("UTKFace/1_0_0_20161219140623097.jpg.chip.jpg", 0.1) == "test"


def test_split_holds_out_the_test_share():
    names = [spec.file_name for spec in synthetic.face_specs(5000, seed=0)]
    shares = {
        share: np.mean([utkface.split_of(name, share) == "test" for name in names])
        for share in (0.1, 0.3)
    }
    assert shares[0.1] == pytest.approx(0.1, abs=0.015)
    assert shares[0.3] == pytest.approx(0.3, abs=0.02)


def test_config_for_test_share():
    assert utkface.config_for_test_share(0.1) is utkface.UtkFace.BUILDER_CONFIGS[0]
    assert utkface.config_for_test_share(0.2).name == "test_share_20"
    assert utkface.config_for_test_share(0.125).name == "test_share_12_5"
    for bad_share in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            utkface.config_for_test_share(bad_share)


def test_jpeg_problem_names_each_kind_of_bad_file():
    face = synthetic.render_face(synthetic.face_specs(1)[0])
    jpeg = synthetic.encode_jpeg(face)
    png = io.BytesIO()
    Image.fromarray(face).save(png, format="PNG")
    assert utkface.jpeg_problem(jpeg) is None
    assert utkface.jpeg_problem(b"") == "empty_file"
    assert utkface.jpeg_problem(png.getvalue()) == "not_jpeg"
    assert utkface.jpeg_problem(jpeg[: len(jpeg) // 2]) == "truncated_image"
    assert utkface.jpeg_problem(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8) == "undecodable_image"


def _member(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    return member


def test_only_regular_files_inside_the_archive_are_safe():
    assert utkface.is_safe_member(_member("UTKFace/25_0_2_2017.jpg.chip.jpg"))
    assert not utkface.is_safe_member(_member("../25_0_2_2017.jpg.chip.jpg"))
    assert not utkface.is_safe_member(_member("UTKFace/../../25_0_2_2017.jpg.chip.jpg"))
    assert not utkface.is_safe_member(_member("/tmp/25_0_2_2017.jpg.chip.jpg"))
    assert not utkface.is_safe_member(_member("UTKFace/a.jpg", tarfile.SYMTYPE))
    assert not utkface.is_safe_member(_member("UTKFace/a.jpg", tarfile.LNKTYPE))
    assert not utkface.is_safe_member(_member("UTKFace/a.jpg", tarfile.CHRTYPE))


def _build(manual_dir, data_dir, test_share=0.1) -> tfds.core.DatasetBuilder:
    builder = tfds.builder(
        "utk_face", data_dir=data_dir, config=utkface.config_for_test_share(test_share)
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


def _records(builder, split) -> dict[str, dict]:
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return {record["file_name"].decode(): record for record in dataset.as_numpy_iterator()}


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory):
    """A manual_dir holding an extracted UTKFace/ folder: synthetic faces and bad files."""
    manual_dir = tmp_path_factory.mktemp("folder_manual")
    synthetic.write_faces(manual_dir / "UTKFace", NUM_FACES, seed=0)
    helpers.write_malformed_files(manual_dir / "UTKFace")
    return manual_dir


@pytest.fixture(scope="module")
def folder_build(faces_dir, tmp_path_factory):
    return _build(faces_dir, tmp_path_factory.mktemp("folder_data"))


@pytest.fixture(scope="module")
def archive_build(faces_dir, tmp_path_factory):
    """The same faces as a tar.gz, in reverse order, with three members that escape."""
    manual_dir = tmp_path_factory.mktemp("archive_manual")
    escapes = tmp_path_factory.mktemp("escapes")
    with tarfile.open(manual_dir / "UTKFace.tar.gz", "w:gz") as tar:
        for path in sorted((faces_dir / "UTKFace").iterdir(), reverse=True):
            tar.add(path, arcname=f"UTKFace/{path.name}")
        data = (faces_dir / "UTKFace" / helpers.MALFORMED_NAMES[0]).read_bytes()
        for name in ["../20_0_0_20170101000000001.jpg.chip.jpg", f"{escapes}/21_0_0_2017.jpg"]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        tar.addfile(_member("UTKFace/22_0_0_2017.jpg.chip.jpg", tarfile.SYMTYPE))
    builder = _build(manual_dir, tmp_path_factory.mktemp("archive_data"))
    return builder, manual_dir, escapes


def test_folder_build_keeps_good_and_malformed_names(folder_build):
    num_examples = sum(split.num_examples for split in folder_build.info.splits.values())
    assert num_examples == NUM_FACES + NUM_KEPT_MALFORMED


def test_folder_build_reports_every_skipped_file(folder_build):
    assert folder_build.info.metadata["skipped"] == EXPECTED_SKIPPED
    without_race = folder_build.info.metadata["kept_with_missing_labels"]
    assert sum(count for key, count in without_race.items() if "race" in key) == 3
    summary = utkface.build_summary(folder_build.info)
    assert "Skipped 6 files" in summary
    assert "truncated_image 1" in summary


def test_build_keeps_the_original_jpeg_bytes_and_labels(folder_build, faces_dir):
    records = _records(folder_build, "train") | _records(folder_build, "test")
    spec = synthetic.face_specs(NUM_FACES, seed=0)[3]
    record = records[spec.file_name]
    assert record["image"] == (faces_dir / "UTKFace" / spec.file_name).read_bytes()
    assert (record["age"], record["gender"], record["race"]) == (spec.age, spec.gender, spec.race)
    assert records["55_0_0_20170116232725357jpg.chip.jpg"]["age"] == 55
    assert records["39_1_20170116174525125.jpg.chip.jpg"]["race"] == -1


def test_splits_are_disjoint_and_follow_the_name_hash(folder_build):
    train, test = _records(folder_build, "train"), _records(folder_build, "test")
    assert not set(train) & set(test)
    assert all(utkface.split_of(name, 0.1) == "train" for name in train)
    assert all(utkface.split_of(name, 0.1) == "test" for name in test)
    assert len(test) >= 1


def test_archive_build_gives_the_same_split_as_the_folder(folder_build, archive_build):
    builder, _, _ = archive_build
    for split in ("train", "test"):
        assert set(_records(builder, split)) == set(_records(folder_build, split))


def test_archive_members_that_escape_are_refused_and_counted(archive_build):
    builder, manual_dir, escapes = archive_build
    assert builder.info.metadata["skipped"] == EXPECTED_SKIPPED | {"unsafe_member": 3}
    assert not list(escapes.iterdir())
    assert not (manual_dir.parent / "20_0_0_20170101000000001.jpg.chip.jpg").exists()


def test_missing_manual_dir_names_the_path_and_the_download_page(tmp_path):
    with pytest.raises(AssertionError, match="does not exist") as error:
        _build(tmp_path / "nowhere", tmp_path / "data")
    assert str(tmp_path / "nowhere") in str(error.value)
    assert utkface.HOMEPAGE in str(error.value)


def test_empty_archive_names_the_path_and_the_download_page(tmp_path):
    (tmp_path / "manual").mkdir()
    tarfile.open(tmp_path / "manual" / "UTKFace.tar.gz", "w:gz").close()
    with pytest.raises(ValueError, match="holds no files") as error:
        _build(tmp_path / "manual", tmp_path / "data")
    assert str(tmp_path / "manual" / "UTKFace.tar.gz") in str(error.value)
    assert utkface.HOMEPAGE in str(error.value)


def test_manual_dir_without_faces_says_what_it_expected(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "notes.txt").write_text("not a face")
    with pytest.raises(FileNotFoundError, match="Found neither UTKFace.tar.gz") as error:
        _build(tmp_path / "manual", tmp_path / "data")
    assert utkface.HOMEPAGE in str(error.value)


def test_write_malformed_files_writes_every_case(tmp_path):
    names = helpers.write_malformed_files(tmp_path)
    assert len(names) == 11
    assert (tmp_path / helpers.EMPTY_NAME).stat().st_size == 0
    assert (tmp_path / helpers.NOT_JPEG_NAME).read_bytes().startswith(b"\x89PNG")
