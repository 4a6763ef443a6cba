"""Multi-process start-up: `distributed=auto|on|off` and `jax.distributed.initialize()`.

One command per host starts a multi-host run; this module decides whether that command is one
process of a cluster and joins it, before anything else touches JAX (initialize must come
before the first device query):

- `off`: never initialise; the run uses this process's devices only.
- `auto` (the default): initialise when a cluster environment is detected: the coordinator
  variable `JAX_COORDINATOR_ADDRESS`, a SLURM step with several tasks (`srun`), Open MPI with
  several ranks (`mpirun`), or a multi-worker TPU pod slice (`TPU_WORKER_HOSTNAMES`, or JAX's
  own Cloud TPU detection). Nothing detected: a single process, as before.
- `on`: always initialise. The keys `coordinator=HOST:PORT num_processes=N process_id=I` give
  the topology; what they leave unset comes from JAX's environment variables and cluster
  detection (SLURM, Open MPI, TPU pods, Kubernetes), and failing that is a one-line error.

A process that cannot reach the coordinator (or a coordinator whose peers never arrive) exits
with status 2 after `TIMEOUT_S` seconds and a one-line error naming the address, instead of
hanging (or of JAX's own abort, a C++ stack trace). `JAXGPT_DISTRIBUTED_TIMEOUT` (seconds)
changes it. On CPU, cross-process collectives need gloo,
which is selected before initialising.
"""

from __future__ import annotations

import os
import threading

from jaxgpt.errors import UserError

TIMEOUT_S = 120  # initialize's connection timeout: every process must have joined by then
ENV_TIMEOUT = "JAXGPT_DISTRIBUTED_TIMEOUT"


def timeout_s() -> int:
    raw = os.environ.get(ENV_TIMEOUT, "")
    if not raw:
        return TIMEOUT_S
    try:
        value = int(raw)
        if value < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"{ENV_TIMEOUT}={raw!r} must be a whole number of seconds >= 1") from None
    return value


def detect_cluster(environ=None) -> str | None:
    """The multi-process environment this process runs in, or None (one process)."""
    env = os.environ if environ is None else environ

    def count(name):
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and count("SLURM_NTASKS") > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env or "OMPI_MCA_ess_base_jobid" in env:
        if count("OMPI_COMM_WORLD_SIZE") > 1:
            return "Open MPI"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "TPU pod"
    if environ is None and _jax_sees_tpu_pod():
        return "TPU pod"
    return None


def _jax_sees_tpu_pod() -> bool:
    """JAX's own Cloud TPU VM detection (a metadata query, only on a TPU VM)."""
    try:
        from jax._src import clusters
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
        if not running_in_cloud_tpu_vm:
            return False
        for env in clusters.ClusterEnv._cluster_types:
            if "Tpu" in env.__name__ and env.is_env_present():
                return env.get_process_count() > 1
    except Exception:  # a private API that moved: the explicit variables above still work
        return False
    return False


def initialize(cfg) -> bool:
    """Join the cluster as `cfg.distributed` says; True when this is a multi-process run.
    Must run before anything queries JAX's devices."""
    import jax

    mode = cfg.distributed
    if mode == "off":
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    found = detect_cluster()
    if mode == "auto" and found is None:
        return False
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        raise UserError(f"distributed={mode}: JAX was already in use in this process, so it cannot "
                        "join a cluster; start a fresh process")
    address = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise UserError(f"coordinator={address!r} must be HOST:PORT")
    seconds = timeout_s()
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # an option a later jax may have renamed: only CPU collectives need it
        pass
    # JAX's client aborts the process (a C++ fatal error and a stack trace) when the coordinator
    # does not answer in time, or its peers never join; Python cannot catch that. So a watchdog
    # fires first, at `seconds`, with one line, and JAX's own timeout is set later than ours.
    where = address or "the coordinator"
    joined = threading.Event()
    threading.Thread(target=_watchdog, args=(joined, seconds, where, found), daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=cfg.num_processes or None,
            process_id=None if cfg.process_id < 0 else cfg.process_id,
            initialization_timeout=seconds + 30)
    except (ValueError, TypeError) as e:  # topology incomplete or inconsistent
        raise UserError(f"distributed={mode}: {_first_line(e)}; give coordinator=HOST:PORT "
                        "num_processes=N process_id=I, or run under SLURM, Open MPI or a TPU pod") from None
    except Exception as e:
        raise UserError(f"could not join the cluster through {where}: {type(e).__name__}: "
                        f"{_first_line(e)}") from None
    finally:
        joined.set()
    return jax.process_count() > 1


def _watchdog(joined: threading.Event, seconds: int, where: str, found: str | None) -> None:
    if joined.wait(seconds):
        return
    os.write(2, (f"error: could not join the cluster through {where} within {seconds} s: the "
                 "coordinator (process 0) did not answer, or not every process joined; check that "
                 "all processes were started with the same coordinator, num_processes and distinct "
                 f"process ids, and that the port is reachable (cluster: {found or 'the keys given'}; "
                 f"{ENV_TIMEOUT} sets the timeout)\n").encode())
    os._exit(2)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else "")[:200]
