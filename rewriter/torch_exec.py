"""Run an IR graph as a `torch.nn.Module`, so the weights a pass created can be fine-tuned.

Each node dispatches to `torch.nn.functional` (the ops CNNs use, plus the shape plumbing real
exports carry). Every float weight — initializer or `Constant` node output (PP-OCR stores weights
that way) — becomes a named parameter in a `ParameterDict` (keys sanitized, `param_key` maps the
ONNX name); only the names given as trainable get gradients. `write_back` copies trained values
into the IR by ONNX name. torch is imported only when a module is built: the core never needs it.

A model with an op (or an attribute) we cannot run raises `PassError("not fine-tunable: ...")`
before any work, so a pipeline can keep its data-free / least-squares result.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from rewriter.errors import PassError

#: ONNX ops the executor runs (default domain).
SUPPORTED_OPS = frozenset({
    "Conv", "ConvTranspose", "BatchNormalization", "Relu", "LeakyRelu", "PRelu", "Clip",
    "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Sqrt", "Pow", "Add", "Mul", "Sub",
    "Div", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
    "Transpose", "Gemm", "MatMul", "Concat", "Softmax", "Pad", "Resize", "Split", "Slice",
    "Constant", "Identity", "Dropout", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast",
    "ReduceMean",
})


# ------------------------------------------------------------------------------ checks (no torch)


def unsupported(model: ir.Model) -> list[tuple[str, str, str]]:
    """(op, node name, why) for every node of the main graph the executor cannot run."""
    problems = []
    for node in model.graph:
        reason = _refusal(node)
        if reason is not None:
            problems.append((node.op_type, node.name or "", reason))
    return problems


def check_fine_tunable(model: ir.Model) -> None:
    """Raise PassError naming the first op the executor cannot run."""
    problems = unsupported(model)
    if problems:
        op, name, why = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PassError(f"not fine-tunable: op {op} (node {name}): {why}{more}")


def _refusal(node: ir.Node) -> str | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
        return "no torch implementation"
    attrs = node.attributes
    op = node.op_type
    if op == "Resize":
        mode = attrs.get_string("mode", "nearest")
        ctm = attrs.get_string("coordinate_transformation_mode", "half_pixel")
        if _resize_mode(mode, ctm, attrs.get_string("nearest_mode", "round_prefer_floor")) is None:
            return f"Resize mode={mode} coordinate_transformation_mode={ctm}"
        if attrs.get_int("antialias", 0):
            return "Resize with antialias"
    if op == "ConvTranspose" and ("output_shape" in attrs or attrs.get_string(
            "auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
        return "ConvTranspose with output_shape or SAME padding"
    if op == "BatchNormalization" and attrs.get_int("training_mode", 0):
        return "BatchNormalization in training mode"
    if op in ("MaxPool", "BatchNormalization", "Dropout") and any(
        o.uses() or o.is_graph_output() for o in node.outputs[1:]
    ):
        return f"{op} secondary outputs are used"
    if op in ("Conv", "MaxPool", "AveragePool") and attrs.get_string(
            "auto_pad", "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return "unknown auto_pad"
    return None


def _resize_mode(mode: str, ctm: str, nearest_mode: str) -> tuple[str, bool] | None:
    """torch interpolate (mode, align_corners) equal to this ONNX Resize, or None."""
    if mode == "nearest":
        if ctm == "asymmetric" and nearest_mode == "floor":
            return "nearest", False
        if ctm in ("half_pixel", "pytorch_half_pixel") and nearest_mode.startswith("round_prefer"):
            return "nearest-exact", False
        return None
    if mode == "linear":
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            return "linear", False
        if ctm == "align_corners":
            return "linear", True
    return None


def sanitize(name: str, index: int) -> str:
    """A ParameterDict key for an ONNX name (dots and odd characters are not allowed there)."""
    return f"p{index}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"[:120]


# ------------------------------------------------------------------------------ building


def float_weights(model: ir.Model) -> dict[str, tuple[np.ndarray, str]]:
    """ONNX name -> (array, "initializer" | "constant") for every float weight of the main graph."""
    found: dict[str, tuple[np.ndarray, str]] = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is not None and value.const_value.dtype.is_floating_point():
            found[name] = (value.const_value.numpy(), "initializer")
    for node in model.graph:
        is_constant = node.op_type == "Constant" and node.domain in ("", "ai.onnx")
        if is_constant and "value" in node.attributes:
            tensor = node.attributes["value"].value
            if tensor.dtype.is_floating_point():
                found[node.outputs[0].name] = (tensor.numpy(), "constant")
    return found


def to_torch(model: ir.Model, trainable: Collection[str] = ()) -> Any:
    """A `torch.nn.Module` computing `model`'s main graph; `trainable` names get gradients."""
    check_fine_tunable(model)
    return _module_class()(model, trainable)


def write_back(module: Any, model: ir.Model, names: Collection[str] | None = None) -> list[str]:
    """Copy the module's values of `names` (default: its trainable ones) into `model` by name."""
    names = list(module.trainable_names if names is None else names)
    values = ir.convenience.create_value_mapping(model.graph)
    for name in names:
        param = module.params[module.param_key[name]]
        value = values.get(name)
        if value is None:
            raise PassError(f"cannot write back '{name}': no such value in the model")
        old = ir.convenience.get_const_tensor(value)
        array = np.ascontiguousarray(param.detach().cpu().numpy().astype(old.dtype.numpy()))
        tensor = ir.tensor(array, name=name)
        if value.is_initializer():
            value.const_value = tensor
        else:  # a Constant node's output
            value.producer().attributes["value"] = ir.AttrTensor("value", tensor)
    return names


@functools.cache
def _module_class() -> type:
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise PassError("fine-tuning needs torch: install the 'finetune' extra") from None
    ops = _torch_ops()

    class TorchGraph(torch.nn.Module):
        """The main graph of an IR model as a torch module (nodes run in graph order)."""

        def __init__(self, model: ir.Model, trainable: Collection[str]) -> None:
            super().__init__()
            weights = float_weights(model)
            missing = sorted(set(trainable) - set(weights))
            if missing:
                raise PassError(f"cannot train {missing[:3]}: not float weights of the model")
            self.opset = model.opset_imports.get("", 17)
            self.param_key = {name: sanitize(name, i) for i, name in enumerate(weights)}
            self.trainable_names = [n for n in weights if n in set(trainable)]
            self.params = torch.nn.ParameterDict({
                self.param_key[name]: torch.nn.Parameter(
                    torch.from_numpy(np.array(array)), requires_grad=name in set(trainable))
                for name, (array, _) in weights.items()
            })
            self._other_consts: dict[str, torch.Tensor] = {}
            for name, value in model.graph.initializers.items():
                if name not in weights and value.const_value is not None:
                    self._other_consts[name] = torch.from_numpy(np.array(value.const_value.numpy()))
            inits = set(model.graph.initializers)
            self.input_names = [v.name for v in model.graph.inputs if v.name not in inits]
            self.output_names = [v.name for v in model.graph.outputs]
            self._nodes = [
                (n.op_type, n.name or "", [v.name if v is not None else None for v in n.inputs],
                 [v.name for v in n.outputs], _attributes(n))
                for n in model.graph
                if not (n.op_type == "Constant" and n.outputs[0].name in weights)
            ]

        def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
            env: dict[str, torch.Tensor] = {**self._other_consts}
            env.update({name: self.params[key] for name, key in self.param_key.items()})
            env.update(zip(self.input_names, args, strict=False))
            env.update(kwargs)
            for op, name, inputs, outputs, attrs in self._nodes:
                args_ = [env[i] if i else None for i in inputs]
                try:
                    result = ops[op](args_, attrs, self.opset, len(outputs))
                except PassError:
                    raise
                except Exception as exc:
                    raise PassError(
                        f"torch executor failed at op {op} (node {name}): {exc}") from exc
                if not isinstance(result, (tuple, list)):
                    result = (result,)
                env.update(zip(outputs, result, strict=False))
            outs = tuple(env[n] for n in self.output_names)
            return outs[0] if len(outs) == 1 else outs

    return TorchGraph


def _attributes(node: ir.Node) -> dict[str, Any]:
    """Plain Python attribute values (tensors as numpy)."""
    attrs = {}
    for name, attr in node.attributes.items():
        value = attr.value
        if attr.type == ir.AttributeType.TENSOR:
            value = value.numpy()
        elif isinstance(value, Sequence) and not isinstance(value, str):
            value = list(value)
        attrs[name] = value
    return attrs


# ------------------------------------------------------------------------------ op implementations


@functools.cache
def _torch_ops() -> dict[str, Callable[..., Any]]:  # noqa: C901 - one table of small ops
    """op type -> fn(inputs, attrs, opset, n_outputs). Built once, when torch is first needed."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    def ints(t: torch.Tensor | None) -> list[int] | None:
        return None if t is None else [int(v) for v in t.reshape(-1).tolist()]

    def pad_pairs(begin: Sequence[int], end: Sequence[int]) -> list[int]:
        """ONNX [b1..bn], [e1..en] for the trailing dims -> torch's (last dim first) pairs."""
        pairs: list[int] = []
        for b, e in zip(reversed(begin), reversed(end), strict=True):
            pairs += [int(b), int(e)]
        return pairs

    def window_pads(x, kernel, strides, dilations, attrs) -> tuple[list[int], list[int]]:
        spatial = len(kernel)
        auto = attrs.get("auto_pad", "NOTSET")
        if auto == "VALID":
            return [0] * spatial, [0] * spatial
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for i in range(spatial):
                size = x.shape[2 + i]
                out = math.ceil(size / strides[i])
                total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
                small = total // 2
                begin.append(small if auto == "SAME_UPPER" else total - small)
                end.append(total - begin[-1])
            return begin, end
        pads = attrs.get("pads") or [0] * (2 * spatial)
        return list(pads[:spatial]), list(pads[spatial:])

    def geometry(x, kernel, attrs):
        spatial = len(kernel)
        strides = attrs.get("strides") or [1] * spatial
        dilations = attrs.get("dilations") or [1] * spatial
        begin, end = window_pads(x, kernel, strides, dilations, attrs)
        return strides, dilations, begin, end

    def conv(i, a, opset, n):
        x, w = i[0], i[1]
        b = i[2] if len(i) > 2 else None
        kernel = list(w.shape[2:])
        strides, dilations, begin, end = geometry(x, kernel, a)
        if begin != end:
            x, begin = F.pad(x, pad_pairs(begin, end)), [0] * len(kernel)
        fn = (F.conv1d, F.conv2d, F.conv3d)[len(kernel) - 1]
        return fn(x, w, b, strides, begin, dilations, a.get("group", 1))

    def conv_transpose(i, a, opset, n):
        x, w = i[0], i[1]
        b = i[2] if len(i) > 2 else None
        kernel = list(w.shape[2:])
        spatial = len(kernel)
        strides = a.get("strides") or [1] * spatial
        dilations = a.get("dilations") or [1] * spatial
        pads = a.get("pads") or [0] * (2 * spatial)
        if a.get("auto_pad") == "VALID":
            pads = [0] * (2 * spatial)
        begin, end = pads[:spatial], pads[spatial:]
        out_pad = a.get("output_padding") or [0] * spatial
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
        if begin == end:
            return fn(x, w, b, strides, begin, out_pad, a.get("group", 1), dilations)
        y = fn(x, w, b, strides, 0, out_pad, a.get("group", 1), dilations)
        index = [slice(None), slice(None)] + [
            slice(bb, y.shape[2 + k] - ee)
            for k, (bb, ee) in enumerate(zip(begin, end, strict=True))
        ]
        return y[tuple(index)]

    def pool(i, a, opset, n, kind):
        x = i[0]
        kernel = list(a["kernel_shape"])
        strides, dilations, begin, end = geometry(x, kernel, a)
        spatial = len(kernel)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
            if begin != end or any(b > k // 2 for b, k in zip(begin, kernel, strict=True)):
                x = F.pad(x, pad_pairs(begin, end), value=-math.inf)
                begin = [0] * spatial
            return fn(x, kernel, strides, begin, dilations, ceil_mode=ceil)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]
        include = bool(a.get("count_include_pad", 0))
        if begin == end and all(b <= k // 2 for b, k in zip(begin, kernel, strict=True)):
            kw = {} if spatial == 1 else {"divisor_override": None}
            return fn(x, kernel, strides, begin, ceil, include, **kw)
        padded = F.pad(x, pad_pairs(begin, end))
        total = fn(padded, kernel, strides, 0, ceil, True) * math.prod(kernel)
        if include:
            return total / math.prod(kernel)
        ones = F.pad(torch.ones_like(x[:1, :1]), pad_pairs(begin, end))
        count = fn(ones, kernel, strides, 0, ceil, True) * math.prod(kernel)
        return total / count

    def batch_norm(i, a, opset, n):
        x, scale, bias, mean, var = i[:5]
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))

    def clip(i, a, opset, n):
        x = i[0]
        low = i[1] if len(i) > 1 and i[1] is not None else a.get("min")
        high = i[2] if len(i) > 2 and i[2] is not None else a.get("max")
        if low is not None:
            x = torch.maximum(x, torch.as_tensor(low, dtype=x.dtype))
        if high is not None:
            x = torch.minimum(x, torch.as_tensor(high, dtype=x.dtype))
        return x

    def div(i, a, opset, n):
        x, y = i
        if x.dtype.is_floating_point:
            return x / y
        return torch.div(x, y, rounding_mode="trunc")

    def flatten(i, a, opset, n):
        x = i[0]
        axis = a.get("axis", 1) % max(x.dim(), 1) if a.get("axis", 1) < 0 else a.get("axis", 1)
        return x.reshape(math.prod(x.shape[:axis]), -1)

    def reshape(i, a, opset, n):
        x, shape = i[0], ints(i[1])
        if not a.get("allowzero", 0):
            shape = [x.shape[k] if s == 0 else s for k, s in enumerate(shape)]
        return x.reshape(shape)

    def transpose(i, a, opset, n):
        perm = a.get("perm") or list(reversed(range(i[0].dim())))
        return i[0].permute(perm)

    def gemm(i, a, opset, n):
        x, w = i[0], i[1]
        x = x.t() if a.get("transA", 0) else x
        w = w.t() if a.get("transB", 0) else w
        y = a.get("alpha", 1.0) * (x @ w)
        if len(i) > 2 and i[2] is not None:
            y = y + a.get("beta", 1.0) * i[2]
        return y

    def softmax(i, a, opset, n):
        x = i[0]
        if opset >= 13:
            return F.softmax(x, dim=a.get("axis", -1))
        axis = a.get("axis", 1) % x.dim()
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return F.softmax(flat, dim=1).reshape(x.shape)

    def pad(i, a, opset, n):
        x = i[0]
        pads = ints(i[1]) if len(i) > 1 and i[1] is not None else list(a["pads"])
        value = 0.0
        if len(i) > 2 and i[2] is not None:
            value = float(i[2].reshape(-1)[0])
        elif "value" in a:
            value = float(a["value"])
        rank = x.dim()
        axes = ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(rank))
        begin, end = [0] * rank, [0] * rank
        for k, axis in enumerate(axes):
            begin[axis % rank], end[axis % rank] = pads[k], pads[k + len(axes)]
        first = next((d for d in range(rank) if begin[d] or end[d]), rank)
        pairs = pad_pairs(begin[first:], end[first:])
        mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
                "wrap": "circular"}[a.get("mode", "constant")]
        if mode == "constant":
            return F.pad(x, pairs, value=value)
        return F.pad(x, pairs, mode=mode)

    def resize(i, a, opset, n):
        x = i[0]
        if opset < 11:
            scales, sizes = i[1], None
        else:
            scales = i[2] if len(i) > 2 else None
            sizes = i[3] if len(i) > 3 else None
        mode, align = _resize_mode(a.get("mode", "nearest"),
                                   a.get("coordinate_transformation_mode", "half_pixel"),
                                   a.get("nearest_mode", "round_prefer_floor"))
        spatial = x.dim() - 2
        if mode == "linear":
            mode = ("linear", "bilinear", "trilinear")[spatial - 1]
        kw = {"align_corners": align} if "linear" in mode else {}
        if sizes is not None and sizes.numel():
            return F.interpolate(x, size=ints(sizes)[2:], mode=mode, **kw)
        factors = [float(s) for s in scales.reshape(-1).tolist()]
        if factors[:2] != [1.0, 1.0]:
            raise PassError("Resize scales batch or channel dims")
        return F.interpolate(x, scale_factor=factors[2:], mode=mode,
                             recompute_scale_factor=False, **kw)

    def split(i, a, opset, n):
        x = i[0]
        axis = a.get("axis", 0)
        sizes = ints(i[1]) if len(i) > 1 and i[1] is not None else a.get("split")
        if not sizes:
            length = x.shape[axis]
            chunk = math.ceil(length / n)
            sizes = [min(chunk, length - k * chunk) for k in range(n)]
        return torch.split(x, list(sizes), dim=axis)

    def slice_(i, a, opset, n):
        x = i[0]
        if opset < 10:
            starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
        else:
            starts, ends = ints(i[1]), ints(i[2])
            axes = ints(i[3]) if len(i) > 3 and i[3] is not None else None
            steps = ints(i[4]) if len(i) > 4 and i[4] is not None else None
        axes = axes or list(range(len(starts)))
        steps = steps or [1] * len(starts)
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            dim = x.shape[axis]
            start = start + dim if start < 0 else start
            end = end + dim if end < 0 else end
            if step > 0:
                start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            else:
                start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            index = torch.arange(start, end, step, device=x.device)
            x = x.index_select(axis % x.dim(), index)
        return x

    def gather(i, a, opset, n):
        x, idx = i
        axis = a.get("axis", 0) % x.dim()
        flat = x.index_select(axis, idx.reshape(-1).long() % x.shape[axis])
        return flat.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))  # scalar idx: ()

    def axes_of(i, a, opset):
        if opset >= 13:
            return ints(i[1]) if len(i) > 1 and i[1] is not None else None
        return a.get("axes")

    def unsqueeze(i, a, opset, n):
        x = i[0]
        axes = axes_of(i, a, opset)
        rank = x.dim() + len(axes)
        for axis in sorted(ax % rank for ax in axes):
            x = x.unsqueeze(axis)
        return x

    def squeeze(i, a, opset, n):
        x = i[0]
        axes = axes_of(i, a, opset)
        if axes is None:
            return x.squeeze()
        for axis in sorted((ax % x.dim() for ax in axes), reverse=True):
            x = x.squeeze(axis)
        return x

    def reduce_mean(i, a, opset, n):
        x = i[0]
        axes = ints(i[1]) if opset >= 18 and len(i) > 1 and i[1] is not None else a.get("axes")
        keep = bool(a.get("keepdims", 1))
        if not axes:
            return x.mean().reshape([1] * x.dim()) if keep else x.mean()
        return x.mean(dim=list(axes), keepdim=keep)

    def constant(i, a, opset, n):
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            if key in a:
                return torch.as_tensor(np.array(a[key], dtype=_CONST_DTYPES.get(key)))
        raise PassError(f"Constant with unsupported attribute {sorted(a)}")

    def cast(i, a, opset, n):
        return i[0].to(_torch_dtype(torch, a["to"]))

    def shape(i, a, opset, n):
        dims = list(i[0].shape)[a.get("start", 0): a.get("end")]
        return torch.tensor(dims, dtype=torch.int64)

    def spatial_dims(x):
        return tuple(range(2, x.dim()))

    def elementwise(fn):
        return lambda i, a, opset, n: fn(*i)

    return {
        "Conv": conv,
        "ConvTranspose": conv_transpose,
        "BatchNormalization": batch_norm,
        "Relu": elementwise(F.relu),
        "LeakyRelu": lambda i, a, o, n: F.leaky_relu(i[0], a.get("alpha", 0.01)),
        "PRelu": lambda i, a, o, n: torch.where(i[0] >= 0, i[0], i[0] * i[1]),
        "Clip": clip,
        "Sigmoid": elementwise(torch.sigmoid),
        "HardSigmoid": lambda i, a, o, n: torch.clamp(
            a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0.0, 1.0),
        "HardSwish": elementwise(F.hardswish),
        "Tanh": elementwise(torch.tanh),
        "Erf": elementwise(torch.erf),
        "Sqrt": elementwise(torch.sqrt),
        "Pow": elementwise(torch.pow),
        "Add": elementwise(torch.add),
        "Mul": elementwise(torch.mul),
        "Sub": elementwise(torch.sub),
        "Div": div,
        "MaxPool": lambda i, a, o, n: pool(i, a, o, n, "max"),
        "AveragePool": lambda i, a, o, n: pool(i, a, o, n, "avg"),
        "GlobalAveragePool": lambda i, a, o, n: i[0].mean(dim=spatial_dims(i[0]), keepdim=True),
        "GlobalMaxPool": lambda i, a, o, n: i[0].amax(dim=spatial_dims(i[0]), keepdim=True),
        "Flatten": flatten,
        "Reshape": reshape,
        "Transpose": transpose,
        "Gemm": gemm,
        "MatMul": elementwise(torch.matmul),
        "Concat": lambda i, a, o, n: torch.cat([t for t in i if t is not None], dim=a["axis"]),
        "Softmax": softmax,
        "Pad": pad,
        "Resize": resize,
        "Split": split,
        "Slice": slice_,
        "Constant": constant,
        "Identity": lambda i, a, o, n: i[0],
        "Dropout": lambda i, a, o, n: i[0],
        "Shape": shape,
        "Gather": gather,
        "Unsqueeze": unsqueeze,
        "Squeeze": squeeze,
        "Cast": cast,
        "ReduceMean": reduce_mean,
    }


_CONST_DTYPES = {"value_float": np.float32, "value_floats": np.float32,
                 "value_int": np.int64, "value_ints": np.int64}


def _torch_dtype(torch: Any, onnx_type: int) -> Any:
    numpy_dtype = ir.DataType(onnx_type).numpy()
    if numpy_dtype == np.bool_:
        return torch.bool
    return torch.from_numpy(np.zeros(1, numpy_dtype)).dtype
