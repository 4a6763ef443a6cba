"""Generation: jitted prefill + `lax.scan` decode over a KV cache, sampling, and the host API.

    engine.py    prefill, init_decode_state, decode, decode_weights, DecodeState, bucketing
    sampling.py  per-row filters and draws
    api.py       generate(), logits()
    speculative.py  exact speculative decoding with a draft model (generate(draft=...))
"""

from jaxgpt.generation.api import generate, logits  # noqa: F401
from jaxgpt.generation.engine import (DEFAULT_CHUNK, PAD, STATS, DecodeState, batch_bucket,  # noqa: F401
                                      bucket, decode, decode_weights, init_decode_state, prefill)
from jaxgpt.generation.speculative import SpeculativeStats  # noqa: F401
