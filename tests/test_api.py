"""The Detector API of DESIGN.md: registry, inputs, errors, save/load, seeding, the training loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import anomaly_zoo as az
from anomaly_zoo.utils import AnomalyZooError, NotFittedError, check_images


# ------------------------------------------------------------------ registry
def test_list_models_cards_and_frame():
    cards = az.list_models()
    names = [c.name for c in cards]
    assert {"padim", "ae"} <= set(names)
    for c in cards:
        assert c.family in az.FAMILIES and c.year > 1990 and c.bibkey and c.paper
        assert isinstance(c.quick, dict)
    df = az.list_models(as_frame=True)
    assert list(df.index) == names and {"family", "year", "localizes", "trains"} <= set(df.columns)
    assert [c.name for c in az.list_models(family="feature")] == [c.name for c in cards if c.family == "feature"]


def test_create_presets_and_overrides():
    det = az.create("padim")
    assert det.image_size == 256 and det.pretrained is True and det.backbone == "efficientnet_lite0"
    assert az.create("padim", preset="quick").image_size == 128
    assert az.create("padim", preset="quick", image_size=96).image_size == 96
    assert az.create("padim", pretrained=False).pretrained is False
    assert "image_size=96" in repr(az.create("padim", image_size=96))


def test_create_errors_name_the_problem():
    with pytest.raises(AnomalyZooError, match="unknown model 'padin'.*Did you mean padim.*Known models"):
        az.create("padin")
    with pytest.raises(AnomalyZooError, match="unknown preset"):
        az.create("padim", preset="fast")
    with pytest.raises(AnomalyZooError, match="padim has no parameter bogus"):
        az.create("padim", bogus=1)
    with pytest.raises(AnomalyZooError, match="unknown family"):
        az.list_models(family="nope")


def test_init_stores_params_only():
    det = az.create("ae", loss="ssim", device="cuda-does-not-matter-yet")
    assert det.get_params()["loss"] == "ssim"
    assert not det.is_fitted and not hasattr(det, "device_")  # device resolved in fit, never in __init__


# --------------------------------------------------------------- input checks
@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 32, 32), "expected 4 dimensions"),
    (torch.rand(2, 4, 32, 32), "expected 3 channels"),
    (torch.rand(2, 3, 32, 32) * 255, r"values must lie in \[0, 1\].*divide 8-bit images by 255"),
    (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
    (torch.rand(0, 3, 32, 32), "empty"),
    ([[0.5]], "expected a torch.Tensor or numpy array"),
])
def test_bad_inputs_raise_one_clear_error(bad, message):
    with pytest.raises(AnomalyZooError, match=message):
        az.create("padim", preset="quick").fit(bad)


def test_numpy_and_grayscale_accepted():
    x = np.random.default_rng(0).random((2, 1, 16, 16)).astype(np.float64)
    t = check_images(x)
    assert t.dtype == torch.float32 and t.shape == (2, 3, 16, 16)
    assert torch.equal(t[:, 0], t[:, 2])


def test_predict_before_fit_and_save_before_fit(tmp_path):
    det = az.create("padim", preset="quick")
    with pytest.raises(NotFittedError, match="not fitted yet: call .fit"):
        det.predict(torch.rand(1, 3, 32, 32))
    with pytest.raises(NotFittedError):
        det.save(tmp_path / "x.pt")


def test_test_size_mismatch(tiny):
    train, _ = tiny
    det = az.create("padim", preset="quick", image_size=None, pretrained=False).fit(train)
    with pytest.raises(AnomalyZooError, match="fitted on"):
        det.predict(torch.rand(1, 3, 48, 48))


def test_load_errors(tmp_path):
    with pytest.raises(AnomalyZooError, match="no saved detector"):
        az.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AnomalyZooError, match="not a detector saved by anomaly_zoo"):
        az.load(tmp_path / "junk.pt")


def test_resolve_device():
    assert az.resolve_device("cpu").type == "cpu"
    assert az.resolve_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(AnomalyZooError, match="no CUDA GPU"):
            az.resolve_device("cuda")
    with pytest.raises(AnomalyZooError, match="unknown device"):
        az.resolve_device("tpu9")


# ------------------------------------------------------------ training loop
def _linear_problem():
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def test_fit_loop_learns_and_repeats():
    from anomaly_zoo.training import fit_loop

    def run():
        az.set_seed(0)
        net = torch.nn.Linear(4, 1)
        hist = fit_loop(net, lambda b, ctx: torch.nn.functional.mse_loss(net(b[0]), b[1]), _linear_problem(),
                        epochs=30, batch_size=16, lr=0.05, seed=0, progress=False)
        return net, hist

    net1, h1 = run()
    net2, h2 = run()
    assert h1 == h2 and torch.equal(net1.weight, net2.weight)  # one seed -> identical run
    assert h1[-1] < 0.01 * h1[0]  # it learns


def test_fit_loop_context_players_schedule_and_clipping():
    """Two players in turn (one every second batch), the context's epoch/step/generator, a
    multistep schedule per epoch and gradient clipping: what the GAN and flow families need."""
    from anomaly_zoo.training import Player, fit_loop

    a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    module = torch.nn.ModuleList([a, b])
    seen = []

    def step_a(batch, ctx):
        seen.append(("a", ctx.epoch, ctx.step))
        assert isinstance(ctx.generator, torch.Generator) and ctx.device.type == "cpu"
        return torch.nn.functional.mse_loss(a(batch[0]), batch[1])

    def step_b(batch, ctx):
        seen.append(("b", ctx.epoch, ctx.step))
        return torch.nn.functional.mse_loss(b(batch[0]), batch[1]) * 1e6  # huge gradients, clipped

    hist = fit_loop(module, [Player("a", step_a, a.parameters()), Player("b", step_b, b.parameters(), lr=0.01,
                                                                         every=2)],
                    _linear_problem(), epochs=3, batch_size=16, lr=0.05, schedule="multistep", milestones=[1],
                    gamma=0.1, clip_grad=1.0, progress=False)
    assert set(hist) == {"a", "b"} and len(hist["a"]) == 3 and len(hist["b"]) == 3
    assert [s for s in seen if s[0] == "a"][:5] == [("a", 0, 0), ("a", 0, 1), ("a", 0, 2), ("a", 0, 3), ("a", 1, 4)]
    assert [s[2] for s in seen if s[0] == "b"] == [0, 2, 4, 6, 8, 10]  # every second batch
    assert all(torch.isfinite(p).all() for p in b.parameters())  # clipping kept the huge loss finite


def test_fit_loop_schedules_change_the_learning_rate(monkeypatch):
    """multistep and exponential step once per epoch, cosine once per batch (read off the optimiser)."""
    from anomaly_zoo import training

    seen = {}
    real = training.make_optimizer

    def spy(*args, **kwargs):
        opt = real(*args, **kwargs)
        seen.setdefault("opts", []).append(opt)
        return opt

    monkeypatch.setattr(training, "make_optimizer", spy)
    for schedule, kw, expected in [("multistep", dict(milestones=[2], gamma=0.1), [1.0, 1.0, 0.1, 0.1]),
                                   ("exponential", dict(gamma=0.5), [1.0, 0.5, 0.25, 0.125])]:
        net, lrs = torch.nn.Linear(4, 1), []
        seen.clear()
        training.fit_loop(net, lambda b, ctx, net=net: torch.nn.functional.mse_loss(net(b[0]), b[1]) * 0,
                          _linear_problem(), epochs=4, batch_size=16, lr=1.0, schedule=schedule, progress=False,
                          on_epoch_end=lambda ctx, lrs=lrs: lrs.append(seen["opts"][0].param_groups[0]["lr"]), **kw)
        # the value after each epoch's scheduler step: what the next epoch trains with
        assert lrs == pytest.approx(expected[1:] + [expected[-1] * (0.5 if schedule == "exponential" else 1)])
    with pytest.raises(AnomalyZooError, match="unknown schedule"):
        training.fit_loop(torch.nn.Linear(4, 1), lambda b, c: b.sum(), torch.ones(4, 4), epochs=1, batch_size=2,
                          lr=0.1, schedule="bogus", progress=False)


def test_fit_loop_reports_divergence():
    from anomaly_zoo.training import fit_loop

    net = torch.nn.Linear(2, 1)
    with pytest.raises(AnomalyZooError, match="lower the learning rate"):
        fit_loop(net, lambda b, ctx: net(b).sum() * float("inf"), torch.ones(4, 2), epochs=1, batch_size=2, lr=1.0,
                 progress=False)


def test_fit_loop_never_makes_a_batch_of_one():
    """A trailing single image joins the batch before it (batch norm cannot train on one image)."""
    from anomaly_zoo.training import fit_loop

    sizes = []
    net = torch.nn.Linear(2, 1)
    fit_loop(net, lambda b, ctx: (sizes.append(len(b)), net(b).pow(2).mean())[1], torch.ones(17, 2), epochs=2,
             batch_size=8, lr=0.1, progress=False)
    assert sizes == [8, 9, 8, 9]
    sizes.clear()
    fit_loop(net, lambda b, ctx: (sizes.append(len(b)), net(b).pow(2).mean())[1], torch.ones(18, 2), epochs=1,
             batch_size=8, lr=0.1, progress=False)
    assert sizes == [8, 8, 2]


def test_progress_is_quiet_without_a_watcher(monkeypatch):
    from anomaly_zoo.utils import progress_enabled

    monkeypatch.setenv("AZOO_NO_PROGRESS", "1")
    assert not progress_enabled()
    monkeypatch.setenv("AZOO_NO_PROGRESS", "0")
    # pytest captures stderr (not a TTY) and no Jupyter kernel runs here: nobody watches
    assert not progress_enabled()


def test_channels_last_input_gives_the_contiguous_result(tiny):
    """A numpy HWC array permuted to NCHW is channels-last in memory (the retina set's images are); every
    method sees a contiguous tensor (torch 2.13's CPU convolution backward segfaulted in NSA on such input)."""
    train, test = tiny
    last = train.contiguous(memory_format=torch.channels_last)
    assert not last.is_contiguous()
    det = az.create("nsa", preset="quick", epochs=1, seed=0)
    assert det._prepare(last, "images").is_contiguous()
    a = det.fit(last).predict(test).scores
    b = az.create("nsa", preset="quick", epochs=1, seed=0).fit(train).predict(test).scores
    assert torch.allclose(a, b, atol=1e-5)
