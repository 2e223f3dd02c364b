"""The remote backend: :mod:`.engine` (connections and retries) and :mod:`.wire` (pure
OpenAI-protocol helpers).

Kept empty on purpose: the registry names ``vlmlab.engines.remote.engine:RemoteEngine`` directly.
"""
