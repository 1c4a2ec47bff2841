"""What the `lorakit` command shows besides its results: the version, a progress line, and nothing else.

Every command prints its own lines only: transformers' progress bars and log lines ("Loading weights"),
DeepSpeed's notices (printed to stdout when accelerate imports it) and the Python warnings of the libraries
under lorakit are kept out; lorakit's own warnings and log lines still show.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator


def version() -> str:
    """lorakit's version from the installed package's metadata (pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("lorakit")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        return "(not installed)"


@contextlib.contextmanager
def quiet(loads_transformers: bool) -> Iterator[None]:
    """See the module docstring. `loads_transformers`: the command imports transformers anyway, so its logging
    switches cost nothing more (others do not pay the import)."""
    deepspeed = logging.getLogger("DeepSpeed")  # from its import on, DeepSpeed logs to stdout, not propagating
    deepspeed.addFilter(_errors_only)
    with warnings.catch_warnings(), _finally(lambda: deepspeed.removeFilter(_errors_only)):
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"lorakit(\.|$)")
        if not loads_transformers:
            yield
            return
        from transformers.utils import logging as hf_logging

        bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity(logging.ERROR)
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _finally(undo: Callable[[], None]) -> Iterator[None]:
    try:
        yield
    finally:
        undo()


def progress_line(label: str) -> Callable[[str | None], None]:
    """On a terminal, one stderr line rewritten in place ("simulating lora, checkpointing on, batch 4");
    None clears it. Off a terminal, nothing: logs and pipes get the results only."""
    def show(text: str | None) -> None:
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K" + (f"{label} {text} ..." if text else ""))
            sys.stderr.flush()
    return show
