"""Small helpers the passes share: values of nodes, fake evaluation, creating nodes with metadata."""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from autosp import _torch_private

# Nodes Dynamo keeps for their side effects; they have no value and are never re-evaluated.
SIDE_EFFECT_TARGETS = {torch._C._set_grad_enabled, torch._C._log_api_usage_once}
_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "original_aten", "seq_nr")


def val(node: Any) -> Any:
    """The (fake) value of a node, or the object itself for constants."""
    if not isinstance(node, fx.Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def global_val(node: Any) -> Any:
    """The value a node had before sharding (its value on one device)."""
    if isinstance(node, fx.Node) and "autosp.global_val" in node.meta:
        return node.meta["autosp.global_val"]
    return val(node)


def set_val(node: fx.Node, value: Any) -> None:
    node.meta["val"] = value
    node.meta["example_value"] = value


def is_tensor_node(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(val(node), torch.Tensor)


def input_nodes(node: fx.Node) -> list[fx.Node]:
    """The node's inputs in order, each once."""
    return list(dict.fromkeys(node.all_input_nodes))


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in input_nodes(node) if is_tensor_node(n)]


def fake_eval(node: fx.Node, fake_mode) -> Any:
    """Run the node's target on the values of its inputs (under the graph's fake mode)."""
    args = fx.node.map_arg(node.args, val)
    kwargs = fx.node.map_arg(node.kwargs, val)
    with fake_mode:
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            raise NotImplementedError("get_attr is not re-evaluated")
    raise ValueError(f"cannot evaluate node {node.format_node()}")


def refresh_val(node: fx.Node, fake_mode) -> None:
    """Recompute ``meta["val"]`` after the node's inputs changed."""
    if node.op in ("call_function", "call_method") and node.target not in SIDE_EFFECT_TARGETS:
        if val(node) is not None:
            set_val(node, fake_eval(node, fake_mode))


def new_node(
    graph: fx.Graph,
    target: Callable | str,
    args: tuple,
    kwargs: dict | None = None,
    *,
    like: fx.Node | None,
    fake_mode,
    op: str = "call_function",
    name_hint: str | None = None,
) -> fx.Node:
    """Create a node at the graph's insertion point, with its value and ``like``'s source metadata."""
    node = graph.create_node(op, target, args, kwargs or {}, name=name_hint)
    if like is not None:
        for key in _COPIED_META:
            if key in like.meta:
                node.meta[key] = like.meta[key]
    set_val(node, fake_eval(node, fake_mode))
    return node


def normalize_vals(gm: fx.GraphModule) -> None:
    """Give every node ``meta["val"]`` (Dynamo writes ``example_value``)."""
    for node in gm.graph.nodes:
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]


def target_name(node: fx.Node) -> str:
    """A readable name of what a node calls."""
    t = node.target
    if isinstance(t, str):
        return f"Tensor.{t}" if node.op == "call_method" else t
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    if mod.startswith("torch._C._nn"):
        mod = "torch.nn.functional"
    return f"{mod}.{name}" if mod and not mod.startswith("_operator") else f"operator.{name}"


def human_bytes(n: float) -> str:
    """``n`` bytes as the reports write them: ``512 B``, ``1.5 KiB`` .. ``16.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def tensor_bytes(value: Any) -> int:
    from autosp._torch_private import size_hint

    if not isinstance(value, torch.Tensor):
        return 0
    n = 1
    for s in value.shape:
        n *= size_hint(s)
    return n * value.element_size()


_OPERATOR_IN_PLACE = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift}


def writes_in_place(node: fx.Node) -> bool:
    """``x.add_(..)``, ``torch.relu_(x)``, ``torch._foreach_add_([x], 1)``, ``x[i] = v``, ``x += y``,
    ``x.__iadd__(y)``, ``torch.neg(x, out=y)``, an aten overload whose schema writes an argument
    (``aten.fill_.Scalar``, ``aten.add.out``): an op that writes into a tensor it is given."""
    target = node.target
    if target in _OPERATOR_IN_PLACE or node.kwargs.get("out") is not None or _inplace_flag(node):
        return True
    written = _torch_private.written_arguments(target)
    if written is not None:
        return bool(written)
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return False  # operator.and_ / or_ / not_ are not in place
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if name.startswith("__") and name.endswith("__"):  # dunders: __iadd__ writes, __and__ does not
        return name[2:-2] in _IN_PLACE_DUNDERS
    return name.endswith("_")


def written_inputs(node: fx.Node) -> list[fx.Node]:
    """The graph values an op writes into (``writes_in_place``; which ones: ``_written_args``)."""
    return [w for w in _written_args(node) if isinstance(w, fx.Node)] if writes_in_place(node) else []


def aliases(node: fx.Node) -> set[fx.Node]:
    """``node``, the values it is a view of, and their views (``is_view``, through the graph)."""
    source = node
    while is_view(source) and source.args and isinstance(source.args[0], fx.Node):
        source = source.args[0]
    out, todo = {source}, [source]
    while todo:
        for user in todo.pop().users:
            if is_view(user) and user not in out:
                out.add(user)
                todo.append(user)
    return out | {node}


def _inplace_flag(node: fx.Node) -> bool:
    """``F.relu(x, inplace=True)`` and the like (what Dynamo records for ``nn.ReLU(inplace=True)``):
    a function whose ``inplace`` argument is True writes into its first."""
    if "inplace" in node.kwargs:
        return node.kwargs["inplace"] is True
    try:
        index = _inplace_index(node.target) if node.op == "call_function" else None
    except TypeError:  # an unhashable target
        index = None
    return index is not None and index < len(node.args) and node.args[index] is True


@functools.cache
def _inplace_index(target) -> int | None:
    """The position of ``target``'s ``inplace`` parameter (None: it has none, or no signature)."""
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


_IN_PLACE_DUNDERS = {"setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
                     "ixor", "ilshift", "irshift", "imatmul"}


def eliminate_dead_code(graph: fx.Graph) -> None:
    """FX's dead-code elimination, except that ops writing in place and side effects are kept
    (FX alone drops ``y.add_(1)`` when its result is unused, though ``y`` is)."""
    graph.eliminate_dead_code(
        is_impure_node=lambda n: n.is_impure() or writes_in_place(n) or n.target in SIDE_EFFECT_TARGETS)


# Methods whose result shares storage with their input (or, for ``to``/``contiguous``/``float``,
# may): a write into either is a write into both.
VIEW_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "expand", "transpose", "permute", "t", "as_strided",
                "narrow", "select", "flatten", "unflatten", "view_as", "expand_as", "detach", "contiguous", "to",
                "float"}


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` reads, directly or through others (not ``node`` itself)."""
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def is_view(node: fx.Node) -> bool:
    return node.target is operator.getitem or (node.op == "call_method" and node.target in VIEW_METHODS)


def written_in_place(node: fx.Node) -> bool:
    """Whether some op writes into ``node``'s value in place: itself, a view of it, a tensor it is
    a view of, or any tensor sharing its storage (by the graph's fake values: ``x.long()`` of an
    int64 ``x`` is ``x`` itself, ``torch.narrow`` a view, neither a method ``is_view`` knows)."""
    return _storage_written(node) or any(writes_in_place(user) for n in aliases(node) for user in n.users)


def _storage_written(node: fx.Node) -> bool:
    storage = _storage(node)
    if storage is None:
        return False
    for n in node.graph.nodes:
        if n.op in ("call_function", "call_method") and writes_in_place(n):
            if any(isinstance(w, fx.Node) and _storage(w) == storage for w in _written_args(n)):
                return True
    return False


def _written_args(n: fx.Node) -> list:
    """The tensors (nodes) an in-place op writes: ``out=``; an aten overload's arguments its schema
    marks written; else the first argument, or each tensor of it (``_foreach_mul_([a, b], 2)``)."""
    out = n.kwargs.get("out")
    if out is not None:
        return list(out) if isinstance(out, (tuple, list)) else [out]
    by_schema = _torch_private.written_arguments(n.target)
    if by_schema is not None:
        written = []
        for i, name in by_schema:
            value = n.args[i] if i < len(n.args) else n.kwargs.get(name)
            written.extend(value if isinstance(value, (tuple, list)) else [value])
        return written
    first = n.args[0] if n.args else None
    return list(first) if isinstance(first, (tuple, list)) else [first]


def _storage(node: fx.Node):
    """A key of the storage behind ``node``'s fake value (None: not a tensor, or no storage)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    v = val(node)
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return StorageWeakRef(v.untyped_storage())
    except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
        return None


def live_bytes(graph: fx.Graph) -> list[int]:
    """An estimate of the bytes of tensors alive after each node, in graph order: a value lives
    from its node to its last use; views (``meta["val"]._is_view()``) own no memory; placeholders
    count from the start (and free at their last use, as AOTAutograd's boxed inputs do)."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last[a] = index[n]

    def size(n: fx.Node) -> int:
        v = val(n)
        if n.op == "output" or not isinstance(v, torch.Tensor) or v._is_view():
            return 0
        return tensor_bytes(v)

    current = sum(size(n) for n in nodes if n.op == "placeholder")
    out = []
    for i, n in enumerate(nodes):
        if n.op != "placeholder":
            current += size(n) if n in last else 0  # an unused value is freed at once
        out.append(current)
        current -= sum(size(a) for a in set(n.all_input_nodes) if last.get(a) == i)
    return out
