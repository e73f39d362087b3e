"""Reward functions called as TRL calls them, each in a real worker process: every calling form
(positional, TRL keywords reading a `solution` column, None entries, async), weights, the metrics'
names and sums; a worker that is interrupted, meddles with its process or loses its trainer. One
pool of workers serves the module's tests (started once, as a run starts it)."""
import _thread
import dataclasses
import glob
import math
from collections import namedtuple
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from fusedrl.engine.cli.process import interruptible
from fusedrl.engine.errors import UsageError
from fusedrl.engine.stages.rewards.combined import (TOTAL, metric_names, moments,
                                                    open_reward_functions, summary, weighted_totals)
from fusedrl.engine.stages.rewards.functions import (RewardCaller, RewardFunctionError,
                                                     RewardInputs, calling_style, checked_scores,
                                                     load_function, source_of)
from sandbox_testing import left_after

pytestmark = pytest.mark.integration
PromptRow = namedtuple("PromptRow", "prompt columns")  # what the prompt loader gives each row

USER_REWARDS = '''
import asyncio, os, signal, time

def legacy(prompts, responses):
    return [float(len(p) + len(r)) for p, r in zip(prompts, responses)]

def accuracy(prompts, completions, solution, **kwargs):
    return [float(c[0]["content"] == s) for c, s in zip(completions, solution)]

def tool_calls(completions, completion_ids, **kwargs):
    """Applies only to the rows whose response has more than one token."""
    return [float(len(ids)) if len(ids) > 1 else None for ids in completion_ids]

async def judged(prompts, completions, **kwargs):
    await asyncio.sleep(0.01)
    return [0.25 * len(kwargs["solution"][i]) for i in range(len(prompts))]

def slow(prompts, responses):
    time.sleep(60)

def leaves_children(prompts, completions, marker, **kwargs):
    """Forks, starts a strong and a weak sandbox, each holding `marker` in its command line."""
    import sys, threading
    from fusedrl.engine.sandbox import detect, run_python
    hold = f"import os, sys; os.execv(sys.executable, [sys.executable, '-c', " \
           f"'import time; time.sleep(60)', {marker[0]!r}])"
    for isolation in (None, detect("none")):
        threading.Thread(target=run_python, args=(hold,),
                         kwargs=dict(timeout_s=60, isolation=isolation), daemon=True).start()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", marker[0]])
    time.sleep(60)


def meddles(prompts, responses):
    os.chdir("/")
    os.environ["FUSEDRL_MEDDLED"] = "1"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return [0.0] * len(responses)
'''
SPECS = [f"trl_rewards:{name}" for name in ("legacy", "accuracy", "tool_calls", "judged")]
WEIGHTS = [1.0, 2.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """The directory of the module `trl_rewards` (the runs' current directory when opened)."""
    root = tmp_path_factory.mktemp("trl_rewards")
    (root / "trl_rewards.py").write_text(USER_REWARDS)
    return root


def opened(directory, specs, weights=None, isolation="process", timeout_s=30.0):
    """Reward functions opened as a run started in `directory` opens them."""
    here = os.getcwd()
    os.chdir(directory)
    try:
        return open_reward_functions(specs, weights, isolation, timeout_s)
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def pool(user_module):
    functions = opened(user_module, SPECS, WEIGHTS)
    yield functions
    functions.close()


def conversational_rows() -> RewardInputs:
    """Two rows of message-list prompts with a `solution` column."""
    messages = [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "3+3?"}]]
    return RewardInputs(prompts=messages, prompt_texts=["user: 2+2?", "user: 3+3?"],
                        completion_texts=["4", "12"], completion_ids=[[19], [22, 5]],
                        columns={"solution": ["4", "six"]})


def test_every_calling_form_in_worker_processes(pool):
    scores = pool(conversational_rows())
    assert scores == [[11.0, 12.0],    # positional: decoded texts, len(prompt) + len(response)
                      [1.0, 0.0],      # keywords: assistant messages against `solution`
                      [None, 2.0],     # None: not applicable to the first row
                      [0.25, 0.75]]    # async, reading the column through **kwargs
    totals, unscored = weighted_totals(scores, pool.weights)
    # Row 0: 11 + 2 * 1 + 0.25 (tool_calls skipped); row 1: 12 + 0 + 0.5 * 2 + 0.75.
    assert totals == [13.25, 13.75] and unscored == 0
    assert pool.names == ["legacy", "accuracy", "tool_calls", "judged"]


def test_the_thread_form_scores_the_same(user_module, pool):
    in_thread = opened(user_module, SPECS, WEIGHTS, isolation="thread")
    assert in_thread(conversational_rows()) == pool(conversational_rows())


def test_reward_inputs_carry_each_rows_prompt_and_columns():
    from engine_testing import make_tokenizer
    from fusedrl.engine.stages.rollout.reward_scores import reward_inputs
    tokenizer = make_tokenizer()
    prompts = [tokenizer.encode("hello world"), tokenizer.encode("the lazy dog")]
    responses = [tokenizer.encode(" fox"), tokenizer.encode(" jumps over")]
    rows = [PromptRow([{"role": "user", "content": "hello world"}], {"solution": "fox"}),
            PromptRow("the lazy dog", {"solution": "jumps", "level": 2})]
    inputs = reward_inputs(tokenizer, prompts, responses, rows)
    fox, jumps = (tokenizer.decode(r, skip_special_tokens=True) for r in responses)
    assert inputs.prompts == [rows[0].prompt, "the lazy dog"]
    assert inputs.completions() == [[{"role": "assistant", "content": fox}], jumps]
    assert inputs.columns == {"solution": ["fox", "jumps"], "level": [None, 2]}
    assert inputs.completion_ids == responses
    plain = reward_inputs(tokenizer, prompts, responses)  # token ids alone: decoded, no columns
    assert plain.prompts == plain.prompt_texts == [tokenizer.decode(p, skip_special_tokens=True)
                                                   for p in prompts]
    assert plain.columns == {} and plain.completions() == [fox, jumps]


def test_string_prompts_give_string_completions():
    caller = RewardCaller(lambda prompts, completions, **kw: [float(c == "4") for c in completions],
                          "f")
    rows = RewardInputs(["2+2?"], ["2+2?"], ["4"], [[19]])
    assert rows.completions() == ["4"] and caller(rows) == [1.0]


def test_a_column_the_rows_lack_is_named(pool):
    rows = conversational_rows()
    rows.columns = {}
    with pytest.raises(RewardFunctionError,
                       match="accuracy takes 'solution', which the prompt rows do not have"):
        pool(rows)
    assert pool(conversational_rows())[1] == [1.0, 0.0]  # the workers still serve


def test_rows_no_function_applies_to_get_zero():
    assert weighted_totals([[None, 1.0], [None, None]], [1.0, 3.0]) == ([0.0, 1.0], 1)


def test_metrics_are_each_function_and_the_total_over_finite_scores():
    sums = moments(["a", "b"], [[1.0, None, 3.0], [math.nan, 2.0, 2.0]], [1.0, 2.0, 5.0])
    stats = summary({k: 2 * v for k, v in sums.items()})  # two ranks with the same rows
    assert stats["rewards/a/mean"] == 2.0 and stats["rewards/a/std"] == 1.0
    assert stats["rewards/b/mean"] == 2.0 and stats["rewards/b/std"] == 0.0
    assert stats[f"rewards/{TOTAL}/mean"] == pytest.approx(8 / 3)
    assert math.isnan(summary(moments(["c"], [[None]], [0.0]))["rewards/c/mean"])


def test_metric_names_are_short_unless_taken():
    names = metric_names([source_of(s) for s in ["a:acc", "b:acc", "c:fmt", "d:total"]])
    assert names == ["a:acc", "b:acc", "fmt", "d:total"]


def test_calling_style_follows_the_signature():
    assert calling_style(lambda prompts, responses: 0) == "positional"
    assert calling_style(lambda prompts, completions: 0) == "keywords"
    assert calling_style(lambda **kwargs: 0) == "keywords"


def test_return_values_are_checked_not_coerced():
    # NaN is a number: the rollout drops its row.
    assert checked_scores([1, 0.5, None, math.nan], "f", 4)[:3] == [1.0, 0.5, None]
    refused = [("0.5", "returned str '0.5'"), (None, "returned NoneType None"),
               ((s for s in [1.0]), "returned generator"),
               ([1.0, 2.0], "returned 2 scores for 1 responses"),
               (["1.0"], "returned str '1.0' as score 0"),
               ([True], "returned bool True as score 0")]
    for value, message in refused:  # each for one response
        with pytest.raises(RewardFunctionError, match=message):
            checked_scores(value, "f", 1)


def test_weights_are_one_per_function(user_module):
    with pytest.raises(UsageError, match=r"reward.weights has 1 weight\(s\) for 2 reward function"):
        opened(user_module, SPECS[:2], [1.0])


def test_a_file_path_spec_is_absolute_from_the_start(user_module, monkeypatch):
    monkeypatch.chdir(user_module)
    source = source_of("trl_rewards.py:legacy")
    assert source.module == str(user_module / "trl_rewards.py")
    with pytest.raises(UsageError, match="is not a file"):
        source_of("missing.py:legacy")


def test_a_file_named_like_a_module_of_the_process_takes_nothing_of_it(tmp_path, monkeypatch):
    """A reward file json.py (importing helpers.py beside it) loaded in the trainer's process: the
    process's json stays json, sys.path keeps its head, and the file loads once."""
    (tmp_path / "helpers.py").write_text("BONUS = 2.0\n")
    (tmp_path / "json.py").write_text(
        "import helpers\n\ndef score(prompts, responses):\n"
        "    return [helpers.BONUS for _ in responses]\n")
    import json
    monkeypatch.setattr(sys, "path", list(sys.path))  # the worker's own, back after the test
    head = list(sys.path[:3])
    source = source_of(f"{tmp_path / 'json.py'}:score")
    score = load_function(source)
    assert score(["p"], ["r"]) == [2.0]
    assert sys.modules["json"] is json and hasattr(json, "dumps")
    assert sys.path[:3] == head and sys.path[-1] == str(tmp_path)
    assert load_function(source) is score
    assert score.__module__.startswith("fusedrl_reward_json_")


def test_a_local_function_is_refused_for_a_worker_in_one_line(user_module):
    def local(prompts, responses):
        return [0.0] * len(responses)
    with pytest.raises(UsageError, match="cannot be sent to a worker process .*isolation=thread"):
        opened(user_module, [local])


def test_what_a_function_does_to_its_process_stays_there(user_module):
    functions = opened(user_module, ["trl_rewards:meddles"])
    handler, here = signal.getsignal(signal.SIGTERM), os.getcwd()
    try:
        assert functions(conversational_rows()) == [[0.0, 0.0]]
    finally:
        functions.close()
    assert os.getcwd() == here and "FUSEDRL_MEDDLED" not in os.environ
    assert signal.getsignal(signal.SIGTERM) == handler


def test_ctrl_c_reaches_the_trainer_at_once_and_the_worker_ignores_its_own(user_module, pool):
    worker = pool.runners[0].process
    os.kill(worker.pid, signal.SIGINT)  # what a terminal's Ctrl-C would send its process group
    assert pool(conversational_rows())[0] == [11.0, 12.0] and worker.poll() is None
    functions = opened(user_module, ["trl_rewards:slow"])
    try:
        # SIGINT as the `fusedrl` command takes it, also where this process started with it
        # ignored (`pytest ... &`: interrupt_main then does nothing)
        with pytest.raises(KeyboardInterrupt), interruptible():
            threading.Timer(0.3, _thread.interrupt_main).start()
            functions(conversational_rows())
        runner = functions.runners[0]
        assert runner.process is None  # killed, not waited for; the next call starts a fresh one
    finally:
        functions.close()


def test_a_killed_worker_leaves_no_child_sandbox_or_directory(user_module):
    marker = f"fusedrl-leak-probe-{os.getpid()}"
    rows = dataclasses.replace(conversational_rows(), columns={"marker": [marker] * 2})
    functions = opened(user_module, ["trl_rewards:leaves_children"], timeout_s=3.0)
    try:
        worker = functions.runners[0].process.pid
        with pytest.raises(RewardFunctionError, match="leaves_children"):
            functions(rows)
    finally:
        functions.close()
    assert not left_after(marker)  # PR_SET_PDEATHSIG and the pid namespace's end
    assert not glob.glob(f"{tempfile.gettempdir()}/fusedrl-sandbox-{worker}-*")
    assert not glob.glob(f"/sys/fs/cgroup/*/fusedrl-sandbox-{worker}-*") + \
        glob.glob(f"/sys/fs/cgroup/*/*/*/fusedrl-sandbox-{worker}-*")  # v1 here, nested or not


TRAINER = '''
import os, signal, sys
os.chdir(sys.argv[1])
from fusedrl.engine.stages.rewards.functions import source_of
from fusedrl.engine.stages.rewards.workers import start_workers, ProcessRunner
runner = ProcessRunner(source_of("trl_rewards:slow"), 30.0)
start_workers([runner])
print(runner.process.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_worker_dies_with_its_trainer(user_module):
    trainer = subprocess.run([sys.executable, "-c", TRAINER, str(user_module)], capture_output=True,
                             text=True, timeout=120)
    assert trainer.returncode == -signal.SIGKILL, trainer.stderr
    worker = int(trainer.stdout.split()[0])
    for _ in range(100):  # PR_SET_PDEATHSIG delivers at once; the slices allow for a loaded machine
        if not _alive(worker):
            break
        time.sleep(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie left to a container's init is not running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
