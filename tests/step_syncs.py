"""What a steered step makes the host wait for, counted on a CPU (``OpCounter``), for the
per-step sync tests of every backbone (test_steering, test_mmdit_families)."""

from __future__ import annotations

from l2s.engine.sampling import seeded_latents
from l2s.engine.timing import OpCounter
from l2s.relations import parse
from l2s.steering.loop import Steerer, SteerSettings
from l2s.steering.losses import CentroidLoss


def assert_step_syncs_do_not_grow(den, prompt: str, iterations=(1, 3), **settings) -> None:
    """A steered step makes the same host reads and tensors from host data whatever its
    number of iterations, none of them an ``.item()``-style read, and the next step of the same
    images makes no tensor from host data. ``settings``: more ``SteerSettings`` fields."""
    x, t = seeded_latents(den, [0]), den.timesteps(3)[0]
    seen = {}
    for n in iterations:
        s = SteerSettings(steps=3, guidance=2.0, steer_until=1, iterations=n,
                          threshold_start=-1.0, threshold_end=-1.0, **settings)  # no early exit
        st = Steerer(den, [prompt], [parse(prompt)], CentroidLoss(margin=0.3), s)
        with st.recorder() as rec:
            with OpCounter() as first:
                st.update(rec, x, t, 0)
            with OpCounter() as again:  # the next steered step, the same images
                st.update(rec, x, t, 1)
        assert st.stats.steps[-1].iterations == n
        seen[n] = {k: first.counts()[k] for k in ("host_reads", "host_tensors")}
        # The images' indices were copied to the device at the first step, not again.
        assert again.counts()["host_tensors"] == 0, again.counts()
    assert all(v == seen[iterations[0]] for v in seen.values()), seen
    assert seen[iterations[0]]["host_reads"] == 0
