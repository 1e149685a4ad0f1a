"""The shared floor every other folder stands on: config and UserError, the run directory and its
atomic writes, storage (local paths and pyarrow/fsspec URIs), the DuckDB catalog, progress bars.
It imports nothing else of featscope's.
"""
