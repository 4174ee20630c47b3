"""The sidecar's servers: Unix socket (protocol v1) and HTTP, over one query layer."""

from .app import DEFAULT_UDS, ServerOptions, Sidecar, serve
from .queries import Queries
from .results import Result, settle

__all__ = ["DEFAULT_UDS", "Queries", "Result", "ServerOptions", "Sidecar", "serve", "settle"]
