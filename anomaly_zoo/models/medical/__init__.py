"""Medical imaging systems (the book's chapter "Medical imaging"), one file each:

* ``squid``: patches in-painted from per-position memory queues, teacher/student generators, a discriminator;
* ``pnet``: the structure-texture relation (structure of the image vs structure of its reconstruction);
* ``descargan``: weakly supervised diseased-to-healthy translation (fit needs image labels).
"""
from . import descargan, pnet, squid  # noqa: F401
