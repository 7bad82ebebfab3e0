"""``sr``: the backbone alone, the local baseline without explicit electrostatics."""

from __future__ import annotations

from aiida_emlip.models.heads.base import Head, HeadInput, HeadOutput


class ShortRangeHead(Head):
    """E = E_SR. No charges; every long-range effect must be absorbed by the backbone."""

    name = "sr"

    def forward(self, inp: HeadInput) -> HeadOutput:
        return HeadOutput(energy=inp.positions.new_zeros(inp.graph.num_graphs))
