"""`layer_capturable.onnx` (graphs_layer.layer_graph(capturable=True), written by the exporter's
`--capturable-layers`): the layer graph without control flow, which ONNX Runtime can capture as a
CUDA graph (docs/benchmarks.md, "CUDA graphs"). It holds no `If` / `Loop` / `Scan`; nothing in it
would be placed on the CPU under the CUDA provider (no `Shape` / `Size`, int64 row maps only as
`Gather` indices or cast to float); and it gives the dispatched `layer.onnx`'s outputs within 1e-6
(the same ops on the same values: bit for bit in practice) at every slot rule and activation, with
LoRA and (IA)^3 rows, Stack rows, plain rows (bank row 0: AdapterDrop's dropped layers) and rows split."""
import collections
import itertools

import numpy as np
import pytest

from adapterdrop_tools.adapterhub import Adapter, SlotWeights
from adapterdrop_tools.checkpoint import load_checkpoint
from adapterdrop_tools.fixtures import random_bert
from adapterdrop_tools.graphs_layer import (ACTIVATIONS, LOCATIONS, attention_maps, bank, layer_graph, methods_maps,
                                            no_stack_rows, pack_maps, stack_bank)
from adapterdrop_tools.graphs_methods import methods_bank, target_dims
from test_layer_graph import session  # as the server builds CPU sessions

H, FFN, LAYERS, T = 32, 64, 2, 7
TOL = 1e-6
RULES = [(True, True, True), (False, True, True), (True, True, False), (True, True, "post_add"), (True, False, True),
         (False, False, False)]
# CUDA kernels these ops have for the element types the graph gives them (float data, int64 indices).
CUDA_OPS = {"Add", "Cast", "Erf", "Gather", "Greater", "LayerNormalization", "MatMul", "Mul", "ReduceSum", "Relu",
            "Reshape", "Sigmoid", "Slice", "Softmax", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where"}


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    out = random_bert(str(tmp_path_factory.mktemp("bert") / "ck"), seed=11, layers=LAYERS, hidden=H, heads=4,
                      ffn=FFN, vocab=50, max_pos=16, tokenizer=None)
    return load_checkpoint(out)


@pytest.fixture(scope="module")
def graphs(ck):
    return [(session(layer_graph(ck, i)), session(layer_graph(ck, i, capturable=True))) for i in range(LAYERS)]


def nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == a.GRAPH:
                yield from nodes(a.g)


def test_the_capturable_graph_has_no_control_flow_and_nothing_for_the_cpu(ck):
    m = layer_graph(ck, 0, capturable=True)
    ops = collections.Counter(n.op_type for n in nodes(m.graph))
    assert not {"If", "Loop", "Scan"} & set(ops), ops
    assert not any(a.type in (a.GRAPH, a.GRAPHS) for n in m.graph.node for a in n.attribute), "no subgraphs"
    assert set(ops) <= CUDA_OPS, set(ops) - CUDA_OPS
    # ONNX Runtime's CUDA provider puts a node on the CPU when it reads a CPU tensor (a `Shape`'s
    # output, GetCpuPreferredNodes); none exists here. The int64 inputs (row maps, mask) are only read
    # as `Gather` indices or cast to float once: no int64 arithmetic to place anywhere.
    ints = {i.name for i in m.graph.input if i.type.tensor_type.elem_type == 7}
    consts = {t.name for t in m.graph.initializer}
    for n in m.graph.node:
        for k, name in enumerate(n.input):
            if name in ints:
                assert (n.op_type, k) in (("Gather", 1), ("Cast", 0)), (n.op_type, k, name)
    produced = {o for n in m.graph.node for o in n.output}
    used = {i for n in m.graph.node for i in n.input} | {"y"}
    assert produced <= used, f"dangling outputs: {produced - used}"
    assert consts  # the weights stay initializers
    dispatched = collections.Counter(n.op_type for n in nodes(layer_graph(ck, 0).graph))
    assert dispatched["If"] > 0, "the dispatched graph is the one with `If`s"


def adapter(rf, act, lnb, lna, res, scaling, seed, parallel=False) -> Adapter:
    rng = np.random.default_rng(seed)
    d = max(1, H // rf)
    slots = {(i, loc): SlotWeights(*(rng.standard_normal(s).astype(np.float32) * 0.4 for s in ((d, H), (d,), (H, d), (H,))))
             for i in range(LAYERS) for loc in LOCATIONS}
    a = Adapter(name=f"a{seed}", method="bottleneck", hidden_size=H, non_linearity=act, non_linearity_name=act,
                reduction_factor=rf, original_ln_before=lnb, original_ln_after=lna, residual_before_ln=res,
                scaling=scaling, leave_out=[], locations=LOCATIONS, slots=slots)
    a.is_parallel = parallel
    return a


def method_entry(seed, kind):
    rng = np.random.default_rng(seed)
    out = {}
    for t, (i, o) in target_dims(H, FFN).items():
        if kind == "lora":
            out[t] = {"lora_a": rng.standard_normal((i, 4)).astype(np.float32) * 0.3,
                      "lora_b": rng.standard_normal((4, o)).astype(np.float32) * 0.3}
        else:
            out[t] = {"scale": (1 + rng.standard_normal(o) * 0.2).astype(np.float32)}
    return out


def feeds_for(layer, rows, banks, methods, stacks, methods_index, seed=3):
    """The layer's inputs for 3 packed rows of lengths 7, 4, 6: attention-slot rows `rows[0]` with
    bank rows `rows[1]`, FFN-slot rows `rows[2]` with `rows[3]`."""
    rng = np.random.default_rng(seed + layer)
    lens0 = [7, 4, 6]
    mask = np.zeros((3, T), np.int64)
    for j, n in enumerate(lens0):
        mask[j, :n] = 1
    feeds = {"hidden": (rng.standard_normal((sum(lens0), H)) * 2).astype(np.float32), **attention_maps(lens0, mask)}
    lens1 = [lens0[r] for r in rows[0]]
    for loc, lens, src, idx in (("attention", lens0, rows[0], rows[1]), ("ffn", lens1, rows[2], rows[3])):
        feeds.update({f"{loc}_{k}": v for k, v in pack_maps(lens, src, idx).items()})
    feeds.update(methods_maps(lens0, methods_index, rows[0]))
    feeds.update(methods_bank(methods, H, FFN))
    for loc in LOCATIONS:
        feeds.update({f"{loc}.{k}": v for k, v in banks[loc].items()})
    if stacks is None:
        feeds.update(no_stack_rows(feeds, H))
    else:
        for loc in LOCATIONS:
            feeds.update({f"{loc}.stack.{k}": v for k, v in stacks[loc].items()})
    return feeds


def same(graphs, layer, feeds, what):
    dispatched, capturable = (s.run(["y"], feeds)[0] for s in graphs[layer])
    d = float(np.abs(dispatched - capturable).max())

    assert d <= TOL, f"{what}: capturable vs dispatched differ by {d:e}"


SPLITS = {  # (attention rows, attention bank rows, FFN rows, FFN bank rows)
    "alone": ([0, 1, 2], [1, 1, 1], [0, 1, 2], [1, 1, 1]),
    "beside plain rows": ([0, 1, 2], [1, 0, 1], [0, 1, 2], [0, 1, 0]),
    "mixed and split": ([0, 0, 1, 2], [1, 2, 0, 2], [0, 1, 1, 2, 3], [2, 1, 0, 0, 1]),
}


@pytest.mark.parametrize("rule,act", list(itertools.product(RULES, ACTIVATIONS)))
def test_capturable_equals_dispatched_at_every_rule(rule, act, graphs):
    lnb, lna, res = rule
    a = adapter(8, act, lnb, lna, res, 1.0 if act != "tanh" else 1.7, seed=71)
    other = adapter(4, "sigmoid" if act != "sigmoid" else "tanh", not lnb, not lna, False if res is True else True, 0.5,
                    seed=72, parallel=True)
    for layer in range(LAYERS):
        banks = {loc: bank([(a, a.slots[(layer, loc)]), (other, other.slots[(layer, loc)])], H) for loc in LOCATIONS}
        for what, rows in SPLITS.items():
            same(graphs, layer, feeds_for(layer, rows, banks, [], None, [0, 0, 0]), f"layer {layer}, {what}")


@pytest.mark.parametrize("methods_index", [[0, 0, 0], [1, 0, 2], [2, 2, 2], [1, 1, 1]])
@pytest.mark.parametrize("stacked", [False, True])
def test_capturable_equals_dispatched_with_methods_and_stacks(methods_index, stacked, graphs):
    a = adapter(8, "relu", True, True, True, 1.0, seed=81)
    lower = adapter(4, "relu", True, True, True, 1.0, seed=82)
    for layer in range(LAYERS):
        banks = {loc: bank([(a, a.slots[(layer, loc)]), (a, a.slots[(layer, loc)])], H) for loc in LOCATIONS}
        stacks = {loc: stack_bank([(lower, lower.slots[(layer, loc)]), None], H) for loc in LOCATIONS} if stacked else None
        methods = [method_entry(90 + layer, "lora"), method_entry(95 + layer, "ia3")]
        for what, rows in SPLITS.items():
            same(graphs, layer, feeds_for(layer, rows, banks, methods, stacks, methods_index),
                 f"layer {layer}, {what}, methods {methods_index}, stack {stacked}")

