"""Service-level limits shared by the dashboard thresholds and the alert rules, so a line on a panel
and the alert that pages on it always agree.
"""

#: Share of 5xx responses: yellow on the dashboard above the warning, alert above the critical.
ERROR_RATIO_WARNING = 0.01
ERROR_RATIO_CRITICAL = 0.05

#: p95 latency objective of the generation routes (a full, non-streamed completion on CPU).
LATENCY_SLO_S = 30.0

#: Time to first token above which a user notices the wait.
TIME_TO_FIRST_TOKEN_WARNING_S = 2.0

#: Requests waiting for a batch slot, per replica, that count as a saturated queue.
QUEUE_WAITING_WARNING = 16

#: Share of the engine's request latency spent waiting for a batch slot above which the replica is
#: short of capacity (requests are slow because queued, not because decoding is slow).
QUEUE_TIME_SHARE_WARNING = 0.5

#: A process younger than this has restarted recently (uptime panel turns green after it).
RECENT_RESTART_S = 300

#: How long a replica may stay without a ready model (start-up downloads included) before paging.
MODEL_NOT_READY_FOR = "10m"

#: Cluster mode: a replica not serving the fleet's desired model for this long is a stuck rollout (a
#: rollout is a download and a load per replica, rolled back together when one replica fails).
ROLLOUT_STUCK_FOR = "10m"

#: Cluster mode: how long a replica may lose its watch of the Kubernetes API before paging (it keeps
#: serving, but misses rollouts until it reconnects).
KUBE_API_DISCONNECTED_FOR = "5m"
