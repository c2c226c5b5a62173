"""Moving a group's state: the registry of what is replicated, heals from a
live peer over HTTP (safetensors, checksummed chunks) and durable
checkpoints on disk."""
