"""The lmms-eval plugin (`evaluation/lmms_eval_plugin`): `python -m lmms_eval --model chimera|mixpert` on the local task
`chimera_mixpert_lab` over a saved copy of the lab's synthetic data, offline, on tiny saved models.

Marked `lmms`: it needs lmms-eval (`pip install -e ".[dev,lmms]"`, a venv of its own), so the main suite deselects it;
run it with `python -m pytest -m lmms tests/test_lmms_eval_plugin.py`.
"""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chimera_mixpert.data.synthetic import build_dataset, load_dataset, save_dataset
from chimera_mixpert.tiny import build_tiny_chimera, build_tiny_mixpert
from chimera_mixpert.training import pretrained_classes
from train.evaluate import score_rows
from train.quickstart import LAB_METRICS, LAB_QUESTION_KINDS


pytestmark = pytest.mark.lmms

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "evaluation" / "lmms_eval_plugin" / "tasks"
LIMIT = 4
MIXPERT_ROUTING = {"routing_strategy": "direct"}  # the CLI run passes it in --model_args; the reference must follow


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A folder laid out as after `python -m train.quickstart --output_dir runs/quickstart`: the synthetic data's test
    split (4 rows per domain, the lab's question kinds) at `runs/quickstart/data`, where the task YAML looks for it,
    and a tiny saved Chimera (InternVL generalist, 2 experts) and Mixpert (Qwen2-VL base, 2 domains)."""
    folder = tmp_path_factory.mktemp("lmms")
    data = build_dataset({"test": 4}, mixed=0, seed=0, image_size=32, question_kinds=LAB_QUESTION_KINDS)
    save_dataset(data, folder / "runs" / "quickstart" / "data")
    for name, (model, processor) in {"chimera": build_tiny_chimera("internvl"),
                                     "mixpert": build_tiny_mixpert("qwen2_vl", ["chart", "math"])}.items():
        model.save_pretrained(folder / name)
        processor.save_pretrained(folder / name)
    return folder


def load(folder, kind):
    model_class, processor_class = pretrained_classes(kind)
    model = model_class.from_pretrained(folder / kind).eval()
    processor = processor_class.from_pretrained(folder / kind, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    return model, processor


def prompt(processor, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@torch.no_grad()
def reference_answers(folder, kind, rows, batch_size=2):
    """Greedy `model.generate` answers, written out here without the plugin: the task's generation settings
    (16 new tokens, greedy, cut at the first newline), in the batches lmms-eval forms (`--batch_size 2`, rows in
    order)."""
    model, processor = load(folder, kind)
    routing = MIXPERT_ROUTING if kind == "mixpert" else {}
    answers = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        inputs = processor(images=[[row["image"].convert("RGB")] for row in batch],
                           text=[prompt(processor, row["question"]) for row in batch], return_tensors="pt",
                           padding=True)
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False, **routing)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers += [text.split("\n")[0] for text in texts]
    return answers


def start_lmms_eval(folder, kind, model_args=""):
    out = folder / f"out-{kind}"
    command = [sys.executable, "-m", "lmms_eval", "--model", kind,
               "--model_args", f"pretrained={folder / kind}{model_args}", "--tasks", "chimera_mixpert_lab",
               "--include_path", str(TASKS), "--batch_size", "2", "--limit", str(LIMIT), "--device", "cpu",
               "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return out, subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)


@pytest.fixture(scope="module", autouse=True)
def cli_processes(lab):
    """Both models through lmms-eval's CLI, started before this module's first test so that the two processes (which
    spend most of their time importing) run while the in-process tests do; `cli_runs` collects them. Mixpert's run
    overrides its routing rule."""
    runs = {kind: start_lmms_eval(lab, kind, ",routing_strategy=direct" if kind == "mixpert" else "")
            for kind in ("chimera", "mixpert")}
    yield runs
    for _, proc in runs.values():
        if proc.poll() is None:  # a test failed before collecting it
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def cli_runs(cli_processes):
    """kind -> (results JSON, logged samples sorted by doc_id)."""
    done = {}
    for kind, (out, proc) in cli_processes.items():
        log, _ = proc.communicate(timeout=600)
        results = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
        # lmms-eval 0.7.3 exits 0 even when the evaluation failed: the results file is the proof it ran
        assert proc.returncode == 0 and len(results) == 1, log[-6000:]
        samples = glob.glob(str(out / "**" / "*_samples_chimera_mixpert_lab.jsonl"), recursive=True)
        with open(samples[0]) as f:
            logged = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
        with open(results[0]) as f:
            done[kind] = json.load(f), logged
    return done


def _instance(request_type, args, doc_id):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=request_type, arguments=args, idx=0,
                    metadata={"task": "lab", "doc_id": doc_id, "repeats": 1})


@torch.no_grad()
def test_generate_until_settings_and_order(lab):
    """Requests with different generation settings are batched per setting and answered in the requests' order;
    `max_new_tokens` and `until` are honoured; keys generate() does not take are ignored."""
    from evaluation.lmms_eval_plugin.models import Chimera

    test = load_dataset(lab / "runs" / "quickstart" / "data")["test"]
    model, processor = load(lab, "chimera")

    def answers(rows, max_new_tokens):
        inputs = processor(images=[[test[i]["image"].convert("RGB")] for i in rows],
                           text=[prompt(processor, test[i]["question"]) for i in rows], return_tensors="pt",
                           padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    long_02, short_1 = answers([0, 2], 5), answers([1], 3)
    stop = long_02[1][2:4]  # a piece of doc 2's uncut answer: the cut must happen
    assert stop and len(long_02[1].split(stop)[0]) < len(long_02[1])
    first = {"until": [stop], "max_new_tokens": 5, "temperature": 0}
    second = {"max_new_tokens": 3, "do_sample": False, "image_aspect_ratio": "pad"}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    requests = [_instance("generate_until", (test[i]["question"], kwargs, visual, i, "lab", "test"), i)
                for i, kwargs in ((0, first), (1, second), (2, first))]
    lm = Chimera(pretrained=str(lab / "chimera"), batch_size=2, device="cpu")
    lm.task_dict = {"lab": {"test": test}}
    got = lm.generate_until(requests)
    assert got == [long_02[0].split(stop)[0], short_1[0], long_02[1].split(stop)[0]]


@torch.no_grad()
def test_loglikelihood_matches_the_logits(lab):
    """`loglikelihood` (multiple-choice tasks) in batches of 2, left-padded, against the log-probabilities of each
    choice computed one request at a time from the model's logits."""
    from evaluation.lmms_eval_plugin.models import Mixpert

    test = load_dataset(lab / "runs" / "quickstart" / "data")["test"]
    docs = [i for i in range(len(test)) if len(test[i]["choices"]) > 1][:2]
    lm = Mixpert(pretrained=str(lab / "mixpert"), batch_size=2, device="cpu", **MIXPERT_ROUTING)
    lm.task_dict = {"lab": {"test": test}}
    requests = [_instance("loglikelihood", (test[i]["question"], choice, lambda doc: [doc["image"]], i, "lab", "test"),
                          i) for i in docs for choice in test[i]["choices"]]
    got = lm.loglikelihood(requests)

    model, processor = load(lab, "mixpert")
    expected = []
    for request in requests:
        question, choice, _, doc_id, _, _ = request.args
        image = [[test[doc_id]["image"].convert("RGB")]]
        context = processor(images=image, text=[prompt(processor, question)], return_tensors="pt")
        whole = processor(images=image, text=[prompt(processor, question) + choice], return_tensors="pt")
        n = whole["input_ids"].shape[1] - context["input_ids"].shape[1]
        logprobs = model(**whole, **MIXPERT_ROUTING).logits[0, -n - 1 : -1].float().log_softmax(-1)
        target = whole["input_ids"][0, -n:]
        greedy = bool((logprobs.argmax(-1) == target).all())
        expected.append((logprobs.gather(-1, target[:, None]).sum().item(), greedy))
    assert len(got) == len(requests) == 4
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert all(isinstance(g[0], float) and g[0] < 0 for g in got)


def test_registered_and_bad_arguments(lab):
    from lmms_eval.models import get_model

    from evaluation.lmms_eval_plugin.models import Chimera, Mixpert

    assert get_model("chimera") is Chimera and get_model("mixpert") is Mixpert  # through the setup.py entry point
    with pytest.raises(ValueError, match=r"holds a 'chimera' model \(use --model chimera\)"):
        Mixpert(pretrained=str(lab / "chimera"), device="cpu")
    with pytest.raises(ValueError, match="routing_strategy / routing_threshold are Mixpert options"):
        Chimera(pretrained=str(lab / "chimera"), routing_strategy="direct")
    with pytest.raises(ValueError, match="routing_strategy='best': use direct, score_threshold or score_difference"):
        Mixpert(pretrained=str(lab / "mixpert"), routing_strategy="best")
    with pytest.raises(TypeError, match=r"unknown --model_args \['temprature'\]"):
        Chimera(pretrained=str(lab / "chimera"), temprature=0)
    with pytest.raises(ValueError, match="takes an integer batch size"):
        Chimera(pretrained=str(lab / "chimera"), batch_size="auto")
    with pytest.raises(ValueError, match="needs --model_args pretrained="):
        Chimera()
    lm = Chimera(pretrained=str(lab / "chimera"), device="cpu")
    lm.task_dict = {"lab": {"test": [{"video": "clip.mp4"}]}}
    video = _instance("generate_until", ("What happens?", {"until": ["\n"]}, lambda doc: [doc["video"]], 0, "lab",
                                         "test"), 0)
    with pytest.raises(ValueError, match=r"lab \(test, doc 0\): visual 0 is str 'clip.mp4'; --model chimera takes "
                                         "images only"):
        lm.generate_until([video])


@pytest.mark.parametrize("kind", ["chimera", "mixpert"])
def test_lmms_eval_cli_matches_generate(lab, cli_runs, kind):
    results, logged = cli_runs[kind]
    rows = [dict(row) for row in load_dataset(lab / "runs" / "quickstart" / "data")["test"].select(range(LIMIT))]
    expected = reference_answers(lab, kind, rows)

    assert [s["doc_id"] for s in logged] == list(range(LIMIT))
    assert [s["target"] for s in logged] == [row["answer"] for row in rows]
    assert [s["filtered_resps"] for s in logged] == [a.strip() for a in expected]
    assert results["n-samples"]["chimera_mixpert_lab"] == {"original": 24, "effective": LIMIT}
    # the metric: the lab's own scoring (`train.evaluate.score_rows`) of the reference answers, per row and domain
    per_row = [score_rows([row], [answer.strip()], LAB_METRICS)[row["domain"]]["score"]
               for row, answer in zip(rows, expected)]
    metrics = results["results"]["chimera_mixpert_lab"]
    assert metrics["lab_score,none"] == pytest.approx(sum(per_row) / LIMIT)
    for row, value in zip(rows, per_row):  # the first 4 rows are one per domain: chart, table, math, document
        assert metrics[f"lab_{row['domain']},none"] == pytest.approx(value)
    assert [s["lab_score"] for s in logged] == per_row
