"""GPT-2 architecture in Flax NNX: parameters with logical axis names, and its forward modes.

Shapes in names: B batch, T new tokens, S cache slots, D n_embd, H heads, K head dim, F 4*D,
L layers, V real vocabulary, Vp padded vocabulary, C classes.

Entry points (one job each; `_block` is the one block implementation under all of them):
    hidden(tokens_BxT, dropout_key=None)            -> h_BxTxD   causal forward, no cache
    hidden_at(tokens_BxT, index_B)                  -> h_BxD     the same, one token per row
    logits(tokens_BxT)                              -> logits_BxTxV (float32)
    prefill(tokens_BxT, lengths_B, cache)           -> (h_BxD at each row's last token, cache)
    extend(tokens_BxT, cache)                       -> (h_BxTxD, cache)
    decode_step(token_B, positions_B, cache, layers=None) -> (h_BxD, cache)
    head(h_xD)                                      -> logits (float32, real vocabulary)
    classify(tokens_BxT, lengths_B, dropout_key=None) -> class logits_BxC
Every h is after the final LayerNorm, in the compute dtype.

Compute choices are fixed when the model is built (`create_model`) and are part of its graph,
so jit specialises on them: `dtype` (compute; params stay float32; LayerNorm, softmax and logits
are float32 whatever it is), `attention` (the backend, see jaxgpt/attention.py; "auto" is
resolved on the current platform) and `remat` (what the backward recomputes):
    none  every intermediate the backward needs is stored;
    dots  each block runs under `jax.checkpoint` with the policy
          `dots_with_no_batch_dims_saveable`: the outputs of the weight matmuls are stored,
          attention (its batched products and softmax), LayerNorm and GELU are recomputed;
    full  `nothing_saveable`: only each block's input is stored, the whole block is recomputed.

Layout decisions:
- Every block parameter is stacked on a leading layer axis (`Blocks`), and the no-cache forward
  runs the layers under `jax.lax.scan`: one compiled block, and (on XLA:CPU at least) no
  depth-squared residual-gradient fusions in the backward. With a KV cache the layers are
  unrolled, so each layer's cache buffer is updated in place.
- Weight matrices are stored (in, out) with q, k, v fused in one (D, 3D) projection: the layout
  of OpenAI/HF GPT-2 `Conv1D`, so their checkpoints load with no transposes.
- The embedding table is padded to a multiple of 64 rows (tiling); logits cover the real
  vocabulary only, so a padded id can never be predicted or sampled.
- Every parameter carries its logical axis names (metadata `logical_axes`, see `logical_axes`):
  the one place sharding is declared; jaxgpt/train/parallel.py maps them to mesh axes. The
  main activations (residual stream, q/k/v heads, MLP hidden) are named too (`_constrain`),
  a no-op unless a mesh step installs its rules (`activation_sharding`).
- The `cpu` backend's kernels (jaxgpt/kernels/) replace the no-cache stack and the training
  loss, and generation's decode loop (one-token steps); everything else is this file.

The KV cache (see `init_cache`) is a plain pytree:
    {"k": [L x (B, S, H, K)], "v": [L x (B, S, H, K)], "length": (B,) int32}
`length[b]` is the number of slots row b has filled. A cached call writes its T new keys/values
at slots length[b] .. length[b]+T-1 of row b (each row at its own offset; slots >= S are
dropped), lets query t of row b attend to slots <= length[b]+t, and advances length by T.
Slots past `length` are never read, so rolling a row back is only lowering its length.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt import attention as attn
from jaxgpt import quant
from jaxgpt.config import ModelConfig

LN_EPS = 1e-5
REMAT = ("none", "dots", "full")


# ---------------------------------------------------------------- activation sharding (a hook)
# The model names the logical axes of its main activations and knows nothing of meshes. While a
# mesh step is traced, jaxgpt/train/parallel.py installs a resolver (`activation_sharding`) that
# turns those names into `with_sharding_constraint`s through its rules table; with none
# installed (pmap, generation, tests) `_constrain` returns its input. A context variable rather
# than a model attribute: the same model (graphdef) serves both, and the resolver holds a mesh.
_ACTIVATION_SHARDING = contextvars.ContextVar("jaxgpt_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(resolve):
    """Within the block, `resolve(x, logical_axes)` constrains each named activation."""
    token = _ACTIVATION_SHARDING.set(resolve)
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def _constrain(x, axes: tuple):
    resolve = _ACTIVATION_SHARDING.get()
    return x if resolve is None else resolve(x, axes)


_ACT_BxTxD = ("act_batch", "act_seq", "act_embed")  # the residual stream


def _param(value, axes) -> nnx.Param:
    return nnx.Param(value, logical_axes=axes)


def _normal(rngs: nnx.Rngs, std: float, shape, axes) -> nnx.Param:
    return _param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes)


def _const(fill: float, shape, axes) -> nnx.Param:
    return _param(jnp.full(shape, fill, jnp.float32), axes)


class Blocks(nnx.Module):
    """The n_layer transformer blocks, each parameter stacked on a leading (L,) axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D = cfg.n_layer, cfg.n_embd
        std, proj_std = 0.02, 0.02 / math.sqrt(2 * L)  # GPT-2: scale residual projections
        # Logical axes: "qkv" and "mlp" are the column-parallel outputs, "heads" the attention
        # output's input (row-parallel); "embed" is the residual width.
        self.ln1_scale = _const(1.0, (L, D), ("layers", "norm"))
        self.w_qkv = _normal(rngs, std, (L, D, 3 * D), ("layers", "embed", "qkv"))
        self.w_attn_out = _normal(rngs, proj_std, (L, D, D), ("layers", "heads", "embed"))
        self.ln2_scale = _const(1.0, (L, D), ("layers", "norm"))
        self.w_fc = _normal(rngs, std, (L, D, 4 * D), ("layers", "embed", "mlp"))
        self.w_mlp_out = _normal(rngs, proj_std, (L, 4 * D, D), ("layers", "mlp", "embed"))
        if cfg.bias:
            self.ln1_bias = _const(0.0, (L, D), ("layers", "norm"))
            self.b_qkv = _const(0.0, (L, 3 * D), ("layers", "qkv"))
            self.b_attn_out = _const(0.0, (L, D), ("layers", "norm"))
            self.ln2_bias = _const(0.0, (L, D), ("layers", "norm"))
            self.b_fc = _const(0.0, (L, 4 * D), ("layers", "mlp"))
            self.b_mlp_out = _const(0.0, (L, D), ("layers", "norm"))


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype="float32", attention="xla",
                 remat="none"):
        if remat not in REMAT:
            raise ValueError(f"remat must be one of {list(REMAT)}, got {remat!r}")
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.attention = attention  # a concrete backend: see create_model
        self.remat = remat
        D = cfg.n_embd
        self.wte = _normal(rngs, 0.02, (cfg.padded_vocab, D), ("vocab", "embed"))  # tied LM head
        self.wpe = _normal(rngs, 0.02, (cfg.block_size, D), ("positions", "embed"))
        self.blocks = Blocks(cfg, rngs)
        self.ln_f_scale = _const(1.0, (D,), ("norm",))
        if cfg.bias:
            self.ln_f_bias = _const(0.0, (D,), ("norm",))
        if cfg.n_classes:
            # Fresh classification head on the last real token's hidden state (task=classify).
            self.cls_w = _normal(rngs, 0.02, (D, cfg.n_classes), ("embed", "classes"))
            self.cls_b = _const(0.0, (cfg.n_classes,), ("classes",))

    # ------------------------------------------------------------------ no-cache forward
    def hidden(self, tokens_BxT, *, dropout_key=None):
        """Causal forward of full sequences (training, eval): final hidden states (B, T, D)."""
        return self._final_norm(self._stack(tokens_BxT, dropout_key))

    def hidden_at(self, tokens_BxT, index_B, *, dropout_key=None):
        """`hidden` at one position per row, (B, D): the final LayerNorm runs on B tokens
        instead of B*T (the classifier and the sliding-window recompute read one token)."""
        x_BxTxD = self._stack(tokens_BxT, dropout_key)
        x_BxD = jnp.take_along_axis(x_BxTxD, index_B[:, None, None], axis=1)[:, 0]
        return self._final_norm(x_BxD)

    def logits(self, tokens_BxT):
        """Float32 logits over the real vocabulary at every position, (B, T, V)."""
        return self.head(self.hidden(tokens_BxT))

    def _stack(self, tokens_BxT, dropout_key):
        cfg, dt = self.cfg, self.dtype
        B, T = tokens_BxT.shape
        train = dropout_key is not None and cfg.dropout > 0
        x_BxTxD = _constrain(self._embed(tokens_BxT, jnp.arange(T, dtype=jnp.int32)[None, :], dropout_key),
                             _ACT_BxTxD)
        blocks = self._blocks()
        if self.attention == "cpu" and not train:
            from jaxgpt.kernels import cpu_stack  # the CPU backend's kernel (hand-written VJP)
            # int8 weights (jaxgpt/quant.py) reach this float kernel dequantized, once per call.
            return cpu_stack.stack(quant.dequantize_all(blocks), x_BxTxD, cfg.n_head)

        def attend(q, k, v, key):
            y = attn.attend(q, k, v, backend=self.attention, is_causal=True,
                            dropout_rate=cfg.dropout if train else 0.0,
                            dropout_key=None if key is None else jax.random.fold_in(key, 0))
            return y, None

        def body(x, xs):
            p, i = xs
            key = jax.random.fold_in(dropout_key, i) if train else None
            return _block(cfg, dt, p, x, attend, key)[0], None

        if self.remat != "none":
            policy = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                      "full": jax.checkpoint_policies.nothing_saveable}[self.remat]
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x_BxTxD, _ = jax.lax.scan(body, x_BxTxD, (blocks, jnp.arange(cfg.n_layer)))
        return x_BxTxD

    # ------------------------------------------------------------------ cached forward
    def prefill(self, tokens_BxT, lengths_B, cache):
        """Write each row's prompt into the cache and return its last token's hidden state.

        tokens_BxT: right-padded prompts; lengths_B: real tokens per row (>= 1). The cache may
        be partly filled: each row continues at its own length, at positions length + t.
        Returns (h_BxD at token lengths_B - 1, cache with length advanced by lengths_B). The
        padding's entries are written too; they sit past the new length, so nothing reads them.
        """
        start_B = cache["length"]
        x_BxTxD, cache = self._cached_stack(tokens_BxT, cache)
        x_BxD = jnp.take_along_axis(x_BxTxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
        return self._final_norm(x_BxD), dict(cache, length=start_B + lengths_B)

    def extend(self, tokens_BxT, cache):
        """Feed T tokens per row after its cached ones: hidden states at all T positions
        (speculative decoding's verification pass), cache length advanced by T."""
        x_BxTxD, cache = self._cached_stack(tokens_BxT, cache)
        return self._final_norm(x_BxTxD), cache

    def _cached_stack(self, tokens_BxT, cache):
        cfg, dt = self.cfg, self.dtype
        B, T = tokens_BxT.shape
        S = cache["k"][0].shape[1]
        start_B = cache["length"]
        slot_BxT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        # Per-row offsets are not expressible as is_causal (which aligns query 0 with key 0):
        # a dense (B, T, S) mask, at T = a prompt bucket or a few draft tokens.
        mask_BxTxS = jnp.arange(S, dtype=jnp.int32)[None, None, :] <= slot_BxT[:, :, None]
        x_BxTxD = self._embed(tokens_BxT, jnp.minimum(slot_BxT, cfg.block_size - 1), None)
        ks, vs = list(cache["k"]), list(cache["v"])
        for i, p in enumerate(self.layer_params()):
            def attend(q, k, v, _key, i=i):
                ks[i], vs[i] = _write_rows(ks[i], k, start_B), _write_rows(vs[i], v, start_B)
                return attn.attend(q, ks[i], vs[i], backend=self.attention,
                                   mask_BxTxS=mask_BxTxS), None
            x_BxTxD, _ = _block(cfg, dt, p, x_BxTxD, attend, None)
        return x_BxTxD, {"k": ks, "v": vs, "length": start_B + T}

    def decode_step(self, token_B, positions_B, cache, layers=None):
        """One token per row at its true position: (h_BxD, cache with length + 1).

        layers: `layer_params()` built once by the caller (decode calls this per token; the
        per-layer slices of the stacked params would otherwise be cut again every step).
        Attention reads the cache as a right-padded sequence: row b's first length[b] + 1 slots.
        """
        cfg, dt = self.cfg, self.dtype
        start_B = cache["length"]
        x_Bx1xD = self._embed(token_B[:, None], positions_B[:, None], None)
        ks, vs = list(cache["k"]), list(cache["v"])
        for i, p in enumerate(layers if layers is not None else self.layer_params()):
            def attend(q, k, v, _key, i=i):
                ks[i], vs[i] = _write_rows(ks[i], k, start_B), _write_rows(vs[i], v, start_B)
                return attn.attend(q, ks[i], vs[i], backend=self.attention,
                                   kv_lengths_B=start_B + 1), None
            x_Bx1xD, _ = _block(cfg, dt, p, x_Bx1xD, attend, None)
        return self._final_norm(x_Bx1xD[:, 0]), {"k": ks, "v": vs, "length": start_B + 1}

    # ------------------------------------------------------------------ heads
    def head(self, h_xD):
        """Tied LM head: float32 logits over the real vocabulary (padded ids never appear)."""
        if quant.is_quantized(self.wte[...]):  # int8 head: per-vocabulary-row scales
            return quant.matmul_nt(h_xD, self.wte[...], self.dtype, jnp.float32)[..., :self.cfg.vocab_size]
        logits = jnp.einsum("...d,vd->...v", h_xD.astype(self.dtype), self.wte[...].astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return logits[..., :self.cfg.vocab_size]

    def classify(self, tokens_BxT, lengths_B, *, dropout_key=None):
        """Class logits (B, C) from the hidden state of each row's last real token.

        Rows are right-padded; lengths_B counts the real tokens (>= 1). Causal attention means
        the padding after a row's last token cannot change that token's hidden state.
        """
        last_BxD = self.hidden_at(tokens_BxT, lengths_B - 1, dropout_key=dropout_key)
        if dropout_key is not None and self.cfg.dropout > 0:
            last_BxD = _dropout(last_BxD, self.cfg.dropout, jax.random.fold_in(dropout_key, 1 << 21))
        return (last_BxD.astype(jnp.float32) @ self.cls_w[...]) + self.cls_b[...]

    # ------------------------------------------------------------------ pieces
    def layer_params(self) -> list[dict]:
        """Per-layer parameter dicts: matrices and biases in the compute dtype (cast once; an
        int8 matrix stays int8, see jaxgpt/quant.py), LayerNorm parameters float32."""
        blocks = self._blocks()
        return [{name: (quant.compute_weight(a[i], self.dtype) if name.startswith(("w_", "b_")) else a[i])
                 for name, a in blocks.items()} for i in range(self.cfg.n_layer)]

    def _blocks(self) -> dict:
        return {k: v[...] for k, v in nnx.to_pure_dict(nnx.state(self.blocks)).items()}

    def _embed(self, tokens_BxT, positions_BxT, dropout_key):
        # .astype: an int8 table (jaxgpt/quant.py) dequantizes only the gathered rows.
        x_BxTxD = self.wte[...][tokens_BxT].astype(jnp.float32) + self.wpe[...][positions_BxT]
        if dropout_key is not None and self.cfg.dropout > 0:
            x_BxTxD = _dropout(x_BxTxD, self.cfg.dropout, jax.random.fold_in(dropout_key, 1 << 20))
        return x_BxTxD.astype(self.dtype)

    def _final_norm(self, x_xD):
        return _layer_norm(x_xD, self.ln_f_scale[...], self._get("ln_f_bias")).astype(self.dtype)

    def _get(self, name):
        p = getattr(self, name, None)
        return None if p is None else p[...]


def _dropout(x, rate, key):
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _layer_norm(x, scale, bias):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS) * scale
    return y + bias if bias is not None else y


def _linear(x, w, b, dt):
    if quant.is_quantized(w):
        y = quant.matmul(x, w, dt)
    else:
        y = jnp.einsum("...i,io->...o", x, w.astype(dt))
    return y + b.astype(dt) if b is not None else y


def _write_rows(cache_BxSxHxK, new_BxTxHxK, start_B):
    """Write each row's T new entries at its own offset (in place once the cache is donated).

    A scatter on the two leading (row, slot) axes: XLA:CPU updates the buffer in place, whereas
    a vmapped dynamic_update_slice lowers to a scatter that transposes (copies) the whole cache
    every step. Slots >= S are dropped, never clamped onto valid slots.
    """
    B, T = new_BxTxHxK.shape[:2]
    rows_BxT = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))
    slots_BxT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    return cache_BxSxHxK.at[rows_BxT, slots_BxT].set(
        new_BxTxHxK.astype(cache_BxSxHxK.dtype), mode="drop")


def _block(cfg: ModelConfig, dt, p, x_BxTxD, attend, key):
    """One transformer block: x + attn(ln1(x)), then + mlp(ln2(.)), with dropout when `key`.

    attend(q, k, v, key) -> (y_BxTxHxK, aux) is the mode's attention: causal over the T
    tokens themselves (no cache), or write-then-attend over a layer's KV cache.
    """
    B, T, D = x_BxTxD.shape
    H, K = cfg.n_head, cfg.head_dim
    get = p.get
    h = _layer_norm(x_BxTxD, p["ln1_scale"], get("ln1_bias")).astype(dt)
    qkv_BxTx3D = _linear(h, p["w_qkv"], get("b_qkv"), dt)
    q, k, v = (_constrain(a.reshape(B, T, H, K), ("act_batch", "act_seq", "act_heads", "act_kv"))
               for a in jnp.split(qkv_BxTx3D, 3, axis=-1))
    y_BxTxHxK, aux = attend(q, k, v, key)
    y_BxTxD = _linear(y_BxTxHxK.reshape(B, T, D), p["w_attn_out"], get("b_attn_out"), dt)
    if key is not None:
        y_BxTxD = _dropout(y_BxTxD, cfg.dropout, jax.random.fold_in(key, 1))
    x_BxTxD = x_BxTxD + y_BxTxD
    h = _layer_norm(x_BxTxD, p["ln2_scale"], get("ln2_bias")).astype(dt)
    h = jax.nn.gelu(_linear(h, p["w_fc"], get("b_fc"), dt), approximate=True)
    h = _constrain(h, ("act_batch", "act_seq", "act_mlp"))
    y_BxTxD = _linear(h, p["w_mlp_out"], get("b_mlp_out"), dt)
    if key is not None:
        y_BxTxD = _dropout(y_BxTxD, cfg.dropout, jax.random.fold_in(key, 2))
    return _constrain(x_BxTxD + y_BxTxD, _ACT_BxTxD), aux


def init_cache(cfg: ModelConfig, batch: int, cache_len: int, dtype=jnp.float32):
    """An empty KV cache for `batch` rows of `cache_len` slots (see the module docstring)."""
    shape = (batch, cache_len, cfg.n_head, cfg.head_dim)
    return {
        "k": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)],
        "v": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)],
        "length": jnp.zeros((batch,), jnp.int32),
    }


def compute_dtype(dtype) -> jnp.dtype:
    """A dtype name (or dtype) as a jnp dtype; "auto" is bfloat16 on GPU/TPU, float32 on CPU."""
    if isinstance(dtype, str) and dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(dtype)


def create_model(cfg: ModelConfig, seed: int = 0, dtype="float32", attention: str = "auto",
                 remat: str = "none") -> GPT:
    """A freshly initialised model. dtype may be "auto"; attention "auto" is resolved here, on
    the default backend (ValueError when an explicit choice cannot run there)."""
    dt = compute_dtype(dtype)
    backend = attn.resolve(attention, jax.default_backend(), dt, cfg.head_dim, remat)
    return GPT(cfg, rngs=nnx.Rngs(params=seed), dtype=dt, attention=backend, remat=remat)


def abstract_model(cfg: ModelConfig, dtype="float32", attention: str = "auto",
                   remat: str = "none") -> GPT:
    """The model with ShapeDtypeStructs instead of arrays: a restore target that allocates nothing."""
    return nnx.eval_shape(lambda: create_model(cfg, 0, dtype, attention, remat))


def logical_axes(model: GPT) -> dict:
    """The logical axis names of every parameter, as a nested dict shaped like the params."""
    return nnx.to_pure_dict(jax.tree.map(
        lambda v: v.get_metadata()["logical_axes"], nnx.state(model, nnx.Param),
        is_leaf=lambda x: isinstance(x, nnx.Variable)))


def count_params(model: GPT, non_embedding: bool = True) -> int:
    sizes = {k: math.prod(v.shape) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    n = sum(sizes.values())
    return n - sizes[("wpe",)] if non_embedding else n
