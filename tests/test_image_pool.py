"""The image pool follows the reference semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceage_jax import image_pool

IMAGE_SHAPE = (2, 2, 3)


def images_numbered(first: int, count: int) -> jax.Array:
    """`count` constant images whose pixel values are first, first + 1, ..."""
    values = jnp.arange(first, first + count, dtype=jnp.float32)
    return jnp.broadcast_to(values[:, None, None, None], (count, *IMAGE_SHAPE))


def ids(images) -> list[int]:
    return [int(v) for v in np.asarray(images)[:, 0, 0, 0]]


def test_filling_pool_stores_and_returns_new_images_in_order():
    pool = image_pool.create(5, IMAGE_SHAPE)
    pool, returned = image_pool.query(pool, images_numbered(1, 3), jax.random.key(0))
    assert ids(returned) == [1, 2, 3]
    assert int(pool.count) == 3
    assert ids(pool.images) == [1, 2, 3, 0, 0]

    pool, returned = image_pool.query(pool, images_numbered(4, 2), jax.random.key(1))
    assert ids(returned) == [4, 5]
    assert int(pool.count) == 5
    assert ids(pool.images) == [1, 2, 3, 4, 5]


def test_batch_that_overflows_the_pool_fills_it_then_swaps():
    pool = image_pool.create(2, IMAGE_SHAPE)
    pool, returned = image_pool.query(pool, images_numbered(1, 4), jax.random.key(3))
    # The first two fill the pool and come back as they are.
    assert ids(returned)[:2] == [1, 2]
    assert int(pool.count) == 2
    # Images 3 and 4 are either returned or swapped for an image that was stored.
    for new_id, out_id in zip([3, 4], ids(returned)[2:], strict=True):
        assert out_id == new_id or out_id in [1, 2, 3]
    # Every stored image is one that was queried.
    assert set(ids(pool.images)) <= {1, 2, 3, 4}


def test_full_pool_swaps_about_half_of_the_images():
    pool = image_pool.create(50, IMAGE_SHAPE)
    pool, _ = image_pool.query(pool, images_numbered(1000, 50), jax.random.key(0))
    swapped = 0
    total = 0
    key = jax.random.key(42)
    query = jax.jit(image_pool.query)
    for step in range(20):
        key, step_key = jax.random.split(key)
        new = images_numbered(step * 100, 50)
        before = set(ids(pool.images))
        pool, returned = query(pool, new, step_key)
        for new_id, out_id in zip(ids(new), ids(returned), strict=True):
            total += 1
            if out_id != new_id:
                swapped += 1
                assert out_id in before | set(ids(new)), "a swap returns a stored image"
    # 1000 Bernoulli(0.5) draws: the share lies in [0.45, 0.55] with probability > 0.998.
    assert 0.45 <= swapped / total <= 0.55


def test_swapped_image_takes_the_place_of_the_returned_one():
    pool = image_pool.create(3, IMAGE_SHAPE)
    pool, _ = image_pool.query(pool, images_numbered(1, 3), jax.random.key(0))
    for seed in range(10):
        new_pool, returned = image_pool.query(pool, images_numbered(9, 1), jax.random.key(seed))
        (out_id,) = ids(returned)
        if out_id == 9:
            assert ids(new_pool.images) == [1, 2, 3]
        else:
            expected = [9 if stored == out_id else stored for stored in [1, 2, 3]]
            assert ids(new_pool.images) == expected


def test_same_key_gives_same_result():
    pool = image_pool.create(2, IMAGE_SHAPE)
    pool, _ = image_pool.query(pool, images_numbered(1, 2), jax.random.key(0))
    a = image_pool.query(pool, images_numbered(5, 4), jax.random.key(7))
    b = image_pool.query(pool, images_numbered(5, 4), jax.random.key(7))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_shapes_and_dtypes_are_kept():
    pool = image_pool.create(4, (8, 8, 3), dtype=jnp.float32)
    images = jnp.ones((3, 8, 8, 3), jnp.bfloat16)
    new_pool, returned = jax.jit(image_pool.query)(pool, images, jax.random.key(0))
    assert returned.shape == (3, 8, 8, 3) and returned.dtype == jnp.bfloat16
    assert new_pool.images.shape == (4, 8, 8, 3) and new_pool.images.dtype == jnp.float32
    assert new_pool.count.dtype == jnp.int32


def test_size_zero_passes_images_through():
    pool = image_pool.create(0, IMAGE_SHAPE)
    images = images_numbered(1, 3)
    new_pool, returned = image_pool.query(pool, images, jax.random.key(0))
    assert returned is images
    assert new_pool.images.shape == (0, *IMAGE_SHAPE)


def test_negative_size_is_rejected():
    with pytest.raises(ValueError, match="pool_size"):
        image_pool.create(-1, IMAGE_SHAPE)
