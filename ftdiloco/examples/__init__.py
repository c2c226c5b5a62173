"""Runnable examples that ship with the package.

``python -m ftdiloco.examples.train_diloco`` (or ``torchrun -m
ftdiloco.examples.train_diloco``) trains a small byte-level GPT with
fault-tolerant DiLoCo; ``ftdiloco launch`` runs it by default.
"""
