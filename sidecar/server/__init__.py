"""The sidecar's servers: Unix socket (protocol v1) and HTTP, over one query Service."""

from .app import DEFAULT_UDS, Sidecar, serve
from .service import Answer, Service

__all__ = ["DEFAULT_UDS", "Answer", "Service", "Sidecar", "serve"]
