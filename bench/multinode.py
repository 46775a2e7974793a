"""Drive `bench/multinode_driver.py`: a multi-node Ray cluster on this machine, in a
subprocess (and a session) of its own, so that it can be torn down to the last process."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "bench" / "multinode_driver.py"


def session_processes(sid: int) -> list[int]:
    """Every process of session `sid`: the driver, Ray's servers, and the workers (which
    put themselves in process groups of their own, but stay in the session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return found


def process_tree_alive(sid: int) -> list[str]:
    """The session's live processes, as "pid cmdline" (zombies are gone already)."""
    alive = []
    for pid in session_processes(sid):
        try:
            status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if status == "Z":
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        alive.append(f"{pid} {cmdline}")
    return alive


class Driver:
    """The driver subprocess: start, send commands, read its protocol lines, quit."""

    def __init__(self, config: dict, workdir: Path):
        self.config_file = workdir / "multinode-config.json"
        self.config_file.write_text(json.dumps(config))
        self.log_file = workdir / "multinode-driver.log"
        self.lines: queue.Queue[str] = queue.Queue()
        self.node_ids: dict[str, str] = {}
        self.url = ""
        self.leftovers: list[str] = []
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self._log = self.log_file.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(DRIVER), str(self.config_file)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,  # its own session: Ray's processes all stay in it
        )
        self.sid = self.process.pid
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            if line.startswith("NODES "):
                self.node_ids = json.loads(line[len("NODES "):])
            self.lines.put(line)
        self.lines.put("EOF")

    def expect(self, prefix: str, timeout: float) -> str:
        """The next protocol line starting with `prefix`; ERROR or the driver's end fail."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"multinode driver: no {prefix!r} within {timeout} s\n{self.log_tail()}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line
            if line.startswith("ERROR") or line == "EOF":
                raise AssertionError(f"multinode driver: {line} while waiting for {prefix!r}\n{self.log_tail()}")

    def start(self, timeout: float = 120) -> str:
        self.url = self.expect("READY ", timeout).split(" ", 1)[1]
        return self.url

    def command(self, command: str, reply: str, timeout: float = 60) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        self.expect(reply, timeout)

    def remove(self, node: str) -> None:
        self.command(f"remove {node}", f"REMOVED {node}")

    def add(self, node: str) -> None:
        self.command(f"add {node}", f"ADDED {node}")

    def alive(self) -> dict[str, bool]:
        """{node id: alive} as GCS sees it, every node it has known."""
        self.process.stdin.write("alive\n")
        self.process.stdin.flush()
        return json.loads(self.expect("ALIVE ", 30)[len("ALIVE "):])

    def quit(self, timeout: float = 60, grace: float = 10) -> int:
        """Ask the driver to stop everything, and kill the whole session if it does not.

        `leftovers` is then what of the session still ran `grace` seconds after the driver
        exited (and was killed): nothing, when the driver cleaned up after itself."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + grace
        while process_tree_alive(self.sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.leftovers = self.kill_leftovers()
        self._log.close()
        return self.process.wait()

    def kill_leftovers(self) -> list[str]:
        """SIGKILL whatever of the session still runs (the last resort); what that was."""
        left = process_tree_alive(self.sid)
        for pid in session_processes(self.sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
