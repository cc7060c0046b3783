"""Regex rule engine that maps checkpoint tensors onto a Flax NNX parameter tree.

A `Rule` says where one source tensor goes:

    Rule(r"model\\.layers\\.(?P<l>\\d+)\\.mlp\\.experts\\.(?P<e>\\d+)\\.gate_proj\\.weight",
         "layers.{l}.mlp.experts.gate_up", transform=transpose, index=expert_half(0))

- `pattern` is matched with `re.fullmatch` against the source name; the first rule that matches
  wins. Named groups fill the `target` template (`str.format`).
- `target` is the dotted NNX state path (`nnx.List` indices are plain numbers:
  `layers.3.self_attn.o_proj.kernel`).
- `transform(array) -> array` runs first (`transpose` turns a PyTorch `weight [out, in]` into a
  `kernel [in, out]`).
- `index(groups, target_shape) -> tuple` picks the part of the target the (transformed) tensor
  fills; None means the whole target. `expert(...)` and `expert_half(...)` cover per-expert
  checkpoints written into stacked `[E, ...]` targets.

`fill(tensors, rules, specs)` consumes an iterator of `(name, array)` pairs (stream one shard at a
time), writes each piece into a numpy buffer of the target's dtype (bf16 stays bf16, via
ml_dtypes), checks shapes and finiteness per piece, and at the end raises one `MappingError`
listing every problem: unmatched source keys, targets the model lacks, shape mismatches,
non-finite values, overlapping writes, and targets not fully filled. `load_into` turns the
filled buffers into a concrete model; `convert` does both. With `put`, `fill` moves each target
to devices the moment its last piece arrives and drops the host buffer, so converting holds
about one model's size plus the targets still being filled (one MoE layer's expert stacks),
not a host copy of the whole model beside the device one.

Coverage is counted in elements per target (no per-element mask, so a 16B-parameter model needs
no extra memory); two writes with the same index are reported as a duplicate.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Transform = Callable[[np.ndarray], np.ndarray]
Index = Callable[[Mapping[str, str], tuple[int, ...]], tuple]


class MappingError(ValueError):
    """The checkpoint and the model disagree; the message lists every problem found."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Source regex -> target path template, with optional transform and target index."""

    pattern: str
    target: str
    transform: Transform | None = None
    index: Index | None = None

    def __post_init__(self):
        object.__setattr__(self, "_regex", re.compile(self.pattern))

    def match(self, name: str) -> re.Match | None:
        return self._regex.fullmatch(name)


# ---------------------------------------------------------------- transforms and indices


def transpose(x: np.ndarray) -> np.ndarray:
    """Swap the last two axes: PyTorch `weight [..., out, in]` -> `kernel [..., in, out]`."""
    return np.swapaxes(x, -1, -2)


def reshape(*shape: int) -> Transform:
    """A transform reshaping to `shape` (one -1 allowed)."""
    return lambda x: np.reshape(x, shape)


def flatten_conv(w: np.ndarray) -> np.ndarray:
    """Conv weight `[D, C, *kernel]` -> kernel `[C * prod(kernel), D]`: a conv whose stride is its
    kernel, applied to one patch flattened channel-major, is this linear map."""
    return w.reshape(w.shape[0], -1).T


def norm_rules(src: str, dst: str) -> list[Rule]:
    """A LayerNorm/RMSNorm `weight` (-> `scale`) and `bias`."""
    return [Rule(src + r"\.weight", dst + ".scale"), Rule(src + r"\.bias", dst + ".bias")]


def linear_rules(src: str, dst: str) -> list[Rule]:
    """A PyTorch Linear `weight [out, in]` (-> `kernel [in, out]`) and `bias`."""
    return [Rule(src + r"\.weight", dst + ".kernel", transpose),
            Rule(src + r"\.bias", dst + ".bias")]


def compose(*fns: Transform) -> Transform:
    """Apply `fns` left to right."""

    def run(x):
        for f in fns:
            x = f(x)
        return x

    return run


def expert(group: str = "e") -> Index:
    """Index `[e]` of a stacked `[E, ...]` target, `e` read from the named regex group."""
    return lambda groups, shape: (int(groups[group]),)


def expert_half(half: int, group: str = "e") -> Index:
    """Index `[e, ..., half * F:(half + 1) * F]` of a fused `[E, ..., 2F]` target.

    half 0 is the gate half, half 1 the up half of `gate_up [E, D, 2F]`.
    """
    if half not in (0, 1):
        raise ValueError(f"half must be 0 (gate) or 1 (up), got {half}")

    def index(groups, shape):
        f = shape[-1] // 2
        return (int(groups[group]), Ellipsis, slice(half * f, (half + 1) * f))

    return index


# ---------------------------------------------------------------- target specs


def path_str(path: Sequence[Any]) -> str:
    """Dotted form of an NNX state path: ('layers', 3, 'mlp') -> 'layers.3.mlp'."""
    return ".".join(str(p) for p in path)


def target_specs(abstract: nnx.Module | nnx.State) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of every variable of an abstract model (`nnx.eval_shape`) by path."""
    state = abstract if isinstance(abstract, nnx.State) else nnx.state(abstract)
    return {
        path_str(p): jax.ShapeDtypeStruct(tuple(v.shape), np.dtype(v.dtype))
        for p, v in nnx.to_flat_state(state)
    }


# ---------------------------------------------------------------- the engine


def _index_str(index: tuple | None) -> str:
    if index is None:
        return "[:]"

    def one(i):
        if i is Ellipsis:
            return "..."
        if isinstance(i, slice):
            start = "" if i.start is None else i.start
            stop = "" if i.stop is None else i.stop
            return f"{start}:{stop}"
        return str(i)

    return "[" + ", ".join(one(i) for i in index) + "]"


class _Filler:
    """Holds the buffers, coverage counts and problems while tensors stream in."""

    def __init__(self, specs: Mapping[str, jax.ShapeDtypeStruct], put=None):
        self.specs, self.put = specs, put
        self.buffers: dict[str, Any] = {}
        self.done: set[str] = set()  # targets already handed to `put`
        self.filled: dict[str, int] = {}
        self.writers: dict[tuple[str, str], str] = {}
        self.last: dict[str, tuple[str, str]] = {}  # target -> key of its latest write
        self.unmatched: list[str] = []
        self.problems: list[str] = []
        # elements a bad tensor was meant to write: already reported, so not "missing" again
        self.refused: dict[str, int] = {}

    def buffer(self, target: str) -> np.ndarray:
        if target not in self.buffers:
            spec = self.specs[target]
            self.buffers[target] = np.zeros(spec.shape, dtype=spec.dtype)
            self.filled[target] = 0
        return self.buffers[target]

    def add(self, name: str, array: Any, rule: Rule, match: re.Match) -> None:
        groups = match.groupdict()
        try:
            target = rule.target.format(**groups)
        except (KeyError, IndexError) as err:
            raise ValueError(
                f"rule {rule.pattern!r}: target template {rule.target!r} uses group {err} "
                "that the pattern does not define"
            ) from None
        if target not in self.specs:
            self.problems.append(f"{name}: maps to {target!r}, which the model does not have")
            return
        src_shape = tuple(np.shape(array))
        piece = np.asarray(array)
        if rule.transform is not None:
            piece = rule.transform(piece)
        spec = self.specs[target]
        index = rule.index(groups, spec.shape) if rule.index is not None else None
        where = f"{target}{_index_str(index)}"
        if target in self.done:
            self.problems.append(f"{name}: writes {where}, but every element of {target} was "
                                 f"already written (last by {self.writers[self.last[target]]})")
            return
        buf = self.buffer(target)
        try:
            view = buf if index is None else buf[index]
        except IndexError as err:
            self.problems.append(f"{name}: index {where} is outside {target} {spec.shape}: {err}")
            return
        if tuple(piece.shape) != tuple(view.shape):
            self.refuse(target, view, f"{name}: shape mismatch for {where}: expected "
                        f"{tuple(view.shape)}, got {tuple(piece.shape)} (source shape "
                        f"{src_shape})")
            return
        if _is_float(spec.dtype) and not _is_float(piece.dtype):
            self.refuse(target, view, f"{name}: stored as {piece.dtype}, but {target} is a "
                        f"{spec.dtype} parameter (integer weights would lose their values; "
                        "quantized checkpoints are not read)")
            return
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
            piece = piece.astype(spec.dtype, copy=False)
        if _is_float(piece.dtype) and not np.isfinite(piece).all():
            bad = int(np.size(piece) - np.count_nonzero(np.isfinite(piece)))
            self.refuse(target, view, f"{name}: {bad} non-finite value(s) (NaN/Inf) as "
                        f"{spec.dtype}")
            return
        key = (target, _index_str(index))
        if key in self.writers:
            self.problems.append(f"{name}: writes {where}, already written by {self.writers[key]}")
            return
        self.writers[key] = name
        if index is None:
            buf[...] = piece
        else:
            buf[index] = piece
        self.filled[target] += int(piece.size)
        self.last[target] = key
        if self.put is not None and self.filled[target] == int(np.prod(spec.shape)):
            self.buffers[target] = self.put(target, buf)
            self.done.add(target)

    def refuse(self, target: str, view: np.ndarray, problem: str) -> None:
        self.problems.append(problem)
        self.refused[target] = self.refused.get(target, 0) + int(view.size)

    def report(self) -> None:
        missing = []
        for target, spec in self.specs.items():
            size = int(np.prod(spec.shape, dtype=np.int64))
            got = self.filled.get(target, 0)
            refused = self.refused.get(target, 0)
            if got + refused != size:
                also = f" ({refused} more in bad tensors above)" if refused else ""
                missing.append(f"{target} {tuple(spec.shape)}: {got} of {size} elements "
                               f"written{also}")
        found = [(kinds, items) for kinds, items in (
            (("source keys matching no rule", "source key matching no rule"), self.unmatched),
            (("bad tensors", "bad tensor"), self.problems),
            (("model parameters not fully filled", "model parameter not fully filled"), missing),
        ) if items]
        if sum(len(items) for _, items in found) == 1:  # one problem: one line
            (_, kind), (item,) = found[0]
            raise MappingError(f"checkpoint does not match the model: {kind}: {item}")
        if found:
            lines = [line for (kinds, items) in found
                     for line in (f"{kinds[0]} ({len(items)}):", *(f"  {i}" for i in items))]
            raise MappingError("checkpoint does not match the model:\n" + "\n".join(lines))


def _is_float(dtype: np.dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def fill(
    tensors: Iterable[tuple[str, Any]],
    rules: Sequence[Rule],
    specs: Mapping[str, jax.ShapeDtypeStruct],
    *,
    ignore: Sequence[str] = (),
    put: Callable[[str, np.ndarray], jax.Array] | None = None,
) -> dict[str, Any]:
    """Write every `(name, array)` into numpy buffers shaped and typed like `specs`.

    Args:
      tensors: `(source name, array-like)` pairs, consumed once (a generator over shards works).
      rules: tried in order; the first whose pattern fully matches a name is used.
      specs: `target_specs(abstract_model)`: dotted path -> shape and dtype.
      ignore: regexes (fullmatch) of source names to skip silently (e.g. rotary buffers).
      put: `put(path, buffer) -> device array`, called once per target as soon as it is
        complete (its host buffer is then dropped); None keeps every buffer on the host.
    Returns:
      dotted path -> the target's array (numpy, or what `put` returned), for every target.
    Raises:
      MappingError listing all unmatched keys, bad tensors and incompletely filled targets.
    """
    ignore_re = [re.compile(p) for p in ignore]
    filler = _Filler(specs, put)
    for name, array in tensors:
        if any(r.fullmatch(name) for r in ignore_re):
            continue
        for rule in rules:
            m = rule.match(name)
            if m is not None:
                filler.add(name, array, rule, m)
                break
        else:
            filler.unmatched.append(name)
        del array  # let the source tensor go before the next one is read
    filler.report()
    return filler.buffers


def load_into(
    abstract_model: nnx.Module,
    arrays: Mapping[str, np.ndarray],
    *,
    put: Callable[[str, np.ndarray], jax.Array] | None = None,
) -> nnx.Module:
    """A concrete model with the structure of `abstract_model` and the values in `arrays`.

    `put(path, array)` moves each array to devices (default `jnp.asarray`); pass a function
    with `jax.device_put(array, sharding)` to shard while loading.
    """
    put = put or (lambda path, a: jnp.asarray(a))
    graphdef, state = nnx.split(abstract_model)
    flat = nnx.to_flat_state(state)
    missing = [path_str(p) for p, _ in flat if path_str(p) not in arrays]
    if missing:
        raise MappingError("no value for model parameters: " + ", ".join(missing))
    new = [(p, v.replace(put(path_str(p), arrays[path_str(p)]))) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(new))


def convert(
    tensors: Iterable[tuple[str, Any]],
    rules: Sequence[Rule],
    abstract_model: nnx.Module,
    *,
    ignore: Sequence[str] = (),
    put: Callable[[str, np.ndarray], jax.Array] | None = None,
) -> nnx.Module:
    """`fill` then `load_into`: checkpoint tensors -> concrete NNX model. Each target goes to
    devices (`put`, default `jnp.asarray`) as soon as it is complete."""
    put = put or (lambda path, a: jnp.asarray(a))
    arrays = fill(tensors, rules, target_specs(abstract_model), ignore=ignore, put=put)
    return load_into(abstract_model, arrays, put=lambda path, a: a)
