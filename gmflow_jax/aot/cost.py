"""What one compiled program costs per device: XLA's memory and FLOP figures and the TPU compiler's time estimate.

``Compiled.of(lowered.compile())`` reads them; ``estimated_seconds`` is the TPU cost model's
``'optimal_seconds'`` with the custom calls it cannot price left out (its sum counts each as -1 s).
XLA counts a loop body once, in FLOPs and in time (``loops`` says how many loops there are).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from gmflow_jax.utilization import Chip

GIB = 2.0**30


# Custom calls the TPU cost model prices (XLA's gather/scatter helpers). It counts every other custom call (libtpu
# 0.0.42.1: eigh, Cholesky, QR and LU blocks, triangular inverses, FSDP's ZeroCrop) as -1 s in 'optimal_seconds'.
_PRICED_CUSTOM_CALLS = frozenset({"AssumeGatherIndicesInBound", "GatherScatterIndicesBitpacked", "AllocateBuffer"})


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Per-device figures of one compiled function (bytes and FLOPs as XLA counts them)."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs living in donated arguments' buffers
    temp_bytes: int
    code_bytes: int
    flops: float
    loops: int  # while loops in the program: XLA counts each body's FLOPs once
    optimal_seconds: float | None = None  # the TPU compiler's run-time estimate as it gives it (s); None off TPU
    unpriced: tuple[str, ...] = ()  # custom calls its cost model cannot price (targets, one entry per call)

    @classmethod
    def of(cls, compiled: Any) -> Compiled:
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        text = compiled.as_text()
        unpriced = tuple(t for t in re.findall(r'custom_call_target="([^"]+)"', text) if t not in _PRICED_CUSTOM_CALLS)
        seconds = cost.get("optimal_seconds")
        return cls(
            argument_bytes=int(mem.argument_size_in_bytes),
            output_bytes=int(mem.output_size_in_bytes),
            alias_bytes=int(mem.alias_size_in_bytes),
            temp_bytes=int(mem.temp_size_in_bytes),
            code_bytes=int(mem.generated_code_size_in_bytes),
            flops=float(cost.get("flops", 0.0)),
            loops=len(re.findall(r"\swhile\(", text)),
            optimal_seconds=None if seconds is None else float(seconds),
            unpriced=unpriced,
        )

    @property
    def estimated_seconds(self) -> float | None:
        """The compiler's estimate with the ``unpriced`` ops left out (its sum counts each as -1 s; loop bodies
        once): None without an estimate, or if that is not a positive time."""
        if self.optimal_seconds is None or self.optimal_seconds + len(self.unpriced) <= 0:
            return None
        return self.optimal_seconds + len(self.unpriced)

    @property
    def total_bytes(self) -> int:
        """Peak device memory the program needs: arguments + outputs not aliased to them + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def fits_on(self, chip: Chip | None) -> bool:
        """Whether ``total_bytes`` fits in the chip's memory (unknown chips: not checked, True)."""
        return chip is None or self.total_bytes <= chip.memory_gib * GIB
