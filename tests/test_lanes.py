"""Evaluation lanes (`engine/lanes.py`): with two intra-op threads a CNN's points run in two lanes, each on its own
thread and view, and give what one lane, the plain path and a per-point loop give, the same bits on every run."""
from __future__ import annotations

import importlib
import threading

import pytest
import torch
from torch import nn

from helpers import SmallCNN, assert_same_loss_and_error, one_thread, plain_loop, seeded, settle_batchnorm  # noqa: F401
from modeconn_fast import Basis, SubspaceView, evaluate
from modeconn_fast.engine import lanes
from modeconn_fast.engine.metrics import check_metrics
from test_compiled_cpu import kernel_calls, kernels  # noqa: F401
from test_conv_block import MODELS as CONV_BLOCK_MODELS, members_and_data as conv_block_members_and_data
from test_engine_fast import METRICS, convex_rows

evaluate_module = importlib.import_module("modeconn_fast.engine.evaluate")  # the package exports the function
chunks_module = importlib.import_module("modeconn_fast.engine.chunks")


def digits_cnn() -> nn.Sequential:
    """B3's CNN at a smaller size: two conv → BatchNorm → ReLU → pool blocks, then the logits."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(5 * 2 * 2, 7),
    )


MODELS = {"digits_cnn": (digits_cnn, (1, 8, 8), 7), "small_cnn": (SmallCNN, (3, 8, 8), 4)}


@pytest.fixture
def two_threads():
    torch.set_num_threads(2)  # `one_thread` restores the count after the test


@pytest.fixture
def lane_runs(monkeypatch):
    """The lanes each evaluation ran in, and the threads they ran on; chunks of CPU_MIN_CHUNK points (a tiny cache
    size), so that 19 points make two chunks and take two lanes (lanes never split one lane's chunks)."""
    monkeypatch.setattr(chunks_module, "CPU_CACHE_BYTES", 1)
    runs: list[tuple[int, set[int]]] = []
    run = lanes.run_in_lanes

    def counted(shares, items):
        seen: set[int] = set()
        runs.append((len(shares), seen))
        run([lambda item, share=share: seen.add(threading.get_ident()) or share(item) for share in shares], items)

    monkeypatch.setattr(evaluate_module, "run_in_lanes", counted)
    return runs


def members_and_data(name: str, seed: int = 0):
    if name in CONV_BLOCK_MODELS:  # odd shapes, negative BatchNorm scales, BatchNorm without running statistics
        members, inputs, targets = conv_block_members_and_data(name, seed)
        return members, [(inputs[i:i + 16], targets[i:i + 16]) for i in range(0, 45, 16)]
    factory, shape, classes = MODELS[name]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(60, *shape, generator=generator)
    targets = torch.randint(0, classes, (60,), generator=generator)
    members = [settle_batchnorm(seeded(factory, seed + k), images) for k in range(3)]
    batches = [(images[i:i + 23], targets[i:i + 23]) for i in range(0, 60, 23)]
    return members, batches


def evaluations(name: str, bn: str, points: int = 19, metrics: tuple[str, ...] = METRICS):
    """(two lanes, one lane, the plain path, a per-point loop) on the model `name`."""
    members, batches = members_and_data(name)
    coeffs = convex_rows(points, 3, seed=5)
    bn_batches = [x for x, _ in batches]
    bn_options = dict(bn=bn, bn_data=bn_batches if bn == "recompute" else None, progress=False)
    two = evaluate(members[0], members, coeffs, batches, metrics=metrics, **bn_options)
    torch.set_num_threads(1)
    one = evaluate(members[0], members, coeffs, batches, metrics=metrics, **bn_options)
    torch.set_num_threads(2)
    plain = evaluate(members[0], members, coeffs, batches, metrics=metrics, fast=False, **bn_options)
    loop = plain_loop(members[0], members, coeffs, batches, bn=bn, bn_batches=bn_batches)
    return two, one, plain, loop


def assert_all_equal(two, one, plain, loop) -> None:
    for name in two:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(two[name], plain[name], rtol=1e-5, atol=1e-7)
    assert_same_loss_and_error(two, loop)


@pytest.mark.parametrize("name", [*MODELS, *CONV_BLOCK_MODELS])
@pytest.mark.parametrize("bn", ["recompute", "eval"])
def test_two_lanes_equal_one_lane_plain_path_and_loop(name, bn, two_threads, lane_runs):
    assert_all_equal(*evaluations(name, bn))
    assert [count for count, _ in lane_runs] == [2, 1, 1]  # two lanes; one on one thread; the plain path one
    assert len(lane_runs[0][1]) == 2  # on two threads


@pytest.mark.parametrize("bn", ["recompute", "eval"])
def test_two_lanes_with_the_kernels_equal_one_lane_plain_path_and_loop(bn, two_threads, lane_runs, kernel_calls):
    assert_all_equal(*evaluations("digits_cnn", bn, metrics=("loss", "error")))  # the fused tail's metrics
    assert lane_runs[0][0] == 2
    assert {"mix_of_three_pool_block", "pool_linear_cross_entropy_sums"} <= set(kernel_calls)
    if bn == "recompute":
        assert "column_statistics" in kernel_calls


def test_lanes_give_the_same_bits_on_every_run(two_threads, lane_runs, kernel_calls):
    members, batches = members_and_data("digits_cnn", seed=2)
    coeffs = convex_rows(23, 3, seed=1)
    runs = [evaluate(members[0], members, coeffs, {"train": batches, "test": batches[1:]}, bn_data=[x for x, _ in batches],
                     progress=False) for _ in range(3)]
    assert all(count == 2 for count, _ in lane_runs)
    for run in runs[1:]:
        assert run.keys() == runs[0].keys()
        for column in run:
            assert torch.equal(run[column], runs[0][column])


def test_one_chunk_custom_metrics_autocast_and_the_plain_path_run_one_lane(two_threads, lane_runs):
    members, batches = members_and_data("digits_cnn")
    few = chunks_module.CPU_MIN_CHUNK - 1  # one chunk
    evaluate(members[0], members, convex_rows(few, 3, seed=1), batches, bn="eval", progress=False)
    evaluate(members[0], members, convex_rows(19, 3, seed=1), batches, bn="eval", progress=False,
             metrics=("loss", ("max logit", lambda outputs, targets: outputs.max(dim=1).values)))
    evaluate(members[0], members, convex_rows(19, 3, seed=1), batches, bn="eval", progress=False, fast=False)
    assert [count for count, _ in lane_runs] == [1, 1, 1]
    view = SubspaceView(members[0], Basis.from_members(members))
    cpu, metrics = torch.device("cpu"), check_metrics(("loss", "error"))
    assert [evaluate_module._lane_count(view, chunks, cpu, metrics, None) for chunks in (1, 2, 3)] == [1, 2, 2]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # thread-local: the lanes' threads would not see it
        assert evaluate_module._lane_count(view, 2, cpu, metrics, None) == 1


def test_an_error_in_a_lane_is_raised_and_the_thread_count_restored(two_threads, lane_runs):
    members, batches = members_and_data("digits_cnn")
    bn_data = [batches[0][0], torch.randn(5, 2, 8, 8)]  # the second batch has two channels, the model takes one
    with pytest.raises(RuntimeError):
        evaluate(members[0], members, convex_rows(19, 3, seed=1), batches, bn_data=bn_data, progress=False)
    assert lane_runs[0][0] == 2 and torch.get_num_threads() == 2


def test_run_in_lanes_gives_each_lane_every_item_in_order_and_stops_at_an_error(two_threads):
    seen: list[list[int]] = [[], [], []]
    lanes.run_in_lanes([seen[i].append for i in range(3)], iter(range(50)))
    assert seen == [list(range(50))] * 3

    def failing(item: int) -> None:
        if item == 3:
            raise KeyError("lane two")

    taken: list[int] = []
    with pytest.raises(KeyError, match="lane two"):
        lanes.run_in_lanes([taken.append, failing], iter(range(1000)))
    assert taken[:4] == [0, 1, 2, 3] and len(taken) < 1000 and torch.get_num_threads() == 2


def test_lane_shares_split_whole_chunks_evenly():
    chunks = [slice(0, 15), slice(15, 30), slice(30, 45), slice(45, 61)]
    assert lanes.lane_shares(chunks, 2) == [(slice(0, 30), [slice(0, 15), slice(15, 30)]),
                                            (slice(30, 61), [slice(0, 15), slice(15, 31)])]
    assert lanes.lane_shares(chunks, 1) == [(slice(0, 61), chunks)]
