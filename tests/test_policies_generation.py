"""How many tokens an answer may have (`token_budget`), without Ray."""

import pytest

from policies.errors import ContextOverflow
from policies.generation import UNKNOWN_CONTEXT_BUDGET, token_budget


def test_an_answer_without_max_tokens_may_fill_the_rest_of_the_context():
    assert token_budget("m", None, 100, 8192, None) == 8092
    assert token_budget("m", None, 100, 8192, 512) == 512  # the operator's cap
    assert token_budget("m", None, 8000, 8192, 512) == 192
    assert token_budget("m", None, 100, None, None) == UNKNOWN_CONTEXT_BUDGET


def test_asking_for_more_than_fits_names_both_numbers():
    assert token_budget("m", 92, 100, 192, None) == 92
    with pytest.raises(ContextOverflow) as both:
        token_budget("m", 93, 100, 192, None)
    assert (both.value.prompt_tokens, both.value.requested, both.value.context_length) == (100, 93, 192)
    with pytest.raises(ContextOverflow) as prompt:
        token_budget("m", 5, 192, 192, None)
    assert prompt.value.requested is None and prompt.value.param == "messages"
