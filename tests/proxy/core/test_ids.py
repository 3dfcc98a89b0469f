"""The ids clients hold: 128 random bits each, never repeated across threads or a fork."""

from __future__ import annotations

import os
import re
import threading

from proxy.core.ids import new_id, unique_id

HEX_128 = re.compile(r"^resp_[0-9a-f]{32}$")


def test_new_ids_are_128_hex_bits_and_distinct_across_many_refills() -> None:
    ids = [new_id("resp_") for _ in range(10_000)]
    assert all(HEX_128.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_threads_sharing_the_buffer_never_get_the_same_id() -> None:
    found: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(len(found))

    def make(out: list[str]) -> None:
        start.wait()
        out.extend(new_id("") for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(out,)) for out in found]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for out in found for i in out]
    assert len(every) == 40_000 and len(set(every)) == 40_000


def test_a_forked_child_does_not_hand_out_its_parents_next_ids() -> None:
    new_id("")  # the buffer now holds spare ids the child would inherit
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.close(read)
        os.write(write, " ".join(new_id("") for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [new_id("") for _ in range(3)]
    assert len(child) == 3 and not set(child) & set(parent)


def test_unique_ids_have_the_requested_width() -> None:
    assert re.fullmatch(r"req_[0-9a-f]{24}", unique_id("req_"))
    assert re.fullmatch(r"[0-9a-f]{8}", unique_id(bits=32))
