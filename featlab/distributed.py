"""The small layer over ``torch.distributed`` that extraction and training share.

featlab scales out with ``torchrun``: one process per device, each told its place by the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init` joins the process group those variables describe (``gloo`` on the CPU, ``nccl``
when the process has a CUDA device) and returns a :class:`DistInfo`; without them it returns
the single-process info and starts nothing, so the same code runs under ``python`` and under
``torchrun``. Work is split with :func:`shard_range`: disjoint, contiguous ranges of the sorted
sample order (R-13.3, R-14.2), so rank ``r`` of ``K`` always gets the same samples.

Examples:
    >>> [list(shard_range(10, r, 3)) for r in range(3)]
    [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    >>> info_from_env({})
    DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from featlab._records import check_record
from featlab.errors import ConfigError

__all__ = ["DistInfo", "info_from_env", "init", "is_distributed", "barrier", "all_gather_object",
           "shard_range", "default_device", "resolve_device", "backend_for", "require_own_gpus",
           "shared_device", "destroy"]

log = logging.getLogger("featlab")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a ``torchrun`` job.

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        world_size: number of processes in the job (1 without torchrun).
        local_rank: rank among the processes of this node (the CUDA device index to use).
        local_world_size: processes on this node.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size and 0 <= self.local_rank < self.local_world_size):
            raise ConfigError(f"ranks must lie in 0 .. size - 1; got rank {self.rank} of "
                              f"{self.world_size}, local rank {self.local_rank} of "
                              f"{self.local_world_size}. Fix: launch with torchrun, which sets "
                              "RANK, WORLD_SIZE and LOCAL_RANK consistently.")

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes shared outputs and prints summaries)."""
        return self.rank == 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DistInfo:
        check_record(cls, d)
        return cls(**d)


def info_from_env(environ: Mapping[str, str] | None = None) -> DistInfo:
    """Read the job layout from ``torchrun``'s variables (``os.environ`` by default).

    Examples:
        >>> info_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
        ...                "LOCAL_WORLD_SIZE": "2"})
        DistInfo(rank=3, world_size=4, local_rank=1, local_world_size=2)
    """
    env = os.environ if environ is None else environ
    values = {}
    for key in _ENV:
        raw = env.get(key)
        if raw is None:
            continue
        try:
            values[key] = int(raw)
        except ValueError:
            raise ConfigError(f"{key} must be an integer; got {raw!r}. Fix: launch with "
                              "torchrun or unset it.") from None
    world = values.get("WORLD_SIZE", 1)
    local_world = values.get("LOCAL_WORLD_SIZE", world if "LOCAL_RANK" in values else 1)
    info = DistInfo(rank=values.get("RANK", 0), world_size=world,
                    local_rank=values.get("LOCAL_RANK", 0), local_world_size=local_world)
    if world > 1 and "LOCAL_RANK" not in values:  # else every rank of a node takes cuda:0
        raise ConfigError(f"LOCAL_RANK must be set when WORLD_SIZE is {world} (it picks this "
                          "rank's GPU and share of the node); got RANK and WORLD_SIZE only. "
                          "Fix: launch with torchrun, or export LOCAL_RANK and LOCAL_WORLD_SIZE "
                          "(under Slurm: $SLURM_LOCALID and $SLURM_NTASKS_PER_NODE).")
    return info


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group with more than one process is active."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def default_device(info: DistInfo | None = None) -> str:
    """``cuda:<local rank>`` when CUDA is available, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{(info or info_from_env()).local_rank % torch.cuda.device_count()}"
    return "cpu"


def resolve_device(device: Any = None, info: DistInfo | None = None, *,
                   require: bool = True) -> Any:
    """The ``torch.device`` a process computes on: ``device`` as given (``"cpu"``, ``"cuda"``,
    ``"cuda:N"``, a ``torch.device``), or :func:`default_device` when None. A bare ``"cuda"``
    means this rank's GPU, ``cuda:<local rank>``, so that ``torchrun ... --device cuda`` does not
    put every rank on GPU 0.

    Args:
        require: refuse CUDA where torch sees none (False: plan a GPU run on a machine without
            one, as ``--dry-run`` does).

    Raises:
        ConfigError: not a device name, or CUDA asked for where torch sees none.
    """
    import torch

    info = info or info_from_env()
    if device is None:
        return torch.device(default_device(info))
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"`device` must be cpu, cuda or cuda:N; got {device!r}.") from err
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"`device` must be cpu, cuda or cuda:N; got {device!r}. Fix: --device "
                          "cpu (featlab's statistics accumulate in float64, which other "
                          "accelerators such as MPS lack).")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        if require:
            raise ConfigError(f"`device` must be available; got {device!r}, but torch sees no "
                              "CUDA device. Fix: use --device cpu, or leave it unset.")
        return dev
    count = torch.cuda.device_count()
    if dev.index is None:
        return torch.device("cuda", info.local_rank % count)
    if require and dev.index >= count:
        raise ConfigError(f"`device` must be one of this machine's GPUs, cuda:0 .. "
                          f"cuda:{count - 1}; got {device!r}. Fix: pick one of those, or leave "
                          "--device unset (each rank takes cuda:<LOCAL_RANK>).")
    return dev


def backend_for(device: Any) -> str:
    """The process-group backend for a job whose tensors live on ``device``.

    ``gloo`` on the CPU. On a GPU ``"cpu:gloo,cuda:nccl"``: NCCL carries the tensors that live
    there (DDP's gradients, the confusion matrix), gloo the barriers and object collectives, which
    then stay in host memory and touch no GPU (so ranks that share a GPU can extract together);
    plain ``gloo`` where this torch build has no NCCL.

    Examples:
        >>> backend_for("cpu")
        'gloo'
    """
    import torch
    import torch.distributed as dist

    if torch.device(device).type != "cuda" or not dist.is_nccl_available():
        return "gloo"
    return "cpu:gloo,cuda:nccl"


def timeout_seconds(environ: Mapping[str, str] | None = None) -> float:
    """How long a collective waits for the slowest rank: ``FEATLAB_DIST_TIMEOUT`` seconds,
    default 1800 (raise it when ranks run at different speeds, e.g. two sharing a GPU).

    Examples:
        >>> timeout_seconds({}), timeout_seconds({"FEATLAB_DIST_TIMEOUT": "7200"})
        (1800.0, 7200.0)
    """
    raw = (os.environ if environ is None else environ).get("FEATLAB_DIST_TIMEOUT", "1800")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ConfigError(f"FEATLAB_DIST_TIMEOUT must be a positive number of seconds; got "
                          f"{raw!r}. Fix: e.g. FEATLAB_DIST_TIMEOUT=7200, or unset it (1800).")
    return value


def init(backend: str | None = None, *, device: Any = None, timeout_s: float | None = None
         ) -> DistInfo:
    """Join the process group that ``torchrun``'s environment describes (once per process).

    Without ``WORLD_SIZE > 1`` in the environment nothing is started and the single-process
    :class:`DistInfo` is returned. A group already initialised by the caller is used as it is.

    Args:
        backend: a ``torch.distributed`` backend; default :func:`backend_for` the device.
        device: the device this process computes on (default :func:`default_device`); a CUDA
            device becomes the process's current device.
        timeout_s: how long collectives wait for the slowest rank (default
            :func:`timeout_seconds`).

    Returns:
        This process's :class:`DistInfo`.
    """
    import torch
    import torch.distributed as dist

    info = info_from_env()
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank,
                        info.local_world_size)
    if info.world_size == 1:
        return info
    if not dist.is_available():
        raise ConfigError("torch.distributed must be available for a job with WORLD_SIZE > 1; "
                          "this torch build has none. Fix: run one process, or install a torch "
                          "build with distributed support.")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"a distributed job needs {', '.join(missing)} in the environment; "
                          f"got WORLD_SIZE={info.world_size} without them. Fix: launch with "
                          "`torchrun --nproc_per_node=K -m featlab ...`.")
    device = resolve_device(device, info)
    backend = backend or backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout_s = timeout_seconds() if timeout_s is None else timeout_s
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    # the group featlab made is left before the interpreter exits: a script that never calls
    # destroy() (featlab.extract under torchrun) otherwise dies at exit, now and then, with
    # "terminate called without an active exception" from gloo's threads (SIGABRT)
    atexit.register(destroy)
    log.debug("joined process group: rank %d of %d (%s)", info.rank, info.world_size, backend)
    return info


def require_own_gpus(device: Any) -> None:
    """Refuse a distributed job in which two ranks compute on the same GPU of one node (NCCL,
    and so DDP, cannot run two ranks on one device); every rank raises the same error. GPUs are
    told apart by their UUID, so ranks that each see only their own GPU as ``cuda:0``
    (``CUDA_VISIBLE_DEVICES`` per rank, as some schedulers set it) pass.

    Raises:
        ConfigError: naming the ranks, the GPU and the fix.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not is_distributed():
        return
    index = torch.cuda.current_device() if device.index is None else device.index
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", index))
    places = all_gather_object((socket.gethostname(), uuid, index))
    ranks = shared_device([(host, gpu) for host, gpu, _ in places])
    if ranks is not None:
        host, _, shown = places[ranks[0]]
        raise ConfigError(f"each process of a distributed training run must have a GPU of its "
                          f"own; ranks {ranks[0]} and {ranks[1]} both use cuda:{shown} on "
                          f"{host}. Fix: start at most as many processes per node as it has GPUs "
                          "(torchrun --nproc_per_node), or use --device cpu.")


def shared_device(places: Sequence[tuple[str, Any]]) -> tuple[int, int] | None:
    """The first two ranks whose ``(host, GPU)`` is the same; None if every rank has its own.

    Examples:
        >>> shared_device([("a", 0), ("a", 1), ("b", 0)]) is None
        True
        >>> shared_device([("a", 0), ("a", 1), ("a", 1)])
        (1, 2)
    """
    seen: dict[tuple, int] = {}
    for rank, place in enumerate(places):
        place = tuple(place)
        if place in seen:
            return seen[place], rank
        seen[place] = rank
    return None


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` as rank 0 computes it, on every rank (rank 0's exception raised everywhere).

    For what rank 0 reads from files it writes (a run's checkpoint and record): other nodes may
    not see them, when the run folder lies next to caches staged on node-local disks, and every
    rank must take the same decision (resume or not) or the collectives stop matching.
    """
    if not is_distributed():
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (fn(), None)
        except Exception as err:  # noqa: BLE001 - raised on every rank below
            box[0] = (None, err)
    dist.broadcast_object_list(box, src=0)
    value, err = box[0]
    if err is not None:
        raise err
    return value


def destroy() -> None:
    """Leave the process group, if one is active (none is where torch.distributed was never
    imported: a command that needs no torch does not load it here)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s part of ``range(n)``: contiguous, disjoint, covering; sizes differ by <= 1.

    Rank ``r`` gets ``[r * n // K, (r + 1) * n // K)``, so the shards concatenated in rank order
    are the sorted order itself.

    Examples:
        >>> shard_range(5, 0, 2), shard_range(5, 1, 2)
        (range(0, 2), range(2, 5))
    """
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
            and 0 <= rank < world_size and isinstance(n, int) and n >= 0):
        raise ConfigError(f"shard_range needs n >= 0 and 0 <= rank < world_size; got n={n!r}, "
                          f"rank={rank!r}, world_size={world_size!r}.")
    return range(rank * n // world_size, (rank + 1) * n // world_size)
