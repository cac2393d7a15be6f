"""Candidate assignments: start at the nearest codeword, freeze when sure, end hard."""

from __future__ import annotations

import torch

from vqcompress import progressive
from vqcompress.coded import CodedWeight, CodeLayout


def _code() -> tuple[CodedWeight, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(1, 16, 2, generator=generator)
    weight = torch.randn(8, 6, generator=generator)
    code = CodedWeight.encode(CodeLayout((8, 6), k=16, dim=2, codebook_dtype="float32"), codebook,
                              torch.zeros(8, 3, dtype=torch.int64))
    code.reassign(weight)
    return code, weight


def _attach(code: CodedWeight, weight: torch.Tensor, n: int) -> progressive.Progressive:
    code.recipe["candidates"] = n
    return progressive.Progressive({"w": code}, {"w": weight})


def test_candidates_start_nearest_first_and_cold_mixtures_are_the_nearest_codeword():
    code, weight = _code()
    nearest = code.decode()
    assigner = _attach(code, weight, 4).codes["w"].assigner
    assert torch.equal(assigner.candidates[..., 0].long(), code.code_matrix())
    assert (assigner.logits[..., 0] >= assigner.logits[..., 1:].max(-1).values).all()
    assigner.anneal(1.0)
    assigner.temperature = 1e-4
    assert torch.allclose(code.decode(), nearest, atol=1e-4)


def test_freezing_is_for_good_and_finishing_stores_the_choice():
    code, weight = _code()
    learning = _attach(code, weight, 3)
    assigner = code.assigner
    with torch.no_grad():
        assigner.logits.zero_()
        assigner.logits[0, 0, 2] = 20.0  # one sub-vector sure of its third candidate
    assigner.freeze()
    assert assigner.frozen.sum() == 1 and assigner.choice[0, 0] == 2
    with torch.no_grad():
        assigner.logits[0, 0] = torch.tensor([20.0, 0.0, 0.0])  # changing its mind later changes nothing
    assert torch.equal(assigner.probabilities()[0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert assigner.regulariser() > 0
    third = assigner.candidates[0, 0, 2]
    learning.finish()
    assert code.assigner is None and code.code_matrix()[0, 0] == third


def test_gradients_reach_the_logits_not_the_frozen_ones():
    code, weight = _code()
    assigner = _attach(code, weight, 4).codes["w"].assigner
    with torch.no_grad():
        assigner.logits[1, 1] = torch.tensor([30.0, 0.0, 0.0, 0.0])
    assigner.freeze()
    code.decode().square().sum().backward()
    assert assigner.logits.grad[1, 1].abs().sum() == 0 and assigner.logits.grad.abs().sum() > 0
