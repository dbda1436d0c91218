"""The JSON-object prefix recogniser behind response_format json_object: agrees with json.loads on
complete texts, accepts every prefix of a valid object, refuses what no completion can fix."""

from __future__ import annotations

import json

import pytest

from llava.infer.json_prefix import DONE, START, closing_cost, feed_text

VALID = ['{}', ' {"a": 12}', '{"a": [1, -2.5e3, true, null, {"b": "x\\n\\u00e9"}], "c": false}', '{"k":-0.5}']
INVALID = ['[1]', '{"a" 1}', '{"a":01}', '{"a":1.}', '{a}', '{"a":1}x', '{"a":tru3}', '{"a":1,}', '{"a":[1,]}',
           '{"a":1,2}', '{"a":"\\x"}', '{"a":"\x01"}']


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_and_all_their_prefixes(text):
    json.loads(text)
    for end in range(1, len(text)):
        state = feed_text(START, text[:end])
        assert state is not None and state[1] != DONE, text[:end]
    assert feed_text(START, text)[1] == DONE


@pytest.mark.parametrize("text", INVALID)
def test_texts_no_completion_can_fix_are_refused(text):
    assert feed_text(START, text) is None


@pytest.mark.parametrize("prefix", ['{', '{"ke', '{"k":', '{"k": [1, {"x": "ab', '{"k": tr', '{"k": -'])
def test_closing_cost_is_enough_characters_to_close(prefix):
    state = feed_text(START, prefix)
    cost = closing_cost(state)
    # a shortest completion of that many characters exists for each of these prefixes
    completions = {'{': '}', '{"ke': '":0}', '{"k":': '0}', '{"k": [1, {"x": "ab': '"}]}', '{"k": tr': 'ue}',
                   '{"k": -': '0}'}
    closed = feed_text(state, completions[prefix])
    assert closed is not None and closed[1] == DONE and len(completions[prefix]) == cost
