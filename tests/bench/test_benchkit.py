"""bench/benchkit.py: ABBA ordering and the process-tree RSS sampler."""

from __future__ import annotations

import os
import subprocess
import sys

import benchkit


def test_alternate_is_abba() -> None:
    assert benchkit.alternate(["a", "b"], 1) == ["a", "b"]
    assert benchkit.alternate(["a", "b"], 3) == ["a", "b", "b", "a", "a", "b"]


def test_tree_rss_counts_children() -> None:
    alone = benchkit.TreeRss(os.getpid())
    alone.sample()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        with_child = benchkit.TreeRss(os.getpid())
        with_child.sample(with_uss=True)
    finally:
        child.kill()
        child.wait()
    assert alone.peak_rss > 0 and alone.peak_processes >= 1
    assert with_child.peak_processes == alone.peak_processes + 1
    assert with_child.peak_rss > alone.peak_rss
    assert with_child.as_dict()["peak_rss_mib"] == round(with_child.peak_rss / 2**20, 1)


def test_tree_rss_of_a_process_that_ended_is_zero() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert benchkit.TreeRss(child.pid).sample() == 0
