"""The benchmark scripts measure what they claim to (no timing here: figures come from runs)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_matmul  # noqa: E402
import bench_train  # noqa: E402


@pytest.mark.parametrize("name", sorted(bench_train.CONFIGS))
def test_bench_matmul_lists_every_product_of_a_training_step(name):
    # Forward, input gradient and weight gradient of every weight matrix: 6 N P FLOPs for the
    # P block weights (+ the tied head when the vocabulary is real), nothing more, nothing less.
    spec = bench_train.CONFIGS[name]
    N = spec["batch_size"] * spec["block_size"]
    D, L, V = spec["n_embd"], spec["n_layer"], spec["vocab_size"]
    block_weights = L * (D * 3 * D + D * D + D * 4 * D + 4 * D * D)
    expected = 6 * N * (block_weights + (D * V if V >= 1024 else 0))
    rows = bench_matmul.products(spec)
    assert sum(2 * r["M"] * r["K"] * r["N"] * r["count"] for r in rows) == expected
    # each product appears once per shape and orientation, so the summary's weights are exact
    assert len({(r["kind"], r["M"], r["K"], r["N"]) for r in rows}) == len(rows)
