"""``fastprompt.train.distributed``'s translation of a collective that failed because another
rank stopped (issue 23, item 10; the real kill under torchrun is in test_class_sharding.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from fastprompt.train.distributed import RankStoppedError, collective_failure

GLOO = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                    "[127.0.0.1]:21120: Connection reset by peer. This is typically caused by a "
                    "remote worker hanging or bugs in the application. GLHF!")


def _ended_child(reap: bool) -> int:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.send_signal(signal.SIGKILL)
    if reap:
        child.wait()
    else:  # left a zombie, as a killed rank is until torchrun's agent reaps it
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    return child.pid


def test_a_peer_lost_is_said_with_the_rank_and_resume():
    host = socket.gethostname()
    me = (host, os.getpid())
    for reap in (True, False):
        error = collective_failure(GLOO, [me, (host, _ended_child(reap))])
        assert isinstance(error, RankStoppedError) and isinstance(error, ValueError)  # exit 2
        message = str(error)
        assert message.startswith("torchrun: rank 1 stopped (its process ended), so rank 0 "
                                  "cannot go on (Read error [127.0.0.1]:21120: Connection reset "
                                  "by peer)")
        assert "--resume" in message and "pair.cc" not in message and "GLHF" not in message
    # A rank on another machine cannot be checked from here: "another rank".
    error = collective_failure(GLOO, [me, ("elsewhere", 1)])
    assert str(error).startswith("torchrun: another rank stopped or cannot be reached")
    timeout = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                           "1800000ms for recv operation to complete")
    assert "another rank" in str(collective_failure(timeout, [me, (host, me[1])]))


def test_other_errors_are_left_alone():
    me = [(socket.gethostname(), os.getpid())]
    assert collective_failure(RuntimeError("CUDA out of memory. Tried to allocate"), me) is None
    assert collective_failure(ValueError("Connection reset by peer"), me) is None
    assert collective_failure(KeyboardInterrupt(), me) is None
