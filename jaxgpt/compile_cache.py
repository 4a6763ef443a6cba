"""JAX's persistent compilation cache for the command line: a program compiled once on this
machine is loaded from disk by later runs instead of being compiled again.

Every `jaxgpt` run compiles the same programs as the run before it (the init, the train and
eval steps, prefill and decode): on nanoGPT's CPU recipe that is ~11 s of a ~2-minute run,
and most of the time of a short `jaxgpt generate`. MaxText turns the same cache on by default;
so does the CLI here (library calls leave JAX's settings alone).

    JAXGPT_COMPILE_CACHE=auto   (default) $XDG_CACHE_HOME/jaxgpt/xla, else ~/.cache/jaxgpt/xla
    JAXGPT_COMPILE_CACHE=/path  that folder
    JAXGPT_COMPILE_CACHE=off    no cache

JAX's own JAX_COMPILATION_CACHE_DIR (and JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS), when set,
wins. The cache is keyed by the program, the jax
and XLA versions, the backend and its flags, so a stale entry is never used; it is capped at
MAX_BYTES (least recently used entries go first). A folder that cannot be created or written
costs the cache, never the run: JAX then only warns.
"""

from __future__ import annotations

import os

from jaxgpt.errors import UserError

ENV = "JAXGPT_COMPILE_CACHE"
MAX_BYTES = 2 << 30
# Programs that compile faster than this are not written: reading an entry back costs a few
# ms, and eager ops compile in about that.
MIN_COMPILE_S = 0.1


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxgpt", "xla")


def resolve(value: str | None) -> str | None:
    """The cache folder a JAXGPT_COMPILE_CACHE value names (None: off); a one-line UserError
    for a path that exists and is not a folder."""
    v = (value or "auto").strip()
    if v.lower() in ("off", "none", "0", "false", "no"):
        return None
    path = default_dir() if v.lower() == "auto" else os.path.abspath(os.path.expanduser(v))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{ENV}={value}: {path} is not a folder (name a folder, or off)")
    return path


def enable(value: str | None = None) -> str | None:
    """Turn the cache on for this process from `value` (default: the JAXGPT_COMPILE_CACHE
    environment variable); returns the folder in use, or None. Call before the first compile."""
    import jax

    path = resolve(os.environ.get(ENV) if value is None else value)
    if jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR: the user's own choice
        return jax.config.jax_compilation_cache_dir
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # e.g. a read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own setting wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    try:  # JAX caps the folder's size only with filelock (a dependency of ours); without it,
        import filelock  # noqa: F401  # a cap makes every read warn and nothing is written
    except ImportError:
        return path
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
