"""Moved into the package: ``ftdiloco/examples/train_diloco.py``.

Run it as ``python -m ftdiloco.examples.train_diloco`` or ``torchrun ... -m
ftdiloco.examples.train_diloco``; ``ftdiloco launch`` runs it by default.
This file keeps ``torchrun examples/train_diloco.py`` and
``import train_diloco`` (with ``examples/`` on ``sys.path``) working.
"""

import sys

from ftdiloco.examples import train_diloco as _example

if __name__ == "__main__":
    sys.exit(_example.main())
sys.modules[__name__] = _example
