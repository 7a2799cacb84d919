"""The numpy reference against the AdapterHub library's own logits (fixtures)."""
import os

import numpy as np
import pytest
from conftest import FIX

from adapterdrop_tools.adapterhub import load_adapter, load_head
from adapterdrop_tools.checkpoint import load_checkpoint
from adapterdrop_tools.reference import Reference

TOL = 1e-5


@pytest.fixture(scope="module")
def bert_ref():
    return Reference(load_checkpoint(os.path.join(FIX, "bert-tiny", "backbone")))


@pytest.mark.parametrize("task", ["sent", "topic", "score"])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_bert_tiny_texts_and_pairs(bert_ref, bert_fixture, task, n):
    d = os.path.join(FIX, "bert-tiny", "adapters", task)
    adapter, head = load_adapter(d, 2, 32), load_head(d, 32)
    r = bert_fixture
    got = bert_ref.logits(r["input_ids"], r["attention_mask"], None, adapter, head, range(n))
    assert np.abs(got - np.array(r["logits"][task][str(n)])).max() <= TOL
    got = bert_ref.logits(r["pair_input_ids"], r["pair_attention_mask"], r["pair_token_type_ids"],
                          adapter, head, range(n))
    assert np.abs(got - np.array(r["pair_logits"][task][str(n)])).max() <= TOL


@pytest.mark.parametrize("n", [0, 1, 2])
def test_roberta_tiny(roberta_fixture, n):
    ref = Reference(load_checkpoint(os.path.join(FIX, "roberta-tiny", "backbone")))
    d = os.path.join(FIX, "roberta-tiny", "adapters", "sent")
    r = roberta_fixture
    got = ref.logits(r["input_ids"], r["attention_mask"], None, load_adapter(d, 2, 32), load_head(d, 32), range(n))
    assert np.abs(got - np.array(r["logits"]["sent"][str(n)])).max() <= TOL


def test_dropping_changes_logits(bert_fixture):
    """The fixtures' logits differ between drop depths, so the comparisons above are meaningful."""
    r = bert_fixture["logits"]["topic"]
    assert np.abs(np.array(r["0"]) - np.array(r["2"])).max() > 1e-3
