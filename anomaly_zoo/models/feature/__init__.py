"""Deep feature modeling: anomaly = distance to normal features of a pretrained CNN."""
from . import padim  # noqa: F401
