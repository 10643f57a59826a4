"""Start-up errors a user can act on: the checkpoint is checked before anything is deployed,
and when a deployment still fails, the replica's own error is read back from Serve.

Without this, a replica that cannot start (no tokenizer, unreadable weights) shows the user
only Ray's "Failed to update the deployments ['MaverickServer']"; the cause sits in the Serve
controller's log on the head node.
"""

from __future__ import annotations

from pathlib import Path


class DeployError(RuntimeError):
    """The application could not be deployed; the message carries the cause."""


def check_checkpoint(path: str | Path, chat_template: str = "") -> None:
    """What a replica reads first, checked where the user is: config.json, the tokenizer, the
    chat template override (`chat_template`: readable, compiles) and the weight index. Raises
    ConfigError or CheckpointError naming the file and the fix. A checkpoint without any chat
    template passes: it serves completions, and chat requests get a 400 saying why."""
    from ..checkpoint.tokenizer import ChatTokenizer
    from ..checkpoint.errors import CheckpointError
    from ..checkpoint.loader import weight_map
    from ..config import ModelConfig

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    ModelConfig.from_pretrained(path)
    ChatTokenizer.from_pretrained(path, chat_template or None)  # the server renders chat prompts
    weight_map(path)


def replica_error(app_name: str) -> str | None:
    """The failing deployment's own error (the last line of the replica's traceback, which names
    the exception and its message), or None when Serve reports none."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return None
    for name, dep in app.deployments.items():
        lines = [ln.strip() for ln in (dep.message or "").splitlines() if ln.strip()]
        if lines:
            return f"deployment {name}: {lines[-1]}"
    return app.message or None


def run_app(app, name: str, route_prefix: str = "/") -> None:
    """serve.run that raises DeployError with the replica's own error when the deployment fails."""
    from ray import serve

    try:
        serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as e:
        cause = replica_error(name)
        raise DeployError(f"{e}\n  cause: {cause}" if cause else str(e)) from None
