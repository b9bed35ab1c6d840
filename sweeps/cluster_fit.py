"""Whether a trial's resources fit the machine or cluster, and a stop for sweeps whose trials never start.

Ray queues a trial that no node can take and waits forever (its autoscaler repeats "No available
node types can fulfill resource request"). On local Ray that is known before Ray starts, so it
is a spec error; on a cluster an autoscaler may still add a node, so it is a warning, and
`TrialStartTimeout` stops the sweep when no trial has started within `resources.start_timeout_s`.
"""

from __future__ import annotations

import time

from ray.tune import Callback

from sweeps.spec_schema import ResourcesSpec


class SweepCannotStart(RuntimeError):
    """No trial could start in time; the message names the resources and the fix."""


def local_fit_problems(resources: ResourcesSpec, cpus: int, gpus: int) -> list[str]:
    """A trial that asks for more than a local machine with `cpus` and `gpus` has could never
    start: local Ray would wait for it forever."""
    out = []
    if resources.gpus_per_trial > gpus:
        out.append(f"resources.gpus_per_trial: {resources.gpus_per_trial:g} GPU(s) per trial, but this machine has "
                   f"{gpus}; lower it (0 trains on the CPU) or give --address of a cluster with such nodes")
    if resources.cpus_per_trial > cpus:
        out.append(f"resources.cpus_per_trial: {resources.cpus_per_trial:g} CPUs per trial, but this machine has "
                   f"{cpus}; lower it or give --address of a cluster with such nodes")
    return out


def cluster_fit_warning(resources: ResourcesSpec, nodes: list[dict]) -> str | None:
    """A warning when none of the cluster's alive nodes (`ray.nodes()`) can take one trial now."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    if any(r.get("CPU", 0) >= resources.cpus_per_trial and r.get("GPU", 0) >= resources.gpus_per_trial for r in alive):
        return None
    have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in alive) or "no alive node"
    return (f"warning: no node of the cluster can take a trial now (resources.cpus_per_trial="
            f"{resources.cpus_per_trial:g}, resources.gpus_per_trial={resources.gpus_per_trial:g}; nodes: {have}). "
            "Trials wait for the autoscaler to add such a node; the sweep stops if none starts within "
            f"resources.start_timeout_s={resources.start_timeout_s:g} s.")


def no_start_message(resources: ResourcesSpec, waited_s: float) -> str:
    return (f"no trial could start within {waited_s:.0f} s: no node offers resources.cpus_per_trial="
            f"{resources.cpus_per_trial:g} and resources.gpus_per_trial={resources.gpus_per_trial:g}. Lower them, "
            "add nodes of that size to the cluster, or raise resources.start_timeout_s to wait longer for "
            "the autoscaler; rerun the same command to continue the sweep.")


class TrialStartTimeout(Callback):
    """Raises SweepCannotStart when no trial has started `resources.start_timeout_s` after the sweep began.

    Once any trial ran, trials that wait are waiting for a busy node, not for one that cannot exist.
    """

    def __init__(self, resources: ResourcesSpec):
        self.resources = resources
        self.start = time.monotonic()
        self.started = False

    def setup(self, **info):
        # Also called when a restored sweep starts again (this object is then unpickled, its clock stale).
        self.start, self.started = time.monotonic(), False

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started = True

    def on_step_end(self, iteration, trials, **info):
        if self.started or any(t.status in ("RUNNING", "TERMINATED") for t in trials):
            self.started = True
            return
        waited = time.monotonic() - self.start
        if waited > self.resources.start_timeout_s:
            raise SweepCannotStart(no_start_message(self.resources, waited))
