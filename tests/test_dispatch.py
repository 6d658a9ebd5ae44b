"""The dispatcher's side of a MoE layer: every routing pair goes to one call of its expert's function with its
token's hidden row, and the replies are summed per token in call order."""

from __future__ import annotations

import pytest
import torch

from faasmoe.control.deployment import contiguous_blocks
from faasmoe.control.dispatch import ExpertDispatcher
from faasmoe.functions import wire


class Answering:
    """A platform that keeps a layer's calls and answers each with its hidden rows times (block + 1), in writable
    buffers it keeps (as a platform reading replies into its own buffers would)."""

    def concurrent_batches(self):
        return 1

    def submit(self, calls):
        self.calls = calls
        return calls

    def gather(self, calls):
        self.replies = []
        for _, frame in calls:
            inv = wire.decode_invocation(frame)
            self.replies.append(bytearray(wire.encode_result(inv.model, inv.layer, inv.block,
                                                             inv.hidden * (inv.block + 1))))
        self.sent = [bytes(r) for r in self.replies]
        return self.replies


@pytest.mark.parametrize("k,cap", [(1, 64), (4, 64), (4, 2), (16, 3), (16, 64)])
def test_every_pair_goes_to_one_call_of_its_function_with_its_row(k, cap):
    E, A, H = 16, 4, 8
    blocks = contiguous_blocks(E, k)
    d = ExpertDispatcher(Answering(), "00" * 8, blocks, E, torch.bfloat16, max_tokens=cap)
    g = torch.Generator().manual_seed(100 * k + cap)
    for T in (1, 2, 5, 9):
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        experts = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
        weights = torch.rand(T, A, generator=g).to(torch.bfloat16)
        pending = d.send(3, x, experts, weights)
        seen = []
        for (fid, frame), rows in zip(d.platform.calls, pending.rows):
            inv = wire.decode_invocation(frame)
            assert (inv.layer, fid) == (3, d._function_ids(3)[inv.block])
            assert 0 < len(rows) <= cap and rows.tolist() == sorted(set(rows.tolist()))  # ascending, no repeats
            assert torch.equal(inv.hidden, x[torch.from_numpy(rows)])
            for t, e, w in zip(inv.token.tolist(), inv.expert.tolist(), inv.weight.tolist()):
                assert e in blocks[inv.block]
                seen.append((int(rows[t]), e, w))
        want = [(t, int(experts[t, a]), float(weights[t, a])) for t in range(T) for a in range(A)]
        assert sorted(seen) == sorted(want)  # each pair once, in a call of its own function

        if T == 1:  # one token: a frame per function hit, by block, each with the token's pairs in routing order
            by_block = {}
            for a in range(A):
                by_block.setdefault(int(experts[0, a]) // k, []).append(a)
            assert d.platform.calls == [(d._function_ids(3)[b], wire.encode_invocation(wire.Invocation(
                bytes(8), 3, b, x, torch.zeros(len(ps), dtype=torch.int32), experts[0, ps], weights[0, ps].float())))
                for b, ps in sorted(by_block.items())]
        if len(blocks) == 1 and T <= cap:  # one function: a frame of the pairs in token order, as routed
            (_, frame), = d.platform.calls
            assert frame == wire.encode_invocation(wire.Invocation(
                bytes(8), 3, 0, x, torch.arange(T).repeat_interleave(A), experts.flatten(), weights.flatten().float()))
        out = d.combine(pending)
        kept = out.clone()
        out.add_(1)  # the sum is its own tensor: no reply written into by combine, none aliased by the sum
        assert d.platform.replies == d.platform.sent
        out = kept
        ref = torch.zeros(T, H, dtype=torch.bfloat16)  # the replies added in call order, as transformers adds experts
        for (_, frame), rows in zip(d.platform.calls, pending.rows):
            inv = wire.decode_invocation(frame)
            ref.index_add_(0, torch.from_numpy(rows), inv.hidden * (inv.block + 1))
        assert torch.equal(out, ref)

        shared = torch.randn(T, H, generator=g).to(torch.bfloat16)  # the shared expert's output: added last
        assert torch.equal(d.combine(pending, shared), ref + shared)
        assert d.platform.replies == d.platform.sent


def test_fp32_weights_in_any_layout_make_the_same_frames():
    """Routing weights that are already fp32 and strided (a column slice) are framed as their values."""
    E, A, H, T = 8, 2, 8, 3
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    experts = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
    wide = torch.rand(T, 2 * A, generator=g)
    for k in (1, E):  # grouped calls, and one function for the layer
        frames = []
        for weights in (wide[:, ::2], wide[:, ::2].contiguous()):
            d = ExpertDispatcher(Answering(), "00" * 8, contiguous_blocks(E, k), E, torch.bfloat16)
            d.send(0, x, experts, weights)
            frames.append(d.platform.calls)
        assert frames[0] == frames[1]
