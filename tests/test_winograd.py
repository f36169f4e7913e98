"""Winograd F(4x4, 3x3) equals the direct convolution, gradients included."""

import functools

import jax
import numpy as np
import pytest

from faceage_jax import winograd


def direct_conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize(
    "shape",
    [
        (2, 10, 14, 5),  # Unequal height and width, channels that are not a multiple of anything.
        (1, 9, 7, 3),  # Outputs (7, 5) that do not fill whole 4x4 tiles.
        (2, 18, 18, 8),  # The residual blocks' shape at 64px, whole tiles.
    ],
)
def test_winograd_conv3x3_equals_the_direct_convolution_with_gradients(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], 7))
    cotangent = jax.random.normal(jax.random.key(2), (shape[0], shape[1] - 2, shape[2] - 2, 7))

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(conv):
        output, pullback = jax.vjp(conv, x, kernel)
        return (output, *pullback(cotangent))

    expected = value_and_grads(direct_conv)
    actual = value_and_grads(winograd.winograd_conv3x3)
    # F(4x4, 3x3) rounds more than the direct sum: 0.5-2.4e-6 of the largest value here.
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        scale = np.abs(np.asarray(want)).max()
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale)
