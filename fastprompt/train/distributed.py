"""Training under ``torchrun``: the process group from its environment, and how the ranks of a
run agree (docs/scaling.md).

Every rank trains the same run: the same global batches, the same loss, the same parameters
(``fastprompt.train.class_sharding`` splits the text encoder's work by classes). Rank 0 alone
writes the run folder; the other ranks get what it read (the checkpoint to resume) from it by a
broadcast, so they need no shared file system. A failure in a step that involves every rank
(preparing the run folder, checking that the ranks loaded the same model, cache and config) is
raised on every rank, so that no rank waits forever for one that gave up; a rank that dies
elsewhere is ended by ``torchrun`` (which stops the other workers when one fails), and a hung
collective by the process group's timeout (``--dist-timeout``). A collective that fails because
another rank stopped (killed, out of memory, its machine lost) raises ``RankStoppedError`` on
the ranks that see it: which rank stopped when it ran on this machine, and that ``--resume``
continues from the last finished epoch, instead of the backend's raw error.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800


class OtherRankError(ValueError):
    """Another rank of the run failed in a step every rank takes part in; it says why."""


class RankStoppedError(OtherRankError):
    """A collective failed because another rank stopped (or its connection did); it says which
    when known, and that ``--resume`` continues."""


# What gloo and NCCL say when a peer is gone or does not answer: a reset or closed connection,
# a failed read or write on it, a collective that timed out waiting for it.
_PEER_LOST = re.compile(r"connection (reset|closed|refused)|broken pipe|read error|write error|"
                        r"socket (closed|timeout)|timed? ?out|timeout|remote process exited|"
                        r"communicator was aborted", re.IGNORECASE)
# (hostname, pid) of every rank, gathered when the process group starts.
_peers: list[tuple[str, int]] = []


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    return world()[1]


def is_writer() -> bool:
    """Whether this process writes the run's files and output: rank 0, or a single process."""
    return world()[0] == 0


def _failure(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def from_rank_zero(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone and its result sent to every rank (a single process: just
    ``fn()``). When it raises, rank 0 raises that error and every other rank
    ``OtherRankError`` with its message."""
    if world_size() == 1:
        return fn()
    outcome = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", fn())
        except Exception as e:  # sent to the other ranks, then raised here
            error = e
            outcome[0] = ("error", _failure(e))
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    kind, value = outcome[0]
    if kind == "error":
        raise OtherRankError(f"rank 0 failed: {value}")
    return value


def check_same_on_all_ranks(what: str, values: dict) -> None:
    """Raise ValueError on every rank unless every rank's ``values`` (a dict of comparable
    entries, e.g. the model weights' hash) equal rank 0's; the message names the ranks and the
    entries that differ."""
    if world_size() == 1:
        return
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    reference = gathered[0]
    differ = []
    for rank, theirs in enumerate(gathered[1:], start=1):
        keys = sorted(k for k in set(reference) | set(theirs)
                      if reference.get(k) != theirs.get(k))
        if keys:
            differ.append(f"rank {rank} in {', '.join(keys)}")
    if differ:
        raise ValueError(f"{what}: the ranks disagree with rank 0 ({'; '.join(differ)}); every "
                         "rank must load the same model weights, data and settings")


def _gone(pid: int) -> bool:
    """Whether process ``pid`` of this machine has ended (a zombie not yet reaped included)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False


def stopped_ranks(peers: list[tuple[str, int]], wait_s: float = 0.05) -> list[int]:
    """The ranks among ``peers`` (``(hostname, pid)`` by rank) whose process on this machine has
    ended; waits up to ``wait_s`` for one (a connection can break a moment before its process
    is gone; short: torchrun soon stops the ranks left). Ranks on other machines cannot be
    told apart: never listed."""
    host, rank = socket.gethostname(), world()[0]
    local = [(r, pid) for r, (h, pid) in enumerate(peers) if r != rank and h == host]
    deadline = time.monotonic() + wait_s
    while True:
        gone = [r for r, pid in local if _gone(pid)]
        if gone or not local or time.monotonic() >= deadline:
            return gone
        time.sleep(0.01)


def collective_failure(error: BaseException, peers: list[tuple[str, int]] | None = None
                       ) -> RankStoppedError | None:
    """``error`` (raised by a collective of a run on several ranks) as a ``RankStoppedError``
    when it says that another rank stopped or lost its connection; None for other errors."""
    if not isinstance(error, RuntimeError) or not _PEER_LOST.search(str(error)):
        return None
    peers = _peers if peers is None else peers
    gone = stopped_ranks(peers) if peers else []
    reason = str(error).split("]", 1)[-1].strip().split(". ")[0][:160]
    if gone:
        who = (f"rank {gone[0]}" if len(gone) == 1 else
               f"ranks {', '.join(map(str, gone))}") + " stopped (its process ended)"
    else:
        who = "another rank stopped or cannot be reached"
    return RankStoppedError(
        f"torchrun: {who}, so rank {world()[0]} cannot go on ({reason}); the finished epochs "
        "are kept: run the same command with --resume (on any number of processes) to "
        "continue")


def check_timeout(seconds) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"--dist-timeout: expected seconds > 0, got {seconds!r}")
    return float(seconds)


def rank_device(name: str) -> str:
    """``cuda`` as this ``torchrun`` process's own GPU, ``cuda:LOCAL_RANK`` (one GPU per
    process); any other name, or outside torchrun, unchanged."""
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return name


@contextlib.contextmanager
def torchrun_process_group(device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Under ``torchrun`` with more than one process (``WORLD_SIZE`` > 1): initialise the
    default process group from its environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``), NCCL on CUDA with this rank on ``cuda:LOCAL_RANK``, gloo
    on CPU; yield the rank's device name; destroy the group on exit. Otherwise yield ``device``
    unchanged. ``device``: ``--device`` (None: CUDA when present). ``timeout_s``: how long a
    collective waits for the other ranks before it fails."""
    timeout_s = check_timeout(timeout_s)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    if not dist.is_available():
        raise ValueError("torchrun: this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device: {name!r} is not a device (cpu, cuda)") from e
    if kind.type == "cuda":
        if kind.index is not None:
            raise ValueError(f"--device: {name!r} names one GPU, but under torchrun each rank "
                             "takes cuda:LOCAL_RANK; give --device cuda")
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise ValueError(f"--device: rank {os.environ.get('RANK')} needs cuda:{local_rank}, "
                             f"but torch sees {torch.cuda.device_count()} CUDA device(s)")
        name, backend = rank_device("cuda"), "nccl"
        torch.cuda.set_device(local_rank)
    elif kind.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"--device: {name!r} is not supported under torchrun (cpu or cuda)")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        peers: list = [None] * dist.get_world_size()
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
        _peers[:] = peers
        try:
            yield name
        except RuntimeError as e:
            stopped = collective_failure(e)
            if stopped is None:
                raise
            raise stopped from e
    finally:
        _peers.clear()
        dist.destroy_process_group()
