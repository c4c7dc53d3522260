"""lm-evaluation-harness's `local-completions` model runs a multiple-choice (loglikelihood) task
against the router, and its numbers equal those computed here from the model's own logits.

The task and its data are written here (lm-eval's tasks download theirs, which is unreachable).
lm-eval finds the router's remote tokenizer (`/tokenizer_info`, `/tokenize`), sends each context
and continuation as token ids with `echo` and `logprobs`, and sums the continuation's prompt
logprobs. The reference asks the router for each continuation token on its own, after its prefix,
through the ordinary sampling path: the token forced by `logit_bias` (which logprobs do not see)
and its raw logprob read back.

Usage: lm_eval_loglikelihood.py BASE_URL MODEL  (BASE_URL like http://127.0.0.1:8000/v1)
Exits non-zero with a message when anything is off.
"""

import json
import os
import sys
import tempfile

import requests

QUESTIONS = [
    ("The capital of France is", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("The capital of Italy is", ["Vienna", "Rome", "Athens", "Lisbon"], 1),
    ("Two plus two equals", ["five", "three", "four", "seven"], 2),
    ("The color of the sky on a clear day is", ["green", "blue", "red", "black"], 1),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "Newton", "Pascal"], 0),
    ("The opposite of hot is", ["warm", "loud", "tall", "cold"], 3),
]

TASK = """task: pdserve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def tokenize(server: str, text: str) -> list[int]:
    answer = requests.post(f"{server}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60)
    answer.raise_for_status()
    return answer.json()["tokens"]


def reference(server: str, model: str, context: str, continuation: str) -> tuple[float, bool]:
    """Loglikelihood of `continuation` after `context` and whether greedy decoding gives it, as
    lm-eval splits them: the continuation's tokens are those of the whole after the context's."""
    whole = tokenize(server, context + continuation)
    prefix = tokenize(server, context)
    assert whole[: len(prefix)] == prefix, (whole, prefix)
    total, greedy = 0.0, True
    for at in range(len(prefix), len(whole)):
        token = whole[at]
        body = {"model": model, "prompt": whole[:at], "max_tokens": 1, "temperature": 0, "logprobs": 1,
                "logit_bias": {str(token): 100}}
        answer = requests.post(f"{server}/v1/completions", json=body, timeout=60)
        answer.raise_for_status()
        lp = answer.json()["choices"][0]["logprobs"]
        logprob = lp["token_logprobs"][0]
        total += logprob
        greedy = greedy and logprob >= max(lp["top_logprobs"][0].values()) - 1e-6
    return total, greedy


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    server = base_url.removesuffix("/v1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as scratch:
        data = os.path.join(scratch, "mc.jsonl")
        with open(data, "w") as f:
            for question, choices, answer in QUESTIONS:
                f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
        with open(os.path.join(scratch, "pdserve_mc.yaml"), "w") as f:
            f.write(TASK.format(data=data))
        os.environ["HF_DATASETS_CACHE"] = os.path.join(scratch, "datasets")
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": model, "base_url": f"{base_url}/completions", "num_concurrent": 1,
                        "max_retries": 1, "tokenized_requests": True, "batch_size": 4},
            tasks=["pdserve_mc"],
            task_manager=TaskManager(include_path=scratch),
            log_samples=True,
        )

    samples = sorted(results["samples"]["pdserve_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS), samples
    correct = 0
    for sample, (question, choices, answer) in zip(samples, QUESTIONS):
        assert sample["doc"]["question"] == question, sample["doc"]
        got = [tuple(r[0]) for r in sample["resps"]]
        # The (context, continuation) pairs lm-eval scored: its target delimiter included.
        pairs = [tuple(arguments) for arguments in sample["arguments"]]
        assert [c for _, c in pairs] == [" " + choice for choice in choices], pairs
        want = [reference(server, model, context, continuation) for context, continuation in pairs]
        for (g_ll, g_greedy), (w_ll, w_greedy), choice in zip(got, want, choices, strict=True):
            assert abs(g_ll - w_ll) < 1e-3, (question, choice, g_ll, w_ll)
            assert g_greedy == w_greedy, (question, choice, g_greedy, w_greedy)
        correct += max(range(len(choices)), key=lambda i: want[i][0]) == answer
    acc = results["results"]["pdserve_mc"]["acc,none"]
    assert abs(acc - correct / len(QUESTIONS)) < 1e-9, (acc, correct)
    print(f"lm-eval loglikelihood ok: acc {acc:.3f} on {len(QUESTIONS)} questions, every loglikelihood as computed")


if __name__ == "__main__":
    main()
