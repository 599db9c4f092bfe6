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


@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (33,), (32,), (1,), ()])
def test_fair_coins_are_the_bits_of_random_words_in_the_stated_order(shape):
    """Element 32 i + j of the flat mask is bit j of word i, restated in numpy."""
    key = jax.random.key(7)
    got = jax.jit(prng.fair_coins, static_argnums=1)(key, shape)
    n = int(np.prod(shape))
    words = np.asarray(jax.random.bits(key, (-(-n // 32),), dtype=jnp.uint32))
    want = np.array([(int(words[i // 32]) >> (i % 32)) & 1 for i in range(n)], dtype=bool)
    assert got.shape == shape and got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got).reshape(-1), want)


def test_fair_coins_are_fair_and_independent():
    """A quarter million coins: the rate, each of the 32 bit positions, neighbours and
    other keys all behave as independent Bernoulli(1/2) draws (5 standard errors)."""
    n = 1 << 18
    a = np.asarray(prng.fair_coins(jax.random.key(0), (n,))).astype(np.float64)
    b = np.asarray(prng.fair_coins(jax.random.key(1), (n,))).astype(np.float64)
    se = 0.5 / np.sqrt(n)
    assert abs(a.mean() - 0.5) < 5 * se
    per_bit = a.reshape(-1, 32).mean(axis=0)
    assert np.all(np.abs(per_bit - 0.5) < 5 * 0.5 / np.sqrt(n // 32))
    # Both coins True with probability 1/4 for neighbours in a word, across words, and
    # across keys (std error of a Bernoulli(1/4) mean: sqrt(3) / 4 / sqrt(n)).
    se2 = np.sqrt(3) / 4 / np.sqrt(n)
    for x, y in ((a[:-1], a[1:]), (a[:-32], a[32:]), (a, b)):
        assert abs((x * y).mean() - 0.25) < 5 * se2 * np.sqrt(n / len(x))


def test_bernoulli_is_fair_coins_at_one_half_and_the_flat_draw_elsewhere():
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        np.asarray(prng.bernoulli(key, (5, 7), 0.5)), np.asarray(prng.fair_coins(key, (5, 7)))
    )
    want = prng.flat_draw(jax.random.bernoulli, key, (5, 7), p=0.3)
    np.testing.assert_array_equal(np.asarray(prng.bernoulli(key, (5, 7), 0.3)), np.asarray(want))
