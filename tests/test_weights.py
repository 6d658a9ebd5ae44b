"""Stacked weights (gate_proj then up_proj as one matrix) map without a copy where the checkpoint allows it."""

from __future__ import annotations

import torch

from faasmoe.models.checkpoint import Checkpoint
from faasmoe.models.weights import map_stacked, map_tensors, stacked_rows


def test_adjacent_tensors_map_as_one_and_others_are_concatenated(tiny):
    ckpt = Checkpoint(tiny)
    gate, up, down = ckpt.expert_tensors(0, [1])
    assert stacked_rows([gate, up], "gu") is not None  # name order puts up_proj right after gate_proj
    assert stacked_rows([up, gate], "ug") is None and stacked_rows([gate, down], "gd") is None
    w = map_stacked({"gu": [gate, up], "ug": [up, gate]}, torch.float32)
    parts = map_tensors([gate, up], torch.float32)
    g, u = parts[gate.name], parts[up.name]
    assert torch.equal(w["gu"], torch.cat([g, u])) and torch.equal(w["ug"], torch.cat([u, g]))
    assert w["gu"].shape == (2 * gate.shape[0], gate.shape[1])
