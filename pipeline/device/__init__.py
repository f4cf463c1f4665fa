"""The device behind a small interface: a TVM RPC session with bounded calls, and the processes that serve it.

Three ways to reach a device, chosen by :class:`DeviceSpec`:

* ``local``: an :class:`EmbeddedServer` (TVM's own ``python -m tvm.exec.rpc_server``) that we start on
  127.0.0.1 and stop again;
* ``host``: ``rpc.connect(host, port)`` to an ``rpc_server`` someone else runs;
* ``tracker``: ask an RPC tracker for a server registered under a key, then ``rpc.connect`` to it.

:func:`open_session` returns a :class:`RemoteSession`. Every remote call goes through
:meth:`RemoteSession.call`, which bounds it in time (TVM itself waits forever for a hung or stopped device)
and turns TVM's exceptions into the pipeline's :mod:`pipeline.errors`. Every session carries a server-side
session timeout (:attr:`DeviceSpec.session_timeout`). Servers and trackers run in their own process groups
because ``rpc_server`` leaves a ``popen_worker`` child behind when only it is signalled.

One module per concern:

* :mod:`~pipeline.device.spec`: :class:`DeviceSpec` and its checks;
* :mod:`~pipeline.device.calls`: bounded calls and what TVM's errors mean;
* :mod:`~pipeline.device.servers`: :class:`EmbeddedServer`, :class:`TrackerProcess`;
* :mod:`~pipeline.device.tracker`: the tracker's protocol (summary, request a server, known keys);
* :mod:`~pipeline.device.session`: :class:`RemoteSession`, :func:`open_session`, :class:`Device`;
* :mod:`~pipeline.device.probe`: what a device tells about itself (:func:`probe`, :func:`device_triple`).

``tvm`` is imported only where it is needed, so that a server can be started before the (slow) import.
"""

from pipeline.device.probe import DeviceInfo, device_triple, probe
from pipeline.device.servers import EmbeddedServer, TrackerProcess, start_tracker
from pipeline.device.session import Device, RemoteSession, open_session, prestart_embedded_server
from pipeline.device.spec import DeviceSpec, split_host_port
from pipeline.device.tracker import ServerGrant, known_keys, request_server, tracker_summary

__all__ = [
    "Device",
    "DeviceInfo",
    "DeviceSpec",
    "EmbeddedServer",
    "RemoteSession",
    "ServerGrant",
    "TrackerProcess",
    "device_triple",
    "known_keys",
    "open_session",
    "prestart_embedded_server",
    "probe",
    "request_server",
    "split_host_port",
    "start_tracker",
    "tracker_summary",
]
