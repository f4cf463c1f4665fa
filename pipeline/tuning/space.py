"""The schedule space, the target and cores it is tuned for, and the inputs that key a tuning.

The schedule space (:data:`DEFAULT_SPACE` for CPU targets, :data:`GPU_SPACE` for GPU targets) and why each
part of it was chosen, by measuring ResNet-18 tunings:

* TVM's ``static_shape_tuning`` preparation (inference ops decomposed, legalised, fused) with CPU weight
  prepacking: the constant weights are laid out for each tuned kernel at build time, so the model's
  interface does not change, and the same budget tunes a faster model than without prepacking;
* ``anchor-block`` task equality: kernels around the same convolution share one task, so there are fewer
  tasks to share the budget; with ``structural`` equality the same budget gave a much slower model;
* evolutionary search with a population of 64 instead of TVM's 512: on a machine of a few cores a search
  round of a convolution at TVM's population takes several times as long, and at the budgets used here the
  search rounds are the dominant cost;
* every task measured in the first round (trials per round = budget / tasks, at most 64), then TVM's
  gradient task scheduler spends the rest where the latency is. At small budgets the first round takes most
  of the trials whatever the scheduler, so the scheduler decides little, and two tunings with one scheduler
  differ as much as two schedulers; at a larger budget round-robin and ``weighted`` (the rest of the budget
  in shares of weight x latency after the first round) were no better, so ``gradient`` stays (the other two
  remain for experiments);
* schedules for the machine's own core count: tuning for fewer cores than the machine has gave no gain.
  Measurements taken on a loaded machine pick worse schedules, so tune on a quiet one.

The layout: CPU targets tune and build their convolutions in NHWC. In NCHW a kernel vectorises over the
image's width, which leaves most vector lanes idle on the small images of a network's last stages; in NHWC
over the output channels, whatever the image size. NHWC kernels are about as fast at the first stage and faster at
the later ones, and the whole model tunes to a lower latency in fewer trials. GPU targets keep NCHW
(:data:`GPU_SPACE`): not measured on a GPU. The layout adds a small task per model (the image's
transposition), so a tiny model needs one more trial than tasks before every task is measured.

(measurements, with the machines they were taken on: docs/performance.md#the-schedule-space)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.planning import keys
from pipeline.errors import UsageError
from pipeline.targets import TargetInfo
from pipeline.threads import physical_cores

if TYPE_CHECKING:
    import tvm

LOCAL_RUNNER = "local"


@dataclass(frozen=True)
class TuningSpace:
    """How the module is prepared and searched (see :data:`SPACE`; other values are for experiments).

    Attributes:
        prepack: lay the constant weights out for each tuned kernel (``cpu_weight_prepack``).
        population: the evolutionary search's population size (TVM's default is 512).
        equality: how MetaSchedule tells tasks apart: ``"structural"`` (every fused kernel is a task) or
            ``"anchor-block"`` (kernels with the same main block, e.g. one convolution with different fused
            epilogues, share a task and its schedule).
        scheduler: how trials are shared between tasks after the first round: ``"gradient"`` (TVM's
            gradient task scheduler), ``"round-robin"``, or ``"weighted"`` (each task gets a share of the
            rest of the budget proportional to weight x its latency after the first round).
        layout: the data layout the convolutions are tuned and built in: ``"NCHW"`` (as imported) or
            ``"NHWC"`` (``relax.transform.ConvertLayout`` before legalisation: the channels are innermost,
            so a kernel vectorises over output channels whatever the image size).
    """

    prepack: bool = True
    population: int = 64
    equality: str = "anchor-block"
    scheduler: str = "gradient"
    layout: str = "NCHW"

    @property
    def name(self) -> str:
        """A stable name of the space, part of the tuning key."""
        scheduler = "" if self.scheduler == "gradient" else f",scheduler={self.scheduler}"
        layout = "" if self.layout == "NCHW" else f"+{self.layout.lower()}"
        return (
            f"static-shape{'+prepack' if self.prepack else ''}{layout},{self.equality},population={self.population}"
            f"{scheduler}"
        )

    @staticmethod
    def from_options(options: dict[str, Any]) -> TuningSpace:
        """The space a tuning artifact's ``space_options`` describe (options it predates take their old value:
        tunings recorded before ``layout`` existed were NCHW)."""
        known = {f.name for f in dataclasses.fields(TuningSpace)}
        return TuningSpace(**{"layout": "NCHW", **{k: v for k, v in options.items() if k in known}})


#: The schedule space of CPU targets (the module's docstring says why; docs/performance.md#the-schedule-space).
DEFAULT_SPACE = TuningSpace(layout="NHWC")
#: The schedule space of GPU targets: the imported layout (NHWC was measured on CPUs only; no GPU here).
GPU_SPACE = TuningSpace(layout="NCHW")
#: The schedule space this code searches for a CPU target; part of the tuning key.
SPACE = DEFAULT_SPACE.name


def space_for(target: TargetInfo) -> TuningSpace:
    """The schedule space tunings for ``target`` search (part of their key)."""
    return GPU_SPACE if target.device == "cuda" else DEFAULT_SPACE


def tuning_num_cores(target: TargetInfo) -> int:
    """Cores the schedules are made for: the target's ``num-cores`` if it has one, else this machine's physical
    cores (what the local runner measures on, one TVM thread each: :mod:`pipeline.threads`)."""
    value = json.loads(target.canonical).get("num-cores")
    return int(value) if value else physical_cores()


def tracker_runner(tracker: str, key: str) -> str:
    """The ``runner`` text that measures on the device registered as ``key`` at ``tracker`` (``HOST:PORT``)."""
    return f"{tracker}/{key}"


def _parse_runner(runner: str) -> tuple[str, int, str] | None:
    """None for the local runner, else ``(tracker_host, tracker_port, key)``.

    Raises:
        UsageError: neither ``local`` nor ``HOST:PORT/KEY``.
    """
    if runner == LOCAL_RUNNER:
        return None
    from pipeline.device import DeviceSpec

    tracker, sep, key = str(runner).rpartition("/")
    if not sep or not key:
        raise UsageError(f"tuning runner {runner!r} is neither 'local' nor TRACKER_HOST:PORT/KEY")
    host, port = DeviceSpec(tracker=tracker, key=key).tracker_address
    return host, port, key


def check_request(trials: int, runner: str) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise UsageError(f"tuning needs a trial budget of 1 or more (got {trials!r}); 0 means no tuning")
    _parse_runner(runner)


def tuning_target(target: TargetInfo, num_cores: int) -> tvm.target.Target:
    """The target MetaSchedule tunes for: the build target with ``num-cores`` (its schedule rules need it)."""
    import tvm

    return tvm.target.Target({**json.loads(target.canonical), "num-cores": int(num_cores)})


def tune_inputs(model_digest: str, target: TargetInfo, trials: int) -> dict[str, Any]:
    """The inputs that key a tuning of ``model_digest`` for ``target`` with ``trials`` (hashed by the plan)."""
    return keys.tune_inputs(model_digest, target.canonical, trials, num_cores=tuning_num_cores(target),
                            space=space_for(target).name)


def tune_manifest_extra(target: TargetInfo, runner: str) -> dict[str, Any]:
    """What a tuning artifact records besides its key's inputs: the exact tuning target, space and runner."""
    return {
        "tuning_target": str(tuning_target(target, tuning_num_cores(target))),
        "space_options": dict(space_for(target).__dict__),
        "runner": runner,
    }
