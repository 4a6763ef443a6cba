"""int8 weight-only quantization: per-output-channel symmetric int8 weights with float32 scales.

    model = quantize_model(model, "int8")      # or jaxgpt.load(ckpt, quantize="int8")

What is quantized: the four block matrices (`w_qkv`, `w_attn_out`, `w_fc`, `w_mlp_out`, stacked
(L, in, out)) and the tied embedding `wte` (Vp, D), which is the LM head. Biases, LayerNorms,
`wpe` and a classifier head stay float32. Activations stay in the compute dtype; the checkpoint
on disk is unchanged (quantizing happens after the float weights are loaded).

The representation (`QArray`): a weight W becomes int8 values q and float32 scales s with
W ~ s * q, one scale per output channel (per column of an (in, out) matrix, per vocabulary row
of wte), s = max|W[:, o]| / 127 and q = round(W / s) in [-127, 127]. Rounding to nearest makes
|W - s*q| <= s/2 elementwise, so a product x @ W is off by at most sum|x| * s/2 per output
channel (tests/test_quant.py asserts exactly this bound). `scale` has q's shape with the
contracted (input) axis of size 1: slicing a layer (`w[i]`), gathering embedding rows
(`wte[tokens]`) or transposing (`w.T`) apply to q and scale alike, so a QArray moves through the
model's code like the float array it replaces. It sits inside the same `nnx.Param`, so the
quantized model is a normal model: the same graphdef functions, a params pytree whose leaves
are int8 arrays and their scales, and generation (prefill, decode, batching, beam search,
speculative decoding) needs no special case.

Where dequantization happens:
- Every weight matmul takes the QArray itself (`matmul`, `matmul_T`, called from
  `model._linear`, `GPT.head` and the cpu decode kernel): the int8 matrix is converted to the
  compute dtype inside the product and the per-output-channel scale is applied to the product's
  output, (x @ q) * s, which is x @ (s * q) up to float rounding: a B x out multiply instead of
  an in x out one. On the CPU, decode's few-row products go to the int8 kernel
  (jaxgpt/kernels/int8_matmul.cc; "products" below).
- The embedding lookup gathers the B*T int8 rows it needs and dequantizes only those
  (`wte[tokens].astype(...)`): one int8 table serves both uses, no float copy is kept.
- `astype(dtype)` of a QArray is its dequantized value s*q in that dtype. Code that casts a
  weight before using it (the training loss's head, `loss.lm_loss_sums`, and the cpu backend's
  no-cache stack, which `GPT._stack` hands float weights) therefore computes with exactly the
  quantized weights, materialised for that call; that is the no-cache forward (eval, scoring,
  the sliding-window recompute), never the per-token decode step.

Why not Qwix (google/qwix, MaxText's quantization library): see README.md, "int8 weight-only quantization". In short,
its NNX PTQ intercepts einsums whose weight operand it can trace back to an `nnx.Param` of the
calling module; our block matrices are slices of stacked (L, ...) params of a child module, fed
through `lax.scan` or the cpu kernels, so only `wte` was quantized, and its shape-based fallback
mistook a block matrix for `wpe` when block_size == n_embd.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.errors import UserError
from jaxgpt.kernels import int8 as int8_kernel

MODES = ("int8",)
BLOCK_MATRICES = ("w_qkv", "w_attn_out", "w_fc", "w_mlp_out")  # stacked (L, in, out)
_QMAX = 127  # symmetric: -128 is never used


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"], meta_fields=["kernel"])
@dataclasses.dataclass(frozen=True)
class QArray:
    """A weight stored as int8 values and float32 per-output-channel scales: W ~ scale * q.

    q: int8. scale: float32 with q's shape except the contracted (input) axis, which has size 1.
    Indexing applies to both (valid on every axis but the contracted one); `.T` swaps the two
    axes of a matrix; `astype(dtype)` is the dequantized value scale * q in dtype.
    kernel: how CPU decode multiplies it (jaxgpt/kernels/int8.py: auto | xla | kernel |
    generic). Static pytree metadata, so a model quantized for another path compiles its own
    programs instead of reusing a cached one.
    """
    q: jax.Array
    scale: jax.Array
    kernel: str = "auto"

    @property
    def shape(self) -> tuple:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    @property
    def T(self) -> "QArray":  # noqa: N802 (array convention)
        return QArray(self.q.T, self.scale.T, self.kernel)

    def __getitem__(self, idx) -> "QArray":
        if idx is Ellipsis:
            return self
        return QArray(self.q[idx], self.scale[idx], self.kernel)

    def astype(self, dtype) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def is_quantized(x) -> bool:
    return isinstance(x, QArray)


def check_mode(mode) -> None:
    """None (no quantization) or a known mode; anything else is a one-line UserError."""
    if mode is not None and mode not in MODES:
        raise UserError(f"unknown quantize mode {mode!r} (choose from: {', '.join(MODES)})")


@functools.partial(jax.jit, static_argnums=1)
def quantize(w, axis: int) -> QArray:
    """Symmetric int8 quantization of w with one scale per slice along `axis` (the contracted
    axis): s = max|w| / 127 over that axis, q = round(w / s). An all-zero channel gets s = 1."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / _QMAX, 1.0)
    q = jnp.clip(jnp.round(w / scale), -_QMAX, _QMAX).astype(jnp.int8)
    return QArray(q, scale)


def quantize_model(model, mode: str = "int8", kernel: str | None = None):
    """A copy of `model` whose block matrices and tied embedding/LM head are QArrays.

    The other parameters are shared with `model` (not copied); `model` itself is unchanged.
    Quantizing an already quantized model leaves its quantized weights as they are.
    kernel: the CPU decode product (jaxgpt/kernels/int8.py); default JAXGPT_INT8_KERNEL, auto.
    """
    check_mode(mode)
    if mode is None:
        return model
    kernel = int8_kernel.check_choice(kernel)
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        axis = _contracted_axis(path)
        if axis is not None and not isinstance(value, QArray):
            var = var.replace(dataclasses.replace(quantize(value, axis), kernel=kernel))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _contracted_axis(path) -> int | None:
    """The input axis of a parameter that is quantized, None for one that stays float."""
    names = tuple(str(p) for p in path)
    if names == ("wte",):
        return -1  # (Vp, D): the head contracts D; one scale per vocabulary row
    if len(names) == 2 and names[0] == "blocks" and names[1] in BLOCK_MATRICES:
        return -2  # (L, in, out): one scale per output column of each layer
    return None


def quantized_model(model) -> bool:
    """Whether any parameter of `model` is quantized."""
    return any(isinstance(v, QArray) for v in jax.tree.leaves(
        nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, QArray)))


# ----------------------------------------------------------------------------- products
# XLA:CPU never fuses an int8 -> float convert into a dot: it converts the whole matrix into a
# float32 temporary, then multiplies. Written plainly, (x @ q.astype(f32)) * s inside the decode
# loop is no better than float weights: XLA hoists the loop-invariant convert out of the loop, so
# every step reads float32 copies made once per decode call (no bytes saved, 4x the memory), and
# where it cannot hoist, every step reads the int8 matrix, writes a float32 copy and reads it
# back (9 bytes per weight instead of 4). What is done instead, on the CPU:
# - The int8 matrix goes through `optimization_barrier` with the activations, which makes it
#   loop-variant: the conversion stays inside the decode step, next to its product.
# - The product is taken a chunk of int8 rows at a time in a `fori_loop`: each chunk is
#   converted into a float32 buffer and multiplied at once, so memory is read once, in int8.
#   Chunks are 1 MB of int8. Measured on the GPT-2 124M shape's one-row decode products
#   (scripts/bench_int8_forms.py): 11.2 ms per step's products at 1 MB, against 17-24 ms at
#   256 KB-512 KB and 2-4 MB, and 13.5-16.7 ms for float32; at one row the decode takes the
#   (out, in) layout for int8 weights (jaxgpt/kernels/cpu_decode.py).
# - The per-output-channel scale multiplies the product's (few) outputs, not the weights.
# That is the reference path, and the fallback. On the CPU, products over 1 to CHUNK_MAX_ROWS
# rows against (out, in) int8 weights (the cpu decode backend's layout; speculative
# verification's few rows) go to jaxgpt/kernels/int8_matmul.cc instead, which widens int8 in
# registers and reads memory once at ~2x the speed of the best XLA form (each QArray's `kernel`
# field chooses; jaxgpt/kernels/int8.py). README.md ("int8 weight-only quantization") has the
# measurements. Elsewhere (GPU/TPU) the plain form is used after the barrier: their compilers
# fuse the conversion into the matmul's operand load.
CHUNK_BYTES = 1 << 20  # int8 bytes per chunk
CHUNK_MAX_ROWS = 16  # (in, out) products over more rows (prefill, scoring) convert whole matrices


def _chunked() -> bool:
    return jax.default_backend() == "cpu"


def _chunk_rows(row_bytes: int, n_rows: int) -> int:
    """Rows of q per chunk: CHUNK_BYTES of its int8 rows."""
    return max(1, min(n_rows, CHUNK_BYTES // row_bytes))


def _out_in_product(q_OxI, x_IxB, dt):
    """q (out, in) int8 @ x (in, B) -> (out, B) float32, CHUNK_BYTES of q at a time."""
    O, I = q_OxI.shape
    c = _chunk_rows(I, O)
    n = -(-O // c)

    def body(i, y_OxB):
        start = jnp.minimum(i * c, O - c)  # the last chunk overlaps the one before: same values
        qc = jax.lax.dynamic_slice_in_dim(q_OxI, start, c, 0)
        y = jnp.einsum("oi,ib->ob", qc.astype(dt), x_IxB, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(y_OxB, y, start, 0)

    return jax.lax.fori_loop(0, n, body, jnp.zeros((O, x_IxB.shape[1]), jnp.float32))


def _in_out_product(x_BxI, q_IxO, dt):
    """x (B, in) @ q (in, out) int8 -> (B, out) float32, CHUNK_BYTES of q (rows of the
    contracted axis) at a time, accumulating."""
    I, O = q_IxO.shape
    c = _chunk_rows(O, I)
    n = -(-I // c)

    def body(i, y_BxO):
        start = jnp.minimum(i * c, I - c)
        qc = jax.lax.dynamic_slice_in_dim(q_IxO, start, c, 0)
        xc = jax.lax.dynamic_slice_in_dim(x_BxI, start, c, 1)
        # The last chunk overlaps the one before: its rows already counted are zeroed in x.
        xc = jnp.where(start + jnp.arange(c) >= i * c, xc, 0)
        return y_BxO + jnp.einsum("bi,io->bo", xc, qc.astype(dt), preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, n, body, jnp.zeros((x_BxI.shape[0], O), jnp.float32))


def matmul(x_xI, w_IxO: QArray, dt, out_dtype=None):
    """x @ W for a quantized weight stored (in, out) (scale (1, out)): (x @ q) * s, accumulated
    in float32, returned in out_dtype (default: dt, the compute dtype)."""
    lead, I = x_xI.shape[:-1], x_xI.shape[-1]
    x_BxI = x_xI.reshape(-1, I).astype(dt)
    q, x_BxI = jax.lax.optimization_barrier((w_IxO.q, x_BxI))
    if _chunked() and x_BxI.shape[0] <= CHUNK_MAX_ROWS:
        y = _in_out_product(x_BxI, q, dt)
    else:
        y = jnp.einsum("bi,io->bo", x_BxI, q.astype(dt), preferred_element_type=jnp.float32)
    return (y * w_IxO.scale[0]).astype(out_dtype or dt).reshape(*lead, -1)


def matmul_T(w_OxI: QArray, x_IxB, dt, out_dtype=None):  # noqa: N802
    """W @ x for a quantized weight stored (out, in) (scale (out, 1)), activations (in, B)."""
    if _chunked() and x_IxB.shape[1] <= CHUNK_MAX_ROWS and int8_kernel.use_kernel(w_OxI.kernel):
        # jaxgpt/kernels/int8_matmul.cc: reads q once, widening it in registers (no barrier:
        # XLA has no float copy of q to hoist).
        y = int8_kernel.matmul_out_in(w_OxI.q, w_OxI.scale, x_IxB.astype(dt), w_OxI.kernel)
        return y.astype(out_dtype or dt)
    q, x_IxB = jax.lax.optimization_barrier((w_OxI.q, x_IxB.astype(dt)))
    if _chunked():
        y = _out_in_product(q, x_IxB, dt)
    else:
        y = jnp.einsum("oi,ib->ob", q.astype(dt), x_IxB, preferred_element_type=jnp.float32)
    return (y * w_OxI.scale).astype(out_dtype or dt)


def matmul_nt(x_xI, w_OxI: QArray, dt, out_dtype=None):
    """x @ W.T for a quantized weight stored (out, in) (scale (out, 1)), x (..., in): the tied
    LM head, wte (Vp, D), whose int8 table is never transposed."""
    lead, I = x_xI.shape[:-1], x_xI.shape[-1]
    x_BxI = x_xI.reshape(-1, I)
    if _chunked() and x_BxI.shape[0] <= CHUNK_MAX_ROWS:
        return matmul_T(w_OxI, x_BxI.T, dt, out_dtype).T.reshape(*lead, -1)
    q, x_BxI = jax.lax.optimization_barrier((w_OxI.q, x_BxI.astype(dt)))
    y = jnp.einsum("bi,oi->bo", x_BxI, q.astype(dt), preferred_element_type=jnp.float32)
    return (y * w_OxI.scale[:, 0]).astype(out_dtype or dt).reshape(*lead, -1)


def compute_weight(w, dt):
    """A float weight cast to the compute dtype; a quantized one as it is (it is used as int8)."""
    return w if isinstance(w, QArray) else w.astype(dt)


def transpose(w):
    """Swap the two axes of a float or quantized matrix."""
    return w.T if isinstance(w, QArray) else jnp.transpose(w)


def dequantize_all(tree: dict, dtype=jnp.float32) -> dict:
    """A dict of weights with every QArray replaced by its dequantized value (for kernels that
    take float weights; see the module docstring)."""
    return {k: (v.astype(dtype) if isinstance(v, QArray) else v) for k, v in tree.items()}


def weight_bytes(tree) -> int:
    """Bytes of every array in a pytree (e.g. the weights a decode step reads)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))
