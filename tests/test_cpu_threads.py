import sys
import time

import pytest
import torch

from embed_ft.cpu_threads import ThreadChooser, available_cores, busy_seconds

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")


class OthersAtWork:
    """A counter of the cores' busy seconds in which "others" work at a rate the test sets (cores' worth),
    beside this process's own CPU time: the chooser sees no one else's work on a busy machine."""

    def __init__(self):
        self.rate, self.others, self.at = 0.0, 0.0, time.perf_counter()

    def __call__(self) -> float:
        now = time.perf_counter()
        self.others, self.at = self.others + self.rate * (now - self.at), now
        return self.others + time.process_time()

    def work(self, rate: float) -> None:
        self()
        self.rate = rate


def test_a_pass_leaves_a_core_to_others_while_they_are_busy_and_takes_all_when_they_are_not():
    counter = OthersAtWork()
    chooser = ThreadChooser([0, 1], window=0.3, counter=counter)
    assert chooser.pick() == 2  # nothing measured yet: torch's default, every core
    counter.work(1.0)
    time.sleep(0.4)
    chooser.pick()  # the window began before the others' work
    time.sleep(0.4)
    assert chooser.pick() == 1 and 0.9 < chooser.others < 1.1  # a core's worth of someone else's work
    counter.work(0.0)
    time.sleep(0.4)
    assert chooser.pick() == 2 and chooser.others < 0.1
    counter.work(1.0)
    time.sleep(2)  # a pause longer than four windows: what happened during it is not counted
    assert chooser.pick() == 2 and chooser.others == 0.0


def test_one_core_is_one_thread_and_the_count_is_put_back():
    assert ThreadChooser([0]).pick() == 1
    before = torch.get_num_threads()
    with ThreadChooser([0, 1]).using(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_busy_seconds_grows_while_a_core_works():
    first = busy_seconds(available_cores())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert busy_seconds(available_cores()) - first >= 0.25
    assert busy_seconds([10_000]) == 0  # a core that is not there has done nothing


def test_training_follows_the_free_cores_step_by_step_even_when_a_step_takes_long():
    counter, before = OthersAtWork(), torch.get_num_threads()
    chooser = ThreadChooser([0, 1], window=0.1, counter=counter, pauses=False)
    try:
        assert chooser.follow() == 2 and torch.get_num_threads() == 2
        counter.work(1.0)
        time.sleep(0.6)  # a "step" of six windows: a server's chooser would forget it, training's does not
        assert chooser.follow() == 1 and torch.get_num_threads() == 1
        counter.work(0.0)
        time.sleep(0.6)
        assert chooser.follow() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_train_py_takes_its_threads_from_the_option_then_the_environment_then_the_cores(monkeypatch):
    from embed_ft import train
    from embed_ft.options import Config
    cpu, before = torch.device("cpu"), torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert isinstance(train.thread_chooser(Config(), cpu), ThreadChooser)
        assert train.thread_chooser(Config(threads=1), cpu) is None and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert train.thread_chooser(Config(), cpu) is None
        assert train.thread_chooser(Config(), torch.device("meta")) is None  # not a CPU: nothing to pick
    finally:
        torch.set_num_threads(before)
