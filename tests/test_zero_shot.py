"""cpm-eval: zero-shot classification by LM scoring, checked against an independent PyTorch
implementation of the method on the briefly trained tiny model."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import SHARED, corpus_lines, needs_corpus
from cpm_deploy.cli.eval import main as eval_cli
from cpm_deploy.runtime.eval import classify, encode_examples, load_task, open_scorer, perplexity, perplexity_of_lines

TNEWS = SHARED / "corpus"


def torch_scores(model, tokenizer, prompts, sentence, seq_len=128):
    """The method written out again: prompt and sentence tokenized apart, sentence cut to seq_len - 20,
    mean cross-entropy over exactly the sentence tokens."""
    s = tokenizer.encode(sentence)[:seq_len - 20]
    out = []
    for prompt in prompts:
        p = tokenizer.encode(prompt)
        ids = torch.tensor([p + s])
        with torch.no_grad():
            logits = model(ids)[0][0]
        ce = torch.nn.functional.cross_entropy(logits[len(p) - 1:-1], ids[0, len(p):])
        out.append(float(ce))
    return out


def scored(scorer, task):
    return classify(scorer, encode_examples(task, scorer.tokenizer, scorer.n_positions))


@needs_corpus
def test_predictions_match_an_independent_torch_implementation(trained_hf, trained_bundle, tmp_path):
    from cpm_deploy.exporter import load_checkpoint

    data = tmp_path / "tnews"
    data.mkdir()
    shutil.copyfile(TNEWS / "tnews-dev.jsonl", data / "dev.json")
    shutil.copyfile(TNEWS / "tnews-labels.jsonl", data / "labels.json")
    task = load_task("tnews", data, limit=300)
    scorer = open_scorer(trained_bundle, "cpu-fp32", threads=1)
    ours = scored(scorer, task)
    model = load_checkpoint(trained_hf).model
    want = [torch_scores(model, scorer.tokenizer, [c for c, _ in ex.texts], ex.texts[0][1], 1024) for ex in task.examples]
    assert np.abs(np.array(ours["scores"]) - np.array(want)).max() <= 1e-4
    assert ours["predictions"] == [int(np.argmin(w)) for w in want]
    assert len(set(ours["predictions"])) > 1  # the scores are not flat: labels really compete
    # an example's candidates split over calls (a TensorRT engine's small batch profile) score the same
    few = scored(open_scorer(trained_bundle, "cpu-fp32", "steps", batch=4, threads=1), load_task("tnews", data, limit=20))
    assert np.abs(np.array(few["scores"]) - np.array(want[:20])).max() <= 1e-4


def write_clue(folder, task):
    folder.mkdir()
    lines = corpus_lines(40)
    if task == "iflytek":
        labels = [{"label": str(i), "label_des": d} for i, d in enumerate(["打车", "地图导航", "免费WIFI", "租车"])]
        dev = [{"label": str(i % 4), "label_des": labels[i % 4]["label_des"], "sentence": s} for i, s in enumerate(lines[:12])]
        (folder / "labels.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in labels))
    else:
        kinds = ["entailment", "contradiction", "neutral", "-"]
        dev = [{"sentence1": a, "sentence2": b, "label": kinds[i % 4]} for i, (a, b) in enumerate(zip(lines[:12], lines[12:24]))]
    (folder / "dev.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in dev))


@pytest.mark.parametrize("task, examples", [("iflytek", 12), ("ocnli", 9)])
def test_iflytek_and_ocnli_in_clue_format_through_the_cli(trained_bundle, tmp_path, task, examples):
    write_clue(tmp_path / task, task)
    report = tmp_path / "r.json"
    result = CliRunner().invoke(eval_cli, [str(trained_bundle), "--task", task, "--data", str(tmp_path / task), "-q",
                                           "-g", "cpu-fp32", "-g", "cpu-int8", "--report", str(report)])
    assert result.exit_code == 0, result.output
    r = json.loads(report.read_text())["graphs"]
    fp32, int8 = r["cpu-fp32"], r["cpu-int8"]
    assert fp32["examples"] == examples  # OCNLI's "-" pairs are skipped
    assert sum(c["examples"] for c in fp32["per_label"].values()) == examples
    assert sum(c["predicted"] for c in fp32["per_label"].values()) == examples
    assert 0 <= fp32["accuracy"] <= 1 and fp32["examples_per_s"] > 0 and 0 <= int8["agreement_with_first"] <= 1
    assert "accuracy" in result.output and "per label" in result.output


def test_perplexity_task_equals_the_one_row_helper(trained_bundle, trained_generator, tmp_path):
    lines = corpus_lines(30)[:20]
    batched = perplexity_of_lines(open_scorer(trained_bundle, "cpu-fp32", "steps", threads=1), lines, batch=7)
    tok = trained_generator.tokenizer
    single = perplexity(trained_generator.decoder, [tok.encode(t) + [tok.eod_id] for t in lines])
    assert batched["perplexity"] == pytest.approx(single, rel=1e-6)
    one_pass = perplexity_of_lines(open_scorer(trained_bundle, "cpu-fp32", "one-pass", threads=1), lines, batch=7)
    assert one_pass["perplexity"] == pytest.approx(single, rel=1e-4)
    (tmp_path / "t.txt").write_text("\n".join(lines), encoding="utf-8")
    result = CliRunner().invoke(eval_cli, [str(tmp_path.parent), "--task", "perplexity", "--data", str(tmp_path / "t.txt")])
    assert result.exit_code == 1 and "Traceback" not in result.output  # not a bundle: one line


def test_bad_data_is_a_one_line_error(trained_bundle, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dev.json").write_text("{not json\n")
    (tmp_path / "nolabels").mkdir()
    (tmp_path / "nolabels" / "dev.json").write_text('{"label": "1", "sentence": "x"}\n')
    for args, text in [(["--task", "tnews", "--data", str(tmp_path / "missing")], "not a folder"),
                       (["--task", "tnews", "--data", str(tmp_path / "broken")], "not CLUE JSON lines"),
                       (["--task", "tnews", "--data", str(tmp_path / "nolabels")], "no labels.json"),
                       (["--task", "perplexity", "--data", str(tmp_path)], "not a text file")]:
        result = CliRunner().invoke(eval_cli, [str(trained_bundle), *args, "-q"])
        assert result.exit_code == 1 and text in result.output and "Traceback" not in result.output, result.output
