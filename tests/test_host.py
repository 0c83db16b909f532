"""host: with freed memory kept, a large block freed and allocated again reuses its pages."""

import os
import subprocess
import sys
import textwrap

import pytest

from dalle_jax import host

pytestmark = pytest.mark.skipif(host._glibc() is None, reason="glibc only")

# Allocates, writes and frees a 64 MB block ten times, as XLA:CPU does with a step's buffers, in
# a thread (XLA's allocations come from its worker threads); prints page faults per round.
PROBE = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from dalle_jax import host
    print(host.from_environment())
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    n = 64 << 20
    def rounds():
        for i in range(11):
            if i == 1:
                rounds.start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(n)
            ctypes.memset(p, 1, n)
            libc.free(p)
        rounds.end = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = threading.Thread(target=rounds)
    t.start(); t.join()
    print((rounds.end - rounds.start) / 10)
""")


def _faults_per_round(env_value):
    env = {k: v for k, v in os.environ.items() if k != host.VARIABLE}
    if env_value is not None:
        env[host.VARIABLE] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    return out[0] == "True", float(out[1])


def test_kept_memory_reuses_a_freed_blocks_pages():
    applied, kept = _faults_per_round("keep")
    assert applied
    pages = (64 << 20) / os.sysconf("SC_PAGE_SIZE")
    for value in (None, "", "default"):  # off unless asked for
        skipped, untouched = _faults_per_round(value)
        assert not skipped
        # glibc's defaults map the block afresh each round (one fault per page, fewer with
        # huge pages); kept, the second round on finds its pages already there.
        assert untouched > 0.5 * pages / 512
        assert kept < 0.01 * untouched
