"""The run store (docs/store.md): `layout` (ids, markers, tables), `filesystem` (where the bytes live,
atomic writes, S3 retries), `lease` (one writer at a time) and `run_store` (RunStore, which reads a store as
untrusted input and writes it under the lease)."""
from .filesystem import StoreFiles, retry_transient, s3_filesystem
from .layout import (FORMAT_VERSION, LEASE, MODEL_ID, ROLES, TMP_TAG, StoreConf, StoreError, check_compatible,
                     check_model_id, examples_table, is_model_id, logits_table, marker_problem, parquet_bytes)
from .lease import StoreLease
from .run_store import RunStore

__all__ = ["FORMAT_VERSION", "LEASE", "MODEL_ID", "ROLES", "TMP_TAG", "RunStore", "StoreConf", "StoreError",
           "StoreFiles", "StoreLease", "check_compatible", "check_model_id", "examples_table", "is_model_id",
           "logits_table", "marker_problem", "parquet_bytes", "retry_transient", "s3_filesystem"]
