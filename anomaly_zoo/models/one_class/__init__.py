"""One-class classification: learn a tight description of normal data (a hypersphere, a
support), score by how far outside it a sample falls (OC-SVM, Deep SVDD, Patch SVDD, FCDD)."""
from . import deep_svdd, fcdd, ocsvm, patch_svdd  # noqa: F401
