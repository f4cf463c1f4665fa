"""Where an inference's time goes, rendered: a run's profile and device facts, and two runs' kernels compared.

* :func:`facts_line`: load time, first inference, peak memory, library size (the report's and ``show``'s
  ``Device`` line);
* :func:`profile_lines`: the top kernels with their share, GFLOP/s and shapes, and the glue (``--profile``);
* :func:`profile_rows`, :func:`profile_markdown`: the same as a Prefect table artifact and in the run's summary;
* :func:`kernel_changes`, :func:`format_kernel_changes`: ``flows.history compare A B --kernels``.

Pure functions of :mod:`pipeline.results` values (no TVM, no Prefect). A profile read back from a ledger record
is untrusted: :meth:`pipeline.results.Profile.from_dict` checks its shape and every text is escaped here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.results import DeviceFacts, KernelTime, Profile
from pipeline.views.text import markdown_cell, printable

TOP_KERNELS = 10
"""Kernels a report shows (the JSON and the ledger keep every one)."""
CHANGE = 0.10
"""A kernel's time changed when it moved by more than this share of its time..."""
CHANGE_OF_TOTAL = 0.005
"""...and by more than this share of the whole inference (jitter of short kernels is no change)."""
_NAME_WIDTH = 48


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e6:.1f} MB" if count < 10e9 else f"{count / 1e9:.2f} GB"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g} ms"


def facts_line(facts: DeviceFacts | dict[str, Any] | None) -> str:
    """``load 95 ms  first inference 130 ms  peak memory 312.4 MB (session process)  library 21.4 MB``."""
    if isinstance(facts, DeviceFacts):
        data: dict[str, Any] = facts.as_dict()
    elif isinstance(facts, dict):
        data = facts
    else:
        return "not recorded"

    def number(key: str) -> float | None:
        value = data.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    peak, library = number("peak_memory_bytes"), number("library_bytes")
    memory = f"{_size(int(peak))} (its session process)" if peak is not None else "- (the device cannot tell)"
    return (f"load {_ms(number('load_ms'))}  first inference {_ms(number('first_inference_ms'))}  "
            f"peak memory {memory}  library {_size(int(library)) if library is not None else '-'}")


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, cut in the middle (a fused kernel's name ends in what tells it
    apart: ``..._add271_prepacked``)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "~" + text[len(text) - (width - 1 - head):]


def _gflops(kernel: KernelTime) -> str:
    return f"{kernel.gflop_per_s:.1f}" if kernel.gflop_per_s is not None else "-"


def profile_lines(profile: Profile, top: int = TOP_KERNELS) -> list[str]:
    """The profile for a terminal: a header line, the ``top`` kernels, the rest summed, and the glue."""
    p = profile
    kernels_share = p.kernels_ms / p.total_ms * 100 if p.total_ms else 0.0
    lines = [
        (f"{p.total_ms:.4g} ms per inference on the device (median of {p.repeat}): kernels {p.kernels_ms:.4g} ms "
         f"({kernels_share:.1f}%), glue {p.glue_ms:.4g} ms ({p.glue_share * 100:.1f}%); {len(p.kernels)} kernels"),
        f"  {'kernel':<{_NAME_WIDTH}} {'calls':>5} {'ms':>9} {'share':>6} {'GFLOP/s':>8}  shapes",
    ]
    for kernel in p.kernels[:top]:
        lines.append(f"  {_cut(printable(kernel.name), _NAME_WIDTH):<{_NAME_WIDTH}} {kernel.calls:>5} "
                     f"{kernel.ms:>9.4f} {kernel.share * 100:>5.1f}% {_gflops(kernel):>8}  "
                     f"{printable(' '.join(kernel.shapes))}")
    rest = p.kernels[top:]
    if rest:
        ms = sum(k.ms for k in rest)
        share = ms / p.total_ms if p.total_ms else 0.0
        lines.append(f"  {f'({len(rest)} more kernels)':<{_NAME_WIDTH}} {sum(k.calls for k in rest):>5} "
                     f"{ms:>9.4f} {share * 100:>5.1f}%")
    builtins = ", ".join(f"{printable(b.name.removeprefix('vm.builtin.'))} x{b.calls}" for b in p.builtins[:4])
    lines.append(f"  {'glue (VM builtins, the VM between calls)':<{_NAME_WIDTH}} {'':>5} {p.glue_ms:>9.4f} "
                 f"{p.glue_share * 100:>5.1f}%" + (f"  {builtins}" if builtins else ""))
    if not p.flops_known:
        lines.append("  (no GFLOP/s: the build did not record its kernels' FLOPs, as GPU builds do not)")
    if p.note:
        lines.append(f"  note: {printable(p.note)}")
    return lines


def profile_rows(profile: Profile) -> list[dict[str, Any]]:
    """The Prefect table of a profile: every kernel (slowest first), then the glue."""
    rows = [{"kernel": printable(k.name), "calls": k.calls, "ms": round(k.ms, 4), "share %": round(k.share * 100, 2),
             "GFLOP/s": round(k.gflop_per_s, 2) if k.gflop_per_s is not None else None,
             "shapes": printable(" ".join(k.shapes))} for k in profile.kernels]
    rows.append({"kernel": "glue (VM builtins, the VM between calls)", "calls": sum(b.calls for b in profile.builtins),
                 "ms": round(profile.glue_ms, 4), "share %": round(profile.glue_share * 100, 2), "GFLOP/s": None,
                 "shapes": ""})
    return rows


def profile_markdown(profile: Profile, top: int = TOP_KERNELS) -> list[str]:
    """The run summary's section on the profile (markdown lines)."""
    p, m = profile, markdown_cell
    lines = ["## Where the time goes", "",
             (f"{p.total_ms:.4g} ms per inference on the device: kernels {p.kernels_ms:.4g} ms, glue "
              f"{p.glue_ms:.4g} ms ({p.glue_share * 100:.1f}%), median of {p.repeat} instrumented inferences."), "",
             "| kernel | calls | ms | share | GFLOP/s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| `{m(k.name)}` | {k.calls} | {k.ms:.4f} | {k.share * 100:.1f}% | {_gflops(k)} |"
              for k in p.kernels[:top]]
    lines.append(f"| glue | | {p.glue_ms:.4f} | {p.glue_share * 100:.1f}% | |")
    return lines


# -- two runs' kernels ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelChange:
    """One kernel in two runs' profiles (``a_ms`` None: only in B; ``b_ms`` None: only in A)."""

    name: str
    a_ms: float | None
    b_ms: float | None
    changed: bool

    @property
    def delta_ms(self) -> float:
        return (self.b_ms or 0.0) - (self.a_ms or 0.0)

    @property
    def change(self) -> float | None:
        return self.b_ms / self.a_ms - 1.0 if self.a_ms and self.b_ms is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "a_ms": self.a_ms, "b_ms": self.b_ms, "delta_ms": self.delta_ms,
                "change": self.change, "changed": self.changed}


@dataclass(frozen=True)
class KernelComparison:
    """Run B's kernels against run A's: each kernel's time in both (by name), the glue and the totals."""

    kernels: tuple[KernelChange, ...]
    a: Profile
    b: Profile

    @property
    def changed(self) -> tuple[KernelChange, ...]:
        return tuple(k for k in self.kernels if k.changed)

    def as_dict(self) -> dict[str, Any]:
        return {"kernels": [k.as_dict() for k in self.kernels],
                "glue_ms": {"a": self.a.glue_ms, "b": self.b.glue_ms},
                "total_ms": {"a": self.a.total_ms, "b": self.b.total_ms},
                "changed": len(self.changed), "only_in_a": sum(k.b_ms is None for k in self.kernels),
                "only_in_b": sum(k.a_ms is None for k in self.kernels)}


def kernel_changes(a: Profile, b: Profile) -> KernelComparison:
    """Each kernel of either profile with its time in both, largest move first. A kernel *changed* when it moved
    by more than :data:`CHANGE` of its time and :data:`CHANGE_OF_TOTAL` of A's inference, or is in one run only
    (a build that compiled other kernels)."""
    times_a = {k.name: k.ms for k in a.kernels}
    times_b = {k.name: k.ms for k in b.kernels}
    floor = CHANGE_OF_TOTAL * a.total_ms
    rows = []
    for name in dict.fromkeys([*times_a, *times_b]):
        ms_a, ms_b = times_a.get(name), times_b.get(name)
        if ms_a is None or ms_b is None:
            changed = True
        else:
            changed = abs(ms_b - ms_a) > max(CHANGE * ms_a, floor)
        rows.append(KernelChange(name, ms_a, ms_b, changed))
    rows.sort(key=lambda k: (-abs(k.delta_ms), k.name))
    return KernelComparison(tuple(rows), a, b)


def format_kernel_changes(comparison: KernelComparison, top: int = 15) -> list[str]:
    """``compare --kernels`` for people: the totals and glue of both runs, then the kernels that changed most."""
    c = comparison

    def cell(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "-"

    def move(a: float, b: float) -> str:
        return f"{(b / a - 1) * 100:+.1f}%" if a > 0 else "-"

    slower = sum(k.changed and k.delta_ms > 0 and k.a_ms is not None and k.b_ms is not None for k in c.kernels)
    faster = sum(k.changed and k.delta_ms < 0 and k.a_ms is not None and k.b_ms is not None for k in c.kernels)
    only_a = sum(k.b_ms is None for k in c.kernels)
    only_b = sum(k.a_ms is None for k in c.kernels)
    lines = [(f"Kernels    total {c.a.total_ms:.4g} -> {c.b.total_ms:.4g} ms ({move(c.a.total_ms, c.b.total_ms)}), "
              f"kernels {c.a.kernels_ms:.4g} -> {c.b.kernels_ms:.4g} ms, glue {c.a.glue_ms:.4g} -> "
              f"{c.b.glue_ms:.4g} ms; {slower} kernel(s) slower, {faster} faster (beyond {CHANGE:.0%} of their time "
              f"and {CHANGE_OF_TOTAL:.1%} of A's inference), {only_a} only in A, {only_b} only in B")]
    shown = [k for k in c.kernels if k.changed][:top]
    if shown:
        lines.append(f"  {'kernel':<{_NAME_WIDTH}} {'A ms':>9} {'B ms':>9} {'change':>8}")
    for k in shown:
        if k.b_ms is None or k.a_ms is None:
            mark = "only A" if k.b_ms is None else "only B"
        else:
            mark = f"{k.change * 100:+.1f}%" if k.change is not None else "-"
        lines.append(f"  {_cut(printable(k.name), _NAME_WIDTH):<{_NAME_WIDTH}} {cell(k.a_ms):>9} {cell(k.b_ms):>9} "
                     f"{mark:>8}")
    hidden = len(c.changed) - len(shown)
    if hidden > 0:
        lines.append(f"  ({hidden} more changed kernel(s): --json lists every one)")
    if not shown:
        lines.append("  no kernel changed beyond the noise floor")
    return lines

