"""jaxgpt: a GPT in JAX/Flax NNX — pmapped training, Orbax checkpoints, cached batched generation.

Public API:
    model, tokenizer = jaxgpt.load(ckpt_dir, step=None, dtype=None, quantize=None, mesh=None)
    model, tokenizer = jaxgpt.load_hf(hf_dir)
    jaxgpt.generate(model, prompts, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
                    min_p=None, repetition_penalty=None, eos_id=None, seed=0, stream=False)
    jaxgpt.logits(model, tokens_2d)           # full forward, (B, T, vocab)
    jaxgpt.prefill(...), jaxgpt.decode(...)   # the two jitted generation building blocks
"""

from jaxgpt import _cpu_tuning  # noqa: F401  (process-wide CPU tuning, before jax starts)

__version__ = "0.1.0"

from jaxgpt.generation import decode, generate, logits, prefill  # noqa: E402


def load(ckpt_dir: str, step: int | None = None, dtype: str | None = None,
         quantize: str | None = None, mesh=None):
    """Restore a checkpoint's params with its stored config: returns (model, tokenizer).

    dtype: compute dtype to serve in ("auto", "float32", "bfloat16"; default the run's), e.g. a
    float32 checkpoint served in bfloat16 with a bfloat16 KV cache. Params stay float32.
    quantize: None, or "int8" for int8 weight-only serving (per-output-channel scales on every
    block matrix and the LM head; see jaxgpt/quant.py). The checkpoint on disk is unchanged.
    mesh: serve sharded weights: "tensor:2" (axis:size pairs over data, fsdp, tensor; see
    `generate --mesh`) or a jax.sharding.Mesh with some of those axes. Each param is restored
    straight into its sharding (jaxgpt/train/parallel.py's rules); generation then runs on them.
    """
    from jaxgpt.checkpoint import load_model
    from jaxgpt.quant import check_mode, quantize_model
    from jaxgpt.tokenizer import get_tokenizer

    check_mode(quantize)  # before the (slow) restore
    if mesh is not None:
        from jaxgpt.train.parallel import as_mesh
        mesh = as_mesh(mesh)
    model, _cfg, meta = load_model(ckpt_dir, step, dtype=dtype, mesh=mesh)
    return quantize_model(model, quantize), get_tokenizer(meta["tokenizer"])


def load_hf(hf_dir: str):
    """Load a Hugging Face GPT-2 folder (config.json + model.safetensors): (model, tokenizer)."""
    from jaxgpt.hf import load_hf as _load_hf

    return _load_hf(hf_dir)


__all__ = ["load", "load_hf", "generate", "logits", "prefill", "decode", "__version__"]
