"""The layers the networks are built from, computed for speed and memory.

Each layer has the parameters (names, shapes, initialization) and the results,
gradients included, of a straightforward Flax layer, and tests hold them equal:

- `Conv` is `nn.Conv` on a prepared input: an optional ReLU and reflection
  padding applied inside the layer, and, for the residual blocks' 3x3
  convolutions, Winograd's algorithm (`winograd.winograd_conv3x3`).
- `SubpixelConvTranspose` is the stride-2 `nn.ConvTranspose` as four small
  convolutions, not one over the stride-dilated input (three quarters zeros),
  which XLA:CPU runs at a small fraction of matrix-multiply speed.
- `instance_norm` is `nn.InstanceNorm` without affine parameters whose backward
  pass keeps only its output.

Both convolutions keep only their input and kernel for the backward pass and
recompute the ReLU, padding and input transforms there (`_apply_layer`), so a
generator layer stores one tensor instead of three or four.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from faceage_jax.winograd import winograd_conv3x3

KERNEL_INIT = nn.initializers.normal(stddev=0.02)

# Same spatial padding as PyTorch's Conv2d(padding=1).
PAD_1 = ((1, 1), (1, 1))
# PyTorch's ConvTranspose2d(kernel 3, stride 2, padding 1, output_padding 1) as a
# transposed convolution over the stride-dilated input: k - 1 - p before, plus
# output_padding after, which exactly doubles the height and width.
TRANSPOSE_PAD_3x3_S2 = ((1, 2), (1, 2))
INSTANCE_NORM_EPSILON = 1e-5


def reflection_pad(x: jax.Array, width: int) -> jax.Array:
    """Reflect-pads the spatial axes of `x: [B, H, W, C]` by `width` on each side."""
    return jnp.pad(x, ((0, 0), (width, width), (width, width), (0, 0)), mode="reflect")


def _normalize_forward(x):
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    centered = x - mean
    variance = jnp.mean(jnp.square(centered), axis=(1, 2), keepdims=True)
    inverse_deviation = lax.rsqrt(variance + INSTANCE_NORM_EPSILON)
    normalized = centered * inverse_deviation
    return normalized, (normalized, inverse_deviation)


@jax.custom_vjp
def _normalize(x: jax.Array) -> jax.Array:
    """`(x - mean) / sqrt(var + eps)` over the spatial axes of `x: [B, H, W, C]`."""
    return _normalize_forward(x)[0]


def _normalize_backward(residuals, grad):
    # d/dx of y = (x - mean(x)) * r, r = (var(x) + eps)^-1/2, as a function of y:
    # r * (g - mean(g) - y * mean(g * y)).
    normalized, inverse_deviation = residuals
    mean_grad = jnp.mean(grad, axis=(1, 2), keepdims=True)
    mean_projection = jnp.mean(grad * normalized, axis=(1, 2), keepdims=True)
    return (inverse_deviation * (grad - mean_grad - normalized * mean_projection),)


_normalize.defvjp(_normalize_forward, _normalize_backward)


def instance_norm(x: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The reference's InstanceNorm2d(affine=False) on `x: [B, H, W, C]`, output in `dtype`.

    Statistics in float32. Equal to `nn.InstanceNorm(epsilon=1e-5, use_scale=False,
    use_bias=False, use_fast_variance=False)`, but its backward pass keeps only the
    normalized output and one inverse deviation per image and channel, where
    autodiff of Flax's layer keeps two full-size tensors.
    """
    return _normalize(x.astype(jnp.float32)).astype(dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _apply_layer(x: jax.Array, kernel: jax.Array, layer, relu_input: bool) -> jax.Array:
    """`layer(relu(x) if relu_input else x, kernel)`, keeping only `x` and `kernel` for backward.

    The activation, padding and input transforms inside `layer` are recomputed in
    the backward pass (cheap, elementwise) instead of being stored. `x` is the
    output of an instance norm, which the norm keeps anyway, or a residual
    block's input: each layer costs one stored tensor, not three or four.
    """
    return layer(nn.relu(x) if relu_input else x, kernel)


def _conv(inputs: jax.Array, kernel: jax.Array, strides=(1, 1), padding: Any = "VALID"):
    return lax.conv_general_dilated(
        inputs, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _keeping_inputs(conv):
    """The forward pass of a convolution's custom VJP: its result, keeping `x` and `kernel`."""

    def forward(x, kernel):
        return conv(x, kernel), (x, kernel)

    return forward


@jax.custom_vjp
def downsample_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_conv(x, kernel, (2, 2), PAD_1)` for a 3x3 kernel, with a backward pass made of matmuls.

    Autodiff's gradients of a strided convolution are convolutions that XLA:CPU
    runs far below matrix-multiply speed: the input gradient one over the
    stride-dilated output gradient, the kernel gradient one whose window is the
    whole output. Here the input gradient is the stride-2 transposed convolution
    of the output gradient by the flipped kernel, computed as
    `_subpixel_conv_transpose` computes one, and the kernel gradient a single
    matrix product of the strided input patches and the output gradient. In the
    step the autodiff gradients of the default config's first downsampling layer
    took 170 ms of 2.0 s (Intel Xeon, 2026-12-06); the default step at batch 1
    ran 3 % faster this way, the one at 64px (ngf/ndf 32) as fast (README, "Benchmarks").
    """
    return _conv(x, kernel, (2, 2), PAD_1)


def _patches(x: jax.Array, kernel_size, out_size, stride: int = 1) -> jax.Array:
    """`[B, H, W, C] -> [B * oh * ow, kh * kw * C]`: each output's window, taps in (i, j) order."""
    (kernel_height, kernel_width), (out_height, out_width) = kernel_size, out_size
    windows = [
        x[
            :,
            i : i + stride * (out_height - 1) + 1 : stride,
            j : j + stride * (out_width - 1) + 1 : stride,
        ]
        for i in range(kernel_height)
        for j in range(kernel_width)
    ]
    return jnp.concatenate(windows, axis=-1).reshape(-1, kernel_height * kernel_width * x.shape[-1])


def _flipped(kernel: jax.Array) -> jax.Array:
    """The kernel of a convolution's input gradient: taps reversed, in and out features swapped."""
    return jnp.swapaxes(kernel[::-1, ::-1], 2, 3)


@jax.custom_vjp
def valid_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_conv(x, kernel)` (stride 1, 'VALID'), whose input gradient is a plain convolution.

    The input gradient is the output gradient, zero-padded by the kernel's size
    less one, convolved with the flipped kernel (`_flipped`), which is
    materialized first. Autodiff's input gradient is the same convolution with
    the flip and the feature exchange left to the convolution's dimension
    numbers. In float32 both run as fast, with identical results; in bfloat16
    on oneDNN (`cyclegan.compiler_options`), this form ran 1.9x (3x3, 128
    features, 16x16, batch 4), 1.7x (3x3, 256 features, 32x32, batch 1) and
    2.6x (7x7, 3 to 32 features, 64x64, batch 4: the input layer, since run as
    `narrow_input_conv`) faster per layer, forward and backward (Intel Xeon with
    AMX, 2026-12-07). The kernel gradient is autodiff's.
    """
    return _conv(x, kernel)


def _valid_conv_backward(residuals, grad):
    x, kernel = residuals
    kernel_height, kernel_width = kernel.shape[:2]
    padded = jnp.pad(grad, ((0, 0), (kernel_height - 1,) * 2, (kernel_width - 1,) * 2, (0, 0)))
    x_grad = _conv(padded, lax.optimization_barrier(_flipped(kernel)))
    kernel_grad = jax.vjp(lambda kernel: _conv(x, kernel), kernel)[1](grad)[0]
    return x_grad, kernel_grad


valid_conv.defvjp(_keeping_inputs(valid_conv), _valid_conv_backward)


def _downsample_conv3x3_backward(residuals, grad):
    x, kernel = residuals
    _, height, width, _ = x.shape
    _, out_height, out_width, features = grad.shape
    # Input gradient: input row 2j takes tap 1 of output row j, row 2j + 1 taps 2
    # and 0 of output rows j and j + 1: a transposed convolution with the taps flipped.
    x_grad = _subpixel_conv_transpose(grad, _flipped(kernel))[:, :height, :width]
    # Kernel gradient: tap (i, j) sums input (2m + i, 2n + j) times output gradient (m, n).
    padded = jnp.pad(x, ((0, 0), *PAD_1, (0, 0)))
    patches = _patches(padded, (3, 3), (out_height, out_width), stride=2)
    # Transposed first, behind a barrier, so the product contracts its operands'
    # minor and major axes, the form XLA:CPU runs fastest (see `winograd._tile_products`).
    patches = lax.optimization_barrier(patches.T)
    kernel_grad = (patches @ grad.reshape(-1, features)).reshape(kernel.shape)
    return x_grad, kernel_grad


downsample_conv3x3.defvjp(_keeping_inputs(downsample_conv3x3), _downsample_conv3x3_backward)


# Up to this many output features a stride-1 'VALID' convolution runs as
# `narrow_conv`, up to this many input features as `narrow_input_conv`.
NARROW_FEATURES = 4

# In bfloat16 on a CPU, XLA hands `narrow_conv`'s input-gradient product (a sum over
# features * kh * kw = 147 taps for 7x7 to 3 colours) to oneDNN's AMX matmul
# (`cyclegan.compiler_options`), to its `brg_matmul:avx10_1_512_amx` kernel. The
# oneDNN in jaxlib 0.12 (v3.12.3) predates the fix of a bug in that kernel
# (uxlfoundation/oneDNN#5717, July 2026): for a sum longer than 32 whose length is
# not a multiple of 32 it reads the last 32-wide block whole, and NaN or infinity
# in the bytes beyond the sum reaches the result. In bfloat16 the taps are padded
# with zeros to a multiple of this, so that no such block exists.
ONEDNN_K_BLOCK = 32


def _tap_planes(x: jax.Array, kernel_size, out_size) -> jax.Array:
    """`[B, H, W, C] -> [C * kh * kw, B * oh * ow]`: per channel and tap, what each output sees.

    Row (c, i, j) holds channel c of the inputs at offset (i, j) from every output
    of a stride-1 convolution: the transposed patches of a narrow tensor, built
    from contiguous runs of the image's rows rather than from C-element pieces
    (the `_patches` form, which XLA:CPU concatenates far slower).
    """
    (kernel_height, kernel_width), (out_height, out_width) = kernel_size, out_size
    planes = jnp.transpose(x, (3, 0, 1, 2))
    rows = jnp.stack(
        [
            planes[:, :, i : i + out_height, j : j + out_width]
            for i in range(kernel_height)
            for j in range(kernel_width)
        ],
        axis=1,
    )
    return rows.reshape(x.shape[-1] * kernel_height * kernel_width, -1)


def _few_features_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_conv(x, kernel)` (stride 1, 'VALID') to few features: one matmul, then shifted sums.

    Every input pixel is multiplied by all taps of the kernel at once (`[B * H * W,
    C] x [C, kw * kh * features]`), and each output sums its taps' products from
    the pixels it sees: first along the rows, then the columns. XLA:CPU runs a
    convolution to 3 features far below its matmul speed. The products and sums
    are float32 whatever the inputs' dtype (summed in bfloat16, the 49 taps of a
    7x7 kernel were ~3x further from float32 than a bfloat16 convolution); the
    result has the inputs' dtype. The products are a transient `[B, H, W, kh *
    kw * features]` float32 tensor: 147 values per pixel for a 7x7 kernel to 3
    features (~85 MB at batch 8 of 134x134, the default config's padded output
    layer).
    """
    kernel_height, kernel_width, channels, features = kernel.shape
    batch, height, width, _ = x.shape
    out_height, out_width = height - kernel_height + 1, width - kernel_width + 1
    taps = jnp.transpose(kernel, (2, 1, 0, 3)).reshape(channels, -1)  # Columns (j, i, f).
    products = jnp.matmul(x.reshape(-1, channels), taps, preferred_element_type=jnp.float32)
    products = products.reshape(batch, height, width, kernel_width, kernel_height * features)
    rows = sum(products[:, :, j : j + out_width, j] for j in range(kernel_width))
    rows = rows.reshape(batch, height, out_width, kernel_height, features)
    return sum(rows[:, i : i + out_height, :, i] for i in range(kernel_height)).astype(x.dtype)


def _full_padding(grad: jax.Array, kernel: jax.Array) -> jax.Array:
    """The output gradient zero-padded by the kernel's size less one on every side."""
    kernel_height, kernel_width = kernel.shape[:2]
    return jnp.pad(grad, ((0, 0), (kernel_height - 1,) * 2, (kernel_width - 1,) * 2, (0, 0)))


@jax.custom_vjp
def narrow_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_conv(x, kernel)` (stride 1, 'VALID') for a kernel with few output features.

    The generator's last layer (7x7, to 3 colours). The forward pass is
    `_few_features_conv`. XLA:CPU computes the kernel gradient as a convolution
    whose window is the whole image, its slowest form; here both gradients are
    matrix products with the output gradient's tap planes (`_tap_planes` of
    the padded output gradient, `[features * kh * kw, B * H * W]`, small as the
    features are few): the input gradient with the flipped kernel, the kernel
    gradient with the input. Together with `narrow_input_conv` the float32 step
    ran ~5 % faster at 64px (ngf/ndf 32, batch 4) and ~7 % at the default config's
    batch 1, bfloat16 ~8 % at the default (README, "Benchmarks").
    """
    return _few_features_conv(x, kernel)


def _narrow_conv_backward(residuals, grad):
    x, kernel = residuals
    kernel_height, kernel_width, channels, features = kernel.shape
    # The input gradient is the padded output gradient convolved with the flipped
    # kernel; rows (f, i, j) of its planes meet the flipped kernel's taps (i, j).
    planes = _tap_planes(_full_padding(grad, kernel), (kernel_height, kernel_width), x.shape[1:3])
    flipped = jnp.transpose(_flipped(kernel), (2, 0, 1, 3)).reshape(-1, channels)
    taps = planes.shape[0]
    if planes.dtype == jnp.bfloat16 and taps > ONEDNN_K_BLOCK:
        # Zero taps up to a multiple of ONEDNN_K_BLOCK: the input gradient's sum runs over them.
        padding = ((0, -taps % ONEDNN_K_BLOCK), (0, 0))
        planes, flipped = jnp.pad(planes, padding), jnp.pad(flipped, padding)
    # Operands materialized in the layout XLA:CPU multiplies fastest (see
    # `winograd._tile_products`): barriers keep XLA from folding them back.
    planes = lax.optimization_barrier(planes)
    x_grad = (lax.optimization_barrier(flipped.T) @ planes).T.reshape(x.shape)
    kernel_grad = (planes @ x.reshape(-1, channels))[:taps].reshape(
        features, kernel_height, kernel_width, channels
    )
    # Plane tap (i, j) is kernel tap (kh - 1 - i, kw - 1 - j).
    return x_grad, jnp.transpose(kernel_grad[:, ::-1, ::-1], (1, 2, 3, 0))


narrow_conv.defvjp(_keeping_inputs(narrow_conv), _narrow_conv_backward)


@jax.custom_vjp
def narrow_input_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_conv(x, kernel)` (stride 1, 'VALID') for an input with few features.

    The generator's first layer (7x7, from 3 colours). Its gradients are those
    of `narrow_conv` with the roles exchanged: the input gradient is a
    convolution to few features (`_few_features_conv` of the padded output
    gradient with the flipped kernel), the kernel gradient one matrix product of
    the input's tap planes and the output gradient, where XLA:CPU ran a
    whole-window convolution. Measured with `narrow_conv` (see there).
    """
    return _conv(x, kernel)


def _narrow_input_conv_backward(residuals, grad):
    x, kernel = residuals
    kernel_height, kernel_width, channels, features = kernel.shape
    x_grad = _few_features_conv(_full_padding(grad, kernel), _flipped(kernel))
    planes = _tap_planes(x, (kernel_height, kernel_width), grad.shape[1:3])
    kernel_grad = (lax.optimization_barrier(planes) @ grad.reshape(-1, features)).reshape(
        channels, kernel_height, kernel_width, features
    )
    return x_grad, jnp.transpose(kernel_grad, (1, 2, 0, 3))


narrow_input_conv.defvjp(_keeping_inputs(narrow_input_conv), _narrow_input_conv_backward)


class Conv(nn.Module):
    """`nn.Conv(features, kernel_size, strides, padding)` (same parameters) on a prepared input.

    The input is `relu(x)` with `relu_input`, reflection-padded by `reflect` pixels
    when that is > 0; both are recomputed in the backward pass rather than stored
    (see `_apply_layer`). With `winograd` (3x3, stride 1, 'VALID' only) the
    convolution runs as `winograd_conv3x3`; a 3x3 stride-2 one padded by
    `PAD_1` (the generator's downsampling) as `downsample_conv3x3`; a stride-1
    'VALID' one to at most `NARROW_FEATURES` features as `narrow_conv`, one from
    at most that many as `narrow_input_conv`, any other stride-1 'VALID' one as
    `valid_conv`.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "VALID"
    reflect: int = 0
    relu_input: bool = False
    winograd: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", KERNEL_INIT, kernel_shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        shape = (tuple(self.kernel_size), tuple(self.strides), self.padding)
        if self.winograd and shape != ((3, 3), (1, 1), "VALID"):
            raise ValueError(
                "Conv(winograd=True) is for 3x3 stride-1 convolutions padded by `reflect`; "
                f"got kernel_size, strides, padding = {shape}."
            )

        def layer(inputs, kernel):
            if self.reflect:
                inputs = reflection_pad(inputs, self.reflect)
            if self.winograd:
                return winograd_conv3x3(inputs, kernel)
            if shape == ((3, 3), (2, 2), PAD_1):
                return downsample_conv3x3(inputs, kernel)
            if shape[1:] == ((1, 1), "VALID"):
                if self.features <= NARROW_FEATURES:
                    return narrow_conv(inputs, kernel)
                if inputs.shape[-1] <= NARROW_FEATURES:
                    return narrow_input_conv(inputs, kernel)
                return valid_conv(inputs, kernel)
            return _conv(inputs, kernel, self.strides, self.padding)

        return _apply_layer(x, kernel, layer, self.relu_input) + bias


def _subpixel_conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The stride-2 3x3 transposed convolution of `SubpixelConvTranspose`, without bias."""
    batch, height, width, _ = x.shape
    # A zero row and column past the end: the last odd outputs' missing neighbours.
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    even_even = valid_conv(x, kernel[1:2, 1:2])
    even_odd = valid_conv(padded[:, :height], kernel[1:2, 0::2])
    odd_even = valid_conv(padded[:, :, :width], kernel[0::2, 1:2])
    odd_odd = valid_conv(padded, kernel[0::2, 0::2])
    even_rows = jnp.stack([even_even, even_odd], axis=3)  # [B, H, W, 2, F]
    odd_rows = jnp.stack([odd_even, odd_odd], axis=3)
    y = jnp.stack([even_rows, odd_rows], axis=2)  # [B, H, 2, W, 2, F]
    return y.reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


class SubpixelConvTranspose(nn.Module):
    """`nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding=TRANSPOSE_PAD_3x3_S2)`.

    `x: [B, H, W, C] -> [B, 2H, 2W, features]`, with that layer's parameters.
    Computed as four small convolutions, one per output parity: output
    (2m + a, 2n + b) sees only inputs (m, n), (m, n + 1), (m + 1, n), (m + 1, n + 1).
    Along each axis an even output takes kernel tap 1 at offset 0, an odd output
    taps 0 and 2 at offsets 0 and 1. With `relu_input` it applies to `relu(x)`;
    see `_apply_layer`.
    """

    features: int
    dtype: jnp.dtype = jnp.float32
    relu_input: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_shape = (3, 3, x.shape[-1], self.features)
        kernel = self.param("kernel", KERNEL_INIT, kernel_shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        return _apply_layer(x, kernel, _subpixel_conv_transpose, self.relu_input) + bias
