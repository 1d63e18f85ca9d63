"""Steering: the latent-update loop (`loop`), relation losses (`losses`), the `l2s steer` job
(`job`), verify-then-steer (`verify`), the diffusers callback (`pipeline`), figures (`plots`) and
the speed benchmark (`speed`)."""
