"""Checkpoints that survive kill -9: sealed with checksums before they get their final name, verified before
a resume, and deleted by rotation only after being renamed aside.

`LoraTrainer` writes each checkpoint into a staging folder, seals it (`seal`: the sha256 of every file,
Trainer's own optimizer and RNG state included), and renames it into place. So a folder named
checkpoint-N is complete, and a damaged file in it is found and named before training resumes from it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.errors import LorakitError
from ..core.files import sha256_file, write_json_atomic

CHECKSUMS = "lorakit_checkpoint.json"
TRASH = ".lorakit-trash-"  # a checkpoint being deleted: renamed aside first, so no half-deleted one keeps its name
STAGING = ".lorakit-staging"  # where LoraTrainer writes a checkpoint until it is complete


def clear_leftovers(run_dir: Path) -> None:
    """A killed run's half-written checkpoint (staging) and half-deleted ones (renamed aside to trash)."""
    for leftover in [run_dir / STAGING, *run_dir.glob(TRASH + "*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def publish(run_dir: Path, name: str, save_total_limit: int | None, best: str | None) -> None:
    """Seal checkpoint `name`, complete in the staging folder, and rename it into place; the same step saved
    again (a resumed run) is swapped, never deleted first. Then rotate, keeping `best`."""
    staging = run_dir / STAGING
    done, final = staging / name, run_dir / name
    seal(done)
    if final.exists():
        os.replace(final, run_dir / (TRASH + name))
    os.replace(done, final)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(run_dir / (TRASH + name), ignore_errors=True)
    rotate(run_dir, save_total_limit, best)


def seal(folder: Path) -> None:
    """Record the sha256 of every file of a finished checkpoint folder, those in its subfolders too (DeepSpeed
    writes its state into global_stepN/, FSDP's sharded optimizer state is a folder), by relative path."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / CHECKSUMS]
    write_json_atomic(folder / CHECKSUMS, {p.relative_to(folder).as_posix(): sha256_file(p) for p in files})


def verify_checkpoint(folder: Path) -> None:
    """Every file of a checkpoint against the checksums written when it was sealed; a damaged one is named,
    with the checkpoint to use instead."""
    from transformers.trainer_utils import sort_checkpoints

    def damaged(what: str) -> LorakitError:
        older = [c for c in sort_checkpoints(str(folder.parent), PREFIX_CHECKPOINT_DIR, False)
                 if Path(c).name != folder.name and _step(c) < _step(folder)]
        return LorakitError(f"{folder}: {what}", hint=f"resume from {Path(older[-1]).name} instead" if older
                            else "start a fresh run in another output_dir")

    if not folder.is_dir():
        raise LorakitError(f"{folder} is not a checkpoint folder", hint="pass a checkpoint-N folder, or True")
    sums = folder / CHECKSUMS
    try:
        expected = json.loads(sums.read_text())
    except FileNotFoundError:
        raise damaged(f"{CHECKSUMS} is missing: the checkpoint was not written by LoraTrainer, or not completely"
                      ) from None
    except json.JSONDecodeError:
        raise damaged(f"{CHECKSUMS} is corrupt") from None
    for name, digest in expected.items():
        if not (folder / name).is_file():
            raise damaged(f"{name} is missing")
        if sha256_file(folder / name) != digest:
            raise damaged(f"{name} is damaged (truncated or changed since it was saved)")


def _step(path: str | Path) -> int:
    return int(Path(path).name.rsplit("-", 1)[-1])


def rotate(run_dir: Path, limit: int | None, best: str | None) -> None:
    """transformers' rotation rule (keep `limit`, the newest and the best), but each old checkpoint is
    renamed aside before it is deleted: a kill mid-delete leaves no broken folder named like a checkpoint."""
    from transformers.trainer_utils import sort_checkpoints

    if not limit or limit <= 0:
        return
    checkpoints = sort_checkpoints(str(run_dir), PREFIX_CHECKPOINT_DIR, False)
    protected = {checkpoints[-1], *([str(Path(best))] if best else [])} if checkpoints else set()
    surplus = len(checkpoints) - max(limit, len(protected))
    for checkpoint in [c for c in checkpoints if c not in protected][:max(surplus, 0)]:
        trash = run_dir / (TRASH + Path(checkpoint).name)
        os.replace(checkpoint, trash)
        shutil.rmtree(trash)
