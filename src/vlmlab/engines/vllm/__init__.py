"""The vLLM backend: :mod:`.engine` (needs vLLM) and :mod:`.translate` (pure, tested anywhere).

Kept empty on purpose: importing :mod:`.translate` must not import the engine (or vLLM).
"""
