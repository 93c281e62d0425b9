"""Process-group setup shared by every script: one code path for `python x.py`,
`torchrun` on one machine and `torchrun` across nodes, on GPU (nccl) or CPU (gloo)."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tinyfusion.errors import TinyFusionError


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def is_distributed(self):
        return self.world_size > 1


def distributed_context(device=None):
    """This process's place in a torchrun launch (WORLD_SIZE / RANK / LOCAL_RANK; a single
    process without them) and its device, without starting the process group, so that a
    script can check its inputs first and fail on every rank without any collective. GPU users
    get cuda:LOCAL_RANK (LOCAL_RANK, not RANK, so multi-node runs pick the right card); CPU runs
    use gloo. `device` ("cpu"/"cuda") overrides the automatic choice."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise TinyFusionError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    return DistributedContext(rank, world_size, local_rank, torch_device, "nccl" if use_cuda else "gloo")


def start_process_group(ctx):
    """Initialise the default process group of a multi-process launch (a no-op on one process)."""
    if ctx.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=ctx.backend, rank=ctx.rank, world_size=ctx.world_size)
    return ctx


def setup_distributed(device=None):
    """distributed_context + start_process_group: one code path for `python x.py`, torchrun on
    one machine and torchrun across nodes, on GPU (nccl) or CPU (gloo)."""
    return start_process_group(distributed_context(device))


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value, ctx):
    """Mean of a python float over all ranks (for logging; a no-op on one process)."""
    if not ctx.is_distributed:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.item() / ctx.world_size


def broadcast_object(obj, ctx, src=0):
    """Send a picklable python object from `src` to every rank (e.g. a run folder path)."""
    if not ctx.is_distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def check_global_batch(global_batch_size, ctx):
    """The per-rank batch; a global batch that does not split evenly is a user error."""
    if global_batch_size % ctx.world_size != 0:
        raise TinyFusionError(f"--global-batch-size {global_batch_size} is not divisible by the world size "
                              f"{ctx.world_size}; pick a multiple of {ctx.world_size}")
    return global_batch_size // ctx.world_size
