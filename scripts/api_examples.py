"""The recorded examples of docs/API.md, made by running them.

Each example is a ``sh`` block under a ``<!-- api-example: NAME -->`` line, followed by the
block that shows its output. This script starts the fake model server of the test suite and
``nilai api`` on free loopback ports (API key ``demo-key-123``, a fixed demo signing key),
runs every example's commands in document order exactly as written (with the gateway's port
for 18080), and

    python scripts/api_examples.py --write   # replaces each stale output with what it printed
    python scripts/api_examples.py --check   # exit 1, with a diff, if a shown output is stale

``--check`` compares everything but what differs from run to run (uptimes, timestamps,
signatures, random nonces), so a ``request_sha256`` that the shown request does not hash to,
or headers shown for a command that does not print them, fail it. It also verifies every
shown chat completion's signature against the demo key, which the page shows.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from coincurve import PrivateKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nilai.crypto.verify import VerificationError, verify_response  # noqa: E402

DOC = ROOT / "docs" / "API.md"
BIN = Path(sys.executable).parent
API_KEY = "demo-key-123"  # pragma: allowlist secret
DOC_PORT = "18080"
FENCES = 4  # the sh block's two fences, then the output block's
MARK = re.compile(r"^<!-- api-example: ([a-z0-9-]+) -->$")
# Derived, not stored: the demo key signs the recorded answers so the page's public key and
# signatures stay verifiable from one recording to the next.
DEMO_KEY = PrivateKey(hashlib.sha256(b"nilai docs/API.md demo signing key").digest())
PUBLIC_KEY = base64.b64encode(DEMO_KEY.public_key.format(compressed=True)).decode()
DID = "did:nil:" + DEMO_KEY.public_key.format(compressed=True).hex()
# Response headers the page leaves out: the same on every response, or noise.
DROPPED_HEADERS = {
    "date",
    "server",
    "content-length",
    "transfer-encoding",
    "x-request-id",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    "content-security-policy",
    "vary",
}
# The lines of /metrics the page shows (an excerpt), by prefix.
METRICS_LINES = (
    "# HELP nilai_http_request_duration_seconds ",
    "# TYPE nilai_http_request_duration_seconds ",
    'nilai_http_request_duration_seconds_count{method="GET",route="/healthz",status="200"}',
    "nilai_chat_duration_seconds_count{",
    "nilai_chat_time_to_first_token_seconds_count{",
    "nilai_upstream_duration_seconds_count{",
    "nilai_tokens_total{",
    "nilai_chat_streams_in_flight ",
)
# What changes from run to run, replaced before outputs are compared.
VOLATILE = [
    (re.compile(r'"uptime":"[0-9.]+s"'), '"uptime":"…"'),
    (re.compile(r'"created":\d+'), '"created":…'),
    (re.compile(r"^x-ratelimit-reset: \d+$", re.M), "x-ratelimit-reset: …"),
    (re.compile(r'(\\?"signature\\?":\\?")[A-Za-z0-9+/=]+'), r"\1…"),
    (re.compile(r'(\\?"issued_at\\?":)\d+'), r"\1…"),
    (re.compile(r"^(  (?:nonce|report_data) +)[0-9a-f]{64}", re.M), r"\1…"),
]


@dataclass
class Example:
    """One recorded example: its commands and the output the page shows for them."""

    name: str
    command: str  # the sh block, as bash runs it
    output: str  # the shown output: the block's lines
    start: int  # index of the output block's first line in the document's lines
    end: int  # index of its closing fence


def examples(lines: list[str]) -> list[Example]:
    """The marked examples of the document, in order."""
    found: list[Example] = []
    for index, line in enumerate(lines):
        match = MARK.match(line)
        if not match:
            continue
        fences = [i for i in range(index + 1, len(lines)) if lines[i].startswith("```")]
        fences = fences[:FENCES]
        if len(fences) < FENCES or lines[fences[0]].strip() not in ("```sh", "```bash"):
            raise SystemExit(f"line {index + 1}: {match[1]}: a sh block and its output must follow")
        command = "\n".join(lines[fences[0] + 1 : fences[1]])
        output = "\n".join(lines[fences[2] + 1 : fences[3]])
        found.append(Example(match[1], command, output, fences[2] + 1, fences[3]))
    return found


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until ``url`` answers 200; stop if ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args!r} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - loopback
                if answer.status == HTTPStatus.OK:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer 200 within {timeout_s}s")


class Servers:
    """The fake model server and a gateway in front of it, as the page describes."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = str(free_port())
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Servers:
        key_path = self.work / "signing_key.pem"
        key_path.write_bytes(DEMO_KEY.to_pem())
        key_path.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NILAI_")}
        env["PYTHONPATH"] = str(ROOT)
        fake_port = str(free_port())
        fake = [sys.executable, "-m", "tests.fakes.fake_openai_server", "--port", fake_port]
        self.processes.append(self._start(fake, env, "fake.log"))
        wait_ready(f"http://127.0.0.1:{fake_port}/v1/models", self.processes[0])
        env |= {
            "NILAI_DATA_DIR": str(self.work / "data"),
            "NILAI_API_KEY": API_KEY,
            "NILAI_UPSTREAM_URLS": f"http://127.0.0.1:{fake_port}",
            "NILAI_SIGNING_KEY_PATH": str(key_path),
        }
        gateway = [str(BIN / "nilai"), "api", "--port", self.port]
        self.processes.append(self._start(gateway, env, "gateway.log"))
        wait_ready(f"http://127.0.0.1:{self.port}/readyz", self.processes[1])
        return self

    def _start(self, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        with (self.work / log).open("wb") as out:
            # S603: our own interpreter and nilai, with fixed arguments.
            return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603

    def __exit__(self, *_: object) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def run(self, example: Example) -> str:
        """What the example's commands print, trimmed as the page shows it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("NILAI_")}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        command = example.command.replace(DOC_PORT, self.port).replace(".venv/bin/", f"{BIN}/")
        cwd = self.work / example.name
        cwd.mkdir()
        done = subprocess.run(  # noqa: S603 - the page's own commands, as a reader runs them
            ["/bin/bash", "-c", command],
            cwd=cwd,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        out = done.stdout.decode().replace("\r\n", "\n").replace(self.port, DOC_PORT)
        if not out.strip():
            error = done.stderr.decode()
            raise SystemExit(f"{example.name}: no output (exit {done.returncode})\n{error}")
        return shape(example.name, out.strip("\n"))


def shape(name: str, out: str) -> str:
    """Leave out the headers the page does not show; shorten streams and the metrics."""
    if out.startswith("HTTP/"):
        head, _, body = out.partition("\n\n")
        kept = [
            line
            for line in head.splitlines()
            if line.startswith("HTTP/") or line.split(":", 1)[0].lower() not in DROPPED_HEADERS
        ]
        out = "\n".join(kept) + "\n\n" + shorten_stream(body)
    if name == "metrics":
        out = "\n".join(line for line in out.splitlines() if line.startswith(METRICS_LINES))
    return out.strip("\n")


def shorten_stream(body: str) -> str:
    """Replace the stream's middle one-word chunks (" w1" to " w6") by one line saying so."""
    events = body.split("\n\n")
    words = [i for i, event in enumerate(events) if re.fullmatch(r" w\d+", _delta(event))]
    if len(words) <= 2:  # noqa: PLR2004 - the first and the last word stay
        return body
    first, last = _delta(events[words[1]]), _delta(events[words[-2]])
    note = f'... ("{first}" to "{last}" the same way)'
    return "\n\n".join([*events[: words[1]], note, *events[words[-1] :]])


def _delta(event: str) -> str:
    if not event.startswith("data: {"):
        return ""
    try:
        chunk: Any = json.loads(event.removeprefix("data: "))  # Any: parsed JSON
    except json.JSONDecodeError:
        return ""
    try:
        content = chunk["choices"][0]["delta"]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def normalized(text: str) -> str:
    """``text`` with what differs from run to run replaced by an ellipsis."""
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return text


def signature_problems(example: Example) -> list[str]:
    """Every shown chat completion must verify against the demo key."""
    problems: list[str] = []
    for line in example.output.splitlines():
        if line.startswith("{") and '"object":"chat.completion"' in line:
            try:
                verify_response(line.encode(), PUBLIC_KEY)
            except VerificationError as exc:
                problems.append(f"{example.name}: the shown answer does not verify: {exc}")
    return problems


def is_current(example: Example, output: str) -> bool:
    """Whether the shown output is ``output`` but for what changes between runs, and verifies."""
    return normalized(example.output) == normalized(output) and not signature_problems(example)


def main() -> int:
    """Record or check the examples; the exit status."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the outputs in the page")
    mode.add_argument("--check", action="store_true", help="exit 1 if a shown output is stale")
    parser.add_argument("--doc", type=Path, default=DOC, help="the page (default: docs/API.md)")
    args = parser.parse_args()
    lines = args.doc.read_text().splitlines()
    found = examples(lines)
    if not found:
        sys.stderr.write(f"{args.doc}: no <!-- api-example: NAME --> marks\n")
        return 1
    with (
        tempfile.TemporaryDirectory(prefix="nilai-api-examples-") as work,
        Servers(Path(work)) as servers,
    ):
        fresh = [servers.run(example) for example in found]
    if args.write:
        # A current example keeps its recording, so that only stale ones change.
        for example, output in reversed(list(zip(found, fresh, strict=True))):
            if not is_current(example, output):
                lines[example.start : example.end] = output.splitlines()
        text = re.sub(r"did:nil:[0-9a-f]{66}(?=`\.)", DID, "\n".join(lines) + "\n")
        args.doc.write_text(text)
        sys.stdout.write(f"{args.doc}: {len(found)} examples recorded\n")
        return 0
    problems: list[str] = []
    for example, output in zip(found, fresh, strict=True):
        problems += signature_problems(example)
        if normalized(example.output) != normalized(output):
            diff = difflib.unified_diff(
                normalized(example.output).splitlines(),
                normalized(output).splitlines(),
                f"{example.name} (shown)",
                f"{example.name} (now)",
                lineterm="",
            )
            problems.append("\n".join(diff))
    if DID not in "\n".join(lines):
        problems.append(f"the page does not name the demo key's DID {DID}")
    for problem in problems:
        sys.stderr.write(problem + "\n")
    if problems:
        sys.stderr.write(
            f"{args.doc}: {len(problems)} stale examples; "
            "run .venv/bin/python scripts/api_examples.py --write\n"
        )
        return 1
    sys.stdout.write(f"{args.doc}: {len(found)} examples match what the gateway answers\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
