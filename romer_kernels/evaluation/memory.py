"""How much memory an analog MoE model needs, estimated from its configuration alone.

``estimate_memory(model_or_config, config, placement)`` builds the model on the meta device (no weights,
no memory), converts it with the package's own ``analogize_`` to learn which matrices go on analog tiles,
and adds up, per module category:

- digital weights: every parameter in ``weight_dtype`` (the analog layers keep their digital weights, to
  re-program and for checkpoints; ``keep_digital=False`` drops those of analog matrices);
- chip state: what the simulated chips hold (the state model below);
- activations for ``tokens`` tokens: the largest single module call of the category in float32, plus the
  KV cache and one layer's attention scores, the residual-stream buffers, and the per-call temporaries.

The chip-state model is what romer_kernels.nn.chip.LayerChip holds (one weight-sized tensor per analog
matrix, noise regenerated from the seed instead of stored; tests/test_chip_memory.py counts it); its
constants and formulas are all in the "state model" section below, so that they can be adjusted in one
place. It is an estimate: measured RSS comes from
benchmarks/bench_memory.py (docs/scale.md).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.kernels.backends import supports_on_the_fly
from romer_kernels.nn.chip import STATE_DTYPES
from romer_kernels.config.presets import resolve_config

if TYPE_CHECKING:
    from romer_kernels.moe.convert import Placement

# romer_kernels.moe.convert and romer_kernels.nn are imported where they are used: they load the C++
# extension, which parse_size, the tables and the config loading do not need.

CONFIG_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "configs"

FLOAT32_BYTES = 4
WEIGHT_DTYPES = STATE_DTYPES  # the same three dtypes for digital weights and chip state
DEVICES = ("cpu", "cuda")

# Rows of the table, in order: the conversion's categories with "other" split into embeddings and the rest.
CATEGORY_LABELS = {
    "attention": "attention",
    "router": "router",
    "experts": "routed experts",
    "shared_experts": "shared experts",
    "dense_mlp": "dense MLP",
    "embeddings": "embeddings",
    "lm_head": "lm_head",
    "other": "norms/other",
}
HIDDEN_STATES_ROW = "hidden states"
TEMPORARIES_ROW = "per-call temporaries"


# -- state model ---------------------------------------------------------------------------------------
# On "cpu" each analog matrix [out, in] is a LayerChip: ONE state tensor of out*in elements in the state
# dtype (the programmed, then drifted weights; programming noise, drift exponents and read noise are drawn
# again from the seed, never stored), plus float32 vectors [n_in_tiles, out]: the output scales, and the
# drift-compensation baseline when the config compensates drift.
# On "cuda" (Triton backend) it is an OnTheFlyChip: NO weight-sized tensor, the kernel generates the
# chip's weights from the digital ones in every MVM; it keeps only [n_in_tiles, out] vectors: the
# programming plan's scale, the weight-scaling and output scales, the read step's scales, the baseline.
def per_column_vectors(config: AnalogConfig, device: str = "cpu") -> int:
    compensates = config.drift_compensation.kind != "none"
    if device == "cuda":
        return (3 + compensates + (config.mapping.weight_scaling_omega > 0)
                + (config.noise is not None))
    return 1 + compensates


# Residual stream, its normalised copy, attention output and MLP output, float32, per token.
HIDDEN_FLOAT32_BUFFERS = 4


def input_tiles(in_features: int, config: AnalogConfig) -> int:
    """Number of crossbar tiles along the input of an [out, in_features] matrix (0 = no split)."""
    max_in = config.tile.max_input_size
    return 1 if max_in <= 0 else math.ceil(in_features / max_in)


def per_column_vector_bytes(out_features: int, in_features: int, config: AnalogConfig, device: str = "cpu") -> int:
    """The small float32 vectors one analog matrix holds on ``device``."""
    return per_column_vectors(config, device) * input_tiles(in_features, config) * out_features * FLOAT32_BYTES


def chip_state_bytes(out_features: int, in_features: int, config: AnalogConfig, state_dtype: str,
                     device: str) -> int:
    """Bytes one programmed analog matrix holds between calls on ``device``: on "cpu" its state tensor
    and per-column vectors; on "cuda" (on-the-fly chip) the per-column vectors only."""
    vectors = per_column_vector_bytes(out_features, in_features, config, device)
    if device == "cuda":
        if not supports_on_the_fly(config):  # a stored chip: its float32 copy on the device
            return out_features * in_features * FLOAT32_BYTES + per_column_vector_bytes(out_features, in_features, config)
        return vectors
    return out_features * in_features * STATE_DTYPES[state_dtype].itemsize + vectors


def per_call_temporaries(matrices: list["AnalogMatrixShape"], config: AnalogConfig, state_dtype: str,
                         device: str, weight_dtype: str = "float32") -> list[tuple[str, int]]:
    """(what, bytes) of the float32 temporaries of one call, for the largest analog matrix (one matrix is
    worked on at a time, so they are counted once, not per matrix)."""
    if not matrices:
        return []
    largest = max(matrices, key=lambda m: m.out_features * m.in_features)
    largest_bytes = largest.out_features * largest.in_features * FLOAT32_BYTES
    shape = f"{largest.out_features}x{largest.in_features}"
    temporaries = []
    if device == "cuda":  # on-the-fly chips read the digital weights in place, in their own dtype
        return temporaries
    if state_dtype != "float32":
        # the MVM reads a float32 copy of a reduced-precision state
        temporaries.append((f"float32 copy of the {state_dtype} state ({shape})", largest_bytes))
    io = config.io
    if not io.is_perfect and (io.ir_drop > 0 or io.w_noise_type == "pcm_read"):
        tile = max(matrices, key=lambda m: m.out_features * _tile_inputs(m.in_features, config))
        tile_bytes = tile.out_features * _tile_inputs(tile.in_features, config) * FLOAT32_BYTES
        temporaries.append((f"|W| of one tile ({tile.out_features}x{_tile_inputs(tile.in_features, config)}, "
                            "IR drop / PCM read noise)", tile_bytes))
    # nn.chip.ChipScratch: float32 copy of a non-float32 digital weight, the weight-scaled target, the
    # working copy of a reduced-precision state; kept by the process, sized to the largest matrix
    copies = (weight_dtype != "float32") + (config.mapping.weight_scaling_omega > 0) + (state_dtype != "float32")
    if copies:
        temporaries.append((f"chip scratch ({copies} float32 copies of {shape}, programming / drift)",
                            copies * largest_bytes))
    return temporaries


def _tile_inputs(in_features: int, config: AnalogConfig) -> int:
    max_in = config.tile.max_input_size
    return in_features if max_in <= 0 else min(in_features, max_in)


# -- result --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnalogMatrixShape:
    """``count`` analog matrices of shape [out_features, in_features] in one category."""

    category: str
    out_features: int
    in_features: int
    count: int = 1


@dataclass
class MemoryRow:
    """One component of the estimate; bytes are totals over every module of the category."""

    name: str
    parameters: int = 0
    analog_parameters: int = 0
    analog_matrices: int = 0
    digital_bytes: int = 0
    chip_bytes: int = 0
    activation_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.digital_bytes + self.chip_bytes + self.activation_bytes


@dataclass
class MemoryEstimate:
    """The estimate: ``rows`` per category, then the hidden states and the per-call temporaries."""

    model: str
    preset: str
    weight_dtype: str
    state_dtype: str
    device: str
    keep_digital: bool
    tokens: int
    rows: list[MemoryRow]
    temporaries: list[tuple[str, int]] = field(default_factory=list)

    def row(self, name: str) -> MemoryRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    parameters = property(lambda self: sum(r.parameters for r in self.rows))
    analog_parameters = property(lambda self: sum(r.analog_parameters for r in self.rows))
    digital_bytes = property(lambda self: sum(r.digital_bytes for r in self.rows))
    chip_bytes = property(lambda self: sum(r.chip_bytes for r in self.rows))
    activation_bytes = property(lambda self: sum(r.activation_bytes for r in self.rows))
    total_bytes = property(lambda self: sum(r.total_bytes for r in self.rows))

    def fits(self, memory_bytes: int | float | str) -> bool:
        """Whether the estimated total fits in ``memory_bytes`` (a number of bytes or a size like "80GB")."""
        return self.total_bytes <= _as_bytes(memory_bytes)

    def fit_line(self, memory_bytes: int | float | str) -> str:
        limit = _as_bytes(memory_bytes)
        label = memory_bytes if isinstance(memory_bytes, str) else format_bytes(limit)
        if label.strip().lower().endswith("ib"):  # binary units: also in the decimal ones of the numbers
            label += f" ({format_bytes(limit)})"
        need = self.total_bytes
        if need <= limit:
            return f"fits in {label}: needs {format_bytes(need)}, {format_bytes(limit - need)} left"
        return f"does not fit in {label}: needs {format_bytes(need)}, {format_bytes(need - limit)} over"

    def table(self) -> str:
        """The estimate as a fixed-width text table, with the temporaries and the assumptions below it."""
        header = ("component", "parameters", "analog params", "digital weights", "chip state", "activations", "total")
        lines = [header]
        for row in self.rows:
            lines.append((row.name, _count(row.parameters), _count(row.analog_parameters),
                          format_bytes(row.digital_bytes), format_bytes(row.chip_bytes),
                          format_bytes(row.activation_bytes), format_bytes(row.total_bytes)))
        lines.append(("total", _count(self.parameters), _count(self.analog_parameters),
                      format_bytes(self.digital_bytes), format_bytes(self.chip_bytes),
                      format_bytes(self.activation_bytes), format_bytes(self.total_bytes)))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

        def render(line):
            return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

        rule = "-" * len(render(header))
        out = [f"{self.model}: memory estimate, preset {self.preset}, weights {self.weight_dtype}, "
               f"chip state {self.state_dtype}, device {self.device}, {self.tokens} tokens"
               + ("" if self.keep_digital else ", digital copies of analog weights dropped"),
               render(header), rule, *map(render, lines[1:-1]), rule, render(lines[-1])]
        if self.temporaries:
            out.append("per-call temporaries (largest matrix, counted once):")
            out += [f"  {what}: {format_bytes(size)}" for what, size in self.temporaries]
        if self.device == "cuda":
            out.append("chip state on cuda: on-the-fly chips (Triton), per-column vectors only; the kernel "
                       "generates each chip's weights from the digital weights in every MVM")
        return "\n".join(out)


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 10**6 else f"{n:,}"


def format_bytes(n: int | float) -> str:
    """Decimal units (GB = 1e9 bytes), as GPU memory is usually quoted."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*$")


def parse_size(text: str) -> int:
    """Bytes in a size like "80GB" (GB = 1e9 bytes), "141GiB" (GiB = 2**30), "512MB" or "1.5TB"."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise ValueError(f"bad memory size {text!r}: give a number and a unit, e.g. 80GB, 141GiB or 512MB "
                         "(units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB; "
                         "GB = 1e9 bytes, GiB = 2**30 bytes)")
    size = int(float(match.group(1)) * unit)
    if size <= 0:
        raise ValueError(f"bad memory size {text!r}: it must be more than 0 bytes")
    return size


def _as_bytes(memory: int | float | str) -> int:
    if isinstance(memory, str):
        return parse_size(memory)
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0:
        raise ValueError(f"memory must be a positive number of bytes or a size like '80GB', got {memory!r}")
    return int(memory)


# -- model configurations ------------------------------------------------------------------------------
def bundled_configs() -> list[str]:
    """Names of the real model configurations shipped in ``romer_kernels/assets/configs``."""
    if not CONFIG_ASSETS.is_dir():
        return []
    return sorted(p.stem for p in CONFIG_ASSETS.glob("*.json"))


def _config_from_json(path: Path):
    from transformers import CONFIG_MAPPING  # noqa: PLC0415

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable model config.json ({error})") from error
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not model_type:
        raise ValueError(f"{path}: no 'model_type' in the config, so its transformers config class is unknown")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: model_type {model_type!r} is not built into this transformers (remote-code "
                         "models are not supported by the memory estimate)")
    return CONFIG_MAPPING[model_type].from_dict(data)


def load_model_config(model: Any):
    """A transformers ``PretrainedConfig`` from a config, a model, a bundled config or model name, a
    ``config.json`` file, a model folder, or a hub id already in the local cache (never the network)."""
    from transformers import AutoConfig, PretrainedConfig  # noqa: PLC0415

    from romer_kernels.models.loading import resolve_model_path  # noqa: PLC0415

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, nn.Module):
        if not isinstance(getattr(model, "config", None), PretrainedConfig):
            raise TypeError(f"{type(model).__name__} has no transformers config to rebuild it from")
        return model.config
    if not isinstance(model, (str, Path)):
        raise TypeError(f"expected a model name, path or transformers config, got {type(model).__name__}")
    text = str(model)
    if "/" not in text and (CONFIG_ASSETS / f"{text}.json").is_file():
        return _config_from_json(CONFIG_ASSETS / f"{text}.json")
    path = Path(text).expanduser()
    if path.is_file():
        return _config_from_json(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a transformers model folder")
        return _config_from_json(path / "config.json")
    if text.endswith(".json") or text.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no such file or folder: {text}")
    try:
        resolved = resolve_model_path(text)  # bundled model names; hub ids pass through unchanged
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; bundled configs: {', '.join(bundled_configs()) or 'none'}") from None
    if Path(resolved).is_dir():
        return _config_from_json(Path(resolved) / "config.json")
    try:
        return AutoConfig.from_pretrained(text, local_files_only=True)
    except ValueError as error:  # cached, but transformers does not know the architecture
        raise ValueError(f"{text}: unsupported model configuration ({error})") from error
    except OSError as error:
        raise FileNotFoundError(f"{text!r} is not in the local Hugging Face cache and the memory estimate does not "
                                "use the network: pass a bundled config name "
                                f"({', '.join(bundled_configs()) or 'none'}), a config.json or a model folder") from error


def meta_model(model_config) -> nn.Module:
    """The causal LM of ``model_config`` on the meta device: every shape, no memory."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(model_config)
        except ValueError as error:  # transformers: unrecognized configuration class
            raise ValueError(f"{model_config.model_type}: not a causal LM architecture transformers can build "
                             f"({error})") from error


# -- the estimate --------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype | str, allowed: dict[str, torch.dtype], what: str) -> str:
    if isinstance(dtype, torch.dtype):
        for name, value in allowed.items():
            if value == dtype:
                return name
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in allowed:
        return dtype.removeprefix("torch.")
    raise ValueError(f"unknown {what} {dtype!r}; use one of {', '.join(allowed)}")


def _preset_name(config: AnalogConfig | str | None, analog_config: AnalogConfig) -> str:
    from romer_kernels.config.presets import PRESETS  # noqa: PLC0415

    if isinstance(config, str):
        return config
    return next((name for name, make in PRESETS.items() if make() == analog_config), "custom config")


def _analog_view(model: nn.Module):
    """Per module: (category, parameters, analog parameters, analog matrices) of a converted model."""
    from romer_kernels.moe.convert import categorize  # noqa: PLC0415
    from romer_kernels.nn.analog_experts import AnalogExperts  # noqa: PLC0415
    from romer_kernels.nn.analog_linear import AnalogLinear  # noqa: PLC0415
    from romer_kernels.nn.analog_weight import AnalogSlices, AnalogWeight  # noqa: PLC0415

    # chips answering products on a weight: a router's own, or that of its scoring child (gate.wg)
    from romer_kernels.moe.structure import router_weight_modules  # noqa: PLC0415

    routers = router_weight_modules(model)
    adapters = {id(w): m.analog for m in model.modules() if isinstance(getattr(m, "analog", None), AnalogWeight)
                for w in m.analog.analog_weights()}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        adapter = next((adapters[id(p)] for _, p in own if id(p) in adapters), None)
        category = "embeddings" if isinstance(module, nn.Embedding) else categorize(name, module, routers) if name else "other"
        params = sum(p.numel() for _, p in own)
        matrices: list[AnalogMatrixShape] = []
        if isinstance(module, AnalogExperts):
            analog_experts = module.num_experts - len(module.digital_experts)
            two_inter, hidden = module.gate_up[0].out_features, module.hidden_dim
            if analog_experts:
                # each expert's gate_up [2I, H] and down [H, I] are separate analog matrices
                matrices = [AnalogMatrixShape(category, two_inter, hidden, analog_experts),
                            AnalogMatrixShape(category, hidden, module.intermediate_dim, analog_experts)]
            analog = (two_inter * hidden + hidden * module.intermediate_dim) * analog_experts
        elif isinstance(module, AnalogLinear):
            matrices = [AnalogMatrixShape(category, module.out_features, module.in_features)]
            analog = module.weight.numel()  # the bias is added digitally
        elif adapter is not None:
            matrices = [AnalogMatrixShape(category, adapter.block_rows, adapter.matrix.in_features, adapter.blocks)]
            analog = adapter.weight.numel()
        elif isinstance(getattr(module, "analog", None), AnalogSlices):  # expert slices of its own parameters
            slices = module.analog.slices.values()
            matrices = [AnalogMatrixShape(category, *((c, r) if t else (r, c)), e) for e, r, c, t in slices]
            analog = sum(e * r * c for e, r, c, _ in slices)
        else:
            analog = 0
        yield name, module, category, params, analog, matrices


def _module_call_bytes(module: nn.Module, tokens: int, top_k: int) -> int:
    """float32 inputs and outputs of one call of a weight-carrying module on ``tokens`` tokens."""
    from romer_kernels.moe.convert import is_fused_experts  # noqa: PLC0415

    if is_fused_experts(module):
        first = getattr(module, "gate_up_proj", None)
        _, two_inter, hidden = (first if isinstance(first, torch.Tensor) else module.up_proj).shape
        rows = tokens * top_k  # every routed (token, expert) pair: gathered input, gate_up, act, down output
        return rows * (hidden + two_inter + two_inter // 2 + hidden) * FLOAT32_BYTES
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Embedding):
        return tokens * module.embedding_dim * FLOAT32_BYTES
    if isinstance(weight, nn.Parameter) and weight.dim() == 2:
        out_features, in_features = weight.shape
        return tokens * (in_features + out_features) * FLOAT32_BYTES
    return 0


def _attention_bytes(text_config, tokens: int, weight_dtype: str) -> int:
    """KV cache of every layer (in the weight dtype) plus one layer's float32 attention scores."""
    heads = getattr(text_config, "num_attention_heads", None)
    hidden = getattr(text_config, "hidden_size", None)
    layers = getattr(text_config, "num_hidden_layers", None)
    if not (heads and hidden and layers):
        return 0
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    # multi-head latent attention (DeepSeek-V2/V3) caches keys of nope + rope dims and values of v_head_dim
    key_dim = (getattr(text_config, "qk_nope_head_dim", 0) + getattr(text_config, "qk_rope_head_dim", 0)) or head_dim
    value_dim = getattr(text_config, "v_head_dim", None) or head_dim
    kv_cache = layers * tokens * kv_heads * (key_dim + value_dim) * WEIGHT_DTYPES[weight_dtype].itemsize
    scores = heads * tokens * tokens * FLOAT32_BYTES
    return kv_cache + scores


def estimate_memory(model_or_config: Any, config: AnalogConfig | str | None = None,
                    placement: "Placement | None" = None, *,
                    weight_dtype: torch.dtype | str = torch.bfloat16, state_dtype: str | torch.dtype | None = None,
                    device: str = "cpu", keep_digital: bool = True, tokens: int = 2048) -> MemoryEstimate:
    """Memory an analog model needs: digital weights, chip state and activations, per module category.

    ``model_or_config``: a bundled config name (``bundled_configs()``), a bundled model name, a
    ``config.json`` file, a model folder, a cached hub id, a ``PretrainedConfig`` or a transformers model
    (only its config is used). ``config``: an ``AnalogConfig`` or preset name (default aihwkit-default).
    ``placement``: a ``Placement`` (default: everything analog but lm_head). ``state_dtype``: the chip
    state's dtype (default ``config.state_dtype``, float32 where the config has no such field).
    ``device``: "cpu" (chips hold their state) or "cuda" (on-the-fly chips: per-column vectors only). ``tokens``: tokens in one forward (batch x sequence) for the activations.
    """
    from romer_kernels.moe.convert import CATEGORIES, Placement, analogize_  # noqa: PLC0415

    analog_config = resolve_config(config)
    preset_name = _preset_name(config, analog_config)
    placement = placement or Placement()
    weight_name = _dtype_name(weight_dtype, WEIGHT_DTYPES, "weight dtype")
    state_name = _dtype_name(getattr(analog_config, "state_dtype", "float32") if state_dtype is None else state_dtype,
                             STATE_DTYPES, "state dtype")
    device_type = device if device in DEVICES else None
    if device_type is None:
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device_type == "cuda" and not keep_digital:
        raise ValueError("keep_digital=False cannot hold on device 'cuda': on-the-fly chips compute from the "
                         "digital weights")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")

    model_config = load_model_config(model_or_config)
    model = meta_model(model_config)
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    top_k = getattr(text_config, "num_experts_per_tok", None) or 1
    if any(getattr(placement, category) for category in CATEGORIES):
        # analogize_ only builds the analog modules here (chips are programmed lazily, at the first forward
        # or program_()), so it runs on meta tensors and decides exactly as it does for a real model.
        # what stays digital is counted as digital memory, so an estimate never refuses a model
        analogize_(model, analog_config, placement, allow_digital=True)

    rows = {key: MemoryRow(label) for key, label in CATEGORY_LABELS.items()}
    weight_bytes = WEIGHT_DTYPES[weight_name].itemsize
    all_matrices: list[AnalogMatrixShape] = []
    largest_call = dict.fromkeys(rows, 0)
    for _, module, category, params, analog, matrices in _analog_view(model):
        row = rows[category]
        row.parameters += params
        row.analog_parameters += analog
        row.analog_matrices += sum(m.count for m in matrices)
        row.digital_bytes += (params - (0 if keep_digital else analog)) * weight_bytes
        row.chip_bytes += sum(m.count * chip_state_bytes(m.out_features, m.in_features, analog_config, state_name,
                                                         device_type) for m in matrices)
        all_matrices += matrices
        # modules run one after the other: a category's activations are its largest single call
        largest_call[category] = max(largest_call[category], _module_call_bytes(module, tokens, top_k))
    for category, size in largest_call.items():
        rows[category].activation_bytes = size
    rows["attention"].activation_bytes += _attention_bytes(text_config, tokens, weight_name)

    hidden = getattr(text_config, "hidden_size", 0) or 0
    hidden_states = MemoryRow(HIDDEN_STATES_ROW,
                              activation_bytes=HIDDEN_FLOAT32_BUFFERS * tokens * hidden * FLOAT32_BYTES)
    temporaries = per_call_temporaries(all_matrices, analog_config, state_name, device_type, weight_name)
    temporary_row = MemoryRow(TEMPORARIES_ROW, activation_bytes=sum(size for _, size in temporaries))
    name = model_or_config if isinstance(model_or_config, (str, Path)) else getattr(model_config, "model_type", "model")
    return MemoryEstimate(model=str(name), preset=preset_name, weight_dtype=weight_name, state_dtype=state_name,
                          device=device_type, keep_digital=keep_digital, tokens=tokens,
                          rows=[*rows.values(), hidden_states, temporary_row], temporaries=temporaries)
