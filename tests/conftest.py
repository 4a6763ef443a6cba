"""Tests run on 8 simulated CPU devices; the flag must be set before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compilation cache (jaxgpt/compile_cache.py) stays off in tests: an
# in-process `main()` would switch it on for the whole pytest process and write to ~/.cache.
# tests/test_compile_cache.py turns it on in subprocesses of its own.
os.environ.setdefault("JAXGPT_COMPILE_CACHE", "off")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where JAX's default backend is a GPU (scripts/device_check.sh
    runs them with JAX_PLATFORMS=cuda); elsewhere they are skipped, not failed."""
    import pytest

    if not any("gpu" in item.keywords for item in items):
        return
    import jax

    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (run by scripts/device_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
