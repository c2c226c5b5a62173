"""Operating jobs: the ``ftdiloco`` command, the local launcher and the
torchx component.  Nothing here runs inside a training step."""
