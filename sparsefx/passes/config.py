"""Pass configs (frozen, validated dataclasses), the config -> pass registry, and YAML recipes.

A recipe is data:

    name: wanda-2of4
    calibration: {samples: 32, seqlen: 512, text: c4, batch_size: 4}
    passes:
      - method: wanda
        pattern: "2:4"

Each ``method`` names a registered config class. Built-in classes are found lazily, on first lookup.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import yaml

from .._cache import atomic_write_bytes
from ..data import TEXTS
from ..errors import RecipeError
from ..ir.annotate import ROLES

_CONFIGS: dict[str, type["PassConfig"]] = {}
_PASSES: dict[type["PassConfig"], Callable[["PassConfig"], Any]] = {}
# method -> module that registers it; imported on first lookup, not when sparsefx is imported.
_BUILTIN_MODULES = {"magnitude": "sparsefx.passes.masks", "wanda": "sparsefx.passes.masks",
                    "daws": "sparsefx.passes.daws", "cats": "sparsefx.passes.cats",
                    "rsparse": "sparsefx.passes.rsparse", "gisp": "sparsefx.passes.gisp",
                    "structured_magnitude": "sparsefx.passes.gisp", "structured_wanda": "sparsefx.passes.gisp",
                    "rtn": "sparsefx.passes.quantize", "gptq": "sparsefx.passes.quantize",
                    "svd": "sparsefx.passes.dam", "q_then_l": "sparsefx.passes.dam", "l_then_q": "sparsefx.passes.dam",
                    "dam": "sparsefx.passes.dam"}


@dataclass(frozen=True)
class PassConfig:
    """Base of pass configs. Subclasses set ``method`` and validate fields in ``validate``."""

    method: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = dict(v) if f.name == "overrides" else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PassConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"method"})
        if unknown:
            raise RecipeError(f"{cls.method}: unknown field(s) {unknown}; allowed: {sorted(names)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "method"}
        return cls(**kwargs)


def check_fraction(value: Any, field: str, upper_open: bool = True) -> float:
    """``value`` as a float in [0, 1) (or [0, 1] with ``upper_open=False``); else ``RecipeError`` naming ``field``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value and (
        value < 1.0 if upper_open else value <= 1.0)
    if not ok:
        raise RecipeError(f"{field}: expected a number in [0, {'1)' if upper_open else '1]'}, got {value!r}")
    return float(value)


def check_roles(method: str, roles) -> None:
    """Raise ``RecipeError`` unless ``roles`` is a non-empty list of linear roles (``ir.annotate.ROLES``, ``lm_head``,
    ``other``)."""
    known = set(ROLES) | {"lm_head", "other"}
    bad = [r for r in roles if r not in known]
    if bad or not roles:
        raise RecipeError(f"{method}.roles: unknown role(s) {bad or '(empty)'}; choose from {sorted(known)}")


def normalize_overrides(config: PassConfig, check: Callable[[Any, str], Any]) -> None:
    """Validate ``config.overrides`` (a mapping or pairs of glob -> value) and store it as a tuple of pairs.

    ``check(value, field)`` raises ``RecipeError`` for a bad value. Call from ``validate`` of configs that have
    per-parameter overrides."""
    overrides = config.overrides
    if isinstance(overrides, dict):
        overrides = tuple(overrides.items())
    for item in overrides:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise RecipeError(f"{config.method}.overrides: expected a mapping of glob -> value, got {item!r}")
        check(item[1], f"{config.method}.overrides[{item[0]!r}]")
    object.__setattr__(config, "overrides", tuple(tuple(i) for i in overrides))


def override_for(config: PassConfig, param: str, default: Any) -> Any:
    """The value of the first override whose glob matches parameter name ``param``, else ``default``."""
    for glob, value in config.overrides:
        if fnmatch.fnmatchcase(param, glob):
            return value
    return default


def register_pass(config_cls: type[PassConfig]):
    """Class decorator: ``@register_pass(MyConfig) class MyPass(Pass)`` maps the config type to the pass."""

    def deco(pass_cls):
        if not config_cls.method:
            raise TypeError(f"{config_cls.__name__} has no method name")
        _CONFIGS[config_cls.method] = config_cls
        _PASSES[config_cls] = pass_cls
        return pass_cls

    return deco


def _lookup(method: str) -> type[PassConfig]:
    if method not in _CONFIGS and method in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[method])
    if method not in _CONFIGS:
        known = sorted(set(_CONFIGS) | set(_BUILTIN_MODULES))
        raise RecipeError(f"passes[].method: unknown method {method!r}; known methods: {known}")
    return _CONFIGS[method]


def config_from_dict(data: dict[str, Any]) -> PassConfig:
    """Build the config named by ``data['method']``.

    Example:
        >>> config_from_dict({"method": "magnitude", "sparsity": 0.5}).sparsity
        0.5
    """
    if not isinstance(data, dict) or "method" not in data:
        raise RecipeError(f"each entry of passes must be a mapping with a 'method' field, got {data!r}")
    return _lookup(str(data["method"])).from_dict(data)


def build_pass(config: PassConfig):
    """Instantiate the pass registered for ``type(config)``."""
    _lookup(config.method)
    return _PASSES[type(config)](config)


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text and how much of it calibration reads. Defaults: the protocol (c4, 32 x 512)."""

    text: str = "c4"
    samples: int = 32
    seqlen: int = 512
    batch_size: int = 4

    def __post_init__(self):
        if self.text not in TEXTS:
            raise RecipeError(f"calibration.text: unknown text {self.text!r}; choose one of {list(TEXTS)}")
        for name in ("samples", "seqlen", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise RecipeError(f"calibration.{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class Recipe:
    """An ordered list of pass configs plus calibration settings.

    Example:
        >>> r = Recipe.from_yaml("passes: [{method: magnitude, sparsity: 0.5}]")
        >>> r.passes[0].method
        'magnitude'
    """

    passes: tuple[PassConfig, ...]
    name: str = ""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    description: str = ""      # one line, printed by `sparsefx recipes`

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping with a 'passes' list, got {type(data).__name__}")
        unknown = sorted(set(data) - {"name", "description", "passes", "calibration"})
        if unknown:
            raise RecipeError(f"recipe: unknown field(s) {unknown}; allowed: name, description, passes, calibration")
        passes = data.get("passes")
        if not isinstance(passes, list) or not passes:
            raise RecipeError("recipe.passes must be a non-empty list of {method: ..., ...} mappings")
        calib = data.get("calibration") or {}
        if not isinstance(calib, dict):
            raise RecipeError("recipe.calibration must be a mapping")
        try:
            calibration = CalibrationConfig(**calib)
        except TypeError as exc:
            raise RecipeError(f"recipe.calibration: {exc}") from None
        description = data.get("description", "")
        if not isinstance(description, str):
            raise RecipeError(f"recipe.description must be a string, got {description!r}")
        return cls(tuple(config_from_dict(p) for p in passes), str(data.get("name", "")), calibration,
                   description.strip())

    @classmethod
    def from_yaml(cls, text: str, source: str = "") -> "Recipe":
        """Parse a recipe from YAML ``text``; ``source`` (a file name) is named in errors."""
        where = f"recipe {source}" if source else "recipe"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise RecipeError(f"{where} is not valid YAML{at}: {problem}") from None
        try:
            return cls.from_dict(data)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}" if source else str(exc)) from None

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        return cls.from_yaml(path.read_text(encoding="utf-8"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **({"description": self.description} if self.description else {}),
                "calibration": dataclasses.asdict(self.calibration), "passes": [p.to_dict() for p in self.passes]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), self.to_yaml().encode())

    @property
    def needs_calibration(self) -> bool:
        return any(build_pass(config).needs_calibration for config in self.passes)


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped with sparsefx: ``{name: path}``."""
    from importlib.resources import files

    folder = files("sparsefx") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def resolve_recipe(name_or_path: str | Path) -> Recipe:
    """Load a recipe from a YAML file, or by the name of a built-in recipe (``wanda-50``, ``wanda-2of4``, ...).

    Example:
        >>> resolve_recipe("wanda-2of4").passes[0].pattern
        '2:4'
    """
    path = Path(name_or_path)
    if path.is_file():
        return Recipe.load(path)
    builtin = builtin_recipes()
    if str(name_or_path) in builtin:
        return Recipe.load(builtin[str(name_or_path)])
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        raise RecipeError(f"recipe file not found: {path} (or give the name of a built-in recipe: `sparsefx recipes` "
                          "lists them)")
    raise RecipeError(f"recipe {name_or_path!s} is neither a YAML file nor a built-in recipe "
                      f"({', '.join(sorted(builtin))})")
