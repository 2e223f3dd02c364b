"""The mistral-inference backend: :mod:`.engine` (needs mistral-inference and an NVIDIA GPU) and
:mod:`.translate` (mistral_common only, tested anywhere).

Kept empty on purpose: importing :mod:`.translate` must not import the engine (or torch).
"""
