"""jmoe as an lm-evaluation-harness model (``jmoe.eval``), offline.

References: ``jmoe.tasks.addition_accuracy`` on the same items (generation through
lm_eval's own entry point); the exact expectation of LLaDA's estimator, enumerated over
every mask of a short target (the Monte Carlo likelihood); transformers'
``OlmoeForCausalLM`` log-probabilities (the causal likelihood); ``jmoe.generate`` texts
cut by hand (stop strings, ``max_gen_toks``, batching); hand-written chat renderings.
The local tasks are ``tests/eval_tasks`` (YAML + JSONL, loaded from disk).
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # nothing may come from the hub
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

import jmoe
from jmoe import tasks
from jmoe.eval import likelihood
from jmoe.eval.lm import JmoeLM
from jmoe.eval.run import evaluate, lm_eval_cli
from lm_eval.api.instance import Instance

TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_tasks")
N_ITEMS = 50


@pytest.fixture(scope="module")
def model():
    return jmoe.load()


@pytest.fixture(scope="module")
def top1_accuracy(model):
    """``addition_accuracy`` on the local task's items with fixed top-1 experts, a
    setting the model gets only partly right (0.75 on 400 sums); one batch of 50, the
    shape lm_eval's runs below use too (one compiled loop)."""
    acc = tasks.addition_accuracy(model, n=N_ITEMS, seed=1234,
                                  adaptive=jmoe.AdaptiveExperts(initial=1, maximum=1))
    assert 0.3 < acc < 1.0
    return acc


@pytest.fixture(scope="module")
def local_tasks():
    """The local tasks only (indexing lm_eval's own tasks takes about 10 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=TASKS, include_defaults=False)


def _items():
    with open(os.path.join(TASKS, "addition.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_local_task_items_are_the_held_out_sums():
    a, b = tasks.addition_pairs(np.random.default_rng(1234), N_ITEMS, held_out=True)
    items = _items()
    assert [(d["a"], d["b"]) for d in items] == list(zip(a.tolist(), b.tolist()))
    for d in items:
        assert d["answer"] == str(d["a"] + d["b"]) == d["choices"][d["label"]]
        assert len(set(d["choices"])) == 4


def test_generate_task_through_lm_eval_cli_matches_addition_accuracy(top1_accuracy,
                                                                     tmp_path, monkeypatch):
    import functools

    from lm_eval.tasks import TaskManager

    # the CLI's TaskManager without indexing lm_eval's own tasks (about 10 s)
    monkeypatch.setattr(TaskManager, "__init__", functools.partialmethod(
        TaskManager.__init__, include_defaults=False))
    lm_eval_cli(["run", "--model", "jmoe", "--tasks", "jmoe_addition", "--include_path",
                 TASKS, "--model_args", "experts_per_token=1", "--batch_size", "50",
                 "--output_path", str(tmp_path)])
    (path,) = glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)
    with open(path) as f:
        res = json.load(f)
    got = res["results"]["jmoe_addition"]["exact_match,none"]
    assert got == pytest.approx(top1_accuracy, abs=1e-12)
    info = res["config"]["jmoe"]
    assert info["generate_rows"] == N_ITEMS and info["generate_calls"] == 1
    assert info["generate_nfe"] == 6  # the model's 6 steps
    assert info["generate_expert_work"] > 0 and info["loglikelihood_rows"] == 0


# lm_eval's development branch (EleutherAI/lm-evaluation-harness PR #4013, merged
# 2026-08) finds plugin models through the ``lm_eval.models`` entry point group:
# ``lm_eval --model jmoe`` with nothing imported first. 0.4.13 has no such discovery, so
# the first test does by hand the one step it adds (register the entry point's target
# lazily in lm_eval's model registry) and then runs lm_eval's stock command line in a
# fresh interpreter; the second runs the bare ``lm_eval`` executable wherever the
# installed lm_eval discovers plugins itself.
_ENTRY_POINT_RUN = """
import functools, importlib.metadata as md, sys
from lm_eval.api import registry
from lm_eval.tasks import TaskManager
(ep,) = [e for e in md.entry_points(group="lm_eval.models") if e.name == "jmoe"]
if not hasattr(registry, "load_plugins"):  # the discovery step of lm_eval's main
    registry.model_registry.register(ep.name, target=ep.value)
TaskManager.__init__ = functools.partialmethod(TaskManager.__init__,
                                               include_defaults=False)
from lm_eval.__main__ import cli_evaluate
assert not any(m == "jmoe" or m.startswith("jmoe.") for m in sys.modules)
sys.argv = ["lm_eval"] + sys.argv[1:]
cli_evaluate()
assert "jmoe.eval.lm" in sys.modules
"""

_BARE_ARGS = ["--model", "jmoe", "--model_args", "gen_length=8,block_length=8",
              "--tasks", "jmoe_addition", "--include_path", TASKS, "--limit", "4",
              "--batch_size", "4"]


def _run_lm_eval(cmd, tmp_path):
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd + _BARE_ARGS + ["--output_path", str(tmp_path)], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "|jmoe_addition|" in r.stdout.replace(" ", ""), r.stdout[-2000:]
    (path,) = glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)
    with open(path) as f:
        res = json.load(f)
    assert res["config"]["model"] == "jmoe"
    assert res["config"]["jmoe"]["generate_rows"] == 4  # JmoeLM answered the requests


def test_lm_eval_finds_jmoe_through_its_entry_point(tmp_path):
    import sys

    _run_lm_eval([sys.executable, "-c", _ENTRY_POINT_RUN], tmp_path)


def test_bare_lm_eval_command_where_lm_eval_discovers_plugins(tmp_path):
    import shutil
    import sys

    from lm_eval.api import registry

    if not hasattr(registry, "load_plugins"):
        pytest.skip("this lm_eval (<= 0.4.13) discovers no plugin models; its main "
                    "branch does (PR #4013)")
    exe = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    exe = exe if os.path.exists(exe) else shutil.which("lm_eval")
    _run_lm_eval([exe], tmp_path)


def test_multiple_choice_ranks_the_sum_first(local_tasks):
    mc = 16
    res = evaluate(["jmoe_addition_mc"], task_manager=local_tasks,
                   model_args={"mc_num": mc, "mc_batch_size": 16})
    assert res["results"]["jmoe_addition_mc"]["acc,none"] >= 0.9
    info = res["config"]["jmoe"]
    items = _items()
    assert info["loglikelihood_rows"] == 4 * N_ITEMS * mc
    assert info["loglikelihood_calls"] == 4 * N_ITEMS * (mc // 16)
    # every real token of every row routed to top-4 experts in 4 MoE layers
    tokens = sum(len(f"{d['a']}+{d['b']}=") + len(c) for d in items for c in d["choices"])
    assert info["loglikelihood_expert_work"] == tokens * mc * 4 * 4


def _exact_elbo(model, context, target, cfg_scale=0.0):
    """E[LLaDA's estimator] by enumeration: x ~ U{1..n} masked positions, the mask
    uniform among the C(n, x) subsets, score (n / x) * sum of masked log-probs. Also
    the variance of one draw's score."""
    n = len(target)
    mask_id = model.config.mask_token_id
    vals, probs = [], []
    for x in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), x))
        for m in subsets:
            row = list(target)
            for j in m:
                row[j] = mask_id
            logits, _ = jmoe.forward(model, [context + row])
            lg = np.asarray(logits[0, len(context):], np.float64)
            if cfg_scale:  # LLaDA's guidance: the context masked in the unconditional copy
                un, _ = jmoe.forward(model, [[mask_id] * len(context) + row])
                un = np.asarray(un[0, len(context):], np.float64)
                lg = un + (cfg_scale + 1) * (lg - un)
            logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - lg.max(-1, keepdims=True)
            vals.append(n / x * sum(logp[j, target[j]] for j in m))
            probs.append(1.0 / n / len(subsets))
    vals, probs = np.array(vals), np.array(probs)
    mean = float(probs @ vals)
    return mean, float(probs @ (vals - mean) ** 2)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_diffusion_loglikelihood_estimates_the_elbo(model, cfg_scale):
    tok = model.tokenizer
    context, target = tok.encode("57+68="), tok.encode("135")
    mean, var = _exact_elbo(model, context, target, cfg_scale)
    mc = 1024
    (est,) = likelihood.diffusion_loglikelihood(model, [(context, target)], mc_num=mc,
                                                mc_batch_size=128, seed=3,
                                                cfg_scale=cfg_scale)
    # stratified draws: the error is at most the plain Monte Carlo one, 4 sigma here
    assert abs(est - mean) <= 4 * math.sqrt(var / mc) + 1e-9
    # a wrong answer scores lower under the same bound
    (wrong,) = likelihood.diffusion_loglikelihood(model, [(context, tok.encode("136"))],
                                                  mc_num=128, mc_batch_size=128)
    assert wrong < est


def test_mask_draws_are_llada_stratified():
    rng = np.random.default_rng(0)
    for n, b in [(1, 4), (3, 8), (7, 4), (10, 32)]:
        m = likelihood.mask_draws(rng, n, b)
        x = m.sum(1)
        assert m.shape == (b, n) and x.min() >= 1 and x.max() <= n
        # LLaDA's counts: x_i = ((round(k + i * n / b) - 1) mod n) + 1 for one k in 1..n
        ok = [k for k in range(1, n + 1)
              if list(x) == [int((round(k + i * n / b) - 1) % n + 1) for i in range(b)]]
        assert ok, (n, b, x)
    with pytest.raises(ValueError, match="mc_num=30"):
        likelihood.diffusion_loglikelihood(jmoe.load(), [([5], [6])], mc_num=30,
                                           mc_batch_size=8)


def test_causal_loglikelihood_matches_transformers(hf_olmoe):
    import torch

    folder, hf = hf_olmoe()
    m = jmoe.load(str(folder))
    assert m.config.causal
    pairs = [([5, 17, 42], [8, 9]), ([11], [12, 13, 14, 3])]
    got = likelihood.causal_loglikelihood(m, pairs)
    for (c, t), (ll, greedy) in zip(pairs, got):
        with torch.no_grad():
            logits = hf(torch.tensor([c + t])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        want = sum(float(logp[len(c) - 1 + j, t[j]]) for j in range(len(t)))
        assert ll == pytest.approx(want, abs=1e-4)
        pred = logits[len(c) - 1:len(c) - 1 + len(t)].argmax(-1).tolist()
        assert greedy == (pred == t)


def _req(context, gen_kwargs):
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


def test_generate_until_stop_strings_max_gen_toks_and_batching(model):
    prompts = ["123+456=", "7+8=", "99+1=", "2+3=", "250+250=", "17+38=", "3+4=", "60+9="]
    # the default model's answers (rows generate as they would alone; batches of 4 share
    # the compiled loop of the batch-64 run below)
    ref = [None] * 8
    ref[0::2], ref[1::2] = (jmoe.generate(model, prompts[i::2]).texts for i in (0, 1))
    a, b = {"until": ["7", "0"]}, {"until": "5", "max_gen_toks": 1}
    kws = [a, b] * 4  # two groups of four, interleaved
    want = [r.split("7")[0].split("0")[0] if k is a else r[:1].split("5")[0]
            for r, k in zip(ref, kws)]
    assert want[0] != ref[0] and want[2] != ref[2] and want[3] == ""  # the stops cut
    reqs = [_req(p, k) for p, k in zip(prompts, kws)]
    for bs, calls in ((2, 4), (64, 2)):  # groups split 2 + 2, or one call each
        lm = JmoeLM(batch_size=bs)
        assert lm.generate_until(reqs, disable_tqdm=True) == want
        assert lm.get_model_info()["jmoe"]["generate_calls"] == calls
    with pytest.raises(ValueError, match="num_beams=2"):
        lm.generate_until([_req("1+1=", {"num_beams": 2})], disable_tqdm=True)
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood_rolling([])


CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}|"
                 "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}={% endif %}")


def _chat_model(model):
    """The default model with a transformers tokenizer over the same characters that
    carries a chat template (user text, then '=' as the generation prompt)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jmoe.tokenizer import DEFAULT_CHARS, SPECIALS

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({c: i + len(SPECIALS) for i, c in enumerate(DEFAULT_CHARS)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>",
                                   eos_token="<eos>", mask_token="<mask>")
    fast.chat_template = CHAT_TEMPLATE
    assert fast.encode("12+3=") == model.tokenizer.encode("12+3=")
    return model.replace(tokenizer=fast)


def test_chat_conversations_use_the_template(model):
    chat = _chat_model(model)
    plain = jmoe.generate(model, ["123+456=", "7+8="])
    conv = [[{"role": "user", "content": "123+456"}], [{"role": "user", "content": "7+8"}]]
    out = jmoe.generate(chat, conv)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    assert out.texts == plain.texts
    one = jmoe.generate(chat, conv[1])  # one conversation, not a batch
    assert one.texts == plain.texts[1:]
    from jmoe.tokenizer import chat_prompts

    sys_conv = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2"}]
    assert chat_prompts(chat.tokenizer, sys_conv) == ["add|1+2="]
    lm = JmoeLM()
    lm.model = chat
    assert lm.apply_chat_template(sys_conv) == "add|1+2="
    assert lm.chat_template() == CHAT_TEMPLATE and lm.tokenizer_name


def test_models_without_a_chat_template_refuse_chat(model):
    conv = [{"role": "user", "content": "1+2"}]
    with pytest.raises(ValueError, match="no chat template"):
        jmoe.generate(model, conv)
    with pytest.raises(ValueError, match="no chat template"):
        JmoeLM().apply_chat_template(conv)


def test_cli_generate_chat_is_refused_in_one_line(capsys):
    from jmoe.cli import main

    assert main(["generate", "--chat", "1+2", "--system", "s"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no chat template" in err and "\n" not in err


def test_apply_chat_template_through_lm_eval(top1_accuracy, local_tasks):
    import lm_eval

    lm = JmoeLM(experts_per_token=1, batch_size=64)
    chat = _chat_model(lm.model)
    chat.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    lm.model = chat
    res = lm_eval.simple_evaluate(model=lm, tasks=["jmoe_addition"],
                                  task_manager=local_tasks,
                                  apply_chat_template=True)
    assert lm._chat  # lm_eval rendered every context through the template
    assert res["results"]["jmoe_addition"]["exact_match,none"] == pytest.approx(top1_accuracy)


def test_cli_generate_chat_with_a_templated_checkpoint(model, tmp_path, capsys):
    """A checkpoint folder whose tokenizer files carry a chat template (the shipped
    model's weights, a transformers tokenizer over its characters)."""
    import shutil

    from jmoe.cli import main

    folder = tmp_path / "chat_model"
    shutil.copytree(os.path.dirname(jmoe.checkpoint.__file__) + "/default_model", folder,
                    ignore=shutil.ignore_patterns("char_tokenizer.json", "README*"))
    _chat_model(model).tokenizer.save_pretrained(folder)
    assert main(["generate", "--model", str(folder), "--chat", "123+456", "--chat",
                 "7+8"]) == 0
    assert capsys.readouterr().out.split() == jmoe.generate(model, ["123+456=", "7+8="]).texts


def test_cli_eval_prints_the_table_and_the_work(monkeypatch, local_tasks, capsys):
    from jmoe.cli import main
    from jmoe.eval import run

    seen = {}

    def local(tasks, **kw):  # the real evaluation, on the local tasks only
        seen.update(kw)
        kw.pop("include_path")
        return evaluate(tasks, task_manager=local_tasks, **kw)

    monkeypatch.setattr(run, "evaluate", local)
    assert main(["eval", "--tasks", "jmoe_addition", "--include-path", TASKS, "--limit", "5",
                 "--experts-per-token", "2", "--threshold", "0.9",
                 "--model-args", "mc_num=16,seed=3"]) == 0
    out = capsys.readouterr().out
    assert seen["model_args"] == {"experts_per_token": 2, "threshold": 0.9, "mc_num": 16,
                                  "seed": 3} and seen["limit"] == 5
    assert "|jmoe_addition|" in out.replace(" ", "") and "exact_match" in out
    assert "jmoe: generate_rows=5, generate_nfe=" in out
    assert main(["eval", "--tasks", "jmoe_addition", "--limit", "2.5"]) == 2


@pytest.mark.parametrize("args, match", [
    ({"cache_window": "16"}, "cache_window='16'"),
    ({"batch_size": "0"}, "batch_size='0'"),
    ({"experts_per_token": 2, "adaptive": "linear"}, "experts_per_token=2"),
    ({"not_a_field": 1}, "not_a_field"),
    ({"adaptive": "cubic"}, "cubic"),
    ({"experts_per_block": 6, "set_coverage": 1.5}, r"set_coverage=1.5: expected a float in"),
    ({"threshold": 2.0}, "threshold"),
    ({"gen_length": 100}, "max_position_embeddings"),
    ({"mc_num": 30, "mc_batch_size": 8}, "mc_num=30"),
])
def test_bad_model_args_are_refused_in_one_line(args, match):
    with pytest.raises(ValueError, match=match) as e:
        JmoeLM(**args)
    assert "\n" not in str(e.value)


def _llada_greedy(model, context, target):
    """LLaDA's ``suffix_greedy_prediction`` as a plain loop: the target masked, each step
    commits the argmax at the most confident masked position."""
    mask_id = model.config.mask_token_id
    seq = list(context) + [mask_id] * len(target)
    for _ in target:
        logits, _ = jmoe.forward(model, [seq])
        lg = np.asarray(logits[0], np.float64)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        masked = [i for i, t in enumerate(seq) if t == mask_id]
        best = max(masked, key=lambda i: p[i].max())
        seq[best] = int(lg[best].argmax())
    return seq[len(context):] == list(target)


def test_is_check_greedy_follows_llada(model):
    lm = JmoeLM(is_check_greedy=True, mc_num=16)
    pairs = [("123+456=", "579"), ("123+456=", "578"), ("250+250=", "500"),
             ("250+250=", "499")]  # one target length: one compiled greedy loop
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs],
                           disable_tqdm=True)
    tok = model.tokenizer
    want = [_llada_greedy(model, tok.encode(c), tok.encode(t)) for c, t in pairs]
    assert [g for _, g in got] == want and want[0] and not want[1]


def test_scoring_uses_block_sets_and_their_coverage(model):
    # scoring runs jmoe.forward with the model args' set and coverage (the sets
    # themselves are checked against a loop reference in test_expert_sets)
    pairs = [("123+456=", "579")]
    tok = model.tokenizer
    got = {}
    for cov in (1.0, 0.5):
        lm = JmoeLM(experts_per_block=6, set_coverage=cov, mc_num=8)
        (got[cov], _), = lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs],
                                          disable_tqdm=True)
        want = likelihood.diffusion_loglikelihood(
            model, [(tok.encode(c), tok.encode(t)) for c, t in pairs], mc_num=8,
            mc_batch_size=8, forward_kw={"experts_per_block": 6, "set_coverage": cov})
        assert got[cov] == pytest.approx(want[0], rel=1e-6)
    assert got[1.0] != got[0.5]
    with pytest.raises(ValueError, match="set_coverage=0.9 refines block expert sets"):
        JmoeLM(set_coverage=0.9)
