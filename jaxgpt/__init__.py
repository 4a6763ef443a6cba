"""jaxgpt: a GPT in JAX/Flax NNX — pmapped training, Orbax checkpoints, cached batched generation."""

__version__ = "0.1.0"


def load(ckpt_dir: str, step: int | None = None):
    """Restore a checkpoint's params with its stored config: returns (model, tokenizer)."""
    from jaxgpt.checkpoint import load_model
    from jaxgpt.tokenizer import get_tokenizer

    model, _cfg, meta = load_model(ckpt_dir, step)
    return model, get_tokenizer(meta["tokenizer"])
