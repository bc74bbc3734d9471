"""Permutation specs derived with torch.fx: structure, function preservation, and clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rebasin_models import build, inputs, mlp
from torch import nn

from modeconn_fast.rebasin import FunctionChangedError, Permutation, PermutationSpec, SpecError, permutation_spec
from modeconn_fast.rebasin.derive import trace

ARCHITECTURES = ["mlp", "vgg", "resnet", "transformer", "attention"]


def random_permutation(spec: PermutationSpec, model: nn.Module, seed: int = 0) -> Permutation:
    """A random permutation of every group; head-structured groups move whole heads, in one random order."""
    generator = torch.Generator().manual_seed(seed)
    sizes = spec.sizes(model.state_dict())
    perms = {g: torch.randperm(n, generator=generator) for g, n in sizes.items()}
    for tie in spec.heads.values():
        order = torch.randperm(tie.num_heads, generator=generator) if tie.move else torch.arange(tie.num_heads)
        for group in tie.groups:
            d = sizes[group] // tie.num_heads
            perms[group] = torch.cat([order[h] * d + torch.randperm(d, generator=generator) for h in range(tie.num_heads)])
    return Permutation(spec, perms)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_apply_keeps_function_and_inputs(name: str) -> None:
    model = build(name)
    spec = permutation_spec(model, inputs(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    permuted = random_permutation(spec, model).apply(model, probe=inputs(model, batch=16, seed=1))
    assert permuted is not model
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"apply modified the input model's {key}"
    changed = [k for k, v in permuted.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "the permutation moved nothing"
    x = inputs(model, batch=16, seed=2)
    torch.testing.assert_close(permuted(x), model(x), rtol=1e-5, atol=1e-5)


def test_tracing_shares_the_parameters_and_leaves_buffers_and_mode_alone() -> None:
    """The traced copy reads the caller's parameters (no copy of the model's weights) and has buffers and a mode of
    its own: deriving a spec from a model in training mode changes none of its running statistics."""
    model = build("resnet").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    traced = trace(model, inputs(model))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    shared = dict(traced.graph_module.named_parameters())
    assert shared and all(shared[name] is p for name, p in model.named_parameters() if name in shared)
    buffers = dict(traced.graph_module.named_buffers())
    assert buffers and all(buffers[name] is not b for name, b in model.named_buffers() if name in buffers)


def test_mlp_spec_structure() -> None:
    model = mlp((64, 32, 16, 10))
    spec = permutation_spec(model, torch.randn(2, 64))
    assert {g: [str(a) for a in axes] for g, axes in spec.groups.items()} == {
        "0": ["0.weight[0]", "0.bias[0]", "2.weight[1]"],
        "2": ["2.weight[0]", "2.bias[0]", "4.weight[1]"],
    }
    assert spec.sizes(model.state_dict()) == {"0": 32, "2": 16}
    assert "0.weight[0]" in str(spec)


def test_resnet_residual_groups_are_united_and_bn_statistics_permuted() -> None:
    model = build("resnet")
    spec = permutation_spec(model, inputs(model))
    stream = spec.groups["conv"]
    named = {str(a) for a in stream}
    # the stem, both blocks' second convs of layer1 and the projection's input all share one permutation
    assert {"conv.weight[0]", "layer1.0.conv2.weight[0]", "layer1.1.conv2.weight[0]", "layer2.0.shortcut.0.weight[1]"} <= named
    assert {"bn.running_mean[0]", "bn.running_var[0]"} <= named
    projection = {str(a) for a in spec.groups["layer2.0.conv2"]}
    assert {"layer2.0.shortcut.0.weight[0]", "layer2.0.shortcut.1.running_var[0]", "fc.weight[1]"} <= projection


def test_flatten_gives_blocks() -> None:
    model = build("vgg")
    spec = permutation_spec(model, inputs(model))
    assert any(a.tensor == "fc1.weight" and a.dim == 1 and a.inner == 4 for a in spec.groups["features.7"])


@pytest.mark.parametrize("contiguous", [True, False])
def test_permute_tensor_equals_index_select_on_every_axis(contiguous: bool) -> None:
    """permute_tensor merges the axes after each permuted one where it can: the same tensor as index_select on the
    full shape, for a 4-d weight with both leading axes permuted (the second in blocks of 3) and a sliced axis."""
    spec = PermutationSpec({"out": [("w", 0), ("v", 1, 1, 2, 8)], "in": [("w", 1, 3)]})
    generator = torch.Generator().manual_seed(0)
    if contiguous:
        w, v = torch.randn(6, 12, 3, 2, generator=generator), torch.randn(7, 10, 3, generator=generator)
    else:
        w = torch.randn(6, 12, 2, 3, generator=generator).transpose(2, 3)
        v = torch.randn(3, 10, 7, generator=generator).transpose(0, 2)
    out, into = torch.randperm(6, generator=generator), torch.randperm(4, generator=generator)
    permutation = Permutation(spec, {"out": out, "in": into})
    expected_w = w.index_select(0, out).index_select(1, (into[:, None] * 3 + torch.arange(3)).reshape(-1))
    expected_v = v.index_select(1, torch.cat([torch.arange(2), out + 2, torch.arange(8, 10)]))
    assert torch.equal(permutation.permute_tensor("w", w), expected_w)
    assert torch.equal(permutation.permute_tensor("v", v), expected_v)


def test_hand_written_spec_matches_derived() -> None:
    model = mlp((64, 32, 16, 10))
    by_hand = PermutationSpec(
        {"0": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)], "2": [("2.weight", 0), ("2.bias", 0), ("4.weight", 1)]}
    )
    assert by_hand.groups == permutation_spec(model, torch.randn(2, 64)).groups
    permuted = random_permutation(by_hand, model).apply(model, probe=torch.randn(5, 64))
    x = torch.randn(7, 64)
    torch.testing.assert_close(permuted(x), model(x))


def test_wrong_spec_is_caught_by_apply() -> None:
    model = mlp((64, 32, 16, 10))
    incomplete = PermutationSpec({"0": [("0.weight", 0), ("0.bias", 0)]}, example_input=torch.randn(5, 64))
    with pytest.raises(FunctionChangedError):
        random_permutation(incomplete, model).apply(model)


def test_spec_model_mismatch() -> None:
    model = mlp((64, 32, 16, 10))
    with pytest.raises(SpecError, match="no tensor 'fc.weight'"):
        PermutationSpec({"g": [("fc.weight", 0)]}).sizes(model.state_dict())
    with pytest.raises(SpecError, match="units"):
        PermutationSpec({"g": [("0.weight", 0), ("2.weight", 0)]}).sizes(model.state_dict())
    with pytest.raises(SpecError, match="claimed by groups"):
        PermutationSpec({"g": [("0.weight", 0)], "h": [("0.weight", 0)]})
    with pytest.raises(SpecError, match="no probe"):
        random_permutation(PermutationSpec({"g": [("0.bias", 0)]}), model).apply(model)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.fc(x)
        return x


class _Bilinear(nn.Module):
    """fc1(x) @ fc2(x)ᵀ contracts the units of fc1 with those of fc2; `outer`: fc1(x)ᵀ @ fc2(x) does not."""

    def __init__(self, outer: bool = False) -> None:
        super().__init__()
        self.outer = outer
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outer:
            return torch.matmul(self.fc1(x).T, self.fc2(x))
        return torch.matmul(self.fc1(x), self.fc2(x).T)


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x)).sum()


def test_untraceable_model_is_refused() -> None:
    with pytest.raises(SpecError, match="torch.fx cannot trace _Untraceable"):
        permutation_spec(_Untraceable(), torch.randn(2, 4))


@pytest.mark.parametrize(
    ("model", "example", "node"),
    [(_Bilinear(outer=True), torch.randn(3, 4), "matmul"), (_Grouped(), torch.randn(1, 4, 5, 5), "conv")],
)
def test_unsupported_construct_names_the_node(model: nn.Module, example: torch.Tensor, node: str) -> None:
    with pytest.raises(SpecError, match=f"fx node '{node}'"):
        permutation_spec(model, example)


def test_contracted_units_form_one_group() -> None:
    model = _Bilinear()
    spec = permutation_spec(model, torch.randn(3, 4))
    assert {g: [str(a) for a in axes] for g, axes in spec.groups.items()} == {
        "fc1": ["fc1.weight[0]", "fc1.bias[0]", "fc2.weight[0]", "fc2.bias[0]"]
    }
    x = torch.randn(5, 4)
    torch.testing.assert_close(random_permutation(spec, model).apply(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_input_residual_is_fixed() -> None:
    class InputResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(x + self.fc1(x))

    spec = permutation_spec(InputResidual(), torch.randn(2, 6))
    assert spec.groups == {}  # fc1's outputs are added to the (unpermutable) input
