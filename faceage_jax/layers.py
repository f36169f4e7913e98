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


def _downsample_conv3x3_forward(x, kernel):
    return downsample_conv3x3(x, kernel), (x, kernel)


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
    2.6x (7x7, 3 to 32 features, 64x64, batch 4) faster per layer, forward and
    backward (Intel Xeon with AMX, 2026-12-07). The kernel gradient is autodiff's.
    """
    return _conv(x, kernel)


def _valid_conv_forward(x, kernel):
    return valid_conv(x, kernel), (x, kernel)


def _valid_conv_backward(residuals, grad):
    x, kernel = residuals
    kernel_height, kernel_width = kernel.shape[:2]
    padded = jnp.pad(grad, ((0, 0), (kernel_height - 1,) * 2, (kernel_width - 1,) * 2, (0, 0)))
    x_grad = _conv(padded, lax.optimization_barrier(_flipped(kernel)))
    kernel_grad = jax.vjp(lambda kernel: _conv(x, kernel), kernel)[1](grad)[0]
    return x_grad, kernel_grad


valid_conv.defvjp(_valid_conv_forward, _valid_conv_backward)


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


downsample_conv3x3.defvjp(_downsample_conv3x3_forward, _downsample_conv3x3_backward)


# Up to this many output features a stride-1 convolution runs as `narrow_conv`.
NARROW_FEATURES = 4


@jax.custom_vjp
def narrow_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_conv(x, kernel)` (stride 1, 'VALID') for a kernel with few output features.

    The generator's last layer (7x7, to 3 colours): XLA:CPU computes its kernel
    gradient as a convolution whose window is the whole image, its slowest
    form. Here both gradients are matrix products with the output gradient's
    patches `[B * H * W, kh * kw * features]` (small, as the features are few):
    the input gradient by the kernel, the kernel gradient by the input. The
    default step at batch 1 ran 9 % faster this way, the 64px one (ngf/ndf 32) 2 % (README,
    "Benchmarks").
    """
    return _conv(x, kernel)


def _narrow_conv_forward(x, kernel):
    return narrow_conv(x, kernel), (x, kernel)


def _narrow_conv_backward(residuals, grad):
    x, kernel = residuals
    kernel_height, kernel_width, channels, features = kernel.shape
    _, height, width, _ = x.shape
    # The input gradient is the output gradient, zero-padded by the kernel's size
    # less one, convolved with the flipped kernel: its patches are the few-feature side.
    padded = jnp.pad(grad, ((0, 0), (kernel_height - 1,) * 2, (kernel_width - 1,) * 2, (0, 0)))
    patches = _patches(padded, (kernel_height, kernel_width), (height, width))
    # Each product's operands materialized in the layout XLA:CPU multiplies fastest
    # (see `winograd._tile_products`): barriers keep XLA from folding them back.
    patches = lax.optimization_barrier(patches)
    flipped = lax.optimization_barrier(_flipped(kernel).reshape(-1, channels))
    x_grad = (patches @ flipped).reshape(x.shape)
    x_t = lax.optimization_barrier(x.reshape(-1, channels).T)
    # Patch tap (a, b) is kernel tap (kh - 1 - a, kw - 1 - b).
    kernel_grad = (x_t @ patches).reshape(channels, kernel_height, kernel_width, features)
    return x_grad, jnp.transpose(kernel_grad[:, ::-1, ::-1], (1, 2, 0, 3))


narrow_conv.defvjp(_narrow_conv_forward, _narrow_conv_backward)


class Conv(nn.Module):
    """`nn.Conv(features, kernel_size, strides, padding)` (same parameters) on a prepared input.

    The input is `relu(x)` with `relu_input`, reflection-padded by `reflect` pixels
    when that is > 0; both are recomputed in the backward pass rather than stored
    (see `_apply_layer`). With `winograd` (3x3, stride 1, 'VALID' only) the
    convolution runs as `winograd_conv3x3`; a 3x3 stride-2 one padded by
    `PAD_1` (the generator's downsampling) as `downsample_conv3x3`; a stride-1
    'VALID' one to at most `NARROW_FEATURES` features as `narrow_conv`, any other
    stride-1 'VALID' one as `valid_conv`.
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
