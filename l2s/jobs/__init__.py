"""The library side of `l2s steer`, `l2s invert` and `l2s train`: config in, result object out.

`l2s` exports these jobs as functions (``l2s.steer``, ``l2s.invert``, ``l2s.train``); their
modules live here so that no module of the package ``l2s`` bears an exported function's name
(``from l2s import steer`` must give the function, never a module). The bench job is
``l2s.bench.run`` (``l2s.run_bench``; ``l2s.bench`` is the benchmark package), the speed job
``l2s.speed``.
"""
