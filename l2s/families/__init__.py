"""Backbone families: each module registers its presets, loader and Denoiser adapter.

``l2s.engine.registry`` imports every module of this package on first use (a new family is one
new module here, registered by its own import); the core never imports them by name.
"""

# Module names whose families `l2s models` lists first, in this order; the others follow by name.
LISTING_ORDER = ("toy", "toy_mmdit", "sd", "flux", "sd3")
