"""The README's promises, executed as written, so the README cannot drift from the programs."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pexpect
import pytest
from conftest import DEADLINE, clean_env

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def code_blocks(language: str = "") -> list[str]:
    """Fenced code blocks of the README with the given info string, in order."""
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def marked_block(name: str) -> list[str]:
    """The lines of the fenced block right after ``<!-- name -->``."""
    match = re.search(rf"<!-- {name} -->\n```\n(.*?)```", README, flags=re.S)
    assert match, f"README lacks the block marked {name}"
    return match.group(1).splitlines()


def test_readme_starts_with_the_two_setup_commands() -> None:
    server_command, test_command = code_blocks("sh")[:2]
    assert server_command.strip().endswith("-m tcp_upper.server")
    assert "pip install" in server_command and "venv" in server_command
    assert test_command.strip().endswith("-m pytest")
    assert "'.[test]'" in test_command and "venv" in test_command
    # They come before any other section of the README.
    assert README.index(server_command) < README.index("## El cliente")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = code_blocks("sh")[1].strip()
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci_lines


def test_settings_table_defaults_match_the_code() -> None:
    from tcp_upper.config import Settings

    defaults = Settings()
    assert f"| `{defaults.max_clients}` |" in README
    assert f"| `{defaults.write_timeout:g}` |" in README
    assert f"| `{defaults.timeout:g}` |" in README
    assert f"| `{defaults.port}` (0 = uno libre" in README


def _log_line_pattern(example: str) -> re.Pattern[str]:
    """A README log line as a regex: any timestamp before it, any client port."""
    escaped = re.escape(example).replace(r"127\.0\.0\.1:54321", r"127\.0\.0\.1:\d+")
    return re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} " + escaped + "$", re.M)


def _pty_client(port: int, cwd: Path) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable, ["-m", "tcp_upper.client", "--port", str(port)], cwd=str(cwd),
        env=clean_env(), encoding="utf-8", timeout=DEADLINE,
    )


def test_the_two_manual_tests_as_written(spawn_server, tmp_path: Path) -> None:
    # Step 1, on port 0 instead of 5000 (tests never use the real port).
    server = spawn_server()
    client = _pty_client(server.port, tmp_path)
    try:
        # Step 2: type the message; the terminal shows exactly the README's block.
        prompt_line, reply_line = marked_block("manual-test-1-client")
        typed = prompt_line.removeprefix("Cliente envía: ")
        client.expect_exact("Cliente envía: ")
        client.sendline(typed)
        client.expect_exact(reply_line + "\r\n")
        screen = "Cliente envía: " + client.before + reply_line
        assert screen.replace("\r\n", "\n") == prompt_line + "\n" + reply_line
        # Step 3: the server logged the connection.
        (connected,) = marked_block("manual-test-1-server")
        server.wait_for_log(_log_line_pattern(connected).pattern)
        # Step 4: DESCONEXION closes the client with the README's lines, exit 0.
        prompt_line, closed_line = marked_block("manual-test-2-client")
        client.expect_exact("Cliente envía: ")
        client.sendline(prompt_line.removeprefix("Cliente envía: "))
        client.expect_exact(closed_line)
        client.expect(pexpect.EOF)
        client.close()
        assert client.exitstatus == 0
    finally:
        client.close(force=True)
    # Step 5: the server logged it and is still running.
    (disconnected,) = marked_block("manual-test-2-server")
    server.wait_for_log(_log_line_pattern(disconnected).pattern)
    assert server.proc.poll() is None
    # Step 6: a new client is served the same way; Ctrl-C stops the server.
    again = _pty_client(server.port, tmp_path)
    try:
        again.expect_exact("Cliente envía: ")
        again.sendline("hola servidor")
        again.expect_exact("Servidor responde: HOLA SERVIDOR")
        again.sendeof()
        again.expect(pexpect.EOF)
    finally:
        again.close(force=True)
    server.signal(signal.SIGINT)
    assert server.wait() == 0
    assert "Servidor parado" in server.log
    assert "Traceback" not in server.log


def test_listening_line_quoted_in_the_readme(spawn_server) -> None:
    quoted = re.search(r"`(Servidor escuchando en [^`]+)`", README)
    assert quoted, "README quotes the listening line"
    server = spawn_server()
    expected = quoted.group(1).replace(":5000", f":{server.port}")
    server.wait_for_log(re.escape(expected))


@pytest.mark.parametrize("program", ["tcp_upper.server", "tcp_upper.client"])
def test_help_mentions_every_flag_the_readme_lists(program: str) -> None:
    out = pexpect.run(f"{sys.executable} -m {program} --help", env=clean_env(), timeout=DEADLINE,
                      encoding="utf-8")
    rows = re.findall(r"^\| [^|]+ \| `(--[a-z-]+)` \|", README, flags=re.M)
    assert rows, "README has the settings table"
    server_only = {"--max-clients", "--idle-timeout", "--write-timeout", "--workers"}
    for flag in rows:
        if program.endswith("client") and (flag in server_only):
            continue
        if program.endswith("server") and flag in {"--timeout", "--tls", "--cafile",
                                                   "--tls-insecure"}:
            continue
        assert flag in out, f"{flag} missing from {program} --help"
