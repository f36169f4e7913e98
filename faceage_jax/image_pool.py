"""A history of generated images for the discriminators (Shrivastava et al. 2017).

The reference semantics, as a pure jit-able function of (pool, images, key):
while the pool is not full, each new image is stored and returned as is; once
full, each image is, with probability 0.5, swapped for a random stored image
(which is returned, the new one taking its place), otherwise returned as is.
Images are processed one after another, in batch order. Size 0 disables the
pool: images pass through untouched. Under data parallelism every device owns
its own pool; the pool is part of the checkpointed state.
"""

import flax.struct
import jax
import jax.numpy as jnp

SWAP_PROBABILITY = 0.5


class ImagePool(flax.struct.PyTreeNode):
    """`images: [pool_size, H, W, C]` (slots past `count` are unused); `count`: int32 []."""

    images: jax.Array
    count: jax.Array

    @property
    def size(self) -> int:
        return self.images.shape[0]


def create(pool_size: int, image_shape: tuple[int, ...], dtype=jnp.float32) -> ImagePool:
    """An empty pool of `pool_size` images of shape `image_shape` (e.g. (H, W, 3))."""
    if pool_size < 0:
        raise ValueError(f"pool_size must be >= 0 (0 disables the pool), got {pool_size}.")
    return ImagePool(
        images=jnp.zeros((pool_size, *image_shape), dtype), count=jnp.zeros((), jnp.int32)
    )


def query(pool: ImagePool, images: jax.Array, key: jax.Array) -> tuple[ImagePool, jax.Array]:
    """Returns the updated pool and the images to show the discriminator.

    `images: [B, H, W, C]`; the result has the same shape and dtype.
    """
    if pool.size == 0:
        return pool, images

    def one_image(carry, image_and_key):
        stored, count = carry
        image, image_key = image_and_key
        swap_key, slot_key = jax.random.split(image_key)
        is_full = count >= pool.size
        swap = is_full & (jax.random.uniform(swap_key) < SWAP_PROBABILITY)
        random_slot = jax.random.randint(slot_key, (), 0, pool.size)
        slot = jnp.where(is_full, random_slot, count)
        returned = jnp.where(swap, stored[slot], image)
        stored = stored.at[slot].set(jnp.where(is_full & ~swap, stored[slot], image))
        count = jnp.minimum(count + 1, pool.size)
        return (stored, count), returned

    image_keys = jax.random.split(key, images.shape[0])
    (stored, count), returned = jax.lax.scan(
        one_image, (pool.images, pool.count), (images.astype(pool.images.dtype), image_keys)
    )
    return ImagePool(images=stored, count=count), returned.astype(images.dtype)
