"""CPU runtime settings for the whole process, applied once on `import jaxgpt` (before jax starts).

glibc malloc. XLA:CPU allocates each execution's temporaries as one block (hundreds of MB for a
training step) and frees it at the end. glibc serves a block above its mmap threshold with a
fresh mmap(), and a thread other than the main one from an arena capped at 64 MB, so such blocks
are always mmap()ed: every step page-faults its whole working set back in. Measured on the
6-layer 384-wide benchmark config: 240k minor faults and ~0.7 s of kernel time per step, none
after this change. One arena and high mmap/trim thresholds keep freed blocks in the heap for
the next step; the price is that the process keeps its peak heap instead of returning it.
Applied after jax has started its threads it still helps (the thresholds are global), less.

Applied only when jax's default backend will be the CPU. This runs before jax starts, and asking
jax would start it, so the backend is predicted the way jax picks it:
- JAX_PLATFORMS set: its first platform is the default one (jax's documented rule), unless the
  older JAX_PLATFORM_NAME names another. The tuning applies iff that is `cpu`: JAX_PLATFORMS=cpu
  applies even on a GPU host, JAX_PLATFORMS=cuda or tpu,cpu skips.
- Unset: jax prefers an accelerator whenever one can start. That needs both an accelerator plugin
  installed (a `jax-cudaNN-plugin`/`-pjrt`, `jax-rocmNN-plugin`/`-pjrt`, `libtpu` distribution,
  or any module in the `jax_plugins` namespace) and its devices present (/dev/nvidia<N>,
  /dev/nvidiactl or WSL's /dev/dxg for CUDA, /dev/kfd for ROCm, /dev/accel<N> or a Google PCI
  device for TPU: what jax itself checks before starting those backends). Both present:
  skipped. A plugin with no device (jax[cuda] on a CPU box, where jax falls back to the CPU) or
  a device with no plugin: applied. A `jax_plugins` module of no known family is assumed to
  start: skipped.
`decide()` returns the decision and its reason; `applied["reason"]` records it.

Also skipped when the user already tunes malloc (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES set), when JAXGPT_NO_CPU_TUNING=1, and off glibc
(Linux with glibc only). XLA flags: none is set here. The ones tried for training
on XLA:CPU (disabling YNNPACK fusions, oneDNN, XNNPACK dot fusions) measured within noise of the
defaults once the training step itself stopped wasting work; see scripts/bench_train.py and
scripts/bench_matmul.py.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8
_USER_MALLOC_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                     "GLIBC_TUNABLES")
# Distribution names (normalised: lowercase, "_" and "." as "-") of jax's accelerator plugins.
_PLUGIN_DIST = re.compile(r"^(?:jax-(cuda|rocm)\d*-(?:plugin|pjrt)|(libtpu)(?:-nightly)?)$")
# Device nodes per family: the ones jax itself checks before it starts a backend
# (jax/_src/hardware_utils.py), plus /dev/accel<N> for TPUs; TPUs are also found on the PCI bus.
_DEVICE_GLOBS = {"cuda": ("/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/dxg"),
                 "rocm": ("/dev/kfd", "/dev/dxg"), "tpu": ("/dev/accel[0-9]*",)}
_PCI_VENDORS = "/sys/bus/pci/devices/*/vendor"
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips, as jax detects them

applied: dict = {}  # what was changed and why, for diagnostics


def installed_plugins() -> set[str]:
    """Accelerator families ("cuda", "rocm", "tpu") with a jax plugin installed on sys.path.

    Reads directory names only (*.dist-info / *.egg-info, the jax_plugins namespace): no package
    metadata is parsed and nothing is imported, so it costs well under a millisecond."""
    found: set[str] = set()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                dist = re.sub(r"[-_.]+", "-", name.rsplit(".", 1)[0].split("-", 1)[0]).lower()
                m = _PLUGIN_DIST.match(dist)
                if m:
                    found.add(m.group(1) or "tpu")
            elif name == "jax_plugins" and os.path.isdir(os.path.join(entry or ".", name)):
                for sub in os.listdir(os.path.join(entry or ".", name)):
                    low = sub.lower()
                    if low.startswith(("_", ".")):
                        continue
                    fam = next((f for f in ("cuda", "rocm", "tpu") if f in low), "other")
                    found.add(fam)
    return found


def present_devices() -> set[str]:
    """Accelerator families whose devices this machine shows (device nodes, TPU PCI ids)."""
    found = {fam for fam, pats in _DEVICE_GLOBS.items() if any(glob.glob(p) for p in pats)}
    if "tpu" not in found:
        for path in glob.glob(_PCI_VENDORS):
            try:
                with open(path) as f:
                    if f.read().strip() == _GOOGLE_PCI_VENDOR:
                        found.add("tpu")
                        break
            except OSError:
                continue
    return found


def decide(environ=None, plugins=None, devices=None) -> tuple[bool, str]:
    """(apply?, reason): whether jax's default backend will be the CPU, as described above.

    `plugins` and `devices` default to what `installed_plugins()` and `present_devices()` find;
    tests pass them in."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return False, "not Linux"
    if env.get("JAXGPT_NO_CPU_TUNING") == "1":
        return False, "JAXGPT_NO_CPU_TUNING=1"
    user = [v for v in _USER_MALLOC_VARS if v in env]
    if user:
        return False, f"malloc already tuned by the user ({user[0]})"
    name = env.get("JAX_PLATFORM_NAME", "").strip().lower()  # jax lets it pick the default
    if name:
        return name == "cpu", f"JAX_PLATFORM_NAME={name}: default backend {name}"
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        first = platforms.split(",")[0].strip()
        return first == "cpu", f"JAX_PLATFORMS={platforms}: default backend {first}"
    plugins = installed_plugins() if plugins is None else set(plugins)
    devices = present_devices() if devices is None else set(devices)
    usable = sorted(plugins & (devices | {"other"}))  # a plugin we cannot place: assume it runs
    if usable:
        return False, f"default backend {usable[0]}: plugin installed and device present"
    if plugins:
        return True, f"default backend cpu: {'/'.join(sorted(plugins))} plugin but no device"
    return True, "default backend cpu: no accelerator plugin installed"


def tune_malloc() -> bool:
    """Set the glibc malloc options described above; True if they were applied."""
    ok, why = decide()
    applied["reason"] = why
    if not ok:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        applied["reason"] = "not glibc"
        return False
    # -1 is SIZE_MAX for the size_t thresholds: a GPT-2 124M step's temporaries exceed 2 GiB,
    # the largest positive int mallopt takes. M_MMAP_MAX=0 keeps even those in the heap.
    ok = all(mallopt(opt, val) == 1 for opt, val in (
        (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, -1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    applied["malloc"] = ok
    return ok


tune_malloc()
