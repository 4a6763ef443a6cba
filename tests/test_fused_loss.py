"""fused_loss.head_loss_sum (hand-written backward) == autodiff of the plain head + cross-entropy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.fused_loss import head_loss_sum


def _reference(h_NxD, wte_VpxD, targets_N, mask_N, V):
    logits = jnp.einsum("nd,vd->nv", h_NxD, wte_VpxD)[:, :V]
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets_N) * mask_N)


@pytest.mark.parametrize("V, Vp", [(50, 64), (64, 64)])  # padded vocabulary, and none
def test_loss_and_gradients_match_autodiff(V, Vp):
    rng = np.random.default_rng(0)
    N, D = 24, 16
    h = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    wte = jnp.asarray(rng.standard_normal((Vp, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, N), jnp.float32)  # half the targets do not count
    got, (gh, gw) = jax.jit(jax.value_and_grad(head_loss_sum, argnums=(0, 1)), static_argnums=4)(
        h, wte, targets, mask, V)
    want, (wh, ww) = jax.value_and_grad(_reference, argnums=(0, 1))(h, wte, targets, mask, V)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(gh, wh, atol=1e-5)
    np.testing.assert_allclose(gw, ww, atol=1e-5)
    assert float(jnp.abs(gw[V:]).max(initial=0.0)) == 0.0  # padded ids get no gradient
    assert float(jnp.abs(gh[mask == 0]).max()) == 0.0  # uncounted targets neither
    # a second-level check that the scale g of the output cotangent is applied
    g2 = jax.grad(lambda h: 3.0 * head_loss_sum(h, wte, targets, mask, V))(h)
    np.testing.assert_allclose(g2, 3.0 * wh, atol=1e-5)
