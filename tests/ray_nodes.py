"""Which node of a `ray.cluster_utils.Cluster` runs a process: for tests that kill or watch nodes."""

import psutil


def node_of(cluster, pid: int):
    """The cluster node whose raylet is an ancestor of process `pid`."""
    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    for node in cluster.list_all_nodes():
        raylets = node.all_processes.get("raylet", [])
        if raylets and raylets[0].process.pid in ancestors:
            return node
    raise AssertionError(f"no node runs pid {pid}")
