"""parallel=mesh against one device and against pmap: layouts, shards, dropout, TP generation.

Every layout trains three steps (dropout 0) on the same global batches as a one-device
`train_step`, and must land on the same params (float32, 1e-5). Each test here fails on a
specific wrong behaviour: a dropped or doubled row (the sums differ), a silently replicated
leaf (its shard is whole), a mesh dropout key that is not pmap's (the masks differ), a
tensor-parallel qkv split across heads wrongly (the tokens differ).
"""

import dataclasses
from functools import partial

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgpt.config import Config, MeshConfig, ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.model import create_model
from jaxgpt.train import build_optimizer, init_train_state, parallel, train_step

MCFG = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
BASE = Config(model=MCFG, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=10, batch_size=16,
              dtype="float32")
B = 16


def _batch(seed):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 64, (B, MCFG.block_size + 1)).astype(np.int32)
    mask = np.ones((B, MCFG.block_size), np.float32)
    for b in range(B):  # ragged rows: a per-block mean instead of the global one would differ
        mask[b, rng.integers(1, MCFG.block_size):] = 0.0
    return {"tokens": toks, "mask": mask}


BATCHES = [_batch(s) for s in range(3)]


@pytest.fixture(scope="module")
def model0():
    model = create_model(MCFG, 0)
    return nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _config(layout: str, grad_accum: int = 1, **kw) -> Config:
    if layout == "pmap":
        return dataclasses.replace(BASE, grad_accum=grad_accum, **kw)
    sizes = parallel.parse_mesh_flag(layout, 8)
    return dataclasses.replace(BASE, grad_accum=grad_accum, parallel="mesh", mesh=MeshConfig(**sizes), **kw)


_RUNS = {}


def _train(cfg, graphdef, params, batches=BATCHES):
    """(strategy, state, metrics) after one step per batch, fed as the training loop feeds it
    (cached: the shard test reads the fsdp:8 run of the equivalence test)."""
    key = (cfg, len(batches))
    if key not in _RUNS:
        _RUNS[key] = _run(cfg, graphdef, params, batches)
    return _RUNS[key]


def _run(cfg, graphdef, params, batches):
    st = parallel.create(cfg, graphdef)
    state = st.place(init_train_state(params, build_optimizer(cfg), cfg.seed))
    for b in batches:
        lo, hi = st.rows(B)
        state, m = st.step(state, st.shard_batch(jax.tree.map(lambda x: x[lo:hi], b), B))
    return st, state, m


_REF = {}


def _reference(graphdef, params, grad_accum):
    """The one-device step on the same global batches (cached per grad_accum)."""
    if grad_accum not in _REF:
        tx = build_optimizer(BASE)
        one = jax.jit(partial(train_step, graphdef=graphdef, tx=tx, task="lm", axis_name=None))
        state = init_train_state(params, tx, BASE.seed)
        for b in BATCHES:
            state, m = one(state, jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), b))
        _REF[grad_accum] = jax.device_get((state, m))
    return _REF[grad_accum]


def _params_close(a, b, atol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


LAYOUTS = [  # pmap's equivalence is also tests/test_train.py's; the slow ones run in CI
    ("fsdp:8", 2),
    pytest.param("fsdp:4,tensor:2", 1, marks=pytest.mark.slow),
    pytest.param("pmap", 1, marks=pytest.mark.slow),
    pytest.param("data:8", 1, marks=pytest.mark.slow),
    pytest.param("data:2,fsdp:4", 1, marks=pytest.mark.slow),
    pytest.param("data:2,tensor:4", 2, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("layout,grad_accum", LAYOUTS)
def test_three_steps_equal_one_device(model0, layout, grad_accum):
    graphdef, params = model0
    st, state, m = _train(_config(layout, grad_accum), graphdef, params)
    ref_state, ref_m = _reference(graphdef, params, grad_accum)
    _params_close(st.gather(state)["params"], ref_state["params"])
    np.testing.assert_allclose(st.host(m)["loss"], float(ref_m["loss"]), rtol=1e-5)
    np.testing.assert_allclose(st.host(m)["grad_norm"], float(ref_m["grad_norm"]), rtol=1e-4)


def test_fsdp8_holds_an_eighth_of_every_param_and_moment(model0):
    graphdef, params = model0
    st, state, _ = _train(_config("fsdp:8", 2), graphdef, params)
    leaves = jax.tree_util.tree_flatten_with_path({"params": state["params"], "opt": state["opt_state"]})[0]
    checked = 0
    for path, x in leaves:
        if x.ndim == 0:  # Adam's step count
            continue
        shards = x.addressable_shards
        assert len(shards) == 8
        assert all(s.data.size * 8 == x.size for s in shards), \
            f"{jax.tree_util.keystr(path)} {x.shape}: shards {[s.data.shape for s in shards][:2]}"
        assert len({str(s.index) for s in shards}) == 8, jax.tree_util.keystr(path)  # 8 distinct pieces
        checked += 1
    n_params = len(jax.tree.leaves(params))
    assert checked == 3 * n_params  # the params, Adam's mu and nu


@pytest.mark.slow
def test_mesh_dropout_draws_pmaps_masks(model0):
    """With as many row blocks as pmap has devices, mesh training with dropout equals pmap's
    (grad_accum=2: each micro-step's rows must also be pmap's, or their masks differ)."""
    graphdef, params = model0
    drop = dataclasses.replace(MCFG, dropout=0.1)
    graphdef = nnx.graphdef(create_model(drop, 0))
    runs = {}
    for layout in ("pmap", "data:2,fsdp:4"):
        cfg = dataclasses.replace(_config(layout, grad_accum=2), model=drop)
        st, state, m = _train(cfg, graphdef, params, BATCHES[:2])
        runs[layout] = (st.gather(state)["params"], st.host(m)["loss"])
    _params_close(runs["data:2,fsdp:4"][0], runs["pmap"][0])
    np.testing.assert_allclose(runs["data:2,fsdp:4"][1], runs["pmap"][1], rtol=1e-5)


def test_tensor_parallel_generation_gives_the_unsharded_tokens():
    from jaxgpt.generation import generate

    rng = np.random.default_rng(0)
    model = create_model(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32), 0)
    state = nnx.state(model, nnx.Param)
    # large random matrices: varied greedy continuations, not one repeated token
    pure = jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.standard_normal(x.shape) * 0.3).astype(np.float32)
        if str(path[-1].key).startswith("w") else np.asarray(x), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [40]]
    ref = generate(model, prompts, 20, temperature=0.0)
    assert all(len(set(r)) > 3 for r in ref), ref
    mesh = parallel.make_mesh(parallel.parse_mesh_flag("tensor:4", 8))
    sharded = jax.tree.map(jax.device_put, pure, parallel.model_shardings(mesh, model))
    nnx.replace_by_pure_dict(state, sharded)
    nnx.update(model, state)
    assert model.blocks.w_qkv[...].addressable_shards[0].data.shape == (2, 32, 24)
    assert generate(model, prompts, 20, temperature=0.0) == ref


@pytest.mark.parametrize("flag,needle", [
    ("tensor", "expected axis:size"),
    ("pipeline:2", "expected axis:size"),
    ("tensor:x", "not an integer"),
    ("tensor:16", "needs 16 devices"),
    ("tensor:0", ">= 1 or -1"),
    ("data:-1,fsdp:-1", "only one mesh axis"),
    ("fsdp:3,tensor:-1", "multiple of 3"),
])
def test_mesh_flag_errors_are_one_line(flag, needle):
    with pytest.raises(UserError) as e:
        parallel.parse_mesh_flag(flag, 8)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_layouts_the_model_cannot_take_are_one_line_errors(model0):
    graphdef, _ = model0
    for layout, needle in (("data:1,tensor:8", "must divide model.n_head=4"),
                           ("data:2,fsdp:4", "is not divisible by mesh.data x mesh.fsdp (8)"),
                           ("data:3,fsdp:1", "there are 8 devices")):
        cfg = _config(layout) if ":3" not in layout else dataclasses.replace(
            BASE, parallel="mesh", mesh=MeshConfig(data=3, fsdp=1, tensor=1))
        if "not divisible" in needle:
            cfg = dataclasses.replace(cfg, batch_size=12)
        with pytest.raises(UserError) as e:
            parallel.create(cfg, graphdef)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_an_fsdp8_checkpoint_restores_on_any_layout(model0, tmp_path, capsys):
    """Saved from 8-way FSDP; restored straight into 1 device, 4 devices, pmap and tensor
    parallelism (each leaf lands in the target sharding), with every value identical."""
    from jaxgpt import checkpoint as ckpt
    from jaxgpt.cli import main
    from jaxgpt.train import start

    graphdef, params = model0
    st, state, _ = _train(_config("fsdp:8", 2), graphdef, params)
    g = st.gather(state)
    saved = jax.device_get(g)
    out = str(tmp_path / "run")
    writer = ckpt.CheckpointWriter(out, keep=5)
    writer.save(3, g["params"], {"opt_state": start.flatten_opt(g["opt_state"]), "step": g["step"],
                                 "rng": g["rng"]},
                {"tokenizer": "byte", "config": st.cfg.to_dict(), "data_meta": {}})
    writer.close()

    targets = {
        "1 device": parallel.MeshStrategy(_config("data:1"), graphdef, devices=jax.devices()[:1]),
        "4 devices": parallel.MeshStrategy(_config("fsdp:4"), graphdef, devices=jax.devices()[:4]),
        "pmap": parallel.create(_config("pmap"), graphdef),
        "tensor parallel": parallel.create(_config("fsdp:2,tensor:4"), graphdef),
    }
    for name, target in targets.items():
        restored = start._restore(ckpt.Resume(out), target)
        want = target.state_shardings(target.abstract_state())
        for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
            assert x.sharding == s, name  # read straight into the target layout
        back = jax.device_get(target.gather(target.place(restored)))
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(back)[0], jax.tree.leaves(saved)):
            np.testing.assert_array_equal(x, y, err_msg=f"{name} {jax.tree_util.keystr(path)}")

    # eval and generate read it on one device; generate also with tensor-parallel weights
    model, _, _ = ckpt.load_model(out)
    for x, y in zip(jax.tree.leaves(ckpt.model_params(model)), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(np.asarray(x), y)
    argv = ["generate", "--ckpt", out, "--prompt", "\x05\x10 ", "--temperature", "0", "--max-new-tokens", "6", "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--mesh", "tensor:2"]) == 0
    assert capsys.readouterr().out.split('"seconds"')[0] == plain.split('"seconds"')[0]
