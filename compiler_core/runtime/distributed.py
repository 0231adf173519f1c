"""One rank of a multi-rank engine per process: ranks started by ``mpirun``, wired with torch.distributed.

``mpirun -n W modelc run|summarize ...`` starts W identical processes. mpi4py tells each its rank
and carries the rendezvous (rank 0 picks a free TCP port and broadcasts the address), then
torch.distributed takes over: gloo on CPU, NCCL on CUDA. Each process loads only its own rank.

Every process runs the same generation loop on the same prompts, so the runner must hand every
caller the same logits: tensor-parallel ranks all-gather them inside the graph, and with pipeline
parallelism the last stage broadcasts them to all ranks. Sampling with a seed therefore stays in
step without any further exchange.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from compiler_core.build.engine import engine_mapping, load_rank_session
from compiler_core.dtypes import torch_dtype
from compiler_core.errors import ModelcError, UsageError
from compiler_core.mapping import Mapping
from compiler_core.registry import Registry
from compiler_core.runtime.runner import ModelRunner
from compiler_core.runtime.session import RankSession

#: How long a rank waits for its peers (rendezvous and each collective) before giving up.
TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("MODELC_DIST_TIMEOUT_S", "600")))


class ProcessGroupComm:
    """The ``Communicator`` of one tensor-parallel group, over a torch.distributed process group."""

    def __init__(self, group: dist.ProcessGroup, tp_size: int, graph_capturable: bool) -> None:
        self.group = group
        self.tp_size = tp_size
        self.graph_capturable = graph_capturable

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        # The collective works in place; the input may still be read by a later node.
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def all_gather(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=axis)


class DistributedRunner(ModelRunner):
    """This process's rank of the engine; ``logits()`` returns the whole model's logits on every rank."""

    def __init__(self, session: RankSession, mapping: Mapping, rank: int) -> None:
        self.session = session
        self.mapping = mapping
        self.rank = rank
        self.device = session.device
        # Stages size their receive buffers from these graph attributes (every stage's graph has them).
        attrs = session.graph.attrs
        self.hidden_size = int(attrs["hidden_size"])
        self.vocab_size = int(attrs["vocab_size"])
        self.dtype = torch_dtype(attrs.get("dtype", "float32"))
        self.tp_rank = mapping.tp_rank(rank)
        self.stage = mapping.pp_rank(rank)

    def allocate(self, batch: int, max_len: int) -> None:
        self.session.allocate(batch, max_len)

    def reorder_cache(self, index: torch.Tensor) -> None:
        self.session.reorder_cache(index)

    @property
    def supports_rows(self) -> bool:
        return self.session.supports_rows

    def row_logits(self, rows, ids, positions, attention_mask, start, new_sequences=False):
        return self._forward(ids, positions, attention_mask, start, rows=rows, **self._hints(new_sequences))[:, -1]

    def last_logits(self, ids, positions, attention_mask, start, new_sequences=False):
        return self._forward(ids, positions, attention_mask, start, **self._hints(new_sequences))[:, -1]

    def _hints(self, new_sequences: bool) -> dict[str, bool]:
        # Every rank decides alike: the ranks of one engine run the same backend.
        return {"new_sequences": True} if new_sequences and self.session.supports_new_sequences else {}

    def shift_cache(self, offset: int) -> None:
        self.session.shift_cache(offset)

    def logits(self, ids, positions, attention_mask, start):
        return self._forward(ids, positions, attention_mask, start)

    @torch.inference_mode()
    def _forward(self, ids, positions, attention_mask, start, **kw) -> torch.Tensor:
        m = self.mapping
        batch, seq = ids.shape[0], ids.shape[1]
        if m.is_first_stage(self.rank):
            x = ids
        else:
            x = torch.empty(batch, seq, self.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=m.rank(self.tp_rank, self.stage - 1))
        out = self.session.forward(x, positions, attention_mask, start, **kw)
        if not m.is_last_stage(self.rank):
            self._check(out, (batch, seq, self.hidden_size), "hidden states")
            dist.send(out.contiguous(), dst=m.rank(self.tp_rank, self.stage + 1))
            out = None
        if m.pp_size == 1:
            # Tensor-parallel ranks of one stage already hold identical, all-gathered logits.
            return out
        if out is None:
            out = torch.empty(batch, seq, self.vocab_size, dtype=self.dtype, device=self.device)
        else:
            self._check(out, (batch, seq, self.vocab_size), "logits")
            out = out.contiguous()
        dist.broadcast(out, src=m.rank(0, m.pp_size - 1))
        return out

    def _check(self, x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        # Peers size their receive buffers from the graph; a mismatch would hang or garble them.
        if tuple(x.shape) != shape or x.dtype != self.dtype:
            raise ModelcError(
                f"rank {self.rank}: {what} are {tuple(x.shape)} {x.dtype}, peers expect {shape} {self.dtype}"
            )


def _rendezvous(comm: Any) -> str:
    """``tcp://host:port`` chosen by rank 0 and broadcast over MPI."""
    host = socket.gethostname()
    hosts = comm.allgather(host)
    address = None
    if comm.Get_rank() == 0:
        # One node: stay on loopback. Several: peers reach rank 0 by its host name.
        bind = "127.0.0.1" if len(set(hosts)) == 1 else host
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((bind, 0))
            port = s.getsockname()[1]
        address = f"{bind}:{port}"
    address = comm.bcast(address, root=0)
    addr, port = address.rsplit(":", 1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port
    return f"tcp://{address}"


def _local_rank(comm: Any) -> int:
    """Rank among the processes of this node (picks the GPU)."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank()
    finally:
        local.Free()


def _rank_device(device: str, local_rank: int) -> torch.device:
    """This rank's device: the CPU, or the node's GPU number ``local_rank`` (any cuda:N is overridden)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on {socket.gethostname()}")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _mpi_world() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise UsageError(f"multi-rank engines need mpi4py and an MPI (pip install 'modelc[mpi]'): {exc}") from None
    return MPI.COMM_WORLD


def open_distributed_runner(
    registry: Registry, engine_dir: Path, engine_config: dict[str, Any], device: str
) -> DistributedRunner:
    """Join the ``mpirun`` job, load this process's rank of the engine and return its runner.

    Raises ``UsageError`` when the number of ranks differs from the engine's world size (only
    rank 0 reports it; the other ranks exit with the same code and say nothing).
    """
    mapping = engine_mapping(engine_config)
    world = _mpi_world()
    rank, size = world.Get_rank(), world.Get_size()
    if size != mapping.world_size:
        error = UsageError(
            f"{engine_dir}: engine has world_size {mapping.world_size} but mpirun started {size} "
            f"rank{'s' if size != 1 else ''}; start it with: mpirun -n {mapping.world_size} modelc ..."
        )
        error.quiet = rank != 0
        raise error
    init_method = _rendezvous(world)
    rank_device = _rank_device(device, _local_rank(world))
    # Everything from here on goes through torch.distributed. Leaving MPI now means a rank that
    # fails later exits at once (mpirun then stops the job) instead of waiting in MPI_Finalize.
    from mpi4py import MPI

    MPI.Finalize()
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if rank_device.type == "cuda" else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=size,
            timeout=TIMEOUT,
        )
        atexit.register(dist.destroy_process_group)
    session = load_rank_session(registry, Path(engine_dir), rank, str(rank_device), engine_config)
    if mapping.tp_size > 1:
        # new_group is collective: every rank creates every stage's group, in the same order.
        groups = [dist.new_group(mapping.tp_group(mapping.rank(0, stage))) for stage in range(mapping.pp_size)]
        # NCCL collectives can live inside the CUDA graph of a decode step: without one, every
        # step's host synchronisation waits for the peers' kernel launches.
        session.comm = ProcessGroupComm(groups[mapping.pp_rank(rank)], mapping.tp_size, rank_device.type == "cuda")
    return DistributedRunner(session, mapping, rank)
