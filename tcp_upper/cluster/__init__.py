"""Several tcp_upper servers behind HAProxy: the shape that runs past one process or machine.

``python -m tcp_upper.cluster`` (or ``tcp-upper-cluster``) starts N servers on loopback
back-end ports and HAProxy in front of them on the configured host and port, waits until
everything accepts connections, then supervises. The parts:

- :mod:`.render`: the HAProxy configuration, from the ``haproxy.cfg.in`` template shipped here
  (``deploy/haproxy.cfg`` is its rendering with the defaults, and a test keeps the two equal);
- :mod:`.supervisor`: the processes (:class:`Cluster`);
- :mod:`.cli`: the command line.

The servers run with ``--proxy-protocol``: HAProxy tells them each client's real address, and
its health checks (PROXY v2 ``LOCAL``) stay out of their INFO log. See docs/CLUSTER.md.
"""

from .render import (
    BACKEND_HOST,
    BACKEND_NAME,
    DEFAULT_INSTANCES,
    DEFAULT_MAXCONN,
    FRONTEND_NAME,
    HealthCheck,
    default_backends,
    parse_backend,
    proxy_idle_timeout,
    render_haproxy_config,
)
from .supervisor import Cluster, ClusterError, Instance, bind_front, find_haproxy

__all__ = [
    "BACKEND_HOST",
    "BACKEND_NAME",
    "DEFAULT_INSTANCES",
    "DEFAULT_MAXCONN",
    "FRONTEND_NAME",
    "Cluster",
    "ClusterError",
    "HealthCheck",
    "Instance",
    "bind_front",
    "default_backends",
    "find_haproxy",
    "parse_backend",
    "proxy_idle_timeout",
    "render_haproxy_config",
]
