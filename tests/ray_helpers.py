"""A real two-node Ray cluster on this machine (loopback), one CPU per node, for the Ray tests."""

import contextlib
import os

# Ray resolves "127.0.0.1" to the machine's outward address unless told to stay on loopback; it
# reads this when imported, and its worker processes inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextlib.contextmanager
def two_node_cluster():
    """Connects this process to the cluster; yields its address."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "node_ip_address": "127.0.0.1"})
    c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    try:
        yield c.address
    finally:
        ray.shutdown()
        c.shutdown()
