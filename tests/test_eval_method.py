"""cpm-eval builds the card's examples exactly as CPM's original scripts do: the sampled candidate
sets of zero-shot-cls.py (checked against that loop written out again), its cuts, and ChID's
examples of preprocess_chid_zeroshot.py and zero-shot_chid.py."""

import json
import random
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import SHARED, corpus_lines
from cpm_deploy.cli.eval import main as eval_cli
from cpm_deploy.runtime.eval import classify, encode_examples, load_chid, load_task, open_scorer
from cpm_deploy.runtime.eval.tasks import EvalDataError


def original_candidates(folder, task, seed):
    """zero-shot-cls.py's loop (load_tnews_data / load_iflytek_data with sampled_labels=True), after
    set_random_seed(seed): the module-level generator, every dev line in order."""
    random.seed(seed)
    desc = "label_desc" if task == "tnews" else "label_des"
    labels, label_reverse = [], {}
    with open(folder / "labels.json") as fin:
        for line in fin:
            obj = json.loads(line.strip())
            labels.append(obj[desc])
            label_reverse[obj["label"]] = obj[desc]
    out = []
    with open(folder / "dev.json") as fin:
        for line in fin:
            obj = json.loads(line.strip())
            if task == "tnews":
                obj["label_desc"] = label_reverse[obj["label"]]
            cur_labels = random.sample(labels, 3)
            while obj[desc] in cur_labels:
                cur_labels = random.sample(labels, 3)
            cur_labels.append(obj[desc])
            out.append((cur_labels, cur_labels.index(obj[desc])))
    return out


def write_labelled(folder, task, n_labels=15, n_dev=200):
    folder.mkdir()
    desc = "label_desc" if task == "tnews" else "label_des"
    names = [f"news_{i}" if task == "tnews" else f"应用{i}" for i in range(n_labels)]
    labels = [{"label": str(100 + i), desc: d} for i, d in enumerate(names)]
    lines = corpus_lines(n_dev)
    dev = [{"label": str(100 + (i * 7) % n_labels), desc: names[(i * 7) % n_labels], "sentence": s}
           for i, s in enumerate(lines[:n_dev])]
    for name, rows in (("labels.json", labels), ("dev.json", dev)):
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.mark.parametrize("task", ["tnews", "iflytek"])
@pytest.mark.parametrize("seed", [None, 0, 77])
def test_sampled_candidates_are_those_of_the_original_loop(tmp_path, task, seed):
    folder = write_labelled(tmp_path / task, task)
    ours = load_task(task, folder, seed=seed)
    want = original_candidates(folder, task, {"tnews": 1234, "iflytek": 5}[task] if seed is None else seed)
    assert [(list(e.candidates), e.label) for e in ours.examples] == want
    assert ours.method["seed"] == ({"tnews": 1234, "iflytek": 5}[task] if seed is None else seed)
    assert all(len(e.candidates) == 4 and e.label == 3 for e in ours.examples)
    limited = load_task(task, folder, limit=10, seed=seed)  # --limit stops after drawing, never redraws
    assert limited.examples == ours.examples[:10] and limited.total == len(ours.examples)


def test_sampled_candidates_on_the_real_tnews_dev_set(tmp_path):
    corpus = SHARED / "corpus"
    if not (corpus / "tnews-dev.jsonl").is_file():
        pytest.skip("needs ../shared/corpus (the TNEWS dev set)")
    folder = tmp_path / "tnews"
    folder.mkdir()
    (folder / "dev.json").write_bytes((corpus / "tnews-dev.jsonl").read_bytes())
    (folder / "labels.json").write_bytes((corpus / "tnews-labels.jsonl").read_bytes())
    for seed in (1234, 5, 42):
        ours = load_task("tnews", folder, seed=seed)
        assert [(list(e.candidates), e.label) for e in ours.examples] == original_candidates(folder, "tnews", seed)


def test_all_candidates_and_the_sentence_cut(tmp_path, trained_generator):
    folder = write_labelled(tmp_path / "tnews", "tnews", n_dev=5)
    task = load_task("tnews", folder, candidates="all", seq_length=24)
    assert all(len(e.candidates) == 15 for e in task.examples) and "seed" not in task.method
    assert [e.candidates[e.label] for e in task.examples] == [f"news_{(i * 7) % 15}" for i in range(5)]
    tok = trained_generator.tokenizer
    encoded = encode_examples(task, tok, 1024)
    for ex, cands in zip(task.examples, encoded):
        sentence = tok.encode(ex.texts[0][1])[:4]  # seq_length - 20
        for (context, _), (prefix, scored) in zip(ex.texts, cands):
            assert prefix.tolist() == tok.encode(context) and scored.tolist() == sentence
        assert [c for c, _ in ex.texts] == [f"这是关于{name}的文章：" for name in ex.candidates]


def test_ocnli_keeps_its_three_candidates_and_never_cuts(tmp_path, trained_generator):
    folder = tmp_path / "ocnli"
    folder.mkdir()
    long = "很长的句子，" * 200
    rows = [{"sentence1": "他来了", "sentence2": long, "label": "neutral"},
            {"sentence1": "a", "sentence2": "b", "label": "-"},
            {"sentence1": "他走了", "sentence2": "他不在", "label": "contradiction"}]
    (folder / "dev.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    task = load_task("ocnli", folder, seq_length=64)
    assert [e.label for e in task.examples] == [2, 1]
    assert task.examples[0].texts[0] == ("他来了？对，", long)
    encoded = encode_examples(task, trained_generator.tokenizer, 1024)
    assert len(encoded[0][0][1]) == len(trained_generator.tokenizer.encode(long)) > 64


class TiedScorer:
    """Every candidate scores the same."""

    def logprobs(self, prefixes, continuations):
        return [np.full(len(c), -1.0) for c in continuations]


def test_ties_never_go_to_the_gold_label_last(tmp_path, trained_generator):
    task = load_task("tnews", write_labelled(tmp_path / "tnews", "tnews", n_dev=6))
    out = classify(TiedScorer(), encode_examples(task, trained_generator.tokenizer, 1024))
    assert out["predictions"] == [0] * 6  # argmin's first: the card's accuracy never counts a tie


def write_chid(folder, passages, answers, split="test"):
    folder.mkdir(exist_ok=True)
    (folder / f"{split}.json").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in passages),
                                         encoding="utf-8")
    (folder / f"{split}_answer.json").write_text(json.dumps(answers), encoding="utf-8")
    return folder


CHID = [{"candidates": ["一马当先", "画蛇添足", "守株待兔"],
         "content": ["他#idiom000001#冲在最前面，后来又#idiom000002#。", "这里没有空。", "农夫#idiom000003#。"]},
        {"candidates": ["井底之蛙", "对牛弹琴"], "content": ["和他讲道理简直是#idiom000004#。"]}]
ANSWERS = {"#idiom000001#": 0, "#idiom000002#": 1, "#idiom000003#": 2, "#idiom000004#": 1}


def original_chid(folder, tok):
    """preprocess_chid_zeroshot.py's process_one_sent_eval, then zero-shot_chid.py's input/labels."""
    pattern = re.compile(r"#idiom\d+#")
    answers = json.loads((folder / "test_answer.json").read_text())
    out = []
    for line in (folder / "test.json").read_text().splitlines():
        jobj = json.loads(line)
        for sent in jobj["content"]:
            start = 0
            while (m := pattern.search(sent, start)) is not None:
                cands = [tok.encode(re.sub(pattern, "", sent[:m.start()] + idm + sent[m.end():]))
                         for idm in jobj["candidates"]]
                out.append(([c + [tok.eod_id] for c in cands], answers[m.group()]))
                start = m.end()
    return out


def test_chid_examples_are_built_as_the_original_preprocessing(tmp_path, trained_generator):
    folder = write_chid(tmp_path / "chid", CHID, ANSWERS)
    task = load_chid(folder)
    tok = trained_generator.tokenizer
    assert len(task.examples) == 4 and task.method["split"] == "test"  # the two-blank passage gives two
    assert task.examples[0].texts[0][0] == "他一马当先冲在最前面，后来又。"  # the other blank removed
    assert task.examples[1].texts[1][0] == "他冲在最前面，后来又画蛇添足。"
    encoded = encode_examples(task, tok, 1024)
    want = original_chid(folder, tok)
    for ex, cands, (seqs, answer) in zip(task.examples, encoded, want):
        assert ex.label == answer
        assert [p.tolist() + s.tolist() for p, s in cands] == seqs
        assert all(len(p) == 1 for p, _ in cands)  # every token after the first is scored, <eod> included


def test_chid_scores_match_an_independent_torch_implementation(tmp_path, trained_hf, trained_bundle):
    from cpm_deploy.exporter import load_checkpoint

    folder = write_chid(tmp_path / "chid", CHID, ANSWERS)
    scorer = open_scorer(trained_bundle, "cpu-fp32", threads=1)
    ours = classify(scorer, encode_examples(load_chid(folder), scorer.tokenizer, scorer.n_positions))
    model = load_checkpoint(trained_hf).model
    want = []
    for seqs, _ in original_chid(folder, scorer.tokenizer):  # zero-shot_chid.py: mean CE of ids[1:] given ids[:-1]
        with torch.no_grad():
            want.append([float(torch.nn.functional.cross_entropy(model(torch.tensor([s[:-1]]))[0][0],
                                                                 torch.tensor(s[1:]))) for s in seqs])
    assert np.abs(np.array([x for s in ours["scores"] for x in s]) - np.array([x for s in want for x in s])).max() < 1e-4
    assert ours["predictions"] == [int(np.argmin(w)) for w in want]


@pytest.mark.parametrize("passages, answers, message", [
    (CHID, {k: v for k, v in ANSWERS.items() if k != "#idiom000002#"}, "#idiom000002#: the blank has no answer"),
    ([{"candidates": "一马当先", "content": ["他#idiom000001#。"]}], ANSWERS, "'candidates' must be a non-empty list"),
    ([{"candidates": ["一马当先", 3], "content": ["他#idiom000001#。"]}], ANSWERS, "'candidates' must be"),
    ([{"candidates": ["一马当先"], "content": "他#idiom000001#。"}], ANSWERS, "'content' must be a list"),
    (CHID, {**ANSWERS, "#idiom000004#": 7}, "answer 7 is not an index into its 2 candidates"),
    ([{"candidates": ["一马当先", "画蛇添足"], "content": ["很长的句子，" * 700 + "#idiom000001#"]}], ANSWERS,
     "positions; the model has"),
])
def test_bad_chid_files_are_one_line_errors(tmp_path, trained_bundle, passages, answers, message):
    folder = write_chid(tmp_path / "chid", passages, answers)
    result = CliRunner().invoke(eval_cli, [str(trained_bundle), "--task", "chid", "--data", str(folder), "-q",
                                           "-o", str(tmp_path / "r.json")])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "r.json").exists()


def test_chid_through_the_cli_with_a_projection(tmp_path, trained_bundle):
    folder = write_chid(tmp_path / "chid", CHID, ANSWERS, split="dev")
    report = tmp_path / "r.json"
    result = CliRunner().invoke(eval_cli, [str(trained_bundle), "-T", "chid", "-d", str(folder), "--split", "dev",
                                           "-n", "2", "-q", "-o", str(report)])
    assert result.exit_code == 0, result.output
    assert "all 4 examples would take about" in result.output
    doc = json.loads(report.read_text())
    r = doc["graphs"]["cpu-fp32"]
    assert r["examples"] == 2 and r["scoring"] == "one pass" and r["examples_in_file"] == 4
    assert doc["examples"][0]["candidates"] == CHID[0]["candidates"] and doc["method"]["split"] == "dev"
    missing = CliRunner().invoke(eval_cli, [str(trained_bundle), "-T", "chid", "-d", str(folder), "-q"])
    assert missing.exit_code == 1 and "no test.json" in missing.output


def test_too_few_labels_to_sample_is_an_error(tmp_path):
    folder = write_labelled(tmp_path / "t", "tnews", n_labels=3, n_dev=4)
    with pytest.raises(EvalDataError, match="need more than 3 labels"):
        load_task("tnews", folder)
    assert len(load_task("tnews", folder, candidates="all").examples) == 4


def test_an_unwritable_report_fails_before_any_scoring(trained_bundle, tmp_path):
    folder = write_chid(tmp_path / "chid", CHID, ANSWERS)
    r = CliRunner().invoke(eval_cli, [str(trained_bundle), "-T", "chid", "-d", str(folder), "-q",
                                      "-o", str(tmp_path / "missing" / "r.json")])
    assert r.exit_code == 1 and "cannot write the report" in r.output and "Traceback" not in r.output
