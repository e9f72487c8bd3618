"""lm-evaluation-harness against a real server: a log-likelihood task and a generation task from
local data files (no network), log-likelihoods equal to the model's own log-softmax."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from test_serve_api import TEXTS, tiny_checkpoint  # noqa: E402

from nanoseek.inference import Engine  # noqa: E402
from nanoseek.inference.scheduler import Scheduler  # noqa: E402
from nanoseek.serve.api import create_app, serve_in_thread  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

DOCS = [{"context": "12+30=", "continuation": "42"}, {"context": "the answer", "continuation": " is 42"},
        {"context": "7*6", "continuation": "=42"}]


def write_tasks(folder, data):
    (folder / "ll.yaml").write_text(f"""task: nanoseek_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    (folder / "gen.yaml").write_text(f"""task: nanoseek_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""")


def test_lm_eval_local_completions_log_likelihoods_equal_the_models(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tiny_checkpoint(tmp_path / "ckpt")
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    tok.save_pretrained(path)
    engine = Engine.from_pretrained(str(path))
    sched = Scheduler(engine, max_batch=4).start()
    uv, thread, port = serve_in_thread(create_app(sched, "tiny"))
    try:
        data = tmp_path / "docs.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
        write_tasks(tmp_path, data)
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        out = simple_evaluate(
            model="local-completions",
            model_args=f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={path},tokenized_requests=True,num_concurrent=1,max_retries=1",
            tasks=["nanoseek_ll", "nanoseek_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True, limit=None)
        samples = out["samples"]["nanoseek_ll"]
        assert len(samples) == len(DOCS)
        for s in samples:
            doc = s["doc"]
            # lm-eval's pair encoding: the whole text, split after the context's tokens (no BOS)
            ctx = tok.encode(doc["context"])
            cont = tok.encode(doc["context"] + doc["continuation"])[len(ctx):]
            with torch.no_grad():
                lp = engine.model(torch.tensor([ctx + cont]))[0].float().log_softmax(-1)
            want = sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
            got = s["resps"][0][0][0]
            assert abs(got - want) < 1e-4, (doc, got, want)
        assert "exact_match,none" in out["results"]["nanoseek_gen"]
        assert len(out["samples"]["nanoseek_gen"]) == len(DOCS)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sched.stop()
