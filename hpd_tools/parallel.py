"""Data parallelism for ``distill`` under torchrun: DDP, or FSDP2 sharding.

``hpd-tools distill`` started by ``torchrun --nproc-per-node N`` (or any
launcher that sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT) joins the
process group: NCCL when CUDA is there, gloo on CPUs. Without those variables
it is one process and nothing here talks to another.

The global batch of a step is ``world_size x grad_accum`` micro-batches, one per
*data slot*; slot j streams its own partition of every cache's units (see
stream.StepStream) and rank r owns slots ``r*grad_accum .. (r+1)*grad_accum-1``.
What a step computes depends on the number of slots, not on how they are split
into processes, so 1 process with ``--grad-accum 2`` and 2 processes with
``--grad-accum 1`` take the same steps, and a checkpoint resumes on any world
size with the same slot count.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import HPDError

log = logging.getLogger(__name__)


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_world() -> World:
    """The process group torchrun describes in the environment, or a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world_size <= 1:
        return World(device=torch.device("cuda" if cuda else "cpu"))
    if not os.environ.get("MASTER_ADDR"):
        raise HPDError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set; start distributed runs with torchrun")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def wrap(module: torch.nn.Module, hf_model: Any, world: World, *, fsdp: bool, dtype: str = "float32") -> torch.nn.Module:
    """``module`` (whose forward is one micro-batch's loss) under DDP or FSDP2.

    FSDP2 shards each transformer block (the classes the model names in
    ``_no_split_modules``), then the rest as one root group; its parameters
    become DTensors, so build the optimizer after this. With ``dtype``
    "bfloat16" (the run's resolved --dtype) FSDP2 gathers bf16 parameters and
    reduces gradients in float32; the sharded float32 parameters stay the
    optimizer's masters.
    """
    if not world.distributed:
        return module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(world.device.type, (world.world_size,))
        block_names = set(getattr(hf_model, "_no_split_modules", None) or [])
        blocks = [m for m in hf_model.modules() if type(m).__name__ in block_names]
        block_policy = root_policy = MixedPrecisionPolicy()
        if dtype == "bfloat16":
            block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            # The root's inputs include the teacher's float32 log-probs and the
            # sampler's noise: they must not be cast to bf16 on the way in.
            root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=block_policy)
        fully_shard(module, mesh=mesh, mp_policy=root_policy)
        log.info("FSDP2: %d blocks sharded over %d ranks%s", len(blocks), world.world_size, ", bf16 parameters, fp32 gradient reduction" if dtype == "bfloat16" else "")
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def full_state(hf_model: Any, optimizer: Any, world: World, *, fsdp: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Full (unsharded) model and optimizer state on rank 0, keyed by parameter
    name, so a checkpoint loads under any world size and with or without FSDP2.
    A collective: every rank calls it; ranks other than 0 get empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(hf_model, options=options) if fsdp and world.distributed else (hf_model.state_dict() if world.main else {})
    optim_state = get_optimizer_state_dict(hf_model, optimizer, options=options) if optimizer is not None else None
    return model_state, optim_state


def load_optimizer(hf_model: Any, optimizer: Any, state: dict[str, Any], world: World) -> None:
    """Load a name-keyed optimizer state (from :func:`full_state`) that rank 0
    read; under torchrun rank 0 broadcasts it (other ranks pass ``{}``) and each
    rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world.distributed)
    set_optimizer_state_dict(hf_model, optimizer, state, options=options)
