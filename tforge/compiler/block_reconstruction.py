"""Quantized decoder blocks trained, one at a time, to reproduce the float blocks' outputs.

GPTQ picks each linear's codes from that linear's own input statistics, one column at a time, and
a code can only be the rounding of what the compensation left. This stage goes further, block by
block: every ``MatMulNBits`` weight of one decoder block becomes a latent float weight (starting
at GPTQ's dequantized values) that is rounded to its grid in the forward pass and trained through
the rounding (straight-through), together with its block scales. The loss is the squared error
between the block's output, computed from the *quantized* model's input to the block (the
earlier blocks already reconstructed), and the float block's output on the float model's input,
relative to the float output's own energy token by token, and averaged over tokens. Per token,
because a decoder's residual stream holds a few tokens (the first one, often) whose norm is a
hundred times the others' (SmolLM2 from block 11 on: 99.6% of a window's energy on token 0); a
relative error over the whole output would train those tokens alone, while the next block's
norm rescales every token to the same size.
So each block also learns to undo some of the error it receives. This is the block stage of
EfficientQAT (Block-AP); AutoRound does the same with codes that move by one step at most.

The latent weights are kept in units of their block's starting scale, so one learning rate fits
every layer: a step of ``lr`` moves a weight by that fraction of a grid step. The scales train as
``s0 * exp(theta)``. Both use Adam with a cosine schedule. Held-out windows, never trained on,
measure each block's error before and after. A block whose held-out error rose keeps what it had.
The next block then reads the output of the block as kept. Only the codes and scales change.
The graph, the packing and the file size stay as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from tforge.compiler.scale_tuning import batched_feeds, shuffled_batches
from tforge.runtime.torch_exec import CodedWeight, TorchGraph

logger = logging.getLogger(__name__)

__all__ = ["BlockResult", "BlockSpan", "ReconstructedWeight", "reconstruct_blocks"]


@dataclasses.dataclass(frozen=True)
class BlockSpan:
    """One decoder block as a stretch of the residual stream: where it starts and ends in the
    float graph (``teacher`` runs it there) and in the quantized graph (whose input value may be
    another, for example the quantized embedding's output)."""

    label: str
    teacher: TorchGraph  # the float block: its output from its input (given) and the graph inputs
    student_input: str
    student_output: str
    teacher_input: str


@dataclasses.dataclass(frozen=True)
class ReconstructedWeight:
    """New contents for one ``MatMulNBits``: its codes ``[N, blocks * block]`` (unsigned, zero
    points included, unpacked) and its scales in the initializer's shape."""

    node: str
    packed: str
    scales: str
    codes: np.ndarray
    scale_values: np.ndarray


@dataclasses.dataclass(frozen=True)
class BlockResult:
    label: str
    weights: int  # MatMulNBits weights trained
    held_out_before: float  # mean per-token relative squared error of the block's output, held-out windows
    held_out_after: float
    kept: bool
    codes_moved: float  # share of the block's codes that differ from where they started (kept or not)
    seconds: float


def reconstruct_blocks(
    entry: TorchGraph,
    spans: Sequence[BlockSpan],
    graph: ir.Graph,
    windows: Sequence[Mapping[str, np.ndarray]],
    *,
    steps: int,
    lr: float,
    scale_lr: float,
    batch: int,
    held_out: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[BlockResult], list[ReconstructedWeight]]:
    """Reconstruct ``spans`` in order (see the module); returns each block's result and the new
    codes and scales of the blocks that kept theirs. ``graph`` (quantized) is read, not changed.

    ``entry`` computes the float model's input to the first block from the graph inputs; the
    spans must chain (each block's input is the previous block's output). ``windows``: feeds of
    the graph inputs, the first ``held_out`` held out.
    """
    import torch

    say = progress or (lambda message: logger.info("%s", message))
    if len(windows) <= held_out:
        raise ValueError(f"reconstruct_blocks: {len(windows)} windows, need more than the {held_out} held out")
    first = TorchGraph(graph, [spans[0].student_input])
    with torch.no_grad():
        float_in = [entry.run(feed)[0] for feed in windows]
        quant_in = [first.run(feed)[0] for feed in windows]
    results: list[BlockResult] = []
    written: list[ReconstructedWeight] = []
    for k, span in enumerate(spans, start=1):
        started = time.perf_counter()
        student = TorchGraph(graph, [span.student_output], given=[span.student_input])
        with torch.no_grad():
            targets = [span.teacher.run({**feed, span.teacher_input: x})[0] for feed, x in zip(windows, float_in, strict=True)]
        block = _Block(student, span.student_input, student.coded_weights)
        if not block.weights:
            say(f"reconstruct blocks: {span.label} ({k}/{len(spans)}): no 4-bit weights with constant codes, passed through")
        else:
            result = block.train(windows, quant_in, targets, steps=steps, lr=lr, scale_lr=scale_lr, batch=batch, held_out=held_out)
            results.append(dataclasses.replace(result, label=span.label, seconds=time.perf_counter() - started))
            say(
                f"reconstruct blocks: {span.label} ({k}/{len(spans)}): held-out error {result.held_out_before:.5f} -> "
                f"{result.held_out_after:.5f}" + ("" if result.kept else " (worse: GPTQ's codes kept)")
                + f", {100 * result.codes_moved:.2f}% of codes moved ({time.perf_counter() - started:.0f}s)"
            )  # fmt: skip
            if result.kept:
                written += block.written()
        with torch.no_grad():
            quant_in = [block.run(feed, x) for feed, x in zip(windows, quant_in, strict=True)]
        float_in = targets
    return results, written


class _Block:
    """One block's student with its trainable weights (latent, in grid steps) and scales."""

    def __init__(self, student: TorchGraph, given: str, weights: list[CodedWeight]) -> None:
        import torch

        self._torch = torch
        self.student, self.given, self.weights = student, given, weights
        self.start = {w.centered: student.constant(w.centered) for w in weights}
        self.s0 = {w.scales: student.constant(w.scales).float() for w in weights}
        self.latent = {w.centered: self.start[w.centered].clone().requires_grad_(True) for w in weights}
        self.theta = {name: torch.zeros_like(s, requires_grad=True) for name, s in self.s0.items()}
        self.trained = True  # False once reverted: run() uses the starting codes and scales

    def replaced(self) -> dict[str, Any]:
        """Codes on their grid (rounded straight through, clamped to the block's range) and scales."""
        torch = self._torch
        if not self.trained:
            return {}
        out: dict[str, Any] = {}
        for w in self.weights:
            scale = self.s0[w.scales] * torch.exp(self.theta[w.scales])
            rows, width = self.latent[w.centered].shape
            steps_of = scale.reshape(rows, -1, 1)
            # the latent weight is in units of the starting scale; its code under the current scale:
            latent = self.latent[w.centered].reshape(rows, -1, w.block_size) * (self.s0[w.scales].reshape(rows, -1, 1) / steps_of)
            rounded = latent + (torch.round(latent) - latent).detach()
            out[w.centered] = torch.minimum(torch.maximum(rounded, w.low), w.high).reshape(rows, width)
            out[w.scales] = scale
        return out

    def run(self, feed: Mapping[str, Any], x: Any) -> Any:
        return self.student.run({**feed, self.given: x}, self.replaced())[0]

    def error(self, feeds: Sequence[Mapping[str, Any]], inputs: Sequence[Any], targets: Sequence[Any]) -> float:
        torch = self._torch
        with torch.no_grad():
            return float(sum(_relative_error(self.run(f, x), y) for f, x, y in zip(feeds, inputs, targets, strict=True)) / len(feeds))

    def train(
        self, feeds: Sequence[Mapping[str, Any]], inputs: Sequence[Any], targets: Sequence[Any], *,
        steps: int, lr: float, scale_lr: float, batch: int, held_out: int,
    ) -> BlockResult:  # fmt: skip
        torch = self._torch
        held = slice(0, held_out)
        self.trained = False
        before = self.error(feeds[held], inputs[held], targets[held])
        self.trained = True
        optimizer = torch.optim.Adam(
            [{"params": list(self.latent.values()), "lr": lr}, {"params": list(self.theta.values()), "lr": scale_lr}]
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
        batches = shuffled_batches(len(feeds) - held_out, batch)
        for step in range(steps):
            picked = [held_out + i for i in next(batches)]
            optimizer.zero_grad()
            parts = batched_feeds([{**feeds[i], self.given: inputs[i].numpy()} for i in picked])
            if len(parts) == 1:  # one stacked feed
                target = torch.cat([targets[i] for i in picked], dim=0)
                loss = _relative_error(self.student.run(parts[0], self.replaced())[0], target)
            else:  # windows of different shapes: one at a time
                loss = sum(_relative_error(self.run(feeds[i], inputs[i]), targets[i]) for i in picked) / len(picked)
            loss.backward()
            if step % 25 == 0 or step == steps - 1:
                logger.debug("reconstruct blocks: step %d/%d, training error %.5f", step + 1, steps, float(loss.detach()))
            optimizer.step()
            schedule.step()
        after = self.error(feeds[held], inputs[held], targets[held])
        moved = self._moved()
        self.trained = after < before
        return BlockResult(
            label="", weights=len(self.weights), held_out_before=before, held_out_after=after, kept=self.trained,
            codes_moved=moved, seconds=0.0,
        )  # fmt: skip

    def _moved(self) -> float:
        with self._torch.no_grad():
            now = self.replaced()
            changed = sum(int((now[w.centered] != self.start[w.centered]).sum()) for w in self.weights)
        return changed / max(sum(self.start[w.centered].numel() for w in self.weights), 1)

    def written(self) -> list[ReconstructedWeight]:
        with self._torch.no_grad():
            now = self.replaced()
            return [
                ReconstructedWeight(
                    node=w.node, packed=w.packed, scales=w.scales,
                    codes=(now[w.centered].reshape(w.low.shape[0], -1, w.block_size) - w.low).round().to(self._torch.uint8).reshape(w.low.shape[0], -1).numpy(),
                    scale_values=now[w.scales].numpy().astype(np.float32),
                )
                for w in self.weights
            ]  # fmt: skip


def _relative_error(out: Any, target: Any) -> Any:
    """Mean over tokens of ``||out - target||^2 / ||target||^2`` along the last (hidden) axis."""
    return (((out - target) ** 2).sum(-1) / (target**2).sum(-1).clamp_min(1e-30)).mean()

