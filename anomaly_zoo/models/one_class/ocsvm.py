"""One-class SVM on pooled pretrained features (Schölkopf et al., Neural Computation 2001).

The classical one-class baseline of the survey: separate the normal data from the
origin with maximum margin in the feature space of a kernel (Schölkopf et al. 2001,
eq. 3):

    min_{w, xi, rho}  1/2 ||w||^2 + 1/(nu n) sum_i xi_i - rho
    s.t.  <w, phi(x_i)> >= rho - xi_i,  xi_i >= 0.

Its dual solution gives the decision function (their eq. 4; scikit-learn's
``decision_function``)

    f(x) = sum_i alpha_i k(x_i, x) - rho,     k(x, y) = exp(-gamma ||x - y||^2),

positive inside the learned support of normal data. ``nu`` in (0, 1] upper-bounds the
fraction of training points outside and lower-bounds the fraction of support vectors.

* Features: the images go through a frozen ImageNet backbone; each tap in ``layers``
  (default: the taps at strides 8 and 16, Lite0's stage3 and stage5) is average-pooled
  over space and the taps are concatenated (a "deep features +
  classical detector" baseline as in Ruff et al. 2018's comparisons).
* ``gamma``: the median heuristic, 1 / median of the pairwise squared distances
  between training features (a common default that needs no labels).
* Fitting: scikit-learn's ``OneClassSVM`` (libsvm). Scoring: the decision function is
  recomputed in torch from the stored support vectors, dual coefficients, intercept
  and gamma (float64 buffers), so a saved detector reloads with
  ``torch.load(weights_only=True)`` and no pickled scikit-learn object.
* Score: ``-f(x)`` (higher = more anomalous). Image level only: no map.
"""
from __future__ import annotations

import torch

from ...base import FeatureDetector
from ...ops import extract
from ...params import Param
from ...registry import register


def median_gamma(feats: torch.Tensor) -> float:
    """The median heuristic: ``1 / median(||x_i - x_j||^2)`` over distinct training pairs."""
    d = torch.cdist(feats.double(), feats.double()).pow(2)
    iu = torch.triu_indices(len(feats), len(feats), offset=1)
    med = float(d[iu[0], iu[1]].median()) if len(feats) > 1 else 1.0
    return 1.0 / max(med, 1e-12)


def decision_function(z: torch.Tensor, support: torch.Tensor, dual_coef: torch.Tensor, intercept: torch.Tensor,
                      gamma: torch.Tensor) -> torch.Tensor:
    """``f(z) = sum_i alpha_i exp(-gamma ||z - s_i||^2) + intercept`` (eq. 4; > 0 inside), float64."""
    z = z.double()
    k = torch.exp(-gamma * torch.cdist(z, support).pow(2))
    return k @ dual_coef + intercept


@register("ocsvm", family="one_class", paper="Estimating the Support of a High-Dimensional Distribution",
          year=2001, bibkey="scholkopf2001ocsvm", localizes=False, trains=False, quick=dict(image_size=64),
          deviations=("the paper's OC-SVM runs on raw inputs with a hand-set gamma; here on spatially pooled "
                      "EfficientNet-Lite0 features (stages 3 and 5, strides 8 and 16) with the median-heuristic "
                      "gamma (a deep-features baseline as in Ruff et al. 2018's comparisons)",
                      "solved by scikit-learn's libsvm; the decision function is re-evaluated in torch"))
class OCSVM(FeatureDetector):
    """One-class SVM (RBF kernel, median-heuristic gamma) on pooled pretrained CNN features."""

    #: taps pooled by default: the mid (stride 8) and the deepest tapped stage (stride 16)
    default_strides = (8, 16)

    nu = Param(0.1, float, low=0, high=1, low_open=True,
               help="upper bound on the training fraction outside, lower bound on the support-vector fraction (eq. 3)")
    gamma = Param(None, float, low=0, low_open=True, none=True,
                  help="RBF kernel width of eq. 4; None: the median heuristic 1 / median ||x_i - x_j||^2")
    image_size = Param.image_size(224)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> pooled, concatenated tap features ``[B, d]``."""
        feats = self.extractor_(x.to(self.device_))
        return torch.cat([feats[k].mean((2, 3)) for k in self.layers_], dim=1).float()

    def _fit(self, x: torch.Tensor) -> None:
        from sklearn.svm import OneClassSVM

        z = extract(self.features, x, self.predict_batch_size, self.device_).double()
        gamma = float(self.gamma) if self.gamma is not None else median_gamma(z)
        svm = OneClassSVM(kernel="rbf", nu=self.nu, gamma=gamma).fit(z.numpy())
        self.diagnostics_["n_support"] = int(len(svm.support_))
        self.register_buffer("support_vectors_", torch.from_numpy(svm.support_vectors_).double().to(self.device_))
        self.register_buffer("dual_coef_", torch.from_numpy(svm.dual_coef_[0]).double().to(self.device_))
        self.register_buffer("intercept_", torch.tensor(float(svm.intercept_[0]), dtype=torch.float64,
                                                        device=self.device_))
        # gamma is state (scoring needs it), so it is a buffer, saved with the support vectors
        self.register_buffer("gamma_", torch.tensor(gamma, dtype=torch.float64, device=self.device_))

    def decision_function(self, images) -> torch.Tensor:
        """The SVM's ``f(x)`` for images (positive = inside the normal support), like scikit-learn's."""
        x = self._prepare(images, "images")
        z = extract(self.features, x, self.predict_batch_size, self.device_, out_device=self.device_)
        return decision_function(z, self.support_vectors_, self.dual_coef_, self.intercept_, self.gamma_).cpu()

    def _score(self, x: torch.Tensor):
        f = decision_function(self.features(x), self.support_vectors_, self.dual_coef_, self.intercept_, self.gamma_)
        return -f.float(), None
