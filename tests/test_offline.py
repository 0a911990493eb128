"""cpm-run -f: prompt files through the batching engine, in input order, equal to one-by-one
generation; per-line options; OpenAI batch files; resume after a real SIGKILL; file errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import corpus_lines
from cpm_deploy.cli.run import main as run_cli

PROMPTS = [line[:4] for line in corpus_lines(40)[:24]]  # short prefixes: the model continues them


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run(args, **kw):
    return CliRunner().invoke(run_cli, args, catch_exceptions=False, **kw)


def one_by_one(gen, prompts, **options):
    return [{"prompt": p, "generated_text": [o["generated_text"] for o in gen(p, **options)]} for p in prompts]


@pytest.mark.parametrize("options, cli", [({"max_new_tokens": 12}, ["-n", "12"]),
                                          ({"max_new_tokens": 10, "do_sample": True, "top_p": 0.9, "seed": 3},
                                           ["-n", "10", "-s", "-p", "0.9", "--seed", "3"])])
def test_a_prompt_file_equals_one_by_one_generation_in_input_order(trained_bundle, trained_generator, tmp_path,
                                                                  options, cli):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")  # a blank line is skipped
    r = run([str(trained_bundle), "-f", str(tmp_path / "p.txt"), "-g", "cpu-fp32", "-b", "4", "-q", *cli])
    assert r.exit_code == 0, r.output
    assert records(r.stdout) == one_by_one(trained_generator, PROMPTS, **options)


def test_json_lines_carry_per_line_options_and_bad_lines_become_records(trained_bundle, trained_generator, tmp_path):
    lines = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "max_new_tokens": 3},
             {"prompt": PROMPTS[2], "do_sample": True, "seed": 7, "num_return_sequences": 2, "stop": ["，"]},
             {"prompt": 12}, {"prompt": PROMPTS[3], "colour": "red"}, {"prompt": PROMPTS[4], "max_length": 3000},
             {"prompt": PROMPTS[5], "temperature": "hot", "do_sample": True}]
    text = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n[1, 2]\n"
    (tmp_path / "p.jsonl").write_text(text, encoding="utf-8")
    r = run([str(trained_bundle), "-f", str(tmp_path / "p.jsonl"), "-g", "cpu-fp32", "-n", "6", "-q"])
    assert r.exit_code == 0, r.output
    got = records(r.stdout)
    assert len(got) == len(lines) + 1
    gen = trained_generator
    assert got[0] == one_by_one(gen, [PROMPTS[0]], max_new_tokens=6)[0]
    assert got[1] == one_by_one(gen, [PROMPTS[1]], max_new_tokens=3)[0]
    assert got[2]["generated_text"][0] == gen(PROMPTS[2], max_new_tokens=6, do_sample=True, seed=7,
                                              stop=["，"])[0]["generated_text"]  # choice 0: the seed's own stream
    assert len(got[2]["generated_text"]) == 2
    assert "'prompt' must be a string" in got[3]["error"] and got[3]["line"] == 4
    assert "unknown key(s) colour" in got[4]["error"]
    assert "max_length 3000 exceeds" in got[5]["error"]
    assert "temperature" in got[6]["error"] and "not a JSON object" in got[7]["error"]


def test_an_openai_batch_file_gets_cpm_serves_answers(trained_bundle, trained_generator, tmp_path):
    body = {"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0}
    lines = [{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body},
             {"custom_id": "b", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": [PROMPTS[1], PROMPTS[2]], "max_tokens": 4, "temperature": 0, "n": 2}},
             {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "n": 0}},
             {"custom_id": "d", "method": "POST", "url": "/v1/completions",
              "body": body | {"echo": True, "logprobs": 2, "max_tokens": 1}},
             {"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": body},
             {"method": "POST", "url": "/v1/completions", "body": body}]
    text = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n{oops\n"
    (tmp_path / "in.jsonl").write_text(text, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = run([str(trained_bundle), "-f", str(tmp_path / "in.jsonl"), "-o", str(out), "-g", "cpu-fp32", "-q"])
    assert r.exit_code == 0, r.output
    got = records(out.read_text(encoding="utf-8"))
    assert [g["custom_id"] for g in got] == ["a", "b", "c", "d", "e", None, None]
    a = got[0]
    assert a["id"].startswith("batch_req_") and a["error"] is None and a["response"]["status_code"] == 200
    completion = a["response"]["body"]
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] == 5
    want = trained_generator(PROMPTS[0], max_new_tokens=5)[0]["generated_text"][len(PROMPTS[0]):]
    assert completion["choices"] == [{"index": 0, "text": want, "logprobs": None, "finish_reason": "length"}]
    assert [c["index"] for c in got[1]["response"]["body"]["choices"]] == [0, 1, 2, 3]  # prompt-major, as served
    c, d = got[2]["response"], got[3]["response"]
    assert c["status_code"] == 400 and c["body"]["error"]["param"] == "n"
    echoed = d["body"]["choices"][0]  # scored as cpm-serve scores it: the prompt's tokens, then one more
    assert d["status_code"] == 200 and echoed["text"] == PROMPTS[0] + want[:len(echoed["text"]) - len(PROMPTS[0])]
    assert echoed["logprobs"]["token_logprobs"][0] is None and len(echoed["logprobs"]["top_logprobs"][1]) == 2
    assert len(echoed["logprobs"]["tokens"]) == len(trained_generator.tokenizer.encode(PROMPTS[0])) + 1
    for g, what in ((got[4], "only POST /v1/completions"), (got[5], "custom_id"), (got[6], "not JSON")):
        assert g["response"] is None and what in g["error"]["message"]


def test_a_file_of_inputs_behind_one_template_computes_the_template_once(trained_bundle, trained_generator, tmp_path):
    """The common offline case: a few-shot template, then each line's input. The first line's
    template is prefilled; every later line starts from it (its usage says how many tokens)."""
    template = "，".join(corpus_lines(60)[40:43]) + "。\n"
    prompts = [template + p for p in PROMPTS[:8]]
    lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/completions",
              "body": {"prompt": p, "max_tokens": 5, "temperature": 0}} for i, p in enumerate(prompts)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    r = run([str(trained_bundle), "-f", str(tmp_path / "in.jsonl"), "-g", "cpu-fp32", "-b", "4", "-q"])
    assert r.exit_code == 0, r.output
    bodies = [g["response"]["body"] for g in records(r.stdout)]
    assert [b["choices"][0]["text"] for b in bodies] == [
        trained_generator(p, max_new_tokens=5)[0]["generated_text"][len(p):] for p in prompts]
    cached = [b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in bodies]
    assert cached[0] == 0 and min(cached[1:]) > 40


def test_graphs_the_engine_cannot_batch_run_line_by_line_with_the_same_records(trained_bundle, tmp_path):
    from cpm_deploy.runtime import CPMGenerator

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:4]) + "\n", encoding="utf-8")
    r = run([str(trained_bundle), "-f", str(tmp_path / "p.txt"), "-g", "trt-fp16", "-n", "5", "-q"])  # concat KV
    assert r.exit_code == 0, r.output
    gen = CPMGenerator.from_bundle(trained_bundle, variant="trt-fp16", threads=1)
    assert records(r.stdout) == one_by_one(gen, PROMPTS[:4], max_new_tokens=5)


def job_command(bundle, prompts_file, out):
    return [str(Path(sys.executable).parent / "cpm-run"), str(bundle), "-f", str(prompts_file), "-o", str(out),
            "-g", "cpu-fp32", "-n", "48", "-b", "2", "-q", "--no-verify"]


def test_a_job_killed_with_sigkill_resumes_to_exactly_the_uninterrupted_output(trained_bundle, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    subprocess.run(job_command(trained_bundle, prompts, whole), check=True, timeout=300)
    want = whole.read_text(encoding="utf-8").splitlines()
    assert len(want) == len(PROMPTS)

    proc = subprocess.Popen(job_command(trained_bundle, prompts, cut))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if cut.exists() and cut.read_text(encoding="utf-8").count("\n") >= len(PROMPTS) // 3:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = cut.read_text(encoding="utf-8").count("\n")
    assert 0 < written < len(PROMPTS), "the job was not killed part way"
    with open(cut, "a", encoding="utf-8") as f:
        f.write('{"prompt": "half a rec')  # what a kill in the middle of a write leaves
    again = subprocess.run(job_command(trained_bundle, prompts, cut), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {written} records" in again.stderr
    assert cut.read_text(encoding="utf-8").splitlines() == want


def test_file_errors_are_one_line(trained_bundle, tmp_path):
    (tmp_path / "p.txt").write_text("清华\n", encoding="utf-8")
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "北京", "generated_text": ["北京大学"]}\n', encoding="utf-8")
    for args, message in [(["-o", "/dev/full"], "No space left on device"),
                          (["-o", str(tmp_path / "nope" / "out.jsonl")], "cannot write"),
                          (["-o", str(other)], "another job's output")]:
        r = CliRunner().invoke(run_cli, [str(trained_bundle), "-f", str(tmp_path / "p.txt"), "-q", *args])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    missing = CliRunner().invoke(run_cli, [str(trained_bundle), "-f", str(tmp_path / "missing.txt")])
    assert missing.exit_code == 1 and "cannot read" in missing.output
    lone = CliRunner().invoke(run_cli, [str(trained_bundle), "清华", "-o", str(tmp_path / "o.jsonl")])
    assert lone.exit_code == 2 and "--output goes with --prompts-file" in lone.output


def test_a_batch_line_of_more_prompts_than_the_queue_holds_goes_in_as_it_makes_room(trained_bundle, trained_generator,
                                                                                   tmp_path):
    body = {"prompt": PROMPTS[:3], "max_tokens": 4, "temperature": 0}  # 3 requests; -b 1 queues 2
    line = {"custom_id": "many", "method": "POST", "url": "/v1/completions", "body": body}
    (tmp_path / "in.jsonl").write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    r = run([str(trained_bundle), "-f", str(tmp_path / "in.jsonl"), "-g", "cpu-fp32", "-b", "1", "-q"])
    assert r.exit_code == 0, r.output
    texts = [c["text"] for c in records(r.stdout)[0]["response"]["body"]["choices"]]
    assert texts == [trained_generator(p, max_new_tokens=4)[0]["generated_text"][len(p):] for p in PROMPTS[:3]]
