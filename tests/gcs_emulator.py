"""A local Google Cloud Storage emulator for the tests (`python tests/gcs_emulator.py PORT`):
gcp-storage-emulator, with two things GCS does that it lacks:
- the object generation sent on downloads (`x-goog-generation`): TensorStore, which writes
  Orbax checkpoints, reads it to order updates of OCDBT manifests, and refuses a read without
  it ("Malformed StorageGeneration");
- `objects.move` (POST .../o/SRC/moveTo/o/DST), which gcsfs tries first for a rename: answered
  501, gcsfs retried it with backoff (~30 s per object) before copying and deleting."""

import sys
from http import HTTPStatus

from gcp_storage_emulator import server, settings
from gcp_storage_emulator.exceptions import NotFound
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


def move(request, response, storage, *args, **kwargs):
  bucket, source = request.params["bucket_name"], request.params["object_id"]
  try:
    moved = objects._copy(request.base_url, storage, bucket, source, bucket,  # noqa: SLF001
                          request.params["dest_object_id"])
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  objects._delete(storage, bucket, source)  # noqa: SLF001
  response.json(moved)


server.HANDLERS = tuple(
    (rf"^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
     rf"(?P<dest_object_id>.*[^/]+)$", {server.POST: move})
    for prefix in (settings.API_ENDPOINT, "")) + server.HANDLERS

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main  # (after the patch: its routes take it)
  sys.exit(main(["start", "--host=127.0.0.1", f"--port={sys.argv[1]}", "--in-memory",
                 "--default-bucket=bucket"]))
