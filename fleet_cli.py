"""`mlx-fleet`: an operator's view of a running server, over its HTTP API.

    mlx-fleet ps [-a]               models holding memory: parts, requests, idle countdown
    mlx-fleet models                the catalog, as clients see it (/v1/models)
    mlx-fleet load MODEL [--pin]    load now (pinned: never evicted, until unloaded)
    mlx-fleet unload MODEL          unpin and unload, after its requests in flight
    mlx-fleet detect PATH_OR_NAME   what type and family the server would detect, as JSON
    mlx-fleet launch claude|codex [--model M] [--print] [-- ARGS]
                                    run Claude Code or Codex against this server

`--url` (or MLX_FLEET_URL) names the server, route prefix included; `--admin-key` (or
MLX_FLEET_ADMIN_KEY) is its `admin_api_key`. Also runs as `python -m fleet_cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from typing import Any, Callable, Sequence
from urllib.parse import quote

import httpx
from tabulate import tabulate

from policies.clients import CLIENTS, NoModelFits, choose_model
from policies.detection import detect as detect_model

DEFAULT_URL = "http://127.0.0.1:8000"
URL_VARIABLE = "MLX_FLEET_URL"
KEY_VARIABLE = "MLX_FLEET_ADMIN_KEY"
CONNECT_SECONDS = 5.0
# A view answers in moments. A load may first wait for busy models (load_wait_timeout), then
# load weights, and an unload waits for requests in flight: those wait as long as the server
# works (Ctrl-C stops waiting).
VIEW_SECONDS = 30.0


class CliError(Exception):
    """Something the operator can fix; its message says how, in one line."""


class Server:
    def __init__(self, args: argparse.Namespace):
        self.url = args.url.rstrip("/")
        self.has_key = bool(args.admin_key)
        headers = {"Authorization": f"Bearer {args.admin_key}"} if self.has_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers)

    def get(self, path: str) -> Any:
        return self._call("GET", path, VIEW_SECONDS)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, None, json=body)

    def _call(self, method: str, path: str, read_seconds: float | None, **kwargs: Any) -> Any:
        timeout = httpx.Timeout(read_seconds, connect=CONNECT_SECONDS)
        try:
            response = self.http.request(method, path, timeout=timeout, **kwargs)
        except httpx.TransportError as error:
            raise CliError(
                f"cannot reach mlx-fleet at {self.url} ({error.__class__.__name__}): start it "
                f"(make serve) or point --url / {URL_VARIABLE} at it"
            ) from None
        try:
            answer = response.json()
        except ValueError:
            raise CliError(
                f"{self.url}{path} answered {response.status_code} without an mlx-fleet reply: "
                "check --url (with the application's route prefix, if it has one)"
            ) from None
        if response.status_code == 401:
            problem = "refused the admin key" if self.has_key else "needs an admin key"
            raise CliError(f"the server {problem}: pass its admin_api_key with --admin-key or {KEY_VARIABLE}")
        if response.is_error:
            message = answer.get("error", {}).get("message") if isinstance(answer, dict) else None
            raise CliError(f"server answered {response.status_code}: {message or answer}")
        return answer


# -- formatting ---------------------------------------------------------------------------------


def size(nbytes: int | None) -> str:
    """GB with one decimal, as the server's messages say them; smaller sizes in whole units."""
    if nbytes is None:
        return "-"
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.1f} GB"
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.0f} {unit}"
    return f"{nbytes} B"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def memory_parts(model: dict[str, Any]) -> str:
    """What the model's memory is made of: its weights and process as measured, and the
    prompt cache and KV of running sequences while it holds any."""
    if model["memory_bytes"] is None:
        return "-"  # unloaded: the view keeps its last measurement, but it holds nothing now
    measured = [("weights", "weights_bytes"), ("process", "process_bytes")]
    held = [("prompt cache", "prompt_cache_bytes"), ("KV", "kv_bytes")]
    parts = [f"{label} {size(model[key])}" for label, key in measured if model[key] is not None]
    parts += [f"{label} {size(model[key])}" for label, key in held if model[key]]
    return ", ".join(parts) or "-"


def leases(model: dict[str, Any]) -> str:
    """Live leases (one per ingress replica with requests for the model, whatever their
    number), and requests waiting for the model to load."""
    waiting = f" +{model['waiting']} waiting" if model["waiting"] else ""
    return f"{model['in_flight']}{waiting}"


def table(rows: list[list[Any]], headers: Sequence[str]) -> str:
    # Ollama's look: no rules, left-aligned text, so the output also greps and cuts well.
    return tabulate(rows, headers=headers, tablefmt="plain", disable_numparse=True)


# -- commands -----------------------------------------------------------------------------------


# The columns `ps` and `models` share: a model as the catalog knows it.
MODEL_HEADERS = ("NAME", "TYPE", "FAMILY", "STATUS", "PINNED")


def model_columns(m: dict) -> list:
    return [m["id"], m["type"], m["family"], m["status"], "yes" if m["pinned"] else "no"]


def under_their_base(shown: list[dict]) -> list[dict]:
    """Each LoRA adapter right after its base (one without its base shown ends the list)."""
    bases = [m for m in shown if not m.get("base")]
    ordered = [row for base in bases for row in (base, *(m for m in shown if m.get("base") == base["id"]))]
    return ordered + [m for m in shown if m not in ordered]


def ps(args: argparse.Namespace) -> str:
    view = Server(args).get("/admin/models")
    now = time.time()
    shown = under_their_base([m for m in view["models"] if args.all or m["status"] != "unloaded"])
    several = len(view["nodes"]) > 1
    rows = [
        [
            *model_columns({**m, "id": f"└ {m['id']}"} if m.get("base") else m),
            *([m["node"] or "-"] if several else []),
            size(m["memory_bytes"]),
            memory_parts(m),
            leases(m),
            "never" if m["last_used"] is None else f"{duration(now - m['last_used'])} ago",
            "-" if m.get("idle_unload_in_s") is None else duration(m["idle_unload_in_s"]),
        ]
        for m in shown
    ]
    summary = (
        f"memory: {size(view['used_bytes'])} used of {size(view['memory_limit_bytes'])} budget, "
        f"{size(view['available_bytes'])} available for another model"
    )
    if several:
        summary = "\n".join(
            f"node {n['name']}: {size(n['used_bytes'])} used of {size(n['memory_limit_bytes'])} budget, "
            f"{size(n['available_bytes'])} available for another model"
            if n["alive"]
            else f"node {n['name']}: not in the cluster"
            for n in view["nodes"]
        )
    warm = view.get("warm_workers", [])
    if warm:
        ready = sum(w["ready"] for w in warm)
        summary += (
            f"\nwarm workers (the next load starts in one): {ready} ready, {len(warm) - ready} starting, "
            f"{size(sum(w['rss_bytes'] for w in warm))} resident"
        )
    if not rows:
        hint = "" if args.all else " (mlx-fleet ps -a lists unloaded ones too)"
        return f"{summary}\nno model holds memory{hint}"
    headers = (
        *MODEL_HEADERS,
        *(["NODE"] if several else []),
        "MEMORY", "MADE OF", "LEASES", "LAST USED", "IDLE UNLOAD IN",
    )
    return f"{summary}\n\n{table(rows, headers)}"


def models(args: argparse.Namespace) -> str:
    catalog = Server(args).get("/v1/models")["data"]
    rows = [
        [
            *model_columns(m),
            m.get("context_length") or "-",
            ", ".join(name for name, has in m["capabilities"].items() if has),
        ]
        for m in catalog
    ]
    return table(rows, (*MODEL_HEADERS, "CONTEXT", "CAPABILITIES"))


def load(args: argparse.Namespace) -> str:
    model = Server(args).post(f"/admin/models/{quote(args.model)}/load", {"pin": args.pin})
    pinned = ", pinned" if model["pinned"] else ""
    return f"{model['id']} {model['status']}{pinned}: {size(model['memory_bytes'])} ({memory_parts(model)})"


def unload(args: argparse.Namespace) -> str:
    model = Server(args).post(f"/admin/models/{quote(args.model)}/unload")
    return f"{model['id']} {model['status']}"


def detect(args: argparse.Namespace) -> str:
    rows = [{"input": arg, **detect_model(arg).as_dict()} for arg in args.path_or_name]
    return "\n".join(json.dumps(row) for row in rows)


def launch(args: argparse.Namespace) -> str:
    """Runs the client in place of this process, pointed at the server (or prints how)."""
    client = CLIENTS[args.client]
    catalog = Server(args).get("/v1/models")["data"]
    try:
        needs = client.prompt_needs(args.client_args)
        model = args.model if args.no_check else choose_model(client, catalog, args.model, needs)
    except NoModelFits as error:
        raise CliError(str(error)) from None
    if model is None:
        raise CliError("--no-check needs --model")
    url = args.url.rstrip("/")
    env = client.environment(url, args.api_key, model)
    command = [client.binary, *client.arguments(url, model), *args.client_args]
    if args.print:
        return "\n".join([*(f"export {k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command)])
    binary = shutil.which(client.binary)
    if binary is None:
        raise CliError(f"{client.binary} is not on PATH; install it with: npm install -g {client.package}")
    print(f"mlx-fleet: {client.name} on model {model} at {url}", file=sys.stderr, flush=True)
    os.execvpe(binary, command, {**os.environ, **env})


# -- arguments ----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    # The connection options are accepted before and after the command; SUPPRESS keeps a
    # command's parser from overwriting a value given before it with its default.
    def connection(p: argparse.ArgumentParser, defaults: bool) -> None:
        p.add_argument(
            "--url",
            default=os.environ.get(URL_VARIABLE, DEFAULT_URL) if defaults else argparse.SUPPRESS,
            help=f"the server, with its route prefix if any (env {URL_VARIABLE}; default {DEFAULT_URL})",
        )
        p.add_argument(
            "--admin-key",
            default=os.environ.get(KEY_VARIABLE) if defaults else argparse.SUPPRESS,
            help=f"the server's admin_api_key (env {KEY_VARIABLE})",
        )

    main_parser = argparse.ArgumentParser(
        prog="mlx-fleet", description="Watch and steer a running mlx-fleet server."
    )
    connection(main_parser, defaults=True)
    commands = main_parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, run: Callable[[argparse.Namespace], str], help: str, server: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        if server:
            connection(sub, defaults=False)
        sub.set_defaults(run=run)
        return sub

    command("ps", ps, "models holding memory, what it is made of, requests and idle countdown").add_argument(
        "-a", "--all", action="store_true", help="also list unloaded models"
    )
    command("models", models, "the catalog as clients see it (/v1/models)")
    load_parser = command("load", load, "load a model now")
    load_parser.add_argument("model")
    load_parser.add_argument("--pin", action="store_true", help="keep it loaded until unloaded")
    command("unload", unload, "unpin and unload a model, after its requests in flight").add_argument("model")
    command(
        "detect",
        detect,
        "per argument, the type, family, architecture and reason the server would detect, as JSON "
        "(read here, no server needed)",
        server=False,
    ).add_argument("path_or_name", nargs="+", help="a model folder, config.json, GGUF file, or hub id")
    launch_parser = command("launch", launch, "run Claude Code or Codex against this server, on one of its models "
                            "(arguments after -- go to the client)")
    launch_parser.add_argument("client", choices=sorted(CLIENTS))
    launch_parser.add_argument("--model", help="the catalog model to use (default: the first whose context fits)")
    launch_parser.add_argument("--api-key", default=os.environ.get("MLX_FLEET_API_KEY", "mlx-fleet"),
                               help="the key the client sends (env MLX_FLEET_API_KEY)")
    launch_parser.add_argument("--print", action="store_true", help="print the environment and command instead")
    launch_parser.add_argument("--no-check", action="store_true", help="skip the context check (needs --model)")
    return main_parser


def main(argv: Sequence[str] | None = None) -> int:
    # What follows `--` is the launched client's own (argparse's subcommands mishandle it).
    argv = list(sys.argv[1:] if argv is None else argv)
    client_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser().parse_args(argv[: len(argv) - len(client_args) - (1 if "--" in argv else 0)])
    args.client_args = client_args
    try:
        output = args.run(args)
    except CliError as error:
        print(f"mlx-fleet: {error}", file=sys.stderr)
        return 1
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
