"""Normalizing flows: the exact likelihood of normal features, by the change of variables.

* ``differnet``: one flow on globally pooled multi-scale features; gradient maps;
* ``cflow``: conditional flows on every position of three taps, conditioned on where it is;
* ``fastflow``: 2-D flows with convolutional subnets on each tap;
* ``csflow``: one flow across three image scales at once (cross-scale convolutions).

The blocks they share (affine coupling with soft clamping, permutations, global affine,
log-determinant bookkeeping) are written once in :mod:`.coupling`.
"""
from . import cflow, csflow, differnet, fastflow  # noqa: F401
