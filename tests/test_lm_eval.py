"""lm-evaluation-harness against cpm-serve through its real ``local-completions`` client: the
model card's TNEWS setting as a task file (benchmarks/lm_eval), scored over the API with the
server's own tokenizer, predicts what cpm-eval predicts on the same graph."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SHARED
from serve_helpers import serve_process
from test_eval_method import write_labelled

pytest.importorskip("lm_eval", reason="lm-eval is installed with the [test] extra")
sys.path.insert(0, str(ROOT / "benchmarks" / "lm_eval"))
from make_tnews_docs import write_docs  # noqa: E402

TASK_FILES = ROOT / "benchmarks" / "lm_eval"
EXAMPLES = 12


@pytest.fixture
def tnews_folder(tmp_path) -> Path:
    """CLUE's TNEWS dev set when ../shared has it, else labelled headlines written here."""
    corpus = SHARED / "corpus"
    if not (corpus / "tnews-dev.jsonl").is_file():
        return write_labelled(tmp_path / "tnews", "tnews", n_dev=EXAMPLES)
    folder = tmp_path / "tnews"
    folder.mkdir()
    shutil.copyfile(corpus / "tnews-dev.jsonl", folder / "dev.json")
    shutil.copyfile(corpus / "tnews-labels.jsonl", folder / "labels.json")
    return folder


def test_the_card_s_contexts_split_where_lm_eval_splits_them(tnews_folder, trained_generator):
    """lm-eval encodes context + continuation whole and splits at the context's length; cpm-eval
    encodes them apart. jieba cuts at the contexts' final '：', so the two agree."""
    from cpm_deploy.runtime.eval import load_task

    enc = trained_generator.tokenizer.encode
    for ex in load_task("tnews", tnews_folder, limit=300).examples:
        for context, sentence in ex.texts:
            assert enc(context + sentence) == enc(context) + enc(sentence), (context, sentence)


def cpm_eval_predictions(bundle, folder) -> list[int]:
    from cpm_deploy.runtime import CPMTokenizer
    from cpm_deploy.runtime.eval import classify, encode_examples, load_task, open_scorer

    scorer = open_scorer(bundle, "cpu-fp32", "one-pass", threads=1)
    task = load_task("tnews", folder, limit=EXAMPLES)
    return classify(scorer, encode_examples(task, CPMTokenizer(bundle / "spiece.model"), 128))["predictions"]


def test_lm_eval_local_completions_predicts_what_cpm_eval_predicts(trained_bundle, tnews_folder, tmp_path):
    work = tmp_path / "task"
    work.mkdir()
    shutil.copyfile(TASK_FILES / "tnews_cpm.yaml", work / "tnews_cpm.yaml")
    assert write_docs(tnews_folder, work / "tnews_cpm.jsonl", EXAMPLES) == EXAMPLES
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with serve_process(trained_bundle, "-g", "cpu-fp32", "-t", "1", "--max-batch", "4") as (_, base):
        args = f"model=bundle,base_url={base}/v1/completions,tokenizer_backend=remote,max_length=128,num_concurrent=3"
        run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--tasks", "tnews_cpm",
                              "--include_path", str(work), "--model_args", args, "--log_samples",
                              "--output_path", str(work / "out")],
                             cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = [json.loads(line) for f in (work / "out").rglob("samples_tnews_cpm_*.jsonl")
               for line in f.read_text(encoding="utf-8").splitlines()]
    assert len(samples) == EXAMPLES
    ours = {s["doc_id"]: max(range(4), key=lambda i: float(s["filtered_resps"][i][0])) for s in samples}  # logged as text
    assert [ours[i] for i in range(EXAMPLES)] == cpm_eval_predictions(trained_bundle, tnews_folder)
