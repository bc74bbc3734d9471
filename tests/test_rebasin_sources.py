"""Weight matching and merging of models left on disk equal the same on the modules, exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rebasin_models import build, inputs

from modeconn_fast.rebasin import SpecError, merge, permutation_spec, weight_matching
from modeconn_fast.rebasin.sources import read_source


FORMATS = [".pt", ".safetensors"]


def _saved(model: torch.nn.Module, path) -> str:
    """`path` holding model's state dict: torch.save for .pt, safetensors' save_file for .safetensors."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet"])
def test_matching_files_equals_matching_modules(name: str, suffix: str, tmp_path) -> None:
    model_a, model_b = build(name, seed=0), build(name, seed=1)
    spec = permutation_spec(model_a, inputs(model_a))
    in_memory = weight_matching(model_a, model_b, spec=spec, seed=3)
    paths = [_saved(m, tmp_path / f"{i}{suffix}") for i, m in enumerate((model_a, model_b))]
    on_disk = weight_matching(*paths, spec=spec, seed=3)
    assert on_disk.objective_history == in_memory.objective_history
    assert on_disk.iterations == in_memory.iterations
    for group in spec.groups:
        assert torch.equal(on_disk.perms[group], in_memory.perms[group]), group


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("suffix", FORMATS)
def test_files_are_memory_mapped(suffix: str, tmp_path) -> None:
    """The tensors of a file stay in it: their data lies in this process's mapping of the file."""
    path = _saved(build("mlp"), tmp_path / f"m{suffix}")
    state = read_source(path, "model")
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(Path(path).resolve())):
            start, stop = (int(x, 16) for x in line.split()[0].split("-"))
            mapped.append((start, stop))
    assert mapped
    for key, value in state.items():
        assert any(start <= value.data_ptr() < stop for start, stop in mapped), key


@pytest.mark.parametrize("suffix", FORMATS)
def test_merge_of_files_equals_merge_of_modules(suffix: str, tmp_path) -> None:
    models = [build("vgg", seed=s) for s in range(3)]
    spec = permutation_spec(models[0], inputs(models[0]))
    in_memory = merge(models, spec=spec, seed=2).state_dict()
    on_disk = merge([_saved(m, tmp_path / f"{i}{suffix}") for i, m in enumerate(models)], spec=spec, seed=2)
    assert sorted(on_disk) == sorted(in_memory)  # a .safetensors file keeps its keys sorted, not in module order
    for key, value in in_memory.items():
        assert torch.equal(on_disk[key], value), key


def test_merge_of_files_needs_a_spec_and_no_data(tmp_path) -> None:
    models = [build("mlp", seed=s) for s in range(2)]
    paths = [_saved(m, tmp_path / f"{i}.pt") for i, m in enumerate(models)]
    with pytest.raises(SpecError, match="needs spec="):
        merge(paths, example_input=inputs(models[0]))
    with pytest.raises(SpecError, match="needs spec="):
        weight_matching(*paths, example_input=inputs(models[0]))


def test_a_missing_safetensors_file_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_source(str(tmp_path / "none.safetensors"), "model_a")


def test_merge_from_disk_benchmark_runs_small() -> None:
    """benchmarks/rebasin_merge_disk.py, at width 32: three files written, merged in a fresh process."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.rebasin_merge_disk import measure

    result = measure(32, rounds=1, max_iter=2)
    assert result["merged_tensors"] == 8 and result["peak_rss_gb"] > 0
