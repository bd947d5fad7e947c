"""``ferry serve --workers N``: a supervisor process and N workers, each a whole Ferry server on the same ports.

The supervisor loads no model and serves no call. It binds the gRPC and HTTP ports (resolving port 0) with
``SO_REUSEPORT`` and keeps them bound, not listening, so the ports stay Ferry's while workers come and go; each
worker binds the same ports with ``SO_REUSEPORT`` and the kernel spreads new connections over the workers that
listen. A worker listens for gRPC only once its models are loaded and it has joined (start before serve, per
worker).

It starts each worker as ``python -m ferry.server`` with the supervisor's own arguments plus ``--workers 1`` and the
resolved ports, in a session (process group) of its own (a terminal's Ctrl-C reaches the supervisor only, which
passes it on once), with one end of a socket pair (:mod:`~ferry.server.workers.channel`). Over that link it:

- applies changes to every worker (loads, unloads, trace settings: :mod:`~ferry.server.workers.worker`), one
  change at a time, and remembers the latest per model, so a worker started later (a restart) gets them replayed
  before it listens (an unload only of a model a worker loads at start: the log holds at most one entry per model
  directory, per uploaded model serving and per trace setting's model);
- gathers statistics, metrics and outcomes from the other workers for the worker a caller asked.

A worker that exits is reported (a WARNING with its exit status, ``ferry_worker_restarts``) and started again, at
once the first time and after a doubling delay (up to :data:`MAX_BACKOFF_S`) while it keeps dying young. A worker
that exits before the fleet was first ready stops the start: the supervisor stops the others and exits with its
status (a bad flag or repository fails once, not N times in a loop).

Signals: SIGTERM or SIGINT is passed to every worker as SIGTERM, and each drains as a lone server does (ready false,
``--drain-delay-s`` of serving, ``--shutdown-grace-s`` for calls in flight); the supervisor exits 0 once all exited
0. A second signal is passed on as it came (the workers exit at once) and the supervisor exits with 128 + its
number. SIGHUP is passed on (certificates and auth rules reload in every worker): at once to the workers that have
joined, and to one still starting once it joins (before, the signal could end it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.errors import DeadlineExceeded, FerryError, Unavailable
from ferry.server.config import ServerConfig
from ferry.server.transport.server import bound_socket
from ferry.server.workers.channel import Channel, Header, LinkClosed, frame_bound, status_value
from ferry.server.workers.merge import text_of
from ferry.server.workers.worker import ENV, LOAD, TRACE, UNLOAD, pack

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0
"""Longest wait before starting a worker again that keeps dying within :data:`YOUNG_S` of its start."""

YOUNG_S = 10.0

KILL_AFTER_S = 5.0
"""After a second signal, workers still running this long after it are killed."""

GATHER_TIMEOUT_S = 3.0
"""How long a read gathered from the other workers (/metrics, statistics, outcomes) waits for each: one that does
not answer by then (its event loop stalled, its process stopped) is left out rather than holding up the answer."""


PING_EVERY_S = 5.0
"""While a worker applies a change (a load may take minutes, in its load threads), the supervisor pings it this
often; a worker whose event loop does not answer a ping within :data:`GATHER_TIMEOUT_S` (its process stopped, its
loop wedged) is killed and started again, so one stuck worker cannot hold every later change (and every restarted
worker's join) behind it. Its restart replays the change."""


@dataclass
class Slot:
    """Worker ``index``: its current process and link (None between a death and the restart)."""

    index: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    joined: bool = False  # has every change so far and gets each new one
    ready: bool = False
    restarts: int = 0
    started_at: float = 0.0
    line: str = ""
    reload: bool = False  # a SIGHUP came while it could not take one yet: sent once it joins
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)


class Supervisor:
    """Runs ``config.workers`` workers with the command line ``argv`` (``serve ...``) until a signal."""

    def __init__(self, config: ServerConfig, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.slots = [Slot(i) for i in range(config.workers)]
        self._max_frame = frame_bound(config.max_message_bytes)
        self._changes: OrderedDict[tuple[str, str], tuple[str, bytes]] = OrderedDict()
        self._change_lock = asyncio.Lock()
        self._stopping = False
        self._fleet_ready = asyncio.Event()
        self._failed: int | None = None  # a worker's exit status that stopped the start
        self._done = asyncio.Event()
        self._reserved: list[socket.socket] = []
        self.grpc_port = 0
        self.http_port: int | None = None

    # -- the run

    async def run(self) -> int:
        """Start the workers, print the ready line once all are ready, restart those that die, until a signal;
        returns the exit status."""
        self._reserve_ports()
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(sig: signal.Signals) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("%s: stopping the %d workers", sig.name, len(self.slots))
                self._stop(signal.SIGTERM)
            else:
                log.warning("%s again: workers exit at once", sig.name)
                self._stop(sig)
                loop.call_later(KILL_AFTER_S, self._stop, signal.SIGKILL)
                self._failed = 128 + sig.value

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        keepers = [loop.create_task(self._keep(slot), name=f"worker {slot.index}") for slot in self.slots]
        try:
            ready = loop.create_task(self._fleet_ready.wait())
            await asyncio.wait([ready, *keepers], return_when=asyncio.FIRST_COMPLETED)
            if self._fleet_ready.is_set() and not self._stopping:
                print(f"{self.slots[0].line} workers={len(self.slots)}", flush=True)
            ready.cancel()
            await asyncio.gather(*keepers)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for sock in self._reserved:
                sock.close()
        if self._failed is not None:
            return self._failed
        # -SIGTERM: a worker our SIGTERM reached before it could handle it (still starting Python)
        codes = [slot.process.returncode for slot in self.slots if slot.process is not None]
        return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1

    def _reserve_ports(self) -> None:
        """Bind (not listen on) the ports with SO_REUSEPORT: port 0 becomes a port every worker binds."""
        host = self.config.host
        try:
            self.grpc_port = self._reserve(host, self.config.grpc_port)
            if self.config.http_port is not None:
                self.http_port = self._reserve(host, self.config.http_port)
        except OSError as err:
            for sock in self._reserved:
                sock.close()
            raise Unavailable(f"cannot bind the workers' ports on {host}: {err}") from None

    def _reserve(self, host: str, port: int) -> int:
        """Take ``port`` for the workers. First bound as a lone server binds it (no SO_REUSEPORT), which fails if
        another server listens there: with SO_REUSEPORT alone, a second fleet started on the same ports would join
        them, and the kernel would spread connections over both fleets."""
        with bound_socket(host, port) as alone:
            port = int(alone.getsockname()[1])
        sock = bound_socket(host, port, reuse_port=True)
        self._reserved.append(sock)
        return port

    def _stop(self, sig: signal.Signals) -> None:
        self._stopping = True
        self._send_all(sig)

    def _send_all(self, sig: signal.Signals) -> None:
        for slot in self.slots:
            _send(slot, sig)

    def _reload(self) -> None:
        """SIGHUP: passed to every worker that has joined. A worker still starting may not handle it yet (it would
        end the worker, and while the fleet starts, the fleet); it gets it once it joins, as it may have read the
        certificates and auth rules before they changed."""
        for slot in self.slots:
            if slot.joined:
                _send(slot, signal.SIGHUP)
            else:
                slot.reload = True

    async def _keep(self, slot: Slot) -> None:
        """Run worker ``slot`` until the supervisor stops, starting it again each time it exits."""
        delay = 0.0
        while not self._stopping:
            await self._start(slot)
            assert slot.process is not None
            code = await slot.process.wait()
            lived = time.monotonic() - slot.started_at
            await self._forget(slot)
            if self._stopping:
                break
            if not self._fleet_ready.is_set():
                log.error("worker %d exited with status %s while starting: stopping", slot.index, code)
                self._failed = code if code > 0 else 1
                self._stop(signal.SIGTERM)
                break
            slot.restarts += 1
            delay = min(MAX_BACKOFF_S, max(0.5, 2 * delay)) if lived < YOUNG_S else 0.0
            log.warning(
                "worker %d (pid %d) %s after %.1fs; starting it again%s",
                slot.index,
                slot.process.pid,
                f"was killed by signal {-code}" if code < 0 else f"exited with status {code}",
                lived,
                f" in {delay:.1f}s" if delay else "",
            )
            await asyncio.sleep(delay)

    async def _start(self, slot: Slot) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        slot.reload = False  # a new process reads the files as they are now
        ports = ["--workers", "1", "--grpc-port", str(self.grpc_port)]
        if self.http_port is not None:
            ports += ["--http-port", str(self.http_port)]
        env = {**os.environ, ENV: f"{slot.index}/{len(self.slots)}/{theirs.fileno()}"}
        try:
            slot.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ferry.server",
                *self.argv,
                *ports,
                pass_fds=(theirs.fileno(),),
                env=env,
                start_new_session=True,  # its own process group: a terminal's Ctrl-C reaches the supervisor only
            )
        finally:
            theirs.close()
        if self._stopping:  # a signal came while it was being started, when _send_all could not see it
            _send(slot, signal.SIGTERM)
        slot.started_at = time.monotonic()
        slot.channel = Channel(mine, partial(self._serve, slot), f"worker {slot.index}", self._max_frame)
        task = asyncio.get_running_loop().create_task(slot.channel.run())
        slot.tasks.add(task)
        task.add_done_callback(slot.tasks.discard)
        log.info("worker %d started: pid %d", slot.index, slot.process.pid)

    async def _forget(self, slot: Slot) -> None:
        slot.joined = slot.ready = False
        if slot.channel is not None:
            slot.channel.close()
            slot.channel = None
        await asyncio.gather(*slot.tasks, return_exceptions=True)

    # -- the workers' requests

    async def _serve(self, slot: Slot, header: Header, body: bytes) -> tuple[Header, bytes]:
        op = header["op"]
        if op == "join":
            await self._join(slot)
            return {}, b""
        if op == "ready":
            slot.ready = True
            slot.line = str(header.get("line", ""))
            if all(s.ready for s in self.slots):
                self._fleet_ready.set()
            return {}, b""
        if op == "broadcast":
            return await self._broadcast(str(header["method"]), body)
        if op == "gather":
            return await self._gather(slot, "call", {"method": header["method"]}, body)
        if op == "metrics":
            others = self._others(slot)
            answers = await asyncio.gather(*(self._ask(s, "metrics") for s in others), return_exceptions=True)
            got = [(s.index, a[1]) for s, a in zip(others, answers, strict=True) if not isinstance(a, BaseException)]
            parts = [text for _, text in got] + [self._own_metrics()]
            return {"workers": [index for index, _ in got]}, pack(parts)
        if op == "outcomes":
            results = []
            for other in self._others(slot):
                try:
                    reply, _ = await self._ask(other, "outcomes", {}, body)
                    results.append({"unmatched": reply["unmatched"]})
                except FerryError as err:
                    log.warning("worker %d: outcomes: %s", other.index, err.message)
            return {"results": results}, b""
        raise FerryError(f"unknown link request {op!r}")

    def _others(self, slot: Slot) -> list[Slot]:
        return [s for s in self.slots if s is not slot and s.joined and s.channel is not None]

    async def _call(self, slot: Slot, op: str, fields: Header | None = None, body: bytes = b"") -> tuple[Header, bytes]:
        if slot.channel is None:
            raise LinkClosed(f"worker {slot.index} is not running")
        return await slot.channel.call(op, fields, body)

    async def _ask(self, slot: Slot, op: str, fields: Header | None = None, body: bytes = b"") -> tuple[Header, bytes]:
        """A read from another worker, within :data:`GATHER_TIMEOUT_S`."""
        try:
            return await asyncio.wait_for(self._call(slot, op, fields, body), GATHER_TIMEOUT_S)
        except TimeoutError:
            raise DeadlineExceeded(f"worker {slot.index} did not answer within {GATHER_TIMEOUT_S:g}s") from None

    async def _change(self, slot: Slot, method: str, body: bytes) -> tuple[Header, bytes]:
        """Apply one change on one worker, however long it takes, as long as the worker's loop answers pings (see
        :data:`PING_EVERY_S`); a worker that stops answering is killed (LinkClosed: its restart replays the change)."""
        change = asyncio.ensure_future(self._call(slot, "call", {"method": method}, body))
        try:
            while True:
                done, _ = await asyncio.wait([change], timeout=PING_EVERY_S)
                if done:
                    return change.result()
                try:
                    await self._ask(slot, "ping")
                except DeadlineExceeded:
                    log.error(
                        "worker %d answers nothing while applying %s: killing it (started again, it gets every change)",
                        slot.index,
                        method.rsplit("/", 1)[-1],
                    )
                    _send(slot, signal.SIGKILL)
                    raise LinkClosed(f"worker {slot.index} stopped answering") from None
        finally:
            if not change.done():
                change.cancel()

    async def _join(self, slot: Slot) -> None:
        """Replay the changes made so far onto a worker that has loaded its models, then send it every new one."""
        async with self._change_lock:
            # the models first, then the trace settings: a setting outlives reloads of its model, so it may have
            # been made before the latest load of a model this worker does not have yet (stable: each in order)
            for _, (method, body) in sorted(self._changes.items(), key=lambda change: change[0][0] == "trace"):
                try:
                    await self._change(slot, method, body)
                except LinkClosed:
                    raise
                except FerryError as err:
                    log.warning("worker %d: replaying %s: %s", slot.index, method.rsplit("/", 1)[-1], err.message)
            slot.joined = True
            if slot.reload:
                slot.reload = False
                _send(slot, signal.SIGHUP)

    async def _broadcast(self, method: str, body: bytes) -> tuple[Header, bytes]:
        """Apply a change on every joined worker, one change at a time; remembered when any worker took it."""
        async with self._change_lock:
            targets = [s for s in self.slots if s.joined and s.channel is not None]
            answers = await asyncio.gather(*(self._change(s, method, body) for s in targets), return_exceptions=True)
            results, parts = _collect(targets, answers, skip_closed=True)
            if any(not r["code"] for r in results):
                self._remember(method, body)
            return {"results": results}, pack(parts)

    def _remember(self, method: str, body: bytes) -> None:
        if method == TRACE:
            request = pb.TraceSettingRequest.FromString(body)
            key = ("trace", request.model_name)
            if key in self._changes:  # settings add up: one request with the latest value of each
                merged = pb.TraceSettingRequest.FromString(self._changes[key][1])
                for name, value in request.settings.items():
                    merged.settings[name].CopyFrom(value)
                request = merged
            body = request.SerializeToString()
        elif method == LOAD:
            key = ("model", pb.RepositoryModelLoadRequest.FromString(body).model_name)
        elif method == UNLOAD:
            key = ("model", pb.RepositoryModelUnloadRequest.FromString(body).model_name)
            if not self._loads_at_start(key[1]):  # a new worker never has it: nothing to replay, nothing to keep
                self._changes.pop(key, None)
                self._changes.pop(("trace", key[1]), None)  # its trace settings would replay onto no model
                return
        else:
            return
        self._changes.pop(key, None)  # the latest change last: replays keep the order they were made in
        self._changes[key] = (method, body)

    def _loads_at_start(self, model: str) -> bool:
        """Whether a worker started now loads ``model`` itself (explicit mode, the only one taking changes: a
        ``--load-model`` of a model directory). Only then must an unload of it be replayed; remembering the others
        would let a client grow the replay log without a bound (uploads under new names, each unloaded)."""
        wanted = self.config.load_models
        return ("*" in wanted or model in wanted) and (self.config.model_repository / model).is_dir()

    async def _gather(self, slot: Slot, op: str, fields: Header, body: bytes) -> tuple[Header, bytes]:
        others = self._others(slot)
        answers = await asyncio.gather(*(self._ask(s, op, fields, body) for s in others), return_exceptions=True)
        results, parts = _collect(others, answers)
        return {"results": results}, pack(parts)

    def _own_metrics(self) -> bytes:
        return text_of(_supervisor_families(self.slots))


def _send(slot: Slot, sig: signal.Signals) -> None:
    if slot.process is not None and slot.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            slot.process.send_signal(sig)


def _collect(
    slots: Sequence[Slot], answers: Sequence[tuple[Header, bytes] | BaseException], skip_closed: bool = False
) -> tuple[list[Header], list[bytes]]:
    """Each worker's answer as a result (worker, code, message) and a reply body (empty when it failed).
    ``skip_closed``: leave out a worker whose link closed before it answered (it died)."""
    results: list[Header] = []
    parts: list[bytes] = []
    for slot, answer in zip(slots, answers, strict=True):
        if skip_closed and isinstance(answer, LinkClosed):
            continue
        if isinstance(answer, FerryError):
            results.append({"worker": slot.index, "code": status_value(answer.code), "message": answer.message})
            parts.append(b"")
        elif isinstance(answer, BaseException):
            raise answer
        else:
            results.append({"worker": slot.index, "code": 0, "message": ""})
            parts.append(answer[1])
    return results, parts


def _supervisor_families(slots: Sequence[Slot]) -> list[Metric]:
    workers = GaugeMetricFamily("ferry_workers", "Worker processes the supervisor runs (--workers).")
    workers.add_metric([], len(slots))
    up = GaugeMetricFamily("ferry_worker_up", "1 while the worker is ready and gets every change.", labels=["worker"])
    restarts = CounterMetricFamily(
        "ferry_worker_restarts", "Times the worker exited and was started again.", labels=["worker"]
    )
    for slot in slots:
        up.add_metric([str(slot.index)], 1 if slot.ready and slot.joined else 0)
        restarts.add_metric([str(slot.index)], slot.restarts)
    return [workers, up, restarts]


async def supervise(config: ServerConfig, argv: Sequence[str]) -> int:
    """Run ``config.workers`` workers of ``ferry serve`` (``argv``: its command line) until a signal; the exit
    status."""
    return await Supervisor(config, argv).run()


__all__ = ["Supervisor", "supervise"]
