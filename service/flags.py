"""Keys the server sets in what the app sees: a request it timed out, a drain under way."""

from __future__ import annotations

# Set in a request's scope when the server (service.server) answered 408 itself because the body
# came too slowly: the app's own answer then went to a closed connection, and is not what the client got.
TIMED_OUT = "encoding_service.timed_out"


# Set in the app's state by the server (service.server.DrainingServer) once SIGTERM has started its
# drain: the readiness endpoints answer 503 from then on.
DRAINING = "draining"
