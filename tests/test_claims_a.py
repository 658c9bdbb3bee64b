"""The long_range, gradients and gates claims: the dL/dH_t helper, and tiny end-to-end runs."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.claims import gradients, long_range
from rnn_jax import cells, tasks

ROOT = Path(__file__).resolve().parents[1]


def linear_cell(hidden_size: int) -> cells.Cell:
    """H_t = H_{t-1} W_h + X_t W_x: a linear RNN, whose dL/dH_t is known in closed form."""
    base = cells.rnn(hidden_size)

    def step(params, h, x):
        h = h @ params["W_h"] + x @ params["W_x"]
        return h, h

    return base._replace(step=step)


def test_hidden_state_gradients_of_a_linear_rnn_are_powers_of_w():
    # L = v . H_T with H_{t+1} = H_t W + ...: dL/dH_t = v (W^T)^(T-1-t), i.e. W^k v.
    h, i, t = 4, 3, 6
    rng = np.random.default_rng(0)
    w = rng.normal(size=(h, h)).astype(np.float32) * 0.7
    params = {"W_h": jnp.asarray(w), "W_x": jnp.asarray(rng.normal(size=(i, h)), jnp.float32)}
    v = rng.normal(size=(h,)).astype(np.float32)
    xs = jnp.asarray(rng.normal(size=(t, i)), jnp.float32)
    g = gradients.hidden_state_gradients(linear_cell(h), params, xs, lambda hT: hT @ v)
    assert g.shape == (t, h)
    for step in range(t):
        k = t - 1 - step
        expected = np.linalg.matrix_power(w.astype(np.float64), k) @ v
        np.testing.assert_allclose(g[step], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["rnn", "lstm"])  # an array carry; LSTMCarry (perturb h)
def test_hidden_state_gradients_match_finite_differences(name):
    jax.config.update("jax_enable_x64", True)
    try:
        cell = cells.make(name, 5)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), cell.init(jax.random.key(1), 2))
        xs, _ = tasks.adding(0, 1, 8)
        xs = xs[0].astype(jnp.float64)
        u = jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)

        def loss_fn(h):
            return jnp.sum(jnp.sin(h) * u)

        carry0 = jax.tree.map(lambda c: c.astype(jnp.float64), cell.initial_carry())
        g = np.asarray(gradients.hidden_state_gradients(cell, params, xs, loss_fn, carry0))

        @jax.jit
        def loss_with(step, delta):  # H_step + delta, by a plain loop over time
            carry = carry0
            for s in range(xs.shape[0]):
                carry, _ = cell.step(params, carry, xs[s])
                carry = gradients._perturb(carry, jnp.where(s == step, delta, 0.0))
            return loss_fn(gradients._hidden(carry))

        eps = 1e-6
        for step in (0, 3, 7):
            for unit in (0, 4):
                e = jnp.zeros(5, jnp.float64).at[unit].set(eps)
                fd = (float(loss_with(step, e)) - float(loss_with(step, -e))) / (2 * eps)
                assert g[step, unit] == pytest.approx(fd, rel=1e-5, abs=1e-9)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_gradient_norms_of_the_last_step_is_the_head_gradient():
    model = long_range.task_model("adding", cells.lstm(4))
    params = model.init(jax.random.key(0))
    xs, y = tasks.adding(0, 4, 6)

    @jax.jit
    def both(params):
        return gradients.gradient_norms(model, params, xs, y), model.outputs(params, xs)

    norms, pred = both(params)
    assert norms.shape == (6,)
    w = params["head"]["W"][:, 0]
    expected = np.mean(np.abs(2 * (np.asarray(pred) - np.asarray(y))) * np.linalg.norm(w))
    assert float(norms[-1]) == pytest.approx(expected, rel=1e-4)


def test_train_lowers_the_adding_loss_and_is_deterministic():
    model = long_range.task_model("adding", cells.rnn(8))
    a = long_range.train(model, [0, 1, 0], 8, steps=60, batch_size=32, lr=1e-2, eval_size=200)
    assert a["losses"].shape == (3, 60) and a["metric"].shape == (3,)
    assert a["losses"][:, -10:].mean() < a["losses"][:, :10].mean()
    np.testing.assert_array_equal(a["losses"][0], a["losses"][2])  # same seed, same run
    assert not np.array_equal(a["losses"][0], a["losses"][1])


def test_copy_model_outputs_logits_for_the_recalled_steps():
    model = long_range.task_model("copy", cells.rnn(4), num_symbols=5, num_copy=2)
    params = model.init(jax.random.key(0))
    ids, symbols = model.batch(jax.random.key(1), 3, 9)
    out = jax.eval_shape(model.outputs, params, ids)
    assert out.shape == (3, 2, tasks.copy_vocab_size(5))
    loss, acc = jax.jit(model.loss)(params, ids, symbols)
    assert np.isfinite(loss) and 0 <= acc <= 1


def _run(module: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # XLA_FLAGS: conftest's cheaper compile settings (these runs are tiny, compiling
    # dominates them)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", f"experiments.claims.{module}", f"--outdir={tmp_path}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "module,args,outputs",
    [
        (
            "long_range",
            [
                "--seeds=1",
                "--steps=2",
                "--lengths=8",
                "--cells=rnn,gru",
                "--hidden_size=4",
                "--eval_size=16",
            ],
            ["long_range.md", "long_range.png"],
        ),
        (
            "gradients",
            [
                "--seeds=1",
                "--steps=2",
                "--length=6",
                "--cells=rnn,lstm",
                "--hidden_size=4",
                "--eval_size=4",
            ],
            ["gradients.md", "gradients.png"],
        ),
        (
            "gates",
            [
                "--seeds=1",
                "--steps=2",
                "--lengths=6",
                "--variants=learned",
                "--hidden_size=4",
                "--lm_epochs=1",
                "--lm_hidden=4",
                "--lm_train=64",
                "--lm_val=32",
                "--lm_batch=32",
                "--passage=the time machine",
            ],
            ["gates.md", "gates.png", "gates_activations.png"],
        ),
    ],
)
def test_claim_command_end_to_end(module, args, outputs, tmp_path):
    result = _run(module, tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in outputs:
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / outputs[0]).read_text()
    assert "Claim" in md and "Did the claim" in md and ".png)" in md


@pytest.mark.parametrize("module", ["long_range", "gradients", "gates"])
def test_bad_flag_exits_2(module, tmp_path):
    result = _run(module, tmp_path, "--seeds=0")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "seeds" in result.stderr
    assert not list(tmp_path.iterdir())
