"""torchrun / DDP plumbing: the same training command runs on one process or many.

Under ``torchrun`` the environment carries ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; we join the process
group (gloo on CPU, nccl on GPU) and each rank trains on its own shard of every global batch.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "RunStopped", "WorkerLost", "Interrupted", "init_distributed", "select_device",
           "stop_cleanly"]


class RunStopped(RuntimeError):
    """The run received SIGTERM (a scheduler's preemption, ``kill``, or torchrun stopping the survivors of a
    failed worker); checkpoints are written atomically, so the last complete one is intact."""

    exit_code = 128 + signal.SIGTERM


class WorkerLost(RunStopped):
    """Another DDP worker died or stopped answering while this one waited for it."""

    exit_code = 1


class Interrupted(RunStopped):
    """Ctrl-C (``KeyboardInterrupt``): stopped like SIGTERM, with the shell's exit code for SIGINT."""

    exit_code = 128 + signal.SIGINT


#: Fragments of the errors gloo and nccl raise when a peer is gone (they raise plain RuntimeErrors).
_PEER_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed",
                  "communicator was aborted", "Timed out", "timed out")


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a scalar over ranks (identity on one process)."""
        if not self.enabled:
            return value
        # nccl reduces only tensors on this rank's GPU (select_device made it the current one).
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size


    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank, so that all ranks take the same branch."""
        return flag if not self.enabled else self.mean(float(flag)) == 1.0


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks this rank's GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(device_request: str = "auto") -> tuple[DistributedContext, torch.device]:
    """Join the torchrun process group if there is one; returns the context and this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_request, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank), device


@contextmanager
def stop_cleanly(checkpoint: Path, rank: int = 0, resumes: bool = False) -> Iterator[None]:
    """Turn SIGTERM, Ctrl-C and a lost DDP peer into :class:`RunStopped`, whose message says what happened,
    which checkpoint is intact and how to resume (``resumes``: the same command already resumes).

    When one torchrun worker dies, the agent sends SIGTERM to the others and reports the failed rank; each
    survivor then says which checkpoint is intact instead of dying silently. Only the main thread can
    install signal handlers; elsewhere SIGTERM keeps its default.
    """
    hint = _resume_hint(checkpoint, resumes)

    # Under torchrun a SIGTERM usually means another worker failed; alone, it came from the user or a scheduler.
    why = (" (torchrun sends it to every worker when one fails: see its report for the failed rank)"
           if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")

    def stop(signum, frame):
        raise _announced(RunStopped(f"rank {rank} stopped by SIGTERM{why}; {hint()}"))

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if in_main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        raise _announced(Interrupted(f"rank {rank} interrupted (Ctrl-C); {hint()}")) from None
    except RuntimeError as error:
        if isinstance(error, RunStopped) or not dist.is_initialized() or not _is_peer_failure(error):
            raise
        raise _announced(WorkerLost(f"rank {rank} lost another worker ({str(error).splitlines()[0][:200]}); "
                                    f"{hint()}")) from error
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _is_peer_failure(error: RuntimeError) -> bool:
    return isinstance(error, getattr(dist, "DistError", ())) or any(part in str(error) for part in _PEER_FAILURES)


def _resume_hint(checkpoint: Path, resumes: bool):
    """What to say when the run stops, worked out then (the checkpoint may appear meanwhile)."""
    def hint() -> str:
        if not checkpoint.exists():
            return "no checkpoint had been written yet: run the same command again"
        how = "run the same command again" if resumes else "run the same command with --resume"
        return f"the last complete checkpoint {checkpoint} is intact: {how} to continue from it"
    return hint


def _announced(error: RunStopped) -> RunStopped:
    """Print the message at once: torchrun may kill this process before the exception reaches the top."""
    print(f"dyntok: {error}", file=sys.stderr, flush=True)
    return error
