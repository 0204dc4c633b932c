"""Multi-host runs through `jax.distributed`: one mesh over the devices of every process.

Every process runs the same engine (multi-controller JAX: each process dispatches the same compiled programs on
its own devices). The scheduler, page manager and sampler inputs are deterministic functions of the requests and
of the sampled ids, which come back replicated on every device, so processes that receive the same requests at
the same steps take identical decisions and feed identical host inputs to every program; nothing per step has to
travel between hosts except the collectives inside the programs. Offline (`LLM.generate`) every process runs the
same script with the same prompts; for the server, process 0 forwards what it receives (`jaxpaged.server`'s
follower channel). A process that dies makes a collective or the coordination service's heartbeat fail in the
others, which then exit with an error (`HEARTBEAT_SECONDS`), never hang.

The group comes from `EngineArgs` (`coordinator_address`, `num_processes`, `process_id`; `jaxpaged serve
--coordinator-address H:P --num-processes N --process-id I`) or from the environment (`JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). On CPU the collectives use gloo.
"""

import logging
import os

import jax

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10  # a process silent this long is declared dead and the others stop


def group_from(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> tuple[str, int, int] | None:
    """(coordinator address, number of processes, this process's id) from the arguments, else the environment;
    None for a single process. ValueError names what is missing or out of range."""
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if count is None or count == 1:
        return None
    if address is None or index is None:
        raise ValueError(f"num_processes={count} needs coordinator_address (host:port of process 0) and "
                         "process_id (JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID in the environment)")
    if not 0 <= index < count:
        raise ValueError(f"process_id must be in [0, {count - 1}] for num_processes={count}, got {index}")
    return address, count, index


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def initialize(group: tuple[str, int, int] | None) -> None:
    """Joins the process group (once per process; blocks until every process has joined)."""
    if group is None or jax.distributed.is_initialized():
        return
    address, count, index = group
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, count, index, heartbeat_timeout_seconds=HEARTBEAT_SECONDS)
    logger.info("Process %d of %d (coordinator %s): %d local of %d devices.", index, count, address,
                jax.local_device_count(), jax.device_count())


def check_mesh(tensor_parallel_size: int) -> None:
    """With several processes the mesh must hold every device (each process drives only its own)."""
    if jax.process_count() > 1 and tensor_parallel_size != jax.device_count():
        raise ValueError(f"with {jax.process_count()} processes the model must span all {jax.device_count()} "
                         f"devices: use tensor_parallel_size={jax.device_count()}, got {tensor_parallel_size}")


def peer_failure(error: Exception) -> RuntimeError:
    """The error a step raises when a collective with another process failed."""
    return RuntimeError(f"process {jax.process_index()} of {jax.process_count()}: a step's collective with the "
                        f"other processes failed; another process probably died or left ({error})")
