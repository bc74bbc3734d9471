"""The Conv2d → BatchNorm2d → ReLU → MaxPool2d block's fast path equals the layers run one by one and a per-point loop."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_same_loss_and_error, mixed_state, one_thread, plain_loop, seeded, settle_batchnorm  # noqa: F401
from modeconn_fast import Basis, SubspaceView, evaluate
from modeconn_fast.engine import conv_block
from modeconn_fast.engine.conv_block import ConvBlock, FusedSequential
from modeconn_fast.engine.pooling import max_pool_2x2_channels_last


def two_blocks() -> nn.Sequential:
    """Odd shapes: 3 → 8 channels on 9×7, then a grouped conv without bias, BatchNorm without affine, no ReLU."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, (3, 2), padding=(1, 1), groups=2, bias=False), nn.BatchNorm2d(6, affine=False), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 5),
    )


def negative_scales() -> nn.Sequential:
    """BatchNorm weights of both signs (pooling must wait for the affine map), padding 'same' with dilation,
    stride 2, a 3×3 pooling, and a BatchNorm without running statistics."""
    model = nn.Sequential(
        nn.Conv2d(2, 7, 3, padding="same", dilation=2), nn.BatchNorm2d(7), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(7, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5, track_running_stats=False), nn.ReLU(),
        nn.MaxPool2d(3, stride=1, padding=1),
        nn.Flatten(), nn.Linear(5 * 2 * 2, 3),
    )
    with torch.no_grad():
        model[1].weight.uniform_(-1, 1)
    return model


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "two_blocks": (two_blocks, (3, 9, 7)),
    "negative_scales": (negative_scales, (2, 7, 8)),
}


def members_and_data(name: str, seed: int = 0):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    inputs = torch.randn(45, *shape)
    targets = torch.randint(0, 3, (45,))
    members = [settle_batchnorm(seeded(factory, seed + k), inputs) for k in range(3)]
    for member in members:  # the members differ in the sign of some BatchNorm scales
        with torch.no_grad():
            member[1].weight.mul_(torch.randn(member[1].weight.shape).sign())
    return members, inputs, targets


def blocks_of(view: SubspaceView) -> list[ConvBlock]:
    """The ConvBlocks the view's fused Sequentials run."""
    return [step for m in view.modules() if isinstance(m, FusedSequential) for step in m.steps
            if isinstance(step, ConvBlock)]


@pytest.mark.parametrize("name", MODELS)
def test_view_forward_fast_equals_plain_in_every_phase(name, monkeypatch):
    fast_calls = []
    pooled = ConvBlock._pooled
    monkeypatch.setattr(ConvBlock, "_pooled", lambda self, *args, **kw: fast_calls.append(1) or pooled(self, *args, **kw))
    members, inputs, _ = members_and_data(name)
    coeffs = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [-0.3, 0.9, 0.4]])
    views = {fast: SubspaceView(members[0], Basis.from_members(members)) for fast in (True, False)}
    for fast, view in views.items():
        view.state.plain = not fast
        view.prepare(coeffs, inputs[:2])
    assert len(blocks_of(views[True])) == 2
    with torch.no_grad():
        for phase in ("stored", "recompute"):
            outputs = {}
            for fast, view in views.items():
                if phase == "recompute":
                    view.recompute_batchnorm(coeffs, [inputs[:20], inputs[20:]], [slice(0, 2), slice(2, 3)])
                outputs[fast] = view(coeffs, inputs[:13], batch=phase)
            torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-5)
    assert len(fast_calls) >= 2 * 3  # both blocks, both phases and the collection ran the fast path
    fast_state, plain_state = (views[f].recomputed_batchnorm_state() for f in (True, False))
    assert fast_state.keys() == plain_state.keys() and fast_state
    for key in fast_state:
        torch.testing.assert_close(fast_state[key], plain_state[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bn", ["eval", "recompute"])
def test_evaluate_fast_equals_plain_path_and_per_point_loop(bn, monkeypatch):
    fast_calls = []
    pooled = ConvBlock._pooled
    monkeypatch.setattr(ConvBlock, "_pooled", lambda self, *args, **kw: fast_calls.append(self) or pooled(self, *args, **kw))
    members, inputs, targets = members_and_data("two_blocks", seed=3)
    coeffs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.1, 0.3, 0.6], [0.0, 0.0, 1.0], [0.4, -0.2, 0.8]])
    batches = [(inputs[i:i + 16], targets[i:i + 16]) for i in range(0, 45, 16)]
    bn_batches = [x for x, _ in batches]
    options = dict(bn=bn, bn_data=bn_batches if bn == "recompute" else None, progress=False)
    fast = evaluate(members[0], members, coeffs, batches, **options)
    assert len(set(map(id, fast_calls))) == 2, "evaluate must run both blocks' fast path (not only a bare view)"
    calls = len(fast_calls)
    plain = evaluate(members[0], members, coeffs, batches, fast=False, **options)
    assert len(fast_calls) == calls
    loop = plain_loop(members[0], members, coeffs, batches, bn=bn, bn_batches=bn_batches)
    assert_same_loss_and_error(fast, plain)
    assert_same_loss_and_error(fast, loop)


def test_training_through_the_view_runs_the_layers_and_matches_a_per_point_loop():
    members, inputs, _ = members_and_data("two_blocks", seed=5)
    basis = Basis.from_members(members)
    stacked = {name: t.clone().requires_grad_(t.is_floating_point()) for name, t in basis.stacked.items()}
    view = SubspaceView(members[0], basis)
    view.rebind(stacked)
    view.train()
    coeffs = torch.tensor([[0.3, 0.3, 0.4], [0.7, 0.2, 0.1]])
    x = inputs[:11]
    view(coeffs, x).square().sum().backward()
    trainable = {n: t for n, t in stacked.items() if "running" not in n and "num_batches" not in n}
    grads = {name: t.grad.clone() for name, t in trainable.items()}

    reference = {name: t.detach().clone().requires_grad_(True) for name, t in trainable.items()}
    total = 0.0
    for row in coeffs:
        params = {name: torch.einsum("k,k...->...", row, t) for name, t in reference.items()}
        net = seeded(two_blocks, 0).train()
        total = total + torch.func.functional_call(net, params, (x,)).square().sum()
    total.backward()
    for name, t in reference.items():
        torch.testing.assert_close(grads[name], t.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(5, 3, 8, 8), (4, 6, 7, 9), (2, 1, 3, 2)])
def test_two_by_two_pooling_as_maxima_equals_max_pool2d(shape):
    x = torch.randn(shape)
    x.view(-1)[::7] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(max_pool_2x2_channels_last(x), F.max_pool2d(x, 2), rtol=0, atol=0, equal_nan=True)


def test_recomputation_stops_each_forward_after_the_last_batchnorm():
    members, inputs, targets = members_and_data("two_blocks", seed=7)
    calls = []
    view = SubspaceView(members[0], Basis.from_members(members))
    head = view.net[8]  # the Linear after the last BatchNorm
    head.register_forward_hook(lambda *_: calls.append(1))
    coeffs = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    view.prepare(coeffs, inputs[:2])
    calls.clear()
    with torch.no_grad():
        view.recompute_batchnorm(coeffs, [inputs[:15], inputs[15:30], inputs[30:]], [slice(0, 1), slice(1, 2)])
    assert len(calls) == 1  # only the first forward ran to the end
    result = evaluate(members[0], members, coeffs, [(inputs, targets)], bn_data=[inputs[:15], inputs[15:30], inputs[30:]],
                      progress=False)
    expected = plain_loop(members[0], members, coeffs, [(inputs, targets)], bn="recompute",
                          bn_batches=[inputs[:15], inputs[15:30], inputs[30:]])
    assert_same_loss_and_error(result, expected)



class SkipBeforePooling(nn.Module):
    """Keeps the activation before the pooling (as a U-Net does), by iterating over its Sequential and by
    slicing it: the fused Sequential's children must stay the layers themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(2 * 4 * 8 * 6 + 4 * 4 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sliced = self.down[:3](x)
        for index, layer in enumerate(self.down):
            if index == 3:
                skip = x
            x = layer(x)
        return self.head(torch.cat([skip.flatten(1), sliced.flatten(1), x.flatten(1)], dim=1))


def test_a_model_that_reads_inside_a_fused_sequential_gets_each_layers_output():
    torch.manual_seed(0)
    inputs, targets = torch.randn(20, 3, 8, 6), torch.randint(0, 3, (20,))
    members = [settle_batchnorm(seeded(SkipBeforePooling, seed), inputs) for seed in range(2)]
    coeffs = torch.tensor([[1.0, 0.0], [0.3, 0.7], [-0.5, 1.5]])
    whole = nn.Sequential(*members[0].down)  # the same layers called as a whole are fused
    view = SubspaceView(whole, Basis.from_members([nn.Sequential(*m.down) for m in members]))
    assert len(blocks_of(view)) == 1
    for bn in ("eval", "recompute"):
        result = evaluate(members[0], members, coeffs, (inputs, targets), bn=bn,
                          bn_data=inputs if bn == "recompute" else None)
        expected = plain_loop(members[0], members, coeffs, [(inputs, targets)], bn=bn, bn_batches=[inputs])
        assert_same_loss_and_error(result, expected)


def three_blocks() -> nn.Sequential:
    """Three blocks in a row: a shared-input block, then two grouped over points."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 4, (2, 3), padding=1, bias=False), nn.BatchNorm2d(4), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 2 * 1, 3),
    )


def reflect_second() -> nn.Sequential:
    """The second block pads by reflection (it runs its layers), after a fast first block."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 3, 3),
    )


def one_block() -> nn.Sequential:
    """A single block before the Flatten."""
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(5 * 8 * 6, 3))


@pytest.mark.parametrize("factory, fast_blocks", [(three_blocks, 3), (reflect_second, 1), (one_block, 1)])
@pytest.mark.parametrize("bn", ["eval", "recompute"])
def test_blocks_alone_and_in_a_row_equal_the_plain_path(factory, fast_blocks, bn, monkeypatch):
    fast_calls = []
    pooled = ConvBlock._pooled
    monkeypatch.setattr(ConvBlock, "_pooled", lambda self, *args, **kw: fast_calls.append(self) or pooled(self, *args, **kw))
    torch.manual_seed(1)
    inputs, targets = torch.randn(37, 3, 17, 12), torch.randint(0, 3, (37,))
    members = [settle_batchnorm(seeded(factory, seed), inputs) for seed in range(3)]
    coeffs = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [-0.3, 0.9, 0.4], [0.6, 0.1, 0.3], [0.0, 0.0, 1.0]])
    batches = [(inputs[i:i + 15], targets[i:i + 15]) for i in range(0, 37, 15)]
    bn_batches = [x for x, _ in batches]
    options = dict(bn=bn, bn_data=bn_batches if bn == "recompute" else None, progress=False)
    fast = evaluate(members[0], members, coeffs, batches, **options)
    assert len(set(map(id, fast_calls))) == fast_blocks
    plain = evaluate(members[0], members, coeffs, batches, fast=False, **options)
    loop = plain_loop(members[0], members, coeffs, batches, bn=bn, bn_batches=bn_batches)
    assert_same_loss_and_error(fast, plain)
    assert_same_loss_and_error(fast, loop)


@pytest.mark.parametrize("phase", ["stored", "recomputed"])
def test_values_kept_from_batch_to_batch_follow_changed_coefficients_and_basis(phase, monkeypatch):
    """The blocks keep the combined kernels and BatchNorm's scale and shift while the points stay the same: coefficient
    rows changed in place, other rows at the same offset, and basis tensors changed in place are seen."""
    members, inputs, _ = members_and_data("two_blocks", seed=4)
    views = {fast: SubspaceView(members[0], Basis.from_members(members)) for fast in (True, False)}
    coeffs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    with torch.no_grad():
        for fast, view in views.items():
            view.state.plain = not fast
            view.prepare(coeffs, inputs[:2])
            if phase == "recomputed":
                view.recompute_batchnorm(coeffs, [inputs[:20], inputs[20:]])

        def agree(rows: torch.Tensor) -> None:
            for batch in range(2):  # the second batch runs on the kept values, whole and chunk by chunk
                x = inputs[batch * 13:(batch + 1) * 13]
                for chunk in (slice(0, len(rows)), *(slice(p, p + 1) for p in range(len(rows)))):
                    outputs = [view(rows[chunk], x, offset=chunk.start, batch=batch) for view in views.values()]
                    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)

        agree(coeffs)
        kept = {name for block in blocks_of(views[True]) for name, _ in block._kept_values}
        assert kept == {"grouped kernels", "affine"}
        monkeypatch.setattr(conv_block, "KEPT_KERNEL_BYTES", 0)  # larger kernels are made anew for every batch
        for block in blocks_of(views[True]):
            block._kept_values.clear()
        agree(coeffs)
        assert "grouped kernels" not in {name for block in blocks_of(views[True]) for name, _ in block._kept_values}
        monkeypatch.undo()
        coeffs[1] = torch.tensor([0.1, 0.1, 0.8])  # in place: a new version of the same tensor
        if phase == "stored":  # recomputed statistics belong to the rows they were recomputed for
            agree(coeffs)
            agree(coeffs[:1])
            for view in views.values():
                next(t for name, t in view._basis.stacked.items() if name.endswith("4.weight")).mul_(0.5)
        agree(coeffs)


@pytest.mark.parametrize("channels, kernel, stride, padding, dilation", [
    (1, (3, 3), (1, 1), (1, 1), (1, 1)), (2, (2, 3), (2, 1), (0, 2), (1, 2)), (3, (3, 1), (1, 3), (2, 0), (2, 1))])
def test_patches_equal_unfold_transposed(channels, kernel, stride, padding, dilation):
    """The shared input's patches (`_patches`) are the rows of F.unfold's output, transposed, on odd shapes."""
    x = torch.randn(5, channels, 7, 9, generator=torch.Generator().manual_seed(3))
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    height, width = conv_block.conv_output_size(x.shape[2:], kernel, stride, padding, dilation)
    patches = conv_block._patches(x, kernel, stride, padding, dilation, height, width)
    torch.testing.assert_close(patches, cols.transpose(1, 2).reshape(-1, cols.shape[1]), rtol=0, atol=0)
