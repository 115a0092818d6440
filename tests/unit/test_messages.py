import pytest
from pydantic import ValidationError

from api.errors import from_validation
from broker.messages import JOB_REQUEST, ChatMessage
from broker.prompts import fold_system, render_chat


def error_of(data) -> tuple[int, str | None]:
    with pytest.raises(ValidationError) as info:
        JOB_REQUEST.validate_python(data)
    err = from_validation(info.value)
    return err.status, err.field


def test_a_generate_job_takes_the_contract_fields_and_a_single_stop_string():
    job = JOB_REQUEST.validate_python({
        "kind": "generate", "model": "chat", "prompt": "Once", "max_tokens": 8, "temperature": 0.7,
        "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1, "seed": 7, "stop": "\n\n", "priority": 5,
    })
    assert job.stop == ["\n\n"] and job.seed == 7


@pytest.mark.parametrize(("data", "field"), [
    ({"kind": "generate", "prompt": "  "}, None),
    ({"kind": "generate"}, None),
    ({"kind": "generate", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"kind": "generate", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"kind": "embed", "texts": []}, "texts"),
    ({"kind": "summarize", "text": ""}, "text"),
    ({"kind": "teleport"}, "kind"),
    ({"prompt": "x"}, "kind"),
    ({"kind": "generate", "prompt": "x", "bogus": 1}, "bogus"),
    ({"kind": "generate", "prompt": "x", "priority": 12}, "priority"),
])
def test_bad_jobs_are_rejected_with_422_naming_the_field(data, field):
    status, named = error_of(data)
    assert status == 422
    assert named == field


def test_a_system_message_folds_into_the_first_user_turn_for_gemma():
    msgs = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    assert fold_system(msgs) == [{"role": "user", "content": "Be brief.\n\nHi"}]
    prompt = render_chat(msgs, "gemma")
    assert prompt.text == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert prompt.special and prompt.stop == ("<end_of_turn>\n",)
