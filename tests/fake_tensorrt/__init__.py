"""MOCK of TensorRT's Python module, for tests only. THIS IS NOT TENSORRT and builds nothing.

TensorRT cannot be installed on the machines onnxsparse is tested on, so the tests of ``onnxsparse.trt.builder``'s
API calls run against this stand-in, injected as ``sys.modules["tensorrt"]``. It mirrors the documented
surface that onnxsparse uses (``Builder``, ``create_network``, ``OnnxParser.parse_from_file``,
``BuilderFlag``, ``MemoryPoolType``, optimization profiles, timing cache, ``ILogger`` with ``Severity``,
``build_serialized_network``) and records every call in ``module.state`` so tests can check what was asked
for. Version differences follow NVIDIA's migration guide: the 11.x module has no ``BuilderFlag.FP16``/
``INT8`` (accessing them raises AttributeError as in the real 11.x bindings).

``build_serialized_network`` returns placeholder bytes that say they are a mock; nothing here is an engine.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

MOCK_ENGINE_BYTES = b"MOCK-TENSORRT-PLACEHOLDER: not an engine"

#: log lines in the wording TensorRT 10 uses (as quoted in NVIDIA/TensorRT issues)
DEFAULT_LOG = (
    "[MemUsageChange] Init CUDA: CPU +0, GPU +0, now: CPU 20, GPU 300 (MiB)",
    "(Sparsity) Found 3 layer(s) eligible to use sparse tactics: conv1, conv2 + Relu_7, fc",
    "(Sparsity) Chose 2 layer(s) using sparse tactics: conv1, conv2 + Relu_7",
)


def make(
    version: str = "10.8.0.43",
    log_lines: Sequence[str] = DEFAULT_LOG,
    parse_errors: Sequence[str] = (),
    build_fails: bool = False,
) -> types.ModuleType:
    """A fresh mock ``tensorrt`` module. ``version`` 10.x or 11.x decides which BuilderFlags exist."""
    major = int(version.split(".")[0])
    mod = types.ModuleType("tensorrt")
    mod.__doc__ = "MOCK tensorrt module (tests/fake_tensorrt) — not TensorRT"
    mod.__version__ = version  # type: ignore[attr-defined]
    state: dict[str, Any] = {
        "mock": True,
        "network_flags": None,
        "parsed_path": None,
        "parsed_elem_types": {},
        "flags": set(),
        "pool_limits": {},
        "profiles": [],
        "timing_cache_in": None,
        "timing_cache_ignore_mismatch": None,
        "builds": 0,
    }
    mod.state = state  # type: ignore[attr-defined]

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        pass

    ILogger.Severity = Severity  # type: ignore[attr-defined]

    class Logger(ILogger):
        def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
            self.min_severity = min_severity

        def log(self, severity: Severity, msg: str) -> None:  # pragma: no cover - not used by onnxsparse
            pass

    flag_names = ["SPARSE_WEIGHTS", "REFIT", "DEBUG", "TF32"]
    if major < 11:
        flag_names += ["FP16", "INT8", "BF16", "OBEY_PRECISION_CONSTRAINTS"]
    BuilderFlag = enum.IntEnum("BuilderFlag", flag_names)  # type: ignore[misc]
    MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "TACTIC_DRAM"])
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", ["STRONGLY_TYPED"])

    class _Tensor:
        def __init__(self, name: str, shape: tuple[int, ...]) -> None:
            self.name = name
            self.shape = shape

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[_Tensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> _Tensor:
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network: Network, logger: ILogger) -> None:
            self.network = network
            self.logger = logger
            self.errors: list[str] = []

        def parse_from_file(self, path: str) -> bool:
            state["parsed_path"] = path
            if parse_errors:
                self.errors = list(parse_errors)
                return False
            model = onnx.load(path)  # external data is read relative to the file, as TensorRT does
            inits = {t.name for t in model.graph.initializer}
            elem: dict[str, int] = {}
            for vi in model.graph.input:
                if vi.name in inits:
                    continue
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                self.network.inputs.append(_Tensor(vi.name, dims))
                elem[vi.name] = vi.type.tensor_type.elem_type
            elem.update({t.name: t.data_type for t in model.graph.initializer})
            state["parsed_elem_types"] = elem
            state["parsed_file_exists_during_parse"] = Path(path).is_file()
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class OptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

        def set_shape(self, name: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> None:
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return b"MOCK-TIMING-CACHE:" + str(state["builds"]).encode()

    class BuilderConfig:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None

        def set_flag(self, flag: Any) -> None:
            if not isinstance(flag, BuilderFlag):
                raise TypeError(f"set_flag(): incompatible argument {flag!r}")
            state["flags"].add(flag.name)

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            if not isinstance(pool, MemoryPoolType):
                raise TypeError("set_memory_pool_limit(): pool must be a MemoryPoolType")
            state["pool_limits"][pool.name] = int(size)

        def add_optimization_profile(self, profile: OptimizationProfile) -> int:
            state["profiles"].append(dict(profile.shapes))
            return len(state["profiles"]) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            state["timing_cache_in"] = bytes(data)
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            state["timing_cache_ignore_mismatch"] = ignore_mismatch
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            if not isinstance(logger, ILogger):
                raise TypeError("Builder(): logger must be an ILogger")
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            state["network_flags"] = flags
            return Network(flags)

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
            dynamic = [t.name for t in network.inputs if any(d < 0 for d in t.shape)]
            if dynamic and not state["profiles"]:
                self.logger.log(Severity.ERROR, f"Network has dynamic inputs ({dynamic[0]}) but no profile")  # type: ignore[attr-defined]
                return None
            for line in log_lines:
                self.logger.log(Severity.INFO, line)  # type: ignore[attr-defined]
            self.logger.log(Severity.WARNING, "MOCK builder: no engine was built")  # type: ignore[attr-defined]
            if build_fails:
                self.logger.log(Severity.ERROR, "MOCK failure: out of workspace memory")  # type: ignore[attr-defined]
                return None
            state["builds"] += 1
            return MOCK_ENGINE_BYTES

    for name, obj in {
        "ILogger": ILogger,
        "Logger": Logger,
        "BuilderFlag": BuilderFlag,
        "MemoryPoolType": MemoryPoolType,
        "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag,
        "Builder": Builder,
        "OnnxParser": OnnxParser,
    }.items():
        setattr(mod, name, obj)
    return mod
