"""Property-based fuzz of prompts and prompt files (Hypothesis): any text or bytes, unicode,
control characters, very long, empty, binary. The checks either accept a prompt (and then the
tokenizer takes it and the file round-trips line by line) or refuse it with a ValueError that
names where it is; nothing else escapes. No model is loaded inside the loop: the checks are pure
functions and a tokenizer; one CLI run shows the same path end to end."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlip.cli_args import read_prompt_file
from qlip.pipeline.prompts import check_prompt_text, check_prompts

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
texts = st.one_of(st.text(max_size=80), st.text(alphabet=string.printable, max_size=200),
                  st.text(st.characters(codec="utf-8"), min_size=30, max_size=400))


class _Pipe:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


@FUZZ
@given(prompt=texts, allow_empty=st.booleans(), truncate=st.booleans())
def test_prompt_checks_accept_or_refuse_with_a_message(_tiny_pipeline_template, prompt,
                                                       allow_empty, truncate):
    pipe = _Pipe(_tiny_pipeline_template.tokenizer)
    limit = pipe.tokenizer.model_max_length
    try:
        over = check_prompts(pipe, [prompt], truncate, allow_empty)
    except ValueError as err:
        message = str(err)
        assert message.startswith("prompt 1"), message
        assert any(why in message for why in ("empty", "control character", "surrogate",
                                               "tokens, more than")), message
        return
    assert allow_empty or prompt.strip()
    assert not any(ord(c) < 32 and c not in "\t\n\r" for c in prompt)
    tokens = len(pipe.tokenizer(prompt, truncation=False).input_ids)
    assert over == (tokens > limit) and (truncate or tokens <= limit)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300),
                      st.lists(texts, max_size=6).map(lambda lines: "\n".join(lines).encode())))
def test_prompt_files_read_or_refuse_naming_the_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "prompts.txt"
    path.write_bytes(data)
    try:
        prompts = read_prompt_file(str(path))
    except ValueError as err:
        assert str(path) in str(err), str(err)
        return
    # what was accepted is exactly the file's non-blank lines, each a valid prompt
    lines = [line.strip() for line in data.decode("utf-8-sig").split("\n") if line.strip()]
    assert prompts == lines
    for prompt in prompts:
        check_prompt_text(prompt)


def test_the_cli_refuses_a_binary_prompt_file_by_name(capsys, tmp_path):
    from .conftest import run_cli

    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    code, err = run_cli(capsys, ["generate", "--prompt-file", str(path), "--model", "unused",
                                 "--out", str(tmp_path / "g")])
    assert code == 2 and str(path) in err and "Traceback" not in err, err


@pytest.mark.parametrize("prompt", ["a\x00b", "\x1b[31mred", "bad \udce9 byte"])
def test_control_characters_and_undecodable_bytes_are_refused(prompt):
    with pytest.raises(ValueError, match="U\\+"):
        check_prompt_text(prompt)
