"""Find a model (local dir, zoo name, Hub id), read its config, load it.

`load` is `from_pretrained` with three additions: the task picks the Auto
class, `quant` becomes a `BitsAndBytesConfig` with lorakit's skip list (the
same one `wrap(quant=...)` uses, so both give identical layers), and the
model remembers where it came from and which weights the checkpoint lacked
(new heads), so that `wrap` trains them and manifests can name the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import os
import socket
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import LorakitError, ModelNotFoundError, QuantizationError, closest
from ..plan.make import make_plan
from ..plan.state import Source
from ..spec.specs import Quant, torch_dtype
from ..spec.zoo import find_bundled_config, zoo_names
from .gguf import gguf_checkpoint
from .quantize import bnb_config, require_bitsandbytes
from .tasks import auto_class, build_from_config, check_task, task_from_config

logger = logging.getLogger("lorakit")


def resolve_config(model: Any, *, trust_remote_code: bool = False, revision: str | None = None,
                   **config_kwargs: Any) -> tuple[Any, dict]:
    """(config, source) for a config object, a local dir, a zoo name, or a Hub id.

    `source` records where it came from, portably: a folder inside an installed Python package is named
    ``package:NAME/path`` (it resolves on any machine with that package), other folders by their path.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model, Source("config", getattr(model, "name_or_path", "") or model.model_type)
    name = str(model)
    path = package_path(name) if name.startswith("package:") else Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json",
                                     hint="point at a folder written by save_pretrained()")
        config = _build_config(lambda: AutoConfig.from_pretrained(
            path, trust_remote_code=trust_remote_code, **config_kwargs), name)
        return config, _folder_source(path.resolve())
    bundled = find_bundled_config(name)
    if bundled is not None:
        model_id, data = bundled
        if "torch_dtype" in data:  # the Hub files' old key name; transformers 5 reads `dtype`
            data = dict(data, dtype=data.pop("torch_dtype"))
        config = _build_config(lambda: AutoConfig.for_model(**{**data, **config_kwargs}), name)
        config._name_or_path = model_id
        return config, Source("zoo", model_id)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{name} is not a model directory",
                                 hint="pass a folder that holds config.json, a zoo name or a Hub id")
    try:
        try:  # the Hub cache first: no network, no retries
            config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code,
                                                local_files_only=True, **config_kwargs)
        except OSError:
            if not hub_reachable():
                raise
            config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code,
                                                **config_kwargs)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise LorakitError(f"{name} needs custom code from its repository to build",
                               hint="pass trust_remote_code=True only if you trust that code") from None
        raise ModelNotFoundError(_not_found_message(name), hint=_not_found_hint(name)) from None
    return config, Source("hub", name, revision=revision)


def package_path(name: str) -> Path:
    """The folder a ``package:NAME/path`` id names, in this machine's installed package NAME."""
    package, _, inside = name.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"{name} names the Python package {package!r}, which is not installed",
                                 hint=f"pip install the package that provides {package}, or pass a folder")
    return Path(spec.submodule_search_locations[0]) / inside


def _folder_source(path: Path) -> Source:
    """A folder's source: ``package:NAME/...`` when it lies inside an installed package, else its path."""
    for entry in map(Path, sys.path):
        if entry.name in ("site-packages", "dist-packages") and path.is_relative_to(entry.resolve()):
            package, *rest = path.relative_to(entry.resolve()).parts
            if package.isidentifier():
                return Source("package", "package:" + "/".join([package, *rest]), path=str(path))
    return Source("dir", str(path), path=str(path))


def _build_config(build: Any, name: str) -> Any:
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - any failure here comes from the user's config file
        raise LorakitError(f"transformers cannot build a config for {name}: {exc}",
                           hint="check config.json (model_type and dimensions), or upgrade transformers") from None


def hub_switched_off() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP probe of the Hub endpoint, so an offline machine fails in seconds rather than
    after huggingface_hub's retries with backoff (about 25 s)."""
    if hub_switched_off():
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _not_found_message(name: str) -> str:
    where = "is switched off (HF_HUB_OFFLINE=1)" if hub_switched_off() else (
        "cache does not have it" + ("" if hub_reachable() else ", and the Hub is unreachable"))
    return (f"cannot find model {name!r}: it is not a local directory, not bundled in adapters_zoo, "
            f"and the Hub {where}")


def _not_found_hint(name: str) -> str:
    near = closest(name, zoo_names() + [n.split("/")[-1] for n in zoo_names()])
    hint = "check the spelling, pass a local folder, or go online once so the Hub cache has it"
    return hint + (f"; bundled models close to it: {', '.join(near)}" if near else "")


def load(model: str | os.PathLike, *, task: str | None = None, quant: Quant | str | None = None,
         dtype: Any = None, device_map: Any = None, trust_remote_code: bool = False,
         revision: str | None = None, gguf_file: str | None = None, **from_pretrained_kwargs: Any) -> Any:
    """Load a pretrained model, optionally quantized to 8 or 4 bits, ready for `wrap`.

    `model` is a local directory, a zoo name or a Hub id; `task` picks the Auto
    class (default: from the config's architectures); `quant` is None, "8bit",
    "4bit" or a `Quant`. Weights are read from safetensors only, or from a GGUF
    file in `model` named by `gguf_file` (converted once to a cached safetensors folder).
    """
    if gguf_file is not None:
        model = gguf_checkpoint(model, gguf_file)
    check_task(task)
    quant = Quant.coerce(quant)
    config_only = {k: v for k, v in from_pretrained_kwargs.items() if k in ("num_labels", "id2label", "label2id")}
    config, source = resolve_config(model, trust_remote_code=trust_remote_code, revision=revision, **config_only)
    task = task or task_from_config(config)
    where = source.path or source.id
    kwargs: dict[str, Any] = dict(from_pretrained_kwargs, config=config, use_safetensors=True,
                                  trust_remote_code=trust_remote_code, revision=revision,
                                  output_loading_info=True)
    for key in config_only:
        kwargs.pop(key)
    if dtype is not None:
        kwargs["dtype"] = torch_dtype(dtype)
    if source.kind in ("hub", "zoo") and not hub_reachable():
        kwargs.setdefault("local_files_only", True)  # the cache only, without ~25 s of retries
        kwargs.setdefault("adapter_kwargs", {"local_files_only": True})  # the Auto classes' own adapter probe
    if quant is not None and getattr(config, "quantization_config", None) is not None:
        raise QuantizationError(f"{where} was saved quantized already; quant=... would not change what loads",
                                hint="drop quant=... to load it as saved, or load its full-precision checkpoint "
                                     "with quant=...")
    if quant is not None:
        require_bitsandbytes()
        skeleton = build_from_config(config, task, meta=True, trust_remote_code=trust_remote_code)
        # the same skip list wrap(quant=...) uses: both give identical layers
        kwargs["quantization_config"] = bnb_config(quant, make_plan(skeleton, quant=quant).quant_skipped,
                                                   torch_dtype(dtype) or _config_dtype(config))
        if device_map is not None or not _zero3():  # ZeRO-3 places the weights itself, and refuses a device_map
            kwargs["device_map"] = device_map if device_map is not None else _default_device()
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with quiet_loading():
            loaded, info = auto_class(task).from_pretrained(where, **kwargs)
    except Exception as exc:  # noqa: BLE001 - sorted into user mistakes and bugs by _loading_error
        error = _loading_error(source, where, exc, getattr(config, "quantization_config", None) is not None)
        if error is exc:
            raise
        raise error from None
    loaded.lorakit_source = dataclasses.replace(source, task=task,
                                                missing_keys=tuple(sorted(info.get("missing_keys", []))))
    _log_loading(source.id, info)
    return loaded


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers logs a LOAD REPORT table whenever a checkpoint lacks weights (a new head); lorakit
    records those keys and trains them, and says so in one line (`_log_loading`) instead. Its progress bar shows
    on a terminal only: in a log or a pipe it is a line of noise per load."""
    from transformers.utils import logging as hf_logging

    log = logging.getLogger("transformers.modeling_utils")

    def keep(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    log.addFilter(keep)
    switched_off = hf_logging.is_progress_bar_enabled() and not sys.stderr.isatty()
    if switched_off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        log.removeFilter(keep)
        if switched_off:
            hf_logging.enable_progress_bar()


def _log_loading(name: str, info: dict) -> None:
    missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
    if missing:
        heads = sorted({k.rsplit(".", 1)[0] for k in missing})
        logger.info("%s: %d weights not in the checkpoint, newly initialised and trained by wrap: %s",
                    name, len(missing), ", ".join(heads))
    if unexpected:
        logger.warning("%s: %d checkpoint weights this model does not use, e.g. %s", name, len(unexpected),
                       unexpected[0])


def _loading_error(source: Source, where: str, exc: Exception, quantized: bool) -> Exception:
    """A user-facing error for a failed from_pretrained, or the exception itself if it is a bug. `quantized`:
    the checkpoint was saved quantized, which transformers reads back for some families only."""
    if type(exc).__name__ == "SafetensorError":
        return LorakitError(f"the weights of {where} are corrupt or truncated ({exc})",
                            hint="re-save or re-download the model; lorakit reads safetensors only")
    if quantized and not isinstance(exc, OSError):
        return LorakitError(f"transformers cannot load the quantized checkpoint {where}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}",
                            hint="load its full-precision checkpoint with lorakit.load(path, quant=...), which "
                                 "quantizes as it loads")
    if not isinstance(exc, OSError):
        return exc
    if source.kind == "zoo":
        return ModelNotFoundError(f"{source.id} is bundled as a config only; its weights need the Hub or its cache",
                                  hint="use lorakit.report / compare-parameters for offline accounting, "
                                       "or download the model once and pass its folder")
    return ModelNotFoundError(f"cannot load weights for {where}: {exc}",
                              hint="the folder needs model.safetensors (lorakit never unpickles .bin files)")


def _config_dtype(config: Any) -> Any:
    import torch

    value = getattr(config, "dtype", None)
    return value if isinstance(value, torch.dtype) else None


def _zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
