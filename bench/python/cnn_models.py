"""Builds the two CNN benchmark models, SqueezeNet 1.0 and MobileNetV2, at 224x224, from fixed seeds.

Neither model's trained weights are needed to time a runtime or to compare two runtimes' outputs, and
committing them would add megabytes of binary to the repository. So the graphs are built here and
their weights drawn from `numpy.random.default_rng(seed)`, He-scaled so activations stay of order
one through every layer: the same package versions and seeds always give the same bytes.

- SqueezeNet: the graph of `light_squeezenet.onnx`, which the `onnx` package ships in its backend
  test data with every weight replaced by a `ConstantOfShape` of zeros. Each of those becomes an
  initializer of random weights of that shape; the model keeps its opset (9).
- MobileNetV2 (width 1.0): built layer by layer with `onnx.helper`, opset 13, batch norm folded
  into the convolutions' biases as an exported inference model has it, ReLU6 as `Clip(0, 6)`.

Both take a batch axis `N` first, as exported models usually do, and are run with N = 1.

Usage: python3 cnn_models.py OUT_DIR   (writes squeezenet.onnx and mobilenetv2.onnx)
"""

import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SQUEEZENET_SEED = 7
MOBILENET_SEED = 11


def he_weights(rng, shape, gain=2.0):
    """Normal weights with variance gain / fan_in, fan_in being all but the first axis."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    return (rng.standard_normal(shape) * np.sqrt(gain / fan_in)).astype(np.float32)


def squeezenet():
    rng = np.random.default_rng(SQUEEZENET_SEED)
    light = os.path.join(
        os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_squeezenet.onnx"
    )
    model = onnx.load(light)
    graph = model.graph
    shapes = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("__SHAPE")}
    kept_nodes = []
    weights = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            shape = [int(d) for d in shapes[node.input[0]]]
            if len(shape) == 1:
                values = (rng.standard_normal(shape) * 0.01).astype(np.float32)
            else:
                values = he_weights(rng, shape)
            weights.append(numpy_helper.from_array(values, node.output[0]))
        else:
            kept_nodes.append(node)
    initializers = [t for t in graph.initializer if not t.name.endswith("__SHAPE")] + weights
    names = {t.name for t in initializers}
    inputs = [i for i in graph.input if i.name not in names and not i.name.endswith("__SHAPE")]
    # Flattened to [N, 1000], as classifier exports present it (the light graph ends [N, 1000, 1, 1]).
    kept_nodes.append(helper.make_node("Flatten", [graph.output[0].name], ["probabilities"], axis=1))
    output = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 1000])
    new_graph = helper.make_graph(kept_nodes, "squeezenet", inputs, [output], initializer=initializers)
    out = helper.make_model(new_graph, opset_imports=list(model.opset_import), producer_name="outpost-bench")
    # IR 4 and later let initializers stay out of the graph inputs, so they are constants.
    out.ir_version = 7
    onnx.checker.check_model(out)
    return out


class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.initializers = []
        self.count = 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, prefix, values):
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def conv(self, x, c_in, c_out, kernel, stride, groups=1, gain=2.0):
        w = self.const("w", he_weights(self.rng, [c_out, c_in // groups, kernel, kernel], gain))
        b = self.const("b", (self.rng.standard_normal([c_out]) * 0.01).astype(np.float32))
        y = self.name("conv")
        pad = kernel // 2
        self.nodes.append(
            helper.make_node(
                "Conv", [x, w, b], [y], kernel_shape=[kernel, kernel], strides=[stride, stride],
                pads=[pad, pad, pad, pad], group=groups,
            )
        )
        return y

    def relu6(self, x):
        low = self.const("zero", np.array(0.0, dtype=np.float32))
        high = self.const("six", np.array(6.0, dtype=np.float32))
        y = self.name("relu6")
        self.nodes.append(helper.make_node("Clip", [x, low, high], [y]))
        return y

    def op(self, op_type, inputs, **attributes):
        y = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [y], **attributes))
        return y


def mobilenetv2():
    b = Builder(MOBILENET_SEED)
    x = b.relu6(b.conv("input", 3, 32, 3, 2))
    c_in = 32
    # (expansion, output channels, repeats, first stride), as in the MobileNetV2 paper.
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = c_in * t
            y = x
            if t != 1:
                y = b.relu6(b.conv(y, c_in, hidden, 1, 1))
            y = b.relu6(b.conv(y, hidden, hidden, 3, stride, groups=hidden))
            residual = stride == 1 and c_in == c
            # A linear projection; halved on residual branches so the sums do not grow.
            y = b.conv(y, hidden, c, 1, 1, gain=0.25 if residual else 1.0)
            x = b.op("Add", [x, y]) if residual else y
            c_in = c
    x = b.relu6(b.conv(x, c_in, 1280, 1, 1))
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    w = b.const("fc_w", he_weights(b.rng, [1000, 1280], 1.0))
    bias = b.const("fc_b", np.zeros([1000], dtype=np.float32))
    b.nodes.append(helper.make_node("Gemm", [x, w, bias], ["logits"], transB=1))
    graph = helper.make_graph(
        b.nodes, "mobilenetv2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
        initializer=b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="outpost-bench")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def symbolic_batch(model):
    """Makes the first axis of every graph input and output the symbol N, as exporters write a
    dynamic batch axis (the agent's drift summaries need one)."""
    for value in list(model.graph.input) + list(model.graph.output):
        first = value.type.tensor_type.shape.dim[0]
        first.Clear()
        first.dim_param = "N"
    onnx.checker.check_model(model)
    return model


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: cnn_models.py OUT_DIR")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for name, build in [("squeezenet", squeezenet), ("mobilenetv2", mobilenetv2)]:
        path = os.path.join(out_dir, f"{name}.onnx")
        onnx.save(symbolic_batch(build()), path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
