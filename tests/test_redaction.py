"""cycleprune.redaction, and that the command line never prints a token or a signed URL.

The credentials here are fake (and listed in test_secrets.ALLOWLIST).
"""

from __future__ import annotations

import logging
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cycleprune import cli
from cycleprune.redaction import REDACTED, RedactingFilter, format_error, install, redact

SIGNED_URL = (
    "https://storage.googleapis.com/bucket/data.npz?X-Goog-Algorithm=GOOG4-RSA-SHA256"
    "&X-Goog-Credential=runner%40proj.iam.gserviceaccount.com%2F20250101%2Fauto%2Fstorage"
    "&X-Goog-Date=20250101T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host"
    "&X-Goog-Signature=5f1d0c0ffee0ddba11deadbeef"
)
OAUTH = "ya29.FAKE-a0AfH6SMBx-not-a-real-token-0000"
GITHUB = "ghp_FAKEfakeFAKEfakeFAKEfakeFAKEfake0000"
AWS = "AKIAFAKEFAKEFAKE0000"


@pytest.mark.parametrize(
    ("text", "secrets", "kept"),
    [
        (SIGNED_URL, ["runner%40proj", "5f1d0c0ffee"], ["storage.googleapis.com/bucket/data.npz"]),
        (
            "S3: https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc123&x=1",
            ["AK%2F1", "abc123"],
            ["b.s3.amazonaws.com/k", "x=1"],
        ),
        (
            f"GET https://oauth2.googleapis.com/x?access_token={OAUTH}&alt=json",
            [OAUTH],
            ["alt=json"],
        ),
        ("https://acct.blob.core.windows.net/c/f?sv=2022&sig=AbC%2Bd%3D", ["AbC%2Bd"], ["sv=2022"]),
        ("headers={'Authorization': 'Bearer eyJhbGciOi.eyJzdWIi.c2ln'}", ["eyJhbGciOi"], []),
        ('{"access_token": "abc.def", "expires_in": 3599}', ["abc.def"], ['"expires_in": 3599']),
        (
            "Cannot reach the KFP API at https://alice:hunter2@kfp.example.com",
            ["hunter2"],
            ["alice"],
        ),
        (f"push to https://x-access-token:{GITHUB}@github.com/o/r", [GITHUB], ["github.com/o/r"]),
        (f"key id {AWS} in env", [AWS], ["key id"]),
        (  # assembled, so that this file holds no key block for the secrets scan to find
            "-----BEGIN " + "PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END " + "PRIVATE KEY-----\nend",
            ["MIIEvQIBADANBg"],
            ["end"],
        ),
        ("password=hunter2 user=alice", ["hunter2"], ["user=alice"]),
        # Quoted values, and `Name: value` as in YAML or an echoed HTTP header.
        ('password="hunter2" user=alice', ["hunter2"], ['password="', "user=alice"]),
        ("X-Auth-Token: abcdef123\nHost: kfp", ["abcdef123"], ["X-Auth-Token: ", "Host: kfp"]),
        ("refresh_token: 'r3fr3sh' # from the file", ["r3fr3sh"], ["# from the file"]),
        ('password="correct horse" user=alice', ["correct", "horse"], ["user=alice"]),
        ("api_key: 'two words' next", ["two", "words"], ["api_key: '", "' next"]),
        ('password="don\'t tell" user=x', ["don", "tell"], ["user=x"]),
        # An unterminated quote (a message cut short) hides the rest of its line, not one word.
        ('token="a b c', ["a b", "b c"], ['token="']),
        ("api_key: 'two words\nnext line", ["two", "words"], ["api_key: '", "\nnext line"]),
    ],
)
def test_redact_removes_secrets_and_keeps_the_rest(text, secrets, kept):
    out = redact(text)
    for secret in secrets:
        assert secret not in out
    for part in kept:
        assert part in out
    assert REDACTED in out
    assert redact(out) == out


@pytest.mark.parametrize(
    "text",
    [
        "Data source not found: /data/chest_xray/train/NORMAL/img1.png",
        "KF_PIPELINES_SA_TOKEN_PATH=/var/run/secrets/kubeflow/pipelines/token",
        "train.epochs must be > 0. Received: train.epochs=0",
        "gs://bucket/pipeline-root/cycleprune/run-1/dataset",
        "schedule.min_lr must be > 0 and < max_lr (0.1). Received: schedule.min_lr=0.2",
        "http://localhost:8080/#/runs/details/r-1",
        "npz has no array 'test_labels' (missing key: test_labels)",
    ],
)
def test_redact_leaves_ordinary_messages_alone(text):
    assert redact(text) == text


secrets = st.text(alphabet="ABCDEFabcdef0123456789%-_.~", min_size=6, max_size=40)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["X-Goog-Signature", "X-Goog-Credential", "access_token", "token", "sig"]),
    secrets,
    st.text(max_size=30),
)
def test_signed_url_parameters_never_survive(name, secret, noise):
    text = f"{noise} https://h/o?a=1&{name}={secret}&b=2 {noise}"
    out = redact(text)
    assert f"{name}={secret}" not in out
    assert f"{name}={REDACTED}" in out
    assert redact(out) == out


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_redact_never_fails_and_is_idempotent(text):
    once = redact(text)
    assert redact(once) == once


def test_format_error_is_one_escaped_line():
    err = FileNotFoundError(f"Data source not found: /d/evil\nerror: fake line?token={OAUTH}")
    line = format_error(err)
    assert "\n" not in line and "\\x0a" in line
    assert OAUTH not in line


def test_logging_filter_redacts_messages_arguments_and_tracebacks():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("cycleprune.test_redaction")
    logger.addHandler(handler)
    try:
        logger.warning("download %s failed", SIGNED_URL)
        try:
            raise ValueError(f"GET {SIGNED_URL}")
        except ValueError:
            logger.exception("with traceback")
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2
    assert all("5f1d0c0ffee" not in r for r in records)
    assert "X-Goog-Signature=[REDACTED]" in records[1].splitlines()[-1]


def test_install_is_idempotent():
    logger = logging.getLogger("cycleprune.test_install")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        install(logger)
        install(logger)
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    finally:
        logger.removeHandler(handler)


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_error_line_redacts_a_signed_url(tmp_path, capsys):
    source = f"{SIGNED_URL}&access_token={OAUTH}"
    code = cli.main(["prepare-data", "--source", source, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "storage.googleapis.com/bucket/data.npz" in err
    assert "5f1d0c0ffee" not in err and OAUTH not in err and "runner%40proj" not in err


def test_cli_logs_are_redacted(caplog, capsys):
    # main() attaches the filter to the root logger's handlers, caplog's among them here.
    assert cli.main(["show-config", "--preset", "smoke"]) == 0
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        logging.getLogger("kfp.client").info("Request to %s", SIGNED_URL)
    assert "5f1d0c0ffee" not in caplog.text
    assert "X-Goog-Signature=[REDACTED]" in caplog.text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_errors_do_not_print_credentials_in_the_host(capsys):
    host = f"http://alice:hunter2@127.0.0.1:{_closed_port()}"
    code = cli.main(["submit", "--host", host, "--pipeline", "tiny", "--connect-timeout", "2"])
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("error: Cannot reach the KFP API at http://alice:[REDACTED]@127.0.0.1")
    assert "hunter2" not in err


def test_cluster_bad_arguments_are_one_line_not_a_traceback(capsys):
    code = cli.main(["submit", "--host", "http://h", "--pipeline", "p", "--param", "no-equals"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "error: --param expects name=value. Received: 'no-equals'"


def test_server_messages_are_redacted_before_they_are_cut():
    from pipelines import cluster

    body = '{"message": "upload to ' + SIGNED_URL + ' denied", "code": 7}'
    message = cluster._server_message(body.encode())
    assert "5f1d0c0ffee" not in message and "X-Goog-Signature=[REDACTED]" in message
