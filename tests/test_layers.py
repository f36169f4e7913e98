"""The fast layers equal Flax's straightforward ones, parameters and gradients included."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceage_jax import cyclegan, layers
from tests import helpers
from tests.helpers import (
    assert_equal_up_to_float32_rounding,
    flax_conv_transpose,
    perturbed,
    value_and_gradients,
)


def test_reflection_pad_mirrors_without_repeating_the_border():
    x = jax.random.normal(jax.random.key(2), (1, 6, 7, 2))
    width = 3
    padded = np.asarray(layers.reflection_pad(x, width))
    assert padded.shape == (1, 12, 13, 2)
    np.testing.assert_array_equal(padded[:, width:-width, width:-width], np.asarray(x))
    # Reflection: padded row `width - k` mirrors padded row `width + k` (the border
    # row itself is not repeated); likewise for columns. The straightforward
    # generator below pads with it, and the generator is held equal to that.
    for k in range(1, width + 1):
        np.testing.assert_array_equal(padded[:, width - k], padded[:, width + k])
        np.testing.assert_array_equal(padded[:, :, width - k], padded[:, :, width + k])
        np.testing.assert_array_equal(padded[:, -1 - width + k], padded[:, -1 - width - k])


def test_subpixel_conv_transpose_has_the_parameters_of_flax_conv_transpose():
    inputs = jnp.zeros((1, 5, 7, 6))
    fast = layers.SubpixelConvTranspose(4).init(jax.random.key(0), inputs)
    straightforward = flax_conv_transpose(4).init(jax.random.key(0), inputs)
    # Same names, shapes and initial values: checkpoints move between the two.
    assert jax.tree.map(np.shape, fast) == {"params": {"kernel": (3, 3, 6, 4), "bias": (4,)}}
    jax.tree.map(np.testing.assert_array_equal, fast, straightforward)


def test_subpixel_conv_transpose_doubles_height_and_width():
    outputs = jax.eval_shape(
        layers.SubpixelConvTranspose(4).init_with_output, jax.random.key(0), jnp.zeros((2, 5, 7, 6))
    )[0]
    assert outputs.shape == (2, 10, 14, 4)


def test_subpixel_conv_transpose_equals_flax_conv_transpose_with_gradients():
    # Odd, unequal height and width catch a parity or border mistake.
    inputs = jax.random.normal(jax.random.key(1), (2, 5, 7, 6))
    cotangent = jax.random.normal(jax.random.key(2), (2, 10, 14, 4))
    straightforward = flax_conv_transpose(4)
    params = perturbed(straightforward.init(jax.random.key(0), inputs))

    expected = value_and_gradients(straightforward, params, inputs, cotangent)
    actual = value_and_gradients(layers.SubpixelConvTranspose(4), params, inputs, cotangent)
    assert_equal_up_to_float32_rounding(actual, expected)


def test_bfloat16_subpixel_conv_transpose_agrees_with_flax_conv_transpose():
    inputs = jax.random.normal(jax.random.key(1), (2, 8, 8, 32))
    params = perturbed(flax_conv_transpose(16).init(jax.random.key(0), inputs))
    expected = flax_conv_transpose(16, jnp.bfloat16).apply(params, inputs)
    actual = layers.SubpixelConvTranspose(16, dtype=jnp.bfloat16).apply(params, inputs)
    assert actual.dtype == expected.dtype == jnp.bfloat16
    expected, actual = np.asarray(expected, np.float32), np.asarray(actual, np.float32)
    # Both round the same bfloat16 products; only the summation order differs.
    assert np.abs(actual - expected).max() < 0.02 * np.abs(expected).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_instance_norm_equals_flax_instance_norm_with_gradients(dtype):
    # An offset and a scale per channel, as conv outputs have.
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 6, 5, 4))
    cotangent = jax.random.normal(jax.random.key(1), x.shape)
    flax_norm = nn.InstanceNorm(
        epsilon=1e-5, use_scale=False, use_bias=False, use_fast_variance=False, dtype=dtype
    )

    def flax_layer(x):
        return flax_norm.apply({}, x)

    expected, flax_pullback = jax.vjp(flax_layer, x)
    actual, pullback = jax.vjp(functools.partial(layers.instance_norm, dtype=dtype), x)
    assert actual.dtype == expected.dtype == dtype
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=tolerance
    )
    (grad,), (flax_grad,) = (
        pullback(cotangent.astype(dtype)),
        flax_pullback(cotangent.astype(dtype)),
    )
    scale = np.abs(np.asarray(flax_grad, np.float32)).max()
    np.testing.assert_allclose(
        np.asarray(grad, np.float32), np.asarray(flax_grad, np.float32), atol=tolerance * scale
    )


DOWNSAMPLE = dict(kernel_size=(3, 3), strides=(2, 2), padding=layers.PAD_1)


def valid(features, kernel_size):
    return dict(features=features, kernel_size=kernel_size, padding="VALID")


@pytest.mark.parametrize(
    ("shape", "layer", "relu_input", "route"),
    [
        # downsample_conv3x3: odd, unequal height and width (the last row and
        # column's taps), then even sizes fed relu(x), as in the generator.
        ((2, 9, 7, 5), dict(features=6, **DOWNSAMPLE), False, "downsample_conv3x3"),
        ((2, 16, 12, 8), dict(features=6, **DOWNSAMPLE), True, "downsample_conv3x3"),
        # narrow_conv: the generator's RGB output layer, an unequal kernel, few
        # features on both sides, and a 1x1 output.
        ((2, 14, 12, 8), valid(3, (7, 7)), True, "narrow_conv"),
        ((1, 9, 11, 5), valid(1, (3, 5)), False, "narrow_conv"),
        ((2, 9, 8, 3), valid(2, (3, 3)), False, "narrow_conv"),
        ((1, 5, 4, 6), valid(3, (5, 4)), False, "narrow_conv"),
        # narrow_input_conv: the generator's RGB input layer, an unequal kernel, a 1x1 kernel.
        ((2, 14, 12, 3), valid(8, (7, 7)), False, "narrow_input_conv"),
        ((1, 13, 10, 3), valid(5, (7, 5)), False, "narrow_input_conv"),
        ((2, 6, 5, 2), valid(6, (1, 1)), True, "narrow_input_conv"),
        # valid_conv: any other stride-1 'VALID' convolution (odd sizes, unequal kernel).
        ((2, 11, 9, 6), valid(8, (3, 3)), True, "valid_conv"),
        ((1, 13, 10, 6), valid(5, (7, 5)), False, "valid_conv"),
    ],
)
def test_convs_with_hand_written_gradients_equal_flax_conv(shape, layer, relu_input, route):
    # layers.Conv runs these through custom VJPs: held to autodiff of Flax's nn.Conv.
    inputs = jax.random.normal(jax.random.key(1), shape)
    straightforward = nn.Conv(**layer, kernel_init=layers.KERNEL_INIT)
    fast = layers.Conv(**layer, relu_input=relu_input)
    params = perturbed(straightforward.init(jax.random.key(0), inputs))
    cotangent = jax.random.normal(jax.random.key(2), straightforward.apply(params, inputs).shape)

    def reference(variables, x):
        return straightforward.apply(variables, nn.relu(x) if relu_input else x)

    expected_output, pullback = jax.vjp(reference, params, inputs)
    expected = (expected_output, *pullback(cotangent))
    actual = value_and_gradients(fast, params, inputs, cotangent)
    assert_equal_up_to_float32_rounding(actual, expected)
    # The case runs the custom VJP it is there for.
    assert f"name={route}" in str(jax.make_jaxpr(fast.apply)(params, inputs))


@pytest.mark.parametrize(
    ("shape", "features"), [((2, 22, 20, 16), 3), ((2, 22, 20, 3), 16)], ids=["to_rgb", "from_rgb"]
)
def test_bfloat16_narrow_convs_are_as_accurate_as_a_bfloat16_conv(shape, features):
    # The RGB layers' shifted sums of 49 taps: as close to float32 as Flax's bfloat16 conv.
    inputs = jax.random.normal(jax.random.key(1), shape)
    layer = dict(features=features, kernel_size=(7, 7), padding="VALID")
    straightforward = nn.Conv(**layer, kernel_init=layers.KERNEL_INIT)
    params = perturbed(straightforward.init(jax.random.key(0), inputs))
    cotangent = jax.random.normal(jax.random.key(2), straightforward.apply(params, inputs).shape)
    exact = value_and_gradients(straightforward, params, inputs, cotangent)
    flax_bf16 = value_and_gradients(
        nn.Conv(**layer, dtype=jnp.bfloat16), params, inputs, cotangent.astype(jnp.bfloat16)
    )
    ours = value_and_gradients(
        layers.Conv(**layer, dtype=jnp.bfloat16), params, inputs, cotangent.astype(jnp.bfloat16)
    )
    for name, want, flax_got, got in zip(
        ("output", "parameter gradients", "input gradients"), exact, flax_bf16, ours, strict=True
    ):
        want, flax_got, got = (
            np.concatenate([np.asarray(leaf, np.float32).ravel() for leaf in jax.tree.leaves(t)])
            for t in (want, flax_got, got)
        )
        flax_error, error = np.abs(flax_got - want).mean(), np.abs(got - want).mean()
        assert error <= 1.5 * flax_error, (name, error, flax_error)


@pytest.mark.skipif(not helpers.ONEDNN_CPU, reason="XLA gives oneDNN work only with AVX-512")
@pytest.mark.parametrize(
    ("shape", "layer", "route"),
    [
        # The generator's layers with hand-written gradients at 64px (ngf 32, batch 4)
        # and at the default config's batch 1 (ngf 64, 128px).
        ((4, 70, 70, 32), valid(3, (7, 7)), "narrow_conv"),
        ((1, 134, 134, 64), valid(3, (7, 7)), "narrow_conv"),
        ((4, 70, 70, 3), valid(32, (7, 7)), "narrow_input_conv"),
        ((1, 134, 134, 3), valid(64, (7, 7)), "narrow_input_conv"),
        ((4, 64, 64, 32), dict(features=64, **DOWNSAMPLE), "downsample_conv3x3"),
        ((1, 128, 128, 64), dict(features=128, **DOWNSAMPLE), "downsample_conv3x3"),
    ],
)
def test_bfloat16_layers_give_onednn_matmuls_whole_blocks_of_32(shape, layer, route):
    # In bfloat16 on a CPU XLA gives some matmuls to oneDNN's AMX kernel, which can
    # bring NaN into a sum that is not a multiple of 32 long (layers.ONEDNN_K_BLOCK).
    # The RGB output layer's input gradient sums 147 taps: padded to 160.
    conv = layers.Conv(**layer, dtype=jnp.bfloat16)
    inputs = jax.ShapeDtypeStruct(shape, jnp.float32)
    params = jax.eval_shape(conv.init, jax.random.key(0), inputs)
    gradients = jax.jit(
        jax.grad(lambda p, x: conv.apply(p, x).astype(jnp.float32).sum(), argnums=(0, 1))
    )
    options = cyclegan.compiler_options(helpers.make_config(compute_dtype="bfloat16"))
    hlo = gradients.lower(params, inputs).compile(options).as_text()
    lengths = helpers.onednn_matmul_sums(hlo)
    assert all(n <= 32 or n % 32 == 0 for n in lengths), lengths
    if route == "narrow_conv":
        assert 160 in lengths, lengths


def test_winograd_conv_refuses_what_it_cannot_compute():
    strided = layers.Conv(4, (3, 3), strides=(2, 2), padding=layers.PAD_1, winograd=True)
    with pytest.raises(ValueError, match="3x3 stride-1"):
        strided.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))
