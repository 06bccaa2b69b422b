"""Data parallelism over devices and hosts with `jax.sharding`: one mesh axis named 'batch'.

Batches are split over the mesh's 'batch' axis; params, masks, batch statistics and optimizer
state are replicated on every device. The jitted step is the single-device one: given these
input shardings, XLA's SPMD partitioner runs each device on its share of the batch and inserts
the all-reduce of the gradient (and of batch-norm statistics), so a step on D devices computes
the same global-batch step as one device, up to floating-point summation order.

Multi-host: call `initialize()` before any other JAX call. Every process runs the same program;
each transfers only its own rows of every batch (`local_rows`). Saving replicated state with
`lottery.checkpoints.save` is a collective: every process calls it and orbax writes each array
once, from process 0. Plain files (JSON, metrics) are written only where `is_main_process()`.

Units: `devices` is a device count (int, or the string 'all' or '4'), never a fraction.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any

BATCH_AXIS = "batch"


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip().isdigit():
        raise ValueError(f"${name}={raw!r}: expected a non-negative integer (set "
                         f"JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID together)")
    return int(raw)


def launch_kind(env=None) -> str | None:
    """Which multi-process launch the environment describes: 'env' (JAX_COORDINATOR_ADDRESS),
    'slurm' (srun with more than one task), 'mpi' (mpirun with more than one rank), or None."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    if env.get("SLURM_STEP_NODELIST") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    if env.get("OMPI_MCA_orte_hnp_uri") and int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    return None


def initialize() -> bool:
    """Join the multi-process JAX job the environment describes (a no-op for a single process).

    Must run before any other JAX call. With JAX_COORDINATOR_ADDRESS set ('host:port' of
    process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID are required; under SLURM (`srun`, more than
    one task) or Open MPI, JAX reads everything from the scheduler's variables. Returns True if
    this process is part of a multi-process job.
    """
    if jax.distributed.is_initialized():
        return True
    kind = launch_kind()
    if kind is None:
        return False
    if kind == "env":
        n, pid = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
        if not 0 <= pid < n:
            raise ValueError(f"$JAX_PROCESS_ID={pid}: must be in [0, $JAX_NUM_PROCESSES={n})")
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                                   process_id=pid)
    else:
        jax.distributed.initialize()
    return True


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, metrics and other plain files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches `barrier(name)` (e.g. after process 0 wrote a file the
    others read); a no-op in a single process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def device_count(devices: int | str = "all") -> int:
    """The number of devices `devices` asks for ('all', or a positive int, also as a string),
    checked against the devices JAX sees (all processes' devices in a multi-process job)."""
    visible = jax.device_count()
    if isinstance(devices, str) and devices.strip().lower() == "all":
        return visible
    try:
        n = int(devices) if not isinstance(devices, bool) else None
    except (TypeError, ValueError):
        n = None
    if n is None or n < 1 or (isinstance(devices, float) and devices != n):
        raise ValueError(f"devices={devices!r}: expected 'all' or a positive number of devices")
    if n > visible:
        raise ValueError(f"devices={n}: only {visible} visible ({jax.default_backend()}); "
                         f"use devices='all' or at most {visible}")
    if jax.process_count() > 1 and n != visible:
        raise ValueError(f"devices={n}: a job of {jax.process_count()} processes uses all "
                         f"{visible} devices; use devices='all'")
    return n


def check_batch(batch_size: int, n: int, name: str = "batch_size") -> None:
    """Raise ValueError unless every one of `n` devices gets the same share of the batch."""
    if batch_size % n:
        lo = batch_size // n * n
        raise ValueError(f"{name}={batch_size} is not divisible by devices={n}: every device "
                         f"must get the same share of a batch; use a multiple of {n} (e.g. "
                         f"{lo or n} or {lo + n})")


def make_mesh(devices: int | str = "all") -> Mesh:
    """A 1-D mesh with axis 'batch' over the first `devices` devices (in process order)."""
    n = device_count(devices)
    return Mesh(np.asarray(jax.devices()[:n]), (BATCH_AXIS,))


def data_mesh(devices: int | str = "all", batch_size: int | None = None) -> Mesh | None:
    """The `train.Trainer.mesh` for `devices`: None when that is a single device in a single
    process (the plain single-device path), else `make_mesh(devices)`; checks `batch_size`."""
    n = device_count(devices)
    if batch_size is not None:
        check_batch(batch_size, n)
    if n == 1 and jax.process_count() == 1:
        return None
    return make_mesh(n)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value held whole on every device of `mesh`."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """The sharding of an array split along `axis` over the mesh's 'batch' axis."""
    return NamedSharding(mesh, P(*([None] * axis), BATCH_AXIS))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf (host or device array, the same on every process) placed whole on every device
    of `mesh`; leaves already placed that way are returned as they are."""
    sharding = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def local_rows(mesh: Mesh, size: int) -> slice:
    """This process's rows of a batch of `size` split over `mesh` (all rows in one process)."""
    index = batch_sharding(mesh).addressable_devices_indices_map((size,))
    starts = [s[0].start or 0 for s in index.values()]
    stops = [size if s[0].stop is None else s[0].stop for s in index.values()]
    lo, hi = min(starts), max(stops)
    if hi - lo != size // mesh.size * len(index):
        raise ValueError(f"mesh devices of process {jax.process_index()} do not hold one "
                         f"contiguous block of the batch; build the mesh with make_mesh()")
    return slice(lo, hi)


def batch_from_local(local, mesh: Mesh, size: int, axis: int = 0) -> jax.Array:
    """The global batch of `size` rows along `axis` from this process's rows
    (`local_rows(mesh, size)` of it), split over the mesh's devices."""
    local = np.asarray(local)
    shape = local.shape[:axis] + (size,) + local.shape[axis + 1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, axis), local, shape)


def shard_batch(x, mesh: Mesh, axis: int = 0) -> jax.Array:
    """A whole batch held on host by every process, split along `axis` over the mesh's devices
    (each process transfers only its own rows)."""
    size = np.shape(x)[axis]
    check_batch(size, mesh.size, name="batch size")
    rows = local_rows(mesh, size)
    local = np.asarray(x)[(slice(None),) * axis + (rows,)]
    return batch_from_local(local, mesh, size, axis)


def shard_inputs(inputs, mesh: Mesh):
    """A `scorers.Inputs` whose batches are split over `mesh` and whose key is replicated, so a
    jitted scorer on replicated params averages its gradients over the whole (global) batches."""
    batches = None if inputs.batches is None else tuple(
        (shard_batch(x, mesh), shard_batch(y, mesh)) for x, y in inputs.batches)
    key = None if inputs.key is None else replicate(inputs.key, mesh)
    return inputs.replace(batches=batches, key=key)
