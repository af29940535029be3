"""A local Google Cloud Storage emulator for the tests (`python tests/gcs_emulator.py PORT`):
gcp-storage-emulator, with the object generation sent on downloads as GCS does
(`x-goog-generation`): TensorStore, which writes Orbax checkpoints, reads it to order updates of
OCDBT manifests, and refuses a read without it ("Malformed StorageGeneration")."""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # pylint: disable=broad-except  (not found: the status says so already)
    return
  response["x-goog-generation"] = obj["generation"]
  response["x-goog-metageneration"] = obj["metageneration"]


objects.download = download

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main  # (after the patch: its routes take it)
  sys.exit(main(["start", "--host=127.0.0.1", f"--port={sys.argv[1]}", "--in-memory",
                 "--default-bucket=bucket"]))
