"""The hub topology: DiLoCo through one server, for groups that cannot reach each other.

``ftdiloco hub`` (:mod:`.server`) holds the global weights and the outer
optimizer; :class:`.client.HubManager` is a group's manager when
``FTDILOCO_TOPOLOGY=hub``.  The round rules are pure (:mod:`.rounds`); the
tensors travel as streamed, checksummed safetensors (:mod:`.wire`).
"""
