"""The CycleGAN networks match the reference architecture."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceage_jax import layers, models
from tests.helpers import (
    abstract_params,
    assert_equal_up_to_float32_rounding,
    count_params,
    flax_conv_transpose,
    flax_instance_norm,
    perturbed,
    reflect,
    value_and_gradients,
)


def test_generator_parameter_count_equals_reference():
    params = abstract_params(models.ResnetGenerator(ngf=64, n_res_blocks=9), 128)
    assert count_params(params) == 11_378_179


def test_discriminator_parameter_count_equals_reference():
    params = abstract_params(models.PatchDiscriminator(ndf=64, n_layers=3), 128)
    assert count_params(params) == 2_764_737


@pytest.mark.slow
def test_generator_maps_128_images_to_128_images_in_tanh_range():
    generator = models.ResnetGenerator(ngf=4, n_res_blocks=1)
    images = jax.random.uniform(jax.random.key(1), (1, 128, 128, 3), minval=-1, maxval=1)
    params = jax.jit(generator.init)(jax.random.key(0), images)
    out = jax.jit(generator.apply)(params, images)
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
    params = jax.jit(discriminator.init)(jax.random.key(0), images)

    def one_score(images):
        return discriminator.apply(params, images)[0, 7, 7, 0]

    gradient = jax.jit(jax.grad(one_score))(images)
    rows, cols = np.nonzero(np.abs(np.asarray(gradient[0])).sum(-1))
    assert rows.max() - rows.min() + 1 == 70
    assert cols.max() - cols.min() + 1 == 70


# bfloat16 keeps ~3 significant digits; through a dozen conv+norm layers the
# tanh outputs (range 2) stay within 0.05 of float32, with a mean error ~100x smaller.
BFLOAT16_MAX_ABS_ERROR = 0.05
BFLOAT16_MEAN_ABS_ERROR = 0.01


@pytest.mark.slow
def test_bfloat16_generator_agrees_with_float32():
    images = jax.random.uniform(jax.random.key(3), (2, 64, 64, 3), minval=-1, maxval=1)
    generator32 = models.ResnetGenerator(ngf=16, n_res_blocks=3)
    generator16 = models.ResnetGenerator(ngf=16, n_res_blocks=3, dtype=jnp.bfloat16)
    params = jax.jit(generator32.init)(jax.random.key(0), images)
    # Parameters stay float32 whatever the compute dtype.
    params16 = jax.jit(generator16.init)(jax.random.key(0), images)
    assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {jnp.dtype(jnp.float32)}

    out32 = jax.jit(generator32.apply)(params, images)
    out16 = jax.jit(generator16.apply)(params, images)
    assert out16.dtype == jnp.float32
    error = np.abs(np.asarray(out32) - np.asarray(out16))
    assert error.max() < BFLOAT16_MAX_ABS_ERROR
    assert error.mean() < BFLOAT16_MEAN_ABS_ERROR


def test_bfloat16_discriminator_agrees_with_float32():
    images = jax.random.uniform(jax.random.key(4), (2, 64, 64, 3), minval=-1, maxval=1)
    discriminator32 = models.PatchDiscriminator(ndf=16)
    discriminator16 = models.PatchDiscriminator(ndf=16, dtype=jnp.bfloat16)
    params = jax.jit(discriminator32.init)(jax.random.key(0), images)
    scores32 = np.asarray(jax.jit(discriminator32.apply)(params, images))
    scores16 = np.asarray(jax.jit(discriminator16.apply)(params, images))
    scale = np.abs(scores32).max()
    assert np.abs(scores32 - scores16).max() < BFLOAT16_MAX_ABS_ERROR * scale


class StraightforwardResidualBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        conv = functools.partial(
            nn.Conv, x.shape[-1], (3, 3), padding="VALID", kernel_init=layers.KERNEL_INIT
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
            return nn.Conv(features, kernel, kernel_init=layers.KERNEL_INIT, **kwargs)

        def norm_relu(x):
            return nn.relu(flax_instance_norm()(x))

        x = norm_relu(conv(self.ngf, (7, 7), padding="VALID")(reflect(images, 3)))
        x = norm_relu(conv(2 * self.ngf, (3, 3), strides=(2, 2), padding=layers.PAD_1)(x))
        x = norm_relu(conv(4 * self.ngf, (3, 3), strides=(2, 2), padding=layers.PAD_1)(x))
        for _ in range(self.n_res_blocks):
            x = StraightforwardResidualBlock(name=f"ResidualBlock_{_}")(x)
        x = norm_relu(flax_conv_transpose(2 * self.ngf)(x))
        x = norm_relu(flax_conv_transpose(self.ngf)(x))
        x = conv(3, (7, 7), padding="VALID")(reflect(x, 3))
        return jnp.tanh(x)


@pytest.mark.parametrize("winograd", [pytest.param(False, marks=pytest.mark.slow), True])
def test_generator_has_the_parameters_of_the_straightforward_generator(winograd):
    images = jnp.zeros((1, 32, 32, 3))
    generator = models.ResnetGenerator(ngf=8, n_res_blocks=2, winograd=winograd)
    params = jax.jit(generator.init)(jax.random.key(0), images)
    reference = jax.jit(StraightforwardGenerator(ngf=8, n_res_blocks=2).init)(
        jax.random.key(0), images
    )
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, reference)
    jax.tree.map(np.testing.assert_array_equal, params, reference)


@pytest.mark.parametrize("winograd", [pytest.param(False, marks=pytest.mark.slow), True])
def test_generator_equals_the_straightforward_generator_with_gradients(winograd):
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    cotangent = jax.random.normal(jax.random.key(2), images.shape)
    reference = StraightforwardGenerator(ngf=4, n_res_blocks=2)
    params = perturbed(jax.jit(reference.init)(jax.random.key(0), images))

    expected = value_and_gradients(reference, params, images, cotangent)
    generator = models.ResnetGenerator(ngf=4, n_res_blocks=2, winograd=winograd)
    actual = value_and_gradients(generator, params, images, cotangent)
    assert_equal_up_to_float32_rounding(actual, expected)
