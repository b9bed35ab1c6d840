"""Where the sweep's evaluator replicas run: on every node that can run a trial, and on nodes that
join while the sweep runs (`ReplicaWatcher`), on their GPUs or CPUs as `evaluator.placement` says.

A node "runs trials" when its resources hold one trial and one replica
(`resources.cpus_per_trial`/`gpus_per_trial` plus the replica's own request): a `CPU: 0` head, or
a CPU node when trials need GPUs, never gets one, so CLIP never runs far from the trials on one CPU
thread. A trial connects to its own node's replica (`connect_replica`), waiting
`placement.local_wait_s` for one that a just-joined node is still loading, then uses another
node's, and the evaluator logs that it did.
"""

from __future__ import annotations

import math
import threading

import ray

from evaluator.remote import (
    connect_evaluator,
    replica_name,
    replica_nodes,
    start_evaluator,
    stop_evaluator,
    stop_replica,
)
from sweeps.spec_schema import SweepSpec

POLL_S = 2.0  # how often the driver looks for nodes that joined or left (s)
_SLACK = 1e-9  # float sums of GPU fractions (0.45 + 0.45 + 0.1)


def placement_device(spec: SweepSpec) -> str:
    """"gpu" or "cpu": the spec's `evaluator.placement.device`, with auto resolved."""
    p, gpus = spec.evaluator.placement, spec.resources.gpus_per_trial
    if p.device != "auto":
        return p.device
    return "gpu" if gpus > 0 and gpu_room(gpus, p.gpu_fraction) else "cpu"


def gpu_room(gpus_per_trial: float, fraction: float) -> bool:
    """Whether one GPU packed with fractional trials keeps `fraction` free for a replica."""
    if gpus_per_trial <= 0 or gpus_per_trial >= 1:
        return False
    packed = math.floor(1 / gpus_per_trial + _SLACK) * gpus_per_trial
    return packed + fraction <= 1 + _SLACK


def replica_resources(spec: SweepSpec) -> dict:
    """start_evaluator's resource arguments for one replica."""
    p = spec.evaluator.placement
    if placement_device(spec) == "gpu":
        # device None: CUDA on the GPU share Ray assigns (CUDA_VISIBLE_DEVICES), the CPU where none is real.
        return {"num_cpus": p.cpus, "num_gpus": p.gpu_fraction, "device": None, "torch_threads": p.torch_threads}
    return {"num_cpus": p.cpus, "num_gpus": 0.0, "device": "cpu", "torch_threads": p.torch_threads}


def describe_placement(spec: SweepSpec) -> str:
    """One line for --dry-run: where the replicas go and what each holds."""
    p, r = spec.evaluator.placement, spec.resources
    where = f"one replica on every node that can run a trial ({r.cpus_per_trial:g} CPU, {r.gpus_per_trial:g} GPU)"
    if placement_device(spec) == "gpu":
        line = f"evaluator: {where}, on its GPU ({p.gpu_fraction:g} of one beside the trials)"
        if not gpu_room(r.gpus_per_trial, p.gpu_fraction):
            line += (f"; note: with gpus_per_trial {r.gpus_per_trial:g} the replica's share costs one trial slot "
                     f"per node (gpus_per_trial {1 - p.gpu_fraction:g} would leave room for it)")
        return line
    line = f"evaluator: {where}, on its CPUs ({p.cpus:g} held, {p.torch_threads} thread(s))"
    if r.gpus_per_trial > 0 and p.device == "auto":
        line += (f"; gpus_per_trial {r.gpus_per_trial:g} leaves no GPU room for a replica: set e.g. "
                 f"resources.gpus_per_trial: {1 - p.gpu_fraction:g} to run CLIP on the GPU")
    return line


def trial_nodes(spec: SweepSpec, nodes: list[dict]) -> list[str]:
    """Ids of the alive nodes (`ray.nodes()`) whose resources hold one trial and one replica."""
    res, r = replica_resources(spec), spec.resources
    need_cpu, need_gpu = r.cpus_per_trial + res["num_cpus"], r.gpus_per_trial + res["num_gpus"]
    return sorted(n["NodeID"] for n in nodes if n.get("Alive")
                  and n["Resources"].get("CPU", 0) + _SLACK >= need_cpu
                  and n["Resources"].get("GPU", 0) + _SLACK >= need_gpu)


def start_replicas(spec: SweepSpec, name: str, nodes: list[str]) -> None:
    """A replica on each of `nodes` (existing ones are reused), waiting until each loaded its model."""
    if nodes:
        start_evaluator(name=name, model=spec.evaluator.model, pretrained=spec.evaluator.pretrained,
                        nodes=nodes, **replica_resources(spec), **spec.evaluator.judge_paths())


class ReplicaWatcher:
    """The driver's watch over the cluster while a sweep runs: a replica for every trial node that
    joins, none left behind for a node that left. `start()` places the first ones (on the nodes
    alive now; none when the autoscaler has not added a trial node yet), `stop()` ends them all."""

    def __init__(self, spec: SweepSpec, name: str, poll_s: float = POLL_S):
        self.spec, self.name, self.poll_s = spec, name, poll_s
        self.started: list[str] = []  # node ids given a replica while the sweep ran, in order
        self.errors: list[str] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="evaluator-replicas", daemon=True)

    def start(self) -> ReplicaWatcher:
        nodes = trial_nodes(self.spec, ray.nodes())
        start_replicas(self.spec, self.name, nodes)
        self.started += nodes
        if not nodes:
            print("evaluator: no node can run a trial yet; a replica starts on each one that joins", flush=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """One look at the cluster: replicas for new trial nodes, none for nodes that left."""
        alive = trial_nodes(self.spec, ray.nodes())
        have = replica_nodes(self.name)
        for node, replica in have.items():
            if node not in alive:  # its node left: Ray could only try to restart it there forever
                stop_replica(replica)
        new = [n for n in alive if n not in have]
        if new and not self._halt.is_set():  # none after stop(): it would outlive the sweep
            start_replicas(self.spec, self.name, new)
            self.started += new
            print(f"evaluator: replica started on {len(new)} node(s) that joined: {', '.join(n[:12] for n in new)}",
                  flush=True)

    def _watch(self) -> None:
        while not self._halt.wait(self.poll_s):
            try:
                self.check()
            except Exception as err:  # the sweep goes on: trials fall back to another node's replica
                self.errors.append(f"{type(err).__name__}: {err}")
                print(f"evaluator: could not place a replica ({self.errors[-1]}); trials use another node's",
                      flush=True)

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=60)
        stop_evaluator(name=self.name)


def connect_replica(name: str, local_wait_s: float, timeout_s: float = 120.0):
    """The trial's evaluator handle: its own node's replica when one appears within `local_wait_s`."""
    return connect_evaluator(name=name, timeout_s=max(timeout_s, local_wait_s + 30), local_wait_s=local_wait_s)


def served_locally(handle) -> bool:
    """Whether `handle` is the replica on the caller's node."""
    return (replica_name(handle) or "").endswith(f"@{ray.get_runtime_context().get_node_id()}")
