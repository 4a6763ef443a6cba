"""Forms of the one-row int8 weight product on XLA:CPU, against float32: which one reads int8
fastest, and the int8 kernel (jaxgpt/kernels/int8_matmul.cc) beside them. One JSON line per form.

    PYTHONPATH=. python scripts/bench_int8_forms.py            # the GPT-2 124M shape
    PYTHONPATH=. python scripts/bench_int8_forms.py --quick    # 2 small layers, a smoke run

Each form runs the chain of one decode step's weight products at one activation row: 12 layers
x (qkv, attention proj, fc, mlp proj), then the tied head (vocab x D),
every product feeding the next. Weights are stored (out, in) (the layout of the `cpu` backend's
one-row int8 decode), int8 with a float32 scale per output channel; each layer has its own
arrays, as `decode_weights` gives the decode. The float32 row is the baseline the int8 forms
must beat; each int8 row also reports its largest error against it, relative to the output's
scale (int8 rounding only: every form computes the same chain).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import quant
from jaxgpt.kernels import int8 as int8_kernel

SHAPES = {"124m": (12, 768, 50304), "quick": (2, 128, 1024)}  # layers, D, vocab


def _parts(q_OxI, x_I, parts, chunk_bytes, reduce):
    """q @ x as `parts` independent row ranges, each a fori_loop over chunk_bytes of int8 rows.
    reduce: "dot" (convert the chunk, dot it) or "mul" (convert, multiply, sum over `in`)."""
    O, I = q_OxI.shape
    outs = []
    for p in range(parts):
        lo, hi = O * p // parts, O * (p + 1) // parts
        qp = q_OxI[lo:hi]
        c = max(1, min(hi - lo, chunk_bytes // I))
        n = -(-(hi - lo) // c)

        def body(i, y, qp=qp, c=c, rows=hi - lo):
            start = jnp.minimum(i * c, rows - c)
            qc = jax.lax.dynamic_slice_in_dim(qp, start, c, 0).astype(jnp.float32)
            if reduce == "dot":
                yc = (qc @ x_I[:, None])[:, 0]
            else:
                yc = (qc * x_I).sum(-1)
            return jax.lax.dynamic_update_slice_in_dim(y, yc, start, 0)

        outs.append(jax.lax.fori_loop(0, n, body, jnp.zeros((hi - lo,), jnp.float32)))
    return jnp.concatenate(outs)


def product(form, w, x_I):
    """One (out, in) product at one row, in the given form. w: float32 array or QArray."""
    if form == "float32":  # as the `cpu` backend's decode: (out, in) @ (in, 1), not a matvec
        return (w @ x_I[:, None])[:, 0]
    if form == "int8_kernel":  # jaxgpt/kernels/int8_matmul.cc, what the cpu decode calls
        return int8_kernel.matmul_out_in(w.q, w.scale, x_I[:, None])[:, 0]
    q, x_I = jax.lax.optimization_barrier((w.q, x_I))  # keep the conversion inside the step
    s = w.scale[:, 0]
    if form == "int8_quant_py":  # what jaxgpt/quant.py does without the kernel
        return quant._out_in_product(q, x_I[:, None], jnp.float32)[:, 0] * s
    if form == "int8_bf16_chunks":  # quant.py's form converting to bfloat16, a bfloat16 dot
        y = quant._out_in_product(q, x_I[:, None].astype(jnp.bfloat16), jnp.bfloat16)
        return y[:, 0] * s
    if form == "int8_plain":
        return (q.astype(jnp.float32) @ x_I[:, None])[:, 0] * s
    name, parts, chunk, reduce = FORMS[form]
    return _parts(q, x_I, parts, chunk, reduce) * s


# form -> (name, independent parts, int8 bytes per chunk, reduce)
FORMS = {
    "int8_halves": ("halves", 2, 1 << 16, "dot"),
    "int8_quarters": ("quarters", 4, 1 << 16, "dot"),
    "int8_multiply_reduce": ("mul", 1, 1 << 16, "mul"),
    "int8_256KB_chunks": ("256KB", 1, 1 << 18, "dot"),
    "int8_512KB_chunks": ("512KB", 1, 1 << 19, "dot"),
    "int8_1MB_chunks": ("1MB", 1, 1 << 20, "dot"),  # = quant.CHUNK_BYTES, a check of the bench
    "int8_2MB_chunks": ("2MB", 1, 1 << 21, "dot"),
    "int8_4MB_chunks": ("4MB", 1, 1 << 22, "dot"),
    "int8_halves_1MB": ("halves", 2, 1 << 20, "dot"),
}
ORDER = ["float32", "int8_kernel", "int8_quant_py", "int8_bf16_chunks", "int8_plain", *FORMS]


def chain(form, layers, head, x_D):
    def layer(x, w):
        qkv, proj, fc, mproj = w
        D = x.shape[0]
        # every output of every product is used (a slice would let XLA skip rows of a dot)
        h = product(form, qkv, x).reshape(3, D).sum(0)
        h = product(form, proj, h)
        f = jax.nn.gelu(product(form, fc, h))
        return x + product(form, mproj, f) + h * 1e-3, None

    # One array per layer, as the decode reads them (`decode_weights`): a slice of a stacked
    # (L, out, in) weight inside the step would be copied before each product on XLA:CPU.
    x = x_D
    for w in zip(*layers):
        x, _ = layer(x, w)
    return product(form, head, x)


def weights(n_layer, D, V, key):
    ks = jax.random.split(key, 5)
    shapes = [(3 * D, D), (D, D), (4 * D, D), (D, 4 * D)]  # (out, in)
    layers = [[jax.random.normal(jax.random.fold_in(k, i), s, jnp.float32) * 0.02 for i in range(n_layer)]
              for k, s in zip(ks, shapes)]
    head = jax.random.normal(ks[4], (V, D), jnp.float32) * 0.02
    return layers, head


def quantized(w):
    """(..., out, in) float32 -> QArray with a scale per output channel."""
    return quant.quantize(w, axis=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per form (best is kept)")
    ap.add_argument("--forms", nargs="+", default=ORDER, choices=ORDER)
    args = ap.parse_args()
    n_layer, D, V = SHAPES["quick" if args.quick else "124m"]
    layers_f, head_f = weights(n_layer, D, V, jax.random.key(0))
    layers_q, head_q = [[quantized(w) for w in ws] for ws in layers_f], quantized(head_f)
    x = jax.random.normal(jax.random.key(1), (D,), jnp.float32)
    ref = None
    for form in args.forms:
        f32 = form.startswith("float32")
        layers, head = (layers_f, head_f) if f32 else (layers_q, head_q)
        fn = jax.jit(lambda ls, h, x, form=form: chain(form, ls, h, x))
        y = jax.block_until_ready(fn(layers, head, x))
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(layers, head, x))
            best = min(best, time.perf_counter() - t)
        nbytes = sum(int(np.prod(w.shape)) for w in [*sum(layers_f, []), head_f]) * (4 if f32 else 1)
        row = {"form": form, "ms": round(best * 1e3, 2), "weight_mb": round(nbytes / 1e6, 1),
               "gb_s": round(nbytes / best / 1e9, 1), "layers": n_layer, "n_embd": D, "vocab": V,
               "load_avg_1m": round(os.getloadavg()[0], 2)}
        if form == "float32":
            ref = np.asarray(y)
        elif ref is not None:
            # every product form must compute the same chain (int8 rounding apart)
            row["max_rel_err_vs_float32"] = float(np.abs(np.asarray(y) - ref).max() / np.abs(ref).max())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
