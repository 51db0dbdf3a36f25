"""One megatron replica spread over several processes ("ranks") that run every backend call in lockstep.

Rank 0 is the ``MegatronBackend`` the worker built inside its Ray Serve replica. When the config asks for a
world of W = TP × DP ranks, rank 0 starts W-1 follower processes on the same node, the replica's torch.distributed
group forms over a TCP store that rank 0 hosts on 127.0.0.1 (gloo on CPU, NCCL on GPU), and each follower builds
the same backend for its rank and then waits in :func:`serve`.

Every state-changing or computing backend method is decorated with :func:`collective`: on rank 0 it first
broadcasts ``(method, args, kwargs, RNG state)`` to the followers, then runs the method; the followers run the
same method with the same arguments and RNG state, so all ranks execute the same collectives in the same order.
Only rank 0's return value is used. Input errors are raised identically on every rank (the backend validates
before its first collective), so a bad request leaves the group in step.

Followers are Ray actors when Ray is running (one GPU each on GPU, ``rank_num_cpus`` CPUs each, pinned to the
replica's node; owned by the replica, so they die with it) and ``torch.multiprocessing`` spawn children otherwise
(tests, scripts).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

_TIMEOUT = timedelta(minutes=30)
_CLOSE = "__close__"
F = TypeVar("F", bound=Callable[..., Any])


def group_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


class Ranks:
    """This process's place in a multi-rank replica (rank 0 also holds the follower handles)."""

    def __init__(self, rank: int, world: int, followers: list[Any] | None = None) -> None:
        self.rank = rank
        self.world = world
        self.busy = False  # inside a collective call (nested calls and followers do not broadcast)
        self._followers = followers or []

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def announce(self, name: str, args: tuple, kwargs: dict) -> None:
        import torch.distributed as dist

        rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
        dist.broadcast_object_list([(name, args, kwargs, rng)], src=0)

    def receive(self) -> tuple[str, tuple, dict, Any]:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        """True when every rank reports ``ok`` (a collective)."""
        import torch.distributed as dist

        t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def close(self, announce: bool = True) -> None:
        """Rank 0: tell the followers to stop (``announce``: they are serving), then reap them."""
        import torch.distributed as dist

        if self.leader and announce and dist.is_initialized():
            try:
                dist.broadcast_object_list([(_CLOSE, (), {}, None)], src=0)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self.stop_followers()
        if dist.is_initialized():
            dist.destroy_process_group()

    def stop_followers(self, timeout: float = 30.0) -> None:
        for f in self._followers:
            _stop(f, timeout)
        self._followers = []


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def collective(fn: F) -> F:
    """Run ``fn`` on every rank: rank 0 broadcasts the call first (no-op at world size 1)."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        ranks: Ranks | None = getattr(self, "_ranks", None)
        if ranks is None or ranks.world == 1 or ranks.busy:
            return fn(self, *args, **kwargs)
        if ranks.leader:
            ranks.announce(name, args, kwargs)
        ranks.busy = True
        try:
            return fn(self, *args, **kwargs)
        finally:
            ranks.busy = False

    return wrapper  # type: ignore[return-value]


def serve(backend: Any) -> None:
    """Follower loop: run each call rank 0 announces until it announces close."""
    ranks: Ranks = backend._ranks
    while True:
        name, args, kwargs, rng = ranks.receive()
        if name == _CLOSE:
            return
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1])
        try:
            getattr(backend, name)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - rank 0 raises (and reports) the same error
            log.debug("rank %d: %s failed: %s", ranks.rank, name, e)


# -- starting the group ----------------------------------------------------------------------------------------
def start(world: int, factory: Callable[..., Any], backend_kwargs: dict[str, Any], *, launcher: str = "auto",
          rank_num_cpus: float = 1.0) -> Ranks:
    """Rank 0: start followers 1..world-1 and join the process group with them. Each follower builds its backend
    as ``factory(**backend_kwargs, _ranks=...)`` (the backend passes its own class: this module does not import
    the backend, which imports it)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=_TIMEOUT)
    use_ray = launcher == "ray" or (launcher == "auto" and _ray_running())
    followers: list[Any] = []
    try:
        for rank in range(1, world):
            args = (rank, world, store.port, factory, backend_kwargs)
            followers.append(_start_ray(args, rank_num_cpus) if use_ray else _start_process(args))
        _wait_joined(store, followers)
        if torch.cuda.is_available():
            torch.cuda.set_device(0)  # rank 0 uses the replica's (first visible) GPU
        dist.init_process_group(group_backend(), store=store, rank=0, world_size=world, timeout=_TIMEOUT)
    except BaseException:
        for f in followers:
            _stop(f, 5.0)
        raise
    return Ranks(0, world, followers)


def follower_main(rank: int, world: int, port: int, factory: Callable[..., Any], backend_kwargs: dict[str, Any],
                  local_device: int = 0) -> None:
    """Entry point of a follower process: join the group, build the backend for ``rank``, serve."""
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(local_device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=_TIMEOUT)
    store.set(f"twinkle/joined/{rank}", "1")
    dist.init_process_group(group_backend(), store=store, rank=rank, world_size=world, timeout=_TIMEOUT)
    ranks = Ranks(rank, world)
    try:
        backend = factory(**backend_kwargs, _ranks=ranks)
    except Exception:  # noqa: BLE001 - the backend already told rank 0 (all_ok) and logged it
        log.exception("megatron rank %d failed to start", rank)
    else:
        serve(backend)
    if dist.is_initialized():
        dist.destroy_process_group()


def _wait_joined(store: Any, followers: list[Any], timeout: float = 600.0) -> None:
    """Wait until every follower reached the store; fail fast (instead of hanging) when one died first."""
    deadline = time.monotonic() + timeout
    pending = set(range(1, len(followers) + 1))
    while pending:
        pending = {r for r in pending if not store.check([f"twinkle/joined/{r}"])}
        for r in sorted(pending):
            if not _alive(followers[r - 1]):
                raise RuntimeError(f"megatron rank {r} exited before joining the replica's process group (see its log)")
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"megatron ranks {sorted(pending)} did not start within {timeout:.0f} s")
        time.sleep(0.1)


def _alive(follower: Any) -> bool:
    if isinstance(follower, tuple):  # Ray (actor, ref): the ref resolves only when run() returned or failed
        import ray

        ready, _ = ray.wait([follower[1]], timeout=0)
        return not ready
    return follower.is_alive()


def _process_entry(rank: int, world: int, port: int, factory: Callable[..., Any], backend_kwargs: dict[str, Any]) -> None:
    follower_main(rank, world, port, factory, backend_kwargs, local_device=rank)


def _start_process(args: tuple) -> Any:
    import torch.multiprocessing as mp

    p = mp.get_context("spawn").Process(target=_process_entry, args=args, daemon=True)
    p.start()
    return p


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _start_ray(args: tuple, num_cpus: float) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(_RankActor)
    node = ray.get_runtime_context().get_node_id()
    actor = actor_cls.options(
        num_cpus=num_cpus, num_gpus=1 if torch.cuda.is_available() else 0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote()
    ref = actor.run.remote(*args)
    return (actor, ref)


class _RankActor:
    """A follower as a Ray actor (Ray gives it its own GPU, visible as device 0)."""

    def run(self, rank: int, world: int, port: int, factory: Callable[..., Any], backend_kwargs: dict[str, Any]) -> None:
        follower_main(rank, world, port, factory, backend_kwargs, local_device=0)


def _stop(follower: Any, timeout: float) -> None:
    if isinstance(follower, tuple):  # Ray (actor, ref)
        import ray

        actor, ref = follower
        try:
            ray.wait([ref], timeout=timeout)
        finally:
            ray.kill(actor)
        return
    follower.join(timeout)
    if follower.is_alive():
        follower.terminate()
        follower.join(5.0)


def available_slots(rank_num_cpus: float) -> tuple[int, str]:
    """How many ranks this node can host (rank 0 included) and what limits it (for the error message)."""
    if _ray_running():
        import ray

        free = ray.available_resources()
        if torch.cuda.is_available():
            return 1 + int(free.get("GPU", 0)), "free GPUs in the Ray cluster"
        if rank_num_cpus <= 0:
            return 1 << 30, "CPUs"
        return 1 + int(free.get("CPU", 0) // rank_num_cpus), f"free CPUs in the Ray cluster ({rank_num_cpus} per rank)"
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "visible GPUs"
    return os.cpu_count() or 1, "CPU cores"
