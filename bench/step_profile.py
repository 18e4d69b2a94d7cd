"""Where a compiled step's time goes: a ``jax.profiler`` trace summed per HLO instruction and grouped by role.

Each instruction of the compiled program (``compiled.as_text()``) is put in one group by its name and its
``op_name`` metadata:

* pass: ``transpose(jvp(…))`` is the backward pass, ``jvp(…)`` the forward pass with the loss, anything
  else the update after the gradient (clip, AdamW, EMA, norm metrics);
* kind: ``ynn_fusion`` (YNNPACK matmuls), ``dot`` (XLA's own matmuls: on CPU the backward's weight
  gradients), or elementwise work (loop fusions, copies, reductions);
* instructions without ``op_name`` metadata (a few YNNPACK fusions) are counted as ``no op_name``;
* draws: a fusion whose body computes random bits or their inverse-CDF normals (``threefry``,
  ``_normal``, ``_uniform``, ``erf_inv``), counted on its own whatever else it computes.

The profiler's op times are wall times: on a loaded host they include the time the process waited for its
core, spread over all ops, so ``total_ms`` grows with the load; the shares, ratios within one process, hold
better than absolute times do.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile

import jax

DRAW_MARKERS = ("threefry", "_normal", "_uniform", "erf_inv", "random_bits")


def _instructions(hlo: str) -> dict[str, tuple[str, str]]:
    """``{instruction: (op_name, called computation or '')}`` for every instruction of the HLO text."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%([\w.-]+) = ", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%([\w.-]+)", line)
        out[m.group(1)] = (op.group(1) if op else "", calls.group(1) if calls else "")
    return out


def _bodies(hlo: str) -> dict[str, str]:
    """``{computation name: its text}``."""
    return {m.group(1): m.group(2) for m in re.finditer(r"\n%?([\w.-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}


def role(name: str, op_name: str, body: str) -> str:
    """The group of one instruction: ``random draws``, ``no op_name`` or ``<pass>: <kind>``."""
    if any(s in body for s in DRAW_MARKERS) or any(s in op_name for s in DRAW_MARKERS):
        return "random draws"
    if not op_name:
        return "no op_name"
    step = "backward" if "transpose(" in op_name else ("forward + loss" if "jvp(" in op_name else "update")
    kind = "YNNPACK matmul" if "ynn" in name else ("XLA dot" if name.startswith("dot") else "elementwise")
    return f"{step}: {kind}"


def profile_shares(compiled, call, calls: int = 3) -> dict[str, float]:
    """Runs ``call()`` (one step) ``calls`` times under the profiler; returns each group's share of the op time
    (summing to 1) and ``'total_ms'``, the op time of one call."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(calls):
            jax.block_until_ready(call())
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
        times = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    times[ev.name] += ev.duration_ns
    hlo = compiled.as_text()
    instrs, bodies = _instructions(hlo), _bodies(hlo)
    groups = collections.Counter()
    for name, ns in times.items():
        if name in instrs:
            op_name, called = instrs[name]
            groups[role(name, op_name, bodies.get(called, ""))] += ns
    total = sum(groups.values())
    shares = {k: v / total for k, v in sorted(groups.items())}
    shares["total_ms"] = total / calls / 1e6
    return shares
