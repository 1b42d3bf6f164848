"""Cluster addresses and worker sizing: pure functions, no Ray needed."""

from __future__ import annotations

import pytest

from llmopt.distributed.cluster import Cluster, parse_address, plan_workers


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379)),
    ("head", ("head", 6379)),
    ("ray://head", ("head", 10001)),
    ("ray://head:10002", ("head", 10002)),
    ("[::1]:7000", ("::1", 7000)),
])
def test_addresses_parse_with_rays_default_ports(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("address, message", [(":6379", "no host"), ("head:63x9", "not a number"),
                                              ("head:0", "not a number in 1..65535")])
def test_a_bad_address_says_what_is_wrong(address, message):
    with pytest.raises(ValueError, match=message):
        parse_address(address)


def test_worker_plan_fits_the_cluster():
    two_nodes = Cluster("h:1", False, False, 12, [8, 4])
    assert plan_workers(two_nodes, None, None) == (12, 1)
    assert plan_workers(two_nodes, None, 4) == (3, 4)
    assert plan_workers(two_nodes, 3, None) == (3, 4)
    with pytest.raises(ValueError, match="do not fit"):
        plan_workers(two_nodes, 4, 4)
    with pytest.raises(ValueError, match="do not fit"):
        plan_workers(two_nodes, 1, 16)
