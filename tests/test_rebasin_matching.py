"""Weight matching: planted permutations recovered exactly, the reference trajectory kept, bad input refused."""
from __future__ import annotations

import math
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from rebasin_models import build, inputs, mlp
from test_rebasin_spec import ARCHITECTURES, random_permutation

from modeconn_fast.rebasin import matching as matching_module
from modeconn_fast.rebasin import Heads, Permutation, PermutationSpec, SpecError, lap, lap_loading, matching_objective, permutation_spec, weight_matching

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.peers import rebasin_port  # noqa: E402


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_planted_permutation_is_recovered_exactly(name: str) -> None:
    model_a = build(name, seed=3)
    spec = permutation_spec(model_a, inputs(model_a))
    planted = random_permutation(spec, model_a, seed=4)
    model_b = planted.apply(model_a)
    result = weight_matching(model_a, model_b, example_input=inputs(model_a))
    expected = planted.inverse().perms
    for group in spec.groups:
        assert torch.equal(result.perms[group], expected[group]), group
    aligned = result.apply(model_b)
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(aligned.state_dict()[key], value, rtol=0, atol=0)
    assert result.objective == pytest.approx(sum(p.double().square().sum().item() for p in model_a.parameters()), rel=1e-9)


def float32_caches_from(units: int, monkeypatch) -> None:
    """Cost caches in float32 for groups of `units` or more, float64 below (float32 models)."""
    monkeypatch.setattr(matching_module, "FLOAT32_FROM", units)
    monkeypatch.setattr(matching_module, "FLOAT32_UP_TO", 0)


@pytest.mark.parametrize("float32_from", [1 << 30, 8])  # float64, float32 caches
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_half_precision_models_match_as_their_float32_copies(name: str, dtype: torch.dtype, float32_from: int,
                                                             monkeypatch) -> None:
    """bfloat16 and float16 weights are widened exactly to float32 for the products: the same permutations and
    objective as the float32 copies of the same weights."""
    float32_caches_from(float32_from, monkeypatch)
    reference = build(name, seed=0)
    spec = permutation_spec(reference, inputs(reference))
    narrow_a, narrow_b = reference.to(dtype), build(name, seed=1).to(dtype)
    state_a, state_b = narrow_a.state_dict(), narrow_b.state_dict()
    wide_a, wide_b = ({k: v.float() for k, v in state.items()} for state in (state_a, state_b))
    narrow = weight_matching(state_a, state_b, spec=spec)
    wide = weight_matching(wide_a, wide_b, spec=spec)
    assert narrow.iterations == wide.iterations
    for group in spec.groups:
        assert torch.equal(narrow.perms[group], wide.perms[group]), group
    assert narrow.objective_history == pytest.approx(wide.objective_history, rel=1e-12)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_float64_models_keep_float64_costs(name: str, monkeypatch) -> None:
    """float64 weights: products and caches in float64 at every width (no FLOAT32_* applies), so the
    history is exact: it never falls and ends at the objective summed directly."""
    monkeypatch.setattr(matching_module, "FLOAT32_FROM", 8)
    model_a, model_b = build(name, seed=0).double(), build(name, seed=1).double()
    example = inputs(model_a)
    spec = permutation_spec(model_a, example.double() if example.is_floating_point() else example)
    result = weight_matching(model_a, model_b, spec=spec)
    history = result.objective_history
    assert all(b >= a - 1e-12 * abs(a) for a, b in zip(history, history[1:]))
    params = {n for n, _ in model_a.named_parameters()}
    assert history[-1] == pytest.approx(matching_objective(model_a.state_dict(), model_b.state_dict(), result, params), rel=1e-12)
    planted = random_permutation(spec, model_a, seed=4)
    recovered = weight_matching(model_a, planted.apply(model_a), spec=spec)
    for group in spec.groups:
        assert torch.equal(recovered.perms[group], planted.inverse().perms[group]), group


@pytest.mark.parametrize(("float32_from", "rounding"), [(1 << 30, 1e-9), (8, 1e-6)])  # float64, float32 caches
def test_objective_history_never_decreases_and_is_exact(float32_from: int, rounding: float, monkeypatch) -> None:
    float32_caches_from(float32_from, monkeypatch)
    model_a, model_b = build("resnet", seed=0), build("resnet", seed=1)
    result = weight_matching(model_a, model_b, example_input=inputs(model_a), seed=5)
    history = result.objective_history
    assert len(history) == result.iterations + 1 >= 3
    assert all(b >= a - rounding * abs(a) for a, b in zip(history, history[1:]))
    params = {n for n, _ in model_a.named_parameters()}
    direct = matching_objective(model_a.state_dict(), model_b.state_dict(), result, params)
    assert result.objective == pytest.approx(direct, rel=1e-12)
    start = Permutation.identity(result.spec, model_a.state_dict())
    assert history[0] == pytest.approx(matching_objective(model_a.state_dict(), model_b.state_dict(), start, params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])  # numpy's sums; torch's dot
def test_objective_equals_a_float64_sum_of_products(dtype: torch.dtype) -> None:
    reference = build("resnet", seed=0)
    spec = permutation_spec(reference, inputs(reference))
    model_a, model_b = reference.to(dtype), build("resnet", seed=1).to(dtype)
    perm = random_permutation(spec, model_a, seed=2)
    params = {n for n, _ in model_a.named_parameters()}
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    permuted = perm.permute_state(state_b)
    expected = sum((state_a[k].double() * permuted[k].double()).sum().item() for k in params)
    assert matching_objective(state_a, state_b, perm, params) == pytest.approx(expected, rel=1e-12)


def _port_spec(spec):
    axes_to_perm: dict[str, list] = {}
    for group, axes in spec.groups.items():
        for axis in axes:
            assert axis.inner == 1
            entry = axes_to_perm.setdefault(axis.tensor, [None] * 4)
            entry[axis.dim] = group
    return axes_to_perm


@pytest.mark.parametrize("float32_from", [1 << 30, 100])  # width 200 keeps float32 cost caches at 100
@pytest.mark.parametrize(("seed", "width"), [(0, 48), (1, 200)])
def test_same_trajectory_as_the_reference_port(seed: int, width: int, float32_from: int, monkeypatch) -> None:
    monkeypatch.setattr(lap, "DENSE_BELOW", 100)  # width 200 takes the sparse, certified LAP
    float32_caches_from(float32_from, monkeypatch)
    lap_loading.wait()  # not scipy's solver while the compiled one loads
    torch.manual_seed(10 + seed)
    model_a, model_b = mlp((64, width, width, width, 10)), mlp((64, width, width, width, 10))
    spec = permutation_spec(model_a, torch.randn(2, 64))
    params = {n for n, _ in model_a.named_parameters()}
    state_a = {k: v.detach() for k, v in model_a.state_dict().items() if k in params}
    state_b = {k: v.detach() for k, v in model_b.state_dict().items() if k in params}
    axes_to_perm = {k: tuple(v[: state_a[k].dim()]) for k, v in _port_spec(spec).items()}
    axes_to_perm.update({k: (None,) * v.dim() for k, v in state_a.items() if k not in axes_to_perm})
    perm_to_axes = {g: [(a.tensor, a.dim) for a in axes] for g, axes in spec.groups.items()}
    reference, sweeps = rebasin_port.weight_matching(state_a, state_b, perm_to_axes, axes_to_perm, seed=seed)
    ours = weight_matching(model_a, model_b, spec=spec, seed=seed)
    assert ours.iterations == sweeps > 2
    for group in spec.groups:
        assert torch.equal(ours.perms[group], reference[group]), group


@pytest.mark.parametrize("float32_from", [1 << 30, 8])  # float64 caches, float32 caches
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_chunked_temporaries_change_nothing(name: str, float32_from: int, monkeypatch) -> None:
    """Updates gathered, subtracted and multiplied a few rows at a time (columns of B read once in order), or with
    every temporary in kept storage (`_Reused`), give the very same permutations and objective history as
    whole-matrix temporaries."""
    monkeypatch.setattr(lap, "DENSE_BELOW", 8)  # the certified LAP
    float32_caches_from(float32_from, monkeypatch)
    lap_loading.wait()
    model_a, model_b = build(name, seed=5), build(name, seed=6)
    runs = []
    for chunk, lines, reused_from, twice in ((1 << 30, 1 << 30, 1 << 30, 1 << 30), (16, 3, 1 << 30, 0), (16, 3, 0, 0)):
        monkeypatch.setattr(matching_module, "CHUNK", chunk)
        monkeypatch.setattr(matching_module, "GATHER_TWICE_UP_TO", twice)
        monkeypatch.setattr(matching_module, "LINES", lines)
        monkeypatch.setattr(matching_module, "REUSED_FROM", reused_from)
        runs.append(weight_matching(model_a, model_b, example_input=inputs(model_a)))
    whole = runs[0]
    assert whole.iterations > 1
    for other in runs[1:]:
        assert other.objective_history == whole.objective_history
        for group in whole.perms:
            assert torch.equal(other.perms[group], whole.perms[group]), group


@pytest.mark.parametrize("gather_twice_up_to", [matching_module.GATHER_TWICE_UP_TO, 0])  # B in cache, or not
@pytest.mark.parametrize("reused_from", [matching_module.REUSED_FROM, 0])  # temporaries fresh, or all kept
@pytest.mark.parametrize("name", ["mlp", "vgg"])
def test_moved_units_difference_equals_two_gathers(name: str, reused_from: int, gather_twice_up_to: int,
                                                   monkeypatch) -> None:
    """`_Term.moved` (where rows are gathered as columns: two gathers of B in cache, else B read once at the moved
    units' places in increasing order, a few lines at a time) gives bit for bit B's rows at the new places minus
    those at the old ones."""
    monkeypatch.setattr(matching_module, "REUSED_FROM", reused_from)
    monkeypatch.setattr(matching_module, "GATHER_TWICE_UP_TO", gather_twice_up_to)
    monkeypatch.setattr(matching_module, "LINES", 3)
    monkeypatch.setattr(matching_module, "BLOCK_ENTRIES", 0)  # blocks of 3 lines, however few units move
    model_a, model_b = build(name, seed=0), build(name, seed=1)
    params = {n for n, _ in model_a.named_parameters()}
    matcher = matching_module._Matcher(permutation_spec(model_a, inputs(model_a)), model_a.state_dict(), model_b.state_dict(), params)
    generator = torch.Generator().manual_seed(0)
    reused = matching_module._Reused()
    layouts = set()
    for term in (term for terms in matcher.terms.values() for term in terms):
        size = term.b.shape[0]
        term.seen = torch.randperm(size, generator=generator)
        now = term.seen.clone()
        picked = torch.randperm(size, generator=generator)[: size // 3 + 2]
        now[picked] = term.seen[picked[torch.randperm(len(picked), generator=generator)]]
        units = torch.nonzero(now != term.seen).flatten()
        expected = term.rows(term.b, now[units], reused, "new") - term.rows(term.b, term.seen[units], reused, "old")
        assert torch.equal(term.moved(units, now, reused), expected)
        layouts.add(term.b.stride(0) < term.b.stride(-1))
    assert layouts == {True, False}  # both gathers: as columns and as rows


@pytest.mark.parametrize("serial_up_to", [0, matching_module.SERIAL_UP_TO])  # torch on 2 threads, on one
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_work_beside_a_lap_keeps_the_serial_trajectory(name: str, serial_up_to: int, monkeypatch) -> None:
    """Where the sweep solves the next group's LAP on a second thread at the same time (with its cost formed
    there too, beside the current group's, when torch runs on one thread: `_cost_and_solve`), or updates the next
    group's cost beside a LAP, every solve returns the permutation of the serial order: the same visits,
    permutations and objective history; with torch on 2 threads, and with the small groups' sweeps on one
    (`_one_torch_thread`), the caller's count restored after."""
    monkeypatch.setattr(lap, "DENSE_BELOW", 8)  # the certified LAP (numba, released GIL)
    monkeypatch.setattr(matching_module, "SERIAL_UP_TO", serial_up_to)
    lap_loading.wait()
    model_a, model_b = build(name, seed=7), build(name, seed=8)
    if name == "mlp":  # four hidden groups: non-neighbours meet in most sweep orders
        torch.manual_seed(7)
        model_a, model_b = mlp((64, 40, 40, 40, 40, 10)), mlp((64, 40, 40, 40, 40, 10))
    found: dict[str, list] = {"_solvable_alongside": [], "_updated_ahead": []}

    def recorded(name: str):
        pick = getattr(matching_module, name)

        def record(*args):
            found[name].extend([pick(*args)])
            return found[name][-1]

        return record

    updated: list[int] = []
    update_ahead = matching_module._Matcher.update_ahead

    def counted(self, group, perms, moving, future) -> None:
        before = [term.seen for term in self.terms[group]]
        update_ahead(self, group, perms, moving, future)
        updated.append(sum(seen is not term.seen for seen, term in zip(before, self.terms[group])))

    chains: list[str] = []
    cost_and_solve = matching_module._cost_and_solve
    monkeypatch.setattr(matching_module, "_cost_and_solve", lambda matcher, group, *args: chains.append(group)
                        or cost_and_solve(matcher, group, *args))
    runs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # pairs only where torch may use more than one thread
    try:
        for picks in ({name: lambda *args: None for name in found}, {name: recorded(name) for name in found}):
            for name_, pick in picks.items():
                monkeypatch.setattr(matching_module, name_, pick)
            monkeypatch.setattr(matching_module._Matcher, "update_ahead", counted)
            visits: list[tuple[str, torch.Tensor]] = []
            result = weight_matching(model_a, model_b, example_input=inputs(model_a), on_visit=lambda g, p: visits.append((g, p)))
            assert torch.get_num_threads() == 2
            runs.append((visits, result.objective_history))
    finally:
        torch.set_num_threads(threads)
    (serial, serial_history), (pairs, pairs_history) = runs
    assert [g for g, _ in pairs] == [g for g, _ in serial]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(pairs, serial))
    assert pairs_history == serial_history
    if name in ("mlp", "vgg"):
        assert any(later is not None for later in found["_solvable_alongside"]), "no two LAPs were solved at once"
        assert bool(chains) == (serial_up_to > 0), "two chains only where torch runs on one thread"
    if name == "mlp":
        assert sum(updated) > 0, "no cost was updated beside a LAP"


def test_init_is_a_fixed_point_when_already_optimal() -> None:
    model_a = build("mlp", seed=0)
    spec = permutation_spec(model_a, inputs(model_a))
    planted = random_permutation(spec, model_a, seed=1)
    model_b = planted.apply(model_a)
    result = weight_matching(model_a, model_b, spec=spec, init=planted.inverse())
    assert result.iterations == 1
    assert result.objective_history[0] == pytest.approx(result.objective)


def test_different_architectures_are_refused() -> None:
    with pytest.raises(SpecError, match="different architectures"):
        weight_matching(mlp((64, 32, 32, 10)), mlp((64, 32, 16, 10)), example_input=torch.randn(2, 64))
    with pytest.raises(SpecError, match="different architectures"):
        weight_matching(build("mlp"), build("vgg"), example_input=torch.randn(2, 64))


@pytest.mark.parametrize(("label", "value"), [("model_b", float("nan")), ("model_a", float("inf")), ("model_a", -float("inf"))])
def test_non_finite_weights_are_refused(label: str, value: float) -> None:
    models = {"model_a": build("mlp", seed=0), "model_b": build("mlp", seed=1)}
    name, weight = list(models[label].named_parameters())[-1]  # the last bias: in no permuted group's cost
    with torch.no_grad():
        weight[0] = value
    with pytest.raises(ValueError, match=f"{label}'s {name} holds NaN"):
        weight_matching(models["model_a"], models["model_b"], example_input=inputs(models["model_a"]))


def test_history_is_the_same_on_one_thread_and_two() -> None:
    """J before the first sweep is computed at the end: beside the final J on a second thread where torch has two
    threads, after it on the caller's where torch has one; the same numbers either way."""
    model_a, model_b = build("mlp", seed=0), build("mlp", seed=1)
    threads = torch.get_num_threads()
    histories = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            histories.append(weight_matching(model_a, model_b, example_input=inputs(model_a)).objective_history)
    finally:
        torch.set_num_threads(threads)
    assert histories[0] == histories[1]
    start = Permutation.identity(permutation_spec(model_a, inputs(model_a)), model_a.state_dict())
    params = {n for n, _ in model_a.named_parameters()}
    assert histories[0][0] == matching_objective(model_a.state_dict(), model_b.state_dict(), start, params)


def test_large_finite_weights_are_matched() -> None:
    """The screen for NaN and ±∞ (a float32 dot product per tensor) overflows on weights of 1e30; every entry is
    then tested, none refused, and the objective (float64) stays finite."""
    model_a, model_b = build("mlp", seed=0), build("mlp", seed=1)
    (name, _), *_ = reversed(list(model_a.named_parameters()))  # the last bias: in no permuted group's cost
    with torch.no_grad():
        for model in (model_a, model_b):
            dict(model.named_parameters())[name][0] = 1e30
    result = weight_matching(model_a, model_b, example_input=inputs(model_a))
    assert math.isfinite(result.objective) and result.objective > 1e59


def test_spec_or_example_input_required() -> None:
    with pytest.raises(SpecError, match="example_input"):
        weight_matching(build("mlp"), build("mlp", seed=1))


class _ResidualLinear(torch.nn.Module):
    """A residual stream whose inner Linear maps the stream to itself: both axes of res.weight in one group."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.res, self.out = torch.nn.Linear(8, 12), torch.nn.Linear(12, 12), torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + torch.tanh(self.res(h)))


def test_tensor_with_two_axes_in_one_group() -> None:
    torch.manual_seed(0)
    model_a = _ResidualLinear()
    example = torch.randn(4, 8)
    spec = permutation_spec(model_a, example)
    assert {str(a) for a in spec.groups["inp"]} >= {"res.weight[0]", "res.weight[1]"}
    planted = random_permutation(spec, model_a, seed=2)
    model_b = planted.apply(model_a)
    result = weight_matching(model_a, model_b, spec=spec)
    assert torch.equal(result.perms["inp"], planted.inverse().perms["inp"])
    assert all(b >= a - 1e-9 for a, b in zip(result.objective_history, result.objective_history[1:]))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_activation_matching_recovers_a_planted_permutation(name: str) -> None:
    from modeconn_fast.rebasin import activation_matching

    model_a = build(name, seed=5)
    x = inputs(model_a, batch=64, seed=6)
    spec = permutation_spec(model_a, x)
    planted = random_permutation(spec, model_a, seed=7)
    hidden = set(spec.heads.get("attn", Heads((), 1)).groups)  # inside nn.MultiheadAttention: no activation to see
    planted.perms.update({g: torch.arange(len(planted.perms[g])) for g in hidden})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = activation_matching(model_a, planted.apply(model_a), (x, torch.zeros(64)))
    assert bool(hidden) == any("leaves 2 group(s) in place" in str(w.message) for w in caught)
    for group, perm in planted.inverse().perms.items():
        assert torch.equal(result.perms[group], perm), group


def test_models_of_different_dtypes_are_refused_with_the_fix() -> None:
    model_a, model_b = build("mlp", seed=0), build("mlp", seed=1).double()
    with pytest.raises(SpecError, match=r"float32 in model_a but torch.float64 in model_b.*model_b.to\(torch.float32\)"):
        weight_matching(model_a, model_b, example_input=inputs(model_a))


def test_models_on_different_devices_are_refused_with_the_fix() -> None:
    model_a, model_b = build("mlp", seed=0), build("mlp", seed=1).to("meta")
    with pytest.raises(SpecError, match=r"on cpu in model_a but on meta in model_b.*model_b.to\('cpu'\)"):
        weight_matching(model_a, model_b, example_input=inputs(model_a))


def test_weights_spread_over_devices_are_refused_with_the_fix() -> None:
    model_a, model_b = build("mlp", seed=0), build("mlp", seed=1)
    spec = permutation_spec(model_a, inputs(model_a))
    state_a, state_b = dict(model_a.state_dict()), dict(model_b.state_dict())
    last = sorted(state_a)[-1]
    state_a[last], state_b[last] = state_a[last].to("meta"), state_b[last].to("meta")
    with pytest.raises(SpecError, match=r"several devices \(cpu, meta\).*model.to\('cpu'\)"):
        weight_matching(state_a, state_b, spec=spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_models_on_cuda_match_there(name: str) -> None:
    """Models on CUDA: the costs are formed there, only the LAPs' inputs cross; a planted permutation is
    recovered exactly, and a random pair reaches the CPU's objective (the same trajectory but for rounding)."""
    model_a = build(name, seed=3)
    spec = permutation_spec(model_a, inputs(model_a))
    planted = random_permutation(spec, model_a, seed=4)
    model_b = planted.apply(model_a)
    result = weight_matching(model_a.cuda(), model_b.cuda(), spec=spec)
    for group in spec.groups:
        assert torch.equal(result.perms[group], planted.inverse().perms[group]), group
    pair = build(name, seed=0), build(name, seed=1)
    on_cpu = weight_matching(*pair, spec=spec)
    on_cuda = weight_matching(*(model.cuda() for model in pair), spec=spec)
    assert on_cuda.objective == pytest.approx(on_cpu.objective, rel=1e-5)


def test_spec_naming_a_missing_tensor_says_which_and_how_to_fix() -> None:
    model_a, model_b = build("mlp", seed=0), build("mlp", seed=1)
    spec = permutation_spec(model_a, inputs(model_a))
    name = spec.groups[next(iter(spec.groups))][0].tensor
    typo = PermutationSpec({"g": [(name.replace("weight", "wieght"), 0)]})
    with pytest.raises(SpecError, match=rf"no tensor {typo.groups['g'][0].tensor!r} \(did you mean {name!r}.*state_dict\(\) keys"):
        weight_matching(model_a, model_b, spec=typo)


@pytest.mark.parametrize("blocks", ["chunks", "small"])
@pytest.mark.parametrize("float32_from", [8, 1 << 30])  # float32 and float64 caches
def test_two_lanes_give_the_same_bits(float32_from: int, blocks: str, monkeypatch) -> None:
    """Cost updates whose blocks of rows are shared between two threads (`_in_two_lanes`, one torch thread each)
    give the cache bit for bit as one thread with two torch threads does: first visits and moved units. `chunks`:
    a group of more than CHUNK units, whose blocks one thread makes too; `small`: a group of at most
    SERIAL_UP_TO units, whose blocks of LANE_ROWS rows must give the one product of one thread (rows of an MKL
    product do not depend on the rows beside them)."""
    float32_caches_from(float32_from, monkeypatch)
    if blocks == "chunks":
        monkeypatch.setattr(matching_module, "CHUNK", 67)  # 200 units: three blocks (MKL's tiny products differ)
    elif blocks == "small":
        monkeypatch.setattr(matching_module, "LANE_ROWS", 100)  # 200 units: two blocks against one product
        monkeypatch.setattr(matching_module, "LANE_RANK", 1)
    torch.manual_seed(3)
    model_a, model_b = mlp((64, 200, 200, 200, 10)), mlp((64, 200, 200, 200, 10))
    spec = permutation_spec(model_a, inputs(model_a))
    params = {n for n, _ in model_a.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    steps = [{g: torch.randperm(200, generator=generator) for g in spec.groups} for _ in range(3)]
    caches = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(1) as pool:
            for lanes in (None, pool):
                matcher = matching_module._Matcher(spec, model_a.state_dict(), model_b.state_dict(), params)
                caches.append([matcher.cost(g, perms, lanes).clone() for perms in steps for g in spec.groups])
                assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    serial, two_lanes = caches
    assert all(torch.equal(a, b) for a, b in zip(serial, two_lanes))
    assert serial[0].dtype == (torch.float32 if float32_from == 8 else torch.float64)
