"""`evaluate` under `torch.autocast`: the engine's combined linear and convolution layers run in autocast's dtype,
as torch's own F.linear and F.conv*d do, so each model gives what a plain loop gives under the same autocast (to
bfloat16's precision), on the fast path and the plain one."""
from __future__ import annotations

import warnings

import pytest
import torch

from helpers import SequenceConv, SmallCNN, TokenModel, mlp, plain_loop, seeded, settle_batchnorm
from modeconn_fast import evaluate
from test_engine_fast import convex_rows
from test_sequence_models import EncoderClassifier, RecurrentClassifier, tokens_with_padding


def cases():
    images, signals = torch.randn(40, 3, 8, 8), torch.randn(20, 4, 21)
    yield "mlp", [seeded(mlp, s) for s in (1, 2, 3)], (torch.randn(53, 19), torch.randint(0, 5, (53,))), ()
    cnn = [settle_batchnorm(seeded(SmallCNN, s), images) for s in (4, 5, 6)]
    yield "cnn eval", cnn, (images[:13], torch.randint(0, 4, (13,))), ()
    yield "cnn recompute", cnn, (images[:13], torch.randint(0, 4, (13,))), [images[:23], images[23:]]
    conv1d = [settle_batchnorm(seeded(SequenceConv, s), signals) for s in (6, 7, 8)]
    yield "conv1d", conv1d, (signals[:11], torch.randint(0, 3, (11,))), ()
    tokens = [seeded(TokenModel, s) for s in (8, 9, 10)]
    yield "tokens", tokens, (torch.randint(0, 11, (17, 7)), torch.randint(0, 3, (17,))), ()
    encoder = [seeded(lambda: EncoderClassifier(False, True), s).eval() for s in (11, 12, 13)]
    yield "transformer", encoder, (tokens_with_padding(), torch.randint(0, 3, (9,))), ()
    gru = [seeded(lambda: RecurrentClassifier("gru"), s) for s in (14, 15, 16)]
    yield "gru", gru, (torch.randn(9, 6, 5), torch.randint(0, 3, (9,))), ()


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("case", list(cases()), ids=lambda case: case[0])
def test_evaluate_under_autocast_equals_a_plain_loop_under_autocast(case, fast):
    name, members, batch, bn_batches = case
    coeffs = convex_rows(5, len(members), seed=3)
    bn = "recompute" if bn_batches else "eval"
    loop = dict(bn=bn, bn_batches=bn_batches)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warnings about nested tensors
        result = evaluate(members[0], members, coeffs, batch, bn=bn, bn_data=list(bn_batches) or None, fast=fast,
                          progress=False)
        expected = plain_loop(members[0], members, coeffs, [batch], **loop) if name != "transformer" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = plain_loop(members[0], members, coeffs, [batch], **loop)
    torch.testing.assert_close(result["loss"], exact["loss"], rtol=2e-2, atol=1e-3)
    if expected is not None:  # torch's encoder layer under CPU autocast fails (fused path) or is ~5 % off (slow path)
        torch.testing.assert_close(result["loss"], expected["loss"], rtol=2e-2, atol=1e-3)
        for bfloat16 in (expected, result):  # both ran their products in bfloat16
            assert not torch.allclose(bfloat16["loss"], exact["loss"], rtol=1e-6, atol=0)
