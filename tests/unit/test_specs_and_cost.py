"""Spec names, the redistribution planner and the hardware table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar import UnknownGPUError
from autopar.cost.comm import collective_time_s, plan_redistribute
from autopar.cost.hardware import Link, get_hardware
from autopar.cost.units import parse_bytes
from autopar.errors import AutoparError
from autopar.solver.specs import local_shape, parse, short

placement = st.one_of(
    st.just(Replicate()), st.integers(0, 3).map(Shard), st.sampled_from([Partial(), Partial("avg")])
)


@given(st.lists(placement, min_size=1, max_size=3))
def test_short_names_round_trip(spec):
    assert parse(short(tuple(spec))) == tuple(spec)


def test_short_names_read_as_documented():
    assert short((Shard(0), Replicate())) == "S0R"
    assert short((Replicate(), Shard(1))) == "RS1"
    assert short((Partial(), Replicate())) == "PR"
    assert parse("S0S1") == (Shard(0), Shard(1))
    with pytest.raises(ValueError):
        parse("S0X")


def test_local_shape_divides_each_dim_by_its_mesh_axes():
    assert local_shape((8, 16, 32), (Shard(0), Shard(2)), (2, 4)) == (4, 16, 8)
    assert local_shape((8, 16), (Shard(0), Shard(0)), (2, 4)) == (1, 16)


LINK = Link(alpha_s=1e-6, bytes_per_s=1e9)


@pytest.mark.parametrize(
    "src,dst,kinds",
    [
        ("S0R", "RR", ["all_gather"]),
        ("PR", "RR", ["all_reduce"]),
        ("PR", "S0R", ["reduce_scatter"]),
        ("S0R", "S1R", ["all_to_all"]),
        ("RR", "S0R", ["slice"]),
        ("S0S1", "RR", ["all_gather", "all_gather"]),
        ("PS1", "RS1", ["all_reduce"]),
    ],
)
def test_redistribution_is_planned_as_named_collectives(src, dst, kinds):
    steps = plan_redistribute(parse(src), parse(dst), (8, 8), 4, (2, 2), (LINK, LINK))
    assert [s.kind for s in steps] == kinds


def test_gather_moves_the_gathered_bytes_and_costs_alpha_beta():
    (step,) = plan_redistribute(parse("S0"), parse("R"), (8, 8), 4, (4,), (LINK,))
    assert step.bytes == 8 * 8 * 4
    assert step.time_s == pytest.approx(1e-6 + 0.75 * 256 / 1e9)
    assert collective_time_s("all_reduce", 256, 4, LINK) == pytest.approx(2e-6 + 2 * 0.75 * 256 / 1e9)
    assert collective_time_s("all_gather", 256, 1, LINK) == 0.0


def test_inner_mesh_axes_use_the_node_link():
    h100 = get_hardware("H100")
    links = h100.axis_links((16, 8))
    assert links == (h100.inter_node, h100.intra_node)


def test_unknown_gpu_is_a_clear_error():
    with pytest.raises(UnknownGPUError, match="known kinds are .*h100"):
        get_hardware("tpu-v9")


def test_memory_sizes_parse():
    assert parse_bytes("60GiB") == 60 * 2**30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(123) == 123
    with pytest.raises(AutoparError, match="60GiB"):
        parse_bytes("lots")
