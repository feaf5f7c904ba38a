"""Every path a command reads or writes, on a file system or an object store (`gs://`, and whatever else fsspec
has a backend for installed, e.g. `s3://` with s3fs): one module, on fsspec (gcsfs for `gs://`).

Orbax (checkpoints) and TFDS reach the same object store through etils epath and TensorStore. Importing siim_jax
sets EPATH_USE_TF=false (unless set): epath then goes through gcsfs too, not tf.io.gfile, which ignores the
emulator variables below; with STORAGE_EMULATOR_HOST set, gcsfs's bucket-type probe (a gRPC API no emulator has)
is switched off.

A local GCS server is found through the libraries' standard variables alone:
    STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT      gcsfs, google-cloud-storage (lock, TensorBoard)
    TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT   TensorStore (the checkpoint arrays)
    GOOGLE_AUTH_TOKEN_FOR_TESTING=any                TensorStore without credentials
    CLOUD_STORAGE_EMULATOR_ENDPOINT=http://...       ArrayRecord's reader (TFDS records); set from
                                                     STORAGE_EMULATOR_HOST when absent (point_cpp_clients_at_emulator)

Objects are written whole (an upload either lands or does not), so `write_text` is atomic on both kinds of path.
Transient object-store errors are retried by the clients (gcsfs: 6 tries with backoff; google-cloud-storage and
TensorStore: their default retry policies); what remains reaches the commands as ObjectStoreError, one line.
"""

import contextlib
import logging
import os
import shutil
import tempfile

from siim_jax.cli import RunError

# gcsfs logs each retry and each fallback (moveTo -> copy + delete) with a traceback; the one error line that
# matters is ObjectStoreError's
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


class ObjectStoreError(RunError, OSError):
    """The object store refused or could not be reached; the message names the path, the cause and the fix.
    `store_kind`: classify_error's word for the cause ('unreachable', 'permission', ...), None when not known."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.store_kind = kind


def is_remote(path) -> bool:
    return "://" in str(path)


def absolute(path) -> str:
    """A local path made absolute; a URL unchanged (less trailing slashes)."""
    path = str(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base, *parts) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(str(p).strip("/") for p in parts)])
    return os.path.join(base, *parts)


def parent(path) -> str:
    path = absolute(path)
    return path.rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(path)


def _fs(path):
    import fsspec
    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as error:
        scheme = str(path).split("://", 1)[0]
        raise ObjectStoreError(f"{path}: no storage backend for '{scheme}://' ({error}); gs:// needs gcsfs "
                               "(a siim_jax dependency), s3:// needs `pip install s3fs`") from None


@contextlib.contextmanager
def object_store_errors(path):
    """Turns what an object store raises (missing bucket, no permission, no credentials, no answer) into one
    ObjectStoreError line naming `path`; local paths pass through unchanged."""
    if not is_remote(path):
        yield
        return
    try:
        yield
    except Exception as error:  # noqa: BLE001 - gcsfs, google-auth, aiohttp and TensorStore raise many kinds
        if hasattr(error, "store_kind"):  # ObjectStoreError, CheckpointWriteError: described already
            raise
        message = describe_error(error)
        if message is None:
            raise
        raise ObjectStoreError(f"{path}: {message}", classify_error(error)) from None


def classify_error(error: BaseException) -> str | None:
    """'permission', 'credentials', 'missing', 'unreachable' or 'other' for an object-store failure; None when
    `error` did not come from an object-store client."""
    if hasattr(error, "store_kind"):  # ObjectStoreError, CheckpointWriteError: already classified
        return error.store_kind
    name = type(error).__name__
    module = type(error).__module__ or ""
    text = str(error)
    status = getattr(error, "code", None)
    status = status if isinstance(status, int) else None
    if status in (401, 403) or "Forbidden" in name or "PERMISSION_DENIED" in text or " 403" in text[:80]:
        return "permission"
    if "DefaultCredentialsError" in name or "RefreshError" in name or "credentials were not found" in text:
        return "credentials"
    if (status is not None and status >= 500 or isinstance(error, (ConnectionError, TimeoutError))
            or "aiohttp" in module or "Connect" in name or "Timeout" in name or "ServiceUnavailable" in name
            or "UNAVAILABLE" in text or "DEADLINE_EXCEEDED" in text or "Couldn't connect" in text):
        return "unreachable"
    if status == 404 or isinstance(error, FileNotFoundError) or "NotFound" in name or "NOT_FOUND" in text:
        return "missing"
    if "gcsfs" in module or "google" in module or "tensorstore" in module or "fsspec" in module:
        return "other"
    return None


def describe_error(error: BaseException) -> str | None:
    """One line for an object-store failure (with what to do), or None when `error` is not one."""
    if hasattr(error, "store_kind"):  # ObjectStoreError, CheckpointWriteError: described already
        return str(error)
    kind = classify_error(error)
    text = " ".join(str(error).split())[:300]
    if kind == "permission":
        return (f"permission denied ({text}); give the account running this (on a TPU VM: its service account) "
                "roles/storage.objectAdmin on the bucket")
    if kind == "credentials":
        return (f"no usable credentials ({text}); run `gcloud auth application-default login`, or run on a VM "
                "whose service account can use the bucket")
    if kind == "unreachable":
        return (f"the object store did not answer after retries ({type(error).__name__}: {text}); check the network "
                "(and STORAGE_EMULATOR_HOST if you use an emulator), then rerun: the run resumes from its newest "
                "intact checkpoint")
    if kind == "missing":
        return (f"not found ({text}); check the bucket and path exist (`gcloud storage ls`), or create the "
                "bucket: `gcloud storage buckets create gs://BUCKET`")
    if kind == "other":
        return f"{type(error).__name__}: {text}"
    return None


def exists(path) -> bool:
    fs, p = _fs(path)
    with object_store_errors(path):
        return fs.exists(p)


def isdir(path) -> bool:
    fs, p = _fs(path)
    with object_store_errors(path):
        return fs.isdir(p)


def isfile(path) -> bool:
    fs, p = _fs(path)
    with object_store_errors(path):
        return fs.isfile(p)


def listdir(path) -> list[str]:
    """Names (not paths) of the entries of a folder; [] when it does not exist."""
    fs, p = _fs(path)
    with object_store_errors(path):
        if not fs.isdir(p):
            return []
        return sorted(os.path.basename(str(e).rstrip("/")) for e in fs.ls(p, detail=False)
                      if str(e).rstrip("/") != p.rstrip("/"))


def require_bucket(path) -> None:
    """Raises ObjectStoreError when `path` is on gs:// and its bucket does not exist: a missing bucket otherwise
    looks like a missing object (exists / isfile / isdir are False). Call it before reporting a path as not
    found. Lists at most one object (what roles/storage.objectViewer allows; reading the bucket's own metadata
    would need more)."""
    if not str(path).startswith("gs://"):
        return
    bucket = str(path)[len("gs://"):].split("/", 1)[0]
    from google.cloud import storage as gcs
    with object_store_errors(path):
        try:
            next(iter(gcs.Client().bucket(bucket).list_blobs(max_results=1)), None)
        except Exception as error:  # noqa: BLE001 - google.api_core.exceptions.NotFound, without importing it
            if classify_error(error) != "missing":
                raise
            raise ObjectStoreError(f"{path}: the bucket gs://{bucket} does not exist; check its name "
                                   f"(`gcloud storage ls`) or create it: `gcloud storage buckets create "
                                   f"gs://{bucket}`") from None


def makedirs(path) -> None:
    """A local folder (and its parents); nothing on an object store (folders there are name prefixes)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path) -> bytes:
    fs, p = _fs(path)
    with object_store_errors(path):
        return fs.cat_file(p)


def read_text(path) -> str:
    return read_bytes(path).decode()


def write_bytes(path, data: bytes) -> None:
    """Writes `data` atomically: a readable `path` is either the old or the new contents, never a part."""
    if is_remote(path):
        fs, p = _fs(path)
        with object_store_errors(path):
            fs.pipe_file(p, data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def append_text(path, text: str) -> None:
    """Appends `text` to a file; an object cannot be appended to, so on an object store the whole object is read
    and rewritten (for small files written rarely: a command's summary record)."""
    if not is_remote(path):
        with open(path, "a") as f:
            f.write(text)
        return
    write_text(path, (read_text(path) if exists(path) else "") + text)


def move(source, destination) -> None:
    """Moves a file or a folder (on an object store: copies every object, then deletes the originals)."""
    if not is_remote(source) and not is_remote(destination):
        shutil.move(source, destination)
        return
    fs, s = _fs(source)
    _, d = _fs(destination)
    with object_store_errors(source):
        fs.mv(s, d, recursive=True)


@contextlib.contextmanager
def local_file(path, suffix: str = ""):
    """A local path with the contents of `path`: itself when local, else a downloaded temporary copy (for
    readers that need a real file: safetensors, torch.load)."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="siim_jax_download_") as folder:
        local = os.path.join(folder, "file" + suffix)
        fs, p = _fs(path)
        with object_store_errors(path):
            fs.get_file(p, local)
        yield local


@contextlib.contextmanager
def writable_local_file(path, suffix: str = ""):
    """A local path to write; on leaving, its file is uploaded to `path` when that is remote (a failed write
    uploads nothing)."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="siim_jax_upload_") as folder:
        local = os.path.join(folder, "file" + suffix)
        yield local
        fs, p = _fs(path)
        with object_store_errors(path):
            fs.put_file(local, p)


def point_cpp_clients_at_emulator() -> None:
    """Readers built on google-cloud-cpp (ArrayRecord's GCS reader, which TFDS uses) find an emulator through
    CLOUD_STORAGE_EMULATOR_ENDPOINT, not STORAGE_EMULATOR_HOST: set the former from the latter when only that is
    set (else they go to the real GCS, and without credentials wait minutes for a metadata server)."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator and not os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = emulator


def forget_clients() -> None:
    """Drops the cached object-store clients (they keep the endpoint they first met): for tests that start a
    new server in the same process."""
    import sys
    if "gcsfs" in sys.modules:
        sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()
    if "etils.epath.backend" in sys.modules:
        sys.modules["etils.epath.backend"].fsspec_backend._get_filesystem.cache_clear()
