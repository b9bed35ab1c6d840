"""Where the evaluator's replicas run: on the nodes that can run a trial (never a `CPU: 0` head), on
their GPU share or CPUs as `evaluator.placement` says, and on a node that joins mid-sweep, whose
trials are then served by its own replica (real raylets via ray.cluster_utils.Cluster)."""

import json
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

from sweeps.evaluator_placement import (
    ReplicaWatcher,
    describe_placement,
    gpu_room,
    placement_device,
    replica_resources,
    trial_nodes,
)
from sweeps.spec import load_spec
from tests.ray_nodes import node_of

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.yaml"


def _spec(tmp_path, *sets):
    return load_spec(DEMO, [f"storage={tmp_path}", *sets])


def _node(node_id: str, cpu: float, gpu: float = 0, alive: bool = True) -> dict:
    """One entry of ray.nodes() as Ray 2.60 returns it (the keys placement reads)."""
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}


def test_replicas_go_to_nodes_that_can_run_a_trial_never_a_cpu_less_head(tmp_path):
    nodes = [_node("head", 0), _node("cpu4", 4), _node("gpu1", 8, 1), _node("gone", 8, 1, alive=False)]
    assert trial_nodes(_spec(tmp_path, "resources={cpus_per_trial: 2, gpus_per_trial: 0}"), nodes) == ["cpu4", "gpu1"]
    gpu = _spec(tmp_path, "resources={cpus_per_trial: 2, gpus_per_trial: 0.9}")
    assert trial_nodes(gpu, nodes) == ["gpu1"]  # trials need a GPU: the CPU node runs none
    # A replica that holds CPUs needs them beside one trial's.
    assert trial_nodes(_spec(tmp_path, "resources={cpus_per_trial: 4, gpus_per_trial: 0}",
                             "evaluator.placement.cpus=1"), nodes) == ["gpu1"]


def test_auto_shares_the_gpu_only_where_the_trials_leave_room(tmp_path):
    assert gpu_room(0.9, 0.1) and gpu_room(0.45, 0.1) and not gpu_room(0.5, 0.1) and not gpu_room(1, 0.1)
    shared = _spec(tmp_path, "resources={cpus_per_trial: 2, gpus_per_trial: 0.45}")
    assert placement_device(shared) == "gpu"
    assert replica_resources(shared) == {"num_cpus": 0.0, "num_gpus": 0.1, "device": None, "torch_threads": 1}
    whole = _spec(tmp_path, "resources={cpus_per_trial: 2, gpus_per_trial: 1}")
    assert placement_device(whole) == "cpu" and replica_resources(whole)["device"] == "cpu"
    assert "gpus_per_trial: 0.9 to run CLIP on the GPU" in describe_placement(whole)
    forced = _spec(tmp_path, "resources={cpus_per_trial: 2, gpus_per_trial: 1}", "evaluator.placement.device=gpu",
                   "evaluator.placement.gpu_fraction=0.25")
    assert replica_resources(forced)["num_gpus"] == 0.25 and "costs one trial slot per node" in describe_placement(forced)
    assert placement_device(_spec(tmp_path)) == "cpu"  # the demo trains on CPUs


def test_bad_placement_is_a_spec_error_naming_the_key(tmp_path):
    from sweeps.spec import SpecError

    with pytest.raises(SpecError, match=r"evaluator\.placement\.gpu_fraction"):
        _spec(tmp_path, "evaluator.placement.gpu_fraction=1.5")
    with pytest.raises(SpecError, match=r"evaluator\.placement\.device"):
        _spec(tmp_path, "evaluator.placement.device=tpu")
    with pytest.raises(SpecError, match=r"evaluator\.placement\.device: gpu, but resources\.gpus_per_trial is 0"):
        _spec(tmp_path, "evaluator.placement.device=gpu")


def test_a_gpu_replica_holds_its_share_of_a_gpu_beside_the_trials(ray_local, tmp_path):
    """On the session's Ray (logical GPUs): the replica's request is a GPU fraction, scoring runs."""
    from evaluator.remote import connect_evaluator, replica_nodes, score_remote
    from toyworld.world import render_shapes

    spec = _spec(tmp_path, "name=gpushare", "resources={cpus_per_trial: 1, gpus_per_trial: 0.45}")
    before = ray.available_resources().get("GPU", 0)
    watcher = ReplicaWatcher(spec, "placement-gpu", poll_s=60).start()
    try:
        assert list(replica_nodes("placement-gpu")) == [ray.get_runtime_context().get_node_id()]
        assert ray.available_resources().get("GPU", 0) == pytest.approx(before - 0.1)
        handle = connect_evaluator("placement-gpu", timeout_s=60, local_wait_s=5)
        assert score_remote(handle, *render_shapes(2, seed=3))["clip_score"] > 0
    finally:
        watcher.stop()
    assert replica_nodes("placement-gpu") == {}


@pytest.mark.slow
def test_a_node_that_joins_mid_sweep_gets_a_replica_that_serves_its_trials(tmp_path, ray_cluster, capsys):
    from evaluator.remote import replica_nodes
    from sweeps.trial_plan import build_plan
    from sweeps.tuner import evaluator_name, run_sweep

    spec = load_spec(DEMO, [f"storage={tmp_path}", "search.num_trials=2", "search.max_concurrent=2",
                            "train.max_train_steps=8", "eval.interval=4", "eval.seeds=[0]", "pruner={type: none}"])
    plan = build_plan(spec)
    cluster = ray_cluster({"num_cpus": 0}, {"num_cpus": 1})  # a CPU: 0 head and one worker
    head = cluster.head_node.node_id
    (first,) = [n.node_id for n in cluster.list_all_nodes() if n.node_id != head]
    seen, nodes_of, done = {}, {}, threading.Event()

    def note_the_node_of_each_trial():  # while its worker lives: its pid's raylet is its node
        while not done.is_set():
            for result in (tmp_path / "demo" / "tune").glob("*/result.json"):
                lines = [ln for ln in result.read_text().splitlines() if ln.strip()]
                if lines and result.parent.name not in nodes_of:
                    try:
                        nodes_of[result.parent.name] = node_of(cluster, json.loads(lines[-1])["pid"]).node_id
                    except (psutil.NoSuchProcess, AssertionError, ValueError):
                        pass
            time.sleep(0.2)

    def sweep():
        try:
            run_sweep(spec, plan)
        except BaseException as err:  # re-raised below, in the test's thread
            seen["error"] = err
        finally:
            done.set()

    threads = [threading.Thread(target=f, daemon=True) for f in (sweep, note_the_node_of_each_trial)]
    for t in threads:
        t.start()
    # Ray adds a node only from the main thread (it installs signal handlers): the sweep runs in another.
    deadline = time.monotonic() + 400
    while not done.is_set() and time.monotonic() < deadline and not list((tmp_path / "demo" / "tune").glob("*/result.json")):
        time.sleep(0.2)
    assert not done.is_set(), f"the sweep ended before a trial reported: {seen.get('error')!r}"
    seen["second"] = cluster.add_node(num_cpus=1).node_id
    while not done.is_set() and time.monotonic() < deadline and seen["second"] not in replica_nodes(evaluator_name(spec)):
        time.sleep(0.2)
    seen["replicas"] = set(replica_nodes(evaluator_name(spec)))
    for t in threads:
        t.join(timeout=600)
    if "error" in seen:
        raise seen["error"]
    out = capsys.readouterr().out
    assert seen.get("replicas") == {first, seen["second"]}  # never one on the CPU: 0 head
    assert f"evaluator: replica started on 1 node(s) that joined: {seen['second'][:12]}" in out
    served = {}
    for result in (tmp_path / "demo" / "tune").glob("*/result.json"):
        lines = [json.loads(ln) for ln in result.read_text().splitlines() if ln.strip()]
        served[nodes_of[result.parent.name]] = [ln["evaluator_local"] for ln in lines]
    assert set(served) == {first, seen["second"]}, served  # one trial ran on the node that joined
    assert all(local == [1.0, 1.0] for local in served.values()), served  # each scored by its own node's replica
