"""Backbone families: each module registers its presets, loader and Denoiser adapter.

``l2s.engine.registry`` imports the built-in ones on first use; the core never imports them.
"""
