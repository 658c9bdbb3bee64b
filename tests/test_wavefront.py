"""The wavefront schedule (all layers in one loop) against the reference scan network.

Values, final carries and gradients (params, inputs, initial carries) equal the
``"scan"`` implementation's within 1e-5 for every cell, 2 and 3 layers, variable
lengths (including 0 and T), token ids, unroll and single-sequence ``apply``; float64
finite differences check the hand-written backward pass on their own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from test_fused import (  # the shapes, cells and helpers of the fused tests
    CELLS,
    LENGTHS,
    TOL,
    B,
    H,
    I,
    T,
    assert_trees_close,
    batch_carry,
    loss_fn,
    random,
)

from rnn_jax import config, networks, wavefront


def nets(cell_name, num_layers, **kw):
    cell = CELLS[cell_name]()
    ref = networks.network(cell, num_layers, implementation="scan")
    wave = networks.network(cell, num_layers, implementation="wavefront", **kw)
    params = ref.init(jax.random.key(0), I)
    params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(1), v.shape), params)
    return ref, wave, params, batch_carry(ref, 10)


# every cell at 2 layers; 3 layers (a middle layer both reads and feeds the wave) for
# the two cells whose backward differs most
GRID = [(c, 2) for c in CELLS] + [("gru_after", 3), ("lstm", 3)]


@pytest.mark.parametrize("cell_name,num_layers", GRID, ids=[f"{c}-L{n}" for c, n in GRID])
def test_wavefront_equals_scan_values_and_gradients(cell_name, num_layers):
    ref, wave, params, carry = nets(cell_name, num_layers)
    xs, weights = random(2, (B, T, I)), random(3, (B, T, H))
    args = (params, xs, carry, jnp.asarray(LENGTHS))
    v_ref, g_ref = jax.jit(jax.value_and_grad(loss_fn(ref, weights), argnums=(0, 1, 2)))(*args)
    v_wave, g_wave = jax.jit(jax.value_and_grad(loss_fn(wave, weights), argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(float(v_wave), float(v_ref), **TOL)
    assert_trees_close(g_wave, g_ref)
    for lengths in (jnp.asarray(LENGTHS), None):
        ys, final = jax.jit(wave.apply_batch)(params, xs, lengths, carry)
        assert_trees_close((ys, final), ref.apply_batch(params, xs, lengths, carry))
    ys, final = wave.apply_batch(params, xs, jnp.asarray(LENGTHS), carry)
    assert np.all(np.asarray(ys)[1] == 0) and np.all(np.asarray(ys)[3, 1:] == 0)
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(carry), strict=True):
        np.testing.assert_array_equal(np.asarray(got)[1], np.asarray(want)[1])  # length 0


def test_wavefront_token_ids_unroll_and_single_sequence():
    ref, wave, params, carry = nets("lstm", 3, unroll=4)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, I, (B, T)), jnp.int32)
    weights = random(6, (B, T, H))

    def loss(net):
        return lambda p: jnp.sum(net.apply_batch(p, ids)[0] * weights)

    assert_trees_close(jax.jit(jax.grad(loss(wave)))(params), jax.jit(jax.grad(loss(ref)))(params))
    one = jax.tree.map(lambda v: v[0], carry)
    for length in (None, jnp.int32(4), jnp.int32(0)):
        got = wave.apply(params, random(7, (T, I)), length, one)
        assert_trees_close(got, ref.apply(params, random(7, (T, I)), length, one))


@pytest.mark.parametrize("cell_name", ["gru_after", "lstm"])
def test_wavefront_matches_finite_differences(cell_name):
    """float64 numerical gradients: independent of any autodiff rule."""
    cell = CELLS[cell_name]()
    with jax.enable_x64(True):
        net = networks.network(cell, 2, implementation="scan")
        params = jax.tree.map(
            lambda v: (v + 0.2 * jax.random.normal(jax.random.key(1), v.shape)).astype(jnp.float64),
            net.init(jax.random.key(0), I),
        )
        layers = [params["layer_0"], params["layer_1"]]
        xs = jnp.asarray(np.random.default_rng(2).normal(size=(T, B, I)))
        carries = [
            jax.tree.map(
                lambda v, s=s: jnp.asarray(np.random.default_rng(s).normal(size=(B, *v.shape))),
                cell.initial_carry(),
            )
            for s in (3, 4)
        ]
        lengths = jnp.asarray(LENGTHS)

        def f(p, x, c):
            ys, final = wavefront.network_layers(cell, p, c, x, lengths)
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(v * v) for v in jax.tree.leaves(final))

        check_grads(f, (layers, xs, carries), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_wavefront_one_layer_is_the_fused_layer():
    ref, wave, params, carry = nets("lstm", 1)
    xs = random(8, (B, T, I))
    got = wave.apply_batch(params, xs, jnp.asarray(LENGTHS), carry)
    assert_trees_close(got, ref.apply_batch(params, xs, jnp.asarray(LENGTHS), carry))


@pytest.mark.parametrize(
    "option", [dict(bidirectional=True), dict(dropout=0.1), dict(remat=True)], ids=str
)
def test_wavefront_rejects_what_it_cannot_run(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"'wavefront' runs unidirectional.*{name}="):
        networks.network(CELLS["lstm"](), 2, implementation="wavefront", **option)
    with pytest.raises(config.ConfigError, match=name):
        config.validate(config.TrainConfig(num_layers=2, implementation="wavefront", **option))
