"""Cluster mode: every replica converges on the desired model held in the Kubernetes API.

The desired model is one ConfigMap of the release (keys in :class:`DesiredModel`). Each replica
lists and watches it like a controller and deploys what it names with the :class:`ModelManager`
(the old model serves until the swap), publishes its own state on its Pod
(:class:`ReplicaState`), and, when it fails to deploy the model of a rollout in progress, writes
the ConfigMap back to the previous good model: a write conditional on the resourceVersion that
still names the failed rollout, so it happens once however many replicas fail together.

An unreachable API server, a broken watch or ``410 Gone`` never stop serving: the replica keeps
its model, re-lists with backoff and reports ``disconnected`` (``/status``, ``kube_api_connected``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from service.lifecycle.deployment import Deployment, Phase
from service.lifecycle.fleet_errors import FleetUnavailableError, RolloutInProgressError
from service.lifecycle.kube import TRANSPORT_ERRORS, ApiException, KubeApi
from service.lifecycle.manager import ModelManager
from service.metrics import ServingMetrics
from service.settings import Settings

log = logging.getLogger(__name__)

ROLLING_OUT, READY, ROLLED_BACK = "rolling_out", "ready", "rolled_back"
#: A rollout not converged after this long no longer blocks the next ``POST /model`` (a replica
#: that never reports, e.g. a pod stuck Pending, must not freeze the fleet's model for good).
ROLLOUT_TIMEOUT_S = 1800
#: Re-list backoff after an API error: doubles from the first to the last value.
BACKOFF_S = (0.5, 5.0)
_CONFLICT = 409
_GONE = 410

ModelKey = tuple[str, str | None]  # (model_id, revision)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class DesiredModel:
    """The desired-state ConfigMap's data: what the fleet should serve and its last rollout."""

    model_id: str
    revision: str | None = None
    previous_model_id: str | None = None
    previous_revision: str | None = None
    rollout_id: str = ""
    rollout_outcome: str = ""  # "" (as synthesized), rolling_out, ready or rolled_back
    rollout_reason: str = ""
    rollout_failed_replica: str = ""
    updated_at: str = ""

    @property
    def key(self) -> ModelKey:
        return self.model_id, self.revision

    @classmethod
    def from_data(cls, data: dict[str, str]) -> DesiredModel:
        """Parse ConfigMap data; empty strings are "none" (``revision``, ``previous_*``)."""
        fields = {name: data.get(name, "") for name in cls.__dataclass_fields__}
        for optional in ("revision", "previous_model_id", "previous_revision"):
            fields[optional] = fields[optional] or None
        return cls(**fields)

    def to_data(self) -> dict[str, str]:
        return {name: value or "" for name, value in asdict(self).items()}

    def as_dict(self) -> dict[str, Any]:
        previous = (
            {"model_id": self.previous_model_id, "revision": self.previous_revision}
            if self.previous_model_id
            else None
        )
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "rollout_id": self.rollout_id or None,
            "previous": previous,
        }


@dataclass(frozen=True)
class ReplicaState:
    """One replica's state as published in its Pod annotation (``name`` is the Pod's, not published)."""

    name: str
    model_id: str | None
    revision: str | None
    phase: str  # a deployment phase, or "unknown" for a pod that has published nothing yet
    error: str | None
    rollout_id: str
    updated_at: str

    @classmethod
    def parse(cls, name: str, annotation: str | None) -> ReplicaState:
        try:
            data = json.loads(annotation or "")
            return cls(name, **{k: data.get(k) for k in cls.__dataclass_fields__ if k != "name"})
        except (ValueError, TypeError, AttributeError):
            return cls(name, None, None, "unknown", None, "", "")

    def annotation(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "name"}, sort_keys=True)

    def converged_on(self, desired: DesiredModel) -> bool:
        return (
            (self.model_id, self.revision) == desired.key
            and self.phase == Phase.READY
            and self.rollout_id == desired.rollout_id
        )


@dataclass(frozen=True)
class Rollout:
    """The rollout of a desired model as the replicas' published states show it."""

    desired: DesiredModel
    replicas: list[ReplicaState]

    @property
    def ready(self) -> int:
        return sum(r.converged_on(self.desired) for r in self.replicas)

    @property
    def phase(self) -> str:
        if self.desired.rollout_outcome == ROLLED_BACK:
            return ROLLED_BACK
        return READY if self.replicas and self.ready == len(self.replicas) else ROLLING_OUT

    @property
    def in_progress(self) -> bool:
        """Whether a ``POST /model`` must wait: a rollout started by the API still converging."""
        d = self.desired
        if d.rollout_outcome != ROLLING_OUT or self.phase != ROLLING_OUT:
            return False
        with contextlib.suppress(ValueError):
            age = datetime.now(UTC) - datetime.fromisoformat(d.updated_at)
            return age.total_seconds() < ROLLOUT_TIMEOUT_S
        return False

    def as_dict(self) -> dict[str, Any]:
        d, ready, total = self.desired, self.ready, len(self.replicas)
        messages = {
            ROLLING_OUT: f"rolling out {ready}/{total}",
            READY: f"ready {ready}/{total}",
            ROLLED_BACK: f"rolled back to {d.model_id} ({ready}/{total} back): replica "
            f"{d.rollout_failed_replica} failed: {d.rollout_reason}",
        }
        return {
            "id": d.rollout_id or None,
            "phase": self.phase,
            "ready": ready,
            "total": total,
            "message": messages[self.phase],
            "failed_replica": d.rollout_failed_replica or None,
            "reason": d.rollout_reason or None,
        }


class FleetReconciler:
    """Keeps this replica on the fleet's desired model and answers the fleet's view and rollouts."""

    def __init__(self, settings: Settings, manager: ModelManager, metrics: ServingMetrics) -> None:
        assert settings.pod_name is not None  # Settings refuses cluster mode without it
        self._settings = settings
        self._pod = settings.pod_name
        self._manager = manager
        self._metrics = metrics
        self._api: KubeApi | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._connected = False
        self._desired: DesiredModel | None = None
        # What this replica deploys (rollout id, model), serves, and last failed to deploy.
        self._target: tuple[str, ModelKey] | None = None
        self._serving: ModelKey | None = None
        self._failed: tuple[str, ModelKey] | None = None
        self._published: ReplicaState | None = None
        self._replicas: list[ReplicaState] = []  # last successful pod list, shown while disconnected
        # When this replica first saw the current desired model, and the outcomes it counted for it.
        self._desired_seen = time.monotonic()
        self._outcomes_counted: set[str] = set()
        metrics.kube_api_connected.set(0)
        metrics.fleet_replica_converged.set(0)

    # --- lifecycle ---
    async def start(self) -> None:
        """Connect (raises on missing credentials: cluster mode without them is a configuration
        error) and start the watch and reconcile loops; the model arrives with the first list."""
        self._api = await KubeApi.connect(self._settings)
        self._manager.add_phase_listener(self._on_phase)
        self._tasks = [
            asyncio.create_task(self._watch_loop(), name="fleet-watch"),
            asyncio.create_task(self._reconcile_loop(), name="fleet-reconcile"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._api is not None:
            await self._api.close()

    @property
    def api(self) -> KubeApi:
        assert self._api is not None, "FleetReconciler.start() has not run"
        return self._api

    # --- the view and the API's rollouts ---
    async def view(self) -> dict[str, Any]:
        """The fleet as ``GET /status`` shows it under ``fleet`` (shape in the README)."""
        replicas = await self._list_replicas()
        desired = self._desired
        return {
            "desired": desired.as_dict() if desired else None,
            "rollout": Rollout(desired, replicas).as_dict() if desired else None,
            "replicas": [asdict(r) for r in replicas],
            "connection": "connected" if self._connected else "disconnected",
        }

    async def request_rollout(self, model_id: str, revision: str | None) -> bool:
        """Make ``model_id`` the fleet's desired model; False when it already is (a no-op).

        The caller has validated the model on this replica. Raises :class:`RolloutInProgressError`
        while a rollout converges or when another writer won the race (the API's 409), and
        :class:`FleetUnavailableError` when the Kubernetes API cannot be reached.
        """
        try:
            data, resource_version = await self.api.read_desired()
            current = DesiredModel.from_data(data)
            if current.key == (model_id, revision):
                return False
            rollout = Rollout(current, await self._list_replicas(strict=True))
            if rollout.in_progress:
                raise RolloutInProgressError(
                    f"fleet rollout {current.rollout_id}: {rollout.as_dict()['message']}"
                )
            desired = DesiredModel(
                model_id,
                revision,
                previous_model_id=current.model_id,
                previous_revision=current.revision,
                rollout_id=uuid.uuid4().hex[:12],
                rollout_outcome=ROLLING_OUT,
                updated_at=_now(),
            )
            await self.api.patch_desired(desired.to_data(), resource_version)
        except ApiException as exc:
            if exc.status == _CONFLICT:
                raise RolloutInProgressError(
                    "another replica changed the desired model at the same time"
                ) from exc
            raise FleetUnavailableError(f"Kubernetes API error {exc.status}: {exc.reason}") from exc
        except TRANSPORT_ERRORS as exc:
            raise FleetUnavailableError(f"the Kubernetes API cannot be reached: {exc}") from exc
        log.info("fleet rollout requested", extra={"model_id": model_id, "rollout_id": desired.rollout_id})
        self._set_desired(desired)  # the watch confirms it; the view shows it at once
        return True

    async def _list_replicas(self, *, strict: bool = False) -> list[ReplicaState]:
        """The release's replicas; on an API error the last list (``strict``: raise instead)."""
        try:
            listed = await self.api.list_replica_states()
        except (ApiException, *TRANSPORT_ERRORS):
            if strict:
                raise
            return self._replicas
        self._replicas = [ReplicaState.parse(name, annotation) for name, annotation in listed]
        return self._replicas

    # --- watching the desired model ---
    async def _watch_loop(self) -> None:
        delay = BACKOFF_S[0]
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    data, resource_version = await self.api.list_desired()
                    self._set_connected(True)
                    if data is None:
                        log.warning("the desired-state ConfigMap does not exist; waiting for it")
                    else:
                        self._set_desired(DesiredModel.from_data(data))
                async for kind, data, seen_version in self.api.watch_desired(resource_version):
                    resource_version = seen_version  # resume here when the watch ends
                    self._set_connected(True)
                    delay = BACKOFF_S[0]
                    if kind in ("ADDED", "MODIFIED"):
                        self._set_desired(DesiredModel.from_data(data))
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == _GONE:  # our resourceVersion was compacted away: start over
                    log.info("watch expired (410 Gone); re-listing the desired model")
                    resource_version = None
                    continue
                self._on_api_error(exc)
            except Exception as exc:  # connection refused/reset, timeouts, a malformed stream
                self._on_api_error(exc)
            else:
                continue  # the API server ended the watch: resume from the last resourceVersion
            resource_version = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    def _on_api_error(self, exc: BaseException) -> None:
        if self._connected:
            log.warning("lost the Kubernetes API; serving on, re-listing", extra={"error": repr(exc)})
        self._set_connected(False)

    def _set_connected(self, connected: bool) -> None:
        if connected and not self._connected:
            self._wake.set()  # publish what could not be published while disconnected
        self._connected = connected
        self._metrics.kube_api_connected.set(1 if connected else 0)

    def _set_desired(self, desired: DesiredModel) -> None:
        old = self._desired
        if desired == old:
            return
        self._desired = desired
        if old is None or (old.rollout_id, old.key) != (desired.rollout_id, desired.key):
            self._failed = None  # a new desired model: a failure of the old one no longer applies
            self._desired_seen, self._outcomes_counted = time.monotonic(), set()
            log.info("desired model", extra={"model_id": desired.model_id, "rollout_id": desired.rollout_id})
        m = self._metrics.fleet_desired_model_info
        m.clear()
        m.labels(desired.model_id, desired.revision or "", desired.rollout_id).set(1)
        if desired.rollout_outcome == ROLLED_BACK:
            self._count_rollout(ROLLED_BACK)
        self._wake.set()

    # --- converging on it ---
    def _on_phase(self, deployment: Deployment) -> None:
        if deployment.trigger != "fleet" or self._target is None:
            return
        if deployment.phase is Phase.READY:
            self._serving = self._target[1]
        elif deployment.phase is Phase.FAILED:
            self._failed = self._target
        self._wake.set()

    async def _reconcile_loop(self) -> None:
        delay = BACKOFF_S[0]
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._reconcile()
            except Exception as exc:  # the model keeps serving, and this loop must not die: retry later
                unexpected = not isinstance(exc, (ApiException, *TRANSPORT_ERRORS))
                log.warning("reconciling failed; retrying", extra={"error": repr(exc)}, exc_info=unexpected)
                asyncio.get_running_loop().call_later(delay, self._wake.set)
                delay = min(delay * 2, BACKOFF_S[1])
            else:
                delay = BACKOFF_S[0]

    async def _reconcile(self) -> None:
        desired = self._desired
        if desired is None:
            return
        wanted = (desired.rollout_id, desired.key)
        converged = self._serving == desired.key and not self._manager.deploying
        self._metrics.fleet_replica_converged.set(1 if converged else 0)
        if not self._manager.deploying and not converged and self._failed != wanted:
            self._target = wanted
            self._manager.deploy_desired(*desired.key)  # its phase changes wake this loop again
        await self._publish(desired, converged)
        if self._failed == wanted and desired.rollout_outcome == ROLLING_OUT and desired.previous_model_id:
            await self._roll_back(desired)
        elif converged and desired.rollout_outcome != ROLLED_BACK:
            self._count_rollout(READY)
            if desired.rollout_outcome == ROLLING_OUT:
                await self._mark_ready(desired)

    async def _publish(self, desired: DesiredModel, converged: bool) -> None:
        deployment = self._manager.current
        if converged:
            state = ReplicaState(self._pod, *desired.key, Phase.READY.value, None, desired.rollout_id, "")
        elif deployment is not None and deployment.trigger == "fleet" and self._target is not None:
            state = ReplicaState(
                self._pod,
                deployment.model_id,
                deployment.revision,
                deployment.phase.value,
                deployment.error,
                self._target[0],
                "",
            )
        else:
            return
        if self._published is not None and replace(self._published, updated_at="") == state:
            return
        state = replace(state, updated_at=_now())
        await self.api.publish_replica_state(state.annotation())
        self._published = state

    async def _roll_back(self, failed: DesiredModel) -> None:
        """Write the desired model back to the previous good one, once for the whole fleet."""
        deployment = self._manager.current
        reason = (deployment.error if deployment else None) or "deployment failed"
        while True:
            data, resource_version = await self.api.read_desired()
            current = DesiredModel.from_data(data)
            still_failing = (current.rollout_id, current.key, current.rollout_outcome) == (
                failed.rollout_id,
                failed.key,
                ROLLING_OUT,
            )
            if not (still_failing and current.previous_model_id):
                return  # another replica rolled it back first, or a new rollout replaced it
            rolled_back = replace(
                current,
                model_id=current.previous_model_id,
                revision=current.previous_revision,
                previous_model_id=None,
                previous_revision=None,
                rollout_outcome=ROLLED_BACK,
                rollout_reason=reason,
                rollout_failed_replica=self._pod,
                updated_at=_now(),
            )
            try:
                await self.api.patch_desired(rolled_back.to_data(), resource_version)
            except ApiException as exc:
                if exc.status == _CONFLICT:
                    continue  # changed meanwhile: look again
                raise
            log.warning(
                "fleet rolled back",
                extra={"rollout_id": failed.rollout_id, "model_id": failed.model_id, "error": reason},
            )
            self._set_desired(rolled_back)
            return

    async def _mark_ready(self, desired: DesiredModel) -> None:
        """Record ``ready`` in the ConfigMap once every replica serves the rollout's model.

        Best effort: the fleet view computes the same from the replicas' states, so a lost race
        (another replica wrote first, or converged after this look) changes nothing it shows."""
        if Rollout(desired, await self._list_replicas(strict=True)).phase != READY:
            return
        data, resource_version = await self.api.read_desired()
        if DesiredModel.from_data(data) != desired:
            return
        with contextlib.suppress(ApiException):
            await self.api.patch_desired(
                replace(desired, rollout_outcome=READY, updated_at=_now()).to_data(), resource_version
            )

    def _count_rollout(self, outcome: str) -> None:
        """Count the current desired model's rollout once per outcome (and time it when ready)."""
        if outcome in self._outcomes_counted:
            return
        self._outcomes_counted.add(outcome)
        self._metrics.fleet_rollouts.labels(outcome).inc()
        if outcome == READY:
            self._metrics.fleet_rollout_duration.observe(time.monotonic() - self._desired_seen)
