"""dnq_jax.prng: a flat draw reshaped holds exactly the values of the same draw over the shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnq_jax import prng

SAMPLERS = {
    "bits": (jax.random.bits, {"dtype": jnp.uint32}),
    "normal": (jax.random.normal, {"dtype": jnp.float32}),
    "uniform": (jax.random.uniform, {}),
    "bernoulli": (jax.random.bernoulli, {"p": 0.3}),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (7, 2), (9,), ()])
def test_flat_draw_equals_the_shaped_draw(name, shape):
    draw, kwargs = SAMPLERS[name]
    key = jax.random.fold_in(jax.random.key(5), len(shape))
    flat = prng.flat_draw(draw, key, shape, **kwargs)
    shaped = draw(key, shape=shape, **kwargs)
    assert flat.shape == shaped.shape == shape and flat.dtype == shaped.dtype
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(shaped))


def test_flat_draw_under_jit_with_a_traced_key():
    key = jax.random.key(1)
    got = jax.jit(lambda k: prng.flat_draw(jax.random.normal, k, (3, 4)))(key)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.normal(key, (3, 4))))
