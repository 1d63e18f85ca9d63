"""Steering: the latent-update loop (`loop`), relation losses (`losses`) and update rules
(`optimizers`), the `l2s steer` job (`job`), verify-then-steer (`verify`), the diffusers
callback (`pipeline`), figures (`plots`) and the speed benchmark (`speed`); `SteerError`, which
every one of them may raise."""

from l2s.errors import L2SError


class SteerError(L2SError, RuntimeError):
    """Steering cannot run as asked (no classifier, out of memory, ...); says what to do."""
