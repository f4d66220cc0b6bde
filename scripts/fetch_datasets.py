"""Make the built-in real datasets available offline (run by `make install`).

Placeholder until the real-data loaders land: it only reports what is available.
"""

print("fetch_datasets: nothing to fetch yet")
