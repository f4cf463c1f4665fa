"""MetaSchedule tuning: the schedule space, tuning a Relax module, applying a tuning database.

TVM 0.27's default CPU pipeline applies no schedules; MetaSchedule searches a schedule for every fused
kernel (a "task") and measures candidates on the device. The result is the tuning database (MetaSchedule's
two JSON files). The ``tune`` stage (:mod:`tasks.tune`) stores it as an artifact next to ``tuning.json``
(tuning time, tasks, trials, best measured latency per task); ``build`` applies it (:func:`apply_tuning`).

Keyed (:func:`tune_inputs`) by model digest, canonical target, trial budget, the core count the schedules
are made for, TVM version and our tuning code version (which names the schedule space, :data:`SPACE`).
Where candidates are measured (locally or on a tracker's device) is recorded but not part of the key: the
target says what the schedules are for.

Tunings that differ only in their budget form a *family* (:func:`family_key`); the store indexes each family
in ``<store>/.tuning/<family>.json`` (:func:`remember_tuning`). A larger budget continues from the largest
verified database of its family (:func:`find_base`): its records are kept, taught to the cost model and seed
the search, what it measured is not measured again, and only the difference is measured. ``--tune-more N``
is that largest budget + N (:func:`resolve_trials`). ``tuning.json`` keeps the estimate's history over the
increments and whether it has converged (:func:`has_converged`).

While MetaSchedule runs, its own logging goes to a file (``tuning.log`` in the artifact) and nowhere else,
progress goes to a callback after every batch, and SIGINT/SIGTERM are only noted, then raised from our
hooks as a KeyboardInterrupt (see :func:`pipeline.tuning.interrupt._noting_interrupts` for why); its worker
processes are ended however the run ends.

The modules, one per concern:

* :mod:`~pipeline.tuning.space`: the schedule space (and the measurements that chose it), the tuning target
  and its cores, the runner, the key inputs;
* :mod:`~pipeline.tuning.apply`: preparing a module, applying a database to it for the build;
* :mod:`~pipeline.tuning.rules`: the untuned default build's schedules: one per kernel from MetaSchedule's
  rules, nothing measured;
* :mod:`~pipeline.tuning.shared`: the records of the store's other tunings for the same target, applied to the
  kernels a build shares with their models (``--shared-tunings``);
* :mod:`~pipeline.tuning.search`: :func:`run_tuning`, its builder and runner, continuing a database;
* :mod:`~pipeline.tuning.session` and :mod:`~pipeline.tuning.hooks`: the run's state and MetaSchedule's hooks
  that share it (progress, the budget, skipping what was measured before);
* :mod:`~pipeline.tuning.interrupt`: signals, interruptible waits, MetaSchedule's worker processes;
* :mod:`~pipeline.tuning.logs`: MetaSchedule's logging to ``tuning.log``;
* :mod:`~pipeline.tuning.family`: the family index, :func:`find_base`, :func:`resolve_trials`;
* :mod:`~pipeline.tuning.result`: :class:`TuningReport` (``tuning.json``) and the convergence rule.

Importing this package does not import TVM.
"""

from pipeline.tuning.apply import apply_tuning, prepare
from pipeline.tuning.family import (
    MAX_TRIALS,
    BaseTuning,
    family_key,
    family_tunings,
    find_base,
    remember_tuning,
    resolve_trials,
)
from pipeline.tuning.result import (
    CONVERGED_GAIN,
    TuningReport,
    format_latency,
    has_converged,
)
from pipeline.tuning.interrupt import TuningInterrupted
from pipeline.tuning.search import run_tuning
from pipeline.tuning.space import (
    DEFAULT_SPACE,
    LOCAL_RUNNER,
    SPACE,
    TuningSpace,
    check_request,
    space_for,
    tracker_runner,
    tune_inputs,
    tune_manifest_extra,
    tuning_num_cores,
    tuning_target,
)

__all__ = [
    "CONVERGED_GAIN",
    "DEFAULT_SPACE",
    "LOCAL_RUNNER",
    "MAX_TRIALS",
    "SPACE",
    "BaseTuning",
    "TuningInterrupted",
    "TuningReport",
    "TuningSpace",
    "apply_tuning",
    "check_request",
    "space_for",
    "family_key",
    "family_tunings",
    "find_base",
    "format_latency",
    "has_converged",
    "prepare",
    "remember_tuning",
    "resolve_trials",
    "run_tuning",
    "tracker_runner",
    "tune_inputs",
    "tune_manifest_extra",
    "tuning_num_cores",
    "tuning_target",
]
