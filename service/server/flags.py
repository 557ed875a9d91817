"""Keys the server sets in what the app sees: a request it timed out, a drain under way."""

from __future__ import annotations

# Set in a request's scope when the server (service.server.protocol) answered 408 itself because the body
# came too slowly: the app's own answer then went to a closed connection, and is not what the client got.
TIMED_OUT = "encoding_service.timed_out"


# Set in the app's state by the server (service.server.protocol.DrainingServer) once SIGTERM has started its
# drain: the readiness endpoints answer 503 from then on.
DRAINING = "draining"


# Set in a request's scope by the route that resolved its model (service.api.served): the Served
# that answers, whose name and version go into the response's headers and the access log line.
ANSWERED = "encoding_service.answered"
