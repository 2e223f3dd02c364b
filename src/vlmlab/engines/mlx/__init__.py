"""The MLX backend: :mod:`.engine` (needs mlx-vlm) and :mod:`.translate` (pure, tested anywhere).

Kept empty on purpose: importing :mod:`.translate` must not import the engine (or MLX).
"""
