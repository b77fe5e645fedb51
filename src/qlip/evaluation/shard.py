"""Sharded evaluation: ``qlip eval`` under ``torchrun`` or ``accelerate launch`` (one process per
GPU or CPU slot). The launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` name this process's
share: generation batch k (of the single-process run's batches, so each image is made in the same
batch as it would be alone, and is the same image) belongs to rank ``k % WORLD_SIZE``. Ranks meet
at a ``torch.distributed`` barrier (gloo on CPU, nccl on GPU); rank 0 alone holds the folder
lock, merges the records and computes the metrics."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world or self.local_rank < 0:
            raise ValueError(f"RANK={self.rank}, WORLD_SIZE={self.world}, LOCAL_RANK="
                             f"{self.local_rank} do not name a process of a launch; start "
                             "sharded runs with torchrun or accelerate launch")

    @classmethod
    def from_env(cls, env: dict | None = None) -> Shard:
        """This process's share from the launcher's environment (none: a single process)."""
        env = os.environ if env is None else env
        values = {}
        for key, name in (("rank", "RANK"), ("world", "WORLD_SIZE"), ("local_rank", "LOCAL_RANK")):
            text = env.get(name)
            if text is None:
                continue
            try:
                values[key] = int(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not an integer; start sharded runs with "
                                 "torchrun or accelerate launch") from None
        return cls(**values)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def owns(self, batch_number: int) -> bool:
        return batch_number % self.world == self.rank

    def device(self, device: str) -> str:
        """Each rank on its own GPU (``cuda`` -> ``cuda:LOCAL_RANK``); CPU ranks share the CPU."""
        return f"cuda:{self.local_rank}" if self.sharded and device == "cuda" else device

    def start(self, device: str) -> None:
        """Join the launch's process group (gloo on CPU, nccl on GPU)."""
        if self.sharded and not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    def barrier(self) -> None:
        if self.sharded and dist.is_initialized():
            dist.barrier()

    def stop(self) -> None:
        if self.sharded and dist.is_initialized():
            dist.destroy_process_group()
