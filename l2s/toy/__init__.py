"""The toy world: shapes scenes, a tiny text-to-image model and a detector."""
