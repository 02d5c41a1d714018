"""Run by tests/test_multinode.py in its own process (one Ray per process): a head and three
1-CPU nodes from ray.cluster_utils.Cluster; a 2-stage replica placed with SPREAD; one node that
holds a stage is removed between requests. Prints a JSON report."""
import json
import sys

import numpy as np
import ray
from ray.cluster_utils import Cluster

from actors.pipeline import LocalPool, RayPool
from raydapt.serving import PoolSpec
from raydapt.oracle import ShardedOracle

model_dir = sys.argv[1]
rng = np.random.default_rng(0)
ids, lengths = rng.integers(0, 128, (9, 12)), rng.integers(5, 12, 9)
prompts = rng.normal(0, 0.5, (6, 3, 32)).astype(np.float32)
reference = ShardedOracle(LocalPool(PoolSpec(model_dir, stages=2)), 4).label_logits(ids, lengths, [1, 2], prompts)

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
try:
    ray.init(address=cluster.address, logging_level="ERROR")
    pool = RayPool(PoolSpec(model_dir, stages=2, strategy="SPREAD"))
    oracle = ShardedOracle(pool, 4)
    actor_nodes = [stage["node"] for stage in pool.describe()[0]]
    first = oracle.label_logits(ids, lengths, [1, 2], prompts)
    victim = next(n for n in nodes if n.node_id == actor_nodes[1])  # the node that holds stage 1
    cluster.remove_node(victim)
    second = oracle.label_logits(ids, lengths, [1, 2], prompts)
    print(json.dumps({"distinct_nodes": len(set(actor_nodes)), "first_equal": bool(np.array_equal(first, reference)),
                      "after_removal_equal": bool(np.array_equal(second, reference)), **pool.fault_report()}))
finally:
    ray.shutdown()
    cluster.shutdown()
