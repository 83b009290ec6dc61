"""anomaly_zoo.validation: the proxy validation set made from training images only (disjoint from the images
fitted on, labels and masks that agree with what was corrupted, repeatable per seed, clear errors), and
proxy_score's metrics, checked with an oracle detector that knows the clean images."""
from __future__ import annotations

import pytest
import torch

import anomaly_zoo as az
from anomaly_zoo.validation import DEFAULT_KINDS, ProxySplit, proxy_score, proxy_split


def _images(n=20, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _source_index(x, img, mask):
    """The one original of ``x`` that ``img`` equals outside ``mask`` (cutpaste and scars change nothing else)."""
    keep = (mask == 0)[None]
    hits = [i for i in range(len(x)) if torch.equal(torch.where(keep, x[i], 0), torch.where(keep, img, 0))]
    assert len(hits) == 1, hits
    return hits[0]


def test_proxy_split_is_disjoint_and_covers_every_image_once():
    x = _images(20)
    s = proxy_split(x, kind=("cutpaste", "cutpaste_scar"), fraction=0.25, seed=3)
    assert isinstance(s, ProxySplit) and len(s.fit_images) == 15 and len(s.val_images) == 5
    fit_idx = [_source_index(x, img, torch.zeros(32, 32)) for img in s.fit_images]
    val_idx = [_source_index(x, img, m) for img, m in zip(s.val_images, s.val_masks)]
    assert sorted(fit_idx + val_idx) == list(range(20))  # disjoint, and nothing lost
    assert fit_idx == sorted(fit_idx)  # the fit images keep their order


@pytest.mark.parametrize("kind", [DEFAULT_KINDS, "nsa", ("confetti", "cutpaste", "cutpaste_scar")])
def test_proxy_split_labels_and_masks_agree_with_the_corruption(kind):
    x = _images(24)
    s = proxy_split(x, kind=kind, fraction=0.5, seed=1)
    assert s.val_masks.shape == (12, 32, 32) and set(s.val_masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(s.val_labels, (s.val_masks.flatten(1).amax(1) > 0).float())
    assert int(s.val_labels.sum()) == 6  # half of the held-out images
    assert 0 < s.val_labels[:6].sum() < 6 or 0 < s.val_labels[6:].sum() < 6  # shuffled, not the first half
    for img, m, y in zip(s.val_images, s.val_masks, s.val_labels):
        if y:  # an anomalous image differs from every original inside its mask
            assert min(float((img - o).abs().amax(0)[m > 0].max()) for o in x) > 0
        else:  # a normal one is an original, untouched
            assert any(torch.equal(img, o) for o in x)
    assert s.val_images.min() >= 0 and s.val_images.max() <= 1


def test_proxy_split_repeats_per_seed_and_changes_with_it():
    x = _images(16)
    a, b, c = proxy_split(x, seed=5), proxy_split(x, seed=5), proxy_split(x, seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(p.shape == q.shape and torch.equal(p, q) for p, q in zip(a, c))
    assert torch.equal(a.fit_images, proxy_split(x.numpy(), seed=5).fit_images)  # numpy input too


@pytest.mark.parametrize("kw,match", [
    (dict(fraction=0.0), "fraction"), (dict(fraction=1.0), "fraction"), (dict(fraction=1.5), "fraction"),
    (dict(fraction=-0.2), "fraction"), (dict(fraction=True), "fraction"), (dict(fraction="0.3"), "fraction"),
    (dict(kind="perlin_typo"), "kind"), (dict(kind=()), "kind"), (dict(kind=("nsa", 3)), "kind"),
    (dict(seed=1.5), "seed"),
])
def test_proxy_split_bad_arguments(kw, match):
    with pytest.raises(az.AnomalyZooError, match=match):
        proxy_split(_images(20), **kw)


def test_proxy_split_too_few_images():
    with pytest.raises(az.AnomalyZooError, match="hold out 1 and leave 4"):
        proxy_split(_images(5), fraction=0.25)
    with pytest.raises(az.AnomalyZooError, match="leave 1"):
        proxy_split(_images(5), fraction=0.8)
    with pytest.raises(az.AnomalyZooError, match="images"):
        proxy_split(torch.rand(3, 32, 32))  # not [N, 3, H, W]
    assert len(proxy_split(_images(4), fraction=0.5).val_images) == 2  # the smallest split that works


class _Oracle:
    """A 'detector' that knows the clean images: its map is the distance to the nearest clean training image
    (exact on the proxy set), its score the map's mean; ``sign=-1`` negates both."""

    def __init__(self, originals, sign=1.0):
        self.originals, self.sign, self.fitted_on = originals, sign, None

    def fit(self, images):
        self.fitted_on = images
        return self

    def predict(self, images):
        maps = torch.stack([(self.originals - img).abs().amax(1).amin(0) for img in images])
        maps = maps * self.sign
        return az.Prediction(maps.flatten(1).mean(1), maps)


def test_proxy_score_evaluates_on_the_proxy_set_it_built():
    x = _images(24)
    good = _Oracle(x)
    report = proxy_score(lambda: good, x, kind=("cutpaste", "cutpaste_scar"), fraction=0.5, seed=2)
    assert torch.equal(good.fitted_on, proxy_split(x, kind=("cutpaste", "cutpaste_scar"), fraction=0.5,
                                                   seed=2).fit_images)
    assert report["image_auroc"] == 1.0 and report["pixel_auroc"] > 0.99 and report["aupro"] > 0.99
    assert report["fit_seconds"] >= 0
    bad = proxy_score(lambda: _Oracle(x, sign=-1.0), x, kind=("cutpaste", "cutpaste_scar"), fraction=0.5, seed=2)
    assert bad["image_auroc"] == 0.0 and bad["pixel_auroc"] < 0.5


def test_proxy_score_with_a_registry_name_and_its_errors():
    x = _images(12, size=64)
    report = proxy_score("padim", x, fraction=0.5, preset="quick", pretrained=False, image_size=64)
    assert {"image_auroc", "pixel_auroc", "aupro", "fit_seconds"} <= set(report)
    assert all(0 <= report[k] <= 1 for k in ("image_auroc", "pixel_auroc", "aupro"))
    with pytest.raises(az.AnomalyZooError, match="params"):
        proxy_score(lambda: _Oracle(x), x, epochs=3)
    with pytest.raises(az.AnomalyZooError, match="detector"):
        proxy_score(42, x)
    with pytest.raises(az.AnomalyZooError, match="fraction"):
        proxy_score(lambda: _Oracle(x), x, fraction=0)
