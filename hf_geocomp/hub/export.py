"""Export a compressed model as a folder ready for the Hub (atomic), and push it.

``export`` writes weights (safetensors only), config with the plan, tokenizer, a plot of the
plan and the model card into a temporary sibling folder that is renamed to ``out_dir`` only
when everything is written (:func:`hf_geocomp.io.output_dir`): an exception leaves nothing; a
killed process leaves only a hidden ``.<name>.*`` sibling, which the next export removes.
``push`` uploads a folder with ``huggingface_hub.HfApi``; a token is only ever handed to the
client, never printed, logged or written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import GeoCompError
from ..io import output_dir, write_json

if TYPE_CHECKING:
    from torch import nn

MARKER = ".hf_geocomp_export_pid"  # inside a temporary export folder while it is written


def _remove_stale(target: Path) -> None:
    """Remove temporary siblings of ``target`` left by an export whose process no longer exists."""
    for tmp in target.parent.glob(f".{target.name}.*"):
        marker = tmp / MARKER
        try:
            pid = int(marker.read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def export(model: nn.Module, out_dir: str, results: dict | None = None, tokenizer=None, base_model: str | None = None,
           command: str | None = None, repo_id: str | None = None, overwrite: bool = False,
           license: str | None = None, extra_files: dict | None = None) -> Path:
    """Write ``model`` (a geocomp model), its tokenizer, plan plot, ``results.json`` and model card to ``out_dir``.

    ``extra_files`` maps names in ``out_dir`` to files to copy there (plots, a resolved recipe), inside the same
    atomic write.
    """
    from .card import plot_plan, render_card
    from .shapes import stock_shapes

    plan = getattr(getattr(model.config, "quantization_config", None), "plan", None)
    if plan is None:
        raise GeoCompError("this model carries no geocomp plan; compress it (or call hub.mark_compressed) first.")
    if repo_id is not None:
        check_repo_id(repo_id)
    target = Path(out_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise GeoCompError(f"output folder {out_dir!r} already exists and is not empty; pass overwrite=True "
                           "(--overwrite) to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    with output_dir(out_dir, overwrite) as tmp:
        (tmp / MARKER).write_text(str(os.getpid()))
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plot = plot_plan(plan, stock_shapes(model), tmp / "plan.png")
        if results is not None:
            write_json(tmp / "results.json", results)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        card = render_card(model, results, base_model=base_model, repo_id=repo_id, command=command, plot=plot,
                           license=license)
        card.save(str(tmp / "README.md"))
        (tmp / MARKER).unlink()
    return target


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise GeoCompError(f"repo id {repo_id!r} is not valid: use 'namespace/name' (letters, digits, '-', '_', '.', "
                           "at most 96 characters).") from None
    if "/" not in repo_id:
        raise GeoCompError(f"repo id {repo_id!r} needs a namespace: use 'namespace/name'.")


def push(folder: str, repo_id: str, token: str | None = None, private: bool = False, endpoint: str | None = None,
         commit_message: str = "Upload geocomp model") -> str:
    """Upload an exported model ``folder`` (or a PEFT adapter folder) to ``repo_id`` (created if needed); returns
    the commit URL.

    ``token``: None uses huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    check_repo_id(repo_id)
    path = Path(folder)
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise GeoCompError(f"{folder!r} is not an exported model or adapter folder (config.json is missing).")
    if not any(path.glob("*.safetensors")):
        raise GeoCompError(f"{folder!r} has no safetensors weights to push.")
    from ..data import hub_unreachable

    why = hub_unreachable(endpoint, connect=True)
    if why:  # fail now, not after the client's retries
        raise GeoCompError(f"cannot push to {repo_id!r}: {why}" + ("; unset it to push." if "OFFLINE" in why else "."))
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(path), repo_id=repo_id, commit_message=commit_message,
                                 allow_patterns=["*.json", "*.safetensors", "*.md", "*.png", "*.txt", "*.jinja",
                                                 "tokenizer*", "*.model"])
    except OfflineModeIsEnabled:
        raise GeoCompError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set; unset it to push.") from None
    except HfHubHTTPError as e:  # the message names the URL and status, never the token
        raise GeoCompError(f"pushing to {repo_id!r} failed: {str(e).splitlines()[0]}") from None
    except Exception as e:
        # no connection (refused, reset, timed out): the HTTP client's TransportError (httpx in huggingface_hub 1.x,
        # httpx2 in 2.x), recognised by name so that neither has to be imported
        if not any(c.__name__ == "TransportError" for c in type(e).__mro__):
            raise
        raise GeoCompError(f"cannot push to {repo_id!r}: the Hub at {api.endpoint} cannot be reached "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}).") from None
    return str(info.commit_url)
