"""The FID Inception-v3 in Flax, as pytorch-fid defines it, and its weights from a file.

FID is only comparable across papers when it is computed with one network: the
TensorFlow graph `inception-2015-12-05` that the original FID code used. Its
differences from torchvision's Inception-v3: the average pools of Mixed_5b-5d,
6b-6e and 7b leave the zero padding out of the average, and Mixed_7c's pooling
branch is a max pool. Every convolution is bias-free, then batch norm
(eps 1e-3, running statistics) and ReLU. Features are the 2048 channels of the
global average pool.

Nothing is downloaded: the weights come from a file the user supplies,
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (read without torch by
`torch_weights.load_state_dict`) or an `.npz` with the same keys. Module names
follow pytorch-fid's state-dict keys (`Mixed_6b.branch7x7_2.conv.weight`), so
that loading is a rename and a transpose, checked key by key and shape by shape.
"""

import functools
import pathlib
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from faceage_jax.metrics import torch_weights

FEATURES = 2048
INPUT_SIZE = 299
BATCH_NORM_EPSILON = 1e-3
# Keys of pytorch-fid's file that the features do not use: the classifier and
# PyTorch's count of training batches.
UNUSED_KEYS = ("fc.weight", "fc.bias")
UNUSED_SUFFIXES = (".num_batches_tracked",)


class BasicConv(nn.Module):
    """Bias-free convolution, batch norm with running statistics, ReLU."""

    features: int
    kernel_size: Sequence[int]
    strides: int = 1
    padding: Sequence[int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(
            self.features,
            tuple(self.kernel_size),
            strides=self.strides,
            padding=[(p, p) for p in self.padding],
            use_bias=False,
            precision=jax.lax.Precision.HIGHEST,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPSILON, name="bn")(x)
        return nn.relu(x)


def conv(features, kernel_size, name, strides=1, padding=None):
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    if padding is None:
        padding = (0, 0)
    elif isinstance(padding, int):
        padding = (padding, padding)
    return BasicConv(features, kernel_size, strides, padding, name=name)


def average_pool_without_padding(x):
    """TensorFlow's 3x3 stride-1 'SAME' average pool: the padding is not counted."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        branch1x1 = conv(64, 1, "branch1x1")(x)
        branch5x5 = conv(48, 1, "branch5x5_1")(x)
        branch5x5 = conv(64, 5, "branch5x5_2", padding=2)(branch5x5)
        branch3x3dbl = conv(64, 1, "branch3x3dbl_1")(x)
        branch3x3dbl = conv(96, 3, "branch3x3dbl_2", padding=1)(branch3x3dbl)
        branch3x3dbl = conv(96, 3, "branch3x3dbl_3", padding=1)(branch3x3dbl)
        branch_pool = conv(self.pool_features, 1, "branch_pool")(average_pool_without_padding(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: the grid 35 -> 17."""

    @nn.compact
    def __call__(self, x):
        branch3x3 = conv(384, 3, "branch3x3", strides=2)(x)
        branch3x3dbl = conv(64, 1, "branch3x3dbl_1")(x)
        branch3x3dbl = conv(96, 3, "branch3x3dbl_2", padding=1)(branch3x3dbl)
        branch3x3dbl = conv(96, 3, "branch3x3dbl_3", strides=2)(branch3x3dbl)
        branch_pool = nn.max_pool(x, (3, 3), (2, 2))
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        branch1x1 = conv(192, 1, "branch1x1")(x)
        branch7x7 = conv(c7, 1, "branch7x7_1")(x)
        branch7x7 = conv(c7, (1, 7), "branch7x7_2", padding=(0, 3))(branch7x7)
        branch7x7 = conv(192, (7, 1), "branch7x7_3", padding=(3, 0))(branch7x7)
        dbl = conv(c7, 1, "branch7x7dbl_1")(x)
        dbl = conv(c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))(dbl)
        dbl = conv(c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))(dbl)
        dbl = conv(c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))(dbl)
        dbl = conv(192, (1, 7), "branch7x7dbl_5", padding=(0, 3))(dbl)
        branch_pool = conv(192, 1, "branch_pool")(average_pool_without_padding(x))
        return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: the grid 17 -> 8."""

    @nn.compact
    def __call__(self, x):
        branch3x3 = conv(192, 1, "branch3x3_1")(x)
        branch3x3 = conv(320, 3, "branch3x3_2", strides=2)(branch3x3)
        branch7x7x3 = conv(192, 1, "branch7x7x3_1")(x)
        branch7x7x3 = conv(192, (1, 7), "branch7x7x3_2", padding=(0, 3))(branch7x7x3)
        branch7x7x3 = conv(192, (7, 1), "branch7x7x3_3", padding=(3, 0))(branch7x7x3)
        branch7x7x3 = conv(192, 3, "branch7x7x3_4", strides=2)(branch7x7x3)
        branch_pool = nn.max_pool(x, (3, 3), (2, 2))
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool without padding) and Mixed_7c (max pool, as in the graph)."""

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        branch1x1 = conv(320, 1, "branch1x1")(x)
        branch3x3 = conv(384, 1, "branch3x3_1")(x)
        branch3x3 = jnp.concatenate(
            [
                conv(384, (1, 3), "branch3x3_2a", padding=(0, 1))(branch3x3),
                conv(384, (3, 1), "branch3x3_2b", padding=(1, 0))(branch3x3),
            ],
            axis=-1,
        )
        dbl = conv(448, 1, "branch3x3dbl_1")(x)
        dbl = conv(384, 3, "branch3x3dbl_2", padding=1)(dbl)
        dbl = jnp.concatenate(
            [
                conv(384, (1, 3), "branch3x3dbl_3a", padding=(0, 1))(dbl),
                conv(384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))(dbl),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = average_pool_without_padding(x)
        branch_pool = conv(192, 1, "branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class FIDInception(nn.Module):
    """Images in [0, 1], `[N, H, W, 3]` -> the 2048 pool features `[N, 2048]`."""

    @nn.compact
    def __call__(self, images):
        batch = images.shape[0]
        x = jax.image.resize(
            images.astype(jnp.float32),
            (batch, INPUT_SIZE, INPUT_SIZE, 3),
            "bilinear",
            antialias=False,
        )
        x = 2.0 * x - 1.0
        x = conv(32, 3, "Conv2d_1a_3x3", strides=2)(x)
        x = conv(32, 3, "Conv2d_2a_3x3")(x)
        x = conv(64, 3, "Conv2d_2b_3x3", padding=1)(x)
        x = nn.max_pool(x, (3, 3), (2, 2))
        x = conv(80, 1, "Conv2d_3b_1x1")(x)
        x = conv(192, 3, "Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), (2, 2))
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, channels in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160)]:
            x = InceptionC(channels, name=name)(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


class WeightsError(ValueError):
    """A weights file that is not the FID Inception's: says which keys or shapes are wrong."""


@functools.cache
def expected_variables():
    """{'params': ..., 'batch_stats': ...} as shapes, from the network itself."""
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInception().init, jax.random.key(0), images)


# pytorch-fid's leaf names -> (collection, Flax leaf name).
_LEAVES = {
    "conv.weight": ("params", "kernel"),
    "bn.weight": ("params", "scale"),
    "bn.bias": ("params", "bias"),
    "bn.running_mean": ("batch_stats", "mean"),
    "bn.running_var": ("batch_stats", "var"),
}


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "the weights"):
    """pytorch-fid's state dict (key -> array) -> the Flax variables of `FIDInception`.

    Convolution kernels go from PyTorch's [out, in, h, w] to [h, w, in, out].
    Every key the network needs must be there with its shape, and no key may be
    left over but the classifier's and `num_batches_tracked`: a file of another
    network (torchvision's Inception, say) fails here, not with a wrong FID.
    """
    expected = traverse_util.flatten_dict(expected_variables(), sep="/")
    variables, unknown = {}, []
    for key, value in state_dict.items():
        if key in UNUSED_KEYS or key.endswith(UNUSED_SUFFIXES):
            continue
        module, _, leaf = key.rpartition(".")
        module, _, layer = module.rpartition(".")
        if (layer + "." + leaf) not in _LEAVES:
            unknown.append(key)
            continue
        collection, name = _LEAVES[layer + "." + leaf]
        path = "/".join([collection, *module.split("."), layer, name])
        value = np.asarray(value, np.float32)
        if name == "kernel" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        if path not in expected:
            unknown.append(key)
            continue
        if value.shape != expected[path].shape:
            raise WeightsError(
                f"{source}: {key} has shape {value.shape} (as Flax), the FID Inception "
                f"needs {expected[path].shape}. Is this pytorch-fid's "
                "pt_inception-2015-12-05 file?"
            )
        variables[path] = value
    missing = sorted(set(expected) - set(variables))
    if unknown or missing:
        raise WeightsError(
            f"{source} is not the FID Inception's weights: "
            + (f"{len(missing)} keys missing (first: {missing[:3]}); " if missing else "")
            + (f"{len(unknown)} unknown keys (first: {unknown[:3]}); " if unknown else "")
            + "expected pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
            "or an .npz converted from it (python -m faceage_jax.metrics.convert_inception)."
        )
    return traverse_util.unflatten_dict(variables, sep="/")


def state_dict_from_variables(variables) -> dict[str, np.ndarray]:
    """The inverse of `variables_from_state_dict` (for the .npz converter and tests)."""
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    leaves = {value: key for key, value in _LEAVES.items()}
    state_dict = {}
    for path, value in flat.items():
        collection, *module, _layer, name = path.split("/")
        value = np.asarray(value)
        if name == "kernel":
            value = value.transpose(3, 2, 0, 1)
        state_dict[".".join([*module, leaves[(collection, name)]])] = value
    return state_dict


def load_variables(path: str | pathlib.Path):
    """FID Inception variables from pytorch-fid's .pth or an .npz with the same keys."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No Inception weights at {path}. FID needs pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth (README, 'Evaluation')."
        )
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            state_dict = dict(archive)
    else:
        state_dict = torch_weights.load_state_dict(path)
    return variables_from_state_dict(state_dict, source=str(path))


@jax.jit
def _features(variables, images):
    return FIDInception().apply(variables, images)


def features(variables, images: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """2048-d features of `images` (`[N, H, W, 3]` in [0, 1]), in batches, as float64."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], np.float32)
        padded = np.zeros((batch_size, *batch.shape[1:]), np.float32)
        padded[: len(batch)] = batch  # One compiled shape for the last batch too.
        outputs.append(np.asarray(_features(variables, padded))[: len(batch)])
    if not outputs:
        return np.zeros((0, FEATURES))
    return np.concatenate(outputs).astype(np.float64)
