"""Weight matching and merging of models left on disk equal the same on the modules, exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rebasin_models import build, inputs

from modeconn_fast.rebasin import SpecError, merge, permutation_spec, weight_matching
from modeconn_fast.rebasin.sources import read_source


def _saved(model: torch.nn.Module, path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet"])
def test_matching_files_equals_matching_modules(name: str, tmp_path) -> None:
    model_a, model_b = build(name, seed=0), build(name, seed=1)
    spec = permutation_spec(model_a, inputs(model_a))
    in_memory = weight_matching(model_a, model_b, spec=spec, seed=3)
    on_disk = weight_matching(_saved(model_a, tmp_path / "a.pt"), _saved(model_b, tmp_path / "b.pt"), spec=spec, seed=3)
    assert on_disk.objective_history == in_memory.objective_history
    assert on_disk.iterations == in_memory.iterations
    for group in spec.groups:
        assert torch.equal(on_disk.perms[group], in_memory.perms[group]), group


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_files_are_memory_mapped(tmp_path) -> None:
    """The tensors of a file stay in it: their data lies in this process's mapping of the file."""
    path = _saved(build("mlp"), tmp_path / "m.pt")
    state = read_source(path, "model")
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(Path(path).resolve())):
            start, stop = (int(x, 16) for x in line.split()[0].split("-"))
            mapped.append((start, stop))
    assert mapped
    for key, value in state.items():
        assert any(start <= value.data_ptr() < stop for start, stop in mapped), key


def test_merge_of_files_equals_merge_of_modules(tmp_path) -> None:
    models = [build("vgg", seed=s) for s in range(3)]
    spec = permutation_spec(models[0], inputs(models[0]))
    in_memory = merge(models, spec=spec, seed=2).state_dict()
    on_disk = merge([_saved(m, tmp_path / f"{i}.pt") for i, m in enumerate(models)], spec=spec, seed=2)
    assert list(on_disk) == list(in_memory)
    for key, value in in_memory.items():
        assert torch.equal(on_disk[key], value), key


def test_merge_of_files_needs_a_spec_and_no_data(tmp_path) -> None:
    models = [build("mlp", seed=s) for s in range(2)]
    paths = [_saved(m, tmp_path / f"{i}.pt") for i, m in enumerate(models)]
    with pytest.raises(SpecError, match="needs spec="):
        merge(paths, example_input=inputs(models[0]))
    with pytest.raises(SpecError, match="needs spec="):
        weight_matching(*paths, example_input=inputs(models[0]))
