"""The transformers backend: :mod:`.engine` (``HFEngine``) and the parts it is built from.

Kept empty on purpose: importing one part (say :mod:`.prompt` in a test) must not load the
engine, and the registry names ``vlmlab.engines.hf.engine:HFEngine`` directly.
"""
