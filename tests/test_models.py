"""The CycleGAN networks match the reference architecture."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
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


def capture_padded_conv_inputs(module, params, images):
    """Inputs of every unpadded ('VALID') conv: those the generator reflect-pads itself."""
    captured = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.module.padding == "VALID":
            captured.append((context.module.kernel_size[0], args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        module.apply(params, images)
    return captured


def test_generator_pads_by_reflection_not_zeros():
    generator = models.ResnetGenerator(ngf=8, n_res_blocks=1)
    images = jax.random.uniform(jax.random.key(2), (1, 32, 32, 3), minval=-1, maxval=1)
    params = generator.init(jax.random.key(0), images)
    captured = capture_padded_conv_inputs(generator, params, images)

    # 7x7 stem, two 3x3 convs in the residual block, 7x7 head.
    assert [kernel for kernel, _ in captured] == [7, 3, 3, 7]
    for kernel, padded in captured:
        width = kernel // 2
        padded = np.asarray(padded)
        # Reflection: padded row `width - k` mirrors padded row `width + k`
        # (the border row itself is not repeated); likewise for columns.
        for k in range(1, width + 1):
            np.testing.assert_array_equal(padded[:, width - k], padded[:, width + k])
            np.testing.assert_array_equal(padded[:, :, width - k], padded[:, :, width + k])
            np.testing.assert_array_equal(padded[:, -1 - width + k], padded[:, -1 - width - k])
        assert np.abs(padded[:, 0]).sum() > 0, "border rows are zeros: zero padding"
    # The stem sees the input itself, reflected.
    np.testing.assert_array_equal(np.asarray(captured[0][1])[:, 3:-3, 3:-3], np.asarray(images))


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
