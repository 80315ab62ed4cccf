import subprocess
import sys
import threading
import time

import pytest
import torch

from cpu_threads import ThreadChooser, available_cores, busy_seconds

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")


def test_a_pass_leaves_a_core_to_others_while_they_are_busy_and_takes_all_when_they_are_not():
    cores = available_cores()[:2]
    if len(cores) < 2:
        pytest.skip("needs two cores")
    chooser = ThreadChooser(cores, window=0.3)
    chooser.watch(threading.get_ident())
    assert chooser.pick() == 2  # nothing measured yet: torch's default, every core
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.4)
        chooser.pick()  # the window began before the spinner
        time.sleep(0.4)
        assert chooser.pick() == 1 and chooser.others > 0.6  # a core's worth of someone else's work
        busy = chooser.others
    finally:
        spinner.kill()
        spinner.wait()
    time.sleep(0.4)
    chooser.pick()
    assert chooser.others < busy - 0.5
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
