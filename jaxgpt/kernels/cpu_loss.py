"""The tied LM head and next-token cross-entropy of training, with a hand-written backward pass.

`head_loss_sum` equals
    logits = h @ wte.T, restricted to the real vocabulary (padded ids are never predicted)
    sum(mask * (logsumexp(logits) - logits[target]))
and `jax.custom_vjp` gives it a backward written out by hand. It is the `cpu` backend's LM loss
(see jaxgpt/loss.py, whose chunked `head_loss_sum` the other backends use; the tests check that
the two agree in values and gradients).

Why by hand: at GPT-2's 50k vocabulary the head is the largest matmul of the model. Autodiff of
the obvious code (einsum, slice to the real vocabulary, optax's cross-entropy) measured on
XLA:CPU pays for (N, V) intermediates several times over: the slice copies the logits, the
cross-entropy's backward builds the softmax and the one-hot in separate passes and pads the
cotangent back to the padded vocabulary. Here the padded columns are masked in place (-inf, so
they get zero probability and zero gradient), the logits are kept for the backward, and the
backward builds dlogits = mask * (softmax - onehot) in one fused pass that feeds the two
gradient matmuls. Those are laid out so that XLA:CPU transposes the narrow (N, D) activations,
not the (N, V) cotangent (see `cpu_stack._wgrad`).

Shapes: N tokens (batch x time, flattened), D width, Vp padded vocabulary, V real vocabulary.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _masked_logits(h_NxD, wte_VpxD, vocab_size: int):
    logits_NxVp = jnp.einsum("nd,vd->nv", h_NxD, wte_VpxD, preferred_element_type=jnp.float32)
    if wte_VpxD.shape[0] > vocab_size:
        logits_NxVp = jnp.where(jnp.arange(wte_VpxD.shape[0]) < vocab_size, logits_NxVp, -jnp.inf)
    return logits_NxVp


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_loss_sum(h_NxD, wte_VpxD, targets_N, mask_N, vocab_size: int):
    """sum over tokens of mask * cross-entropy(h @ wte.T over the first vocab_size ids, target).

    h (float32) and wte are differentiable; targets (int) and mask (float) are data.
    """
    return _fwd(h_NxD, wte_VpxD, targets_N, mask_N, vocab_size)[0]


def _fwd(h_NxD, wte_VpxD, targets_N, mask_N, vocab_size):
    logits_NxVp = _masked_logits(h_NxD, wte_VpxD, vocab_size)
    lse_N = jax.nn.logsumexp(logits_NxVp, axis=-1)
    picked_N = jnp.take_along_axis(logits_NxVp, targets_N[:, None], axis=-1)[:, 0]
    loss = jnp.sum((lse_N - picked_N) * mask_N)
    return loss, (h_NxD, wte_VpxD, targets_N, mask_N, logits_NxVp, lse_N)


def _bwd(vocab_size, res, g):
    h_NxD, wte_VpxD, targets_N, mask_N, logits_NxVp, lse_N = res
    Vp = wte_VpxD.shape[0]
    scale_N = (mask_N * g)[:, None]
    onehot_NxVp = jnp.arange(Vp)[None, :] == targets_N[:, None]
    d_NxVp = (jnp.exp(logits_NxVp - lse_N[:, None]) - onehot_NxVp) * scale_N
    dh_NxD = jnp.einsum("nv,vd->nd", d_NxVp, wte_VpxD).astype(h_NxD.dtype)
    # (D, Vp) with the narrow h transposed, then one transpose of the (D, Vp) result.
    dwte_VpxD = jnp.einsum("nd,nv->dv", h_NxD, d_NxVp).T.astype(wte_VpxD.dtype)
    return dh_NxD, dwte_VpxD, None, None


head_loss_sum.defvjp(_fwd, _bwd)
