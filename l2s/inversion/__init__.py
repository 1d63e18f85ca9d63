"""Dual-prompt inversion into the attention cache: data sources (`sources`), the inversion loop
(`loop`), the on-disk cache (`cache`) and the `l2s invert` job (`job`)."""
