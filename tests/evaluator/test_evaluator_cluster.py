"""One evaluator replica per node, and clients use the one on their own node (two real raylets
on this machine via ray.cluster_utils.Cluster)."""

from __future__ import annotations

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from evaluator import TINY_CLIP_ID
from evaluator.remote import connect_evaluator, score_remote, start_evaluator, stop_evaluator
from toyworld.world import render_shapes

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes(ray_cluster):
    return ray_cluster({"num_cpus": 1}, {"num_cpus": 1})


@ray.remote(num_cpus=0.1)
def _client(seed: int) -> tuple[str, str, float]:
    h = connect_evaluator("pernode", timeout_s=60)
    info = ray.get(h.info.remote())
    out = score_remote(h, *render_shapes(2, seed=seed))
    return ray.get_runtime_context().get_node_id(), info["node_id"], out["clip_score"]


def test_one_replica_per_node_and_clients_use_their_own(two_nodes):
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    assert len(nodes) == 2
    start_evaluator("pernode", TINY_CLIP_ID, None, num_cpus=0.5, detached=False)
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("pernode"))
    assert names == [f"pernode@{n}" for n in nodes]
    refs = [_client.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
            .remote(70 + i) for i, n in enumerate(nodes)]
    for (client_node, replica_node, score), node in zip(ray.get(refs), nodes):
        assert client_node == replica_node == node and score > 0
    assert stop_evaluator("pernode") == 2
