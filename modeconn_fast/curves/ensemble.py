"""Ensembles of models of one architecture, all members evaluated in one batched pass of the subspace view.

The members are points of a weight subspace (DESIGN §1): an architecture, a `Basis` and one coefficient row
per member, one-hot over the members themselves for plain models, or rows over a curve's control points
(`Ensemble.from_curve`, as FGE and curve ensembles of Garipov et al. 2018 use them).

With the members' class probabilities p_m = softmax(outputs_m), m = 1 … M, on an input x:

    probs               p̄ = (1/M) Σ_m p_m                            the ensemble's prediction
    entropy             H[p̄] = −Σ_y p̄_y log p̄_y                      total uncertainty (nats)
    mutual_information  H[p̄] − (1/M) Σ_m H[p_m]                     the members' disagreement (≥ 0)
    variance            (1/C) Σ_y (1/M) Σ_m (p_m,y − p̄_y)²           mean over the C classes of the
                                                                     across-member variance of p_y

The ensemble's loss is the negative log-likelihood of p̄, −log p̄_target (each member's: its cross-entropy);
its error is the top-1 error of p̄; calibration is measured by the ECE over 15 bins (`engine/calibration.py`).
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine import SubspaceView
from ..engine.batches import Batches, Inputs, move
from ..engine.calibration import ReliabilityBins
from ..engine.chunks import plan_chunks
from ..engine.evaluate import batchnorm_mode
from ..engine.outputs import OutputSelector
from ..subspace import Basis


class CurveLike(Protocol):
    """What `Ensemble.from_curve` needs of a curve."""

    architecture: nn.Module  # the user's model: its architecture

    def basis(self) -> Basis: ...  # a detached snapshot of the control points

    def coefficients(self, t: Tensor) -> Tensor: ...  # rows [len(t), K]


@dataclass
class EnsemblePrediction:
    """The ensemble's prediction on N inputs (see the module's docstring for the definitions)."""

    probs: Tensor  # [N, C], mean of the members' probabilities
    member_probs: Tensor  # [M, N, C]
    entropy: Tensor  # [N], of `probs`, in nats
    mutual_information: Tensor  # [N]
    variance: Tensor  # [N]
    bn_mode: str  # "recompute", "eval" (the stored statistics) or "none"


@dataclass
class EnsembleEvaluation:
    """Loss (NLL), top-1 error and ECE of the ensemble (floats) and of each member (Tensor[M]), over all the
    data; `reliability` and `member_reliability` hold the calibration bins; `bn_mode` says how BatchNorm ran."""

    loss: float
    error: float
    ece: float
    member_loss: Tensor
    member_error: Tensor
    member_ece: Tensor
    reliability: ReliabilityBins
    member_reliability: ReliabilityBins
    bn_mode: str


class Ensemble:
    """Members of one architecture, stored as a `Basis` and coefficient rows, evaluated together.

    `Ensemble(models, bn_data=None)`: models of the same architecture (their weights are copied).
    BatchNorm: with `bn_data` (batches or tensors, usually the training data), every member's statistics are
    recomputed in one pass through the view (at first use); otherwise the stored ones are used, which for
    plain models are each member's own. Results say which (`bn_mode`). `memory_budget` bounds the bytes of
    one chunk of members, as in `evaluate`. `output` picks the logits of a model that returns a tuple, dict or
    dataclass, as in `evaluate`.
    """

    history: Any = None  # how the members were made, where known (e.g. `FGEHistory`)

    def __init__(self, models: Sequence[nn.Module], *, bn_data: Any = None, memory_budget: int | None = None,
                 output: OutputSelector = None):
        models = list(models)
        if not models:
            raise ValueError("an ensemble needs at least one model")
        if not all(isinstance(m, nn.Module) for m in models):
            raise TypeError("Ensemble takes a list of nn.Modules; for state dicts use Ensemble.from_basis")
        basis = Basis.from_members(models, like=models[0])
        self._setup(models[0], basis, torch.eye(len(models)), bn_data, memory_budget, output)

    @classmethod
    def from_basis(cls, architecture: nn.Module, basis: Basis, coeffs: Tensor, *, bn_data: Any = None,
                   memory_budget: int | None = None, output: OutputSelector = None) -> "Ensemble":
        """Members θ_m = Σ_k coeffs[m, k] basis[k] of `architecture`: coeffs [M, K]."""
        ensemble = cls.__new__(cls)
        ensemble._setup(architecture, basis, coeffs, bn_data, memory_budget, output)
        return ensemble

    @classmethod
    def from_curve(cls, curve: CurveLike, ts: Sequence[float] | Tensor, *, bn_data: Any = None,
                   memory_budget: int | None = None, output: OutputSelector = None) -> "Ensemble":
        """The curve's points at `ts` as members: `curve.basis()` with the rows `curve.coefficients(ts)`.
        Pass `bn_data`: running statistics mixed from the control points mean nothing along a curve. `output`
        defaults to the curve's."""
        ts = torch.as_tensor(ts).flatten()
        if not ts.is_floating_point():
            ts = ts.to(torch.get_default_dtype())
        if ts.numel() == 0:
            raise ValueError("ts is empty: give the curve parameters t of the members")
        with torch.no_grad():
            coeffs = curve.coefficients(ts).detach()
        output = output if output is not None else getattr(curve, "output", None)
        return cls.from_basis(curve.architecture, curve.basis(), coeffs, bn_data=bn_data, memory_budget=memory_budget,
                              output=output)

    def _setup(self, architecture: nn.Module, basis: Basis, coeffs: Tensor, bn_data: Any,
               memory_budget: int | None, output: OutputSelector) -> None:
        self.architecture = copy.deepcopy(architecture).eval().requires_grad_(False)
        basis.check_compatible(self.architecture)
        coeffs = torch.as_tensor(coeffs).detach()
        if coeffs.dim() != 2 or coeffs.shape[0] == 0 or coeffs.shape[1] != basis.size:
            raise ValueError(f"coeffs must have shape [members ≥ 1, {basis.size}] (one column per basis member), "
                             f"got {tuple(coeffs.shape)}")
        first = next(iter(basis.stacked.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.basis = basis
        self.coeffs = coeffs.to(self.device, first.dtype if first is not None else torch.get_default_dtype())
        self.bn_data = bn_data
        self.memory_budget = memory_budget
        self.output = output
        self.bn_mode: str | None = None  # known once the view is built (first use)
        self._view: SubspaceView | None = None
        self._batch_names = itertools.count()

    def __len__(self) -> int:
        return self.coeffs.shape[0]

    def __repr__(self) -> str:
        return f"Ensemble(members={len(self)}, basis={self.basis!r}, bn_mode={self.bn_mode!r})"

    @property
    def models(self) -> list[nn.Module]:
        """The members as plain copies of the architecture in eval mode; with `bn_data`, holding the
        recomputed BatchNorm statistics."""
        statistics = self._recomputed_statistics()
        members = []
        for index, row in enumerate(self.coeffs):
            state = self.basis.point(row) | {name: value[index] for name, value in statistics.items()}
            member = copy.deepcopy(self.architecture)
            member.load_state_dict(state)
            members.append(member.eval())
        return members

    @torch.no_grad()
    def predict(self, inputs: Inputs) -> EnsemblePrediction:
        """Probabilities and uncertainties on `inputs` ([N, ...], or a tuple of tensors for several inputs)."""
        rows = (inputs if isinstance(inputs, Tensor) else inputs[0]).shape[0]
        batches = Batches((inputs, torch.zeros(rows, dtype=torch.long)), "inputs")
        view, chunks = self._plan(batches)
        log_probs = torch.cat([self._log_probs(view, chunks, x) for x, _ in batches], dim=1)  # [M, N, C]
        member_probs = log_probs.exp()
        probs = member_probs.mean(dim=0)
        mean_log_probs = torch.logsumexp(log_probs, dim=0) - math.log(len(self))
        entropy = _entropy(probs, mean_log_probs)
        member_entropy = _entropy(member_probs, log_probs).mean(dim=0)
        variance = member_probs.var(dim=0, unbiased=False).mean(dim=1)
        return EnsemblePrediction(probs=probs, member_probs=member_probs, entropy=entropy,
                                  mutual_information=(entropy - member_entropy).clamp_min(0), variance=variance,
                                  bn_mode=self._bn_mode_known())

    @torch.no_grad()
    def evaluate(self, data: Any, *, progress: bool | None = None) -> EnsembleEvaluation:
        """Loss, error and ECE of the ensemble and of every member over all batches of `data`: `(inputs,
        targets)` tensors or an iterable of such batches (integer class targets). progress: show a progress
        bar (default: when the work lasts more than a second)."""
        batches = Batches(data, "data")
        view, chunks = self._plan(batches)
        members = len(self)
        member_loss = torch.zeros(members, dtype=torch.float64, device=self.device)
        member_wrong = torch.zeros_like(member_loss)
        loss = wrong = 0.0
        count = 0
        reliability = ReliabilityBins.zeros(device=self.device)
        member_reliability = ReliabilityBins.zeros(members, device=self.device)
        total = len(batches) if batches.has_length() else None
        with tqdm(total=total, desc="ensemble", unit="batch", delay=0.0 if progress else 1.0,
                  disable=progress is False, leave=False) as bar:
            for inputs, targets in batches:
                if torch.is_floating_point(targets) or targets.dim() != 1:
                    raise ValueError("Ensemble.evaluate needs integer class targets [N]")
                log_probs, targets = self._log_probs(view, chunks, inputs), targets.to(self.device)
                picked = log_probs.gather(2, targets.expand(members, -1).unsqueeze(2)).squeeze(2)  # [M, N]
                member_loss -= picked.sum(dim=1, dtype=torch.float64)
                member_wrong += (log_probs.argmax(dim=2) != targets).sum(dim=1)
                mean_log_probs = torch.logsumexp(log_probs, dim=0) - math.log(members)  # log p̄ [N, C]
                loss -= float(mean_log_probs.gather(1, targets.unsqueeze(1)).sum(dtype=torch.float64))
                wrong += int((mean_log_probs.argmax(dim=1) != targets).sum())
                count += targets.shape[0]
                reliability.add(mean_log_probs.exp(), targets)
                member_reliability.add(log_probs.exp(), targets)
                bar.update()
        return EnsembleEvaluation(loss=loss / count, error=wrong / count, ece=float(reliability.ece()),
                                  member_loss=(member_loss / count).cpu(), member_error=(member_wrong / count).cpu(),
                                  member_ece=member_reliability.ece().cpu(), reliability=reliability,
                                  member_reliability=member_reliability, bn_mode=self._bn_mode_known())

    # --- the pass through the view ---------------------------------------------------------------------------
    def _plan(self, batches: Batches) -> tuple[SubspaceView, list[slice]]:
        """The view and the chunks of members (and rows per batch of tensors) under the memory budget."""
        view = self._ready(batches)
        return view, plan_chunks(view, self.coeffs, [batches], None, self.memory_budget, self.device)

    def _log_probs(self, view: SubspaceView, chunks: list[slice], inputs: Inputs) -> Tensor:
        """Every member's log-probabilities [M, B, C] on one batch, chunk by chunk of members."""
        inputs, name = move(inputs, self.device), ("ensemble", next(self._batch_names))
        outputs = torch.cat([view(self.coeffs[chunk], inputs, offset=chunk.start, batch=name) for chunk in chunks])
        if outputs.dim() != 3:
            raise ValueError(f"an ensemble needs class scores [N, classes] from the model, got outputs of shape "
                             f"{tuple(outputs.shape[1:])}")
        return F.log_softmax(outputs.to(torch.promote_types(outputs.dtype, torch.float32)), dim=2)

    def _bn_mode_known(self) -> str:
        assert self.bn_mode is not None, "the view is built before any result"
        return self.bn_mode

    def _ready(self, probe: Batches | None) -> SubspaceView:
        """The view, built at first use: checked on a probe batch, BatchNorm statistics recomputed if asked."""
        if self._view is not None:
            return self._view
        bn_batches = Batches(self.bn_data, "bn_data", targets_optional=True) if self.bn_data is not None else None
        source = bn_batches if bn_batches is not None else probe
        assert source is not None, "a probe batch or bn_data is needed to build the view"
        first = source.first[0]
        view = SubspaceView(self.architecture, self.basis, output=self.output)
        view.prepare(self.coeffs, move(first[:2] if isinstance(first, Tensor) else tuple(x[:2] for x in first),
                                       self.device))
        self.bn_mode = self._batchnorm_mode(view)
        if self.bn_mode == "recompute":
            assert bn_batches is not None
            chunks = plan_chunks(view, self.coeffs, [bn_batches], bn_batches, self.memory_budget, self.device)
            with torch.no_grad():
                view.recompute_batchnorm(self.coeffs, (move(x, self.device) for x, _ in bn_batches), chunks)
        else:
            view.use_stored_batchnorm()
        self._view = view
        return view

    def _batchnorm_mode(self, view: SubspaceView) -> str:
        """As `evaluate` decides it; members that are basis members themselves (one-hot rows) use their own
        statistics without a warning."""
        one_hot = bool(((self.coeffs == 0) | (self.coeffs == 1)).all() and (self.coeffs.sum(dim=1) == 1).all())
        return batchnorm_mode("eval" if self.bn_data is None and one_hot else "auto", view, self.bn_data)

    def _recomputed_statistics(self) -> dict[str, Tensor]:
        """{'<layer>.running_mean' / '.running_var': [M, C]} from the view's recomputation, or {} without it."""
        if self.bn_data is None:
            return {}
        view = self._ready(None)
        if self.bn_mode != "recompute":
            return {}
        return view.recomputed_batchnorm_state()


def _entropy(probs: Tensor, log_probs: Tensor) -> Tensor:
    """−Σ_y p_y log p_y over the last axis (0 · log 0 counts as 0)."""
    return -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(dim=-1)
