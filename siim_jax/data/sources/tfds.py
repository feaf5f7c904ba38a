"""A prepared TFDS dataset as a random-access source: `config.data.source = "tfds:<name>"`.

`<name>` is TFDS's `name[/config][:version]` (e.g. `imagenet2012`, `imagenet2012:5.1.0`), read from
`config.data.tfds_data_dir` (a local folder or a bucket path; "" = TFDS's default, `$TFDS_DATA_DIR` or
`~/tensorflow_datasets`), split `config.data.split` (TFDS split syntax: `train`, `train[:10%]`, ...).
Nothing is ever downloaded or built here: the dataset must already be prepared, in a random-access file
format (`array_record`; TFDS also reads `parquet` by index). The default `tfrecord` format is rejected with
the command that adds an `array_record` copy. The whole split is one source; `TwoViewBatches` gives each
process its own disjoint slice of every step (the equivalent of `tfds.split_for_jax_process`, with a global
batch that does not depend on the number of processes).

Reading never imports TensorFlow: TFDS parses the records with NumPy and protobuf, and the image bytes are
returned still encoded (`tfds.decode.SkipDecoding`), so the pipeline decodes them with PIL exactly as it does
files from an image folder, and counts the undecodable ones.

On a bucket (`config.data.tfds_data_dir=gs://...`) the dataset is read in place, nothing is copied: TFDS reads
its metadata through etils epath (gcsfs), and ArrayRecord reads the records with its own GCS reader (riegeli's
GcsReader on google-cloud-cpp, in array-record releases since August 2025; measured with 0.8.6). That reader
finds a GCS emulator through CLOUD_STORAGE_EMULATOR_ENDPOINT, which is set here from STORAGE_EMULATOR_HOST
(siim_jax.storage.point_cpp_clients_at_emulator). Older array-record releases open every path as a local file
("open() failed: No such file or directory; opening gs://..."): the first record is read when the source opens,
and such a failure is one SourceError line telling to upgrade array-record or to copy the dataset to a local
disk (`gcloud storage cp -r`).
"""

import logging
import os

import numpy as np

from siim_jax import storage
from siim_jax.data.sources.base import BadImageError, SourceError, register_source

log = logging.getLogger(__name__)

VALIDATION = "validation"  # ImageNet's name in TFDS


def _first_line(error: BaseException, limit: int = 300) -> str:
    """`error`'s message cut to its first line (TFDS messages can list every registered dataset)."""
    text = str(error).strip().splitlines()
    text = text[0] if text else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _prepared_names(data_dir: str) -> list[str]:
    """Sorted names of the dataset folders directly under `data_dir` (best effort; [] when unreadable)."""
    from etils import epath
    try:
        return sorted(p.name for p in epath.Path(data_dir).iterdir()
                      if p.is_dir() and p.name not in ("downloads",) and not p.name.startswith("."))
    except Exception:  # noqa: BLE001 - a hint only: a missing or unreachable folder lists nothing
        return []


def _prepared_spellings(data_dir: str, base_name: str) -> list[str]:
    """`name[/config]:version` of each prepared copy under `data_dir/base_name` (one with a dataset_info.json)."""
    from etils import epath
    found = []
    try:
        root = epath.Path(data_dir) / base_name
        for info in list(root.glob("*/dataset_info.json")) + list(root.glob("*/*/dataset_info.json")):
            *config, version = os.path.relpath(os.fspath(info.parent), os.fspath(root)).split(os.sep)
            found.append("/".join([base_name, *config]) + ":" + version)
    except Exception:  # noqa: BLE001 - a hint only
        return []
    return sorted(found)


class TfdsSource:
    """Examples of one split of a prepared TFDS dataset, by index.

    `read(i)` -> the encoded image bytes of example i; `label(i)` -> its int class id, or None when the dataset
    has no `label` ClassLabel feature; `describe(i)` -> `"tfds:<name>/<split>[i]"`. The image feature is
    `image_key` when given, else the one named `image`, else the dataset's only Image feature.
    Thread-safe: ArrayRecord readers are shared across threads by design, and parsing builds new objects.
    Raises SourceError (one line naming the bad value and the fix) when the dataset cannot be used;
    `missing_split` replaces the advice to set config.data.split when `split` does not exist (e.g. for a
    validation split, which that setting does not choose).
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str | None = None, missing_split: str | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise SourceError(f"tfds:{name}: {_first_line(e)}; install the TFDS reader with "
                              f"`pip install tensorflow-datasets array-record`") from e
        if data_dir and "://" not in data_dir:
            data_dir = os.path.expanduser(data_dir)
        remote = bool(data_dir) and storage.is_remote(data_dir)
        if remote:
            storage.point_cpp_clients_at_emulator()  # ArrayRecord's GCS reader, before it is first built
        where = data_dir or tfds.core.constants.get_default_data_dir()
        where_hint = ("config.data.tfds_data_dir" if data_dir else
                      "TFDS's default folder (config.data.tfds_data_dir is empty)")
        self.name = f"tfds:{name}"
        self.split = split

        try:  # never downloads: try_gcs=False, and prepared data is only read (download_and_prepare is never called)
            builder = tfds.builder(name, data_dir=data_dir or None, try_gcs=False)
        except tfds.core.registered.DatasetNotFoundError as e:
            base_name = name.split("/")[0].split(":")[0]
            there = _prepared_spellings(where, base_name) or _prepared_names(where)
            listing = f"; prepared there: {', '.join(there[:20])}" if there else "; nothing is prepared there"
            raise SourceError(f"tfds:{name}: no TFDS dataset {name!r} is registered or prepared under {where!r} "
                              f"({where_hint}); check the name (TFDS spells it 'name[/config][:version]', e.g. "
                              f"'imagenet2012'){listing}") from e
        except (ValueError, AssertionError, KeyError, OSError) as e:
            raise SourceError(f"tfds:{name}: cannot open it under {where!r}: {_first_line(e)}") from e

        if not builder.is_prepared():
            storage.require_bucket(where)  # a missing bucket: ObjectStoreError, saying so
            base_name = name.split("/")[0].split(":")[0]
            prepared = _prepared_spellings(where, base_name)
            found = f"; prepared there: {', '.join(prepared)} (name one as tfds:<that>)" if prepared else ""
            raise SourceError(
                f"tfds:{name}: not prepared under {where!r} ({where_hint}): no {os.fspath(builder.data_dir)}"
                f"/dataset_info.json{found}; prepare it beforehand as array_record (nothing is downloaded at run "
                f"time), e.g. `tfds build {name} --data_dir={where} --manual_dir=<folder with the source files> "
                f"--file_format=array_record` (the tfds command line needs `pip install apache-beam mlcroissant`), or "
                f"point config.data.tfds_data_dir at the folder that holds it")

        info = builder.info
        try:
            num_examples = info.splits[split].num_examples
        except (ValueError, KeyError, TypeError) as e:
            if missing_split is not None:
                raise SourceError(f"tfds:{name}: {missing_split}; the dataset prepared under {where!r} has the "
                                  f"splits {sorted(info.splits)}") from e
            raise SourceError(f"tfds:{name}: split {split!r} not available ({_first_line(e)}); set "
                              f"config.data.split to one of {sorted(info.splits)} (TFDS split syntax, e.g. "
                              f"'train' or 'train[:10%]')") from e

        random_access = tfds.core.file_adapters.FileFormat.with_random_access()
        formats = info.available_file_formats()
        if not formats & random_access:
            version_dir = os.fspath(builder.data_dir)
            stored = ", ".join(sorted(f.value for f in formats)) or "an unknown format"
            raise SourceError(
                f"tfds:{name}: prepared under {version_dir!r} as {stored}, which cannot be read by index; add an "
                f"array_record copy beside it once with `pip install apache-beam mlcroissant && tfds convert_format "
                f"--dataset_version_dir={version_dir} --out_file_format=array_record` (the tfds command line needs "
                f"those two packages), or prepare it again with `tfds build {name} --file_format=array_record`")

        features = dict(info.features.items())  # top-level name -> tfds.features.FeatureConnector
        images = {key: f for key, f in features.items() if isinstance(f, tfds.features.Image)}
        if image_key is None:
            if "image" in images:
                image_key = "image"
            elif len(images) == 1:
                image_key = next(iter(images))
        if image_key is None or image_key not in images:
            found = ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items())
            need = (f"an Image feature {image_key!r}" if image_key else
                    "one Image feature (or one named 'image')")
            raise SourceError(f"tfds:{name}: needs {need}; its features are: {found}")
        dtype = np.dtype(images[image_key].np_dtype)
        if dtype.kind != "u":
            raise SourceError(f"tfds:{name}: image feature {image_key!r} holds {dtype} pixels; only 8- or 16-bit "
                              f"integer images can be decoded")
        label = features.get("label")
        self.image_key = image_key
        self.label_key = "label" if isinstance(label, tfds.features.ClassLabel) else None
        self.num_classes = label.num_classes if self.label_key else None

        # every Image feature stays encoded: ours is decoded by the pipeline, the others are never used
        decoders = {key: tfds.decode.SkipDecoding() for key in images}
        try:
            self._records = builder.as_data_source(split=split, decoders=decoders)
        except (ValueError, NotImplementedError, OSError) as e:
            raise SourceError(f"tfds:{name}: cannot read split {split!r} under {where!r}: {_first_line(e)}") from e
        if len(self._records) != num_examples:
            raise SourceError(f"tfds:{name}: split {split!r} lists {num_examples} examples but its files hold "
                              f"{len(self._records)}; prepare the dataset again")
        if remote and len(self._records):
            self._check_remote_reads(name, where)
        log.info("%s/%s: %d examples (%s, from %s), image feature %r, %s", self.name, split, len(self._records),
                 ", ".join(sorted(f.value for f in formats)), os.fspath(builder.data_dir), image_key,
                 f"{self.num_classes} classes" if self.label_key else "no labels")

    def _check_remote_reads(self, name: str, where: str) -> None:
        """Reads the first record of a dataset on an object store: SourceError (one line: upgrade array-record
        or copy the dataset to a local disk) when the installed ArrayRecord cannot read from there."""
        try:
            self._records[0]
        except Exception as e:  # noqa: BLE001 - old array-record: RuntimeError "open() failed ..."
            from importlib.metadata import PackageNotFoundError, version
            try:
                installed = f"array-record {version('array-record')}"
            except PackageNotFoundError:
                installed = "the installed array-record"
            raise SourceError(
                f"tfds:{name}: {installed} cannot read the records under {where!r} ({_first_line(e)}); upgrade it "
                f"(`pip install -U array-record`; releases since August 2025 read gs:// directly, 0.8.6 tested), "
                f"or copy the dataset to a local disk: `gcloud storage cp -r {storage.join(where, name.split('/')[0].split(':')[0])} "
                f"<local folder>/` and set config.data.tfds_data_dir=<local folder>") from None

    def __len__(self) -> int:
        return len(self._records)

    def _example(self, index: int) -> dict:
        try:
            return self._records[index]
        except OSError as e:
            raise BadImageError(f"cannot read record: {e}") from e

    def read(self, index: int) -> bytes:
        """The encoded image bytes (JPEG, PNG, ...) of example `index`."""
        return bytes(self._example(index)[self.image_key])

    def describe(self, index: int) -> str:
        return f"{self.name}/{self.split}[{index}]"

    def label(self, index: int) -> int | None:
        """The class id of example `index`, or None when the dataset has no `label` ClassLabel feature."""
        return None if self.label_key is None else int(self._example(index)[self.label_key])


@register_source("tfds")
def open_tfds(location: str, data_config, seed: int, split: str) -> TfdsSource:
    """Split `config.data.split` of the TFDS dataset `location` for training, its split "validation" for
    validation."""
    if split == "train":
        return TfdsSource(location, data_config.split, data_config.tfds_data_dir)
    return TfdsSource(location, VALIDATION, data_config.tfds_data_dir,
                      missing_split=f"no validation split (looked for the TFDS split {VALIDATION!r})")
