"""Winograd F(4x4, 3x3): a 3x3 stride-1 convolution in 4x fewer multiplications.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016). A 3x3
convolution over 6x6 input tiles d, giving 4x4 output tiles, is
A^T [(G g G^T) * (B^T d B)] A with the exact matrices below (interpolation
points 0, 1, -1, 2, -2 and infinity): 36 multiplies per 4x4 outputs instead of
144. The residual blocks' convolutions run this way on CPU (see
`cyclegan.use_winograd`), where XLA's convolutions run near the machine's peak
and fewer multiplications make the step faster. The price is rounding, a few
times that of the direct sum (see `winograd_conv3x3`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BT = np.array(
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
G = np.array(
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
AT = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    np.float32,
)
TILE = AT.shape[0]  # Output tile: 4x4.


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


# The transforms by name, so that `_transform` can take them as static arguments.
MATRICES = {"BT": BT, "G": G, "AT": AT}


def _apply_along(x: jax.Array, matrix: np.ndarray, in_axis: int, out_axis: int) -> jax.Array:
    parts = [lax.index_in_dim(x, i, in_axis, keepdims=False) for i in range(x.shape[in_axis])]
    return jnp.stack(_combine(parts, matrix), axis=out_axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _transform(x: jax.Array, name: str, in_axis: int, out_axis: int) -> jax.Array:
    """`MATRICES[name]` applied along `in_axis` of `x`, the result's axis moved to `out_axis`.

    One fused elementwise operation each way. Autodiff of it would take every
    part's gradient as its own pad-and-add (hundreds of small operations per
    convolution); the backward pass here is the transposed matrix applied the
    same way, from `out_axis` back to `in_axis`.
    """
    return _apply_along(x, MATRICES[name], in_axis, out_axis)


def _transform_forward(x, name, in_axis, out_axis):
    return _transform(x, name, in_axis, out_axis), None


def _transform_backward(name, in_axis, out_axis, _, grad):
    return (_apply_along(grad, MATRICES[name].T, out_axis, in_axis),)


_transform.defvjp(_transform_forward, _transform_backward)


def _windows(x: jax.Array, axis: int, count: int) -> jax.Array:
    """`[..., 4 * count + 2, ...] -> [..., count, 6, ...]`: windows of 6 at stride 4 along `axis`.

    Window t is blocks t and t + 1 of 4 (the first two rows of the latter): a
    reshape and one concatenation, where 6 strided slices would be 6 operations
    with as many pad-and-adds in the backward pass.
    """
    padding = [(0, 0)] * x.ndim
    padding[axis] = (0, 2)
    blocks = jnp.pad(x, padding)
    blocks = blocks.reshape(x.shape[:axis] + (count + 1, TILE) + x.shape[axis + 1 :])
    head = lax.slice_in_dim(blocks, 0, count, axis=axis)
    tail = lax.slice_in_dim(lax.slice_in_dim(blocks, 1, count + 1, axis=axis), 0, 2, axis=axis + 1)
    return jnp.concatenate([head, tail], axis=axis + 1)


@jax.custom_vjp
def _tile_products(tiles: jax.Array, kernel: jax.Array) -> jax.Array:
    """`[T, N, C] x [T, C, D] -> [T, N, D]`: the 36 products of `winograd_conv3x3`.

    Autodiff's kernel gradient would contract N, the major axis of both
    operands, a form XLA:CPU runs with Eigen on one thread at small sizes. The
    backward pass here transposes the tiles first, behind an optimization
    barrier so that XLA cannot fold the transpose back into the product, which
    then runs like the forward products.
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


# Jitted so that a step traces it once per shape, not once per call (hundreds of
# small operations each time); XLA inlines it into the caller's program.
@jax.jit
def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, (1, 1), 'VALID')` in NHWC/HWIO, by Winograd.

    `x: [B, H + 2, W + 2, C]`, `kernel: [3, 3, C, D]` -> `[B, H, W, D]`. The input
    is cut into 6x6 tiles at stride 4 (zero-extended to whole tiles, the extra
    outputs cropped), each tile and the kernel are transformed, and the
    convolution becomes 36 matrix products `[B * H/4 * W/4, C] @ [C, D]`.
    Autodiff of it is Winograd too: the weight gradient is 36 products of
    transformed inputs and output gradients, the input gradient 36 products with
    the transposed transformed kernel. Results agree with the direct
    convolution to ~1e-5 of the output's largest value (tests hold them so).
    """
    batch, padded_height, padded_width, channels = x.shape
    height, width = padded_height - 2, padded_width - 2
    tile, size = TILE, TILE + 2
    tiles_h, tiles_w = -(-height // tile), -(-width // tile)
    x = jnp.pad(x, ((0, 0), (0, tiles_h * tile - height), (0, tiles_w * tile - width), (0, 0)))
    # B^T d B, separably: rows of tiles, then columns, each transform's axis moved to the front.
    tiles = _transform(_windows(x, 1, tiles_h), "BT", 2, 0)  # [6, B, th, W, C]
    tiles = _transform(_windows(tiles, 3, tiles_w), "BT", 4, 1)  # [6, 6, B, th, tw, C]
    tiles = tiles.reshape(size * size, batch * tiles_h * tiles_w, channels)
    # G g G^T, separably.
    kernel = _transform(_transform(kernel, "G", 0, 0), "G", 1, 1)  # [6, 6, C, D]
    products = _tile_products(tiles, kernel.reshape(size * size, channels, -1))
    products = products.reshape(size, size, batch, tiles_h, tiles_w, -1)
    # A^T m A, separably, each 4x4 output tile put back in place.
    y = _transform(products, "AT", 1, 4)  # [6, B, th, tw, 4, D]
    y = _transform(y, "AT", 0, 2)  # [B, th, 4, tw, 4, D]
    y = y.reshape(batch, tile * tiles_h, tile * tiles_w, -1)
    return y[:, :height, :width]
