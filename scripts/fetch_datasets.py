"""Make the built-in real datasets available offline (run by `make install`).

A thin wrapper around `cggm fetch` (cggm.data.fetch), with the same arguments, that never fails the
install: a source that cannot be fetched is reported and skipped, and that dataset's loader later
says how to get it. Files go to $CGGM_DATA_DIR (default ~/.cache/cggm).
"""

import sys

try:
    from cggm.data.fetch import main
except ImportError as err:  # the package is not installed yet
    print(f"fetch_datasets: cannot import cggm ({err}); run `pip install -e .` first")
    sys.exit(0)

sys.exit(main(sys.argv[1:], prog="fetch_datasets.py", strict=False))
