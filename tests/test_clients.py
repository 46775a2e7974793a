"""The real agent clients, from npm, against the real server: Claude Code (`claude -p`) and
Codex (`codex exec`), with their default prompts, tools and flags, each started the way a
user starts it, through `mlx-fleet launch`. `make clients` installs them into .clients/.

Claude Code's first request holds ~21k tokens (24 tools) and asks for max_tokens 32000,
more than tiny-agent's 32k context holds: only the server's Anthropic-worded overflow makes
Claude Code retry with fewer, so a finished turn shows that recovery works. Codex sends Responses requests with namespace and hosted
tools and no max_output_tokens. Both finish their turn with their own success status.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = ROOT / ".clients" / "node_modules" / ".bin"
AGENT = "tiny-agent"  # SmolLM2's tokenizer, a 32k context, a few words per answer
REAL = "smollm2-135m-instruct"  # too small a context for Claude Code with its tools on
CLIENT_SECONDS = 300

pytestmark = pytest.mark.skipif(
    not (BIN / "claude").exists() or not (BIN / "codex").exists(),
    reason="the agent clients are not installed: make clients",
)


@pytest.fixture
def home():
    # Codex refuses a home under /tmp (it links helpers there): one in the repo's .clients.
    path = ROOT / ".clients" / "homes" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def launch(base_url: str, home: Path, client: str, *args: str, model: str | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`mlx-fleet launch CLIENT [--model M] -- ARGS`, as a user runs it, in a fresh home."""
    env = {
        **os.environ,
        **(env or {}),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "CODEX_HOME": str(home / ".codex"),
    }
    (home / ".codex").mkdir(exist_ok=True)
    command = [sys.executable, str(ROOT / "fleet_cli.py"), "--url", base_url, "launch", client,
               *(["--model", model] if model else []), "--", *args]
    return subprocess.run(command, env=env, cwd=home, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=CLIENT_SECONDS)


def claude_result(run: subprocess.CompletedProcess) -> dict:
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    results = [line for line in lines if line.get("type") == "result"]
    assert results, f"no result from claude (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return results[-1]


def test_claude_code_finishes_its_turn_with_its_default_tools(base_url, home):
    run = launch(base_url, home, "claude", "-p", "Say hello", "--output-format", "json")
    result = claude_result(run)
    assert result["is_error"] is False and run.returncode == 0, result


def test_claude_code_streams_its_turn_as_stream_json(base_url, home):
    run = launch(base_url, home, "claude", "-p", "Say hello", "--output-format", "stream-json", "--verbose")
    result = claude_result(run)
    assert result["is_error"] is False and run.returncode == 0, result
    kinds = {json.loads(line).get("type") for line in run.stdout.splitlines() if line.startswith("{")}
    assert {"system", "assistant", "result"} <= kinds


def test_claude_code_finishes_its_turn_on_the_real_model(base_url, home):
    """SmolLM2 (8k context) with Claude Code's tools off and a short system prompt of the
    user's: its 1.5k-token prompt asks for max_tokens 32000, so the turn goes through the
    overflow retry again, on a model that really answers. Claude Code sends no temperature,
    so the model samples: under Claude Code's own long prompt it loops and never ends its
    turn, and with this one it ended 28 times out of 28 in a helper's replays. One rerun
    is allowed, only for a turn the model did not end (an API error fails at once)."""
    args = ["-p", "Say hello", "--tools", "", "--output-format", "json",
            "--system-prompt", "You are a helpful assistant. Answer in one short sentence."]
    env = {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": "100"}  # a reply that runs on is cut in seconds
    for attempt in range(2):
        run = launch(base_url, home, "claude", *args, model=REAL, env=env)
        result = claude_result(run)
        if result["is_error"] is False and run.returncode == 0:
            return
        assert "API Error" not in str(result.get("result")), result
    raise AssertionError(f"SmolLM2 did not end its turn twice in a row: {result}")


def test_codex_finishes_its_turn(base_url, home):
    # No network here: Codex's startup plugin sync would reach github.com.
    run = launch(base_url, home, "codex", "-c", "features.plugins=false", "-c", "analytics.enabled=false",
                 "exec", "--skip-git-repo-check", "--json", "say hello")
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    kinds = [event.get("type") for event in events]
    assert "turn.completed" in kinds and "turn.failed" not in kinds and run.returncode == 0, (
        f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")


def test_launch_says_which_models_fit_a_client(base_url, home):
    run = launch(base_url, home, "claude", "-p", "x", model=REAL)
    assert run.returncode == 1 and "context of 8192 tokens" in run.stderr and AGENT in run.stderr
    printed = subprocess.run([sys.executable, str(ROOT / "fleet_cli.py"), "--url", base_url, "launch", "codex",
                              "--print"], capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and f"-m {AGENT}" in printed.stdout and "MLX_FLEET_API_KEY" in printed.stdout
