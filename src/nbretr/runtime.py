"""Process-level plumbing shared by train and eval: distributed set-up (torchrun), devices,
run folders, the resumable sampler."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger("nbretr")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> Dist:
    """Initialise torch.distributed when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def new_run_dir(output_dir: str | None, prefix: str = "runs", create: bool = True) -> Path:
    """``output_dir``, or a new ``prefix/<timestamp>`` that does not exist yet; made unless
    ``create`` is False."""
    if output_dir:
        path = Path(output_dir)
    else:
        path = Path(prefix) / time.strftime("%Y%m%d-%H%M%S")
        i = 1
        while path.exists():
            path = Path(prefix) / f"{time.strftime('%Y%m%d-%H%M%S')}-{i}"
            i += 1
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


RUN_MARKERS = ("config.yaml", "metrics.jsonl", "metrics.json", "checkpoints")
LOCK_NAME = ".nbretr.lock"


class FolderLock:
    """An exclusive ``flock`` on ``folder/.nbretr.lock`` for as long as a command writes into
    the folder: a second command pointed at the same folder fails at once, naming the
    process that holds it, instead of interleaving its files with the first's."""

    def __init__(self, folder: str | Path, what: str = "--output-dir"):
        import fcntl
        self.path = Path(folder) / LOCK_NAME
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.seek(0)
            holder = self._f.read().strip() or "another process"
            self._f.close()
            raise ValueError(f"{what} {folder} is in use by {holder}; wait for it to finish or choose "
                             "another folder") from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"pid {os.getpid()}")
        self._f.flush()

    def release(self, remove: bool = False) -> None:
        if self._f.closed:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        self._f.close()  # closing the file releases the lock


def holds_run(folder: str | Path) -> list[str]:
    """What in ``folder`` shows that a run already wrote there (empty: none)."""
    folder = Path(folder)
    return [m for m in RUN_MARKERS if (folder / m).exists()]


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
    return path


SAMPLER_ORDERS = ("nbretr", "reference")


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Batches of a training epoch, split across ranks, able to start mid-epoch:
    ``set_epoch(epoch, start_batch)`` skips the batches already trained on. Every rank sees
    ``per_rank_batch`` items per global batch, and the ranks' shares concatenated in rank
    order are the global batch.

    ``order="nbretr"``: a permutation seeded by ``seed`` (+ the epoch when ``reshuffle``),
    cut into consecutive global batches; the tail that does not fill one is dropped.
    ``order="reference"``: the released code's loader, ``DistributedSampler`` (seed 0) over
    ``replicas`` processes with per-process batches of ``global_batch / replicas`` and
    ``drop_last``: a global batch is every replica's next slice of its strided share, in
    replica order, so a run on fewer processes sees the batches of the ``replicas``-process
    command. The released loader is never reshuffled (its sampler's ``set_epoch`` is called
    on another object): ``reshuffle=False`` repeats the first epoch's order."""

    def __init__(self, num_items: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, *, order: str = "nbretr", reshuffle: bool = True,
                 replicas: int | None = None):
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} must be divisible by the world size {world_size}")
        if order not in SAMPLER_ORDERS:
            raise ValueError(f"sampler order must be one of {SAMPLER_ORDERS}, got {order!r}")
        self.replicas = int(replicas or world_size)
        if order == "reference" and global_batch % self.replicas:
            raise ValueError(f"batch_size {global_batch} must be divisible by the reference's process count "
                             f"{self.replicas}")
        self.n, self.global_batch, self.rank, self.world = num_items, global_batch, rank, world_size
        self.per_rank = global_batch // world_size
        self.shuffle, self.seed, self.order, self.reshuffle = shuffle, seed, order, reshuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        if self.order == "reference":
            per_replica = -(-self.n // self.replicas)  # DistributedSampler pads to a multiple
            return per_replica // (self.global_batch // self.replicas) if self.n else 0
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_order(self) -> list[int]:
        """Every item of the epoch in global-batch order (what the all-gather concatenates)."""
        epoch = self.epoch if self.reshuffle else 0
        if self.order == "reference":
            g = torch.Generator().manual_seed(0 + epoch)
            idx = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
            total = -(-self.n // self.replicas) * self.replicas
            idx += idx[:total - len(idx)]
            shares = [idx[r:total:self.replicas] for r in range(self.replicas)]
            pb = self.global_batch // self.replicas
            return [i for b in range(self.batches_per_epoch) for r in range(self.replicas)
                    for i in shares[r][b * pb:(b + 1) * pb]]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        for b in range(self.start_batch, self.batches_per_epoch):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            yield from chunk[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.per_rank


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or device.type != "cuda":
        return None
    if amp in ("auto", "bf16"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16


class Interrupted(Exception):
    """A command stopped on Ctrl-C; the message says what was kept and how to go on."""


# Errors a command reports as a message (a missing file, a bad option or annotation), not
# as a traceback: file-system errors, and ValueErrors that nbretr's own checks raise (a
# ValueError from inside torch, numpy or another library is more likely a bug, and keeps
# its traceback). NBRETR_TRACEBACK=1 re-raises them all.
USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, USER_OS_ERRORS):
        return True
    if not isinstance(exc, ValueError) or exc.__traceback__ is None:
        return False
    import traceback
    raised_in = Path(traceback.extract_tb(exc.__traceback__)[-1].filename).resolve()
    return Path(__file__).resolve().parent in raised_in.parents


def run_cli(main, prog: str, argv: list[str] | None = None) -> int:
    """Run a command's ``main(argv)``; a user error (:func:`is_user_error`) ends it with
    ``prog: error: message`` on stderr and exit status 2 (argparse's), without the
    traceback."""
    import sys
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, Interrupted):  # one line: where the last checkpoint is, how to resume
            print(f"{prog}: {exc}", file=sys.stderr)
            return 130
        if not is_user_error(exc) or os.environ.get("NBRETR_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"{prog}: error: {exc}\n(NBRETR_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2
