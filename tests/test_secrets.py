"""No credentials in the repository (and so none in the image, which copies from it).

Scans every file git tracks or would track (untracked files that are not ignored included), as
text, for private keys, Google service-account key files, AWS, GitHub, Google and Slack tokens, and
``token=``/``password=``-style assignments of long literal values. Files that may hold a fake
credential on purpose are listed in ``ALLOWLIST`` with the rules they may trip; an entry that no
longer trips its rule fails the test, so the list stays as small as it is.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 2_000_000  # larger files are data (the bundled .npz), not configuration

RULES: dict[str, re.Pattern[str]] = {
    "private-key": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    "aws-access-key-id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "aws-secret-access-key": re.compile(
        r"(?i)aws_secret_access_key\s*[=:]\s*[\"']?[A-Za-z0-9/+=]{40}"
    ),
    "github-token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
    "google-api-key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}"),
    "google-oauth-token": re.compile(r"\bya29\.[0-9A-Za-z_-]{20,}"),
    "slack-token": re.compile(r"\bxox[abposr]-[0-9A-Za-z-]{10,}"),
    # name = "long literal": a name ending in token/password/secret/key, and a quoted value of 16+
    # characters without spaces, with letters and digits, that is not a path, URL, variable or
    # placeholder.
    "secret-assignment": re.compile(
        r"(?i)\b[\w-]*(?:token|password|passwd|secret|api[_-]?key|access[_-]?key)[\"']?\s*[:=]\s*"
        r"[\"'](?![/$<{]|https?://)(?=[^\"'\s]*\d)(?=[^\"'\s]*[a-z])([^\"'\s]{16,})[\"']"
    ),
}
# A Google service-account key file: both markers in one file.
SERVICE_ACCOUNT = (
    re.compile(r"[\"']type[\"']\s*:\s*[\"']service_account[\"']"),
    re.compile(r"[\"']private_key[\"']\s*:"),
)
SECRET_FILE_NAMES = re.compile(
    r"(?i)(^|/)(\.env|\.netrc|\.pypirc|id_(rsa|ecdsa|ed25519)|credentials\.json|"
    r"[^/]*\.(pem|p12|pfx|key|keystore|jks))$"
)
# path -> rules that file may trip, with why. Keep this tiny.
ALLOWLIST: dict[str, set[str]] = {
    # Fake, obviously invalid credentials that the redaction tests feed to the redactor.
    "tests/test_redaction.py": {"google-oauth-token", "github-token", "aws-access-key-id"},
}


def _files() -> list[str]:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the scan lists files with git")
    done = subprocess.run(
        [git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    return sorted({name for name in done.stdout.decode().split("\0") if name})


def scan(name: str, text: str) -> set[str]:
    """The rules ``text`` (the content of file ``name``) trips."""
    found = {rule for rule, pattern in RULES.items() if pattern.search(text)}
    if all(pattern.search(text) for pattern in SERVICE_ACCOUNT):
        found.add("gcp-service-account-key")
    if SECRET_FILE_NAMES.search(name):
        found.add("secret-file-name")
    return found


def _read(path: Path) -> str | None:
    if not path.is_file() or path.stat().st_size > MAX_BYTES:
        return None
    blob = path.read_bytes()
    if b"\0" in blob[:8192]:
        return None  # binary
    return blob.decode("utf-8", "replace")


def test_no_credentials_in_the_repository():
    findings, unused = {}, {name: set(rules) for name, rules in ALLOWLIST.items()}
    for name in _files():
        text = _read(ROOT / name)
        if text is None:
            continue
        found = scan(name, text)
        allowed = ALLOWLIST.get(name, set())
        if found - allowed:
            findings[name] = sorted(found - allowed)
        unused.get(name, set()).difference_update(found)
    assert findings == {}, f"credentials (or what looks like them) in: {findings}"
    stale = {name: sorted(rules) for name, rules in unused.items() if rules}
    assert stale == {}, f"ALLOWLIST entries that no longer match anything: {stale}"


# Fakes are assembled at run time so that this file holds none.
FAKES = {
    "private-key": "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEow...\n",
    "aws-access-key-id": "aws_access_key_id = " + "AKIA" + "Q" * 16,
    "aws-secret-access-key": "aws_secret_access_key=" + "a1B2" * 10,
    "github-token": "GH_TOKEN=" + "ghp_" + "x1" * 18,
    "google-api-key": "url?key=" + "AIza" + "S" * 35,
    "google-oauth-token": "Authorization: Bearer " + "ya29." + "a0Af" * 6,
    "slack-token": "xox" + "b-1234567890-abcdef",
    "secret-assignment": 'db_password = "' + "c0rrect-h0rse-battery" + '"',
    "gcp-service-account-key": '{"type": "service' + '_account", "private' + '_key": "x"}',
}


@pytest.mark.parametrize("rule", sorted(FAKES))
def test_scan_catches_each_kind_of_credential(rule):
    assert rule in scan("config.txt", FAKES[rule])


@pytest.mark.parametrize("name", ["deploy/key.pem", "home/.netrc", "sa/credentials.json", ".env"])
def test_scan_catches_credential_file_names(name):
    assert "secret-file-name" in scan(name, "")


@pytest.mark.parametrize(
    "text",
    [
        'DEFAULT_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"',
        'TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"',
        'password = "${DB_PASSWORD_FROM_SECRET_MANAGER}"',
        "token: short",
        'url_token = "no-digits-in-this-long-value"',
        '"aws-secret-access-key": "aws_secret_access_key="',
        "- name: KF_PIPELINES_SA_TOKEN_PATH\n  value: /var/run/secrets/kubeflow/pipelines/token",
        "kind: ServiceAccount  # GKE Workload Identity, no key files",
    ],
)
def test_scan_ignores_references_to_credentials(text):
    assert scan("cluster.py", text) == set()
