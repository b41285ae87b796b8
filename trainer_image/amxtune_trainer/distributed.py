"""Ranks, rendezvous, core pinning and the few collectives textual inversion needs.

Ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) or
from Intel MPI / PMI (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS). One rank needs no
process group: every collective is then a no-op. The rendezvous (MASTER_ADDR:MASTER_PORT) is
retried until a deadline, so a worker whose peers' DNS names are not resolvable yet waits
instead of failing. The backend is ccl when oneccl_bindings_for_pytorch is importable and asked
for (explicitly, or by 'auto' with CCL_* variables in the environment), else gloo.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass

from amxtune_trainer.errors import UserError

RENDEZVOUS_DEADLINE_S = float(os.environ.get("AMXTUNE_RENDEZVOUS_TIMEOUT", "600"))


def _env_int(*names: str, default: int | None = None) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise UserError(
                    f"environment variable {name}={value!r} is not an integer"
                ) from None
    return default


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    cores: tuple[int, ...] = ()
    threads: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistInfo:
    """Rank layout from torchrun or MPI/PMI variables (one rank when neither is set)."""
    rank = _env_int("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", default=0)
    world = _env_int("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", default=1)
    local_rank = _env_int(
        "LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", default=None
    )
    local_world = _env_int(
        "LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", default=None
    )
    if local_rank is None:
        local_rank = rank if world > 1 and local_world in (None, world) else 0
    if local_world is None:
        local_world = world if local_rank == rank else max(local_rank + 1, 1)
    if not (0 <= rank < world):
        raise UserError(f"rank {rank} is outside world size {world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank,
                    local_world_size=local_world)


def pin_cores(info: DistInfo) -> None:
    """Pin this rank to its share of the cgroup's CPU set and size the thread pool to it.

    OMP_NUM_THREADS, when set by the user/operator, caps the threads (oneCCL workers may own
    some cores); torchrun's own default of 1 thread per rank is ignored.
    """
    import torch

    try:
        available = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = list(range(os.cpu_count() or 1))
    share = available
    per_rank = len(available) // max(info.local_world_size, 1)
    if info.local_world_size > 1 and per_rank >= 1 and os.environ.get("AMXTUNE_PIN", "1") != "0":
        share = available[info.local_rank * per_rank:(info.local_rank + 1) * per_rank]
        try:
            os.sched_setaffinity(0, share)
        except (AttributeError, OSError):
            share = available
    threads = len(share)
    omp = os.environ.get("OMP_NUM_THREADS")
    torchrun_default = omp == "1" and "TORCHELASTIC_RUN_ID" in os.environ
    if omp and omp.isdigit() and int(omp) > 0 and not torchrun_default:
        threads = min(threads, int(omp))
    torch.set_num_threads(max(threads, 1))
    info.cores, info.threads = tuple(share), max(threads, 1)


def _ccl_available() -> bool:
    try:
        import oneccl_bindings_for_pytorch  # noqa: F401
    except Exception:
        return False
    return True


def choose_backend(requested: str) -> str:
    if requested == "gloo":
        return "gloo"
    if requested == "ccl":
        if not _ccl_available():
            raise UserError(
                "distributed backend 'ccl' asked for but oneccl_bindings_for_pytorch is not "
                "importable; use 'gloo' or the image variant with oneCCL"
            )
        return "ccl"
    wants_ccl = any(k.startswith("CCL_") for k in os.environ)
    return "ccl" if wants_ccl and _ccl_available() else "gloo"


def init(info: DistInfo, requested_backend: str) -> None:
    """Join the process group (no-op for one rank), retrying the rendezvous until a deadline."""
    if not info.enabled:
        return
    import torch.distributed as dist

    backend = choose_backend(requested_backend)
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UserError(
            f"{info.world_size} ranks but MASTER_ADDR/MASTER_PORT are not set "
            "(run under torchrun, or set them for mpirun)"
        )
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    deadline = time.monotonic() + RENDEZVOUS_DEADLINE_S
    delay, last_error = 1.0, None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UserError(
                f"rendezvous with {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                f"failed for {RENDEZVOUS_DEADLINE_S:.0f}s: {last_error}"
            )
        try:
            dist.init_process_group(
                backend=backend, init_method="env://", rank=info.rank,
                world_size=info.world_size,
                timeout=datetime.timedelta(seconds=max(remaining, 30)),
            )
            break
        except (RuntimeError, ValueError, OSError) as error:  # DNS not ready, refused, ...
            last_error = (str(error).splitlines() or [type(error).__name__])[0]
            print(f"rank {info.rank}: rendezvous not ready ({last_error}); retrying",
                  file=sys.stderr, flush=True)
            time.sleep(min(delay, max(remaining, 0)))
            delay = min(delay * 2, 15.0)
    info.backend = backend


def shutdown(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def broadcast_object(info: DistInfo, obj):
    """Rank 0's Python object on every rank."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(info: DistInfo, obj) -> list:
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_tensor(info: DistInfo, tensor):
    """Rank 0's tensor on every rank; others pass a tensor of the same shape/dtype."""
    if info.enabled:
        import torch.distributed as dist

        dist.broadcast(tensor, src=0)
    return tensor


class GradientSync:
    """Averages the trainable parameters' gradients (plus the step's loss) over ranks in one
    all-reduce, and tells every rank whether any rank was asked to stop, so that all stop after
    the same step (a signal reaches the ranks of several pods at different moments).

    Counts the bytes it hands to the collective, so that the figure reported is what crossed
    between ranks: 4 bytes per trainable value (+8 for the loss and the stop flag) per step.
    """

    def __init__(self, info: DistInfo):
        self.info = info
        self.bytes_total = 0
        self.calls = 0

    def __call__(self, grads: list, loss_sum: float, stop: bool = False) -> tuple[float, bool]:
        """Average every tensor of `grads` in place across ranks; returns the mean of
        `loss_sum` over ranks and whether any rank passed `stop`."""
        if not self.info.enabled:
            return loss_sum, stop
        import torch
        import torch.distributed as dist

        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [torch.tensor([loss_sum, float(stop)])])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self.bytes_total += flat.numel() * flat.element_size()
        self.calls += 1
        any_stop = bool(flat[-1] > 0)
        flat /= self.info.world_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        return float(flat[-2]), any_stop

    @property
    def bytes_per_step(self) -> int:
        return self.bytes_total // self.calls if self.calls else 0
