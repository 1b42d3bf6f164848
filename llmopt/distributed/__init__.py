"""Scale-out on Ray (the optional ``ray`` extra): connecting to a cluster (``cluster``) and engine
replicas behind one HTTP endpoint (``replicas``). ``llmopt run --ray`` (``llmopt.batch.ray_runner``)
and ``llmopt serve --replicas`` (``llmopt.serve``) build on it; docs/scale.md has the scaling model.

Nothing here imports Ray at import time: ``require_ray()`` does, and names the extra when it is
missing."""

from llmopt.distributed.cluster import EXTRA_HINT, Cluster, ClusterUnreachable, RayUnavailable, connect, require_ray

__all__ = ["EXTRA_HINT", "Cluster", "ClusterUnreachable", "RayUnavailable", "connect", "require_ray"]
