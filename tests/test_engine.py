"""The engine's per-point loss and error equal a plain loop (copy the model, load the mixed weights, forward)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import (SequenceConv, SmallCNN, TokenModel, WithUnknownModules, assert_same_loss_and_error, mlp,
                     plain_loop, seeded, settle_batchnorm)
from modeconn_fast import Basis, SubspaceView, evaluate
from modeconn_fast.engine.fallback import FallbackModule
from modeconn_fast.engine.pooling import MaxPool2dFastCPU

RTOL = 1e-5


def random_coeffs(points: int, members: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coeffs = torch.rand(points, members, generator=generator) * 1.6 - 0.3
    coeffs[0] = torch.nn.functional.one_hot(torch.tensor(0), members)  # a basis member itself
    return coeffs


def batches_of(inputs: torch.Tensor, targets: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(inputs[i:i + size], targets[i:i + size]) for i in range(0, len(targets), size)]


@pytest.mark.parametrize("members", [1, 2, 3])
def test_mlp_matches_plain_loop(members):
    models = [seeded(mlp, seed) for seed in range(members)]
    inputs, targets = torch.randn(61, 19), torch.randint(0, 5, (61,))
    coeffs = random_coeffs(7, members, seed=members)
    result = evaluate(models[0], models, coeffs, (inputs, targets))
    assert result.bn_mode == "none"
    assert_same_loss_and_error(result, plain_loop(models[0], models, coeffs, [(inputs, targets)]))


def test_chunking_and_batching_do_not_change_results():
    models = [seeded(mlp, seed) for seed in range(3)]
    inputs, targets = torch.randn(45, 19), torch.randint(0, 5, (45,))
    coeffs = random_coeffs(9, 3, seed=4)
    whole = evaluate(models[0], models, coeffs, (inputs, targets))
    tiny_budget = evaluate(models[0], models, coeffs, (inputs, targets), memory_budget=20_000)
    as_loader = evaluate(models[0], models, coeffs, DataLoader(TensorDataset(inputs, targets), batch_size=8))
    for other in (tiny_budget, as_loader):
        torch.testing.assert_close(other["loss"], whole["loss"], rtol=RTOL, atol=1e-7)
        torch.testing.assert_close(other["error"], whole["error"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bn", ["recompute", "eval"])
def test_cnn_with_batchnorm_matches_plain_loop(bn):
    images = torch.randn(50, 3, 8, 8)
    models = [settle_batchnorm(seeded(SmallCNN, seed), images) for seed in (10, 11)]
    inputs, targets = torch.randn(37, 3, 8, 8), torch.randint(0, 4, (37,))
    data = batches_of(inputs, targets, 16)
    bn_batches = [images[i:i + 16] for i in range(0, 50, 16)]  # 16, 16, 16, 2: uneven on purpose
    coeffs = random_coeffs(6, 2, seed=7)
    options = {"bn": bn, "bn_data": [(x, torch.zeros(len(x), dtype=torch.long)) for x in bn_batches]}
    result = evaluate(models[0], models, coeffs, data, **options)
    assert result.bn_mode == bn
    assert_same_loss_and_error(result, plain_loop(models[0], models, coeffs, data, bn=bn, bn_batches=bn_batches))


def test_recomputed_statistics_do_not_depend_on_chunking():
    images = torch.randn(40, 3, 8, 8)
    models = [settle_batchnorm(seeded(SmallCNN, seed), images) for seed in (1, 2)]
    data = (torch.randn(20, 3, 8, 8), torch.randint(0, 4, (20,)))
    bn_data = [(images[i:i + 10], torch.zeros(10, dtype=torch.long)) for i in range(0, 40, 10)]
    coeffs = random_coeffs(5, 2, seed=3)
    together = evaluate(models[0], models, coeffs, data, bn_data=bn_data)
    one_by_one = evaluate(models[0], models, coeffs, data, bn_data=bn_data, memory_budget=1)
    torch.testing.assert_close(one_by_one["loss"], together["loss"], rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("bn", ["recompute", "eval"])
def test_conv1d_with_batchnorm1d_matches_plain_loop(bn):
    signals = torch.randn(30, 4, 21)
    models = [settle_batchnorm(seeded(SequenceConv, seed), signals) for seed in (3, 4, 5)]
    inputs, targets = torch.randn(23, 4, 21), torch.randint(0, 3, (23,))
    bn_batches = [signals[:17], signals[17:]]
    coeffs = random_coeffs(5, 3, seed=2)
    result = evaluate(models[0], models, coeffs, (inputs, targets), bn=bn,
                      bn_data=[(x, torch.zeros(len(x), dtype=torch.long)) for x in bn_batches])
    expected = plain_loop(models[0], models, coeffs, [(inputs, targets)], bn=bn, bn_batches=bn_batches)
    assert_same_loss_and_error(result, expected)


def test_layernorm_and_embedding_match_plain_loop():
    models = [seeded(TokenModel, seed) for seed in (20, 21, 22)]
    tokens, targets = torch.randint(0, 11, (29, 7)), torch.randint(0, 3, (29,))
    coeffs = random_coeffs(6, 3, seed=5)
    result = evaluate(models[0], models, coeffs, (tokens, targets))
    assert_same_loss_and_error(result, plain_loop(models[0], models, coeffs, [(tokens, targets)]))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_unknown_modules_fall_back_to_vmap_and_match_plain_loop():
    models = [seeded(WithUnknownModules, seed) for seed in (30, 31)]
    inputs, targets = torch.randn(33, 19), torch.randint(0, 5, (33,))
    coeffs = random_coeffs(5, 2, seed=6)
    result = evaluate(models[0], models, coeffs, (inputs, targets))
    assert_same_loss_and_error(result, plain_loop(models[0], models, coeffs, [(inputs, targets)]))

    view = SubspaceView(models[0], Basis.from_members(models))
    assert sorted(view.fallback_names) == ["normed", "scale"]
    assert sum(isinstance(m, FallbackModule) for m in view.modules()) == 2


def test_whole_model_fallback_when_the_root_holds_a_parameter():
    class Root(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.offset = torch.nn.Parameter(torch.randn(19))
            self.body = mlp()

        def forward(self, x):
            return self.body(x + self.offset)

    models = [seeded(Root, seed) for seed in (1, 2)]
    inputs, targets = torch.randn(21, 19), torch.randint(0, 5, (21,))
    coeffs = random_coeffs(4, 2, seed=8)
    with pytest.warns(UserWarning, match=r"tensors of its own \(offset\)"):
        result = evaluate(models[0], models, coeffs, (inputs, targets))
    assert_same_loss_and_error(result, plain_loop(models[0], models, coeffs, [(inputs, targets)]))


def test_unknown_module_with_tied_weights_falls_back_and_matches_plain_loop():
    class TiedScale(torch.nn.Module):  # a parameter of its own, and a Linear whose weight is another's
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.rand(16) + 0.5)
            self.inner, self.outer = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
            self.outer.weight = self.inner.weight

        def forward(self, x):
            return self.outer(torch.relu(self.inner(x * self.scale)))

    def factory() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(19, 16), TiedScale(), torch.nn.ReLU(), torch.nn.Linear(16, 5))

    models = [seeded(factory, seed) for seed in (3, 4)]
    inputs, targets = torch.randn(23, 19), torch.randint(0, 5, (23,))
    coeffs = random_coeffs(4, 2, seed=9)
    expected = plain_loop(models[0], models, coeffs, [(inputs, targets)])
    for fast in (True, False):
        assert_same_loss_and_error(evaluate(models[0], models, coeffs, (inputs, targets), fast=fast), expected)
    assert SubspaceView(models[0], Basis.from_members(models)).fallback_names == ["1"]


def test_plane_through_differences_equals_mixing_the_models():
    models = [seeded(mlp, seed) for seed in range(3)]
    data = (torch.randn(40, 19), torch.randint(0, 5, (40,)))
    x, y = torch.meshgrid(torch.linspace(-0.5, 1.5, 4), torch.linspace(-0.5, 1.5, 3), indexing="xy")
    xy = torch.stack([x.flatten(), y.flatten()], dim=1)
    plane = Basis.from_members(models).transform(torch.tensor([[1.0, 0, 0], [-1, 1, 0], [-1, 0, 1]]))
    on_plane = evaluate(models[0], plane, torch.cat([torch.ones(len(xy), 1), xy], dim=1), data)
    mixed = evaluate(models[0], models, torch.cat([1 - xy.sum(1, keepdim=True), xy], dim=1), data)
    torch.testing.assert_close(on_plane["loss"], mixed["loss"], rtol=1e-5, atol=1e-6)


def test_custom_loss_per_sample_and_mean_agree():
    models = [seeded(mlp, seed) for seed in range(2)]
    inputs, targets = torch.randn(30, 19), torch.randint(0, 5, (30,))
    coeffs = random_coeffs(4, 2, seed=9)
    default = evaluate(models[0], models, coeffs, (inputs, targets), metrics=("loss",))
    per_sample = evaluate(models[0], models, coeffs, batches_of(inputs, targets, 7),
                          loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), metrics=("loss",))
    mean = evaluate(models[0], models, coeffs, batches_of(inputs, targets, 7), loss_fn=torch.nn.CrossEntropyLoss())
    for other in (per_sample, mean):
        torch.testing.assert_close(other["loss"], default["loss"], rtol=RTOL, atol=1e-7)
    assert list(default) == ["loss"] and list(mean) == ["loss", "error"]


def test_float64_model_stays_float64():
    models = [seeded(mlp, seed).double() for seed in range(2)]
    inputs, targets = torch.randn(25, 19, dtype=torch.float64), torch.randint(0, 5, (25,))
    coeffs = random_coeffs(4, 2, seed=1)
    result = evaluate(models[0], models, coeffs, (inputs, targets))
    expected = plain_loop(models[0], models, coeffs, [(inputs, targets)])
    torch.testing.assert_close(result["loss"], expected["loss"], rtol=1e-12, atol=1e-12)


def test_outputs_with_a_class_axis_and_positions_match_plain_loop():
    def per_position_classifier():
        return torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv1d(8, 5, 1))

    models = [seeded(per_position_classifier, seed) for seed in (1, 2)]
    inputs, targets = torch.randn(17, 4, 9), torch.randint(0, 5, (17, 9))
    coeffs = random_coeffs(4, 2, seed=3)
    result = evaluate(models[0], models, coeffs, (inputs, targets))
    assert_same_loss_and_error(result, plain_loop(models[0], models, coeffs, [(inputs, targets)]))


def test_inputs_are_left_untouched_and_unread_copies_are_detected():
    class InputSkip(torch.nn.Module):
        """Reads its raw input again after the first layer: every copy must be written."""

        def __init__(self) -> None:
            super().__init__()
            self.body = mlp()
            self.skip = torch.nn.Linear(19 + 5, 5)

        def forward(self, x):
            return self.skip(torch.cat([self.body(x), x * 2], dim=1))

    inputs, targets = torch.randn(21, 19), torch.randint(0, 5, (21,))
    original = inputs.clone()
    coeffs = random_coeffs(5, 2, seed=11)
    for factory, only_first_copy in ((mlp, True), (InputSkip, False)):
        models = [seeded(factory, seed) for seed in (5, 6)]
        view = SubspaceView(models[0], Basis.from_members(models))
        with torch.no_grad():
            view(coeffs, inputs)
        assert view.reads_shared_rows_only == (only_first_copy,)
        result = evaluate(models[0], models, coeffs, (inputs, targets))
        assert_same_loss_and_error(result, plain_loop(models[0], models, coeffs, [(inputs, targets)]))
        assert torch.equal(inputs, original)


def test_named_datasets_share_one_pass_and_match_separate_calls():
    images = torch.randn(40, 3, 8, 8)
    models = [settle_batchnorm(seeded(SmallCNN, seed), images) for seed in (1, 2)]
    train = (images, torch.randint(0, 4, (40,)))
    test = (torch.randn(15, 3, 8, 8), torch.randint(0, 4, (15,)))
    coeffs = random_coeffs(5, 2, seed=12)
    both = evaluate(models[0], models, coeffs, {"train": train, "test": test}, bn_data=train)
    assert list(both) == ["train_loss", "train_error", "test_loss", "test_error"]
    for split, data in (("train", train), ("test", test)):
        alone = evaluate(models[0], models, coeffs, data, bn_data=train)
        torch.testing.assert_close(both[f"{split}_loss"], alone["loss"], rtol=RTOL, atol=1e-7)
        torch.testing.assert_close(both[f"{split}_error"], alone["error"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 16, 8, 8), (64, 16, 7, 7), (8, 3, 8, 8), (4, 8, 32, 32)])
@pytest.mark.parametrize("options", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                     dict(kernel_size=2, ceil_mode=True)])
def test_max_pooling_stand_in_gives_identical_values(shape, options):
    pool = torch.nn.MaxPool2d(**options)
    x = torch.randn(*shape)
    y = MaxPool2dFastCPU(pool)(x)
    assert torch.equal(y, pool(x)) and y.is_contiguous()


@pytest.mark.parametrize("shape", [(64, 16, 8, 8), (5, 9, 7, 7), (4, 8, 12, 10)])
@pytest.mark.parametrize("options", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                     dict(kernel_size=2, ceil_mode=True), dict(kernel_size=2, stride=1, dilation=2)])
def test_max_pooling_stand_in_with_gradients_equals_max_pool2d(shape, options):
    """Training path: values and gradients identical, ties included (ReLU zeros, rounded values), double backward."""
    pool = torch.nn.MaxPool2d(**options)
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 3).round().relu().requires_grad_()
    ours, theirs = MaxPool2dFastCPU(pool)(x), pool(x)
    assert torch.equal(ours, theirs) and ours.is_contiguous()
    upstream = torch.randn_like(ours).requires_grad_()
    (grad_ours,) = torch.autograd.grad(ours, x, upstream, create_graph=True)
    (grad_theirs,) = torch.autograd.grad(theirs, x, upstream, create_graph=True)
    assert torch.equal(grad_ours, grad_theirs)
    probe = torch.randn_like(x)
    assert torch.equal(torch.autograd.grad((grad_ours * probe).sum(), upstream)[0],
                       torch.autograd.grad((grad_theirs * probe).sum(), upstream)[0])


def test_batchnorm_without_running_statistics_uses_batch_statistics_in_every_mode():
    def net():
        return torch.nn.Sequential(torch.nn.Linear(19, 12), torch.nn.BatchNorm1d(12, track_running_stats=False),
                                   torch.nn.ReLU(), torch.nn.Linear(12, 5))

    models = [seeded(net, seed) for seed in (1, 2)]
    data = (torch.randn(30, 19), torch.randint(0, 5, (30,)))
    coeffs = random_coeffs(4, 2, seed=13)
    expected = plain_loop(models[0], models, coeffs, [data])
    for bn in ("eval", "recompute"):
        result = evaluate(models[0], models, coeffs, data, bn=bn, bn_data=data)
        assert_same_loss_and_error(result, expected)


def test_fresh_batch_tensors_never_reuse_another_batchs_first_layer_outputs():
    class FreshBatches:
        """Makes every batch anew on each pass, so freed storage could come back at the same address."""

        def __iter__(self):
            for i in range(5):
                generator = torch.Generator().manual_seed(i)
                yield torch.randn(16, 19, generator=generator), torch.randint(0, 5, (16,), generator=generator)

    models = [seeded(mlp, seed) for seed in range(3)]
    coeffs = random_coeffs(8, 3, seed=15)
    result = evaluate(models[0], models, coeffs, FreshBatches(), memory_budget=30_000)
    assert_same_loss_and_error(result, plain_loop(models[0], models, coeffs, list(FreshBatches())))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bn", ["recompute", "eval"])
def test_evaluate_on_gpu_matches_cpu(bn, monkeypatch):
    """Models, basis and data on the GPU (the ops take their Triton path there): the CPU's numbers."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # cuDNN's default would round to TF32
    images = torch.randn(50, 3, 8, 8)
    models = [settle_batchnorm(seeded(SmallCNN, seed), images) for seed in (10, 11)]
    inputs, targets = torch.randn(37, 3, 8, 8), torch.randint(0, 4, (37,))
    coeffs = torch.rand(9, 2, generator=torch.Generator().manual_seed(3))  # convex: mixed variances stay positive
    on_cpu = evaluate(models[0], models, coeffs, (inputs, targets), bn=bn, bn_data=images)
    gpu_models = [m.cuda() for m in models]
    on_gpu = evaluate(gpu_models[0], gpu_models, coeffs.cuda(), (inputs.cuda(), targets.cuda()), bn=bn,
                      bn_data=images.cuda())
    torch.testing.assert_close(on_gpu["loss"].cpu(), on_cpu["loss"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(on_gpu["error"].cpu(), on_cpu["error"], rtol=0, atol=1 / 37 + 1e-9)


def test_eval_mode_warns_where_mixed_variances_turn_negative():
    images = torch.randn(50, 3, 8, 8)
    models = [settle_batchnorm(seeded(SmallCNN, seed), images) for seed in (10, 11)]
    inputs, targets = torch.randn(20, 3, 8, 8), torch.randint(0, 4, (20,))
    coeffs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [-3.0, 1.0]])  # the last: −3 σ²_0 + σ²_1 < 0 somewhere
    with pytest.warns(UserWarning, match="at 1 of 3 points a BatchNorm layer's mixed running variance"):
        result = evaluate(models[0], models, coeffs, (inputs, targets), bn="eval")
    assert torch.isfinite(result["loss"][:2]).all() and torch.isnan(result["loss"][2])
