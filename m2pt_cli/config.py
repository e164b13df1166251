"""The recipe schema: nested dataclasses, YAML loading, dotted-path overrides and validation.

Precedence: schema defaults < recipe file < command-line overrides. YAML keys map one-to-one onto
dataclass fields; an unknown key, a wrong type or an invalid value is a ``UserError`` naming the
file and the key path.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from m2pt_cli.data.images import DEFAULT_MAX_PIXELS, PIL_PIXEL_LIMIT
from m2pt_cli.errors import UserError, did_you_mean, quote

DTYPES = ("float32", "bfloat16", "float16")
METHODS = ("m2pt", "lora", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
CHAT_TEMPLATES = ("processor", "vicuna_v1", "plain")
DATA_FORMATS = ("llava_json", "hf", "digits")
# the wordings a digits source asks in turn (data.sources[].questions picks them by index)
DIGIT_QUESTIONS = (
    "What digit is shown in this image?",
    "Which number from 0 to 9 is written here?",
    "Read the handwritten digit.",
)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
PROMPT_INITS = ("xavier", "normal", "zeros")
QUANTIZATION_MODES = ("none", "8bit", "4bit")
WEIGHTS = ("pretrained", "random")
ON_BAD_RECORD = ("skip", "error")
GROUP_BY = ("none", "length", "modality_length")  # m2pt_cli.data.grouping.GROUP_BY
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few KB; one that came with an adapter is read no further
_RANGE = re.compile(r"^(\d+)-(\d+)$")
NAME_CHARS = 200  # a run folder is <name>-<time>: room for the time within a file system's 255 bytes
WORKERS_LIMIT = 256


def _help(text: str, choices: tuple[str, ...] = (), **kwargs) -> Any:
    """A schema field: its help text and, for a string key, the values it allows (checked by
    ``validate``, listed by the recipe reference)."""
    return field(metadata={"help": text, "choices": choices}, **kwargs)


@dataclass
class ModelCfg:
    """The ``model`` keys every backbone reads. A recipe's ``model`` section also holds the keys its
    backbone declares (``Backbone.model_keys``): ``config.load`` builds it as ``model_class(backbone)``."""

    backbone: str = _help("registry name of the model family (m2pt info lists them)", default="llava")
    name_or_path: str = _help(
        "hub id or local folder; a path starting with ./ or ../ is relative to the recipe file",
        default="llava-hf/llava-1.5-7b-hf",
    )
    revision: str | None = _help("hub revision (branch, tag or commit) to pin", default=None)
    dtype: str = _help("weight dtype: float32, bfloat16 or float16", choices=DTYPES, default="bfloat16")
    attn_implementation: str = _help(
        "attention kernel: sdpa, eager, flex_attention, or flash_attention_2 (CUDA, half precision, flash-attn)",
        choices=ATTN_IMPLEMENTATIONS,
        default="sdpa",
    )
    trust_remote_code: bool = _help("run code from the model repository (only if you trust it)", default=False)
    chat_template: str = _help(
        "processor (the model's own), vicuna_v1 (the paper's) or plain (InstructBLIP's: instruction, answer)",
        choices=CHAT_TEMPLATES,
        default="processor",
    )
    weights: str = _help(
        "pretrained, or random (seeded, from config.json alone: for benchmarks)", choices=WEIGHTS, default="pretrained"
    )
    quantization: str = _help(
        "none, 8bit or 4bit: store the frozen base's linear layers in 8 or 4 bits (bitsandbytes); "
        "prompts and trained modules stay in full precision",
        choices=QUANTIZATION_MODES,
        default="none",
    )


COMMON_MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelCfg))
_MODEL_CLASSES: dict[tuple[str, type], type[ModelCfg]] = {}


def model_class(backbone: str) -> type[ModelCfg]:
    """The ``model`` section of a recipe naming ``backbone``: ``ModelCfg`` plus the keys the backbone
    declares, each a field with its default, type and help (``metadata``: ``help``, ``path``,
    ``choices``, ``backbone``). ``ModelCfg`` itself for a backbone that declares none."""
    from m2pt_cli.registry import BACKBONES

    instance = BACKBONES.get(backbone)
    cache = (backbone, type(instance))
    if cache not in _MODEL_CLASSES:
        fields: list[tuple[str, Any, Any]] = []
        for key in instance.model_keys:
            name = str(key)
            if name in COMMON_MODEL_KEYS or name in [f[0] for f in fields]:
                raise ValueError(f"backbone {backbone!r} declares model key {name!r} twice or over a common key")
            meta = {"help": key.help, "path": key.is_path, "choices": key.choices, "backbone": backbone}
            default = key.default
            made = (
                field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
                if isinstance(default, (list, dict))
                else field(default=default, metadata=meta)
            )
            fields.append((name, key.type, made))
        made_class = ModelCfg
        if fields:
            made_class = dataclasses.make_dataclass(f"ModelCfg[{backbone}]", fields, bases=(ModelCfg,))
            made_class.__module__ = __name__
        _MODEL_CLASSES[cache] = made_class
    return _MODEL_CLASSES[cache]


def model_cfg(backbone: str = "llava", **values: Any) -> ModelCfg:
    """A checked ``model`` section for ``backbone`` (what ``config.load`` builds from a recipe's)."""
    return _build_model({"backbone": backbone, **values}, "model")


def _owners(key: str, backbone: str) -> dict[str, Any]:
    """Other registered backbones that declare ``model`` key ``key``: name -> its ``ModelKey``. A
    backbone that fails to import is passed over (the user's mistake is what gets reported)."""
    from m2pt_cli.registry import BACKBONES

    owners = {}
    for name in BACKBONES.names():
        if name == backbone:
            continue
        try:
            declared = {str(k): k for k in BACKBONES.get(name).model_keys}
        except Exception:  # a broken plugin: its own error comes when a recipe names it
            continue
        if key in declared:
            owners[name] = declared[key]
    return owners


def _not_read(where: str, backbone: str, owners: dict[str, Any]) -> UserError:
    instead = f" or use backbone {' or '.join(owners)}" if owners else ""
    return UserError(f"{where}: backbone {backbone!r} does not read it; remove the key{instead}")


def _build_model(raw: dict, where: str) -> ModelCfg:
    """The ``model`` section: the common keys and those of its backbone. A key only other backbones
    read is refused, unless it holds their default (an older m2pt wrote every backbone's keys)."""
    backbone = _convert(raw.get("backbone", ModelCfg.backbone), str, f"{where}.backbone")
    try:
        cls = model_class(backbone)
    except UserError as exc:
        raise UserError(f"{where}.backbone: {exc}") from None
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}"
        if key not in hints:
            owners = _owners(str(key), backbone)
            if owners and all(value == declared.default for declared in owners.values()):
                continue
            if owners:
                raise _not_read(path, backbone, owners)
            raise UserError(f"{path}: unknown key{did_you_mean(str(key), list(hints))} (allowed: {', '.join(hints)})")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def check_model_section(model: ModelCfg, backbone: Any) -> None:
    """Refuse a ``model`` section that does not hold the keys ``backbone`` reads: a key only another
    backbone reads set to a value (rather than ignored), or one of this backbone's keys missing (a
    section made in Python for another backbone; ``model_cfg`` makes one)."""
    declared = {str(k) for k in backbone.model_keys}
    for f in dataclasses.fields(model):
        if f.name not in COMMON_MODEL_KEYS and f.name not in declared and getattr(model, f.name) != f.default:
            raise _not_read(f"model.{f.name}", model.backbone, _owners(f.name, model.backbone))
    missing = [str(key) for key in backbone.model_keys if not hasattr(model, key)]
    if missing:
        raise UserError(
            f"model: the section lacks backbone {model.backbone!r}'s keys ({', '.join(missing)}); "
            "build it with m2pt_cli.config.model_cfg or load the recipe with m2pt_cli.config.load"
        )


@dataclass
class TowerPromptCfg:
    length: int = _help("prompt vectors per layer (0 turns this tower's prompts off)", default=10)
    layers: str | int | list[int] = _help("'all', a range such as '0-15', or a list of layer indices", default="all")
    init: str = _help("initialisation: xavier, normal (std 0.02) or zeros", choices=PROMPT_INITS, default="xavier")


PROMPT_LENGTH_LIMIT = 1024


@dataclass
class PromptsCfg:
    vision: TowerPromptCfg = _help("visual prompts in the vision encoder", default_factory=TowerPromptCfg)
    text: TowerPromptCfg = _help("textual prompts in the language model", default_factory=TowerPromptCfg)
    length_limit: int = _help(
        "most prompt vectors per layer a tower may have (a guard against a typo costing gigabytes: "
        "prompts hold length x layers x width values); raise it deliberately for longer prompts",
        default=PROMPT_LENGTH_LIMIT,
    )


@dataclass
class SourceCfg:
    format: str = _help(
        "llava_json (conversation JSON + image folder), hf (a datasets source) or digits",
        choices=DATA_FORMATS,
        default="llava_json",
    )
    path: str = _help("JSON file, hub dataset id, data file(s) or folder", default="")
    image_folder: str = _help("llava_json: folder the image paths are relative to (default: the JSON's)", default="")
    split: str = _help("hf: split to read", default="train")
    revision: str | None = _help("hf: dataset revision to pin", default=None)
    weight: float = _help("sampling weight when several sources are mixed", default=1.0)
    limit: int = _help("use at most this many records (-1: all)", default=-1)
    image_column: str = _help("hf: column holding the image ('' for none)", default="image")
    question_column: str = _help("hf: column holding the question", default="question")
    answer_column: str = _help("hf: column holding the answer", default="answer")
    conversation_column: str = _help("hf: column holding LLaVA turns (instead of question/answer)", default="")
    id_column: str = _help("hf: column holding the record id (default: the row number)", default="id")
    questions: list[int] = _help(
        "digits: which of its question wordings to ask (0, 1, 2), in turn over the images; [] = all",
        default_factory=list,
    )


@dataclass
class DataCfg:
    sources: list[SourceCfg] = _help("training sources, mixed by weight", default_factory=list)
    eval_size: float = _help("held out per source: a count (>= 1) or a fraction (< 1); 0 = none", default=0.0)
    max_length: int = _help("tokens per sample, counted after image-token expansion", default=1024)
    on_bad_record: str = _help(
        "skip (and count) or error on malformed records and unreadable images", choices=ON_BAD_RECORD, default="skip"
    )
    max_image_pixels: int = _help(
        "most pixels (width x height, read from the header before decoding) an image may have; more = a bad record",
        default=DEFAULT_MAX_PIXELS,
    )
    num_proc: int = _help(
        "processes that encode the data the first time (0: this machine's cores); later starts read the cache",
        default=0,
    )
    group_by: str = _help(
        "training order: none (shuffled), length (similar lengths batched together, less padding) or "
        "modality_length (as LLaVA: image and text-only records in separate batches, by length)",
        choices=GROUP_BY,
        default="none",
    )


@dataclass
class LoraCfg:
    rank: int = _help("LoRA rank (method: lora)", default=8)
    alpha: float = _help("LoRA scaling numerator", default=16.0)
    dropout: float = _help("dropout on the LoRA branch", default=0.05)
    target_modules: list[str] = _help("LLM linear layers that get LoRA", default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TrainCfg:
    epochs: float = _help("passes over the training data", default=3.0)
    max_steps: int = _help(
        "stop after this many optimizer steps (1 or more; wins over epochs), or -1: train by epochs", default=-1
    )
    learning_rate: float = _help("peak learning rate", default=7e-4)
    global_batch_size: int = _help("samples per optimizer step over all devices", default=32)
    per_device_batch_size: int = _help("samples per forward on one device", default=4)
    lr_scheduler: str = _help("learning-rate schedule (a transformers scheduler name)", default="cosine")
    warmup_ratio: float = _help("share of steps spent warming up", default=0.03)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    precision: str = _help(
        "auto (from model.dtype), bf16, fp16 or fp32 (mixed precision)", choices=PRECISIONS, default="auto"
    )
    gradient_checkpointing: bool = _help("recompute activations to save memory", default=True)
    torch_compile: bool = _help(
        "compile the training forward and backward with torch.compile (inductor; on CPU it needs a C++ compiler); "
        "held-out answers, eval, generate and serve run the same weights uncompiled",
        default=False,
    )
    logging_steps: int = _help("log loss every N steps", default=10)
    save_steps: int = _help("checkpoint every N steps (resume loses at most this many)", default=500)
    save_total_limit: int = _help("keep at most N checkpoints", default=2)
    eval_steps: int = _help("held-out evaluation every N steps (0: only before and after)", default=0)
    eval_samples: int = _help("held-out samples answered by generation for accuracy (-1: all)", default=200)
    eval_max_new_tokens: int = _help("tokens generated per held-out answer", default=16)
    dataloader_num_workers: int = _help("data-loading worker processes", default=0)
    fsdp: bool | str = _help(
        "true: shard with FSDP2, tuned by train.fsdp_config (older recipes' words such as 'full_shard auto_wrap' "
        "are read as the fsdp_config entries they mean); false or '' = off",
        default=False,
    )
    fsdp_config: str = _help(
        "path to an FSDP config JSON (transformers' fsdp_config keys: reshard_after_forward, cpu_offload, ...)",
        default="",
    )
    deepspeed: str = _help(
        "DeepSpeed config: zero2 or zero3 (shipped in recipes/deepspeed/) or a path to a JSON file ('' = off)",
        default="",
    )


@dataclass
class Recipe:
    """A whole recipe. ``name`` defaults to the file's stem."""

    name: str = _help("run name (default: the recipe file's stem)", default="")
    description: str = _help("one line on what this recipe is for", default="")
    seed: int = _help("seed for prompt initialisation and data order", default=42)
    method: str = _help(
        "m2pt, lora (PEFT baseline) or full (finetune the LLM and projector)", choices=METHODS, default="m2pt"
    )
    model: ModelCfg = _help("the base model", default_factory=ModelCfg)
    prompts: PromptsCfg = _help("prompt lengths, layers and initialisation", default_factory=PromptsCfg)
    trainable: list[str] = _help("modules trained besides the prompts", default_factory=lambda: ["projector"])
    lora: LoraCfg = _help("LoRA settings (method: lora)", default_factory=LoraCfg)
    data: DataCfg = _help("training data", default_factory=DataCfg)
    train: TrainCfg = _help("optimisation", default_factory=TrainCfg)


# ----------------------------------------------------------------------------- conversion


def type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}.get(
            tp.__name__, tp.__name__
        )
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    return str(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (dataclasses built)."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping of keys, got {quote(value)}")
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, where)
            except UserError:
                continue
        raise UserError(f"{where}: expected {type_name(tp)}, got {quote(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected {type_name(tp)}, got {quote(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise UserError(f"{where}: expected {type_name(tp)}, got {quote(value)}")


def _build(cls: type, raw: dict, where: str) -> Any:
    if cls is ModelCfg:
        return _build_model(raw, where)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            raise UserError(f"{path}: unknown key{did_you_mean(str(key), names)} (allowed: {', '.join(names)})")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def to_dict(recipe: Recipe) -> dict:
    """The recipe as plain data (for YAML and JSON)."""
    return dataclasses.asdict(recipe)


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value``; the value is read as YAML (``20``, ``[0, 1]``, ``true``, ``0-15``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {text!r}: expected KEY=VALUE, e.g. prompts.text.length=20")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise UserError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), parsed


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    """Set ``raw[path[0]]...[path[-1]] = value``, checking each key against the schema."""
    cls: Any = Recipe
    node = raw
    for depth, key in enumerate(path):
        dotted = ".".join(path[: depth + 1])
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if cls is ModelCfg:
            hints = _override_model_keys(node, key)
        if key not in hints:
            names = list(hints) if hints else []
            hint = did_you_mean(key, names) if names else ""
            raise UserError(f"override {'.'.join(path)}: unknown key {dotted!r}{hint}")
        if depth == len(path) - 1:
            node[key] = value
            return
        cls = hints[key]
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {'.'.join(path)}: {dotted} is not a section")
        node = child


def _override_model_keys(raw_model: dict, key: str) -> dict[str, Any]:
    """The ``model`` keys an override may set: the common ones, those of the section's backbone and,
    since a later override may change the backbone, ``key`` when another backbone declares it
    (building the section checks the final combination)."""
    hints = typing.get_type_hints(ModelCfg)
    backbone = raw_model.get("backbone", ModelCfg.backbone)
    if isinstance(backbone, str):
        try:
            hints = typing.get_type_hints(model_class(backbone))
        except UserError:
            pass  # an unknown backbone is reported when the section is built
    if key not in hints and isinstance(backbone, str):
        for declared in _owners(key, backbone).values():
            hints[key] = declared.type
    return hints


# ----------------------------------------------------------------------------- loading


class _DuplicateKey(yaml.MarkedYAMLError):
    """A mapping that names one key twice (PyYAML keeps the last silently)."""


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for recipe files: a key given twice in one mapping is an error naming both
    lines (PyYAML keeps the last silently), and a key is its text as written (``yes:`` is the key
    ``'yes'``, not YAML 1.1's True). Keys merged in with ``<<: *anchor`` may be overridden, as YAML says."""

    def construct_mapping(self, node, deep=False):
        lines: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in lines:
                problem = f"key {quote(key_node.value)} given twice (first on line {lines[key_node.value]})"
                raise _DuplicateKey(problem=problem, problem_mark=key_node.start_mark)
            lines[key_node.value] = key_node.start_mark.line + 1
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
            else:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain name, not a list or mapping", key_node.start_mark
                )
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


def read_yaml(path: Path) -> dict:
    """Read a recipe file; malformed YAML is a one-line error with the line number."""
    from m2pt_cli.reading import MAX_DEPTH, check_depth, read_bytes

    if not path.exists():
        raise UserError(f"{path}: no such recipe file (m2pt recipes lists the bundled ones)")
    try:  # bounded before it is parsed: a recipe may come with a stranger's adapter
        text = read_bytes(path, MAX_RECIPE_BYTES, "recipe").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); a recipe is a UTF-8 YAML file") from None
    try:
        raw = yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: no Python objects
    except RecursionError:
        raise UserError(f"{path}: YAML nested deeper than {MAX_DEPTH} levels") from None
    except _DuplicateKey as exc:
        raise UserError(f"{path}: line {exc.problem_mark.line + 1}: {exc.problem}; keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{line}: malformed YAML ({getattr(exc, 'problem', exc)})") from None
    if check_depth(raw) is not None:
        raise UserError(f"{path}: YAML nested deeper than {MAX_DEPTH} levels")
    if raw is None:
        raise UserError(f"{path}: the recipe is empty; start from a bundled one (m2pt recipes lists them)")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model, prompts, ...), got {type(raw).__name__}")
    return raw


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), raw: dict | None = None) -> Recipe:
    """Load and validate a recipe file, or a bundled recipe by name (``demo``), with ``key=value``
    overrides applied on top; ``raw``: the file as ``read_yaml`` already read it (left unchanged)."""
    from m2pt_cli.recipes import resolve

    path = resolve(path)
    raw = copy.deepcopy(raw) if raw is not None else read_yaml(path)
    raw.setdefault("model", {})  # built for its backbone even when the recipe leaves it out
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    try:
        recipe = _build(Recipe, raw, "")
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    if not recipe.name:
        recipe.name = path.stem
    if recipe.train.fsdp == "":  # FSDP off as an older m2pt wrote it: the same recipe as false
        recipe.train.fsdp = False
    _anchor_paths(recipe, path.parent)
    try:
        validate(recipe)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    return recipe


def _anchor_paths(recipe: Recipe, folder: Path) -> None:
    """Paths written ``./x`` or ``../x`` are relative to the recipe file; others to the working directory."""
    model_paths = ["name_or_path"] + [f.name for f in dataclasses.fields(recipe.model) if f.metadata.get("path")]
    targets = [(recipe.model, key) for key in model_paths]
    targets += [(source, key) for source in recipe.data.sources for key in ("path", "image_folder")]
    targets += [(recipe.train, "fsdp_config"), (recipe.train, "deepspeed")]
    for owner, key in targets:
        value = getattr(owner, key)
        if isinstance(value, str) and value.startswith(("./", "../")):
            setattr(owner, key, str((folder / value).resolve()))


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise UserError(
            f"{key}: {quote(value)} is not allowed{did_you_mean(value, allowed)} (allowed: {', '.join(allowed)})"
        )


def _check_choices(section: Any, where: str) -> None:
    """Every key whose schema field lists ``choices`` holds one of them, in every section (the
    backbones' own ``model`` keys included), in declaration order."""
    for f in dataclasses.fields(section):
        value, path = getattr(section, f.name), f"{where}{f.name}"
        if f.metadata.get("choices"):
            _one_of(value, f.metadata["choices"], path)
        elif dataclasses.is_dataclass(value):
            _check_choices(value, f"{path}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_choices(item, f"{path}[{i}].")


def _check_questions(source: SourceCfg, key: str) -> None:
    if source.questions and source.format != "digits":
        raise UserError(f"{key}: only the digits format has question wordings to choose")
    allowed = range(len(DIGIT_QUESTIONS))
    bad = [q for q in source.questions if isinstance(q, bool) or q not in allowed]
    if bad:
        raise UserError(f"{key}: {bad} are not question wordings (allowed: {', '.join(map(str, allowed))})")


def _finite(value: float, key: str, low: float | None = None, high: float | None = None, open_low=False) -> None:
    """Refuse NaN, infinities and a value outside [low, high] (``open_low``: above ``low``)."""
    below = low is not None and (value <= low if open_low else value < low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        lower = "" if low is None else f"above {low:g}" if open_low else f"at least {low:g}"
        upper = "" if high is None else f"at most {high:g}"
        allowed = " and ".join(part for part in (lower, upper) if part) or "finite"
        raise UserError(f"{key}: must be a finite number {allowed}, got {quote(value)}")


def _at_least(value: int, low: int, key: str, special: str = "") -> None:
    if value < low and not (special and value == -1):
        extra = f" or -1 ({special})" if special else ""
        raise UserError(f"{key}: must be {low} or more{extra}, got {value}")


def _check_name(name: str) -> None:
    """``name`` makes run and sweep folder names (``runs/<name>-<time>``): a plain, printable name."""
    from m2pt_cli.files import plain_name

    plain_name(name, "name")  # never a path out of runs/ or sweeps/, printable
    if len(name) > NAME_CHARS:
        raise UserError(f"name: {len(name)} characters; a run folder's name allows at most {NAME_CHARS}")


def _check_numbers(recipe: Recipe) -> None:
    """Numbers types alone do not bound: each within what it means, before anything is loaded."""
    t, d = recipe.train, recipe.data
    if t.max_steps == 0 or t.max_steps < -1:
        raise UserError(f"train.max_steps: must be 1 or more, or -1 (train by train.epochs), got {t.max_steps}")
    _finite(t.epochs, "train.epochs", 0.0, open_low=True)
    _finite(t.learning_rate, "train.learning_rate", 0.0, open_low=True)
    _finite(t.warmup_ratio, "train.warmup_ratio", 0.0, 1.0)
    _finite(t.weight_decay, "train.weight_decay", 0.0)
    _at_least(t.eval_steps, 0, "train.eval_steps")
    _at_least(t.eval_samples, 0, "train.eval_samples", "all")
    _at_least(t.eval_max_new_tokens, 1, "train.eval_max_new_tokens")
    if not 0 <= t.dataloader_num_workers <= WORKERS_LIMIT:
        raise UserError(f"train.dataloader_num_workers: must be 0 to {WORKERS_LIMIT}, got {t.dataloader_num_workers}")
    if not 0 <= d.num_proc <= WORKERS_LIMIT:
        raise UserError(f"data.num_proc: must be 0 (this machine's cores) to {WORKERS_LIMIT}, got {d.num_proc}")
    if not 0 <= recipe.seed < 2**32:
        raise UserError(f"seed: must be 0 to {2**32 - 1}, got {recipe.seed}")
    _finite(d.eval_size, "data.eval_size", 0.0)
    for i, source in enumerate(d.sources):
        _finite(source.weight, f"data.sources[{i}].weight", 0.0, open_low=True)
        _at_least(source.limit, 0, f"data.sources[{i}].limit", "all")
    _finite(recipe.lora.alpha, "lora.alpha", 0.0, open_low=True)
    _finite(recipe.lora.dropout, "lora.dropout", 0.0, 1.0)
    if recipe.lora.dropout >= 1:
        raise UserError(f"lora.dropout: must be below 1 (1 drops everything), got {recipe.lora.dropout}")
    limit = recipe.prompts.length_limit
    _at_least(limit, 0, "prompts.length_limit")
    for tower in ("vision", "text"):
        length = getattr(recipe.prompts, tower).length
        if length > limit:
            raise UserError(
                f"prompts.{tower}.length: {length} is over prompts.length_limit ({limit}); "
                "set prompts.length_limit higher if you mean it"
            )


def validate(recipe: Recipe) -> None:
    """Check values that types alone do not (ranges, choices, layer syntax), before anything is
    loaded; what depends on the model (layer counts) is checked from its config (``loading``)."""
    _check_name(recipe.name)
    _check_choices(recipe, "")
    _check_numbers(recipe)
    for tower in ("vision", "text"):
        cfg: TowerPromptCfg = getattr(recipe.prompts, tower)
        if cfg.length < 0:
            raise UserError(f"prompts.{tower}.length: must be 0 or more, got {cfg.length}")
        parse_layers(cfg.layers, f"prompts.{tower}.layers")
    for i, source in enumerate(recipe.data.sources):
        if source.format != "digits" and not source.path:
            raise UserError(f"data.sources[{i}].path: a {source.format} source needs a path")
        _check_questions(source, f"data.sources[{i}].questions")
    if recipe.lora.rank <= 0:
        raise UserError(f"lora.rank: must be positive, got {recipe.lora.rank}")
    for key in ("logging_steps", "save_steps", "save_total_limit"):
        if getattr(recipe.train, key) <= 0:
            raise UserError(f"train.{key}: must be positive, got {getattr(recipe.train, key)}")
    if recipe.data.max_length <= 0:
        raise UserError(f"data.max_length: must be positive, got {recipe.data.max_length}")
    if not 0 < recipe.data.max_image_pixels <= PIL_PIXEL_LIMIT:
        raise UserError(
            f"data.max_image_pixels: must be between 1 and {PIL_PIXEL_LIMIT} (PIL's decompression-bomb limit), "
            f"got {recipe.data.max_image_pixels}"
        )
    t = recipe.train
    if t.per_device_batch_size <= 0 or t.global_batch_size <= 0:
        raise UserError("train.global_batch_size and train.per_device_batch_size: must be positive")
    if t.global_batch_size % t.per_device_batch_size:
        raise UserError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
            f"train.per_device_batch_size ({t.per_device_batch_size})"
        )


def parse_layers(spec: str | int | list[int], key: str) -> str | list[int] | range:
    """Normalise a layer spec to ``"all"``, a list of (possibly negative) indices, or a ``range`` (a
    range ``0-99999999`` stays two numbers until it is checked against a model's layer count)."""
    if spec == "all":
        return "all"
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, list):
        return list(spec)
    match = _RANGE.match(spec.strip())
    if not match:
        raise UserError(f"{key}: {quote(spec)} is not a layer spec; use 'all', a range such as '0-15', or a list")
    first, last = int(match[1]), int(match[2])
    if first > last:
        raise UserError(f"{key}: range {quote(spec)} is empty; write it as low-high")
    return range(first, last + 1)


def resolve_layers(spec: str | int | list[int], n_layers: int, unused: tuple[int, ...], key: str) -> list[int]:
    """Layer indices (ascending, unique) of a model with ``n_layers`` blocks.

    ``all`` leaves out ``unused`` blocks (whose output never reaches the language model); naming one
    is an error, since its prompts could never learn anything.
    """
    parsed = parse_layers(spec, key)
    if parsed == "all":
        return [i for i in range(n_layers) if i not in unused]
    if isinstance(parsed, range) and parsed.stop - 1 >= n_layers:  # before the range is walked
        first = max(parsed.start, n_layers)  # its first index past the model's last layer
        raise UserError(f"{key}: layer {first} is out of range; the model has {n_layers} layers (0-{n_layers - 1})")
    out = set()
    for index in parsed:
        if not -n_layers <= index < n_layers:
            raise UserError(f"{key}: layer {index} is out of range; the model has {n_layers} layers (0-{n_layers - 1})")
        if index % n_layers in unused:
            used = [i for i in range(n_layers) if i not in unused]
            raise UserError(
                f"{key}: layer {index % n_layers}'s output never reaches the language model, so prompts there "
                f"cannot learn (usable: {used[0]}-{used[-1]}, or all)"
            )
        out.add(index % n_layers)
    return sorted(out)


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
