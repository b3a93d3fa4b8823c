"""What the MPI test scripts of tests/python/ share (distributed_mpi.py, distributed_snapshot_mpi.py):
the skip when mpi4py or MPI in membank is missing (exit 77), the communicator, and a counted check
that raises on its rank (each script turns a failure into MPI_Abort: no rank hangs)."""
import sys
import traceback

try:
    from mpi4py import MPI
except ImportError:
    print("SKIPPED: mpi4py is not installed (apt-get install python3-mpi4py)")
    sys.exit(77)

import membank as mb  # noqa: E402

if not mb.has_mpi:
    print("SKIPPED: membank was built without MPI (MEMBANK_MPI=OFF)")
    sys.exit(77)

comm = MPI.COMM_WORLD
R, RANK = comm.size, comm.rank
checks = 0


def check(ok, what):
    """Counts a check; raises AssertionError naming the rank when it fails."""
    global checks
    checks += 1
    if not ok:
        raise AssertionError(f"[rank {RANK} of {R}] {what}")


def total_checks():
    """Every rank's count of checks, summed (collective)."""
    return comm.allreduce(checks)


def run(main):
    """main(), with any failure printed and the whole job aborted (MPI_Abort): never a hang."""
    try:
        main()
    except BaseException:  # noqa: B902 -- any failure ends every rank
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
