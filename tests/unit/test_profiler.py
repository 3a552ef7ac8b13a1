"""What the profiler's clock counts: the op, not the harness around it."""

from __future__ import annotations

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
