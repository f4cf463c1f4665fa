"""The fleet file: its model (:class:`FleetSpec`), read and validated where the flow starts.

    tracker: 127.0.0.1:9190              # optional default for the devices
    devices:
      - key: local-x86                   # a tracker key (or host: + port:), optional name:
        target: llvm
      - key: rpi4
        target: "llvm -mtriple=aarch64-linux-gnu -mattr=+neon"
        tracker: 10.0.0.5:9190
    models:
      - efficientnet_lite0
      - {model: resnet18_v2, weights: random}
      - {model: path/to/net.onnx, image: data/dog.jpg}

:func:`load_fleet` / :func:`parse_fleet` / :func:`fleet_from_mapping` give the file (a YAML text, or the
flow's ``spec`` parameter) as a typed :class:`FleetSpec` (``docs/fleet.md`` describes every key). Pure and
cheap: no TVM, no file but the fleet file. Every mistake is a :class:`~pipeline.errors.UsageError` that names
the file, the line and the field (``fleet.yaml:7: devices[1].targt: unknown key; did you mean 'target'?``).
What comes next, the models, targets and images resolved and every pair planned, is :mod:`pipeline.fleet.plan`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pipeline.device.spec import DeviceSpec, split_host_port
from pipeline.errors import UsageError, clip
from pipeline.planning.request import (
    FLEET_DEVICE, FLEET_MODEL, FLEET_TOP, MAX_DEVICE_NAME, RunRequest, field_kind, request_fields,
)
from pipeline.store.s3 import S3Location, is_s3

DEFAULT_REQUEST_TIMEOUT = 10.0
"""Seconds to wait for a tracker to hand out a device: short, so that a key with no server fails its pairs
soon (a single run waits 30 s)."""
DEFAULT_CONCURRENCY = 8
"""Device sessions at the same time, over all devices."""
MAX_CONCURRENCY = 256
DEFAULT_BUILD_TIMEOUT = 3600.0
"""Seconds a build on a ``build_deployment`` may take, from its submission (waiting for a worker included)."""
INLINE_SOURCE = "fleet spec"
"""How messages name a fleet given inline (the flow's ``spec`` parameter) rather than as a file."""

FLEET_DEFAULTS: dict[str, Any] = {"request_timeout": DEFAULT_REQUEST_TIMEOUT}
"""Where a fleet's default differs from a single run's (:class:`RunRequest`'s)."""

#: The fleet file's own keys; every other key is a :class:`RunRequest` field that may be given there.
FLEET_ONLY_KEYS = ("devices", "models", "concurrency", "build_concurrency", "build_deployment", "build_timeout")
TOP_KEYS = (*FLEET_ONLY_KEYS, *(f.name for f in request_fields(FLEET_TOP)))
DEVICE_KEYS = ("name", *(f.name for f in request_fields(FLEET_DEVICE)))
MODEL_KEYS = tuple(f.name for f in request_fields(FLEET_MODEL))
_FIELDS = {f.name: f for f in request_fields()}
_TIMEOUTS = ("connect_timeout", "request_timeout", "call_timeout")
_DEPLOYMENT = re.compile(r"[^/\s]+/[^/\s]+")


@dataclass(frozen=True)
class FleetDevice:
    """One device of the fleet.

    Attributes:
        name: how the table and the run history name it (default: the key, or ``host:port``); unique in the
            fleet; its runs' ``device_name``, so each device has its own lineages.
        target: the TVM target as written (``pipeline.targets.parse_target`` reads it).
        spec: where it is and how long to wait for it (validated).
        fields: the :class:`RunRequest` fields this device sets (target, address, timeouts, its name, threads).
        line: its line in the fleet file (None for an inline spec).
    """

    name: str
    target: str
    spec: DeviceSpec
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    line: int | None = None


@dataclass(frozen=True)
class FleetModel:
    """One model of the fleet: a ``RunRequest``'s model, weights, seed and image (None: the default image)."""

    source: str
    weights: str = "pretrained"
    seed: int = 0
    image: str | None = None
    line: int | None = None

    @property
    def fields(self) -> dict[str, Any]:
        """The :class:`RunRequest` fields this model sets."""
        return {"model": self.source, "weights": self.weights, "seed": self.seed, "image": self.image}


@dataclass(frozen=True)
class FleetSpec:
    """A validated fleet file: the devices, the models, and what every pair shares.

    Attributes:
        shared: the :class:`RunRequest` of every pair before its device's and model's fields: the file's top-level
            keys over :data:`FLEET_DEFAULTS` over RunRequest's own defaults (so ``shared.opt_level`` means what
            ``--opt-level`` means).
        concurrency: device sessions open at once (a device holds one at a time, or as many as its tracker has
            servers under its key).
        build_concurrency: compilations at once (None: half the cores, ``flows.fleet.default_build_concurrency``).
        build_deployment, build_timeout: build on that deployment's work pool, each within that many seconds.
    """

    source: str
    devices: tuple[FleetDevice, ...]
    models: tuple[FleetModel, ...]
    shared: RunRequest = dataclasses.field(default_factory=lambda: RunRequest(**FLEET_DEFAULTS))
    concurrency: int = DEFAULT_CONCURRENCY
    build_concurrency: int | None = None
    build_deployment: str | None = None
    build_timeout: float = DEFAULT_BUILD_TIMEOUT

    def request(self, device: FleetDevice, model: FleetModel) -> RunRequest:
        """The :class:`RunRequest` of the pair (``device``, ``model``): what ``python -m flows.resnet_remote``
        would be given for it."""
        return dataclasses.replace(self.shared, **device.fields, **model.fields)


@dataclass(frozen=True)
class _Node:
    """A value of the fleet file with its line: a dict or list of nodes, or a scalar with its source text."""

    value: Any
    line: int | None
    text: str | None = None
    key_line: int | None = None
    """The line of the key this value belongs to (where an unknown key is reported)."""


class Where:
    """Builds the messages of one fleet file: ``FILE:LINE: FIELD: problem``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: _Node | int | None, field: str, problem: str) -> UsageError:
        line = node.line if isinstance(node, _Node) else node
        at = f"{self.source}:{line}" if line else self.source
        return UsageError(f"{at}: {field}: {problem}" if field else f"{at}: {problem}")


def load_fleet(path: str | os.PathLike[str]) -> FleetSpec:
    """Read and validate the fleet file at ``path``; relative paths in it are taken from its directory.

    Raises:
        UsageError: the file is missing or unreadable, not YAML, or a field is wrong (the message names the
            file, the line and the field).
    """
    file = Path(path).expanduser()
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_FLEET_BYTES + 1)
        if len(data) > MAX_FLEET_BYTES:
            raise UsageError(f"the fleet file {clip(file)} is larger than {MAX_FLEET_BYTES // 1024} KiB: a fleet file "
                             "lists devices and models (see docs/fleet.md)")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"fleet file not found: {clip(file)}; give the path of a fleet YAML file (see docs/fleet.md)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the fleet file {clip(file)}: {exc}") from None
    return parse_fleet(text, str(path), base=file.resolve().parent)


def parse_fleet(text: str, source: str = "fleet.yaml", base: str | os.PathLike[str] | None = None) -> FleetSpec:
    """Validate a fleet file's text.

    Args:
        source: how messages name the file.
        base: the directory relative model, weights and image paths are taken from (default: the working
            directory).
    """
    import yaml

    where = Where(source)
    if len(text) > MAX_FLEET_BYTES:
        raise where.error(None, "", f"larger than {MAX_FLEET_BYTES // 1024} KiB: a fleet file lists devices and models")
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            tree = None if root is None else _tree(root, loader, where)
        finally:
            loader.dispose()
    except RecursionError:  # PyYAML's parser recurses per level: [[[[... nests beyond Python's stack first
        raise where.error(None, "", f"too deeply nested for a fleet file (more than {_MAX_DEPTH} levels)") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise where.error(mark.line + 1 if mark else None, "", f"not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise where.error(None, "", f"not valid YAML: {exc}") from None
    if tree is None:
        raise where.error(None, "", "the file is empty: it needs devices: and models: (see docs/fleet.md)")
    return _spec(tree, where, Path(base) if base is not None else Path.cwd())


def fleet_from_mapping(data: Any, source: str = INLINE_SOURCE, base: str | os.PathLike[str] | None = None) -> FleetSpec:
    """Validate a fleet given as plain data (the flow's ``spec`` parameter: the YAML file's content as a dict)."""
    where = Where(source)
    return _spec(_plain_tree(data, where), where, Path(base) if base is not None else Path.cwd())


MAX_FLEET_BYTES = 1 << 20
"""The largest fleet file read (a fleet of hundreds of devices and models is a few tens of KiB)."""
_MAX_NODES = 20_000
_MAX_DEPTH = 20


def _tree(node: Any, loader: Any, where: Where, budget: list[int] | None = None, depth: int = 0) -> _Node:
    """The composed YAML ``node`` as :class:`_Node` values.

    Bounded: aliases are expanded, so a few lines could otherwise stand for millions of values.
    """
    import yaml

    budget = budget if budget is not None else [_MAX_NODES]
    budget[0] -= 1
    line = node.start_mark.line + 1
    if budget[0] < 0 or depth > _MAX_DEPTH:
        raise where.error(line, "", f"too large or too deeply nested for a fleet file (more than {_MAX_NODES} "
                                    f"values or {_MAX_DEPTH} levels, aliases expanded)")
    if isinstance(node, yaml.MappingNode):
        items: dict[str, _Node] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise where.error(key_line, "", "a key must be a plain name")
            key = str(key_node.value)
            if key in items:
                raise where.error(key_line, clip(key, 80), f"given twice (first on line {items[key].key_line}); keep one")
            child = _tree(value_node, loader, where, budget, depth + 1)
            items[key] = dataclasses.replace(child, key_line=key_line)
        return _Node(items, line)
    if isinstance(node, yaml.SequenceNode):
        return _Node([_tree(item, loader, where, budget, depth + 1) for item in node.value], line)
    try:
        value = loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError) as exc:  # !!int abc, 2001-02-30
        raise where.error(line, "", f"cannot read the value {clip(node.value, 80)!r} ({clip(exc, 120)}); quote it "
                                    "if it is text") from None
    return _Node(value, line, str(node.value))


def _plain_tree(data: Any, where: Where, budget: list[int] | None = None, depth: int = 0) -> _Node:
    """Plain data (the flow's ``spec`` parameter) as :class:`_Node` values, bounded like :func:`_tree`."""
    budget = budget if budget is not None else [_MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0 or depth > _MAX_DEPTH:
        raise where.error(None, "", f"too large or too deeply nested for a fleet (more than {_MAX_NODES} values or "
                                    f"{_MAX_DEPTH} levels)")
    if isinstance(data, dict):
        return _Node({str(k): _plain_tree(v, where, budget, depth + 1) for k, v in data.items()}, None)
    if isinstance(data, (list, tuple)):
        return _Node([_plain_tree(v, where, budget, depth + 1) for v in data], None)
    return _Node(data, None, None if data is None else str(data))


def _spec(tree: _Node, where: Where, base: Path) -> FleetSpec:
    top = _mapping(tree, "", TOP_KEYS, where)
    given = {name: _value(top.get(name), name, name, where) for name in TOP_KEYS if name in _FIELDS}
    given = {name: value for name, value in given.items() if value is not None}
    if "tracker" in given:
        _tracker_address(top["tracker"], "tracker", given["tracker"], where)
    if "image" in given:
        given["image"] = _path_text(top["image"], "image", where, base)
    if "artifacts" in given and not is_s3(given["artifacts"]):
        given["artifacts"] = _path_text(top["artifacts"], "artifacts", where, base)
    elif "artifacts" in given:
        try:
            S3Location.parse(given["artifacts"])
        except UsageError as exc:
            raise where.error(top["artifacts"], "artifacts", str(exc)) from None
    if given.get("tune_trials") and given.get("tune_more"):
        raise where.error(top["tune_more"], "tune_more", "give tune_trials (a total) or tune_more (trials added "
                                                         "to the largest tuning), not both")
    shared = RunRequest(**{**FLEET_DEFAULTS, **given})
    devices = tuple(_device(node, f"devices[{i}]", shared, where)
                    for i, node in enumerate(_entries(top.get("devices"), tree, "devices", where,
                                                      "list the devices to run on (each with key: or host: and port:)")))
    _check_unique_devices(devices, where)
    models = tuple(_model(node, f"models[{i}]", shared.image, where, base)
                   for i, node in enumerate(_entries(top.get("models"), tree, "models", where,
                                                     "list the models to run (names such as efficientnet_lite0, or "
                                                     "{model: PATH})")))
    _check_unique_models(models, where)
    build_deployment = _text(top.get("build_deployment"), "build_deployment", where)
    if build_deployment is not None and not _DEPLOYMENT.fullmatch(build_deployment):
        raise where.error(top["build_deployment"], "build_deployment",
                          f"{clip(build_deployment)!r} is not FLOW/DEPLOYMENT, e.g. resnet-remote/build "
                          "(prefect deployment ls lists them)")
    return FleetSpec(
        source=where.source, devices=devices, models=models, shared=shared,
        concurrency=_integer(top.get("concurrency"), "concurrency", where, 1, MAX_CONCURRENCY, DEFAULT_CONCURRENCY),
        build_concurrency=_integer(top.get("build_concurrency"), "build_concurrency", where, 1, MAX_CONCURRENCY, None),
        build_deployment=build_deployment,
        build_timeout=_seconds(top.get("build_timeout"), "build_timeout", where) or DEFAULT_BUILD_TIMEOUT,
    )


def _value(node: _Node | None, name: str, label: str, where: Where) -> Any:
    """The value of the :class:`RunRequest` field ``name`` as the file gives it (None: not given), checked against
    the field's rule: the same rule as its command-line option."""
    if node is None or node.value is None:
        return None
    f = _FIELDS[name]
    kind = field_kind(f)
    value = _text(node, label, where) if kind is str else node.value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    problem = f.metadata["rule"].problem(value, kind)
    if problem is not None:
        raise where.error(node, label, f"{problem}, not {_kind(node)}")
    return value


def _entries(node: _Node | None, parent: _Node, field: str, where: Where, hint: str) -> list[_Node]:
    if node is None or node.value is None:
        raise where.error(parent, field, f"missing: {hint}")
    if not isinstance(node.value, list):
        raise where.error(node, field, f"must be a list (one '- ' entry per line), not {_kind(node)}")
    if not node.value:
        raise where.error(node, field, f"is empty: {hint}")
    return node.value


def _device(node: _Node, field: str, shared: RunRequest, where: Where) -> FleetDevice:
    items = _mapping(node, field, DEVICE_KEYS, where)
    given = {name: _value(items.get(name), name, f"{field}.{name}", where) for name in DEVICE_KEYS if name in _FIELDS}
    key, host, port, own_tracker = given["key"], given["host"], given["port"], given["tracker"]
    if own_tracker is not None:
        _tracker_address(items["tracker"], f"{field}.tracker", own_tracker, where)
    if key is not None and host is not None:
        raise where.error(items["host"], f"{field}.host",
                          "give either key: (a device at a tracker) or host: and port: (an rpc_server), not both")
    if key is None and host is None:
        raise where.error(node, field, "needs key: (a device registered with a tracker) or host: and port: "
                                       "(an rpc_server you reach directly)")
    if host is not None and port is None:
        raise where.error(items["host"], f"{field}.port", f"missing: host {clip(host)!r} needs the port of its rpc_server")
    if port is not None and host is None:
        raise where.error(items["port"], f"{field}.port", "port: goes with host:; a device with key: gets its address "
                                                          "from the tracker")
    if host is not None and own_tracker is not None:
        raise where.error(items["tracker"], f"{field}.tracker", "a host:/port: device is reached directly: drop tracker:")
    tracker = (own_tracker or shared.tracker) if key is not None else None
    if key is not None and tracker is None:
        raise where.error(items["key"], f"{field}.key",
                          "needs a tracker: set tracker: HOST:PORT at the top of the file or on this device")
    timeouts = {name: given[name] if given[name] is not None else getattr(shared, name) for name in _TIMEOUTS}
    spec = DeviceSpec(host=host, port=port, tracker=tracker, key=key, **timeouts)
    try:
        spec.validate()
    except UsageError as exc:
        raise where.error(node, field, str(exc)) from None
    name = _text(items.get("name"), f"{field}.name", where)
    if name is not None and not name.strip():
        raise where.error(items["name"], f"{field}.name", "is empty")
    if name is not None and (len(name) > MAX_DEVICE_NAME or not all(ch.isprintable() for ch in name)):
        raise where.error(items["name"], f"{field}.name", f"must be at most {MAX_DEVICE_NAME} printable characters")
    target = given["target"]
    if target is not None and not target.strip():
        raise where.error(items["target"], f"{field}.target", 'is empty: give a TVM target such as "llvm"')
    target = target or "llvm"
    name = name or key or f"{host}:{port}"
    fields = {"host": host, "port": port, "tracker": tracker, "key": key, "target": target, **timeouts,
              "device_name": name}
    if given["threads"] is not None:
        fields["threads"] = given["threads"]
    return FleetDevice(name, target, spec, fields, node.line)


def _check_unique_devices(devices: Iterable[FleetDevice], where: Where) -> None:
    names: dict[str, tuple[int, FleetDevice]] = {}
    addresses: dict[tuple[Any, ...], tuple[int, FleetDevice]] = {}
    for i, device in enumerate(devices):
        if device.name in names:
            j, first = names[device.name]
            raise where.error(device.line, f"devices[{i}].name",
                              f"{clip(device.name)!r} already names devices[{j}]{on_line(first.line)}; give each "
                              "device its own name: (the table and the run history tell devices apart by it)")
        names[device.name] = i, device
        s = device.spec
        address = (s.tracker, s.key) if s.kind == "tracker" else (s.host, s.port)
        if address in addresses:
            j, first = addresses[address]
            raise where.error(device.line, f"devices[{i}]",
                              f"the same device as devices[{j}]{on_line(first.line)} ({s.describe()}): list each "
                              "device once (a tracker with several servers under one key serves them side by side)")
        addresses[address] = i, device


def _model(node: _Node, field: str, image: str | None, where: Where, base: Path) -> FleetModel:
    if not isinstance(node.value, dict):
        source = _text(node, field, where)
        if source is None or not source.strip():
            raise where.error(node, field, "is empty: name a model or give a file")
        return FleetModel(_relative(base, source, node, field, where), image=image, line=node.line)
    items = _mapping(node, field, MODEL_KEYS, where)
    source = _text(items.get("model"), f"{field}.model", where)
    if source is None or not source.strip():
        raise where.error(items.get("model", node), f"{field}.model",
                          "missing: name the model (efficientnet_lite0, resnet18_v2) or give its file")
    weights = _text(items.get("weights"), f"{field}.weights", where) or "pretrained"
    if weights not in ("pretrained", "random"):
        weights = str(base / weights) if not os.path.isabs(os.path.expanduser(weights)) else weights
    seed = _value(items.get("seed"), "seed", f"{field}.seed", where)
    return FleetModel(
        source=_relative(base, source, items["model"], f"{field}.model", where), weights=weights,
        seed=0 if seed is None else seed,
        image=_path_text(items.get("image"), f"{field}.image", where, base) or image, line=node.line,
    )


def _check_unique_models(models: Iterable[FleetModel], where: Where) -> None:
    seen: dict[tuple[Any, ...], tuple[int, FleetModel]] = {}
    for i, model in enumerate(models):
        ident = (model.source, model.weights, model.seed, model.image)
        if ident in seen:
            j, first = seen[ident]
            raise where.error(model.line, f"models[{i}]",
                              f"the same model as models[{j}]{on_line(first.line)}; list each model once")
        seen[ident] = i, model


def _relative(base: Path, source: str, node: _Node, field: str, where: Where) -> str:
    """A model file's path from the fleet file's directory; a model name stays a name."""
    from pipeline.models._types import MODEL_NAMES  # the names only: no framework is imported

    if source in MODEL_NAMES:
        return source
    try:
        expanded = os.path.expanduser(source)
        if os.path.isabs(expanded):
            return expanded
        candidate = base / expanded
        looks_like_path = "/" in source or os.sep in source or Path(source).suffix != ""
        if looks_like_path or candidate.exists() or Path(f"{candidate}-symbol.json").exists():
            return str(candidate)
    except (ValueError, OSError) as exc:  # a NUL byte, a name longer than the file system allows
        raise where.error(node, field, f"{clip(source, 80)!r} is not a usable path ({clip(exc, 80)})") from None
    return source  # an unknown name: resolve_model lists the known ones


def _path_text(node: _Node | None, field: str, where: Where, base: Path) -> str | None:
    text = _text(node, field, where)
    if text is None:
        return None
    if not text.strip():
        raise where.error(node, field, "is empty")
    expanded = os.path.expanduser(text)
    return expanded if os.path.isabs(expanded) else str(base / expanded)


def _mapping(node: _Node, field: str, allowed: tuple[str, ...], where: Where) -> dict[str, _Node]:
    if not isinstance(node.value, dict):
        what = "the file" if not field else field
        raise where.error(node, field, f"{what} must be a mapping of keys (such as {', '.join(allowed[:3])}), "
                                       f"not {_kind(node)}")
    for key, value in node.value.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            name = f"{field}.{key}" if field else key
            raise where.error(value.key_line or value.line, clip(name, 80),
                              f"unknown key; {hint}valid keys here: {', '.join(allowed)}")
    return node.value


def _kind(node: _Node) -> str:
    if isinstance(node.value, dict):
        return "a mapping"
    if isinstance(node.value, list):
        return "a list"
    if isinstance(node.value, str):
        return f"{clip(node.text, 60)!r}"
    return clip(node.text, 60)


def _text(node: _Node | None, field: str, where: Where) -> str | None:
    """A text field: the scalar as written (YAML would read ``key: no`` as false, ``1:30`` as 90)."""
    if node is None or node.value is None:
        return None
    if isinstance(node.value, (dict, list)):
        raise where.error(node, field, f"must be text, not {_kind(node)}")
    return str(node.text)


def _integer(node: _Node | None, field: str, where: Where, low: int, high: int, default: int | None) -> int | None:
    if node is None or node.value is None:
        return default
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise where.error(node, field, f"must be a whole number from {low} to {high}, not {_kind(node)}")
    return value


def _number(node: _Node | None, field: str, where: Where) -> float | None:
    if node is None or node.value is None:
        return None
    if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
        raise where.error(node, field, f"must be a number, not {_kind(node)}")
    return float(node.value)


def _seconds(node: _Node | None, field: str, where: Where) -> float | None:
    value = _number(node, field, where)
    if value is not None and not (math.isfinite(value) and value > 0):
        raise where.error(node, field, f"must be a number of seconds, more than 0, not {_kind(node)}")
    return value


def _tracker_address(node: _Node, field: str, text: str, where: Where) -> None:
    try:
        split_host_port(text)
    except UsageError:
        raise where.error(node, field, f"{clip(text)!r} is not HOST:PORT (e.g. 127.0.0.1:9190)") from None


def on_line(line: int | None) -> str:
    """`` (line N)``, for a message that points at an earlier entry; empty without a line (an inline spec)."""
    return f" (line {line})" if line else ""
