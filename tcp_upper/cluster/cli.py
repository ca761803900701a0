"""``python -m tcp_upper.cluster`` (console script ``tcp-upper-cluster``): the command line.

Settings, logging and signals around :class:`~tcp_upper.cluster.supervisor.Cluster`: it starts
the cluster, prints where to connect, supervises until SIGINT/SIGTERM and stops every child.
Exit status: 0 stopped by a signal, 1 cannot run, 2 bad settings.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from .. import __version__, config
from ..cli_es import SpanishArgumentParser
from ..errors import SettingsError
from ..system import format_address
from .render import DEFAULT_INSTANCES, default_backends, parse_backend, render_haproxy_config
from .supervisor import Cluster, ClusterError, find_haproxy, log, relay_log

#: How often the supervisor looks at its children.
POLL_SECONDS = 0.2


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tcp_upper.cluster``."""
    parser = SpanishArgumentParser(
        prog="tcp-upper-cluster",
        description="Arranca varias instancias del servidor de mayúsculas detrás de HAProxy, "
        "en esta máquina, y las vigila hasta Ctrl-C o SIGTERM. Conecte los clientes a "
        "--host/--port.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="muestra la versión del programa y termina")
    config.add_arguments(parser, CLUSTER_SETTINGS)
    parser.add_argument(
        "--instances", type=int, default=DEFAULT_INSTANCES, metavar="N",
        help=f"instancias locales del servidor (por defecto: {DEFAULT_INSTANCES})",
    )
    parser.add_argument(
        "--base-port", type=int, default=None, metavar="PUERTO",
        help="puerto de la primera instancia, las demás siguen (por defecto: --port + 1; "
        "0 = cualquiera libre)",
    )
    parser.add_argument(
        "--backend", action="append", default=[], metavar="HOST:PUERTO",
        help="otro servidor tcp_upper (p. ej. en otra máquina) que HAProxy también reparte; "
        "se puede repetir",
    )
    parser.add_argument(
        "--haproxy", metavar="RUTA",
        help="ejecutable de HAProxy (por defecto: haproxy del PATH, /usr/sbin o /usr/local/sbin)",
    )
    parser.add_argument(
        "--restart", action="store_true",
        help="reinicia una instancia que termine (esperas de 1 s que se doblan hasta 30 s)",
    )
    parser.add_argument(
        "--tls-cert", metavar="PEM",
        help="HAProxy atiende a los clientes con TLS usando este fichero PEM (certificado y "
        "clave juntos); los clientes conectan con --tls",
    )
    parser.add_argument(
        "--print-config", action="store_true",
        help="solo escribe la configuración de HAProxy resultante en la salida estándar",
    )
    return parser


CLUSTER_SETTINGS = ("host", "port", "idle_timeout", "log_level")


def _resolve_base_port(args: argparse.Namespace, front_port: int) -> int:
    instances = args.instances
    if instances < 0 or instances > 64:
        raise SettingsError(
            f"valor no válido {instances} para --instances: debe estar entre 0 y 64"
        )
    base = args.base_port if args.base_port is not None else (front_port + 1 if front_port else 0)
    if base != 0 and not 1 <= base <= 65536 - instances:
        raise SettingsError(
            f"valor no válido {base} para --base-port: las {instances} instancias necesitan "
            f"puertos hasta {base + instances - 1}, y el máximo es 65535"
        )
    if base and front_port and base <= front_port < base + instances:
        raise SettingsError(
            f"--base-port {base} con {instances} instancias incluye el puerto de entrada "
            f"{front_port}; elija otro"
        )
    return base


def configure_logging(level: str) -> None:
    """Own lines with a timestamp; children's lines relayed as they are (they have theirs)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
        force=True,
    )
    relay = logging.StreamHandler(sys.stderr)
    relay.setFormatter(logging.Formatter("%(message)s"))
    relay_log.handlers[:] = [relay]
    relay_log.propagate = False
    relay_log.setLevel(logging.INFO)


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[
        argparse.Namespace, config.Settings, int, list[tuple[str, int]]]:
    """Arguments, settings, base port and extra back ends; a bad one exits 2 with one line."""
    args = parser.parse_args(argv)
    try:
        settings = config.load_settings(args, CLUSTER_SETTINGS)
        base_port = _resolve_base_port(args, settings.port)
        extra = [parse_backend(text) for text in args.backend]
    except (SettingsError, ValueError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if args.instances == 0 and not extra:
        parser.exit(2, f"{parser.prog}: error: --instances 0 sin --backend: nada que repartir\n")
    if args.tls_cert is not None and not args.print_config and not Path(
            args.tls_cert).is_file():
        parser.exit(2, f"{parser.prog}: error: --tls-cert: no existe el fichero "
                       f"{args.tls_cert!r}\n")
    return args, settings, base_port, extra


def main(argv: list[str] | None = None) -> int:
    """``python -m tcp_upper.cluster``: 0 stopped by a signal, 1 cannot run, 2 bad settings."""
    parser = build_parser()
    args, settings, base_port, extra = _parse(parser, argv)
    if args.print_config:
        local = default_backends(base_port or 5001, args.instances)
        sys.stdout.write(render_haproxy_config(
            settings.host, settings.port, local + extra, idle_timeout=settings.idle_timeout,
            tls_cert=args.tls_cert,
        ))
        return 0
    configure_logging(settings.log_level)
    haproxy = find_haproxy(args.haproxy)
    if haproxy is None:
        log.error(
            "No se encuentra HAProxy (%s): instálelo (apt-get install haproxy) o indique su "
            "ruta con --haproxy", args.haproxy or "haproxy",
        )
        return 1
    cluster = Cluster(
        settings.host, settings.port, haproxy=haproxy, instances=args.instances,
        base_port=base_port, extra_backends=extra, idle_timeout=settings.idle_timeout,
        log_level=settings.log_level, env_file=args.env_file, restart=args.restart,
        tls_cert=args.tls_cert,
    )
    return run(cluster)


def run(cluster: Cluster) -> int:
    """Start *cluster*, say where to connect, supervise until SIGINT/SIGTERM, stop it."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        cluster.request_stop()
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster.start()
        ports = ", ".join(f"{i.name}={i.port}" for i in cluster.instances)
        extra = "".join(f", {format_address(b)}" for b in cluster.extra_backends)
        log.info("HAProxy (PID %d) reparte entre %d servidores (%s%s); estado: echo 'show stat' "
                 "| socat stdio unix-connect:%s", cluster.haproxy_pid,
                 len(cluster.instances) + len(cluster.extra_backends), ports, extra,
                 cluster.stats_socket)
        # Where to connect goes to stdout at any log level, like http.server's "Serving on".
        tls = " --tls" if cluster.tls_cert else ""
        print(f"Cluster escuchando en {format_address((cluster.front_host, cluster.front_port))}"
              f"{' con TLS' if tls else ''}: conecte con  python -m tcp_upper.client --host "
              f"{cluster.front_host} --port {cluster.front_port}{tls}  (Ctrl-C para parar)",
              flush=True)
        while not stop.wait(POLL_SECONDS):
            cluster.supervise()
        log.info("Parando el cluster")
        return 0
    except ClusterError as exc:
        if stop.is_set():  # Ctrl-C while starting also stops the children: not a failure
            log.info("Parando el cluster")
            return 0
        log.error("%s", exc)
        return 1
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
