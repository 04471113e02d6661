"""Serving pruned variants: the KV-cache server and the throughput measurement.

    from dpjax import serve
    server = serve.Server(model, keep=keep)
"""

from dpjax.serve.server import Server

__all__ = ["Server"]
