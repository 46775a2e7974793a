"""The application builder: serve_config.yaml `args` -> one Serve application.

    applications:
      - import_path: graph:build_app
        autoscaling_policy: {policy_function: deployments.replica_policy:fleet_replicas}
        args: {models: [...], memory_limit: "75%"}

Config is validated once here; every deployment receives the validated, resolved catalog.
Model deployments are declared with no replica; the fleet controller alone sets their
counts, which the application's autoscaling policy hands to Serve (`deployments.replica_policy`).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from deployments.controller import Controller
from deployments.ingress import Ingress
from deployments.registry import MODEL_KINDS, ModelKind
from deployments.replica_policy import POLICY_FUNCTION, zero_replicas
from deployments.warm_workers import model_runtime_env
from policies.adapters import read_adapter_config
from policies.config import AppConfig, ModelEntry, ModelSpec, deployment_name
from policies.detection import TEXT, detect, gguf_file, read_gguf_metadata
from policies.features import same_vocabulary, served_context, text_features


# A resource only the head node has (Ray adds it): actors asking for a sliver run there.
HEAD_NODE_RESOURCE = "node:__internal_head__"


class ConfigError(ValueError):
    """The application's args are invalid; the message says which key and why."""


def load_config(args: dict[str, Any]) -> AppConfig:
    try:
        return AppConfig.model_validate(args)
    except ValidationError as error:
        raise ConfigError(f"invalid mlx-fleet config (application args):\n{error}") from None


def resolve_path(spec: ModelSpec, config: AppConfig) -> str:
    """Where the model's files are: its directory or GGUF file, or its hub cache snapshot."""
    local = Path(spec.path).expanduser()
    if local.is_dir() or (local.is_file() and local.suffix.lower() == ".gguf"):
        return str(local.resolve())
    if local.is_absolute() or spec.path.startswith((".", "~")) or spec.path.count("/") != 1:
        raise ConfigError(
            f"model {spec.id!r}: path {spec.path!r} is neither a model directory nor a .gguf "
            "file. Give one of those or a hub repo id such as "
            "'mlx-community/Qwen2.5-0.5B-Instruct-4bit'"
            + (" (run `make models` to build the demo models)" if "models/" in spec.path else "")
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(spec.path, local_files_only=True, cache_dir=config.hub_cache_dir)
    except LocalEntryNotFoundError:
        if config.allow_download:
            # The replica downloads it when the model is first loaded.
            return spec.path
        raise ConfigError(
            f"model {spec.id!r}: {spec.path!r} is not in the local hub cache"
            f"{f' ({config.hub_cache_dir})' if config.hub_cache_dir else ''}. Download it "
            f"first (`hf download {spec.path}`) or set `allow_download: true`"
        ) from None


def _gguf_architecture(spec: ModelSpec, path: str) -> None:
    """Refuse at start a GGUF whose architecture the converter does not know."""
    from deployments.gguf import SUPPORTED

    found = gguf_file(path)
    if found is None:
        return
    architecture = read_gguf_metadata(found).get("general.architecture")
    if architecture not in SUPPORTED:
        raise ConfigError(
            f"model {spec.id!r}: {found.name} is a GGUF of architecture {architecture!r}; this "
            f"server converts GGUF files of {', '.join(SUPPORTED)}"
        )


def build_catalog(config: AppConfig, kinds: dict[str, ModelKind] = MODEL_KINDS) -> list[ModelEntry]:
    catalog = []
    for spec in config.models:
        if spec.base is not None:
            continue  # after the models they adapt
        path = resolve_path(spec, config)
        try:
            _gguf_architecture(spec, path)
            found = detect(path if Path(path).exists() else spec.path)
        except ConfigError:
            raise
        except ValueError as error:  # several GGUF files in one folder
            raise ConfigError(f"model {spec.id!r}: {error}") from None
        model_type = spec.type or found.type
        if model_type not in kinds:
            raise ConfigError(
                f"model {spec.id!r} is a {model_type} model ({found.reason}), which this server "
                f"cannot serve; set `type:` to one of: {', '.join(kinds)}"
            )
        features = asdict(text_features(path)) if model_type == TEXT else {}
        if model_type == TEXT:
            features["context_length"] = served_context(features["context_length"], spec.max_context)
            features["speculative"] = None if spec.speculative is False else "prompt_lookup"
        catalog.append(
            ModelEntry(
                id=spec.id,
                deployment=deployment_name(spec.id),
                path=path,
                type=model_type,
                family=spec.family or found.family,
                pinned=spec.pinned,
                memory_bytes=spec.memory,
                idle_ttl=spec.idle_ttl if spec.idle_ttl is not None else config.idle_ttl,
                max_context=spec.max_context,
                node=spec.node,
                **features,
            )
        )
    bases = {entry.id: entry for entry in catalog}
    for spec in config.models:
        if spec.draft is not None:
            bases[spec.id] = _with_draft(bases[spec.id], bases[spec.draft])
    # In the config's order, each adapter built from its base's entry.
    return [
        bases[spec.id] if spec.base is None else _adapter_entry(spec, bases[spec.base], config)
        for spec in config.models
    ]


def _with_draft(entry: ModelEntry, draft: ModelEntry) -> ModelEntry:
    """A text model whose replica also runs `draft`'s weights to propose its tokens."""
    if entry.type != TEXT or draft.type != TEXT:
        raise ConfigError(f"model {entry.id!r}: a draft ({draft.id!r}) works between two text models")
    if same_vocabulary(entry.path, draft.path) is False:
        raise ConfigError(
            f"model {entry.id!r}: its draft {draft.id!r} has another vocabulary; a draft must "
            "share the model's tokenizer"
        )
    return replace(entry, draft=draft.id, draft_path=draft.path)


def _adapter_entry(spec: ModelSpec, base: ModelEntry, config: AppConfig) -> ModelEntry:
    """A LoRA adapter: its base's deployment, type and features, its own path and charges."""
    if base.type != TEXT:
        raise ConfigError(f"model {spec.id!r}: its base {base.id!r} is a {base.type} model; adapters apply to text models")
    path = Path(spec.path).expanduser()
    try:
        read_adapter_config(path)
    except ValueError as error:
        raise ConfigError(f"model {spec.id!r}: {error}") from None
    return replace(
        base,
        id=spec.id,
        path=str(path.resolve()),
        pinned=spec.pinned,
        memory_bytes=spec.memory,
        idle_ttl=spec.idle_ttl if spec.idle_ttl is not None else config.idle_ttl,
        base=base.id,
    )


def build_app(args: dict[str, Any]) -> Application:
    """Serve's entry point (`import_path: graph:build_app`)."""
    return build_application(args, MODEL_KINDS)


def build_application(args: dict[str, Any], kinds: dict[str, ModelKind]) -> Application:
    config = load_config(args)
    catalog = build_catalog(config, kinds)
    selectors = {node.name: node.selector for node in config.nodes}
    models = {
        entry.id: {
            node: kinds[entry.type]
            .deployment.options(
                name=name,
                autoscaling_config=zero_replicas(),
                max_ongoing_requests=config.max_ongoing_requests,
                # Only idle replicas are scaled down (the controller waits for requests in
                # flight), so there is nothing to drain: Serve's 2 s drain loop is pure delay.
                graceful_shutdown_wait_loop_s=0.1,
                ray_actor_options=_on_node(selectors.get(node)),
            )
            .bind(entry, config)
            for node, name in entry.placements(config.node_names).items()
        }
        for entry in catalog
        if entry.base is None
    }
    # An adapter is served by its base's deployments.
    models.update({entry.id: models[entry.base] for entry in catalog if entry.base is not None})
    # Several nodes: the controller and the ingress stay on the head, which the fleet cannot lose.
    head = {"resources": {HEAD_NODE_RESOURCE: 0.001}} if config.nodes else {}
    controller = Controller.options(ray_actor_options={"num_cpus": 0, **head}).bind(config, catalog, models)
    capabilities = {name: kind.capabilities for name, kind in kinds.items()}
    return Ingress.options(ray_actor_options={"num_cpus": 0, **head}).bind(
        config, catalog, capabilities, controller, models
    )


def fleet_env() -> dict[str, str]:
    """The Ray settings the fleet starts with (ops/fleet.env): `make serve`, the benchmarks
    and the test cluster all read them here."""
    lines = (Path(__file__).resolve().parent / "ops" / "fleet.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def application_config(
    args: dict[str, Any], name: str, route_prefix: str = "/", import_path: str = "graph:build_app"
) -> dict[str, Any]:
    """One application of a Serve config, as serve_config.yaml declares it: the fleet's
    replica counts need the application-level policy, which only a config can set."""
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": import_path,
        "autoscaling_policy": {"policy_function": POLICY_FUNCTION},
        "args": args,
    }


def deploy(applications: list[dict[str, Any]], timeout: float = 180) -> None:
    """Deploy these applications (`application_config`s) on the running Serve instance and
    wait until they run. Declarative, as `serve deploy`: config-deployed applications not
    in the list are deleted."""
    import time

    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema(applications=applications))
    deadline = time.monotonic() + timeout
    names = {app["name"] for app in applications}
    while time.monotonic() < deadline:
        statuses = {name: serve.status().applications.get(name) for name in names}
        failed = {n: s.message for n, s in statuses.items() if s and s.status in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RuntimeError(f"applications failed to deploy: {failed}")
        if all(s is not None and s.status == "RUNNING" for s in statuses.values()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"applications {sorted(names)} were not running after {timeout:.0f} s")


def direct_ingress_port(app_name: str, timeout: float = 60) -> int:
    """The port on which the application's ingress replica serves HTTP itself (Serve's direct
    ingress, on in ops/fleet.env), once it does; Serve's proxy port answers the same routes
    one hop slower."""
    import time

    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        groups = ray.get(controller.get_target_groups.remote(app_name))
        ports = [
            target.port
            for group in groups
            if group.protocol == RequestProtocol.HTTP and group.ingress_deployment_name
            for target in group.targets
        ]
        if ports:
            return ports[0]
        time.sleep(0.2)
    raise TimeoutError(
        f"application {app_name!r} serves no HTTP port of its own after {timeout:.0f} s: is "
        "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in the environment Ray started with (ops/fleet.env)?"
    )


def _on_node(selector: dict[str, str] | None) -> dict[str, Any]:
    """A model replica's actor options: on the node whose labels match `selector`, if any,
    in a worker that imported MLX and the model servers (`deployments.warm_workers`)."""
    return {
        "num_cpus": 0,
        "runtime_env": model_runtime_env(),
        **({"label_selector": selector} if selector else {}),
    }
