"""Fixtures several test files share. Module scope: each file still gets its own copy (and its own tmp folder)."""
from __future__ import annotations

import pytest
import torch

from tests.server_helpers import HERMES, scripted
from tests.tiny_models import save_tiny


@pytest.fixture(scope="module")
def hermes_url():
    """A live server whose fake engine answers every request with HERMES (text, then two calls in the
    Hermes format), read by `--tool-call-parser hermes`."""
    with scripted(HERMES, tool_call_parser="hermes") as url:
        yield url


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama folder (GQA, byte-level tokenizer) our loader reads."""
    return save_tiny("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def hf_tiny_llama(tiny_llama):
    """transformers' model from the same folder: the oracle."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
