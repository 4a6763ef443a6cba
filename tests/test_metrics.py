"""The MFU peak: a table keyed by the exact device kind JAX reports, dense spec-sheet numbers per
dtype, None for an accelerator not in the table, a labelled measured matmul on CPU, and the
global device count. No accelerator is needed: fake device kinds go into the pure look-ups."""

import dataclasses

import jax
import pytest

from jaxgpt import metrics
from jaxgpt.metrics import CPU_SOURCE, mfu_peak, normalize_kind, resolve_dtype, spec_peak

T = 1e12


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    device_kind: str
    platform: str = "gpu"


def test_a100_and_a10_are_different_chips():
    """"A10" is a substring of "A100": each must get its own peak, not the other's."""
    for kind in ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB",
                 "NVIDIA A100 80GB PCIe"):
        assert spec_peak(kind, "bfloat16") == 312 * T, kind
        assert spec_peak(kind, "float32") == 156 * T, kind  # TF32
    assert spec_peak("NVIDIA A10", "bfloat16") == 125 * T
    assert spec_peak("NVIDIA A10", "float32") == 62.5 * T
    # near misses are other chips, not these: AWS's A10G, a MIG slice of an A100
    assert spec_peak("NVIDIA A10G", "bfloat16") is None
    assert spec_peak("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "bfloat16") is None


def test_hopper_parts_differ():
    for dt in ("bfloat16", "float32"):
        assert spec_peak("NVIDIA H100 PCIe", dt) < spec_peak("NVIDIA H100 80GB HBM3", dt)
        assert spec_peak("NVIDIA H200 NVL", dt) < spec_peak("NVIDIA H200", dt)
    assert spec_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4 * T  # SXM5
    assert spec_peak("NVIDIA H100 80GB HBM3", "float32") == 494.7 * T
    assert spec_peak("NVIDIA H100 PCIe", "bfloat16") == 756.5 * T
    assert spec_peak("NVIDIA H100 PCIe", "float32") == 378 * T
    assert spec_peak("NVIDIA H100 NVL", "bfloat16") == 835.5 * T
    assert spec_peak("NVIDIA H200", "bfloat16") == 989.4 * T  # H100 SXM's compute
    assert spec_peak("NVIDIA H200", "float32") == 494.7 * T
    assert spec_peak("NVIDIA H200 NVL", "bfloat16") == 835.5 * T


def test_ada_l4_and_l40s_differ():
    """"L4" is a substring of "L40S"."""
    assert spec_peak("NVIDIA L4", "bfloat16") == 121 * T
    assert spec_peak("NVIDIA L4", "float32") == 60 * T
    assert spec_peak("NVIDIA L40S", "bfloat16") == 362.05 * T
    assert spec_peak("NVIDIA L40S", "float32") == 183 * T


def test_v100_has_no_tf32_or_bf16_tensor_cores():
    for kind in ("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB"):
        assert spec_peak(kind, "float32") == 15.7 * T  # plain FP32, not a TF32 figure
        assert spec_peak(kind, "bfloat16") == 15.7 * T  # XLA upcasts bf16 dots on Volta
    assert spec_peak("Tesla V100-PCIE-16GB", "float32") == 14 * T


@pytest.mark.parametrize("kind, tflops", [
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5", 459), ("TPU v5p", 459),
    ("TPU v6 lite", 918), ("TPU v6e", 918)])
def test_tpus(kind, tflops):
    # float32 matmuls run as a bf16 MXU pass at the default precision: the same peak
    assert spec_peak(kind, "bfloat16") == spec_peak(kind, "float32") == tflops * T


def test_kind_normalisation_is_exact_not_substring():
    assert normalize_kind("NVIDIA A100-SXM4-80GB") == normalize_kind(" nvidia  a100_sxm4 80gb ")
    assert spec_peak("nvidia a100 sxm4 80gb", "bf16") == 312 * T
    assert spec_peak("tpu V5 LITE", "bfloat16") == 197 * T
    assert spec_peak("NVIDIA H100", "bfloat16") is None  # not a kind JAX reports: no guess
    assert spec_peak("TPU v5 lite pod", "bfloat16") is None


def test_every_listed_kind_is_unique_and_dense():
    seen = {}
    for spec in metrics._SPECS:
        assert spec.source and spec.bf16 >= spec.f32 > 0, spec.name
        for k in spec.kinds:
            assert normalize_kind(k) not in seen, (k, seen.get(normalize_kind(k)))
            seen[normalize_kind(k)] = spec.name


def test_dtype_auto_follows_the_backend():
    assert resolve_dtype("auto", "gpu") == resolve_dtype("auto", "tpu") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto") == "float32"  # this suite runs on CPU
    with pytest.raises(ValueError):
        resolve_dtype("int8")


def test_mfu_peak_is_the_global_total():
    """Multi-host: every device of every host counts (jax.devices(), not jax.local_devices())."""
    devs = [FakeDevice("NVIDIA H100 80GB HBM3")] * 16
    p = mfu_peak("auto", devs)  # auto -> bfloat16 on GPU
    assert p.flops == pytest.approx(16 * 989.4 * T) and p.n_devices == 16
    assert p.per_device == pytest.approx(989.4 * T) and p.dtype == "bfloat16"
    assert p.source == "spec:NVIDIA H100 80GB HBM3"
    assert mfu_peak("float32", [FakeDevice("TPU v4", "tpu")] * 8).flops == pytest.approx(8 * 275 * T)


def test_unknown_accelerator_reports_no_peak():
    assert mfu_peak("bfloat16", [FakeDevice("NVIDIA GeForce RTX 4090")]) is None
    assert mfu_peak("bfloat16", [FakeDevice("AMD Instinct MI300X")]) is None
    assert mfu_peak("bfloat16", [FakeDevice("TPU7x", "tpu")]) is None
    # one unknown device among known ones: no total either
    assert mfu_peak("bfloat16", [FakeDevice("NVIDIA A100-SXM4-80GB"), FakeDevice("NVIDIA A10G")]) is None
    assert metrics.device_peak("bfloat16", FakeDevice("NVIDIA A10G")) is None


def test_cpu_peak_is_a_labelled_measurement_not_multiplied_by_simulated_devices():
    assert jax.local_device_count() == 8  # conftest: 8 simulated CPU devices share the cores
    p = mfu_peak("auto")
    assert p.source == CPU_SOURCE == "measured-matmul (CPU)"
    assert p.dtype == "float32" and p.n_devices == jax.process_count() == 1
    assert 1e8 < p.flops == p.per_device < 1e14  # a real measurement of a 2048^2 matmul
    assert "measured-matmul (CPU)" in p.describe()
    assert metrics.device_peak("float32") == (p.per_device, CPU_SOURCE)
    assert metrics.peak_flops("float32") == p.per_device  # the old interface, same meaning


def test_loss_png_is_redrawn_at_most_every_30_s_and_always_at_the_end(tmp_path, monkeypatch):
    drawn = []
    from matplotlib.figure import Figure
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(1), real(self, *a, **k)))
    clock = [1000.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    log = metrics.MetricsLogger(str(tmp_path), 0, {}, tensorboard=False, wandb=False)
    log.log({"step": 1, "train_loss": 3.0})
    log.plot()
    assert len(drawn) == 1 and (tmp_path / "loss.png").exists()
    log.log({"step": 2, "train_loss": 2.5, "val_loss": 2.7})
    clock[0] += 29.0
    log.plot()
    assert len(drawn) == 1  # too soon
    clock[0] += 2.0
    log.plot()
    assert len(drawn) == 2
    log.plot(final=True)
    assert len(drawn) == 2  # nothing new since the last drawing
    log.log({"step": 3, "train_loss": 2.2})
    log.plot(final=True)
    assert len(drawn) == 3  # the end of a run always draws what is new
