"""layer.onnx (one graph per layer on packed tokens, adapter banks as inputs) against the segmented
graphs it replaces: bank row 0 is the plain layer bit for bit; adapter rows equal the per-task slot
graphs within 1e-6 for every slot rule and activation, with rows of different lengths packed, rows
split and bottlenecks padded to the bank width. Positions past a row's length are not compared
(the packed graph does not compute them)."""
import collections
import itertools
import os

import numpy as np
import onnxruntime as ort
import pytest

from adapterdrop_tools.adapterhub import Adapter, SlotWeights
from adapterdrop_tools.checkpoint import load_checkpoint
from adapterdrop_tools.fixtures import random_bert
from adapterdrop_tools.graphs_backbone import attention_graph, ffn_graph, plain_slot_graph
from adapterdrop_tools.graphs_layer import (ACTIVATIONS, MAP_INPUTS, attention_maps, bank, layer_graph, methods_maps,
                                            no_stack_rows, pack_maps, stack_bank)
from adapterdrop_tools.graphs_methods import methods_bank
from adapterdrop_tools.graphs_task import adapter_slot_graph

H, LAYERS, T = 32, 2, 7
ADAPTER_TOL = 1e-6


def session(model):
    """As the server builds CPU sessions: all optimizations but the SkipLayerNorm fusion."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["SkipLayerNormFusion"])


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    out = random_bert(str(tmp_path_factory.mktemp("bert") / "ck"), seed=7, layers=LAYERS, hidden=H, heads=4,
                      ffn=64, vocab=50, max_pos=16, tokenizer=None)
    return load_checkpoint(out)


@pytest.fixture(scope="module")
def graphs(ck):
    layers = []
    for i in range(LAYERS):
        layers.append({"layer": session(layer_graph(ck, i)), "general": session(layer_graph(ck, i, dispatch=False)),
                       "attention": session(attention_graph(ck, i)),
                       "ffn": session(ffn_graph(ck, i)),
                       "attention_slot": session(plain_slot_graph(*ck.ln(i, "attention"), ck.eps, "a")),
                       "ffn_slot": session(plain_slot_graph(*ck.ln(i, "ffn"), ck.eps, "f"))})
    return layers


def inputs(rows, seed=3):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, T, H)) * 2).astype(np.float32)
    mask = np.ones((rows, T), np.int64)
    mask[0, T - 2:] = 0  # a padded row
    return x, mask


def adapter(rf, act, lnb, lna, res, scaling, seed, locations=("attention", "ffn")) -> Adapter:
    rng = np.random.default_rng(seed)
    d = max(1, H // rf)
    slots = {}
    for i in range(LAYERS):
        for loc in locations:
            slots[(i, loc)] = SlotWeights(*(rng.standard_normal(s).astype(np.float32) * 0.4
                                            for s in ((d, H), (d,), (H, d), (H,))))
    return Adapter(name=f"a{seed}", method="bottleneck", hidden_size=H, non_linearity=act, non_linearity_name=act,
                   reduction_factor=rf, original_ln_before=lnb, original_ln_after=lna, residual_before_ln=res,
                   scaling=scaling, leave_out=[], locations=locations, slots=slots)


def lengths(mask):
    """Each row's length: up to its last 1 (trailing zeros are padding)."""
    return [int(np.nonzero(m)[0].max()) + 1 for m in mask]


def run_layer(g, i, x, mask, a_rows, a_idx, f_rows, f_idx, banks, graph="layer", stacks=None, methods=None):
    """Packs the padded rows `x` to their lengths, runs the layer graph (`graph`: "general" for the
    general rule's form alone), unpacks `y` to [R2, T, H] with NaN past each row's length. `stacks`:
    `<loc>.stack.*` inputs (default none); `methods`: (methods row of each entering row, methods bank)."""
    lens0 = lengths(mask)
    feeds = {"hidden": np.concatenate([x[j, :n] for j, n in enumerate(lens0)]), **attention_maps(lens0, mask)}
    lens1 = [lens0[r] for r in a_rows]
    for loc, lens, rows, idx in (("attention", lens0, a_rows, a_idx), ("ffn", lens1, f_rows, f_idx)):
        feeds.update({f"{loc}_{k}": v for k, v in pack_maps(lens, rows, idx).items()})
    m_index, m_bank = methods or ([0] * len(lens0), methods_bank([], H, 64))  # default: no LoRA / (IA)^3 rows
    feeds.update(methods_maps(lens0, m_index, a_rows))
    feeds.update(m_bank)
    for loc in ("attention", "ffn"):
        feeds.update({f"{loc}.{k}": v for k, v in banks[loc].items()})
    feeds.update(stacks or no_stack_rows(feeds, H))
    y = g[i][graph].run(["y"], feeds)[0]
    lens2 = [lens1[r] for r in f_rows]
    out = np.full((len(f_rows), x.shape[1], H), np.nan, np.float32)
    start = 0
    for j, n in enumerate(lens2):
        out[j, :n] = y[start:start + n]
        start += n
    assert start == len(y)
    return out


def real(a, mask, rows=None):
    """The positions of `a` [R, T, H] inside each row's length (rows of `mask` picked by `rows`)."""
    lens = lengths(mask)
    rows = range(len(a)) if rows is None else rows
    return np.concatenate([a[j, :lens[r]] for j, r in zip(range(len(a)), rows)])


def segmented(g, i, x, mask, slots=None):
    """Today's per-task path: attention, slot, ffn, slot (a task slot session where given)."""
    slots = slots or {}
    h1 = g[i]["attention"].run(["h"], {"hidden": x, "attention_mask": mask})[0]
    x1 = slots.get("attention", g[i]["attention_slot"]).run(["y"], {"h": h1, "x": x})[0]
    h2 = g[i]["ffn"].run(["h"], {"hidden": x1})[0]
    return slots.get("ffn", g[i]["ffn_slot"]).run(["y"], {"h": h2, "x": x1})[0]


def task_slots(ck, a: Adapter, i: int) -> dict:
    return {loc: session(adapter_slot_graph(a, a.slots[(i, loc)], *ck.ln(i, loc), ck.eps, f"{a.name}_{loc}"))
            for loc in a.locations}


def test_row_zero_is_the_plain_layer_bit_for_bit(graphs):
    x, mask = inputs(3)
    empty = {loc: bank([], H) for loc in ("attention", "ffn")}
    for i in range(LAYERS):
        want = segmented(graphs, i, x, mask)
        got = run_layer(graphs, i, x, mask, [0, 1, 2], [0, 0, 0], [0, 1, 2], [0, 0, 0], empty)
        assert np.array_equal(real(got, mask), real(want, mask)), i


def test_row_zero_stays_plain_beside_adapters(ck, graphs):
    """Plain rows next to adapter rows in a bank padded to a wider bottleneck: still the plain layer exactly."""
    a = adapter(4, "sigmoid", True, True, True, 2.0, seed=11)
    x, mask = inputs(2)
    for i in range(LAYERS):
        banks = {loc: bank([(a, a.slots[(i, loc)])], H) for loc in ("attention", "ffn")}
        got = run_layer(graphs, i, x, mask, [0, 1, 1], [0, 0, 1], [0, 1, 2], [0, 0, 1], banks)
        assert np.array_equal(real(got[:2], mask), real(segmented(graphs, i, x, mask), mask)), i


RULES = [  # (original_ln_before, original_ln_after, residual_before_ln)
    (True, True, True),  # Pfeiffer
    (False, True, True),  # Houlsby
    (True, True, False), (True, True, "post_add"), (True, False, True), (False, False, False),
]


@pytest.mark.parametrize("rule,act", list(itertools.product(RULES, ACTIVATIONS)))
def test_adapter_rows_equal_the_task_slot_graphs(ck, graphs, rule, act):
    """Three tasks of different widths in one bank (the widest pads the others); every row split."""
    lnb, lna, res = rule
    others = [adapter(2, "relu", True, True, True, 1.0, seed=21), adapter(16, "gelu", False, True, True, 0.5, seed=22)]
    a = adapter(8, act, lnb, lna, res, 1.0 if act != "tanh" else 1.7, seed=23)
    x, mask = inputs(2)
    for i in range(LAYERS):
        banks = {loc: bank([(o, o.slots[(i, loc)]) for o in others] + [(a, a.slots[(i, loc)])], H)
                 for loc in ("attention", "ffn")}
        # rows: input 0 plain, input 0 with `a`, input 1 with `a`, input 1 with others[0]
        got = run_layer(graphs, i, x, mask, [0, 0, 1, 1], [0, 3, 3, 1], [0, 1, 2, 3], [0, 3, 3, 1], banks)
        want_a = segmented(graphs, i, x, mask, task_slots(ck, a, i))
        want_o = segmented(graphs, i, x, mask, task_slots(ck, others[0], i))
        assert np.array_equal(real(got[:1], mask), real(segmented(graphs, i, x, mask)[:1], mask))
        assert np.abs(real(got[1:3], mask) - real(want_a, mask)).max() <= ADAPTER_TOL, (i, rule, act)
        assert np.abs(real(got[3:], mask, [1]) - real(want_o[1:], mask, [1])).max() <= ADAPTER_TOL, (i, rule, act)


def test_attention_only_at_one_slot_and_split_below(ck, graphs):
    """A Pfeiffer task (FFN slot only) and a task whose attention slot splits rows before the FFN."""
    p = adapter(4, "relu", True, True, True, 1.0, seed=31, locations=("ffn",))
    x, mask = inputs(2)
    for i in range(LAYERS):
        banks = {"attention": bank([], H), "ffn": bank([(p, p.slots[(i, "ffn")])], H)}
        got = run_layer(graphs, i, x, mask, [0, 1], [0, 0], [0, 1, 1], [1, 0, 1], banks)
        want = segmented(graphs, i, x, mask, task_slots(ck, p, i))
        assert np.abs(real(got[:1], mask) - real(want[:1], mask)).max() <= ADAPTER_TOL
        assert np.array_equal(real(got[1:2], mask, [1]), real(segmented(graphs, i, x, mask)[1:], mask, [1]))
        assert np.abs(real(got[2:], mask, [1]) - real(want[1:], mask, [1])).max() <= ADAPTER_TOL


def test_mixed_lengths_in_one_batch_equal_each_row_alone(ck, graphs):
    """Rows of 1, 3 and T tokens and two tasks packed together: each row as when it runs alone."""
    a = adapter(4, "relu", True, True, True, 1.0, seed=41)
    x, _ = inputs(3)
    mask = np.zeros((3, T), np.int64)
    for j, n in enumerate((1, 3, T)):
        mask[j, :n] = 1
    mask[2, 1] = 0  # a client mask with a hole: the token is computed, not attended to
    for i in range(LAYERS):
        banks = {loc: bank([(a, a.slots[(i, loc)])], H) for loc in ("attention", "ffn")}
        got = run_layer(graphs, i, x, mask, [0, 1, 1, 2], [1, 0, 1, 0], [0, 1, 2, 3], [1, 0, 1, 0], banks)
        for k, (j, idx) in enumerate(((0, 1), (1, 0), (1, 1), (2, 0))):
            n = lengths(mask[j:j + 1])[0]
            alone = run_layer(graphs, i, x[j:j + 1, :n], mask[j:j + 1, :n], [0], [idx], [0], [idx], banks)
            assert np.abs(got[k, :n] - alone[0]).max() <= 1e-6, (i, k)
    # the hole's mask reaches attention as given; the padded path agrees on the real positions
    want = segmented(graphs, 0, x, mask)
    got = run_layer(graphs, 0, x, mask, [0, 1, 2], [0, 0, 0], [0, 1, 2], [0, 0, 0],
                    {loc: bank([], H) for loc in ("attention", "ffn")})
    assert np.abs(real(got, mask) - real(want, mask)).max() <= 1e-6


def test_every_backbone_writer_writes_layer_graphs(test_repo):
    for b in os.listdir(os.path.join(test_repo, "backbones")):
        d = os.path.join(test_repo, "backbones", b)
        if not os.path.isfile(os.path.join(d, "backbone.json")):
            continue
        n = len(os.listdir(os.path.join(d, "layers")))
        for i in range(n):
            path = os.path.join(d, "layers", str(i), "layer.onnx")
            names = [v.name for v in ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()]
            assert names[:len(MAP_INPUTS)] == list(MAP_INPUTS), path


def same_bits_as_general(graphs, x, mask, maps, banks, what):
    """The dispatched layer graph (graphs_rule.py) against the general rule's form: the same bits."""
    src = [maps[0][r] for r in maps[2]]  # the input row each output row continues
    for i in range(LAYERS):
        got, want = (run_layer(graphs, i, x, mask, *maps, banks[i], graph=k) for k in ("layer", "general"))
        assert np.array_equal(real(got, mask, src), real(want, mask, src)), (i, what)


# Every rule, alone (each decision uniform), beside plain rows (scale 0: any input and activation
# agree) and beside a rule that differs in every decision (the general fallback).
@pytest.mark.parametrize("rule,act,parallel", [(r, a, False) for r in RULES for a in ACTIVATIONS]
                         + [((True, True, True), "relu", True), ((False, True, True), "silu", True)])
def test_dispatched_rule_equals_the_general_rule_bit_for_bit(rule, act, parallel, graphs):
    lnb, lna, res = rule
    a = adapter(8, act, lnb, lna, res, 1.0 if act != "tanh" else 1.7, seed=51)
    a.is_parallel = parallel
    other = adapter(4, "sigmoid" if act != "sigmoid" else "tanh", not lnb, not lna, False if res is True else True,
                    0.5, seed=52)
    other.is_parallel = not parallel
    x, mask = inputs(2)
    alone = [{loc: bank([(a, a.slots[(i, loc)])], H) for loc in ("attention", "ffn")} for i in range(LAYERS)]
    both = [{loc: bank([(a, a.slots[(i, loc)]), (other, other.slots[(i, loc)])], H) for loc in ("attention", "ffn")}
            for i in range(LAYERS)]
    same_bits_as_general(graphs, x, mask, ([0, 1], [1, 1], [0, 1], [1, 1]), alone, "alone")
    same_bits_as_general(graphs, x, mask, ([0, 1, 1], [1, 0, 1], [0, 1, 2], [0, 1, 1]), alone, "beside plain rows")
    same_bits_as_general(graphs, x, mask, ([0, 1, 1], [1, 2, 0], [0, 1, 2], [2, 1, 0]), both, "mixed rules")


def test_dispatch_takes_the_cheap_branches(ck):
    """A Pfeiffer batch runs one LayerNorm before, one activation and no `Where` at its FFN slot:
    the ops ONNX Runtime runs (its profile) for a batch of one Pfeiffer task are fewer than for a batch
    mixing rules, which runs the general form."""
    a = adapter(8, "relu", True, True, True, 1.0, seed=61, locations=("ffn",))
    b = adapter(8, "gelu", False, True, False, 1.0, seed=62, locations=("ffn",))
    x, mask = inputs(2)

    def ops(rows, f_idx, entries):
        banks = {"attention": bank([], H), "ffn": bank(entries, H)}
        return executed_ops(ck, lambda s: run_layer([{"layer": s}], 0, x, mask, rows, [0] * len(rows), rows, f_idx, banks))

    one = ops([0, 1], [1, 1], [(a, a.slots[(0, "ffn")])])
    mixed = ops([0, 1], [1, 2], [(a, a.slots[(0, "ffn")]), (b, b.slots[(0, "ffn")])])
    # one: no per-group selection; LN(h + x) at the plain attention slot, LN before and after at the
    # FFN slot; relu alone (the FFN's own gelu is the one Erf); mixed: the general form
    assert one["Where"] == 0 and one["LayerNormalization"] == 3, sorted(one.items())
    assert one["Sigmoid"] == one["Tanh"] == 0 and one["Erf"] == mixed["Erf"] - 1, sorted(one.items())
    assert mixed["Where"] >= 8 and mixed["Sigmoid"] == 1, sorted(mixed.items())


def executed_ops(ck, feeds_of):
    """Operator counts ONNX Runtime's profile records for one run of layer 0 (`feeds_of(session)` runs it)."""
    import json
    import tempfile

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "p")
    s = ort.InferenceSession(layer_graph(ck, 0).SerializeToString(), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["SkipLayerNormFusion"])
    feeds_of(s)
    events = json.load(open(s.end_profiling()))
    return collections.Counter(e["args"]["op_name"] for e in events
                               if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))


def unpadded(rows):
    x, _ = inputs(rows)
    return x, np.ones((rows, T), np.int64)


def one_group_cases(ck):
    """(name, banks per layer, attention index, ffn index, stacks, methods, how many slots take the
    grouped form) for unpadded rows, each row on the same bank rows (graphs_fast.py)."""
    pf = adapter(8, "relu", True, True, True, 1.0, seed=71)  # Pfeiffer at both slots
    half = adapter(4, "relu", True, True, True, 0.5, seed=72, locations=("ffn",))  # Pfeiffer, scaling 0.5
    hb = adapter(8, "silu", False, True, True, 1.0, seed=73)  # Houlsby: the general graph
    lower = adapter(8, "relu", True, True, True, 1.0, seed=74)
    banks = lambda a: [{loc: bank([(a, a.slots[(i, loc)])] if loc in a.locations else [], H)  # noqa: E731
                        for loc in ("attention", "ffn")} for i in range(LAYERS)]
    empty = [{loc: bank([], H) for loc in ("attention", "ffn")}] * LAYERS

    def stacked(i):  # bank row 1's lower adapter (a Stack): the general graph runs it
        return {f"{loc}.stack.{k}": v for loc in ("attention", "ffn")
                for k, v in stack_bank([(lower, lower.slots[(i, loc)])], H).items()}
    lora = methods_bank([{"query": {"lora_a": np.full((H, 2), 0.1, np.float32), "lora_b": np.full((2, H), 0.1, np.float32)}}],
                        H, 64)
    return [("plain", empty, 0, 0, None, None, 0), ("pfeiffer, FFN only", banks(half), 0, 1, None, None, 0),
            ("pfeiffer, both slots", banks(pf), 1, 1, None, None, 0), ("houlsby", banks(hb), 1, 1, None, None, 2),
            ("stack", banks(pf), 1, 1, stacked, None, 2), ("lora", banks(pf), 1, 1, None, lora, 0)]


def test_one_group_path_equals_the_general_graph_bit_for_bit(ck, graphs):
    """Unpadded rows on one bank row per slot (one task, plain rows, a dropped layer, beside LoRA rows):
    the one-group slot (graphs_fast.py) where it applies, the grouped slot where not (other rules, a
    Stack's lower adapter): the same bits as the general rule's form either way."""
    x, mask = unpadded(3)
    for name, banks, a, f, stacks, methods, _ in one_group_cases(ck):
        for i in range(LAYERS):
            st = stacks(i) if stacks else None
            m = ([1, 1, 1], methods) if methods else None
            got, want = (run_layer(graphs, i, x, mask, [0, 1, 2], [a] * 3, [0, 1, 2], [f] * 3, banks[i], graph=k,
                                   stacks=st, methods=m) for k in ("layer", "general"))
            assert np.array_equal(got, want), (name, i)


def test_one_group_path_is_taken_exactly_when_the_batch_qualifies(ck):
    """The grouped slot's stack check (one `ReduceSum` per slot) runs only at the slots that do not
    qualify: rows split there or two bank rows, a rule other than plain or Pfeiffer, a Stack's lower
    adapter (padding and LoRA rows do not matter to a slot)."""
    x, mask = unpadded(2)
    padded = mask.copy()
    padded[0, T - 2:] = 0

    def grouped(mask, a_rows, a_idx, f_rows, f_idx, banks, stacks=None, methods=None):
        return executed_ops(ck, lambda s: run_layer([{"layer": s}], 0, x, mask, a_rows, a_idx, f_rows, f_idx, banks,
                                                    stacks=stacks(0) if stacks else None,
                                                    methods=([1, 1], methods) if methods else None))["ReduceSum"]
    for name, banks, a, f, stacks, methods, slots in one_group_cases(ck):
        assert grouped(mask, [0, 1], [a] * 2, [0, 1], [f] * 2, banks[0], stacks, methods) == slots, name
    _, banks, *_ = one_group_cases(ck)[2]
    assert grouped(padded, [0, 1], [1, 1], [0, 1], [1, 1], banks[0]) == 0, "padded"
    assert grouped(mask, [0, 1], [0, 0], [0, 1], [1, 0], banks[0]) == 1, "two bank rows at the FFN slot"
    assert grouped(mask, [0, 1, 1], [1, 0, 1], [0, 1, 2], [1, 0, 1], banks[0]) == 2, "split at attention"
    assert grouped(mask, [0, 1], [1, 0], [0, 1], [1, 0], banks[0]) == 2, "two bank rows at both slots"
