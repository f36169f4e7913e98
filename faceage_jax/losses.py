"""CycleGAN objectives: least-squares adversarial, L1 cycle and identity losses.

Each loss is a mean over every element, as the reference's nn.MSELoss / nn.L1Loss.
"""

import jax
import jax.numpy as jnp

REAL = 1.0
FAKE = 0.0


def least_squares(scores: jax.Array, target: float) -> jax.Array:
    """LSGAN loss (Mao et al. 2017): mean squared distance of raw scores to the target label."""
    return jnp.mean(jnp.square(scores.astype(jnp.float32) - target))


def l1(images: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean absolute difference, for the cycle and identity losses."""
    return jnp.mean(jnp.abs(images.astype(jnp.float32) - targets.astype(jnp.float32)))


def discriminator_loss(real_scores: jax.Array, fake_scores: jax.Array) -> jax.Array:
    """0.5 * (real scored as real + fake scored as fake): halves D's pace against G."""
    return 0.5 * (least_squares(real_scores, REAL) + least_squares(fake_scores, FAKE))
