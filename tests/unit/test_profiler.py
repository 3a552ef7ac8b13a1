"""What the profiler's clock counts: the op, not the harness around it."""

from __future__ import annotations

import pytest
import torch

from autopar.cost import profiler


def test_backward_is_timed_without_making_the_output_gradients(monkeypatch):
    made = []
    real = profiler._grad_like
    monkeypatch.setattr(profiler, "_grad_like", lambda t: made.append(t.shape) or real(t))
    x = torch.randn(4, 8, requires_grad=True)
    run = profiler._with_backward(lambda: (x * 2).sum(dim=0), [x])
    for _ in range(5):  # the warm-up call and the timed ones
        run()
    assert made == [torch.Size([8])]  # made once, by the first call


def test_collectives_average_the_middle_half_of_their_calls():
    # one call descheduled (100) and one unusually fast (0) do not move the average
    assert profiler._interquartile_mean([0.0, 2.0, 3.0, 100.0]) == 2.5
    assert profiler._interquartile_mean([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 80.0]) == 4.5
    assert profiler._interquartile_mean([5.0, 1.0]) == 3.0  # too few to trim


def test_ops_are_timed_by_the_mean_of_blocks_of_calls(monkeypatch):
    """Every tenth call waits out another rank's time slice (5 ms on top of 0.1 ms). A step
    pays that wait, so the price must include it: the median of single calls would say 0.1 ms."""
    now, calls = [0.0], [0]
    monkeypatch.setattr(profiler.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(profiler.dist, "all_reduce", lambda t, op=None: None)  # one rank

    def op() -> None:
        calls[0] += 1
        now[0] += 1e-4 + (5e-3 if calls[0] % 10 == 0 else 0.0)

    clock = profiler._Clock(torch.device("cpu"), repeats=3, enough_s=0.0301)
    assert clock(op) == pytest.approx(1e-4 + 5e-3 / 10)
    assert calls[0] == 1 + 3 * 100  # the warm-up, then 3 blocks filling about enough_s
