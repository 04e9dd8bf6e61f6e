"""lm-evaluation-harness three ways on one run: glmlab's in-process adapter (glmlab eval --tasks), the harness's
own ``hf`` model on the run's export-hf directory, and its ``local-completions`` client against glmlab serve. They
must agree per item within 1e-4 nats and in their generations — on a model whose likely next token after an
answer is <eos>, with contexts and passages longer than its window."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from glmlab.cli import main
from glmlab.interop.hf_gpt2 import export_hf
from glmlab.runs import load_run
from glmlab.serve.app import ServeOptions, create_app
from tests.serve.conftest import LiveServer

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # the hf path
pytest.importorskip("tenacity")  # the local-completions path

pytestmark = pytest.mark.slow
TASKS = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
NAMES = ["glmlab_cloze", "glmlab_passages", "glmlab_starts"]


def _evaluate(model, **kwargs) -> dict:
    from glmlab.evaluation.harness import task_manager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return lm_eval.simple_evaluate(model=model, tasks=NAMES, task_manager=task_manager(str(TASKS), NAMES),
                                   log_samples=True, bootstrap_iters=0, **kwargs)


def _items(results: dict) -> dict[tuple, object]:
    """(task, doc, choice) -> log-likelihood (multiple choice, rolling) or text (generation)."""
    out = {}
    for task, samples in results["samples"].items():
        for s in samples:
            for j, resp in enumerate(s["filtered_resps"]):
                out[task, s["doc_id"], j] = resp
    return out


@pytest.fixture(scope="module")
def three_ways(short_docs_run, tmp_path_factory) -> dict[str, dict]:
    from glmlab.evaluation.harness import GlmlabLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hf_dir = export_hf(short_docs_run, tmp_path_factory.mktemp("harness") / "hf")
    run = load_run(short_docs_run)
    out = {"adapter": _evaluate(GlmlabLM(run)),
           "hf": _evaluate("hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu", batch_size=8)}
    window = run.model.block_size
    with LiveServer(create_app(run, ServeOptions(model_name="tiny", engine="thread"))) as server:
        # local-completions sends max_length - 1 tokens, one of them generated: max_length = window + 2 scores
        # in the same windows as the hf model; its tokenizer is the server's (/tokenizer_info, found by itself)
        out["server"] = _evaluate("local-completions", model_args=f"base_url={server.url}/v1/completions,"
                                                                  f"model=tiny,max_length={window + 2}")
    torch.set_num_threads(threads)
    return out


def test_the_three_paths_agree_per_item(three_ways):
    adapter, hf, server = (_items(three_ways[k]) for k in ("adapter", "hf", "server"))
    assert adapter.keys() == hf.keys() == server.keys() and len(adapter) == 40 * 4 + 12 + 16
    for key, mine in adapter.items():
        if key[0] == "glmlab_starts":
            assert mine == hf[key] == server[key], key  # the same greedy text
            continue
        for other in (hf[key], server[key]):
            value, greedy = (mine, None) if key[0] == "glmlab_passages" else mine
            theirs = other if key[0] == "glmlab_passages" else other[0]
            assert abs(float(value) - float(theirs)) < 1e-4, (key, value, theirs)
            if greedy is not None:
                assert greedy == other[1], key
    for task in NAMES:  # and so do the task scores
        for metric, value in three_ways["adapter"]["results"][task].items():
            if isinstance(value, float):
                assert value == pytest.approx(three_ways["hf"]["results"][task][metric], rel=1e-6, abs=1e-4)
                assert value == pytest.approx(three_ways["server"]["results"][task][metric], rel=1e-6, abs=1e-4)


def test_the_items_reach_the_hard_cases(three_ways, short_docs_run):
    """Answers after which the model expects <eos> (the server used to drop that log-probability), contexts and
    passages longer than the window (cut from the left, or scored in rolling windows)."""
    run = load_run(short_docs_run)
    tok, window = run.tokenizer, run.model.block_size
    samples = {s["doc_id"]: s for s in three_ways["adapter"]["samples"]["glmlab_cloze"]}
    ends, long_contexts = 0, 0
    for s in samples.values():
        context, answer = s["doc"]["context"], s["doc"]["choices"][s["doc"]["label"]]
        ids = tok.encode(f"{context} {answer}")[-window:]
        with torch.no_grad():
            ends += run.model(torch.tensor([ids]))[0, -1].argmax().item() == tok.eos_id
        long_contexts += len(tok.encode(context)) > window
    assert ends >= 5 and long_contexts >= 5
    passages = three_ways["adapter"]["samples"]["glmlab_passages"]
    assert sum(len(tok.encode(s["doc"]["text"])) > window for s in passages) >= 5


def test_glmlab_eval_tasks_from_the_command_line(short_docs_run, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", str(short_docs_run), "--tasks", "glmlab_cloze", "--include-path", str(TASKS), "--limit", "4",
                 "--output-path", str(out), "--log-samples"]) == 0
    assert "glmlab_cloze" in capsys.readouterr().out and '"samples"' in out.read_text()
    assert main(["eval", str(short_docs_run), "--tasks", "hellaswag_nope", "--include-path", str(TASKS)]) == 1
    assert "knows no task 'hellaswag_nope'" in capsys.readouterr().err
    assert main(["eval", str(short_docs_run), "--tasks", "glmlab_cloze", "--split", "val"]) == 1
    assert "use one or the other" in capsys.readouterr().err
    assert main(["eval", str(short_docs_run), "--limit", "3"]) == 1
    assert "applies to lm-eval tasks" in capsys.readouterr().err


def test_generations_decode_at_most_batch_size_rows_together_and_sampling_follows_the_seed(short_docs_run,
                                                                                           monkeypatch):
    from lm_eval.api.instance import Instance

    from glmlab.evaluation.harness import GlmlabLM

    run = load_run(short_docs_run)
    sizes = []
    new_cache = type(run.model).new_cache
    monkeypatch.setattr(type(run.model), "new_cache", lambda self, n, device: sizes.append(n) or
                        new_cache(self, n, device))
    kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": True}
    requests = [Instance("generate_until", {}, ("First Citizen", kwargs), i) for i in range(9)]
    first = GlmlabLM(run, batch_size=4, seed=0).generate_until(requests)
    assert sizes == [4, 4, 1]
    assert GlmlabLM(run, batch_size=4, seed=0).generate_until(requests) == first  # the seed decides
    assert GlmlabLM(run, batch_size=9, seed=0).generate_until(requests) == first  # not the batching
    assert GlmlabLM(run, batch_size=4, seed=1).generate_until(requests) != first
    assert len(set(first)) > 1  # each request draws its own


def test_the_task_index_reads_only_the_include_path_when_it_defines_every_task(monkeypatch):
    """Indexing lm-eval's bundled tasks takes ~10 s: skipped when --include-path defines every name asked for,
    never when a name may be a bundled task or a group (whose members may be bundled)."""
    import lm_eval.tasks

    from glmlab.evaluation.harness import task_manager

    made = []

    class Recording:
        def __init__(self, include_path=None, include_defaults=True):
            made.append(include_defaults)
            self.all_subtasks = ["mine"] + ([] if not include_defaults else ["arc_easy"])

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Recording)
    assert "arc_easy" not in task_manager("tasks", ["mine"]).all_subtasks and made == [False]
    assert "arc_easy" in task_manager("tasks", ["mine", "arc_easy"]).all_subtasks and made[1:] == [False, True]
    assert "arc_easy" in task_manager(None, ["arc_easy"]).all_subtasks and made[3:] == [True]
