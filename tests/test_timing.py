"""engine.timing on the CPU: the op counter that stands in for GPU kernel launches."""

import torch

from l2s.engine.timing import Clock, OpCounter


def test_op_counter_counts_kernels_not_views_and_host_reads():
    a = torch.ones(2, 3)
    with OpCounter() as c:
        b = a.view(3, 2).t()  # two views: no kernel
        s = (b * 2 + 1).sum()  # three kernels
        s.item()  # one host read (a GPU sync)
    got = c.counts()
    assert got["kernels"] == 3  # catches views counted as launches, or ops missed
    assert got["host_reads"] == 1  # catches .item() going uncounted
    assert got["total"] == 6 and got["device_to_host"] == 0 and got["host_tensors"] == 0
    with OpCounter() as c:
        torch.tensor([1.0, 2.0])  # made from Python data: a copy from the host on a GPU
        torch.full((2,), 1.0)  # filled by a kernel: no copy
    assert c.counts()["host_tensors"] == 1


def test_op_counter_sees_the_backward_pass():
    x = torch.ones(4, requires_grad=True)
    with OpCounter() as fwd:
        y = (x.exp() * 3).sum()
    with OpCounter() as both:
        (x.exp() * 3).sum().backward()
    assert both.counts()["kernels"] > fwd.counts()["kernels"]  # autograd's ops are counted
    assert y.requires_grad


def test_clock_counts_one_untimed_call_when_asked():
    calls = []
    res = Clock(torch.device("cpu")).measure(lambda: calls.append(torch.ones(2).sum()), 3,
                                             count_ops=True)
    assert len(calls) == 1 + 1 + 3  # warm-up, counted, timed
    assert len(res["all_ms"]) == 3 and res["ops"]["kernels"] == 2  # ones, sum
    assert "ops" not in Clock(torch.device("cpu")).measure(lambda: None, 1)
