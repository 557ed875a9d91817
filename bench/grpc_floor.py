"""The floor for gRPC: grpc.aio, as the service runs it, with one handler that answers every unary
call at once with an empty message (no model, no log, no metrics). What a call costs here is what
grpc.aio itself costs on this machine: bench/infer_grpc.py measures the service against it.

    python bench/grpc_floor.py PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc


async def empty(request: bytes, context: Any) -> bytes:
    return b""


class Everything(grpc.GenericRpcHandler):
    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(empty)


async def main(port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Everything(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
