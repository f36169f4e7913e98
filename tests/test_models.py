"""The CycleGAN networks match the reference architecture."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceage_jax import defaults as default_config
from faceage_jax import models


def count_params(params) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(params))


def abstract_params(module, image_size):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), images)


def test_generator_parameter_count_equals_reference():
    params = abstract_params(models.ResnetGenerator(ngf=64, n_res_blocks=9), 128)
    assert count_params(params) == 11_378_179


def test_discriminator_parameter_count_equals_reference():
    params = abstract_params(models.PatchDiscriminator(ndf=64, n_layers=3), 128)
    assert count_params(params) == 2_764_737


def test_default_config_builds_the_reference_networks():
    config = default_config.get_config()
    generator = models.create_generator(config)
    discriminator = models.create_discriminator(config)
    assert count_params(abstract_params(generator, 128)) == 11_378_179
    assert count_params(abstract_params(discriminator, 128)) == 2_764_737


def test_generator_maps_128_images_to_128_images_in_tanh_range():
    generator = models.ResnetGenerator(ngf=4, n_res_blocks=1)
    images = jax.random.uniform(jax.random.key(1), (1, 128, 128, 3), minval=-1, maxval=1)
    params = generator.init(jax.random.key(0), images)
    out = generator.apply(params, images)
    assert out.shape == (1, 128, 128, 3)
    assert out.dtype == jnp.float32
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    # A freshly initialized generator is not the constant map.
    assert float(out.std()) > 1e-3


@pytest.mark.parametrize("image_size, patch_map", [(128, 14), (256, 30)])
def test_discriminator_patch_map_shape(image_size, patch_map):
    discriminator = models.PatchDiscriminator(ndf=64, n_layers=3)
    params = abstract_params(discriminator, image_size)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    scores = jax.eval_shape(discriminator.apply, params, images)
    assert scores.shape == (1, patch_map, patch_map, 1)


def test_discriminator_receptive_field_is_70x70():
    # Instance norm couples every position, so measure the conv stack without it:
    # the support of d(one interior score)/d(input) is the receptive field.
    discriminator = models.PatchDiscriminator(ndf=2, n_layers=3, normalize=False)
    images = jax.random.normal(jax.random.key(1), (1, 128, 128, 3))
    params = discriminator.init(jax.random.key(0), images)

    def one_score(images):
        return discriminator.apply(params, images)[0, 7, 7, 0]

    gradient = jax.grad(one_score)(images)
    rows, cols = np.nonzero(np.abs(np.asarray(gradient[0])).sum(-1))
    assert rows.max() - rows.min() + 1 == 70
    assert cols.max() - cols.min() + 1 == 70


def test_reflection_pad_mirrors_without_repeating_the_border():
    x = jax.random.normal(jax.random.key(2), (1, 6, 7, 2))
    width = 3
    padded = np.asarray(models.reflection_pad(x, width))
    assert padded.shape == (1, 12, 13, 2)
    np.testing.assert_array_equal(padded[:, width:-width, width:-width], np.asarray(x))
    # Reflection: padded row `width - k` mirrors padded row `width + k` (the border
    # row itself is not repeated); likewise for columns. The straightforward
    # generator below pads with it, and the generator is held equal to that.
    for k in range(1, width + 1):
        np.testing.assert_array_equal(padded[:, width - k], padded[:, width + k])
        np.testing.assert_array_equal(padded[:, :, width - k], padded[:, :, width + k])
        np.testing.assert_array_equal(padded[:, -1 - width + k], padded[:, -1 - width - k])


# bfloat16 keeps ~3 significant digits; through a dozen conv+norm layers the
# tanh outputs (range 2) stay within 0.05 of float32, with a mean error ~100x smaller.
BFLOAT16_MAX_ABS_ERROR = 0.05
BFLOAT16_MEAN_ABS_ERROR = 0.01


def test_bfloat16_generator_agrees_with_float32():
    images = jax.random.uniform(jax.random.key(3), (2, 64, 64, 3), minval=-1, maxval=1)
    generator32 = models.ResnetGenerator(ngf=16, n_res_blocks=3)
    generator16 = models.ResnetGenerator(ngf=16, n_res_blocks=3, dtype=jnp.bfloat16)
    params = generator32.init(jax.random.key(0), images)
    # Parameters stay float32 whatever the compute dtype.
    params16 = generator16.init(jax.random.key(0), images)
    assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {jnp.dtype(jnp.float32)}

    out32 = generator32.apply(params, images)
    out16 = generator16.apply(params, images)
    assert out16.dtype == jnp.float32
    error = np.abs(np.asarray(out32) - np.asarray(out16))
    assert error.max() < BFLOAT16_MAX_ABS_ERROR
    assert error.mean() < BFLOAT16_MEAN_ABS_ERROR


def test_bfloat16_discriminator_agrees_with_float32():
    images = jax.random.uniform(jax.random.key(4), (2, 64, 64, 3), minval=-1, maxval=1)
    discriminator32 = models.PatchDiscriminator(ndf=16)
    discriminator16 = models.PatchDiscriminator(ndf=16, dtype=jnp.bfloat16)
    params = discriminator32.init(jax.random.key(0), images)
    scores32 = np.asarray(discriminator32.apply(params, images))
    scores16 = np.asarray(discriminator16.apply(params, images))
    scale = np.abs(scores32).max()
    assert np.abs(scores32 - scores16).max() < BFLOAT16_MAX_ABS_ERROR * scale


def test_unknown_compute_dtype_is_rejected_with_the_choices():
    config = default_config.get_config()
    config.compute_dtype = "float16"
    with pytest.raises(ValueError, match="bfloat16"):
        models.create_generator(config)


def test_tiny_variant_runs_at_its_image_size():
    images = jnp.zeros((1, models.TINY_IMAGE_SIZE, models.TINY_IMAGE_SIZE, 3))
    generator, discriminator = models.TinyGenerator(), models.TinyDiscriminator()
    g_params = generator.init(jax.random.key(0), images)
    d_params = discriminator.init(jax.random.key(0), images)
    assert generator.apply(g_params, images).shape == images.shape
    assert discriminator.apply(d_params, images).shape == (1, 6, 6, 1)


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
        padding=models.TRANSPOSE_PAD_3x3_S2,
        kernel_init=models.KERNEL_INIT,
        dtype=dtype,
    )


def test_subpixel_conv_transpose_has_the_parameters_of_flax_conv_transpose():
    inputs = jnp.zeros((1, 5, 7, 6))
    fast = models.SubpixelConvTranspose(4).init(jax.random.key(0), inputs)
    straightforward = flax_conv_transpose(4).init(jax.random.key(0), inputs)
    # Same names, shapes and initial values: checkpoints move between the two.
    assert jax.tree.map(np.shape, fast) == {"params": {"kernel": (3, 3, 6, 4), "bias": (4,)}}
    jax.tree.map(np.testing.assert_array_equal, fast, straightforward)


def test_subpixel_conv_transpose_doubles_height_and_width():
    outputs = jax.eval_shape(
        models.SubpixelConvTranspose(4).init_with_output, jax.random.key(0), jnp.zeros((2, 5, 7, 6))
    )[0]
    assert outputs.shape == (2, 10, 14, 4)


def test_subpixel_conv_transpose_equals_flax_conv_transpose_with_gradients():
    # Odd, unequal height and width catch a parity or border mistake.
    inputs = jax.random.normal(jax.random.key(1), (2, 5, 7, 6))
    cotangent = jax.random.normal(jax.random.key(2), (2, 10, 14, 4))
    straightforward = flax_conv_transpose(4)
    params = perturbed(straightforward.init(jax.random.key(0), inputs))

    expected = value_and_gradients(straightforward, params, inputs, cotangent)
    actual = value_and_gradients(models.SubpixelConvTranspose(4), params, inputs, cotangent)
    assert_equal_up_to_float32_rounding(actual, expected)


def test_bfloat16_subpixel_conv_transpose_agrees_with_flax_conv_transpose():
    inputs = jax.random.normal(jax.random.key(1), (2, 8, 8, 32))
    params = perturbed(flax_conv_transpose(16).init(jax.random.key(0), inputs))
    expected = flax_conv_transpose(16, jnp.bfloat16).apply(params, inputs)
    actual = models.SubpixelConvTranspose(16, dtype=jnp.bfloat16).apply(params, inputs)
    assert actual.dtype == expected.dtype == jnp.bfloat16
    expected, actual = np.asarray(expected, np.float32), np.asarray(actual, np.float32)
    # Both round the same bfloat16 products; only the summation order differs.
    assert np.abs(actual - expected).max() < 0.02 * np.abs(expected).max()


def flax_instance_norm():
    """The straightforward layer that `models.instance_norm` computes."""
    return nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False, use_fast_variance=False)


def reflect(x, width):
    return jnp.pad(x, ((0, 0), (width, width), (width, width), (0, 0)), mode="reflect")


class StraightforwardResidualBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        conv = functools.partial(
            nn.Conv, x.shape[-1], (3, 3), padding="VALID", kernel_init=models.KERNEL_INIT
        )
        y = nn.relu(flax_instance_norm()(conv()(reflect(x, 1))))
        y = flax_instance_norm()(conv()(reflect(y, 1)))
        return x + y


class StraightforwardGenerator(nn.Module):
    """The ResNet generator written with Flax's own layers only: the specification."""

    ngf: int
    n_res_blocks: int

    @nn.compact
    def __call__(self, images):
        def conv(features, kernel, **kwargs):
            return nn.Conv(features, kernel, kernel_init=models.KERNEL_INIT, **kwargs)

        def norm_relu(x):
            return nn.relu(flax_instance_norm()(x))

        x = norm_relu(conv(self.ngf, (7, 7), padding="VALID")(reflect(images, 3)))
        x = norm_relu(conv(2 * self.ngf, (3, 3), strides=(2, 2), padding=models.PAD_1)(x))
        x = norm_relu(conv(4 * self.ngf, (3, 3), strides=(2, 2), padding=models.PAD_1)(x))
        for _ in range(self.n_res_blocks):
            x = StraightforwardResidualBlock(name=f"ResidualBlock_{_}")(x)
        x = norm_relu(flax_conv_transpose(2 * self.ngf)(x))
        x = norm_relu(flax_conv_transpose(self.ngf)(x))
        x = conv(3, (7, 7), padding="VALID")(reflect(x, 3))
        return jnp.tanh(x)


@pytest.mark.parametrize("winograd", [False, True])
def test_generator_has_the_parameters_of_the_straightforward_generator(winograd):
    images = jnp.zeros((1, 32, 32, 3))
    generator = models.ResnetGenerator(ngf=8, n_res_blocks=2, winograd=winograd)
    params = generator.init(jax.random.key(0), images)
    reference = StraightforwardGenerator(ngf=8, n_res_blocks=2).init(jax.random.key(0), images)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, reference)
    jax.tree.map(np.testing.assert_array_equal, params, reference)


@pytest.mark.parametrize("winograd", [False, True])
def test_generator_equals_the_straightforward_generator_with_gradients(winograd):
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    cotangent = jax.random.normal(jax.random.key(2), images.shape)
    reference = StraightforwardGenerator(ngf=4, n_res_blocks=2)
    params = perturbed(reference.init(jax.random.key(0), images))

    expected = value_and_gradients(reference, params, images, cotangent)
    generator = models.ResnetGenerator(ngf=4, n_res_blocks=2, winograd=winograd)
    actual = value_and_gradients(generator, params, images, cotangent)
    assert_equal_up_to_float32_rounding(actual, expected)


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

    def value_and_grads(conv):
        output, pullback = jax.vjp(conv, x, kernel)
        return (output, *pullback(cotangent))

    expected = value_and_grads(direct_conv)
    actual = value_and_grads(models.winograd_conv3x3)
    # F(4x4, 3x3) rounds more than the direct sum: 0.5-2.4e-6 of the largest value here.
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        scale = np.abs(np.asarray(want)).max()
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale)


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
    actual, pullback = jax.vjp(functools.partial(models.instance_norm, dtype=dtype), x)
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


def test_residual_convs_auto_is_winograd_on_cpu_in_float32_only():
    config = default_config.get_config()
    assert jax.default_backend() == "cpu"
    assert models.create_generator(config).winograd
    config.compute_dtype = "bfloat16"
    assert not models.create_generator(config).winograd
    config.residual_convs = "winograd"
    assert models.create_generator(config).winograd
    config.residual_convs = "direct"
    config.compute_dtype = "float32"
    assert not models.create_generator(config).winograd


def convolutions_in_loop_fusions(hlo_text):
    """Names of compiled HLO's loop fusions that contain a convolution.

    XLA:CPU runs a convolution by its convolution library, alone or in a custom
    fusion; inside a loop fusion it is emitted as a naive elemental loop.
    """
    fusions = re.findall(r"fusion\(.*?kind=(\w+), calls=%([\w.\-]+)", hlo_text)
    loop_fusions = {name for kind, name in fusions if kind == "kLoop"}
    return [
        name
        for computation in re.split(r"\n(?=\S)", hlo_text)
        if (match := re.match(r"%([\w.\-]+) ", computation))
        and (name := match.group(1)) in loop_fusions
        and " convolution(" in computation
    ]


def test_direct_residual_convs_are_not_scanned_on_cpu():
    # jax-ml/jax#12868: XLA:CPU emits a convolution's gradient inside a loop body
    # as a naive loop (the demo step ran 25x slower); the generator loops instead.
    assert jax.default_backend() == "cpu"
    config = default_config.get_config()
    config.update(ngf=32, n_res_blocks=2, residual_convs="direct")
    images = jnp.zeros((1, 64, 64, 3))

    def compiled_gradient(generator):
        def loss(params):
            return generator.apply(params, images).sum()

        params = generator.init(jax.random.key(0), images)
        return jax.jit(jax.grad(loss)).lower(params).compile().as_text()

    generator = models.create_generator(config)
    assert not generator.scan_blocks
    assert convolutions_in_loop_fusions(compiled_gradient(generator)) == []
    # What it avoids: the same generator with its blocks scanned.
    scanned = compiled_gradient(generator.clone(scan_blocks=True))
    assert convolutions_in_loop_fusions(scanned), (
        "no convolution in a loop fusion: XLA fixed it (direct convs may be scanned) "
        "or its HLO text format changed (fix `convolutions_in_loop_fusions`)"
    )
    config.residual_convs = "winograd"
    assert models.create_generator(config).scan_blocks


def test_unknown_residual_convs_is_rejected_with_the_choices():
    config = default_config.get_config()
    config.residual_convs = "fft"
    with pytest.raises(ValueError, match="winograd"):
        models.create_generator(config)


def test_winograd_conv_refuses_what_it_cannot_compute():
    strided = models.Conv(4, (3, 3), strides=(2, 2), padding=models.PAD_1, winograd=True)
    with pytest.raises(ValueError, match="3x3 stride-1"):
        strided.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))
