"""The canonical CycleGAN networks (Zhu et al. 2017) in Flax linen, NHWC.

`ResnetGenerator` is the ResNet-9 generator and `PatchDiscriminator` the 70x70
PatchGAN of the reference implementation, layer for layer: reflection padding,
instance norm without learned affine parameters (eps 1e-5), conv biases kept,
N(0, 0.02) kernels and zero biases. Parameters are float32; `dtype` sets the
compute dtype of convolutions (bfloat16 on accelerators), while instance-norm
statistics are always computed in float32.

The generator's stride-2 transposed convolutions are computed as four small
convolutions (`SubpixelConvTranspose`), not as `nn.ConvTranspose`'s convolution
over a stride-dilated input, which XLA:CPU runs at a few percent of matmul
speed (the whole step was 1.7x faster on an H200 too). Parameters (names,
shapes, initialization) and results are `nn.ConvTranspose`'s; tests hold them
equal.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.linen.dtypes import promote_dtype
from jax import lax

KERNEL_INIT = nn.initializers.normal(stddev=0.02)

# Same spatial padding as PyTorch's Conv2d(padding=1).
PAD_1 = ((1, 1), (1, 1))
# PyTorch's ConvTranspose2d(kernel 3, stride 2, padding 1, output_padding 1) as a
# transposed convolution over the stride-dilated input: k - 1 - p before, plus
# output_padding after, which exactly doubles the height and width.
TRANSPOSE_PAD_3x3_S2 = ((1, 2), (1, 2))


class SubpixelConvTranspose(nn.Module):
    """`nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding=TRANSPOSE_PAD_3x3_S2)`.

    `x: [B, H, W, C] -> [B, 2H, 2W, features]`, with that layer's parameters.
    Computed as four small convolutions, one per output parity, instead of one
    over the stride-dilated input (three quarters zeros): output (2m + a, 2n + b)
    sees only inputs (m, n), (m, n + 1), (m + 1, n), (m + 1, n + 1). Along each
    axis an even output takes kernel tap 1 at offset 0, an odd output taps 0 and
    2 at offsets 0 and 1.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_shape = (3, 3, x.shape[-1], self.features)
        kernel = self.param("kernel", KERNEL_INIT, kernel_shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)

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
        return y.reshape(batch, 2 * height, 2 * width, self.features) + bias


def reflection_pad(x: jax.Array, width: int) -> jax.Array:
    """Reflect-pads the spatial axes of `x: [B, H, W, C]` by `width` on each side."""
    return jnp.pad(x, ((0, 0), (width, width), (width, width), (0, 0)), mode="reflect")


def instance_norm(dtype) -> nn.Module:
    """Instance norm as the reference's InstanceNorm2d(affine=False); float32 statistics."""
    return nn.InstanceNorm(
        epsilon=1e-5, use_scale=False, use_bias=False, use_fast_variance=False, dtype=dtype
    )


class ResidualBlock(nn.Module):
    """Two reflection-padded 3x3 convs with instance norm; the input is added back."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        conv = functools.partial(
            nn.Conv, channels, (3, 3), padding="VALID", kernel_init=KERNEL_INIT, dtype=self.dtype
        )
        y = conv()(reflection_pad(x, 1))
        y = nn.relu(instance_norm(self.dtype)(y))
        y = conv()(reflection_pad(y, 1))
        y = instance_norm(self.dtype)(y)
        return x + y


class ResnetGenerator(nn.Module):
    """ResNet generator: `images: [B, H, W, 3]` in [-1, 1] -> same shape, tanh output.

    H and W must be multiples of 2**n_downsample.
    """

    ngf: int = 64
    n_res_blocks: int = 9
    n_downsample: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        conv = functools.partial(nn.Conv, kernel_init=KERNEL_INIT, dtype=self.dtype)
        norm = functools.partial(instance_norm, self.dtype)

        x = conv(self.ngf, (7, 7), padding="VALID")(reflection_pad(images, 3))
        x = nn.relu(norm()(x))
        for i in range(self.n_downsample):
            x = conv(self.ngf * 2 ** (i + 1), (3, 3), strides=(2, 2), padding=PAD_1)(x)
            x = nn.relu(norm()(x))
        for _ in range(self.n_res_blocks):
            x = ResidualBlock(dtype=self.dtype)(x)
        for n, i in enumerate(reversed(range(self.n_downsample))):
            # Named as the nn.ConvTranspose it computes: same parameters, same checkpoints.
            upsample = SubpixelConvTranspose(
                self.ngf * 2**i, dtype=self.dtype, name=f"ConvTranspose_{n}"
            )
            x = upsample(x)
            x = nn.relu(norm()(x))
        x = conv(3, (7, 7), padding="VALID")(reflection_pad(x, 3))
        return jnp.tanh(x.astype(jnp.float32))


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
                x = instance_norm(self.dtype)(x)
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


def create_generator(config: ml_collections.ConfigDict) -> ResnetGenerator:
    return ResnetGenerator(
        ngf=config.ngf,
        n_res_blocks=config.n_res_blocks,
        n_downsample=config.n_downsample,
        dtype=compute_dtype(config),
    )


def create_discriminator(config: ml_collections.ConfigDict) -> PatchDiscriminator:
    return PatchDiscriminator(
        ndf=config.ndf, n_layers=config.n_disc_layers, dtype=compute_dtype(config)
    )


# A tiny variant for tests: same structure, a fraction of the compute.
TinyGenerator = functools.partial(ResnetGenerator, ngf=8, n_res_blocks=1)
TinyDiscriminator = functools.partial(PatchDiscriminator, ndf=8, n_layers=2)
TINY_IMAGE_SIZE = 32
