"""Block scales of quantized weights tuned end to end against the float model (distillation).

GPTQ and RTN choose each linear's codes and scales from that linear alone. Once every linear of a
model is quantized, the errors add up through the blocks in ways no layer-wise objective sees.
This module keeps the integer codes and tunes only the float *scales* of every
``MatMulNBits`` and ``GatherBlockQuantized`` (one per block of 32 or 64 weights: about 3% of
the parameters). The loss is the KL divergence of the quantized model's next-token
distribution from the float model's on calibration text (or, for a model without an LM head,
the relative squared error of its first output). This is the end-to-end stage of
EfficientQAT and the scale-only tuning of PEQA. Each scale is ``s0 * exp(theta)``, so it keeps
its sign and starts where the quantizer left it. Adam runs on ``theta`` with a cosine schedule.

Both models run in PyTorch through :class:`tforge.runtime.torch_exec.TorchGraph`. The teacher
is snapshotted before the graph is quantized. Held-out windows, which the training never reads,
measure the loss before and after. If tuning made it worse there, the scales are left as the
quantizer wrote them, and the result says so. The codes, the graph and the file size do not
change. Only the scale initializers get new values.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from tforge.runtime.torch_exec import TorchGraph

logger = logging.getLogger(__name__)

__all__ = ["TuneResult", "batched_feeds", "feed_rows", "quantized_scales", "shuffled_batches", "tune_scales"]

_MS = "com.microsoft"
#: the input of each quantized op that holds its float scales
_SCALES_INPUT = {"MatMulNBits": 2, "GatherBlockQuantized": 2}


@dataclasses.dataclass(frozen=True)
class TuneResult:
    scales: int  # scale initializers tuned
    parameters: int  # scale values among them
    steps: int
    windows: int  # training windows read (with repeats when the data has fewer)
    held_out: int  # windows measured before and after, never trained on
    loss: Literal["kl", "mse"]
    held_out_before: float  # mean loss per token on the held-out windows, quantizer's scales
    held_out_after: float  # the same with the tuned scales (before a revert)
    kept: bool  # False: tuning made the held-out loss worse, the quantizer's scales stay
    seconds: float


def quantized_scales(graph: ir.Graph) -> list[ir.Value]:
    """The float scale initializers of the graph's ``MatMulNBits`` and ``GatherBlockQuantized``
    nodes, each once (a tied head shares its table's)."""
    found: dict[str, ir.Value] = {}
    for node in graph.all_nodes():
        index = _SCALES_INPUT.get(node.op_type) if node.domain == _MS else None
        if index is None or len(node.inputs) <= index:
            continue
        value = node.inputs[index]
        if value is not None and value.name and value.const_value is not None and value.dtype == ir.DataType.FLOAT:
            found.setdefault(value.name, value)
    return list(found.values())


def tune_scales(
    teacher: TorchGraph,
    model: ir.Model,
    windows: Iterable[Mapping[str, np.ndarray]],
    *,
    steps: int,
    lr: float,
    batch: int,
    held_out: int,
    loss: Literal["kl", "mse"],
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Tune the scales of ``model`` (quantized; see the module) in place to match ``teacher``.

    ``teacher`` computes the float model's output named ``teacher.outputs[0]``; the quantized
    model must have the same output. ``windows``: feeds of the graph inputs, at least
    ``held_out + 1``; the first ``held_out`` are held out, the rest read in batches of ``batch``
    for ``steps`` Adam steps, in a fixed random order (a new one each time through them).
    """
    import torch

    started = time.perf_counter()
    say = progress or (lambda message: logger.info("%s", message))
    output = teacher.outputs[0]
    scales = quantized_scales(model.graph)
    if not scales:
        raise ValueError("tune_scales: the model has no MatMulNBits or GatherBlockQuantized scales")
    student = TorchGraph(model.graph, [output], variable=[v.name for v in scales if v.name])
    feeds = list(windows)
    if len(feeds) <= held_out:
        raise ValueError(f"tune_scales: {len(feeds)} windows, need more than the {held_out} held out")
    held, train = feeds[:held_out], feeds[held_out:]

    initial = {v.name: torch.from_numpy(np.array(v.const_value.numpy(), np.float32)) for v in scales if v.name}
    theta = {name: torch.zeros_like(s0, requires_grad=True) for name, s0 in initial.items()}

    def replaced() -> dict[str, Any]:
        return {name: initial[name] * torch.exp(theta[name]) for name in initial}

    def distance(student_out: Any, teacher_out: Any) -> Any:
        if loss == "kl":
            target = torch.log_softmax(teacher_out.float(), dim=-1)
            return (target.exp() * (target - torch.log_softmax(student_out.float(), dim=-1))).sum(-1).mean()
        return ((student_out - teacher_out) ** 2).mean() / (teacher_out**2).mean().clamp_min(1e-30)

    def measure(use_tuned: bool) -> float:
        total = 0.0
        with torch.no_grad():
            swap = replaced() if use_tuned else None
            for feed in held:
                total += float(distance(student.run(feed, swap)[0], teacher.run(feed)[0]))
        return total / len(held)

    before = measure(use_tuned=False)
    say(f"tune scales: {len(initial)} scale tensors, held-out {loss} {before:.5f} before tuning")
    optimizer = torch.optim.Adam(list(theta.values()), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    batches = shuffled_batches(len(train), batch)
    for step in range(steps):
        group = [train[i] for i in next(batches)]
        optimizer.zero_grad()
        value = 0.0
        parts = batched_feeds(group)
        rows = sum(feed_rows(feed) for feed in parts)
        for feed in parts:
            with torch.no_grad():
                target = teacher.run(feed)[0]
            part = distance(student.run(feed, replaced())[0], target) * (feed_rows(feed) / rows)
            part.backward()
            value += float(part.detach())
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == steps - 1:
            say(f"tune scales: step {step + 1}/{steps}, {loss} {value:.5f} ({time.perf_counter() - started:.0f}s)")
    after = measure(use_tuned=True)
    kept = after < before
    if kept:
        with torch.no_grad():
            tuned = replaced()
        for value in scales:
            if value.name:
                array = tuned[value.name].numpy().astype(np.float32).reshape(value.const_value.shape.numpy())
                value.const_value = ir.Tensor(array, name=value.name)
    say(
        f"tune scales: held-out {loss} {before:.5f} -> {after:.5f}"
        + ("" if kept else " (worse: the quantizer's scales are kept)")
    )
    return TuneResult(
        scales=len(initial), parameters=sum(int(s.numel()) for s in initial.values()), steps=steps,
        windows=steps * batch, held_out=len(held), loss=loss, held_out_before=before, held_out_after=after,
        kept=kept, seconds=time.perf_counter() - started,
    )  # fmt: skip


def shuffled_batches(count: int, batch: int) -> Iterator[list[int]]:
    """Endless batches of indices below ``count``, in a fixed random order, a new one each epoch.

    Consecutive windows come from one article: a batch of them pulls the training towards it.
    """
    order: list[int] = []
    epochs = np.random.default_rng(0)
    while True:
        while len(order) < batch:
            order += [int(i) for i in epochs.permutation(count)]
        yield order[:batch]
        del order[:batch]


def feed_rows(feed: Mapping[str, Any]) -> int:
    first = next(iter(feed.values()))
    return int(np.shape(first)[0]) if np.ndim(first) else 1


def batched_feeds(group: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The windows of one step as one feed when their shapes agree past the batch axis, else one by one."""
    keys = list(group[0])
    same = all(list(feed) == keys for feed in group) and all(
        np.shape(feed[key])[1:] == np.shape(group[0][key])[1:] and np.ndim(feed[key]) >= 1 for feed in group for key in keys
    )
    if not same:
        return [dict(feed) for feed in group]
    return [{key: np.concatenate([np.asarray(feed[key]) for feed in group], axis=0) for key in keys}]
