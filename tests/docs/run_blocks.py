"""Runs one page's code blocks in order, in the current folder, as a reader would: Python blocks share one namespace
(as in a notebook or one script), shell blocks run in bash with this Python's venv first on PATH.

Reads a JSON list of blocks ({"lang", "code", "where", "background"}) on stdin.  A background block (a server) is
started and left running until the page ends; its "background" value is a URL to wait for before the next block.
Exits 1 at the first failing block, naming its page and line.
"""

import json
import os
import signal
import subprocess
import sys
import time
import traceback
import types
import urllib.request
from pathlib import Path


def wait_for(url: str, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the background command exited ({process.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def main() -> int:
    blocks = json.load(sys.stdin)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # the blocks' namespace is __main__'s, as when they are pasted into one script
    script = types.ModuleType("__main__")
    sys.modules["__main__"] = script
    namespace = script.__dict__
    background: list[subprocess.Popen] = []
    try:
        for block in blocks:
            started = time.monotonic()
            try:
                if block["lang"] == "python":
                    exec(compile(block["code"], block["where"], "exec"), namespace)
                elif block["background"]:
                    process = subprocess.Popen(["bash", "-c", f"exec {block['code']}"], env=env, start_new_session=True)
                    background.append(process)
                    wait_for(block["background"], process)
                else:
                    subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]], env=env, check=True)
            except BaseException:
                traceback.print_exc()
                print(f"FAILED: the block at {block['where']}", file=sys.stderr, flush=True)
                return 1
            print(f"--- {block['where']} ({block['lang']}): {time.monotonic() - started:.1f} s", flush=True)
    finally:
        for process in background:
            os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C would
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
