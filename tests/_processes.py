"""Multi-process tests on one machine: JAX processes on localhost, each with forced CPU devices,
started as subprocesses of a test module (`python <test file> <role> ...`) and waited for."""

import os
import socket
import subprocess
import sys
import time

import pytest


def env(devices: int, **extra) -> dict:
    """This environment without any cluster settings, with `devices` forced CPU devices."""
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROC",
                                "JAX_PROCESS_ID"))}
    out.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", **extra)
    return out


def process_env(devices: int, port: int, index: int, count: int = 2) -> dict:
    """`env` for process `index` of a `count`-process JAX job coordinated on localhost:`port`."""
    return env(devices, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(index))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(script: str, args: list, log: str, environ: dict):
    """`python script *args` with stdout and stderr to the file `log`: (Popen, log)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, script, *map(str, args)], env=environ,
                                stdout=f, stderr=subprocess.STDOUT), log


def wait(procs, timeout: float = 240):
    """Wait for every (Popen, log); on a timeout kill them all; fail with the log's tail of a
    process that exited non-zero."""
    deadline = time.monotonic() + timeout
    for p, log in procs:
        try:
            p.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
        if p.returncode != 0:
            with open(log) as f:
                tail = f.read()[-3000:]
            pytest.fail(f"worker {p.args[2]} exited with {p.returncode}:\n{tail}")
