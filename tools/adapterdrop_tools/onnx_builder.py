"""A small helper around onnx.helper to build float32 graphs with embedded initializers."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10
F32_MIN = float(np.finfo(np.float32).min)


class GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list = []
        self.inits: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._n = 0
        self._const_names: set = set()

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def input(self, name: str, elem, dims):
        self.inputs.append(helper.make_tensor_value_info(name, elem, dims))
        return name

    def output(self, name: str, elem, dims):
        self.outputs.append(helper.make_tensor_value_info(name, elem, dims))
        return name

    def const(self, value, name: str | None = None, dtype=np.float32) -> str:
        if name is not None and name in self._const_names:
            return name  # same named weight used twice (e.g. one LayerNorm in two places)
        arr = np.array(value, dtype=dtype, order="C")  # keeps 0-d scalars 0-d
        name = name or self.fresh("const")
        self._const_names.add(name)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs, out: str | None = None, **attrs) -> str:
        out = out or self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.fresh("n_" + op_type), **attrs))
        return out

    # ---- composite ops -------------------------------------------------------------------
    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str, out=None) -> str:
        """x @ W^T + b for a torch-layout weight [out, in]."""
        w = self.const(np.asarray(weight, np.float32).T, f"{name}.weight_t")
        y = self.op("MatMul", [x, w])
        if bias is None:
            return self.op("Identity", [y], out) if out else y
        b = self.const(bias, f"{name}.bias")
        return self.op("Add", [y, b], out)

    def layer_norm(self, x: str, weight, bias, eps: float, name: str, out=None) -> str:
        w = self.const(weight, f"{name}.weight")
        b = self.const(bias, f"{name}.bias")
        return self.op("LayerNormalization", [x, w, b], out, axis=-1, epsilon=float(eps))

    def activation(self, x: str, kind: str, out=None) -> str:
        if kind == "relu":
            return self.op("Relu", [x], out)
        if kind == "tanh":
            return self.op("Tanh", [x], out)
        if kind == "sigmoid":
            return self.op("Sigmoid", [x], out)
        if kind == "silu":
            return self.op("Mul", [x, self.op("Sigmoid", [x])], out)
        if kind == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt 2))
            e = self.op("Erf", [self.op("Mul", [x, self.const(1.0 / np.sqrt(2.0))])])
            one_plus = self.op("Add", [e, self.const(1.0)])
            return self.op("Mul", [self.op("Mul", [x, self.const(0.5)]), one_plus], out)
        raise ValueError(f"unknown activation {kind}")

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="adapterdrop-tools")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def hidden_dims(h: int):
    return ["batch", "seq", h]


def save(model: onnx.ModelProto, path: str) -> None:
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def initializers(path: str) -> dict:
    """name -> numpy array of a saved graph's initializers."""
    model = onnx.load(path, load_external_data=False)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


F = TensorProto.FLOAT
I64 = TensorProto.INT64
