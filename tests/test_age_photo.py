"""The photo tool on real face photos: found, aligned, pasted back, and every bad input.

The photos are scikit-image's astronaut and face_recognition 1.3.0's test photos
(fetched into a cache, see helpers.face_photos). The generators are the test
config's, with random weights: their change is large everywhere in the chip.
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image
from scipy import ndimage

from faceage_jax import age_photo, alignment, cyclegan, export, faces
from tests import helpers


@pytest.fixture(scope="module")
def finder():
    return faces.FaceFinder()


@pytest.fixture(scope="module")
def generators():
    return helpers.random_generators()


def astronaut_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, "PNG")
    return buffer.getvalue()


def aged(finder, generators, data, strength=1.0, **options):
    photo = age_photo.read_photo(data, "photo")
    (result,) = age_photo.age_photos([photo], generators, finder, strength=strength, **options)
    assert not isinstance(result, age_photo.PhotoError), result
    return photo, result


def support(result, shape, feather=alignment.DEFAULT_FEATHER) -> np.ndarray:
    """Where the pasted change may be non-zero: the warped mask's support, dilated 2 px."""
    mask = np.zeros(shape[:2], bool)
    for face in result.faces:
        chip_mask = alignment.face_mask(helpers.TEMPLATE, face.chip.shape[0], feather)
        mask |= alignment.warp_mask_to_photo(chip_mask, face.transform, shape) > 0
    return ndimage.binary_dilation(mask, iterations=2)


@pytest.mark.parametrize("name", ["astronaut", "obama.jpg", "biden.jpg"])
def test_the_face_is_found_and_aligned_to_the_template(finder, name):
    if name == "astronaut":
        photo = skimage.data.astronaut()
    else:
        photo = np.asarray(Image.open(helpers.face_photos()[name]).convert("RGB"))
    (box, landmarks), *_ = finder.find_in_photo(photo)
    left, top, right, bottom = box
    assert (landmarks[:, 0] > left).all() and (landmarks[:, 0] < right).all()
    assert (landmarks[:, 1] > top).all() and (landmarks[:, 1] < bottom).all()
    size = 128
    transform = alignment.chip_transform(landmarks, helpers.TEMPLATE, size)
    chip = alignment.warp_to_chip(Image.fromarray(photo), transform, size)
    found, _, chip_landmarks = finder.locate(chip[None])
    assert found[0]
    # The landmarks read again on the chip lie at the template's points.
    error = np.abs(chip_landmarks[0] + 0.5 - helpers.TEMPLATE.points * size).max()
    assert error < 3.0, error


def test_the_largest_face_is_chosen_over_weak_detections(finder):
    # At 3072 px, dlib also finds the astronaut's mission patch (score ~0.1), larger
    # than her face; the face (score > 1) is the one found.
    photo = np.asarray(
        Image.fromarray(skimage.data.astronaut()).resize((3072, 3072), Image.BICUBIC)
    )
    (box, _), *_ = finder.find_in_photo(photo)
    centre = (box[:2] + box[2:]) / 2 / 6  # In the 512 px photo's pixels.
    assert 180 < centre[0] < 270 and 80 < centre[1] < 175, centre


def test_strength_zero_gives_the_input_back_exactly(finder, generators):
    photo, result = aged(finder, generators, astronaut_png(), strength=0)
    np.testing.assert_array_equal(result.image, photo.rgb)


def test_outside_the_mask_every_pixel_is_the_inputs_and_inside_they_change(finder, generators):
    photo, result = aged(finder, generators, astronaut_png())
    changed = (result.image != photo.rgb).any(-1)
    inside = support(result, photo.rgb.shape)
    assert not changed[~inside].any()
    assert changed[inside].mean() > 0.5
    # All of it near the face: within the face box grown by its size on each side.
    left, top, right, bottom = result.faces[0].box
    width = right - left
    rows, cols = np.nonzero(changed)
    assert cols.min() > left - width and cols.max() < right + width
    assert rows.min() > top - 1.5 * width and rows.max() < bottom + width


def test_the_change_grows_with_strength(finder, generators):
    changes = []
    inside = None
    for strength in (0, 0.25, 0.5, 0.75, 1):
        photo, result = aged(finder, generators, astronaut_png(), strength=strength)
        if inside is None:
            inside = support(result, photo.rgb.shape)
        changes.append(np.abs(result.image.astype(int) - photo.rgb)[inside].mean())
    assert changes[0] == 0
    assert all(a < b for a, b in zip(changes, changes[1:], strict=False)), changes


def test_an_exif_rotated_copy_gives_the_same_result(finder, generators):
    upright = skimage.data.astronaut()
    stored = Image.fromarray(np.rot90(upright, k=1))  # As a camera held sideways stores it.
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    _, from_rotated = aged(finder, generators, buffer.getvalue())
    _, from_upright = aged(finder, generators, astronaut_png())
    np.testing.assert_array_equal(from_rotated.image, from_upright.image)


def test_a_phone_style_rotated_jpeg_comes_back_upright(finder, generators):
    stored = Image.fromarray(np.rot90(skimage.data.astronaut(), k=-1))
    exif = Image.Exif()
    exif[0x0112] = 8  # Rotate 90 degrees counter-clockwise to display.
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=92, exif=exif)
    photo, result = aged(finder, generators, buffer.getvalue())
    assert result.image.shape == (512, 512, 3)
    left, top, right, bottom = result.faces[0].box
    assert 150 < left < 200 and 60 < top < 110, result.faces[0].box  # Where it is upright.


def test_an_iphone_style_heic_is_read_upright(finder, generators):
    import pillow_heif

    upright = skimage.data.astronaut()[:, :400]
    stored = Image.fromarray(np.rot90(upright, k=-1))  # 512 wide, 400 high, as stored.
    exif = Image.Exif()
    exif[0x0112] = 8
    buffer = io.BytesIO()
    pillow_heif.from_pillow(stored).save(buffer, quality=90, exif=exif.tobytes())
    photo, result = aged(finder, generators, buffer.getvalue())
    assert result.image.shape == (512, 400, 3)
    assert np.abs(photo.rgb.astype(int) - upright).mean() < 3  # Lossy, but upright.


def test_an_rgba_png_keeps_its_alpha_and_a_greyscale_jpeg_works(finder, generators, tmp_path):
    rgb = skimage.data.astronaut()
    alpha = np.tile(np.linspace(64, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(buffer, "PNG")
    photo, result = aged(finder, generators, buffer.getvalue())
    written = Image.open(io.BytesIO(age_photo.encode(result, tmp_path / "out.png")))
    assert written.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(written)[..., 3], alpha)
    np.testing.assert_array_equal(np.asarray(written)[..., :3], result.image)

    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("L").save(buffer, "JPEG", quality=90)
    photo, result = aged(finder, generators, buffer.getvalue())
    assert result.image.shape == (512, 512, 3)
    assert (result.image != photo.rgb).any()


def test_all_faces_ages_each_face(finder, generators):
    # Two people side by side: the astronaut and Biden.
    astronaut = Image.fromarray(skimage.data.astronaut())
    biden = Image.open(helpers.face_photos()["biden.jpg"]).convert("RGB")
    biden.thumbnail((512, 512))  # 225 x 512, the face ~70 px wide.
    pair = Image.new("RGB", (512 + biden.width, 512))
    pair.paste(astronaut, (0, 0))
    pair.paste(biden, (512, 0))
    buffer = io.BytesIO()
    pair.save(buffer, "PNG")
    _, one = aged(finder, generators, buffer.getvalue())
    _, both = aged(finder, generators, buffer.getvalue(), all_faces=True)
    assert len(one.faces) == 1 and len(both.faces) == 2
    centres = sorted((face.box[0] + face.box[2]) / 2 for face in both.faces)
    assert centres[0] < 512 < centres[1]


# ------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An exported file of the test config's generators with random weights."""
    config = helpers.make_config()
    generator = cyclegan.create_networks(config).generator
    size = config.image_size
    params = {
        name: generator.init(jax.random.key(i), jnp.zeros((1, size, size, 3)))
        for i, name in enumerate(export.DIRECTIONS)
    }
    path = tmp_path_factory.mktemp("exported") / "random.faceage"
    export.save(path, config, params, 7, helpers.TEMPLATE)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of one good photo and each kind of bad file."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "astronaut.png").write_bytes(astronaut_png())
    Image.new("RGB", (300, 200), (120, 130, 140)).save(folder / "wall.jpg")  # No face.
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    (folder / "notes.png").write_text("not an image, whatever the name says\n")
    Image.new("RGB", (4000, 3000), (90, 90, 90)).save(folder / "huge.png")
    small = Image.fromarray(skimage.data.astronaut()).resize((300, 300))  # Face ~51 px.
    small.save(folder / "tiny_face.png")
    return folder


MESSAGES = {
    "wall.jpg": "no face found",
    "truncated.jpg": "truncated or corrupt",
    "notes.png": "is not an image Pillow can read",
    "huge.png": "12 megapixels, over the limit of 10",
    "tiny_face.png": "faces of at least 64 px are aged",
}


def run_tool(*args) -> tuple[int, str, str]:
    import contextlib

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = age_photo.main([str(a) for a in args])
    return status, stdout.getvalue(), stderr.getvalue()


def test_a_batch_ages_the_good_photo_and_names_each_bad_file(exported, inputs, tmp_path):
    status, out, err = run_tool(
        "--exported", exported, inputs, "-o", tmp_path / "out", "--max-megapixels", 10
    )
    assert status == 0
    assert "1 aged, 2 without a face, 3 failed" in out
    for name, message in MESSAGES.items():
        (line,) = [line for line in err.splitlines() if name in line]
        assert message in line, line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["astronaut.png"]
    written = np.asarray(Image.open(tmp_path / "out" / "astronaut.png"))
    assert written.shape == (512, 512, 3)


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_each_bad_file_alone_exits_non_zero_with_its_message(exported, inputs, tmp_path, name):
    status, out, err = run_tool(
        "--exported", exported, inputs / name, "-o", tmp_path / name, "--max-megapixels", 10
    )
    assert status == 1
    assert MESSAGES[name] in err
    assert "0 aged" in out
    assert not (tmp_path / name).exists()


def test_same_input_same_options_give_byte_identical_files(exported, inputs, tmp_path):
    for run in ("a", "b"):
        assert (
            run_tool(
                "--exported",
                exported,
                inputs / "astronaut.png",
                "-o",
                tmp_path / f"{run}.jpg",
                "--strength",
                "0.6",
            )[0]
            == 0
        )
    assert (tmp_path / "a.jpg").read_bytes() == (tmp_path / "b.jpg").read_bytes()


def test_strength_zero_on_the_command_line_writes_the_input_pixels(exported, inputs, tmp_path):
    run_tool(
        "--exported",
        exported,
        inputs / "astronaut.png",
        "-o",
        tmp_path / "same.png",
        "--strength",
        "0",
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "same.png")), skimage.data.astronaut()
    )


def test_outputs_keep_their_names_and_nothing_is_overwritten(exported, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "face.png").write_bytes(astronaut_png())
    out = tmp_path / "out"
    status, _, _ = run_tool("--exported", exported, tmp_path / "a", tmp_path / "b", "-o", out)
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == ["face-1.png", "face.png"]
    before = (out / "face.png").read_bytes()
    status, _, err = run_tool(
        "--exported", exported, tmp_path / "a", "-o", out, "--strength", "0.5"
    )
    assert status == 1 and "pass --overwrite" in err
    assert (out / "face.png").read_bytes() == before
    # The input itself is the output only with --overwrite.
    original = (tmp_path / "a" / "face.png").read_bytes()
    status, _, err = run_tool(
        "--exported", exported, tmp_path / "a" / "face.png", "-o", tmp_path / "a" / "face.png"
    )
    assert status == 1 and "is the input; pass --overwrite" in err
    assert (tmp_path / "a" / "face.png").read_bytes() == original
    status, _, _ = run_tool(
        "--exported",
        exported,
        tmp_path / "a" / "face.png",
        "-o",
        tmp_path / "a" / "face.png",
        "--overwrite",
    )
    assert status == 0 and (tmp_path / "a" / "face.png").read_bytes() != original


def test_side_by_side_and_chips(exported, inputs, tmp_path):
    status, _, _ = run_tool(
        "--exported",
        exported,
        inputs / "astronaut.png",
        "-o",
        tmp_path / "pair.png",
        "--side-by-side",
        "--save-chips",
    )
    assert status == 0
    pair = np.asarray(Image.open(tmp_path / "pair.png"))
    assert pair.shape == (512, 1024, 3)
    np.testing.assert_array_equal(pair[:, :512], skimage.data.astronaut())
    for kind in ("in", "out"):
        chip = Image.open(tmp_path / f"pair.png.face0.{kind}.png")
        assert chip.size == (32, 32)


def test_bad_options_are_refused_with_what_is_allowed(exported, inputs):
    with pytest.raises(SystemExit):
        age_photo.main(["--exported", str(exported), str(inputs), "-o", "x", "--strength", "2"])
    status, _, err = run_tool("--exported", inputs / "notes.png", inputs, "-o", "unused")
    assert status == 2 and "is not an exported model" in err


# ------------------------------------------------------------ odd files


# EXIF whose orientation entry is damaged: Pillow's exif_transpose raises struct.error.
DAMAGED_EXIF = (
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xa2\x02\x01@\x00\x02\x00\x00\x00\x04cam\x00"
    b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"
)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_photo_with_damaged_exif_is_a_clear_error():
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, "JPEG", exif=DAMAGED_EXIF)
    with pytest.raises(age_photo.CorruptImageError, match="truncated or corrupt"):
        age_photo.read_photo(buffer.getvalue(), "damaged.jpg")


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(finder, generators):
    grey = np.asarray(Image.fromarray(skimage.data.astronaut()).convert("L"))
    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(buffer, "PNG")  # Pillow reads I;16.
    photo, result = aged(finder, generators, buffer.getvalue())
    np.testing.assert_array_equal(photo.rgb[..., 0], grey)
    assert len(result.faces) == 1


def test_only_an_rgb_colour_profile_is_carried_over(tmp_path):
    from PIL import ImageCms

    rgb = skimage.data.astronaut()
    for profile, kept in (("sRGB", True), ("LAB", False)):
        icc = ImageCms.ImageCmsProfile(ImageCms.createProfile(profile)).tobytes()
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "JPEG", icc_profile=icc)
        photo = age_photo.read_photo(buffer.getvalue(), "photo.jpg")
        assert (photo.icc_profile == icc) is kept, profile


def test_landmarks_map_pixel_centres_between_sizes(finder):
    # A 4x nearest-neighbour copy: each landmark lies at 4 (p + 0.5) - 0.5 of the original's.
    small = skimage.data.astronaut()
    large = np.asarray(Image.fromarray(small).resize((2048, 2048), Image.NEAREST))
    (_, at_small), *_ = finder.find_in_photo(small)
    (_, at_large), *_ = finder.find_in_photo(large)
    error = at_large - (4 * (at_small + 0.5) - 0.5)
    assert np.abs(error.mean(0)).max() < 0.75, error  # No systematic shift.


def test_heic_files_in_a_folder_are_listed_and_heic_can_be_written(tmp_path):
    import pillow_heif

    (tmp_path / "in").mkdir()
    pillow_heif.from_pillow(Image.fromarray(skimage.data.astronaut())).save(
        tmp_path / "in" / "phone.heic"
    )
    plan, to_folder = age_photo.plan_outputs([str(tmp_path / "in")], str(tmp_path / "out"), False)
    assert to_folder and [target.name for _, target in plan] == ["phone.heic"]
    assert age_photo.output_format(tmp_path / "out" / "phone.heic") == "HEIF"
    with pytest.raises(age_photo.PhotoError, match="cannot write .gif"):
        age_photo.output_format(tmp_path / "out" / "animation.gif")


def test_several_photos_cannot_be_written_into_one_file(exported, inputs, tmp_path):
    (tmp_path / "taken.jpg").write_bytes(b"x")
    with pytest.raises(SystemExit) as stopped:
        age_photo.main(
            [
                "--exported",
                str(exported),
                str(inputs / "astronaut.png"),
                str(inputs / "wall.jpg"),
                "-o",
                str(tmp_path / "taken.jpg"),
            ]
        )
    assert stopped.value.code == 2
    assert (tmp_path / "taken.jpg").read_bytes() == b"x"


def test_chips_are_named_after_each_output(exported, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "me.png").write_bytes(astronaut_png())
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "in" / "me.jpg", quality=95)
    status, _, _ = run_tool(
        "--exported", exported, tmp_path / "in", "-o", tmp_path / "out", "--save-chips"
    )
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "me.jpg",
        "me.jpg.face0.in.png",
        "me.jpg.face0.out.png",
        "me.png",
        "me.png.face0.in.png",
        "me.png.face0.out.png",
    ]
