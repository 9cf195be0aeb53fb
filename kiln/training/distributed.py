"""How training is spread over processes: one small strategy the loop calls without asking which.

``single`` is one process. ``ddp`` replicates the model on every rank and averages gradients
(torch DistributedDataParallel). ``fsdp`` shards parameters, gradients and optimizer state over
the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``): ``full`` (ZeRO-3: parameters are
gathered per layer for each forward and backward), ``grad-op`` (ZeRO-2: parameters stay gathered
between forward and backward) or ``hybrid`` (full sharding within a node, replicas across nodes).

Whatever the strategy, a checkpoint holds full (unsharded) weights and optimizer state keyed like a
single process's, so a run saved at N processes resumes at M, or under another strategy.
Processes are started by ``torchrun`` (or ``kiln train --nproc``): it sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; the backend is gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from typing import Any

from kiln.errors import KilnError


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process, as torchrun set them (``(0, 1)`` outside torchrun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Strategy:
    """One process: every collective is the identity. The base of the distributed strategies."""

    name = "single"
    sharded = False  # weights split over the ranks: every rank must take part in each forward

    def __init__(self, device: Any):
        self.device = device
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0

    def wrap(self, model: Any, module: Any) -> Any:
        """The module the loop calls (``module``: the model or a task's wrapper sharing its weights)."""
        return module

    def sync(self, module: Any, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's backward: gradients are exchanged only after the ``last`` one."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: Any, max_norm: float) -> Any:
        """Clip the global gradient norm to ``max_norm`` (0: no clipping) and return it (a 0-dim tensor;
        reading it costs a device sync): the loop logs it and skips non-finite steps by it."""
        import torch

        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """``values`` reduced over all ranks (``sum`` or ``max``), in one collective."""
        return [float(v) for v in values]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object from kiln itself, never from a file), in rank order."""
        return [value]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        return value

    def model_state(self, model: Any) -> dict | None:
        """The full weights for a checkpoint, on the main rank (None elsewhere). A collective: every
        rank calls it."""
        return None  # None: the checkpoint reads the (unsharded) model itself

    def optimizer_state(self, model: Any, optimizer: Any) -> dict | None:
        """The full optimizer state dict (torch's layout: parameters by index) on the main rank."""
        return optimizer.state_dict() if self.is_main else None

    def load_optimizer_state(self, model: Any, optimizer: Any, state: dict) -> None:
        """Load a full optimizer state dict (torch's layout), as :meth:`optimizer_state` returned it."""
        optimizer.load_state_dict(state)

    def close(self) -> None:
        """Tear down the process group (at the end of training, or at a stop all ranks agreed on),
        after the caller has dropped the module :meth:`wrap` returned."""


class DDP(Strategy):
    """Replicas on every rank; DistributedDataParallel averages the gradients."""

    name = "ddp"

    def __init__(self, device: Any, timeout: float = 1800.0):
        super().__init__(device)
        init_process_group(device, timeout)

    def wrap(self, model: Any, module: Any) -> Any:
        import torch

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def sync(self, module: Any, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else module.no_sync()

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            # The loop has dropped its DDP wrapper; collecting it now frees its reducer while the
            # group is still registered. Otherwise the reducer would hold the group's last reference
            # and destroy it later under the GIL, and gloo's destructor joins worker threads that may
            # need the GIL to free a finished collective's tensors: a deadlock. Released from here,
            # the group is destroyed by torch's own binding, which lets go of the GIL first.
            gc.collect()
            dist.destroy_process_group()


class FSDP(DDP):
    """Parameters, gradients and optimizer state sharded over the ranks (FSDP2).

    Each transformer layer (the classes the model lists in ``_no_split_modules``, as HF's own FSDP
    wrapping does) is one unit, gathered for its forward and backward; the rest (embeddings, heads)
    is the root unit. Tied weights live in the root, so they stay one parameter. In bf16/fp16 the
    layers compute in that precision with the gradients reduced in fp32.
    """

    name = "fsdp"
    sharded = True

    def __init__(self, device: Any, mode: str = "full", precision: str = "fp32", cpu_offload: bool = False,
                 timeout: float = 1800.0):
        super().__init__(device, timeout)
        self.mode, self.precision, self.cpu_offload = mode, precision, cpu_offload

    def wrap(self, model: Any, module: Any) -> Any:
        import torch
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        options: dict[str, Any] = {"reshard_after_forward": self.mode != "grad-op"}
        if self.mode == "hybrid":
            from torch.distributed.device_mesh import init_device_mesh

            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            if self.world_size % per_node:
                raise KilnError(f"--fsdp hybrid needs the same number of processes on every node "
                                f"({self.world_size} processes, {per_node} on this node)")
            options["mesh"] = init_device_mesh(self.device.type, (self.world_size // per_node, per_node),
                                               mesh_dim_names=("replicate", "shard"))
        if self.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        layer_options = dict(options)
        if self.precision in ("bf16", "fp16"):
            low = torch.bfloat16 if self.precision == "bf16" else torch.float16
            layer_options["mp_policy"] = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        names = set(getattr(model, "_no_split_modules", None) or [])
        # A unit whose weight is tied to one outside it (BERT's embeddings and its MLM decoder) stays
        # in the root unit: FSDP2 refuses a parameter shared between two units.
        layers = [m for name, m in module.named_modules()
                  if type(m).__name__ in names and not _tied_outside(module, name, m)]
        if not layers:
            raise KilnError(f"--fsdp: {type(model).__name__} names no layer class to shard by "
                            "(_no_split_modules); use DDP for it")
        for layer in layers:
            fully_shard(layer, **layer_options)
        # The root's parameters (embeddings, heads) are needed again as soon as backward starts: kept
        # gathered, as FSDP2's own default does, instead of re-gathered by hooks on the outputs.
        fully_shard(module, **{**options, "reshard_after_forward": False})
        return module

    def sync(self, module: Any, last: bool) -> contextlib.AbstractContextManager:
        return _gradient_sync(module, last)

    def clip_grad_norm(self, model: Any, max_norm: float) -> Any:
        norm = super().clip_grad_norm(model, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def model_state(self, model: Any) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        # Tied weights come back under each name; saved once, as the unsharded model saves them.
        seen: set[int] = set()
        repeated = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                repeated.add(name)
            seen.add(id(p))
        return {key: value for key, value in state.items() if key not in repeated}

    def optimizer_state(self, model: Any, optimizer: Any) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return by_index(state) if self.is_main else None

    def load_optimizer_state(self, model: Any, optimizer: Any, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, by_name(state, optimizer, model),
                                 options=StateDictOptions(full_state_dict=True))


def _tied_outside(root: Any, name: str, unit: Any) -> bool:
    """Whether a parameter of ``unit`` (``root``'s submodule ``name``) is also one of ``root``'s under
    a name outside ``unit``."""
    inside = {id(p) for p in unit.parameters()}
    return any(id(p) in inside and not key.startswith(name + ".")
               for key, p in root.named_parameters(remove_duplicate=False))


@contextlib.contextmanager
def _gradient_sync(module: Any, last: bool) -> Iterator[None]:
    """FSDP2's no_sync: keep the unsharded gradients until the last micro-batch, then reduce-scatter."""
    module.set_requires_gradient_sync(last)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def by_index(state: dict) -> dict:
    """An optimizer state dict keyed by parameter names (torch.distributed.checkpoint's full layout)
    in torch's own layout: parameters numbered in order of appearance across the groups."""
    numbers: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        params = []
        for name in group["params"]:
            numbers.setdefault(name, len(numbers))
            params.append(numbers[name])
        groups.append({**group, "params": params})
    return {"state": {numbers[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def by_name(state: dict, optimizer: Any, model: Any) -> dict:
    """The inverse of :func:`by_index` for ``optimizer``'s parameters in ``model``."""
    names = {id(p): name.replace("_checkpoint_wrapped_module.", "") for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = []
    for saved in state["param_groups"]:
        groups.append({**saved, "params": [order[i] for i in saved["params"]]})
    return {"state": {order[int(i)]: value for i, value in state["state"].items()}, "param_groups": groups}


def init_process_group(device: Any, timeout: float = 1800.0) -> None:
    """Join torchrun's process group: nccl on CUDA, gloo on CPU. A collective that waits longer than
    ``timeout`` seconds for a peer fails (torchrun then stops every process) instead of hanging."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))


def strategy_for(device: Any, fsdp: str = "", precision: str = "fp32", cpu_offload: bool = False,
                 timeout: float = 1800.0) -> Strategy:
    """The strategy for this process: single outside torchrun, else DDP or FSDP (``--fsdp``); collectives
    time out after ``timeout`` seconds."""
    _, world_size = world()
    if world_size == 1:
        return Strategy(device)
    if not fsdp:
        return DDP(device, timeout)
    if precision == "fp16":
        raise KilnError("--fsdp trains in bf16 or fp32 (fp16's loss scaling is not sharded); use --precision bf16")
    return FSDP(device, fsdp, precision, cpu_offload, timeout)
