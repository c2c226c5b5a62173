"""Moved into the package: ``ftdiloco/examples/model.py`` (``ftdiloco.examples.model``).

This file keeps ``from model import GPT`` (with ``examples/`` on ``sys.path``) working.
"""

import sys

from ftdiloco.examples import model as _model

sys.modules[__name__] = _model
