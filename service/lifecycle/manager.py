"""Which model is serving: the deployment state machine, the atomic swap, rollback and persistence.

Deployments run one at a time. Each goes pending → resolving/downloading → loading → warming →
ready (or failed) while the previous model keeps serving; only a ready model is swapped in, by
replacing one reference on the event loop. Slow work runs in a daemon thread, so the event loop
never blocks and shutdown never waits on a half-loaded model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from opentelemetry import trace

from service.handle import FastPath, ModelHandle
from service.lifecycle import fast_path, loader, sources
from service.lifecycle.bundled import BundledModelMissingError
from service.lifecycle.deployment import TERMINAL_PHASES, Deployment, Phase
from service.lifecycle.events import EventHub, EventType, ProgressPublisher
from service.lifecycle.sources import ModelSource, SourceError, SourceKind
from service.lifecycle.state import ServedModelRecord, StateStore
from service.metrics import DEPLOYMENT_PHASES, ServingMetrics
from service.settings import Settings
from service.tracing import DeploymentTrace

log = logging.getLogger(__name__)
T = TypeVar("T")

HISTORY_LENGTH = 10


class DeploymentConflictError(Exception):
    """Another deployment is in progress; the caller should retry once it is finished."""

    def __init__(self, running: Deployment) -> None:
        super().__init__(f"deployment {running.id} of {running.model_id!r} is in progress ({running.phase})")
        self.running = running


class DeploymentInterruptedError(Exception):
    """The server began shutting down while the deployment ran."""


#: Name prefix of the daemon threads that resolve, download, load and warm models.
LIFECYCLE_THREAD_PREFIX = "model-lifecycle:"


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a daemon thread: unlike the default executor, it never holds up process exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # delivered to the awaiting coroutine
            loop.call_soon_threadsafe(settle, future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(settle, future.set_result, result)

    threading.Thread(
        target=work, name=f"{LIFECYCLE_THREAD_PREFIX}{getattr(fn, '__name__', 'work')}", daemon=True
    ).start()
    return await future


class ModelManager:
    """Owns the serving :class:`ModelHandle` and every deployment that replaces it."""

    def __init__(
        self, settings: Settings, metrics: ServingMetrics, tracer: trace.Tracer | None = None
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._tracer = tracer if tracer is not None else trace.NoOpTracer()
        self._trace: DeploymentTrace | None = None
        #: Deployment events (phases, progress, outcomes) for ``GET /status/events``.
        self.events = EventHub()
        self._store = StateStore(settings.state_dir)
        self._active: ModelHandle | None = None
        self._current: Deployment | None = None
        # The deployment that made the active model serve (a later failed one does not replace it).
        self._serving: Deployment | None = None
        # The event stream and span of each phase first; then the fleet reconciler, in cluster mode.
        self._listeners: list[Callable[[Deployment], None]] = [self._publish]
        self._history: deque[Deployment] = deque(maxlen=HISTORY_LENGTH)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        metrics.model_ready.set(0)

    # --- queries ---
    @property
    def active(self) -> ModelHandle | None:
        return self._active

    @property
    def current(self) -> Deployment | None:
        return self._current

    @property
    def deploying(self) -> bool:
        return self._current is not None and not self._current.finished

    def status(self) -> dict[str, Any]:
        return {
            "ready": self._active is not None,
            "serving": model_info_dict(self._active) if self._active else None,
            "deployment": self._current.as_dict() if self._current else None,
            "history": [d.as_dict() for d in reversed(self._history)],
        }

    def add_phase_listener(self, listener: Callable[[Deployment], None]) -> None:
        """Call ``listener(deployment)`` on the event loop after each phase change (terminal ones too)."""
        self._listeners.append(listener)

    # --- commands ---
    async def start(self, *, deploy: bool = True) -> None:
        """Begin serving: the model recorded by the last successful deployment, else the configured one.

        ``deploy=False`` (cluster mode) deploys nothing: the fleet reconciler calls :meth:`deploy_desired`.
        """
        if not deploy:
            return
        record = self._store.load()
        if record is None:
            self._deploy_configured()
            return
        log.info("restoring last deployed model", extra={"model_id": record.model_id})
        source = sources.classify(record.model_id, record.revision)
        self._begin(Deployment(record.model_id, record.revision, trigger="restore"), source, fallback=True)

    def _deploy_configured(self) -> None:
        """Deploy ``SERVING_MODEL`` (the operator's choice, so no allowlist or model-root check)."""
        s = self._settings
        source = sources.classify(s.model, s.revision)
        self._begin(Deployment(s.model, s.revision, trigger="startup"), source, fallback=False)

    async def deploy(self, model_id: str, revision: str | None = None) -> tuple[Deployment, bool]:
        """Start deploying ``model_id`` from an API request.

        Returns the deployment and whether one was started (False: that model already serves).
        Raises :class:`SourceError` (a 4xx) for models this server must not or cannot serve, and
        :class:`DeploymentConflictError` while another deployment runs.
        """
        source = await self.validate(model_id, revision)
        if self.deploying:
            assert self._current is not None
            raise DeploymentConflictError(self._current)
        active = self._active
        if (
            active is not None
            and active.info.model_id == source.model_id
            and active.info.revision == revision
        ):
            assert self._serving is not None
            return self._serving, False
        deployment = Deployment(source.model_id, revision, trigger="api")
        self._begin(deployment, source, fallback=False)
        return deployment, True

    async def validate(self, model_id: str, revision: str | None) -> ModelSource:
        """Where an API-requested model comes from; :class:`SourceError` (a 4xx) when the allowlist,
        the model root or the hub (or the offline cache) refuses it."""
        source = self.check_source(model_id, revision)
        if source.kind is SourceKind.HUB:
            await asyncio.to_thread(sources.check_hub_exists, source)
        return source

    def check_source(self, model_id: str, revision: str | None) -> ModelSource:
        """Like :meth:`validate` without the hub look-up (which the download itself makes)."""
        s = self._settings
        sources.check_allowed(model_id, s.allowed_models)
        source = sources.classify(model_id, revision, s.model_root)
        if source.kind is SourceKind.LOCAL:
            path = sources.check_local_path(model_id, s.model_root)
            source = ModelSource(str(path), SourceKind.LOCAL)
        return source

    def deploy_desired(self, model_id: str, revision: str | None) -> Deployment:
        """Start deploying the fleet's desired model (cluster mode); the caller ensures none is running.

        The configured ``--model`` deploys as at start-up; any other id passes this replica's own
        allowlist and model root, and a refusal ends the deployment failed with the reason.
        """
        deployment = Deployment(model_id, revision, trigger="fleet")
        configured = (model_id, revision) == (self._settings.model, self._settings.revision)
        try:
            source = (
                sources.classify(model_id, revision) if configured else self.check_source(model_id, revision)
            )
        except SourceError as exc:
            self._current = deployment
            self._history.append(deployment)
            self._fail(deployment, str(exc))
            return deployment
        self._begin(deployment, source, fallback=False)
        return deployment

    async def stop(self) -> None:
        """Interrupt a running deployment (its thread finishes in the background and is discarded)."""
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._active = None
        self._metrics.model_ready.set(0)

    # --- the state machine ---
    def _begin(self, deployment: Deployment, source: ModelSource, *, fallback: bool) -> None:
        self._current = deployment
        self._history.append(deployment)
        self._trace = DeploymentTrace(
            self._tracer,
            {
                "deployment.id": deployment.id,
                "deployment.trigger": deployment.trigger,
                "gen_ai.request.model": deployment.model_id,
                "deployment.revision": deployment.revision or "",
            },
        )
        self._enter(deployment, Phase.PENDING)
        self._task = asyncio.create_task(
            self._run(deployment, source, fallback), name=f"deploy-{deployment.id}"
        )

    async def _run(self, deployment: Deployment, source: ModelSource, fallback: bool) -> None:
        try:
            handle = await self._prepare(deployment, source)
        except asyncio.CancelledError:
            self._fail(deployment, "interrupted: the server is shutting down")
            raise
        except (
            SourceError,
            loader.LoadError,
            DeploymentInterruptedError,
            BundledModelMissingError,
        ) as exc:
            self._fail(deployment, str(exc))
        except Exception as exc:  # any other loader failure must not kill the server
            log.exception("deployment failed unexpectedly", extra={"deployment_id": deployment.id})
            self._fail(deployment, f"{type(exc).__name__}: {exc}")
        else:
            self._swap(deployment, handle)
            return
        if fallback and self._active is None and not self._stopping:
            # The recorded model no longer loads: fall back to the configured default.
            self._deploy_configured()

    async def _prepare(self, deployment: Deployment, source: ModelSource) -> ModelHandle:
        s = self._settings
        loop = asyncio.get_running_loop()
        publish_download = ProgressPublisher(self.events, loop, deployment.id, "download", "bytes")

        def on_progress(done: int, total: int | None) -> None:  # called from the download thread
            if done > deployment.bytes_done:
                self._metrics.model_download_bytes.inc(done - deployment.bytes_done)
            deployment.bytes_done, deployment.bytes_total = done, total
            publish_download(done, total)

        self._enter(deployment, Phase.DOWNLOADING if source.kind is SourceKind.HUB else Phase.RESOLVING)
        model_dir: Path = await _in_daemon_thread(
            lambda: sources.fetch(source, cache_dir=s.cache_dir, on_progress=on_progress)
        )
        device = await _in_daemon_thread(loader.resolve_device, s.device)
        dtype = loader.resolve_dtype(s.dtype, device)
        parameters = await _in_daemon_thread(loader.count_parameters, model_dir)
        loader.check_memory_budget(parameters, dtype, s.max_model_bytes)

        self._enter(deployment, Phase.LOADING)
        publish_load = ProgressPublisher(self.events, loop, deployment.id, "load", "tensors")
        handle = await _in_daemon_thread(
            lambda: loader.load(model_dir, source, device=device, dtype=dtype, on_progress=publish_load)
        )
        self._check_not_stopping()
        self._enter(deployment, Phase.WARMING)
        if s.fast_path:
            fast, handle.decode_step = await _in_daemon_thread(
                lambda: fast_path.install(handle.model, model_dir, s.cache_dir)
            )
        else:
            fast = FastPath(None, reason="turned off (SERVING_FAST_PATH=false)")
        handle.info = dataclasses.replace(handle.info, fast_path=fast)
        log.info("fast path", extra={"deployment": deployment.id, **dataclasses.asdict(fast)})
        self._track_resident(handle)
        await _in_daemon_thread(loader.warm_up, handle)
        self._check_not_stopping()
        return handle

    def _check_not_stopping(self) -> None:
        if self._stopping:
            raise DeploymentInterruptedError("interrupted: the server is shutting down")

    def _track_resident(self, handle: ModelHandle) -> None:
        """Count the model's weights as resident until it is garbage collected (also when a swap or
        a failed warm-up drops it), so the gauges show both models while one replaces the other."""
        size = loader.weight_bytes(handle)
        m = self._metrics
        m.model_weights_bytes.inc(size)
        m.models_resident.inc()
        weakref.finalize(handle.model, _untrack_resident, m, size)

    def _swap(self, deployment: Deployment, handle: ModelHandle) -> None:
        started = time.perf_counter()
        replaced = self._active is not None
        self._active, self._serving = handle, deployment
        self._enter(deployment, Phase.READY)
        info = handle.info
        m = self._metrics
        m.model_info.clear()
        m.model_info.labels(info.model_id, info.revision or "", info.dtype, info.device).set(1)
        m.model_ready.set(1)
        m.deployments.labels("succeeded").inc()
        m.model_load_duration.observe(deployment.phase_seconds["total"])
        if deployment.trigger != "fleet":  # in cluster mode the Kubernetes API holds the desired model
            self._store.save(ServedModelRecord(info.model_id, info.revision))
        if replaced:
            # Frees the old model now unless in-flight requests still hold it (then with the last one).
            gc.collect()
        m.model_swap_duration.observe(time.perf_counter() - started)

    def _fail(self, deployment: Deployment, reason: str) -> None:
        self._enter(deployment, Phase.FAILED, error=reason)
        self._metrics.deployments.labels("failed").inc()
        # The failed deployment's phase is shown, but the old model (if any) is still ready.
        self._metrics.model_ready.set(1 if self._active is not None else 0)

    def _enter(self, deployment: Deployment, phase: Phase, error: str | None = None) -> None:
        if phase is not Phase.PENDING:
            left = deployment.phase.value
            deployment.enter(phase, error)
            self._metrics.deployment_phase_duration.labels(left).observe(deployment.phase_seconds[left])
        for name in DEPLOYMENT_PHASES:
            self._metrics.deployment_phase.labels(name).set(1 if name == phase.value else 0)
        extra = {"deployment_id": deployment.id, "model_id": deployment.model_id, "phase": phase.value}
        if error:
            extra["error"] = error
        log.log(logging.WARNING if phase is Phase.FAILED else logging.INFO, "deployment phase", extra=extra)
        for listener in self._listeners:
            listener(deployment)

    def _publish(self, deployment: Deployment) -> None:
        """The phase change as an event and a span; a terminal phase also as the outcome."""
        event = deployment.as_dict()
        self.events.publish(EventType.PHASE, event)
        assert self._trace is not None  # _begin starts one per deployment
        if deployment.phase in TERMINAL_PHASES:
            self.events.publish(EventType.OUTCOME, event)
            self._trace.end(deployment.phase.value, deployment.error)
        else:
            self._trace.phase(deployment.phase.value)


def _untrack_resident(metrics: ServingMetrics, size: int) -> None:
    metrics.model_weights_bytes.dec(size)
    metrics.models_resident.dec()


def model_info_dict(handle: ModelHandle) -> dict[str, Any]:
    i = handle.info
    return {
        "model_id": i.model_id,
        "revision": i.revision,
        "source": i.source,
        "dtype": i.dtype,
        "device": i.device,
        "parameters": i.parameters,
        "context_length": i.context_length,
        "loaded_at": i.loaded_at.isoformat(),
        "fast_path": dataclasses.asdict(i.fast_path),
    }
