"""The contract of the core (issue 10): no import cycle, small files, hyperparameters declared once and
checked in one place for every registered model, checkpoint-or-train that knows its settings."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import anomaly_zoo as az
from anomaly_zoo.params import Param
from anomaly_zoo.utils import AnomalyZooError

PACKAGE = Path(az.__file__).resolve().parent
MODELS = [c.name for c in az.list_models()]


# ------------------------------------------------------------------ structure
def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports explicitly (``from . import x`` counts as module x)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    out.add(sub)
                elif target in modules:
                    out.add(target)
    out.discard(name)
    return out


def test_import_graph_has_no_cycle():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _imports(p, set(files)) for m, p in files.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # the registry is a leaf below the models; the factory sits above them
    assert graph["anomaly_zoo.registry"] <= {"anomaly_zoo.utils"}
    assert "anomaly_zoo.models" in graph["anomaly_zoo.factory"]


def test_no_library_file_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"library files over 400 lines: {long}"


def test_hyperparameters_are_not_copied_by_hand():
    """A Detector declares its hyperparameters as Params (stored once, by the base class); no Detector
    subclass copies ``self.x = x`` by hand. Plain nn.Module building blocks (a memory queue, a coupling
    layer) keep their constructor arguments as any module does, and are not counted."""
    import ast

    copied = []
    for p in (PACKAGE / "models").rglob("*.py"):
        for cls in ast.walk(ast.parse(p.read_text())):
            bases = {getattr(b, "id", getattr(b, "attr", "")) for b in getattr(cls, "bases", [])}
            if not isinstance(cls, ast.ClassDef) or not bases & {"Detector", "FeatureDetector"}:
                continue
            for node in ast.walk(cls):
                if (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(t := node.targets[0], ast.Attribute) and getattr(t.value, "id", "") == "self"
                        and isinstance(node.value, ast.Name) and node.value.id == t.attr):
                    copied.append(f"{p.relative_to(PACKAGE)}:{node.lineno}: self.{t.attr} = {t.attr}")
    assert not copied, "\n".join(copied)


def test_import_does_not_load_pyplot_or_pandas():
    code = "import sys, anomaly_zoo as az; az.list_models(); print(sorted(m for m in ('matplotlib.pyplot', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert az.viz.show_predictions  # still there, on first use


# ------------------------------------------------------------ hyperparameters
def _bad_values(spec: Param) -> list:
    out = []
    if spec.choices is not None:
        out.append("not-a-choice")
    elif spec.kind is bool:
        out.append("yes")
    elif spec.kind in (int, float):
        if spec.low is not None:
            out.append(spec.low if spec.low_open else spec.low - 1)
        if spec.high is not None:
            out.append(spec.high if spec.high_open else spec.high + 1)
        out += ["3", float("nan")] + ([1.5] if spec.kind is int else [])
    elif spec.kind is tuple:
        out += [[], 7]
    elif spec.kind is str:
        out.append(3)
    elif spec.kind is dict:
        out += [[("epochs", 1)], {1: 2}]
    if not spec.none:
        out.append(None)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_is_declared_with_a_range(name):
    cls = az.get_card(name).cls
    for key, spec in cls._params.items():
        assert spec.kind is not object, f"{name}.{key}: declare its kind and range (Param(default, kind, ...))"
        if spec.kind in (int, float) and spec.choices is None:
            assert spec.low is not None or spec.high is not None, f"{name}.{key}: a number needs a range"
        assert spec.check(spec.default), f"{name}.{key}: the default {spec.default!r} is outside its own range"
    for preset in ("default", "quick"):
        az.create(name, preset=preset).check_params()  # the presets are in range


@pytest.mark.parametrize("name", MODELS)
def test_every_bad_hyperparameter_gives_one_clear_error(name, tiny):
    """Each out-of-range value of each parameter: an AnomalyZooError naming it, before any work."""
    train, _ = tiny
    cls = az.get_card(name).cls
    for key, spec in cls._params.items():
        for value in _bad_values(spec):
            det = az.create(name, preset="quick", **{key: value})
            with pytest.raises(AnomalyZooError, match=rf"{name}: {key}=.* is out of range; allowed: "):
                det.fit(train)


@pytest.mark.parametrize("name, key, value", [
    ("ae", "image_size", -5), ("ae", "batch_size", 0), ("ae", "latent_dim", 0), ("ms_ssim_ae", "nu", 1.5),
    ("ae", "epochs", -1), ("ae", "lr", 0), ("padim", "n_features", 0), ("padim", "sigma", -1),
    ("ae", "image_size", 40),  # the conv auto-encoder needs a multiple of 16
])
def test_the_reported_bad_values(name, key, value, tiny):
    with pytest.raises(AnomalyZooError, match=rf"{name}: {key}={value!r} is out of range; allowed: "):
        az.create(name, preset="quick", **{key: value}).fit(tiny[0])


def test_unsupervised_methods_refuse_labels(tiny):
    with pytest.raises(AnomalyZooError, match="unsupervised"):
        az.create("padim", preset="quick", pretrained=False).fit(tiny[0], labels=[0] * len(tiny[0]))


# ------------------------------------------------------------ checkpoint-or-train
def test_fit_checkpoint_loads_on_same_settings_and_retrains_on_any_change(tiny, tmp_path, monkeypatch):
    train, test = tiny
    cls = az.get_card("ae").cls
    calls = []
    real_fit = cls._fit
    monkeypatch.setattr(cls, "_fit", lambda self, x: (calls.append(self.get_params()), real_fit(self, x))[1])
    ck = tmp_path / "ae.pt"
    first = az.create("ae", preset="quick", epochs=2).fit(train, checkpoint=ck)
    assert ck.is_file() and len(calls) == 1
    again = az.create("ae", preset="quick", epochs=2).fit(train, checkpoint=ck)
    assert len(calls) == 1, "same parameters and data: the checkpoint must be loaded, not trained again"
    assert torch.equal(again.predict(test).maps, first.predict(test).maps)
    assert again.history_ == first.history_
    az.create("ae", preset="quick", epochs=2, lr=1e-3).fit(train, checkpoint=ck)  # another lr: trains
    assert len(calls) == 2 and calls[-1]["lr"] == 1e-3
    az.create("ae", preset="quick", epochs=2, lr=1e-3).fit(train.flip(0), checkpoint=ck)  # other data: trains
    assert len(calls) == 3
    az.create("ae", preset="quick", epochs=2, lr=1e-3).fit(train.flip(0), checkpoint=ck)  # now it loads
    assert len(calls) == 3
