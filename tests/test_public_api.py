"""Import paths that the README, the CLI and outside scripts use keep working (add, don't rename)."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "widesparse.models": ["create_model", "list_models", "register_model", "model_defaults", "model_entrypoint"],
    "widesparse.effective": ["to_wide_mlp", "describe"],
    "widesparse.budget": ["optimal_shape", "shapes_for_budget", "connections_per_layer", "sw_mlp_width"],
    "widesparse.cka": ["MinibatchCKA", "linear_cka", "compare", "run_comparison"],
    "widesparse.linalg": ["vec", "unvec"],
    "widesparse.experiments.reproduce": ["reproduce"],
    "widesparse.experiments.report": ["build_report"],
    "widesparse.experiments": ["expand", "run_sweep"],
    "widesparse.timm_compat": ["register_timm_models", "main"],
    "widesparse.train": ["train", "TrainConfig"],
    "widesparse.kernels": ["linear_last", "linear_first", "use_onednn", "keep_freed_memory", "gemm_peaks"],
    "widesparse.cpu_kernels": ["GELU", "LayerNorm", "status", "load"],
    "widesparse.profiling": ["measure_step", "masked_sw_mlp_memory"],
    "widesparse.theory": ["factor_bound", "bilinear_l1_experiment"],
    "widesparse.layers": ["PermutedKronLinear", "SparseLinear", "MaskedLinear", "MonarchLinear", "StructuredLinear"],
    "widesparse.cli": ["main"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [n for n in PUBLIC[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lost {missing}"


def test_compatibility_paths_are_the_same_objects() -> None:
    from widesparse import cpu_kernels, kernels, profiling, theory, timm_compat
    from widesparse.analysis import profiling as real_profiling
    from widesparse.analysis import theory as real_theory
    from widesparse.integrations import timm as real_timm
    from widesparse.layers.activation import GELU
    from widesparse.ops import heap, matmul

    assert kernels.linear_last is matmul.linear_last and kernels.keep_freed_memory is heap.keep_freed_memory
    assert cpu_kernels.GELU is GELU
    assert profiling.measure_step is real_profiling.measure_step and theory.factor_bound is real_theory.factor_bound
    assert timm_compat.register_timm_models is real_timm.register_timm_models
