"""Task accuracy (DESIGN §7): core/generation.py against hand-computed values and a hand loop of argmax steps,
data/prompts.py on jsonl / Parquet / chat records, and `tailkd eval` end to end on a tiny jsonl."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tailkd_ray.cli import main
from tailkd_ray.config import ConfigError, DataConfig, GenerationConfig, load_config
from tailkd_ray.core.generation import Completion, extract_answer, greedy_decode, score_example, summarize_scores
from tailkd_ray.data.prompts import read_prompts
from tailkd_ray.errors import DataError
from tailkd_ray.models import load_model, load_tokenizer

LLAMA3 = Path(__file__).parent / "fixtures" / "configs" / "meta-llama-3-8b"

GSM8K = re.compile(GenerationConfig().answer_regex)


@pytest.mark.parametrize("text, answer", [
    ("so she pays 3 * 4 = 12 dollars.\n#### 12", "12"),
    ("#### 1,234", "1234"),
    ("####1,000.50.", "1000.5"),  # no space, thousands comma, trailing zero, sentence period
    ("#### -7\n#### 9", "-7"),  # the first match
    ("the answer is 12", None),
])
def test_final_answer_is_the_first_match_normalised(text, answer):
    assert extract_answer(text, GSM8K) == answer


def test_answer_regex_without_a_group_takes_the_whole_match():
    assert extract_answer("Answer: B.", re.compile(r"\b[A-D]\b")) == "B"
    assert extract_answer("x = 0012.0", re.compile(r"[\d.]+")) == "12"


def test_exact_match_and_rouge_l_on_known_strings():
    # ROUGE-L by hand: reference "the cat sat on the mat" (6 words), completion "The cat, on a mat." (5 words,
    # lowercased, punctuation dropped); LCS "the cat on mat" = 4: P = 4/5, R = 4/6, F = 2PR / (P + R) = 8/11.
    reference = "the cat sat on the mat #### 1,000"
    right = score_example("The cat, on a mat. #### 1000", reference, GSM8K)
    assert right["exact_match"] is True and right["answer"] == right["reference_answer"] == "1000"
    # ROUGE splits "1,000" into the words "1" "000": 8 reference words, 6 completion words ("1000"), LCS 4: F = 4/7.
    assert right["rouge_l"] == pytest.approx(2 * (4 / 6) * (4 / 8) / ((4 / 6) + (4 / 8))) == pytest.approx(4 / 7)
    plain = score_example("The cat, on a mat.", "the cat sat on the mat", GSM8K)
    assert plain["rouge_l"] == pytest.approx(8 / 11) and plain["exact_match"] is None
    wrong = score_example("the cat #### 999", reference, GSM8K)
    assert wrong["exact_match"] is False and wrong["answer"] == "999"
    silent = score_example("no answer here", reference, GSM8K)
    assert silent["exact_match"] is False and silent["answer"] is None
    assert score_example("", reference, GSM8K)["rouge_l"] == 0


def test_summary_counts_each_kind_of_example():
    reference = "#### 4"
    scores = [score_example(text, ref, GSM8K) for text, ref in
              [("#### 4", reference), ("#### 5", reference), ("nothing", reference), ("#### 4", "no answer")]]
    completions = [Completion([1], True), Completion([1], False), Completion([1], False), Completion([], True)]
    got = summarize_scores(scores, completions)
    assert got["exact_match"] == pytest.approx(1 / 3)  # the fourth reference has no answer: not judged
    assert (got["examples"], got["with_answer"], got["no_answer"], got["hit_max_new_tokens"]) == (4, 3, 1, 2)
    assert got["rouge_l"] == pytest.approx(sum(s["rouge_l"] for s in scores) / 4)
    assert summarize_scores([], [])["exact_match"] is None


def _argmax_loop(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by hand: the whole sequence through the model at every step, no cache, no padding."""
    ids = list(prompt)
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_batched_greedy_decoding_equals_a_hand_loop_of_argmax_steps(request, fixture):
    model = load_model(request.getfixturevalue(fixture), trust_remote_code=False)
    prompts = [[5, 17, 42, 9, 100, 7, 64], [3], [250, 11, 12], [8, 8, 8, 8]]  # lengths 7, 1, 3, 4: left padding
    steps = 6
    expected = [_argmax_loop(model, p, steps) for p in prompts]
    got = greedy_decode(model, prompts, max_new_tokens=steps, eos_ids=[], pad_id=0, batch_size=3)
    assert [c.ids for c in got] == expected and not any(c.stopped_at_eos for c in got)
    # An EOS ends a completion (and is not part of it): the third token of the first prompt's completion.
    eos = expected[0][2]
    got = greedy_decode(model, prompts, max_new_tokens=steps, eos_ids=[eos], pad_id=0, batch_size=2)
    for completion, want in zip(got, expected):
        end = want.index(eos) if eos in want else None
        assert completion.ids == want[:end] and completion.stopped_at_eos == (end is not None)
    assert got[0].ids == expected[0][:expected[0].index(eos)]


@pytest.mark.parametrize("name, end_of_turn", [("qwen2.5", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_chat_decoding_stops_at_the_templates_end_of_turn(chat_tokenizer_dirs, name, end_of_turn):
    """A base tokenizer's EOS and an exported student's generation_config name another token: the end of turn the
    chat template writes (found from the template, the newline after Qwen's left out) still ends a chat reply."""
    from transformers import LlamaForCausalLM

    from tailkd_ray.data.samples import end_of_turn_ids
    from tailkd_ray.models import llama_config
    from tailkd_ray.pipelines.evaluate import stop_ids

    tokenizer = load_tokenizer(chat_tokenizer_dirs[name])
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(0)
    turn = tokenizer.convert_tokens_to_ids(end_of_turn)
    assert end_of_turn_ids(tokenizer) == [turn]
    model = LlamaForCausalLM(llama_config(vocab=len(tokenizer), layers=1, width=32, heads=1, intermediate=64,
                                          max_positions=64, eos_id=0)).eval()
    model.lm_head = torch.nn.Linear(32, len(tokenizer), bias=True)  # rigged: every step's argmax is the end of turn
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[turn] = 1.0
    assert turn in stop_ids(model, tokenizer, "chat") and turn not in stop_ids(model, tokenizer, "prompt_completion")
    prompt = [[5, 17, 42]]
    reply, = greedy_decode(model, prompt, max_new_tokens=4, eos_ids=stop_ids(model, tokenizer, "chat"), pad_id=0,
                           batch_size=1)
    assert reply.ids == [] and reply.stopped_at_eos
    runaway, = greedy_decode(model, prompt, max_new_tokens=4, eos_ids=stop_ids(model, tokenizer, "prompt_completion"),
                             pad_id=0, batch_size=1)
    assert runaway.ids == [turn] * 4 and not runaway.stopped_at_eos


def test_prompt_records_from_jsonl_parquet_and_chat(tmp_path, tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    lines = [{"prompt": "Q: 2 + 2?\nA: ", "completion": "2 + 2 = 4\n#### 4"},
             {"prompt": "Q: 1?", "completion": 7},  # malformed: skipped and counted
             {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "3 + 4?"},
                           {"role": "assistant", "content": "#### 7"}]},
             {"messages": [{"role": "user", "content": "no reply"}]}]  # malformed: no assistant turn
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    pq.write_table(pa.table({"prompt": ["Q: 5?"], "completion": ["#### 5"]}), tmp_path / "b.parquet")
    found = read_prompts(str(tmp_path), tokenizer, DataConfig(), limit=10)
    chat_prompt = "<system>Be brief.\n<user>Hi\n<assistant>Hello\n<user>3 + 4?\n<assistant>"
    assert found.prompts == ["Q: 2 + 2?\nA: ", chat_prompt, "Q: 5?"]
    assert found.references == ["2 + 2 = 4\n#### 4", "#### 7", "#### 5"]
    assert found.prompt_ids == [tokenizer(p, add_special_tokens=False)["input_ids"] for p in found.prompts]
    assert found.sources == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:3", f"{tmp_path}/b.parquet:1"]
    assert found.skipped == {"malformed": 2}
    assert found.first_skipped["malformed"] == f"{tmp_path}/a.jsonl:2 ('completion' is int, expected a string)"
    assert read_prompts(str(tmp_path), tokenizer, DataConfig(), limit=2).sources == found.sources[:2]
    (tmp_path / "c.jsonl").write_text('{"text": "plain text"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: a generation record holds 'messages', or 'prompt' and "
                                        r"'completion'; it has text"):
        read_prompts(str(tmp_path), tokenizer, DataConfig(), limit=10)


def test_prompt_records_from_a_hugging_face_dataset(tmp_path, tiny_tokenizer_dir):
    """The rows of a datasets.Dataset (``tailkd eval``'s val_data) read as the same records written to jsonl, named
    by row; its label without the dataset is one line saying what to pass."""
    import datasets

    from tailkd_ray.data.read import InMemoryCorpus

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    rows = [{"prompt": "Q: 2 + 2?\nA: ", "completion": "#### 4"}, {"prompt": "Q: 1?", "completion": None},
            {"prompt": "Q: 5?", "completion": "#### 5"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    by_path = read_prompts(str(tmp_path / "a.jsonl"), tokenizer, DataConfig(), limit=10)
    corpus = InMemoryCorpus.of(datasets.Dataset.from_list(rows), "val_data")
    found = read_prompts(corpus.label, tokenizer, DataConfig(), limit=10, corpora={corpus.label: corpus})
    assert (found.prompt_ids, found.references, found.skipped) == (by_path.prompt_ids, by_path.references,
                                                                  by_path.skipped) and len(found.references) == 2
    assert found.sources == ["hf:dataset[row 0]", "hf:dataset[row 2]"]
    assert found.first_skipped["malformed"] == "hf:dataset[row 1] ('completion' is NoneType, expected a string)"
    with pytest.raises(DataError, match=r"hf:dataset@\w+ names a datasets.Dataset .* which this call was not given"):
        read_prompts(corpus.label, tokenizer, DataConfig(), limit=10)


@pytest.mark.parametrize("name", ["llama3", "qwen2.5"])
def test_chat_prompts_are_the_template_before_the_last_assistant_turn(chat_tokenizer_dirs, tmp_path, name):
    """Prompt ids = the chat template's text (Llama 3's starting with its BOS, once) tokenized without special tokens."""
    tokenizer = load_tokenizer(chat_tokenizer_dirs[name])
    messages = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "#### 5"},
                {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "#### 8"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    found = read_prompts(str(tmp_path / "chat.jsonl"), tokenizer, DataConfig(format="chat"), limit=5)
    text = tokenizer.apply_chat_template(messages[:3], add_generation_prompt=True, tokenize=False)
    assert found.references == ["#### 8"] and found.prompts == [text]
    assert found.prompt_ids == [tokenizer(text, add_special_tokens=False)["input_ids"]]
    ids, bos = found.prompt_ids[0], tokenizer.bos_token_id
    assert (ids.count(bos), ids[0] == bos) == ((1, True) if name == "llama3" else (0, False))


def test_prompt_completion_prompts_start_with_the_bos_the_packer_gives(tmp_path):
    tokenizer = load_tokenizer(LLAMA3)  # adds BOS: so does the packer, to every prompt_completion sample
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": "Q: 1 + 1?", "completion": "#### 2"}) + "\n")
    plain = tokenizer("Q: 1 + 1?", add_special_tokens=False)["input_ids"]
    for add_bos, first in ((None, [tokenizer.bos_token_id]), (False, [])):
        found = read_prompts(str(tmp_path / "pc.jsonl"), tokenizer, DataConfig(add_bos=add_bos), limit=1)
        assert found.prompt_ids == [first + plain]


@pytest.mark.ray
def test_eval_reports_task_accuracy_of_student_and_teacher(ray_session, tiny_llama_dir, tmp_path, capsys, caplog):
    """`tailkd eval` with generation.data only: one reference is the model's own greedy completion (exact match,
    ROUGE-L 1), the other shares no word with the model's (answer zzz, ROUGE-L 0); the student is the teacher, so
    both lines agree; a second evaluation reuses the teacher's completions."""
    tokenizer = load_tokenizer(tiny_llama_dir)
    prompts = ["def main(", "import os\n"]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    model = load_model(tiny_llama_dir, trust_remote_code=False)
    own = greedy_decode(model, ids, max_new_tokens=6, eos_ids=[tokenizer.eos_token_id], pad_id=0, batch_size=2)[0]
    own_text = tokenizer.decode(own.ids, skip_special_tokens=True)
    assert re.search(r"[a-z0-9]", own_text.lower()), own_text  # words for ROUGE-L and the answer regex
    records = [{"prompt": prompts[0], "completion": own_text}, {"prompt": prompts[1], "completion": "zzz qqq"}]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shutil.copytree(tiny_llama_dir, tmp_path / "student")
    (tmp_path / "none.yaml").write_text("{}\n")
    args = ["eval", "--config", str(tmp_path / "none.yaml"), f"teacher.model={tiny_llama_dir}",
            f"generation.data={tmp_path / 'val.jsonl'}", "generation.max_new_tokens=6", "generation.batch_size=2",
            r"generation.answer_regex='([a-z0-9]+)'", f"output_dir={tmp_path / 'out'}", "--student",
            str(tmp_path / "student")]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "student_eval.json").read_text())
    assert printed["eval_json"] == str(tmp_path / "student_eval.json")
    assert written["exact_match"] == written["teacher_exact_match"] == 0.5
    assert written["rouge_l"] == written["teacher_rouge_l"] == pytest.approx(0.5)
    lines = [json.loads(line) for line in (tmp_path / "student_generations.jsonl").read_text().splitlines()]
    assert lines[0]["student"]["completion"] == own_text and lines[1]["student"]["reference_answer"] == "zzz"
    assert "zzz" not in lines[1]["student"]["completion"] and "qqq" not in lines[1]["student"]["completion"]
    assert lines[0]["student"] == lines[0]["teacher"] and lines[0]["source"].endswith("val.jsonl:1")
    assert "val_loss" not in written  # no val data: no token metrics
    teacher_file = tmp_path / "out" / "teacher_generations.json"
    stamp = teacher_file.stat().st_mtime_ns
    caplog.clear()
    assert main(args) == 0
    assert teacher_file.stat().st_mtime_ns == stamp and "generation (teacher): reusing" in caplog.text


@pytest.mark.ray
def test_eval_runs_a_local_lm_eval_task_offline(ray_session, tiny_llama_dir, tmp_path, monkeypatch):
    """`tailkd eval --lm-eval TASK` on a task YAML of lm_eval.include_path over a local jsonl: the harness's greedy
    completions (until a newline) scored by exact match; one target is the model's own completion."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(tiny_llama_dir)
    model = load_model(tiny_llama_dir, trust_remote_code=False)
    prompt = "def main("
    own = greedy_decode(model, [tokenizer(prompt, add_special_tokens=False)["input_ids"]], max_new_tokens=4,
                        eos_ids=[tokenizer.eos_token_id], pad_id=0, batch_size=1)[0]
    own_text = tokenizer.decode(own.ids, skip_special_tokens=True)
    assert "\n" not in own_text and own_text.strip(), own_text  # the harness stops at "\n" and strips nothing
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.jsonl").write_text(json.dumps({"prompt": prompt, "target": own_text}) + "\n"
                                      + json.dumps({"prompt": "import os", "target": "zzz qqq"}) + "\n")
    (tasks / "tiny.yaml").write_text(f"""task: tailkd_tiny
dataset_path: json
dataset_kwargs: {{data_files: {{test: {tasks / 'tiny.jsonl'}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 4, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""")
    shutil.copytree(tiny_llama_dir, tmp_path / "student")
    (tmp_path / "none.yaml").write_text("{}\n")
    assert main(["eval", "--config", str(tmp_path / "none.yaml"), f"teacher.model={tiny_llama_dir}",
                 f"lm_eval.include_path={tasks}", "lm_eval.batch_size=2", "--lm-eval", "tailkd_tiny", "--student",
                 str(tmp_path / "student")]) == 0
    written = json.loads((tmp_path / "student_eval.json").read_text())
    assert written["lm_eval"]["tailkd_tiny"]["exact_match,none"] == 0.5


@pytest.mark.parametrize("override, message", [
    ("generation.answer_regex='(#### '", r"generation.answer_regex '\(#### ' is not a valid regular expression"),
    ("generation.examples=0", r"generation.examples must be > 0"),
    ("generation.max_new_tokens=-1", r"generation.max_new_tokens must be > 0"),
    ("lm_eval.tasks=[gsm8k, gsm8k]", r"lm_eval.tasks must be a list of distinct task names"),
])
def test_bad_generation_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_lm_eval_tasks_without_the_harness_say_what_to_install(monkeypatch):
    import tailkd_ray.config

    monkeypatch.setattr(tailkd_ray.config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'tailkd-ray\[lm-eval\]'"):
        load_config(None, ["lm_eval.tasks=[gsm8k]"])


def test_generation_records_default_to_the_val_corpus_of_a_supervised_format():
    for overrides, records in ((["data.format=prompt_completion"], "v.jsonl"), (["data.format=chat"], "v.jsonl"),
                               (["data.format=jsonl"], None), (["generation.data=g.jsonl"], "g.jsonl")):
        cfg = load_config(None, ["data.val=v.jsonl", *overrides])
        assert cfg.generation.records(cfg.data) == records, overrides
