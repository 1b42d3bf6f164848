"""A real Ray cluster on this machine for the whole session: started by ``llmopt.distributed.connect``
(loopback only), 4 logical CPUs on the 2 cores, so that a CLI run can join with one more worker
while the test pool holds two."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'llmopt[ray]'); the Ray tests skip")
    from llmopt.distributed.cluster import connect

    cluster = connect("local", num_cpus=4)
    yield cluster
    cluster.shutdown()
