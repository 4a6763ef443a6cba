"""Two ways to spread a training step over devices, behind one interface; the sharding rules.

    strategy = parallel.create(cfg, graphdef)         # PmapStrategy or MeshStrategy
    state = strategy.place(state)                      # fresh, initialised or restored state
    batch = strategy.shard_batch(rows, train=True)     # this process's rows of a global batch
    state, metrics = strategy.step(state, batch)       # one optimizer step (state donated)
    sums = strategy.evaluate(state["params"], batch)   # eval sums over the global batch
    state_to_save = strategy.gather(state)             # global jax.Arrays, for Orbax

The training loop calls only these (plus `rows`, `restore_target` and `host`), so it never
knows which strategy runs.

- **pmap** (`parallel=pmap`, the default): today's replicated data parallelism. The state has a
  leading local-device axis; the step is `jax.pmap(train_step)` with named-axis `psum`s.
- **mesh** (`parallel=mesh`): `jax.jit` over a `Mesh` with the axes (data, fsdp, tensor). The
  state is one global array per leaf, sharded by `RULES`; the batch is split over
  data x fsdp; XLA inserts the collectives the shardings imply.

The rules table (`RULES`) is the one place logical axis names meet mesh axes. Parameters carry
their logical names (jaxgpt/model.py); so do the model's main activations.
- FSDP (ZeRO-3): every weight shards its `embed` dim (the residual width, present in every
  matrix) over `fsdp`, and so do the LayerNorm vectors (`norm`) and the biases; every
  parameter and optimizer leaf is 1/fsdp per device (the step counter aside). Adam's moments
  follow their parameter, and gradients are reduce-scattered into the same layout. XLA
  all-gathers a layer's weights inside the layer scan, when that layer runs.
- Tensor parallel (Megatron): `qkv` and `mlp` (the outputs of w_qkv and w_fc) are column-
  parallel and `heads` (the input of w_attn_out) and `mlp` (the input of w_mlp_out) row-
  parallel, all over `tensor`; inside a block q, k, v are sharded by heads and the MLP hidden by
  its width. The embedding, tied to the LM head, is sharded over `vocab` on `tensor`: the head's
  logits come out split by vocabulary and the loss's log-sum-exp is one all-reduce (an
  embed-sharded head would instead all-reduce the whole logits).
- The fused qkv projection: w_qkv is (D, 3D) with columns q | k | v, so its contiguous `tensor`
  split does not line up with heads (with tensor=2, device 0 holds q and half of k). The
  activations are what is constrained: q, k and v are each sharded by heads, so device t
  attends with heads [tH/n, (t+1)H/n) of all three, the pairing attention needs, and XLA
  gathers the weight's columns for that (as FSDP gathers weights): the projection's memory is
  split like every other weight, its compute by heads. Hence n_head % tensor == 0 (checked).
- The batch: the global batch of each micro-step is split into data x fsdp row blocks, block j
  holding the rows pmap's device j would hold; the loss is computed per block under `vmap`
  with spmd_axis_name=(data, fsdp) (train_step's `row_blocks`), so each block's dropout key is
  pmap's (fold_in(step_key, j)), each block's chunked loss walks its own tokens, and the
  activations' batch axis is the vmapped one. With as many blocks as pmap has devices, mesh
  training draws the same dropout masks as pmap, and a one-device mesh runs pmap's program.

Checkpoints hold global arrays either way (pmap's replicas are re-viewed as one replicated
array), so a checkpoint written under any layout restores under any other: `restore_target`
gives Orbax the target shardings and each process reads only its own shards.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxgpt.config import Config, MeshConfig
from jaxgpt.errors import UserError
from jaxgpt.model import activation_sharding, logical_axes
from jaxgpt.train.step import AXIS, build_optimizer, eval_step, init_train_state, train_step

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over

# Logical axis name -> the mesh axes that split it, in order of preference. Within one array
# each mesh axis is used once: every dim first takes its first axis, then dims take their
# further axes where still unused and dividing (so a bias, whose only dim is `qkv` or `mlp`,
# is split over tensor and fsdp; in a weight, fsdp already splits `embed`). Parameters first,
# then the activations the model names (jaxgpt/model.py `_constrain`).
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embed", ("fsdp",)),             # the residual width: FSDP's dim in every matrix
    ("norm", ("fsdp",)),              # LayerNorm scales/biases, the width-sized biases
    ("vocab", ("tensor",)),           # the tied embedding / LM head, split by vocabulary
    ("qkv", ("tensor", "fsdp")),      # w_qkv's output (column-parallel)
    ("heads", ("tensor",)),           # w_attn_out's input (row-parallel)
    ("mlp", ("tensor", "fsdp")),      # w_fc's output (column-), w_mlp_out's input (row-parallel)
    ("positions", ()),
    ("layers", ()),                   # the stacked-layer axis: scanned, never split
    ("classes", ()),
    ("act_batch", ()),                # rows of one batch block (the blocks are the vmapped axis)
    ("act_seq", ()),
    ("act_embed", ()),                # the residual stream is whole on every device
    ("act_heads", ("tensor",)),
    ("act_kv", ()),
    ("act_mlp", ("tensor",)),
)
_RULES = dict(RULES)


def _rule(name: str) -> tuple[str, ...]:
    if name not in _RULES:
        raise ValueError(f"no sharding rule for logical axis {name!r} (add it to RULES)")
    return _RULES[name]


def spec_for(names, shape=None, mesh: Mesh | None = None) -> P:
    """The PartitionSpec of an array whose dims have these logical names (see RULES). With
    shape and mesh, a dim whose first mesh axis does not divide it is a ValueError, and the
    further axes are taken only where they divide (axes the mesh lacks are skipped)."""
    rules = [_rule(n) for n in names]
    if mesh is not None:  # a serving mesh may lack some axes: they are size 1
        rules = [tuple(a for a in r if a in mesh.shape) for r in rules]
    used: set[str] = set()
    dims: list[list[str]] = [[] for _ in names]
    for rank in range(max((len(r) for r in rules), default=0)):
        for d, r in enumerate(rules):
            if rank >= len(r) or r[rank] in used:
                continue
            axis = r[rank]
            if shape is not None:
                split = math.prod(mesh.shape[a] for a in dims[d]) * mesh.shape[axis]
                if shape[d] % split:
                    if rank == 0:
                        raise ValueError(f"dim {d} ({names[d]}, size {shape[d]}) is not divisible "
                                         f"by mesh axis {axis} (size {mesh.shape[axis]})")
                    continue
            dims[d].append(axis)
            used.add(axis)
    return P(*(None if not x else x[0] if len(x) == 1 else tuple(x) for x in dims))


def param_shardings(mesh: Mesh, axes: dict, shapes: dict) -> dict:
    """NamedSharding per parameter (nested dicts shaped like the params); a dim its mesh axis
    does not divide is a one-line UserError naming the parameter."""
    def one(path, names, shape):
        try:
            return NamedSharding(mesh, spec_for(names, shape, mesh))
        except ValueError as e:
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise UserError(f"cannot shard parameter {name}: {e}; choose mesh sizes that divide "
                            "the model's widths") from None
    return jax.tree_util.tree_map_with_path(
        one, axes, shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x))


# ---------------------------------------------------------------- meshes
def make_mesh(sizes: dict, devices=None) -> Mesh:
    """A Mesh with the axes (data, fsdp, tensor) of these sizes over `devices` (default: the
    first data x fsdp x tensor of all devices).

    Axis types are Auto (shardings propagate; constraints steer). jax.make_mesh orders the
    devices for the topology (on one host or CPU: process-major, so a process's devices are
    contiguous rows of the batch)."""
    shape = tuple(sizes[a] for a in MESH_AXES)
    devices = list(jax.devices()[:math.prod(shape)] if devices is None else devices)
    if math.prod(shape) != len(devices):
        raise UserError(f"a mesh of {' x '.join(map(str, shape))} needs {math.prod(shape)} devices, "
                        f"got {len(devices)}")
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    except Exception:  # topology-aware placement can refuse unusual shapes: plain order then
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def parse_mesh_flag(text: str, n_devices: int) -> dict:
    """`--mesh tensor:2` or `data:1,fsdp:1,tensor:8` -> axis sizes. Unnamed axes are 1; one
    axis may be -1 (the rest of the devices). Without -1 the mesh may use fewer devices than
    there are (the first ones)."""
    raw = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition(":")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise UserError(f"--mesh {text!r}: expected axis:size pairs over {', '.join(MESH_AXES)} "
                            "(e.g. tensor:2 or data:1,fsdp:2,tensor:4)")
        try:
            raw[name] = int(value)
        except ValueError:
            raise UserError(f"--mesh {text!r}: {value.strip()!r} is not an integer size") from None
    if not raw:
        raise UserError("--mesh needs at least one axis:size, e.g. tensor:2")
    sizes = {a: raw.get(a, 1) for a in MESH_AXES}
    if -1 in sizes.values():
        return MeshConfig(**sizes).sizes(n_devices)
    MeshConfig(**sizes).sizes(math.prod(sizes.values()))  # the >= 1 checks
    if math.prod(sizes.values()) > n_devices:
        raise UserError(f"--mesh {text!r} needs {math.prod(sizes.values())} devices, there are {n_devices}")
    return sizes


def as_mesh(mesh) -> Mesh:
    """A serving mesh from a `--mesh` string (e.g. "tensor:2") or a Mesh whose axes are among
    data, fsdp and tensor."""
    if isinstance(mesh, str):
        return make_mesh(parse_mesh_flag(mesh, jax.device_count()))
    if not isinstance(mesh, Mesh) or not set(mesh.axis_names) <= set(MESH_AXES):
        raise UserError(f"mesh must be a string like 'tensor:2' or a jax.sharding.Mesh with axes "
                        f"among {', '.join(MESH_AXES)}, got {mesh!r}")
    return mesh


def check_model(mesh_sizes: dict, model_cfg) -> None:
    """What a layout needs of the model, as one-line errors (the per-parameter check in
    `param_shardings` catches anything else)."""
    t, f = mesh_sizes["tensor"], mesh_sizes["fsdp"]
    if model_cfg.n_head % t:
        raise UserError(f"mesh.tensor={t} must divide model.n_head={model_cfg.n_head} "
                        "(tensor parallelism splits attention by heads)")
    if model_cfg.n_embd % f:
        raise UserError(f"mesh.fsdp={f} must divide model.n_embd={model_cfg.n_embd} "
                        "(FSDP splits every weight along the embedding width)")


def check_layout(cfg: Config, n_devices: int, model: bool = True) -> int:
    """The row blocks a global batch is split into (pmap: the devices; mesh: data x fsdp), after
    the checks a mesh layout needs of the batch (and of the model), as one-line UserErrors."""
    if cfg.parallel != "mesh":
        return n_devices
    sizes = cfg.mesh.sizes(n_devices)
    if model:
        check_model(sizes, cfg.model)
    blocks = sizes["data"] * sizes["fsdp"]
    per = blocks * cfg.grad_accum
    if cfg.batch_size % per:
        raise UserError(f"batch_size={cfg.batch_size} is not divisible by mesh.data x mesh.fsdp "
                        f"({blocks}) x grad_accum ({cfg.grad_accum}) = {per}; try batch_size in "
                        f"{[per * k for k in range(1, 5)]}")
    return blocks


def model_shardings(mesh: Mesh, model) -> dict:
    """Target shardings of a model's params (jaxgpt.load(..., mesh=...))."""
    shapes = jax.tree.map(lambda v: tuple(v.shape), _pure_params(model))
    return param_shardings(mesh, logical_axes(model), shapes)


def _pure_params(model) -> dict:
    from flax import nnx
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _resolver(mesh: Mesh):
    def resolve(x, names):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(names)))
    return resolve


# ---------------------------------------------------------------- the interface
class Strategy:
    """What the training loop needs of a parallel layout (see the module docstring)."""

    name: str
    n_blocks: int  # row blocks of a global batch: pmap's devices, or the mesh's data x fsdp

    def __init__(self, cfg: Config, graphdef):
        self.cfg, self.graphdef = cfg, graphdef
        self.tx = build_optimizer(cfg)

    def describe(self) -> str:
        raise NotImplementedError

    def rows(self, n: int) -> tuple[int, int]:
        """[lo, hi): the rows of a global batch of n rows that this process builds."""
        raise NotImplementedError

    def shard_batch(self, rows: dict, n: int, train: bool = True):
        """This process's rows (`rows(n)`) of a global batch of n rows -> the step's input:
        for a step, micro-step i holds of every row block j its i-th slice (pmap's device j's
        micro-batch i); for an eval, the rows as they are."""
        raise NotImplementedError

    def place(self, state: dict) -> dict:
        """A state (host arrays, or the global arrays of `restore_target`) -> the step's layout."""
        raise NotImplementedError

    def init(self, params_fn) -> dict:
        """A fresh state (`init_train_state` of `params_fn()`) in the step's layout."""
        raise NotImplementedError

    def step(self, state: dict, batch) -> tuple[dict, dict]:
        """One optimizer step; `state` is donated."""
        raise NotImplementedError

    def evaluate(self, params, batch) -> dict:
        """{"loss_sum", "count", ...} summed over the global eval batch (device scalars)."""
        raise NotImplementedError

    def gather(self, state: dict) -> dict:
        """The state as global jax.Arrays for a checkpoint (each process passes its shards)."""
        raise NotImplementedError

    def state_shardings(self, abstract_state: dict) -> dict:
        """The global shardings `gather` returns and `restore_target` restores into."""
        raise NotImplementedError

    def params_for_sampling(self, state: dict):
        raise NotImplementedError

    def abstract_state(self) -> dict:
        """The train state's shapes and dtypes (nothing allocated)."""
        from flax import nnx

        from jaxgpt.model import abstract_model
        model = abstract_model(self.cfg.model, self.cfg.dtype, "xla", self.cfg.remat)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return jax.eval_shape(lambda p: init_train_state(p, self.tx, self.cfg.seed), params)

    def restore_target(self, abstract_state: dict) -> dict:
        """ShapeDtypeStructs with the target shardings: Orbax reads each shard straight onto
        its device (then `place`)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state, self.state_shardings(abstract_state))

    def host(self, tree) -> dict:
        """Replicated scalars (metrics, eval sums) as host numpy: one replica's value."""
        return jax.device_get(jax.tree.map(
            lambda x: np.asarray(x.addressable_data(0)).reshape(-1)[0], tree))


def create(cfg: Config, graphdef) -> Strategy:
    """The strategy `cfg.parallel` names, over every device of every process."""
    return (MeshStrategy if cfg.parallel == "mesh" else PmapStrategy)(cfg, graphdef)


def compile_key(cfg: Config) -> Config:
    """The part of the config a compiled step depends on (the rest is host-side bookkeeping),
    so runs in one process (tests) share compilations."""
    return dataclasses.replace(
        cfg, data="", out="", init_from="", max_steps=cfg.total_decay_steps, decay_steps=0,
        log_interval=1, eval_interval=1, eval_steps=1, save_interval=1, async_save=False, keep=1,
        resume="auto", tensorboard=False, wandb=False, early_stop_patience=0,
        nan_policy="stop", nan_max_skips=1,  # FAULTS: host-side, like the rest
        distributed="off", coordinator="", num_processes=0, process_id=-1)


# ---------------------------------------------------------------- pmap
class PmapStrategy(Strategy):
    """Replicated data parallelism: every state leaf has a leading local-device axis."""

    name = "pmap"

    def __init__(self, cfg: Config, graphdef):
        super().__init__(cfg, graphdef)
        self.devices = jax.local_devices()
        self.n_local, self.n_blocks = len(self.devices), jax.device_count()
        cfg.validate(self.n_blocks)  # batch_size divisible by devices x grad_accum
        self.local = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), P(AXIS))
        # the state's global view for checkpoints: one array replicated over every device
        self.replicated = NamedSharding(Mesh(np.array(jax.devices()), ("replica",)), P())
        self._step, self._eval = _pmapped(graphdef, compile_key(cfg))

    def describe(self) -> str:
        return f"pmap over {self.n_blocks} devices"

    def rows(self, n: int) -> tuple[int, int]:
        per = n // jax.process_count()
        return jax.process_index() * per, (jax.process_index() + 1) * per

    def shard_batch(self, rows: dict, n: int, train: bool = True):
        accum = self.cfg.grad_accum if train else 1

        def f(x):
            x = np.asarray(x)
            x = x.reshape(self.n_local, accum, x.shape[0] // (self.n_local * accum), *x.shape[1:])
            return x if train else x[:, 0]
        return jax.device_put(jax.tree.map(f, rows), self.local)

    def place(self, state: dict) -> dict:
        # exactly pmap's output layout, so the second step does not recompile
        return jax.tree.map(self._stack_replicas, state)

    def init(self, params_fn) -> dict:
        # One jitted program, not nnx's eager init op by op: every eager op is a small compile
        # of its own (a 4 x 128 model on a 2-core CPU: 2.5-3.6 s eager, 1.8 s jitted with its
        # compile, which the compile cache then saves). The random bits do not depend on jit;
        # the float transform into normals may differ from eager's in the last bit (measured:
        # <= 7.5e-9 on weights of ~0.1), and is the same program the mesh strategy runs.
        return self.place(jax.jit(lambda: init_train_state(params_fn(), self.tx, self.cfg.seed))())

    def _stack_replicas(self, x):
        shape = (self.n_local, *np.shape(x))
        if isinstance(x, jax.Array) and x.is_fully_replicated and \
                set(self.devices) <= {s.device for s in x.addressable_shards}:
            on = {s.device: s.data for s in x.addressable_shards}  # a restore: device to device
            parts = [on[d].reshape(1, *shape[1:]) for d in self.devices]
        else:
            host = np.asarray(x).reshape(1, *shape[1:])
            parts = [jax.device_put(host, d) for d in self.devices]
        return jax.make_array_from_single_device_arrays(shape, self.local, parts)

    def step(self, state, batch):
        return self._step(state, batch)

    def evaluate(self, params, batch) -> dict:
        return self._eval(params, batch)

    def gather(self, state: dict) -> dict:
        """The replicas re-viewed as one replicated global array per leaf, device to device:
        Orbax writes each array once (the replica on process 0)."""
        def one(x):
            on = {s.device: s.data for s in x.addressable_shards}
            parts = [on[d].reshape(x.shape[1:]) for d in self.devices]
            return jax.make_array_from_single_device_arrays(x.shape[1:], self.replicated, parts)
        return jax.tree.map(one, state)

    def state_shardings(self, abstract_state: dict) -> dict:
        return jax.tree.map(lambda _: self.replicated, abstract_state)

    def params_for_sampling(self, state: dict):
        return jax.tree.map(lambda x: x.addressable_data(0)[0], state["params"])


@functools.lru_cache(maxsize=8)
def _pmapped(graphdef, cfg: Config):
    tx = build_optimizer(cfg)
    p_step = jax.pmap(partial(train_step, graphdef=graphdef, tx=tx, task=cfg.task),
                      axis_name=AXIS, donate_argnums=(0,))
    p_eval = jax.pmap(partial(eval_step, graphdef=graphdef, task=cfg.task), axis_name=AXIS)
    return p_step, p_eval


# ---------------------------------------------------------------- mesh
class MeshStrategy(Strategy):
    """jit over a (data, fsdp, tensor) mesh; the state sharded by RULES."""

    name = "mesh"

    def __init__(self, cfg: Config, graphdef, devices=None):
        super().__init__(cfg, graphdef)
        devices = jax.devices() if devices is None else devices
        self.n_blocks = check_layout(cfg, len(devices))
        self.sizes = cfg.mesh.sizes(len(devices))
        self.mesh = make_mesh(self.sizes, devices)
        self.replicated = NamedSharding(self.mesh, P())
        self.train_rows = NamedSharding(self.mesh, P(None, BATCH_AXES))  # (grad_accum, rows, ...)
        self.eval_rows = NamedSharding(self.mesh, P(BATCH_AXES))  # (rows, ...)
        self.shardings = self.state_shardings(self.abstract_state())
        self._step, self._eval = _jitted(graphdef, compile_key(cfg), self.mesh, _Hashable(self.shardings),
                                         self.n_blocks)

    def describe(self) -> str:
        return "mesh " + " x ".join(f"{a}:{self.sizes[a]}" for a in MESH_AXES)

    def rows(self, n: int) -> tuple[int, int]:
        per = n // self.n_blocks
        starts = sorted({idx[0].start or 0 for idx in
                         self.eval_rows.addressable_devices_indices_map((n,)).values()})
        lo, hi = starts[0], starts[-1] + per
        return (lo, hi) if hi - lo == per * len(starts) else (0, n)  # contiguous on make_mesh's order

    def shard_batch(self, rows: dict, n: int, train: bool = True):
        lo, hi = self.rows(n)
        accum = self.cfg.grad_accum if train else 1
        per = n // self.n_blocks

        def f(x):
            x = np.asarray(x)
            if not train:
                return _from_local(x, lo, (n, *x.shape[1:]), self.eval_rows, axis=0)
            local = x.reshape(-1, accum, per // accum, *x.shape[1:]).swapaxes(0, 1)
            local = local.reshape(accum, -1, *x.shape[1:])
            return _from_local(local, lo // accum, (accum, n // accum, *x.shape[1:]), self.train_rows, axis=1)
        return jax.tree.map(f, rows)

    def state_shardings(self, abstract_state: dict) -> dict:
        from jaxgpt.model import abstract_model
        model = abstract_model(self.cfg.model, self.cfg.dtype, "xla", self.cfg.remat)
        shapes = jax.tree.map(lambda a: tuple(a.shape), abstract_state["params"])
        params = param_shardings(self.mesh, logical_axes(model), shapes)
        opt = _like_params(abstract_state["opt_state"], abstract_state["params"], params, self.replicated)
        return {"params": params, "opt_state": opt, "step": self.replicated, "rng": self.replicated}

    def place(self, state: dict) -> dict:
        return jax.tree.map(_put, state, self.shardings)

    def init(self, params_fn) -> dict:
        """Computed where it lives: one jit whose outputs have the state's shardings, so a
        model that fits only sharded is never whole on one device (the random bits do not
        depend on jit or sharding, and the program is pmap's jitted init)."""
        return jax.jit(lambda: init_train_state(params_fn(), self.tx, self.cfg.seed),
                       out_shardings=self.shardings)()

    def step(self, state, batch):
        return self._step(state, batch)

    def evaluate(self, params, batch) -> dict:
        return self._eval(params, batch)

    def gather(self, state: dict) -> dict:
        return state  # global arrays already: each process hands Orbax its own shards

    def params_for_sampling(self, state: dict):
        return state["params"]


def _put(x, sharding):
    """x placed with `sharding` (a new array), without a host copy when x is on devices."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        # a copy first: device_put may hand device 0's shard x's own buffer (even with
        # may_alias=False, jax 0.10), and the step donates it
        return jax.device_put(jnp.array(x, copy=True), sharding)
    host = np.asarray(x)  # host data (a fresh run, init_from): every process holds all of it
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _from_local(local: np.ndarray, offset: int, global_shape, sharding, axis: int):
    """A global array from this process's slab of it along `axis`, which starts at `offset`."""
    def piece(idx):
        idx = list(idx)
        sl = idx[axis]
        idx[axis] = slice((sl.start or 0) - offset,
                          (global_shape[axis] if sl.stop is None else sl.stop) - offset)
        return local[tuple(idx)]
    return jax.make_array_from_callback(global_shape, sharding, piece)


def _like_params(abstract_opt, abstract_params, param_sh: dict, replicated):
    """Each optimizer-state leaf sharded like the parameter it mirrors (Adam's mu and nu: the
    trailing dict keys of its path name a parameter of the same shape); the rest (step counts)
    replicated."""
    by_path = {}
    for path, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        keys = tuple(k.key for k in path)
        by_path[keys] = (a.shape, _get(param_sh, keys))

    def one(path, leaf):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        hit = by_path.get(tuple(keys))
        return hit[1] if hit is not None and hit[0] == leaf.shape else replicated
    return jax.tree_util.tree_map_with_path(one, abstract_opt)


def _get(tree: dict, keys: tuple):
    for k in keys:
        tree = tree[k]
    return tree


class _Hashable:
    """A sharding pytree as an lru_cache key."""

    def __init__(self, tree):
        self.tree = tree
        leaves, treedef = jax.tree.flatten(tree)
        self._key = (treedef, tuple(leaves))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self._key == other._key


@functools.lru_cache(maxsize=8)
def _jitted(graphdef, cfg: Config, mesh: Mesh, shardings: _Hashable, n_blocks: int):
    """The jitted (train step, eval) of one mesh layout; the model's activation names are
    resolved through RULES while they are traced."""
    tx = build_optimizer(cfg)
    resolve = _resolver(mesh)
    replicated = NamedSharding(mesh, P())
    state_sh = shardings.tree

    def step(state, batch):
        with activation_sharding(resolve):
            return train_step(state, batch, graphdef=graphdef, tx=tx, task=cfg.task, axis_name=None,
                              row_blocks=(n_blocks, BATCH_AXES))

    def evaluate(params, batch):
        with activation_sharding(resolve):
            return _blocked_eval(params, batch, graphdef, cfg.task, n_blocks)

    jstep = jax.jit(step, in_shardings=(state_sh, NamedSharding(mesh, P(None, BATCH_AXES))),
                    out_shardings=(state_sh, replicated), donate_argnums=(0,))
    jeval = jax.jit(evaluate, in_shardings=(state_sh["params"], NamedSharding(mesh, P(BATCH_AXES))),
                    out_shardings=replicated)
    return jstep, jeval


def _blocked_eval(params, batch, graphdef, task: str, n_blocks: int):
    """eval_step's sums over the global batch, computed per row block as pmap's devices do."""
    def one(block):
        out = eval_step(params, block, graphdef=graphdef, task=task, axis_name=None)
        return {k: v for k, v in out.items() if k != "pred"}
    if n_blocks == 1:
        return one(batch)
    blocks = jax.tree.map(lambda x: x.reshape(n_blocks, x.shape[0] // n_blocks, *x.shape[1:]), batch)
    return jax.tree.map(jnp.sum, jax.vmap(one, spmd_axis_name=BATCH_AXES)(blocks))
