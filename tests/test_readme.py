"""README.md, word for word, offline: every shell command block and every Python snippet, in order.

As a new user would follow it: ``marketpipe`` on PATH (a shim running this checkout), a fresh HOME
and working directory, none of the caller's vendor or marketpipe variables, and the simulator
started the way the README says (``marketpipe sim``) with the ``export`` lines it prints pasted
into the shell that runs everything else.

The blocks (fenced code in README.md):

- ```` ```bash ````: each command runs through ``bash -c`` in the working directory and must exit 0
  with no ``Traceback``. ``export`` lines change the shell's environment for what follows.
  Long-running commands run in the background: ``marketpipe sim`` (until the end: it is the
  README's offline setup) and ``marketpipe serve`` (until the end of the ``##`` section that started
  it, as a user stops it when done); ``marketpipe stream`` without ``--duration`` runs a few seconds,
  must print prices, and is then interrupted (Ctrl-C) and must exit by itself.
- ```` ```python ````: run in order in one interpreter session (a notebook), each must not raise.
- ```` ```toml ````, ```` ```json ````, ```` ```text ````: configuration, data or synopses; the TOML
  ones must load as a marketpipe config.
- A block right after ``<!-- readme-test: skip (reason) -->`` is not run; the reason is printed.
  A fence without a language is an error, so every block is either run or says what it is.

The whole run happens in a network namespace of its own when ``unshare -n`` (root) or ``unshare -rn``
(unprivileged user namespaces) is allowed:
no network at all, so "offline" is checked, and the README's fixed ports (8000, 8765-8767) cannot
clash with anything else running on the machine. Without it the run uses the host's loopback.

Run by hand: ``python tests/test_readme.py [WORKDIR]`` prints each step and its outcome.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SRC = ROOT / "src"
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
RUN_LANGS = {"bash", "python"}
DATA_LANGS = {"toml", "json", "text"}
CLEAN_ENV_PREFIXES = ("ALPACA_", "APCA_", "POLYGON_", "MASSIVE_", "MARKETPIPE_", "VIRTUAL_ENV", "PYTHON")

COMMAND_BOUND = 120.0  # seconds any one foreground command may take
START_BOUND = 30.0  # a background server until it answers
STREAM_SECONDS = 6.0  # how long a `marketpipe stream` runs before Ctrl-C
STOP_BOUND = 5.0  # a `marketpipe stream` after Ctrl-C
SERVER_STOP_BOUND = 15.0  # sim and serve after Ctrl-C (serve lets live streams end for 5 s)
TOTAL_BOUND = 420.0  # the whole README


@dataclass
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    section: str  # the `## ` heading it is under
    skip: str | None = None


def parse_readme(text: str) -> list[Block]:
    """Every fenced block, with its language, section and skip reason (if any)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        m = FENCE.match(line)
        if m is None:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md:{start + 1}: unclosed fence")
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(prev)
        blocks.append(Block(m["lang"], "\n".join(body) + "\n", start + 1, section, skip["reason"] if skip else None))
        i += 1
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: one per line (backslash continuations joined), comments and blank
    lines dropped (a trailing ``# comment`` is left to bash)."""
    out: list[str] = []
    pending = ""
    for raw in code.splitlines():
        line = pending + (raw.lstrip() if pending else raw)
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1].rstrip() + " "
            continue
        pending = ""
        if line.strip() and not line.strip().startswith("#"):
            out.append(line.strip())
    return out


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


# --- the run ---------------------------------------------------------------------------------------

PY_DRIVER = r"""
import json, os, sys, traceback
results = os.fdopen(int(sys.argv[1]), "w")
ns = {"__name__": "__main__"}
for header in sys.stdin:
    where, size = header.rsplit(" ", 1)
    code = sys.stdin.read(int(size))
    try:
        exec(compile(code, where, "exec"), ns)
        answer = {"ok": True}
    except BaseException:
        answer = {"ok": False, "error": traceback.format_exc()}
    sys.stdout.flush(); sys.stderr.flush()
    results.write(json.dumps(answer) + "\n"); results.flush()
"""


@dataclass
class Background:
    name: str
    proc: subprocess.Popen[str]
    out: Path
    errf: Path
    section: str


@dataclass
class Run:
    work: Path
    env: dict[str, str]
    log: list[str] = field(default_factory=list)
    background: list[Background] = field(default_factory=list)
    python: subprocess.Popen[str] | None = None
    py_results: IO[str] | None = None
    failures: list[str] = field(default_factory=list)
    n: int = 0

    def say(self, text: str) -> None:
        self.log.append(text)
        print(text, flush=True)

    def fail(self, where: str, text: str) -> None:
        self.failures.append(f"{where}: {text}")
        self.say(f"FAILED {where}: {text}")

    # bash

    def shell(self, block: Block) -> None:
        for command in shell_commands(block.code):
            where = f"README.md:{block.line} `{command}`"
            w = words(command)
            if w and w[0] == "export":
                self.export(command, where)
            elif w[:2] in (["marketpipe", "sim"], ["marketpipe", "serve"]):
                self.start(command, w[1], where, block.section)
            elif w[:1] == ["moto_server"]:  # the S3 server the cold-tier section tries S3 on
                self.start(command, "moto", where, block.section)
            elif w[:2] == ["marketpipe", "stream"] and "--duration" not in w:
                self.stream(command, where)
            else:
                self.foreground(command, where)

    def export(self, command: str, where: str) -> None:
        done = subprocess.run(
            ["bash", "-c", f"{command}\nenv -0"], env=self.env, cwd=self.work, capture_output=True, text=True
        )
        if done.returncode != 0:
            self.fail(where, done.stderr.strip())
            return
        self.env = dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)
        self.say(f"ok      {where}")

    def foreground(self, command: str, where: str) -> None:
        t0 = time.monotonic()
        try:
            done = subprocess.run(
                ["bash", "-c", command],
                env=self.env,
                cwd=self.work,
                capture_output=True,
                text=True,
                timeout=COMMAND_BOUND,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            self.fail(where, f"still running after {COMMAND_BOUND:.0f} s; stderr: {exc.stderr!r}")
            return
        took = time.monotonic() - t0
        self.n += 1
        (self.work / f".step{self.n}.out").write_text(f"$ {command}\n{done.stdout}\n--- stderr\n{done.stderr}")
        if done.returncode != 0 or "Traceback" in done.stderr:
            self.fail(where, f"exit {done.returncode}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-3000:]}")
            return
        self.say(f"ok      {where} ({took:.1f} s, {len(done.stdout.splitlines())} lines out)")

    def start(self, command: str, kind: str, where: str, section: str) -> None:
        self.n += 1
        out, errf = self.work / f".bg{self.n}.out", self.work / f".bg{self.n}.err"
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            env=self.env,
            cwd=self.work,
            stdout=out.open("w"),
            stderr=errf.open("w"),
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        bg = Background(kind, proc, out, errf, "" if kind == "sim" else section)
        self.background.append(bg)
        deadline = time.monotonic() + START_BOUND
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.fail(where, f"exited {proc.returncode}: {errf.read_text()[-3000:]}")
                return
            if kind == "sim" and "export MARKETPIPE_CONFIG=" in out.read_text():
                time.sleep(0.2)  # the whole announcement is one print
                # what the README says to do with what it printed: paste the export lines
                for line in out.read_text().splitlines():
                    if line.startswith("export "):
                        self.export(line, f"{where} printed `{line}`")
                self.say(f"ok      {where} (in the background; its exports pasted)")
                return
            if kind == "moto" and self._listens(words(command)):
                self.say(f"ok      {where} (in the background)")
                return
            if kind == "serve" and self._answers(words(command)):
                self.say(f"ok      {where} (in the background)")
                return
            time.sleep(0.2)
        self.fail(where, f"not ready after {START_BOUND:.0f} s: {errf.read_text()[-3000:]}")

    def _listens(self, w: list[str]) -> bool:
        port = int(w[w.index("-p") + 1]) if "-p" in w else 5000
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        except OSError:
            return False
        return True

    def _answers(self, w: list[str]) -> bool:
        host = w[w.index("--host") + 1] if "--host" in w else "127.0.0.1"
        port = w[w.index("--port") + 1] if "--port" in w else "8000"
        import httpx

        try:
            return httpx.get(f"http://{host}:{port}/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stream(self, command: str, where: str) -> None:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            env=self.env,
            cwd=self.work,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        time.sleep(STREAM_SECONDS)
        alive = proc.poll() is None
        if alive:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=STOP_BOUND)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            self.fail(where, f"did not stop within {STOP_BOUND:.0f} s of Ctrl-C; stderr: {err[-2000:]}")
            return
        if not alive and proc.returncode != 0:
            self.fail(where, f"exited {proc.returncode} before Ctrl-C\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}")
        elif "Traceback" in err or proc.returncode not in (0, 130):
            self.fail(where, f"exit {proc.returncode} after Ctrl-C\nstderr: {err[-3000:]}")
        elif not re.search(r"\d+\.\d+", out):
            self.fail(
                where, f"printed no price in {STREAM_SECONDS:.0f} s\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
            )
        else:
            self.say(f"ok      {where} ({len(out.splitlines())} lines in {STREAM_SECONDS:.0f} s, then Ctrl-C)")

    def end_section(self, section: str) -> None:
        for bg in [b for b in self.background if b.section == section and b.proc.poll() is None]:
            self.stop(bg)

    def stop(self, bg: Background) -> None:
        if bg.proc.poll() is None:
            os.killpg(bg.proc.pid, signal.SIGINT)
            try:
                bg.proc.wait(timeout=SERVER_STOP_BOUND)
            except subprocess.TimeoutExpired:
                os.killpg(bg.proc.pid, signal.SIGKILL)
                bg.proc.wait()
                self.fail(f"`marketpipe {bg.name}`", f"did not stop within {SERVER_STOP_BOUND:.0f} s of Ctrl-C")
        err = bg.errf.read_text()
        if "Traceback" in err:
            self.fail(f"`marketpipe {bg.name}`", f"traceback on stderr:\n{err[-3000:]}")
        self.background.remove(bg)
        self.say(f"stopped `marketpipe {bg.name}` (exit {bg.proc.returncode})")

    # python

    def snippet(self, block: Block) -> None:
        where = f"README.md:{block.line} (python)"
        if self.python is None:
            r, w = os.pipe()
            self.python = subprocess.Popen(
                [sys.executable, "-u", "-c", PY_DRIVER, str(w)],
                env=self.env,
                cwd=self.work,
                stdin=subprocess.PIPE,
                stdout=(self.work / ".python.out").open("w"),
                stderr=(self.work / ".python.err").open("w"),
                text=True,
                pass_fds=(w,),
            )
            os.close(w)
            self.py_results = os.fdopen(r)
        assert self.python.stdin is not None and self.py_results is not None
        self.python.stdin.write(f"README.md:{block.line + 1} {len(block.code)}\n{block.code}")
        self.python.stdin.flush()
        t0 = time.monotonic()
        line = self.py_results.readline()
        if not line:
            self.fail(where, f"the interpreter died: {(self.work / '.python.err').read_text()[-3000:]}")
            return
        answer = json.loads(line)
        if not answer["ok"]:
            self.fail(where, answer["error"])
        else:
            self.say(f"ok      {where} ({time.monotonic() - t0:.1f} s)")

    # data

    def config(self, block: Block) -> None:
        where = f"README.md:{block.line} (toml)"
        path = self.work / f".readme-{block.line}.toml"
        path.write_text(block.code)
        check = "import sys; from marketpipe.core.config import load_config; load_config(sys.argv[1])"
        done = subprocess.run(
            [sys.executable, "-c", check, str(path)], env=self.env, cwd=self.work, capture_output=True, text=True
        )
        if done.returncode != 0:
            self.fail(where, f"does not load as a config: {done.stderr[-2000:]}")
        else:
            self.say(f"ok      {where} loads as a config")

    def close(self) -> None:
        if self.python is not None:
            assert self.python.stdin is not None
            self.python.stdin.close()
            try:
                self.python.wait(timeout=STOP_BOUND)
            except subprocess.TimeoutExpired:
                self.python.kill()
                self.python.wait()
                self.fail("the Python session", "did not exit when its input ended")
        for bg in reversed(list(self.background)):
            self.stop(bg)


def clean_env(home: Path, bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_ENV_PREFIXES)}
    env.update(
        HOME=str(home),
        # what `source .venv/bin/activate` gives: the checkout's marketpipe, then the venv's tools
        PATH=os.pathsep.join((str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin"))),
        PYTHONPATH=str(SRC),
        COLUMNS="160",
        TMPDIR=str(home / "tmp"),
    )
    env.pop("XDG_CONFIG_HOME", None)
    env.pop("XDG_DATA_HOME", None)
    return env


def run_readme(base: Path) -> Run:
    """Follow README.md in ``base`` (HOME, working directory, a ``marketpipe`` on PATH)."""
    home, work, bin_dir = base / "home", base / "work", base / "bin"
    for d in (home / "tmp", work, bin_dir):
        d.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "marketpipe"  # what `source .venv/bin/activate` puts on PATH, for this checkout
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m marketpipe.cli.main "$@"\n')
    shim.chmod(0o755)
    run = Run(work, clean_env(home, bin_dir))
    t0 = time.monotonic()
    section = ""
    try:
        for block in parse_readme(README.read_text(encoding="utf-8")):
            if block.section != section:
                run.end_section(section)
                section = block.section
            if time.monotonic() - t0 > TOTAL_BOUND:
                run.fail(f"README.md:{block.line}", f"the README took over {TOTAL_BOUND:.0f} s so far")
                break
            if block.skip is not None:
                run.say(f"skipped README.md:{block.line} ({block.lang}): {block.skip}")
            elif block.lang == "bash":
                run.shell(block)
            elif block.lang == "python":
                run.snippet(block)
            elif block.lang == "toml":
                run.config(block)
            elif block.lang in DATA_LANGS:
                continue
            else:
                run.fail(
                    f"README.md:{block.line}", f"fence language {block.lang!r}: say bash, python, toml, json or text"
                )
        run.end_section(section)
    finally:
        run.close()
    run.say(f"README done in {time.monotonic() - t0:.0f} s, {len(run.failures)} failed")
    return run


def _own_network() -> list[str] | None:
    """How to run in a network namespace of its own with loopback up: ``unshare -n`` as root, or with a
    user namespace too (``-rn``) where unprivileged ones are allowed; None when neither works."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if subprocess.run([*prefix, "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0:
            return prefix
    return None


# --- the tests -------------------------------------------------------------------------------------


def test_every_block_is_run_or_says_what_it_is() -> None:
    blocks = parse_readme(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no code blocks"
    unlabelled = [b.line for b in blocks if b.lang not in RUN_LANGS | DATA_LANGS]
    assert unlabelled == [], f"fences without a known language at README.md lines {unlabelled}"
    skipped = [(b.line, b.skip) for b in blocks if b.skip]
    assert len(skipped) <= 5, f"skips are for what cannot run here, sparingly: {skipped}"
    runnable = [b for b in blocks if b.lang in RUN_LANGS and not b.skip]
    assert sum(len(shell_commands(b.code)) for b in runnable if b.lang == "bash") >= 10
    assert any(b.lang == "python" for b in runnable)


def test_shell_commands_split_as_bash_reads_them() -> None:
    code = "# a comment\nmarketpipe a \\\n  --b 1   # note\n\nexport X=1 Y=2\n"
    assert shell_commands(code) == ["marketpipe a --b 1   # note", "export X=1 Y=2"]
    assert words("marketpipe stream AAPL --sim  # offline") == ["marketpipe", "stream", "AAPL", "--sim"]


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
# a file named in code: a path leaving the repository, or a document (``*.md``) in it
PATH_CODE = re.compile(r"`(?P<target>\.\./[^`\s]*|[\w./-]+\.md)`")


def broken_links(text: str, root: Path) -> list[str]:
    """Links a fresh clone cannot follow: a relative path outside the repository or missing from it,
    or an ``#anchor`` no heading of the README makes (GitHub's slugs: lower case, spaces to ``-``)."""
    slugs = {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in text.splitlines()
        if line.startswith("#")
    }
    bad = []
    for m in [*LINK.finditer(text), *PATH_CODE.finditer(text)]:
        target = m["target"]
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        if target.startswith("#"):
            if target[1:] not in slugs:
                bad.append(target)
            continue
        path = (root / target.split("#")[0]).resolve()
        if not path.is_relative_to(root.resolve()) or not path.exists():
            bad.append(target)
    return bad


def test_every_link_in_the_readme_works_in_a_fresh_clone() -> None:
    """Issue 13 item 6: the README linked ``../shared/DESIGN.md``, which a clone does not have."""
    assert broken_links(README.read_text(encoding="utf-8"), ROOT) == []
    assert broken_links("see [design](../shared/DESIGN.md), [x](#nowhere), `../shared/DESIGN.md`", ROOT) == [
        "../shared/DESIGN.md",
        "#nowhere",
        "../shared/DESIGN.md",
    ]


@pytest.mark.readme
@pytest.mark.timeout(TOTAL_BOUND + 180)
def test_readme_word_for_word_offline(tmp_path: Path) -> None:
    if (prefix := _own_network()) is not None:
        script = "ip link set lo up && exec " + shlex.join(
            [sys.executable, str(Path(__file__).resolve()), str(tmp_path)]
        )
        cmd = [*prefix, "sh", "-c", script]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TOTAL_BOUND + 120, env=os.environ.copy())
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-20000:]
    assert "README done" in done.stdout and ", 0 failed" in done.stdout, report[-20000:]
    assert re.search(r"^ok .*marketpipe sim", done.stdout, re.M), report[-5000:]


def main(argv: list[str]) -> int:
    base = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="marketpipe-readme-"))
    run = run_readme(base)
    for failure in run.failures:
        print("\n" + failure, file=sys.stderr)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
