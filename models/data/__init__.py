"""Data sets: the synthetic lumbar spine phantom (``models.data.phantom``) and its parts."""
