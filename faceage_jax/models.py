"""The canonical CycleGAN networks (Zhu et al. 2017) in Flax linen, NHWC.

`ResnetGenerator` is the ResNet-9 generator and `PatchDiscriminator` the 70x70
PatchGAN of the reference implementation, layer for layer: reflection padding,
instance norm without learned affine parameters (eps 1e-5), conv biases kept,
N(0, 0.02) kernels and zero biases. Parameters are float32; `dtype` sets the
compute dtype of convolutions (bfloat16 on accelerators), while instance-norm
statistics are always computed in float32.

Some layers are computed differently from their textbook form; parameters
(names, shapes, initialization) and results, gradients included, are those of
the straightforward Flax layers, and tests hold them equal:

- The stride-2 transposed convolutions are four small convolutions
  (`SubpixelConvTranspose`), not `nn.ConvTranspose`'s convolution over a
  stride-dilated input, which XLA:CPU runs at a few percent of matmul speed
  (the whole step was 1.7x faster on an H200 too).
- With `winograd` (on CPU, see `use_winograd`), the residual blocks' 3x3
  convolutions, ~83 % of the step's FLOPs, run by `winograd_conv3x3`.
- The residual blocks run as a `lax.scan` (`ResnetGenerator._residual_blocks`),
  unless they are direct convolutions on CPU (see `create_generator`).
- `instance_norm` keeps only its output for the backward pass, and every
  generator convolution recomputes its ReLU, padding and input transforms
  there (`_apply_layer`): the generator's backward pass keeps ~42 MiB per
  128x128 image instead of ~134.
"""

import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

KERNEL_INIT = nn.initializers.normal(stddev=0.02)

# Same spatial padding as PyTorch's Conv2d(padding=1).
PAD_1 = ((1, 1), (1, 1))
# PyTorch's ConvTranspose2d(kernel 3, stride 2, padding 1, output_padding 1) as a
# transposed convolution over the stride-dilated input: k - 1 - p before, plus
# output_padding after, which exactly doubles the height and width.
TRANSPOSE_PAD_3x3_S2 = ((1, 2), (1, 2))


# Winograd F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
# Networks", 2016): a 3x3 convolution over 6x6 input tiles d, giving 4x4 output
# tiles, is A^T [(G g G^T) * (B^T d B)] A with these exact matrices (the
# interpolation points 0, 1, -1, 2, -2 and infinity). 4x fewer multiplications
# than the direct convolution (F(2x2, 3x3): 2.25x); the step at 128px is ~13 %
# faster than with F(2x2, 3x3). The price is rounding: see `winograd_conv3x3`.
WINOGRAD_BT = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    np.float32,
)
WINOGRAD_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float32,
)
WINOGRAD_AT = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    np.float32,
)
WINOGRAD_TILE = WINOGRAD_AT.shape[0]  # Output tile: 4x4.


def _combine(parts: list[jax.Array], matrix: np.ndarray) -> list[jax.Array]:
    """`[sum_j matrix[i, j] * parts[j] for each row i]`, skipping zero terms."""
    combined = []
    for row in matrix:
        terms = [
            part if c == 1 else -part if c == -1 else c * part
            for c, part in zip(row.tolist(), parts, strict=True)
            if c != 0
        ]
        combined.append(functools.reduce(jnp.add, terms))
    return combined


@jax.custom_vjp
def _tile_products(tiles: jax.Array, kernel: jax.Array) -> jax.Array:
    """`[T, N, C] x [T, C, D] -> [T, N, D]`: the 36 products of `winograd_conv3x3`.

    Autodiff's kernel gradient contracts N, the major axis of both operands;
    XLA:CPU runs that form with Eigen, on one thread at the demo's sizes
    (36 x 128 x 128 x 128: 2.2 ms, against 1.5 ms as below). The backward pass
    here transposes the tiles first, behind an optimization barrier so that
    XLA cannot fold the transpose back into the product, which then goes to
    YNNPACK like the forward products: the demo step ~2 % faster (in-process
    alternating A/B of 30-60 steps: +1.8 to +3.5 %; 128px unchanged).
    """
    return jnp.einsum("tnc,tcd->tnd", tiles, kernel)


def _tile_products_forward(tiles, kernel):
    return _tile_products(tiles, kernel), (tiles, kernel)


def _tile_products_backward(residuals, grad):
    tiles, kernel = residuals
    tiles_grad = jnp.einsum("tnd,tcd->tnc", grad, kernel)
    transposed = lax.optimization_barrier(jnp.swapaxes(tiles, 1, 2))  # [T, C, N]
    kernel_grad = jnp.einsum("tcn,tnd->tcd", transposed, grad)
    return tiles_grad, kernel_grad


_tile_products.defvjp(_tile_products_forward, _tile_products_backward)


def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, (1, 1), 'VALID')` in NHWC/HWIO, by Winograd.

    `x: [B, H + 2, W + 2, C]`, `kernel: [3, 3, C, D]` -> `[B, H, W, D]`. The input
    is cut into 6x6 tiles at stride 4 (zero-extended to whole tiles, the extra
    outputs cropped), each tile and the kernel are transformed, and the
    convolution becomes 36 matrix products `[B * H/4 * W/4, C] @ [C, D]`: 36
    multiplies per 4x4 outputs instead of 144. Autodiff of it is
    Winograd too: the weight gradient is 36 products of transformed inputs and
    output gradients, the input gradient 36 products with the transposed
    transformed kernel. Rounding, against a float64 reference at the residual
    blocks' shapes: errors of ~3e-6 of the output's RMS, ~1e-5 of its largest
    value at most (the direct convolution's: 4e-7 and 6e-7).
    """
    batch, padded_height, padded_width, channels = x.shape
    height, width = padded_height - 2, padded_width - 2
    tile, size = WINOGRAD_TILE, WINOGRAD_TILE + 2
    tiles_h, tiles_w = -(-height // tile), -(-width // tile)
    x = jnp.pad(x, ((0, 0), (0, tiles_h * tile - height), (0, tiles_w * tile - width), (0, 0)))
    # B^T d B, separably: tile rows first (row i of every tile: x[:, 4t + i]), then columns.
    rows = [x[:, i : i + tile * (tiles_h - 1) + 1 : tile] for i in range(size)]
    transformed = []
    for row in _combine(rows, WINOGRAD_BT):
        columns = [row[:, :, j : j + tile * (tiles_w - 1) + 1 : tile] for j in range(size)]
        transformed.extend(_combine(columns, WINOGRAD_BT))
    tiles = jnp.stack(transformed).reshape(size * size, batch * tiles_h * tiles_w, channels)
    # G g G^T, separably, as elementwise sums (as a dot with K = 3 it is ~50x slower).
    transformed_kernel = []
    for row in _combine(list(kernel), WINOGRAD_G):
        transformed_kernel.extend(_combine(list(row), WINOGRAD_G))
    kernel = jnp.stack(transformed_kernel)  # [36, C, D]
    products = _tile_products(tiles, kernel)
    products = products.reshape(size, size, batch, tiles_h, tiles_w, -1)
    # A^T m A, separably; then the 4x4 outputs of each tile back in place.
    outputs = []
    for row in _combine(list(products), WINOGRAD_AT):
        outputs.append(jnp.stack(_combine(list(row), WINOGRAD_AT), axis=3))  # [B, th, tw, 4, D]
    y = jnp.stack(outputs, axis=2)  # [B, th, 4, tw, 4, D]
    y = y.reshape(batch, tile * tiles_h, tile * tiles_w, -1)
    return y[:, :height, :width]


def _subpixel_conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The stride-2 3x3 transposed convolution of `SubpixelConvTranspose`, without bias."""

    def conv(inputs, taps):
        return lax.conv_general_dilated(
            inputs, taps, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    batch, height, width, _ = x.shape
    # A zero row and column past the end: the last odd outputs' missing neighbours.
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    even_even = conv(x, kernel[1:2, 1:2])
    even_odd = conv(padded[:, :height], kernel[1:2, 0::2])
    odd_even = conv(padded[:, :, :width], kernel[0::2, 1:2])
    odd_odd = conv(padded, kernel[0::2, 0::2])
    even_rows = jnp.stack([even_even, even_odd], axis=3)  # [B, H, W, 2, F]
    odd_rows = jnp.stack([odd_even, odd_odd], axis=3)
    y = jnp.stack([even_rows, odd_rows], axis=2)  # [B, H, 2, W, 2, F]
    return y.reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _apply_layer(x: jax.Array, kernel: jax.Array, layer, relu_input: bool) -> jax.Array:
    """`layer(relu(x) if relu_input else x, kernel)`, keeping only `x` and `kernel` for backward.

    The activation, padding and input transforms inside `layer` are recomputed in
    the backward pass (cheap, elementwise) instead of being stored. `x` is the
    output of an instance norm, which the norm keeps anyway, or a residual
    block's input: each layer costs one stored tensor, not three or four.
    """
    return layer(nn.relu(x) if relu_input else x, kernel)


class SubpixelConvTranspose(nn.Module):
    """`nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding=TRANSPOSE_PAD_3x3_S2)`.

    `x: [B, H, W, C] -> [B, 2H, 2W, features]`, with that layer's parameters.
    Computed as four small convolutions, one per output parity, instead of one
    over the stride-dilated input (three quarters zeros): output (2m + a, 2n + b)
    sees only inputs (m, n), (m, n + 1), (m + 1, n), (m + 1, n + 1). Along each
    axis an even output takes kernel tap 1 at offset 0, an odd output taps 0 and
    2 at offsets 0 and 1. With `relu_input` it applies to `relu(x)`; see `_apply_layer`.
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


def reflection_pad(x: jax.Array, width: int) -> jax.Array:
    """Reflect-pads the spatial axes of `x: [B, H, W, C]` by `width` on each side."""
    return jnp.pad(x, ((0, 0), (width, width), (width, width), (0, 0)), mode="reflect")


INSTANCE_NORM_EPSILON = 1e-5


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
    use_bias=False, use_fast_variance=False)` (tests hold them equal), but its
    backward pass keeps only the normalized output and one inverse deviation per
    image and channel, where autodiff of Flax's layer keeps two full-size tensors.
    """
    return _normalize(x.astype(jnp.float32)).astype(dtype)


class Conv(nn.Module):
    """`nn.Conv(features, kernel_size, strides, padding)` (same parameters) on a prepared input.

    The input is `relu(x)` with `relu_input`, reflection-padded by `reflect` pixels
    when that is > 0. The activation and padding are recomputed in the backward
    pass rather than stored (see `_apply_layer`). With `winograd` (3x3, stride 1,
    'VALID' only) the convolution runs as `winograd_conv3x3`.
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
            return lax.conv_general_dilated(
                inputs,
                kernel,
                self.strides,
                self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )

        return _apply_layer(x, kernel, layer, self.relu_input) + bias


class ResidualBlock(nn.Module):
    """Two reflection-padded 3x3 convs with instance norm; the input is added back."""

    dtype: jnp.dtype = jnp.float32
    winograd: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(
            Conv, x.shape[-1], (3, 3), reflect=1, winograd=self.winograd, dtype=self.dtype
        )
        y = instance_norm(conv()(x), self.dtype)
        y = instance_norm(conv(relu_input=True)(y), self.dtype)
        return x + y


_residual_blocks_as_loop = False


@contextlib.contextmanager
def residual_blocks_as_loop():
    """Traces `ResnetGenerator`'s residual blocks as a Python loop instead of a scan.

    Same parameters, same results. For FLOP counting: XLA's cost analysis counts
    a loop's body once, whatever its trip count.
    """
    global _residual_blocks_as_loop
    previous, _residual_blocks_as_loop = _residual_blocks_as_loop, True
    try:
        yield
    finally:
        _residual_blocks_as_loop = previous


class ResnetGenerator(nn.Module):
    """ResNet generator: `images: [B, H, W, 3]` in [-1, 1] -> same shape, tanh output.

    H and W must be multiples of 2**n_downsample. `winograd` runs the residual
    blocks' 3x3 convolutions as `winograd_conv3x3` (4x fewer multiplications; see
    `create_generator` for when it is used). `scan_blocks` runs the residual
    blocks as one scan (see `_residual_blocks`), else as a loop. Either way the
    parameters and the results are those of the straightforward network (tests
    hold them equal).
    """

    ngf: int = 64
    n_res_blocks: int = 9
    n_downsample: int = 2
    dtype: jnp.dtype = jnp.float32
    winograd: bool = False
    scan_blocks: bool = True

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        conv = functools.partial(Conv, dtype=self.dtype)
        norm = functools.partial(instance_norm, dtype=self.dtype)

        # Each ReLU is applied by the next layer (`relu_input`): it is recomputed there.
        x = norm(conv(self.ngf, (7, 7), reflect=3)(images))
        for i in range(self.n_downsample):
            down = conv(self.ngf * 2 ** (i + 1), (3, 3), (2, 2), PAD_1, relu_input=True)
            x = norm(down(x))
        x = nn.relu(x)
        x = self._residual_blocks(x)
        for n, i in enumerate(reversed(range(self.n_downsample))):
            # Named as the nn.ConvTranspose it computes: same parameters, same checkpoints.
            upsample = SubpixelConvTranspose(
                self.ngf * 2**i, dtype=self.dtype, relu_input=n > 0, name=f"ConvTranspose_{n}"
            )
            x = norm(upsample(x))
        x = conv(3, (7, 7), reflect=3, relu_input=True)(x)
        return jnp.tanh(x.astype(jnp.float32))

    def _residual_blocks(self, x: jax.Array) -> jax.Array:
        """The residual blocks, as one `lax.scan` over their stacked parameters.

        Unless `scan_blocks` is off (direct convolutions on CPU, see
        `create_generator`) or inside `residual_blocks_as_loop`: then a loop.

        Each block keeps its own parameters (`ResidualBlock_0`, ...), as a plain
        loop would; the scan only makes XLA compile the block once rather than
        `n_res_blocks` times: at 128px batch 4 with F(2x2, 3x3) Winograd the
        step compiled in ~9 s instead of 25-30 and its peak RSS (compiled code
        included) fell from 3.19 to 2.58 GiB, at the same speed; with F(4x4, 3x3)
        unrolled blocks took 120 s and 4.2 GiB, scanned ~15 s and 2.64 GiB. See
        `residual_blocks_as_loop` for the loop.
        """
        blocks = [
            ResidualBlock(dtype=self.dtype, winograd=self.winograd, name=f"ResidualBlock_{i}")
            for i in range(self.n_res_blocks)
        ]
        loop = not self.scan_blocks or _residual_blocks_as_loop
        if self.is_initializing() or not blocks or loop:
            for block in blocks:
                x = block(x)
            return x
        params = [self.variables["params"][block.name] for block in blocks]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)
        block = ResidualBlock(dtype=self.dtype, winograd=self.winograd, parent=None)

        def apply_block(x, block_params):
            return block.apply({"params": block_params}, x), None

        return lax.scan(apply_block, x, stacked)[0]


class PatchDiscriminator(nn.Module):
    """PatchGAN: `images: [B, H, W, 3]` -> raw real/fake scores per patch `[B, h, w, 1]`.

    With n_layers=3 each score sees a 70x70 patch; 128x128 input gives a 14x14
    map, 256x256 gives 30x30. No sigmoid: the least-squares GAN loss takes raw
    scores. `normalize=False` drops instance norm, for analysis only (instance
    norm couples all positions, which hides the receptive field).
    """

    ndf: int = 64
    n_layers: int = 3
    dtype: jnp.dtype = jnp.float32
    normalize: bool = True

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        conv = functools.partial(
            nn.Conv, kernel_size=(4, 4), padding=PAD_1, kernel_init=KERNEL_INIT, dtype=self.dtype
        )

        def norm_and_activate(x):
            if self.normalize:
                x = instance_norm(x, self.dtype)
            return nn.leaky_relu(x, negative_slope=0.2)

        x = nn.leaky_relu(conv(self.ndf, strides=(2, 2))(images), negative_slope=0.2)
        for n in range(1, self.n_layers):
            x = norm_and_activate(conv(self.ndf * min(2**n, 8), strides=(2, 2))(x))
        x = norm_and_activate(conv(self.ndf * min(2**self.n_layers, 8), strides=(1, 1))(x))
        x = conv(1, strides=(1, 1))(x)
        return x.astype(jnp.float32)


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """The convolution dtype named by `config.compute_dtype`."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if config.compute_dtype not in dtypes:
        raise ValueError(
            f"config.compute_dtype={config.compute_dtype!r} is not supported; "
            f"use one of {sorted(dtypes)}."
        )
    return dtypes[config.compute_dtype]


RESIDUAL_CONVS = ("auto", "winograd", "direct")


def use_winograd(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.residual_convs` runs the residual blocks' convs by Winograd here.

    'auto' picks it on CPU in float32, where XLA's convolutions run near the
    machine's peak and 4x fewer multiplications make the step faster. On GPUs and
    TPUs the convolution libraries are left to choose their own algorithms.
    """
    if config.residual_convs not in RESIDUAL_CONVS:
        raise ValueError(
            f"config.residual_convs={config.residual_convs!r} is not supported; "
            f"use one of {list(RESIDUAL_CONVS)}."
        )
    if config.residual_convs == "auto":
        return jax.default_backend() == "cpu" and compute_dtype(config) == jnp.float32
    return config.residual_convs == "winograd"


def create_generator(config: ml_collections.ConfigDict) -> ResnetGenerator:
    winograd = use_winograd(config)
    return ResnetGenerator(
        ngf=config.ngf,
        n_res_blocks=config.n_res_blocks,
        n_downsample=config.n_downsample,
        dtype=compute_dtype(config),
        winograd=winograd,
        # XLA:CPU emits a convolution's gradient inside a loop body as a naive
        # elemental loop (jax-ml/jax#12868): the scanned step with direct convs
        # ran 25x slower on the demo. Winograd's matrix products are not affected.
        scan_blocks=winograd or jax.default_backend() != "cpu",
    )


def create_discriminator(config: ml_collections.ConfigDict) -> PatchDiscriminator:
    return PatchDiscriminator(
        ndf=config.ndf, n_layers=config.n_disc_layers, dtype=compute_dtype(config)
    )


# A tiny variant for tests: same structure, a fraction of the compute.
TinyGenerator = functools.partial(ResnetGenerator, ngf=8, n_res_blocks=1)
TinyDiscriminator = functools.partial(PatchDiscriminator, ndf=8, n_layers=2)
TINY_IMAGE_SIZE = 32
