"""The canonical CycleGAN networks (Zhu et al. 2017) in Flax linen, NHWC.

`ResnetGenerator` is the ResNet-9 generator and `PatchDiscriminator` the 70x70
PatchGAN of the reference implementation, layer for layer: reflection padding,
instance norm without learned affine parameters (eps 1e-5), conv biases kept,
N(0, 0.02) kernels and zero biases. Parameters are float32; `dtype` sets the
compute dtype of convolutions (bfloat16 on accelerators), while instance-norm
statistics are always computed in float32.

The generator's layers come from `layers`, which computes them faster than
Flax's own with the same parameters and results; `cyclegan.create_networks`
builds both networks from a config.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from faceage_jax.layers import KERNEL_INIT, PAD_1, Conv, SubpixelConvTranspose, instance_norm


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


class ResnetGenerator(nn.Module):
    """ResNet generator: `images: [B, H, W, 3]` in [-1, 1] -> same shape, tanh output.

    H and W must be multiples of 2**n_downsample. `winograd` runs the residual
    blocks' 3x3 convolutions by Winograd's algorithm (4x fewer multiplications).
    `scan_blocks` runs the residual blocks as one scan (see `_residual_blocks`),
    else as a loop. Either way the parameters and the results are those of the
    straightforward network (tests hold them equal).
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
        """The residual blocks, as one `lax.scan` over their stacked parameters (or a loop).

        Each block keeps its own parameters (`ResidualBlock_0`, ...), as a plain
        loop would; the scan only makes XLA compile the block once rather than
        `n_res_blocks` times, which takes far less compile time and memory.
        """
        blocks = [
            ResidualBlock(dtype=self.dtype, winograd=self.winograd, name=f"ResidualBlock_{i}")
            for i in range(self.n_res_blocks)
        ]
        if self.is_initializing() or not blocks or not self.scan_blocks:
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
