"""Training losses as (sum, count) pairs, so devices and micro-batches combine exactly.

Shapes in names: B batch, T tokens, N = B*T, D width, Vp padded vocabulary, V real vocabulary,
C tokens per chunk, C classes in `classify_loss_sums`.

The LM loss never materialises float32 logits for a whole micro-batch: at GPT-2's 50k
vocabulary and 16 x 1024 tokens those alone are 3.3 GB. `head_loss_sum` walks the tokens in
chunks of at most `CHUNK_BYTES` of logits under `lax.scan`, each chunk under `jax.checkpoint`
so the backward recomputes its logits instead of storing them, and its two backward matmuls run
in the compute dtype (`_logits`). The `cpu` backend uses its own fused head loss
(jaxgpt/kernels/cpu_loss.py), tested equal to this one.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

CHUNK_BYTES = 256 << 20  # float32 logits per chunk: 1024 tokens at GPT-2's vocabulary


@jax.custom_vjp
def _logits(h_CxD, wte_VpxD):
    """h @ wte.T with float32 accumulation and output, whose backward matmuls run in the
    operands' (compute) dtype. Plain autodiff would run them in float32: the cotangent of a
    float32 output is float32, and a bfloat16 x float32 product is promoted to float32."""
    return jnp.einsum("cd,vd->cv", h_CxD, wte_VpxD, preferred_element_type=jnp.float32)


def _logits_fwd(h_CxD, wte_VpxD):
    return _logits(h_CxD, wte_VpxD), (h_CxD, wte_VpxD)


def _logits_bwd(res, g_CxVp):
    h_CxD, wte_VpxD = res
    g = g_CxVp.astype(h_CxD.dtype)
    dh = jnp.einsum("cv,vd->cd", g, wte_VpxD, preferred_element_type=jnp.float32)
    dw = jnp.einsum("cv,cd->vd", g, h_CxD, preferred_element_type=jnp.float32)
    return dh.astype(h_CxD.dtype), dw.astype(wte_VpxD.dtype)


_logits.defvjp(_logits_fwd, _logits_bwd)


def _chunk_loss_sum(h_CxD, wte_VpxD, targets_C, mask_C, vocab_size: int):
    logits_CxVp = _logits(h_CxD, wte_VpxD)
    if wte_VpxD.shape[0] > vocab_size:  # padded ids: zero probability, zero gradient
        logits_CxVp = jnp.where(jnp.arange(wte_VpxD.shape[0]) < vocab_size, logits_CxVp, -jnp.inf)
    lse_C = jax.nn.logsumexp(logits_CxVp, axis=-1)
    picked_C = jnp.take_along_axis(logits_CxVp, targets_C[:, None], axis=-1)[:, 0]
    return jnp.sum((lse_C - picked_C) * mask_C)


def chunk_tokens(n_tokens: int, vocab_padded: int) -> int:
    """Tokens per chunk: the most whose float32 logits fit CHUNK_BYTES, as a power of two."""
    fit = max(1, CHUNK_BYTES // (4 * vocab_padded))
    return n_tokens if n_tokens <= fit else 1 << (fit.bit_length() - 1)


def head_loss_sum(h_NxD, wte_VpxD, targets_N, mask_N, vocab_size: int):
    """sum over tokens of mask * cross-entropy(h @ wte.T over the first vocab_size ids, target),
    in chunks of tokens (see the module docstring). h and wte in the compute dtype."""
    N, D = h_NxD.shape
    C = chunk_tokens(N, wte_VpxD.shape[0])
    if C >= N:
        return _chunk_loss_sum(h_NxD, wte_VpxD, targets_N, mask_N, vocab_size)
    pad = -N % C  # zero-weight tokens fill the last chunk
    if pad:
        h_NxD = jnp.pad(h_NxD, ((0, pad), (0, 0)))
        targets_N, mask_N = jnp.pad(targets_N, (0, pad)), jnp.pad(mask_N, (0, pad))
    n = (N + pad) // C
    chunk = jax.checkpoint(partial(_chunk_loss_sum, vocab_size=vocab_size),
                           policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)

    def body(total, xs):
        h_CxD, targets_C, mask_C = xs
        return total + chunk(h_CxD, wte_VpxD, targets_C, mask_C), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (h_NxD.reshape(n, C, D), targets_N.reshape(n, C), mask_N.reshape(n, C)))
    return total


def lm_loss_sums(model, batch: dict, dropout_key):
    """(sum of masked next-token losses, number of counted targets) for one micro-batch.

    batch: tokens (B, T+1) int32, mask (B, T) float32 (see jaxgpt/data.py).
    """
    x_BxT1, mask_BxT = batch["tokens"], batch["mask"]
    h_BxTxD = model.hidden(x_BxT1[:, :-1], dropout_key=dropout_key)
    B, T, D = h_BxTxD.shape
    args = (h_BxTxD.reshape(B * T, D), model.wte[...].astype(h_BxTxD.dtype),
            x_BxT1[:, 1:].reshape(B * T), mask_BxT.reshape(B * T), model.cfg.vocab_size)
    if model.attention == "cpu":
        from jaxgpt.kernels.cpu_loss import head_loss_sum as cpu_head_loss_sum
        return cpu_head_loss_sum(*args), jnp.sum(mask_BxT), {}
    return head_loss_sum(*args), jnp.sum(mask_BxT), {}


def classify_loss_sums(model, batch: dict, dropout_key):
    """(sum of weighted cross-entropies, sum of weights, {"correct": weighted hits})."""
    logits_BxC = model.classify(batch["tokens"], batch["lengths"], dropout_key=dropout_key)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"])
    w = batch["weight"]
    correct = (jnp.argmax(logits_BxC, -1) == batch["labels"]).astype(jnp.float32) * w
    return jnp.sum(losses * w), jnp.sum(w), {"correct": jnp.sum(correct)}
