"""`flashinfer serve` as a command: its options checked before the model loads
(one line, exit 2), signals stop it cleanly."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import serving as shared
from serving import default_sigint

from mlx_flashinfer.cli import main

# the server tests' shared fixtures (tests/serving.py), each module its own
layout = shared.layout


def start_server(layout, *extra):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_flashinfer",
            "serve",
            "--model",
            str(layout),
            "--port",
            "0",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    line = process.stderr.readline()
    assert "http://127.0.0.1:" in line, line
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    return process, port


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_server_cleanly(layout, signum):
    process, port = start_server(layout, "--memory-budget", "200%")
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request(
            "POST",
            "/v1/completions",
            body=json.dumps({"prompt": "alice", "max_tokens": 3}),
        )
        assert connection.getresponse().status == 200
        os.kill(process.pid, signum)
        status = process.wait(timeout=30)
        rest = process.stderr.read()
    finally:
        process.kill()
    assert status == 0, rest
    assert "Traceback" not in rest and rest.rstrip().endswith(
        "flashinfer serve: stopped"
    )


BAD_OPTIONS = {  # options, words of the one line
    "port over 65535": (["--port", "70000"], "--port: a port is 0..65535"),
    "port 99999": (["--port", "99999"], "got 99999"),
    "negative port": (["--port", "-1"], "--port: must be >= 0"),
    "port not a number": (["--port", "http"], "--port: not a whole number"),
    "prompt cache size": (["--prompt-cache-size", "-2"], "must be >= 0, got -2"),
    "prompt cache bytes": (["--prompt-cache-bytes", "1XB"], "bad size '1XB'"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_options_are_one_line_and_exit_2_before_the_model_loads(
    tmp_path, capsys, case
):
    options, says = BAD_OPTIONS[case]
    missing = tmp_path / "no-model"  # loading it would fail: the options go first
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--model", str(missing), *options])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("flashinfer serve: error: argument ") and says in err


def test_a_taken_port_is_refused_before_the_model_loads(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(
            ["serve", "--model", str(tmp_path / "no-model"), "--port", str(port)]
        )
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_the_port_subprocess_exits_2_without_a_traceback(tmp_path):
    """`flashinfer serve --port 70000` as a user runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "mlx_flashinfer", "serve", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "0..65535" in done.stderr
