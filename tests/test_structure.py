"""The shape of the code the issue #25 refactor settled on: method parts satisfy their Protocols, explicit
flags instead of None signals (the eight-parameter rule is in test_code_shape.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from streamprune.method_parts import (
    AffineRecovery,
    ChannelSelector,
    DownProjFit,
    DownProjInput,
    HeadSelector,
    LayerReport,
    LeastSquaresRecovery,
    MethodParts,
    MethodSwitches,
    NoReconstruction,
    PlainRemoval,
    Reconstruction,
    Recovery,
    RefitChannels,
    RefitHeads,
    SlimLLMChannels,
    SlimLLMHeads,
)
from streamprune.reconstruction import GradientReconstruction, ReconstructionSettings

SETTINGS = ReconstructionSettings(("attention", "mlp"), "dense", 1, 1e-3, 4, 5, 0)


@pytest.mark.parametrize(("part", "protocol"), [
    (SlimLLMHeads(greedy=True), HeadSelector), (RefitHeads(0.01), HeadSelector),
    (SlimLLMChannels(True, 0.0), ChannelSelector), (RefitChannels(0.01), ChannelSelector),
    (PlainRemoval(), Recovery), (AffineRecovery(), Recovery), (LeastSquaresRecovery(0.01, False), Recovery),
    (NoReconstruction(), Reconstruction), (GradientReconstruction(SETTINGS), Reconstruction),
], ids=lambda x: type(x).__name__)
def test_each_method_part_satisfies_its_protocol(part, protocol):
    assert isinstance(part, protocol)


def test_a_class_without_the_protocols_members_does_not_satisfy_it():
    assert not isinstance(PlainRemoval(), HeadSelector) and not isinstance(SlimLLMHeads(True), Recovery)
    assert not isinstance(NoReconstruction(), ChannelSelector)


def _down_proj_input(z_stats: bool) -> DownProjInput:
    torch.manual_seed(0)
    w_dense, kept = torch.randn(4, 5), torch.tensor([0, 2, 4])
    z = torch.randn(50, 5, dtype=torch.float64)
    stats = (z.T.cov(correction=0), z.mean(0)) if z_stats else None
    return DownProjInput(w_dense[:, kept].clone(), None, None, torch.float32, LayerReport(0), w_dense, kept, stats)


@pytest.mark.parametrize(("recovery", "z_stats", "keeps_intermediate"), [
    (PlainRemoval(), False, False), (AffineRecovery(), False, False),
    (LeastSquaresRecovery(0.01, False), False, True),  # the refit needs the whole sweep first
    (LeastSquaresRecovery(0.01, False), True, False),  # solved up front from the selector's covariance
    (LeastSquaresRecovery(0.01, True), True, True),  # a dense-model target needs the sweep again
])
def test_each_down_proj_fit_satisfies_its_protocol_and_says_what_the_sweep_keeps(recovery, z_stats,
                                                                                  keeps_intermediate):
    fit = recovery.down_proj(_down_proj_input(z_stats))
    assert isinstance(fit, DownProjFit)
    assert fit.keeps_intermediate is keeps_intermediate


SWITCH_CHOICES = list(itertools.product(("slimllm", "refit"), (True, False), ("lstsq", "affine"), (False, True)))


@pytest.mark.parametrize(("selection", "regression", "recovery", "reconstruct"), SWITCH_CHOICES)
def test_every_switch_combination_builds_parts_that_satisfy_the_protocols(selection, regression, recovery,
                                                                           reconstruct):
    switches = MethodSwitches(greedy=True, feature_space=True, regression=regression, recovery=recovery,
                              target="pruned", selection=selection, protect_lowest=0.0, damping=0.01,
                              reconstruction=SETTINGS if reconstruct else None)
    parts = MethodParts.from_switches(switches)
    assert isinstance(parts.heads, HeadSelector) and isinstance(parts.channels, ChannelSelector)
    assert isinstance(parts.recovery, Recovery) and isinstance(parts.reconstruction, Reconstruction)
    assert isinstance(parts.reconstruction, GradientReconstruction) is reconstruct


def test_an_unscored_layer_says_so_in_its_report():
    assert LayerReport(3).to_dict() == {"layer": 3, "score": None}

