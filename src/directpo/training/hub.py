"""Pushing a finished run to the Hugging Face Hub (`--push-to-hub`), after its model card is written
(`card`).

    push_to_hub(out_dir, repo_id, token=None, private=False) -> the repo's URL
    check_repo_id(repo_id)   a bad --push-to-hub refused before the run, not after it

What goes: weights, tokenizer, model card, settings and metrics (TensorBoard logs too); never
checkpoints/ (`IGNORE_PATTERNS`). Pushing renames the card's title and loading snippet from the
local directory to the repo.
"""
from __future__ import annotations

from pathlib import Path

from ..diskio import write_text
from ..errors import UserValueError
from .card import CARD_FILE

# Never uploaded: checkpoints (optimizer state, many copies of the weights), PPO's intermediate
# snapshots, W&B's local run files, and what a crashed write leaves behind.
IGNORE_PATTERNS = ["checkpoints/*", "snapshots/*", "wandb/*", ".tmp-*", "*.tmp", ".write-test-*"]


def check_repo_id(repo_id: str) -> None:
    """A Hub repo id (`name` or `owner/name`), checked here before the run rather than after it."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError:
        raise UserValueError(f"--push-to-hub {repo_id!r}: not a Hugging Face repo id (`name` or `owner/name`, of "
                             "letters, digits, '-', '_' and '.')") from None


def upload_plan(out_dir: str | Path) -> dict:
    """What push_to_hub sends: the folder and the patterns it leaves out. Refuses a folder
    without a model in it."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such run directory")
    if not any((out / f).exists() for f in ("config.json", "adapter_config.json")):
        raise UserValueError(f"{out}: no model to upload (no config.json or adapter_config.json): push a finished run")
    if not (out / CARD_FILE).exists():
        raise UserValueError(f"{out}: no {CARD_FILE} model card: write it first (write_model_card)")
    return {"folder_path": str(out), "ignore_patterns": list(IGNORE_PATTERNS)}


def name_card(out_dir: str | Path, repo_id: str) -> None:
    """The card's title and loading snippet name the Hub repo instead of the local directory."""
    out = Path(out_dir)
    path, local = out / CARD_FILE, out.resolve().name
    text = path.read_text(encoding="utf-8")
    named = text.replace(f'.from_pretrained("{local}")', f'.from_pretrained("{repo_id}")')
    named = named.replace(f"\n# {local}\n", f"\n# {repo_id.split('/')[-1]}\n", 1)
    if named != text:
        write_text(path, named)


def push_to_hub(out_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the Hub model repo `repo_id` (kept if it exists) and upload the run directory to it:
    weights, tokenizer, model card, settings and metrics (TensorBoard logs too, which the Hub shows),
    never checkpoints/. Returns the repo's URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    plan = upload_plan(out_dir)
    name_card(out_dir, repo_id)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=getattr(url, "repo_id", None) or repo_id, repo_type="model",
                      commit_message=f"directpo: upload {Path(out_dir).resolve().name}", **plan)
    return str(url)
