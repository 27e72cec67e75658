"""A long training run as a job that outlives the notebook (or shell) that started it.

A COCO run takes days, so notebook 09 never trains inside its kernel. It builds the command
(:func:`train_args`, :func:`torchrun_command`), starts it detached (:func:`launch_detached`: a new
session, output appended to ``OUTPUT/train.out``, the pid in ``OUTPUT/train.pid``) and later asks
:func:`running_pid`, :func:`wait` or :func:`stop`. Running the launch cell again neither starts
a second copy nor starts from scratch: :func:`with_resume` adds ``--resume`` once
``checkpoint.pt`` exists. Progress is read from the run's log (``detr_lite.monitor``).

Nothing here imports torch, so it is cheap to import.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PID_FILE = "train.pid"
STDOUT_FILE = "train.out"


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
def train_args(
    config: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    num_workers: int | None = None,
    pretrained_backbone: bool | None = None,
    finetune: str | os.PathLike | None = None,
    max_iters_per_epoch: int | None = None,
    device: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """Arguments for ``python -m detr_lite.train`` (everything after the module name)."""
    args = ["--config", str(config), "--data", str(data), "--output", str(output)]
    for flag, value in (("--epochs", epochs), ("--batch-size", batch_size)):
        if value is not None:
            args += [flag, str(value)]
    args += [flag for flag, on in (("--amp", amp), ("--channels-last", channels_last), ("--compile", compile)) if on]
    if num_workers is not None:
        args += ["--num-workers", str(num_workers)]
    if pretrained_backbone is not None:
        args.append("--pretrained-backbone" if pretrained_backbone else "--no-pretrained-backbone")
    for flag, value in (("--finetune", finetune), ("--max-iters-per-epoch", max_iters_per_epoch), ("--device", device)):
        if value is not None:
            args += [flag, str(value)]
    return args + list(extra or [])


def with_resume(args: list[str], output: str | os.PathLike) -> list[str]:
    """``args`` plus ``--resume`` when ``output/checkpoint.pt`` exists (re-running continues a run)."""
    if (Path(output) / "checkpoint.pt").is_file() and "--resume" not in args:
        return [*args, "--resume"]
    return list(args)


def torchrun_command(
    module_args: list[str],
    nproc_per_node: int = 1,
    *,
    module: str = "detr_lite.train",
    nnodes: int = 1,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int = 29500,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "detr_lite",
    max_restarts: int = 0,
    python: str | None = None,
) -> list[str]:
    """The argv that runs ``python -m <module> <module_args>`` under torchrun.

    * one node (``nnodes=1``): ``--standalone`` picks a free port on localhost by itself;
    * several nodes, static: give ``node_rank`` and ``master_addr`` (run once per node, node 0
      hosts the rendezvous on ``master_port``);
    * several nodes, elastic: give ``rdzv_endpoint="host:port"`` (c10d rendezvous, node ranks
      are assigned on arrival; same command on every node).

    ``max_restarts``: when a worker dies, torchrun restarts the whole group up to that many times,
    and the trainer resumes from the run's last checkpoint (``--checkpoint-every`` keeps it recent).
    ``python -m torch.distributed.run`` *is* ``torchrun``; calling it through ``python`` makes sure
    the workers use the same interpreter (venv) as the caller.
    """
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"torchrun_command: nproc_per_node={nproc_per_node}, nnodes={nnodes}; expected >= 1")
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd += ["--standalone", "--nnodes", "1"]
    elif rdzv_endpoint is not None:
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                "--rdzv-id", rdzv_id]  # fmt: skip
    elif master_addr is not None and node_rank is not None:
        if not 0 <= node_rank < nnodes:
            raise ValueError(f"torchrun_command: node_rank={node_rank}, expected 0..{nnodes - 1}")
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", master_addr,
                "--master-port", str(master_port)]  # fmt: skip
    else:
        raise ValueError(
            f"torchrun_command: nnodes={nnodes} needs rdzv_endpoint='host:port' or master_addr + node_rank"
        )
    if max_restarts:
        cmd += ["--max-restarts", str(max_restarts)]
    return cmd + ["--nproc-per-node", str(nproc_per_node), "-m", module, *module_args]


def shell_line(cmd: list[str]) -> str:
    """``cmd`` as one shell line, spelling ``python -m torch.distributed.run`` as ``torchrun``."""
    if len(cmd) >= 3 and cmd[1:3] == ["-m", "torch.distributed.run"]:
        cmd = ["torchrun", *cmd[3:]]
    return shlex.join(cmd)


# ----------------------------------------------------------------------------------------------
# the process: started in its own session, found again through its pid file
# ----------------------------------------------------------------------------------------------
def _process(pid: int) -> tuple[bool, str | None]:
    """(alive, kernel start time) of ``pid``; the start time (Linux ``/proc``; None elsewhere) tells a
    reused pid from ours, and a zombie (finished, not yet waited for) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        pass  # alive, owned by someone else
    try:
        after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return True, None
    return after_name[0] not in ("Z", "X"), after_name[19]  # state, then field 22 of proc(5): starttime


def read_pid_file(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads((Path(output_dir) / PID_FILE).read_text())
    except (OSError, ValueError):
        return None


def running_pid(output_dir: str | os.PathLike) -> int | None:
    """The pid of the training job recorded in ``output_dir`` if it is still running, else None."""
    info = read_pid_file(output_dir)
    if not info or not isinstance(info.get("pid"), int):
        return None
    alive, started = _process(info["pid"])
    if not alive or None not in (started, info.get("start_time")) and started != info["start_time"]:
        return None  # gone, or the pid now belongs to another process
    return info["pid"]


_CHILDREN: dict[int, subprocess.Popen] = {}  # jobs started by this interpreter (reaped by wait)


def launch_detached(
    cmd: list[str], output_dir: str | os.PathLike, env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> int:  # fmt: skip
    """Start ``cmd`` in its own session (survives the notebook kernel), unless one is running.

    stdout and stderr go to ``output_dir/train.out`` (appended); ``output_dir/train.pid`` records
    the pid, the command and the process start time. Returns the pid of the (new or running) job.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (pid := running_pid(out)) is not None:
        print(f"already running (pid {pid}); not starting a second copy")
        return pid
    with open(out / STDOUT_FILE, "ab") as log:
        log.write(f"\n$ {shell_line(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip
    info = {"pid": proc.pid, "start_time": _process(proc.pid)[1], "cmd": cmd, "started": time.time()}
    tmp = out / (PID_FILE + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(out / PID_FILE)
    _CHILDREN[proc.pid] = proc
    return proc.pid


def wait(output_dir: str | os.PathLike, timeout: float | None = None, poll: float = 0.5) -> int | None:
    """Block until the job in ``output_dir`` ends; its exit code if this process started it."""
    pid = (read_pid_file(output_dir) or {}).get("pid")
    try:
        if pid in _CHILDREN:
            return _CHILDREN.pop(pid).wait(timeout)
        t0 = time.monotonic()
        while running_pid(output_dir) is not None:
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise subprocess.TimeoutExpired(str(pid), timeout)
            time.sleep(poll)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"training job {pid} still running after {timeout} s") from None
    return None


def stop(output_dir: str | os.PathLike, sig: int = signal.SIGTERM) -> bool:
    """Signal the job's whole process group (torchrun and its workers). True if one was running."""
    pid = running_pid(output_dir)
    if pid is None:
        return False
    os.killpg(pid, sig)  # start_new_session made the job the leader of its own group
    return True
