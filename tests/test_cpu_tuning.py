"""_cpu_tuning changes glibc malloc only when jax's default backend will be the CPU: predicted
from JAX_PLATFORMS and from which accelerator plugins and devices are present, since asking jax
would start it."""

import os
import sys

import pytest

from jaxgpt import _cpu_tuning as ct

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


@pytest.mark.parametrize("env, plugins, devices, want", [
    ({}, set(), set(), True),                                  # a CPU-only machine
    ({}, {"cuda"}, {"cuda"}, False),                           # a GPU host, JAX_PLATFORMS unset
    ({}, {"tpu"}, {"tpu"}, False),                             # a TPU VM
    ({}, {"rocm"}, {"rocm"}, False),
    ({}, {"cuda"}, set(), True),                               # jax[cuda] on a box with no GPU
    ({}, set(), {"cuda"}, True),                               # a GPU but CPU-only jax
    ({}, {"other"}, set(), False),                             # a plugin we cannot place
    ({"JAX_PLATFORMS": "cuda"}, set(), set(), False),
    ({"JAX_PLATFORMS": "cpu"}, {"cuda"}, {"cuda"}, True),      # cpu asked for on a GPU host
    ({"JAX_PLATFORMS": "cuda,cpu"}, {"cuda"}, {"cuda"}, False),  # the first one is the default
    ({"JAX_PLATFORMS": "CPU,cuda"}, {"cuda"}, {"cuda"}, True),
    ({"JAX_PLATFORMS": "cuda,cpu", "JAX_PLATFORM_NAME": "cpu"}, {"cuda"}, {"cuda"}, True),
    ({"JAXGPT_NO_CPU_TUNING": "1"}, set(), set(), False),      # the opt-outs still hold
    ({"MALLOC_ARENA_MAX": "4"}, set(), set(), False),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, set(), set(), False),
])
def test_decide(env, plugins, devices, want):
    ok, why = ct.decide(env, plugins, devices)
    assert ok is want, why


def _dist(root, name):
    os.makedirs(os.path.join(root, name))


@pytest.mark.parametrize("entries, want", [
    (["numpy-2.4.6.dist-info", "jax-0.11.2.dist-info", "jaxlib-0.11.2.dist-info"], set()),
    (["jax_cuda13_plugin-0.11.2.dist-info", "jax_cuda13_pjrt-0.11.2.dist-info"], {"cuda"}),
    (["jax_cuda12_plugin-0.10.2.dist-info"], {"cuda"}),
    (["jax_rocm7_pjrt-0.10.2.dist-info"], {"rocm"}),
    (["libtpu-0.0.51.dist-info"], {"tpu"}),
    (["jax_plugins/xla_cuda13", "jax_plugins/__pycache__"], {"cuda"}),
    (["jax_plugins/some_vendor"], {"other"}),
])
def test_installed_plugins_reads_dist_names(tmp_path, monkeypatch, entries, want):
    for e in entries:
        _dist(str(tmp_path), e)
    monkeypatch.setattr(ct.sys, "path", [str(tmp_path), str(tmp_path / "missing")])
    assert ct.installed_plugins() == want


def test_present_devices(tmp_path, monkeypatch):
    (tmp_path / "nvidia0").touch()
    monkeypatch.setattr(ct, "_DEVICE_GLOBS", {"cuda": (str(tmp_path / "nvidia[0-9]*"),),
                                              "tpu": (str(tmp_path / "accel[0-9]*"),)})
    pci = tmp_path / "pci" / "0000:00:04.0"
    pci.mkdir(parents=True)
    (pci / "vendor").write_text("0x8086\n")
    monkeypatch.setattr(ct, "_PCI_VENDORS", str(tmp_path / "pci" / "*" / "vendor"))
    assert ct.present_devices() == {"cuda"}
    (pci / "vendor").write_text("0x1ae0\n")  # a Google (TPU) PCI device
    assert ct.present_devices() == {"cuda", "tpu"}


def test_tune_malloc_skips_on_a_gpu_host_with_jax_platforms_unset(monkeypatch):
    """The case the old rule got wrong: JAX_PLATFORMS unset on a GPU host applied the tuning."""
    for v in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "JAXGPT_NO_CPU_TUNING", *ct._USER_MALLOC_VARS):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(ct, "installed_plugins", lambda: {"cuda"})
    monkeypatch.setattr(ct, "present_devices", lambda: {"cuda"})
    monkeypatch.setattr(ct, "applied", {})
    assert ct.tune_malloc() is False
    assert "cuda" in ct.applied["reason"] and "malloc" not in ct.applied
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the same host, CPU asked for: applied
    assert ct.tune_malloc() is True and ct.applied["malloc"] is True
