"""The model registry (one preset helper, keyword checking, imports that point one way) and the shared surface."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import widesparse
from widesparse.models import create_model, list_models, model_defaults, model_entrypoint, registry
from widesparse.models.registry import check_kwargs, model_kwargs, register_preset
from widesparse.models.surface import ModelSurface

from helpers import make_small, small_kwargs

SRC = Path(widesparse.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports (top level and inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_the_registry_imports_no_model_and_specs_no_catalog() -> None:
    assert not {m for m in _imports(SRC / "models" / "registry.py") if m.startswith("widesparse")}
    assert not {m for m in _imports(SRC / "experiments" / "specs.py") if "catalog" in m}
    assert "widesparse.experiments.specs" in _imports(SRC / "experiments" / "catalog.py")


@pytest.mark.parametrize(
    "code",
    [
        "from widesparse.models.registry import create_model, list_models; "
        "assert 'kron_mlp' in list_models() and create_model('mixer', depth=1).num_classes == 10",
        "import widesparse.experiments.specs as s; from widesparse.experiments import list_experiments; "
        "assert list_experiments()[0] == 'E1'",
        "from widesparse.experiments.catalog import get_experiment; assert get_experiment('e3').id == 'E3'",
    ],
)
def test_fresh_interpreter_imports(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture
def scratch() -> Iterator[list[str]]:
    """Names registered by a test, removed afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        registry._REGISTRY.pop(n, None)


class _Toy(nn.Module):
    def __init__(self, width: int = 2, depth: int = 1, *, kind: str = "a", seed: int = 0) -> None:
        super().__init__()
        self.width, self.depth, self.kind, self.seed = width, depth, kind, seed


def test_register_preset_checks_kwargs_and_records_the_preset(scratch: list[str]) -> None:
    fn = register_preset("_toy_a", _Toy, {"width": 5}, "A toy.", fixed={"kind": "b"})
    scratch.append("_toy_a")
    assert model_entrypoint("_toy_a") is fn and fn.__doc__ == "A toy." and fn.__name__ == "_toy_a"
    assert model_defaults("_toy_a") == {"width": 5}
    m = create_model("_toy_a", depth=3, seed=None)
    assert (m.width, m.depth, m.kind, m.seed) == (5, 3, "b", 0)
    with pytest.raises(TypeError, match=r"model '_toy_a' got unknown keyword argument\(s\) \['kind'\]; "
                                        r"valid: \['depth', 'seed', 'width'\]"):
        create_model("_toy_a", kind="c")  # fixed arguments are not the caller's
    with pytest.raises(ValueError, match="already registered"):
        register_preset("_toy_a", _Toy)


def test_register_preset_rejects_a_bad_preset_and_runs_the_check(scratch: list[str]) -> None:
    with pytest.raises(TypeError, match=r"model '_toy_b' got unknown keyword argument\(s\) \['widht'\]"):
        register_preset("_toy_b", _Toy, {"widht": 5})

    def no_depth_2(kwargs: dict) -> None:
        if kwargs.get("depth") == 2:
            raise ValueError("depth 2 is not allowed")

    register_preset("_toy_c", _Toy, check=no_depth_2)
    scratch.append("_toy_c")
    assert create_model("_toy_c", depth=3).depth == 3
    with pytest.raises(ValueError, match="depth 2"):
        create_model("_toy_c", depth=2)


def test_model_kwargs_reads_the_signature() -> None:
    assert model_kwargs(_Toy) == ["depth", "kind", "seed", "width"]
    assert model_kwargs(_Toy, exclude=("kind",)) == ["depth", "seed", "width"]
    from widesparse.models.sw_mlp import SwMlp

    assert {"width", "density", "mask_seed", "init_seed"} <= set(model_kwargs(SwMlp))  # keyword-only ones too
    with pytest.raises(TypeError, match=r"model 'x' got unknown keyword argument\(s\) \['b'\]; valid: \['a'\]"):
        check_kwargs("x", {"a": 1, "b": 2}, ["a"])


def test_every_model_names_itself_in_keyword_errors() -> None:
    for name in list_models():
        with pytest.raises(TypeError, match=rf"model '{name}' got unknown keyword argument\(s\) \['nope'\]; valid:"):
            create_model(name, nope=1)
    with pytest.raises(TypeError, match=r"\['layer'\]"):
        create_model("kron_mlp", layer="monarch")
    with pytest.raises(ValueError, match="dense MLP"):
        create_model("mlp", density=0.5)
    assert model_defaults("mlp") == {"density": 1.0, "backend": "masked"}
    assert model_defaults("monarch_mlp") == {} and model_defaults("rp_mixer") == {"permutation": "random"}


@pytest.mark.parametrize("name", ["mixer", "sw_mlp", "monarch_mlp", "kron_mlp"])
def test_every_model_shares_the_surface(name: str) -> None:
    model = make_small(name, dtype=torch.float64)
    assert isinstance(model, ModelSurface)
    x = torch.randn(3, small_kwargs(name)["in_chans"], 8, 8, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n])
    assert len(model.feature_names()) == len(model.forward_intermediates(x, intermediates_only=True))
    model.reset_classifier(0)
    assert model(x).shape == (3, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (3, 7) and model.head.weight.dtype == torch.float64
