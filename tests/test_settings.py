"""Settings (docs/PROTOCOL.md §3): flag > environment > env file > default, with clear errors.

Most tests call ``config.load_settings`` in-process with an explicit ``environ`` and ``cwd`` (so
neither the real environment nor the real working directory matters), on namespaces parsed by the
programs' own ``cli.build_parser``. The last part runs the real programs in an empty directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import DEADLINE, ServerProcess, clean_env, connect, recv_exactly

from tcp_upper import __version__, cli, config
from tcp_upper.config import Settings
from tcp_upper.errors import SettingsError

REPO = Path(__file__).resolve().parent.parent

#: The settings of docs/PROTOCOL.md §3, with one valid value per source (flag, environment, file)
#: and what each resolves to. None of them is the default.
SOURCES: dict[str, tuple[tuple[str, Any], tuple[str, Any], tuple[str, Any]]] = {
    "host": (("flag.example", "flag.example"), ("env.example", "env.example"),
             ("file.example", "file.example")),
    "port": (("1111", 1111), ("2222", 2222), ("3333", 3333)),
    "max_clients": (("11", 11), ("22", 22), ("33", 33)),
    "idle_timeout": (("1.5", 1.5), ("2.5", 2.5), ("3.5", 3.5)),
    "write_timeout": (("4", 4.0), ("5.5", 5.5), ("6", 6.0)),
    "log_level": (("DEBUG", "DEBUG"), ("warning", "WARNING"), ("Error", "ERROR")),
    "timeout": (("0.5", 0.5), ("7", 7.0), ("8", 8.0)),
    # Switches take no value on the command line (None): giving the flag means yes.
    "tls": ((None, True), ("no", False), ("sí", True)),
    "tls_insecure": ((None, True), ("0", False), ("true", True)),
    "cafile": (("flag.pem", "flag.pem"), ("env.pem", "env.pem"), ("file.pem", "file.pem")),
}


def names_for(name: str) -> tuple[str, ...]:
    """The settings of the program that has *name*: the server's, or the client's."""
    return config.SERVER_SETTINGS if name in config.SERVER_SETTINGS else config.CLIENT_SETTINGS


def parse(argv: list[str], names: tuple[str, ...] = config.SERVER_SETTINGS) -> Any:
    return cli.build_parser("prueba", "prueba", names).parse_args(argv)


def load(argv: list[str], environ: dict[str, str], cwd: Path,
         names: tuple[str, ...] = config.SERVER_SETTINGS) -> Settings:
    return config.load_settings(parse(argv, names), names, environ=environ, cwd=cwd)


def write_env(directory: Path, text: str, name: str = "config.env") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_spec_settings_are_covered():
    assert set(SOURCES) <= set(config.SERVER_SETTINGS) | set(config.CLIENT_SETTINGS)
    assert "timeout" in config.CLIENT_SETTINGS
    assert {"host", "port", "log_level"} <= set(config.CLIENT_SETTINGS)


# --- precedence --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("given", ["flag+env+file", "env+file", "file", "nothing"])
def test_precedence(name, given, tmp_path):
    (flag, flag_value), (env, env_value), (file, file_value) = SOURCES[name]
    variable = config.variable_for(name)
    argv = [config.flag_for(name), flag] if "flag" in given else []
    if flag is None:
        argv = argv[:1]
    environ = {variable: env} if "env" in given else {}
    if "file" in given:
        write_env(tmp_path, f"{variable}={file}\n")
    expected = {
        "flag+env+file": flag_value, "env+file": env_value, "file": file_value,
        "nothing": getattr(Settings(), name),
    }[given]
    settings = load(argv, environ, tmp_path, names_for(name))
    assert getattr(settings, name) == expected


def test_defaults(tmp_path):
    settings = load([], {}, tmp_path)
    assert (settings.host, settings.port, settings.log_level) == ("localhost", 5000, "INFO")
    assert settings.idle_timeout is None  # off
    assert 0 < settings.write_timeout <= 60
    assert settings.max_clients >= 4096
    assert load([], {}, tmp_path, config.CLIENT_SETTINGS).timeout > 0


def test_settings_are_frozen(tmp_path):
    settings = load([], {}, tmp_path)
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


# --- env files ---------------------------------------------------------------------------------


def test_env_file_flag_is_read_instead_of_config_env(tmp_path):
    write_env(tmp_path, "TCP_UPPER_PORT=1111\n")
    other = write_env(tmp_path, "TCP_UPPER_PORT=2222\n", name="other.env")
    assert load(["--env-file", "other.env"], {}, tmp_path).port == 2222
    assert load(["--env-file", str(other)], {}, tmp_path).port == 2222  # absolute path too


def test_env_file_flag_replaces_config_env_entirely(tmp_path):
    write_env(tmp_path, "TCP_UPPER_HOST=desde-config-env\nTCP_UPPER_PORT=1111\n")
    write_env(tmp_path, "TCP_UPPER_PORT=2222\n", name="other.env")
    settings = load(["--env-file", "other.env"], {}, tmp_path)
    assert (settings.host, settings.port) == ("localhost", 2222)


def test_dot_env_is_not_read(tmp_path):
    # python-dotenv's own habit is a ".env" file; tcp_upper reads config.env only.
    write_env(tmp_path, "TCP_UPPER_PORT=1111\n", name=".env")
    assert load([], {}, tmp_path).port == 5000


def test_missing_env_file_flag_is_an_error(tmp_path):
    with pytest.raises(SettingsError) as caught:
        load(["--env-file", "nope.env"], {}, tmp_path)
    assert "--env-file" in str(caught.value)
    assert "nope.env" in str(caught.value)


def test_config_env_absent_is_fine(tmp_path):
    assert load([], {}, tmp_path) == Settings()


def test_config_env_with_comments_quotes_and_export(tmp_path):
    write_env(tmp_path, (
        "# Ajustes de prueba\n"
        "\n"
        'TCP_UPPER_HOST="127.0.0.2"   # comentario al final\n'
        "TCP_UPPER_PORT='4321'\n"
        "export TCP_UPPER_LOG_LEVEL=warning\n"
        "TCP_UPPER_MAX_CLIENTS=\n"
        "# TCP_UPPER_IDLE_TIMEOUT=99\n"
        "OTRA_COSA=ignorada\n"
    ))
    settings = load([], {}, tmp_path)
    assert settings.host == "127.0.0.2"
    assert settings.port == 4321
    assert settings.log_level == "WARNING"
    assert settings.max_clients == Settings().max_clients
    assert settings.idle_timeout is None


def test_env_file_does_not_leak_into_the_environment(tmp_path):
    write_env(tmp_path, "TCP_UPPER_PORT=4321\nTCP_UPPER_SOMETHING=x\n")
    before = dict(os.environ)
    assert load([], {}, tmp_path).port == 4321
    assert dict(os.environ) == before


def test_repository_config_env_resolves_to_localhost_5000():
    if not (REPO / "config.env").is_file():
        pytest.skip("config.env is not in the repository yet")
    for names in (config.SERVER_SETTINGS, config.CLIENT_SETTINGS):
        settings = load([], {}, REPO, names)
        assert (settings.host, settings.port) == ("localhost", 5000)


# --- empty values and zero ---------------------------------------------------------------------


def test_empty_environment_value_falls_through_to_the_file(tmp_path):
    write_env(tmp_path, "TCP_UPPER_PORT=3333\n")
    assert load([], {"TCP_UPPER_PORT": ""}, tmp_path).port == 3333


def test_empty_values_everywhere_fall_through_to_the_default(tmp_path):
    write_env(tmp_path, "TCP_UPPER_PORT=\nTCP_UPPER_HOST=''\n")
    settings = load([], {"TCP_UPPER_PORT": "", "TCP_UPPER_HOST": ""}, tmp_path)
    assert (settings.host, settings.port) == ("localhost", 5000)


@pytest.mark.parametrize("source", ["flag", "env", "file"])
@pytest.mark.parametrize("zero", ["0", "0.0"])
def test_idle_timeout_zero_is_off(source, zero, tmp_path):
    # Another source below it says 5: zero must win and mean "off", not fall through.
    write_env(tmp_path, f"TCP_UPPER_IDLE_TIMEOUT={zero if source == 'file' else '5'}\n")
    argv = ["--idle-timeout", zero] if source == "flag" else []
    environ = {"TCP_UPPER_IDLE_TIMEOUT": zero} if source == "env" else {}
    assert load(argv, environ, tmp_path).idle_timeout is None


def test_port_zero_means_any_free_port(tmp_path):
    assert load(["--port", "0"], {}, tmp_path).port == 0


# --- bad values --------------------------------------------------------------------------------

BAD_VALUES = [
    ("port", "abc"), ("port", "70000"), ("port", "-1"), ("port", "1.5"),
    ("max_clients", "abc"), ("max_clients", "-1"), ("max_clients", "0"),
    ("idle_timeout", "-1"), ("idle_timeout", "nan"), ("idle_timeout", "inf"),
    ("idle_timeout", "abc"),
    ("write_timeout", "0"), ("write_timeout", "-1"), ("write_timeout", "nan"),
    ("write_timeout", "inf"),
    ("timeout", "0"), ("timeout", "-1"), ("timeout", "nan"), ("timeout", "inf"),
    ("timeout", "abc"),
    ("log_level", "LOUD"), ("log_level", "5"),
    ("host", "dos palabras"),
    # Integers and seconds are ASCII digits: int() and float() would take all of these.
    ("port", "5_000"), ("port", "\u0665\u0660\u0660\u0660"), ("port", "50 00"),
    ("port", "+5000"), ("max_clients", "1_0"), ("workers", "\uff12"),
    ("timeout", "1_0"), ("timeout", "\u0665"), ("timeout", "+5"), ("idle_timeout", "1 5"),
    ("tls", "quizá"), ("tls_insecure", "2"),
]


def _where(source: str, name: str) -> list[str]:
    """Words a message must contain to say where a bad value came from."""
    return {
        "flag": [config.flag_for(name), "línea de órdenes"],
        "env": [config.variable_for(name), "entorno"],
        "file": [config.variable_for(name), "config.env"],
        "env-file": [config.variable_for(name), "mis-ajustes.env"],
    }[source]


@pytest.mark.parametrize(("name", "bad", "source"), [
    (name, bad, source) for name, bad in BAD_VALUES
    for source in ("flag", "env", "file", "env-file")
    if not (source == "flag" and name in config.SWITCHES)  # a switch flag takes no value
])
def test_bad_value_names_setting_value_and_source(name, bad, source, tmp_path):
    variable = config.variable_for(name)
    argv = [config.flag_for(name), bad] if source == "flag" else []
    environ = {variable: bad} if source == "env" else {}
    if source == "file":
        write_env(tmp_path, f"{variable}={bad}\n")
    if source == "env-file":
        write_env(tmp_path, f"{variable}={bad}\n", name="mis-ajustes.env")
        argv = ["--env-file", "mis-ajustes.env"]
    with pytest.raises(SettingsError) as caught:
        load(argv, environ, tmp_path, names_for(name))
    message = str(caught.value)
    assert "\n" not in message
    assert repr(bad) in message or f'"{bad}"' in message
    for word in _where(source, name):
        assert word in message


def test_client_port_0_is_refused(tmp_path):
    with pytest.raises(SettingsError) as caught:
        load(["--port", "0"], {}, tmp_path, config.CLIENT_SETTINGS)
    assert "entre 1 y 65535" in str(caught.value)


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("sí", True), ("SI", True), ("yes", True), ("On", True), ("true", True),
    ("0", False), ("no", False), ("NO", False), ("false", False), ("off", False),
])
def test_switch_values(text, value, tmp_path):
    assert load([], {"TCP_UPPER_TLS": text}, tmp_path, config.CLIENT_SETTINGS).tls is value


def test_cafile_or_insecure_imply_tls():
    assert not Settings().use_tls
    assert Settings(tls=True).use_tls
    assert Settings(cafile="ca.pem").use_tls
    assert Settings(tls_insecure=True).use_tls


def test_public_parsers_for_other_programs():
    # bench and others reuse them: same rules, same messages.
    assert config.parse_int(1, 10)(" 7 ") == 7
    with pytest.raises(ValueError, match="entre 1 y 10"):
        config.parse_int(1, 10)("1_0")
    assert config.parse_seconds("1.5", zero_is_off=False) == 1.5
    assert config.parse_seconds("2e3", zero_is_off=False) == 2000.0
    assert config.parse_seconds("0", zero_is_off=True) is None
    with pytest.raises(ValueError):
        config.parse_seconds("0", zero_is_off=False)


def test_env_file_may_be_a_pipe(tmp_path):
    read_end, write_end = os.pipe()
    os.write(write_end, b"TCP_UPPER_PORT=6000\n")
    os.close(write_end)
    try:
        assert load(["--env-file", f"/dev/fd/{read_end}"], {}, tmp_path).port == 6000
    finally:
        os.close(read_end)


def test_env_file_that_exists_but_cannot_be_read(tmp_path):
    (tmp_path / "carpeta.env").mkdir()
    with pytest.raises(SettingsError) as caught:
        load(["--env-file", "carpeta.env"], {}, tmp_path)
    assert "no se puede leer" in str(caught.value) and "carpeta.env" in str(caught.value)
    assert "no existe" not in str(caught.value)


def test_env_file_that_is_not_utf8(tmp_path):
    (tmp_path / "config.env").write_bytes(b"TCP_UPPER_HOST=\xff\n")
    with pytest.raises(SettingsError) as caught:
        load([], {}, tmp_path)
    assert "config.env" in str(caught.value) and "UTF-8" in str(caught.value)


def test_empty_host_flag_is_rejected(tmp_path):
    with pytest.raises(SettingsError) as caught:
        load(["--host", ""], {}, tmp_path)
    assert "--host" in str(caught.value)


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)


# --- the real programs -------------------------------------------------------------------------

PROGRAMS = ["tcp_upper.server", "tcp_upper.client"]


def run(module: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a program to completion (killed after DEADLINE); stdin is empty."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL, capture_output=True,
        text=True, encoding="utf-8", errors="replace", cwd=cwd, env=clean_env(**env),
        timeout=DEADLINE,
    )


@pytest.mark.parametrize("module", PROGRAMS)
def test_help(module, tmp_path):
    result = run(module, "--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("--host", "--port", "--env-file", "--log-level", "--version"):
        assert flag in result.stdout
    assert ("--timeout" in result.stdout) == (module == "tcp_upper.client")
    assert ("--max-clients" in result.stdout) == (module == "tcp_upper.server")


@pytest.mark.parametrize("module", PROGRAMS)
def test_version(module, tmp_path):
    result = run(module, "--version", cwd=tmp_path)
    assert result.returncode == 0
    assert __version__ in result.stdout


def assert_one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in result.stderr
    assert "escuchando" not in result.stderr  # stopped before binding


@pytest.mark.parametrize("module", PROGRAMS)
def test_bad_port_in_the_environment_exits_2(module, tmp_path):
    result = run(module, cwd=tmp_path, TCP_UPPER_PORT="abc")
    assert_one_error_line(result, "TCP_UPPER_PORT", "abc")


@pytest.mark.parametrize("module", PROGRAMS)
def test_bad_port_in_config_env_exits_2(module, tmp_path):
    write_env(tmp_path, "TCP_UPPER_PORT=70000\n")
    result = run(module, cwd=tmp_path)
    assert_one_error_line(result, "TCP_UPPER_PORT", "70000", "config.env")


@pytest.mark.parametrize("module", PROGRAMS)
def test_bad_port_flag_exits_2(module, tmp_path):
    result = run(module, "--port", "70000", cwd=tmp_path)
    assert_one_error_line(result, "--port", "70000")


@pytest.mark.parametrize("module", PROGRAMS)
def test_missing_env_file_exits_2(module, tmp_path):
    # --port 0 keeps the test hermetic even if the file were wrongly ignored.
    result = run(module, "--env-file", "nope.env", "--port", "0", cwd=tmp_path)
    assert_one_error_line(result, "nope.env")


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory for a server started with exactly the given arguments (no --port added)."""
    started: list[ServerProcess] = []

    def start(*args: str, cwd: Path = tmp_path) -> ServerProcess:
        process = ServerProcess(list(args), cwd, clean_env())
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()



# --- values the settings accept must work -------------------------------------------------------
# Regression: 1e10 s overflowed socket.settimeout() in the client (traceback, exit 1) and 1e19 s
# overflowed struct.pack("@ll") in the server's handler (every connection dropped).


def test_huge_client_timeout_is_refused_or_works(server_process, tmp_path):
    process = server_process("--host", "127.0.0.1", "--port", "0")
    port = process.wait_listening()
    result = subprocess.run(
        [sys.executable, "-m", "tcp_upper.client", "--host", "127.0.0.1", "--port", str(port),
         "--timeout", "1e10"],
        input="hola\n", capture_output=True, text=True, encoding="utf-8", cwd=tmp_path,
        env=clean_env(), timeout=DEADLINE,
    )
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 2:  # refused at start, like any bad value
        assert_one_error_line(result, "--timeout", "1e10")
    else:
        assert result.returncode == 0, result.stderr
        assert "Servidor responde: HOLA" in result.stdout


@pytest.mark.parametrize("flag", ["--idle-timeout", "--write-timeout"])
def test_huge_server_timeout_is_refused_or_works(flag, server_process):
    process = server_process("--host", "127.0.0.1", "--port", "0", flag, "1e19")
    process.wait_for_log(r"escuchando|error")
    if process.proc.poll() is not None or "escuchando" not in process.log:
        assert process.wait() == 2
        assert flag in process.log and "1e19" in process.log
        return
    port = process.wait_listening()
    with connect(port) as sock:
        sock.sendall(b"hola\n")
        assert recv_exactly(sock, 5) == b"HOLA\n"
    assert "Traceback" not in process.log
