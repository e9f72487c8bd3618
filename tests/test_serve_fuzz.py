"""Property-based fuzzing driven by the published /openapi.json (schemathesis): a bounded number
of generated requests per operation, none answered with a 5xx."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from test_serve_api import KEY, TEXTS, tiny_checkpoint  # noqa: E402

from nanoseek.inference import Engine  # noqa: E402
from nanoseek.inference.scheduler import Scheduler  # noqa: E402
from nanoseek.serve.api import create_app  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), max_len=48)  # short context: fast generations
    Tokenizer.train(TEXTS, vocab_size=300).save_pretrained(path)
    sched = Scheduler(Engine.from_pretrained(str(path)), max_batch=4, queue_size=32).start()
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(sched, "tiny", api_key=KEY),
                                         headers={"Authorization": f"Bearer {KEY}"})
    sched.stop()


def test_no_request_makes_a_5xx(api_schema):
    operations = [op.ok() for op in api_schema.get_all_operations()]
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize"} <= {op.path for op in operations}
    seen = []
    for op in operations:
        @hypothesis.given(case=op.as_strategy())
        @hypothesis.settings(max_examples=12, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def one(case):
            response = case.call(headers={"Authorization": f"Bearer {KEY}"})
            seen.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        one()
    assert len(seen) >= len(operations) and any(s == 200 for s in seen)
