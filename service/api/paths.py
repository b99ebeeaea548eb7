"""URL paths the server answers; the Kubernetes constructs take probe and scrape paths from here."""

COMPLETION = "/completion"
STATUS = "/status"
#: A small JSON summary of the load (tokens/s, running/queued, TTFT p95) for the web console.
STATUS_LOAD = "/status/load"
STATUS_EVENTS = "/status/events"
MODEL = "/model"
METRICS = "/metrics"
HEALTHZ = "/healthz"
READYZ = "/readyz"
OPENAPI = "/openapi.json"
OPENAI_CHAT_COMPLETIONS = "/v1/chat/completions"
OPENAI_MODELS = "/v1/models"
OPENAI_COMPLETIONS = "/v1/completions"
TOKENIZE = "/tokenize"
DETOKENIZE = "/detokenize"

#: Name of the container/Service port that carries all of the above.
HTTP_PORT_NAME = "http"
