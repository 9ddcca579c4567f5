"""Storage: local paths and fsspec URLs (s3://, gs://, az://, hf://, http(s)://) behind one small API.

    is_remote("s3://corp/chat/*.jsonl.zst")              # True: a URL with a protocol other than file://
    fs, path = filesystem("s3://corp/chat")              # an fsspec filesystem and the path inside it
    configure('{"anon": false}')                         # --storage-options, seen by every process of the build

The filesystem's implementation is an extra (`packprep[s3]`: s3fs, `[gcs]`: gcsfs, `[azure]`: adlfs); a missing one
raises an ImportError naming it. Credentials and endpoints come from each store's standard environment (S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ...), and `--storage-options JSON` adds
keyword arguments for the filesystem. `configure` puts those options in the environment
(PACKPREP_STORAGE_OPTIONS), so forked workers and Ray tasks (`ray_executor` passes it on) see the same ones.
Costs: a filesystem is made once per process and protocol (fsspec caches instances); a remote listing or stat is one
request per call.
"""

from __future__ import annotations

import json
import os
import re

ENV = "PACKPREP_STORAGE_OPTIONS"
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
          "adl": "azure", "hf": "hf", "http": None, "https": None}
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
_SECRET = re.compile(r"secret|key|token|password|credential|sas|sig", re.I)


def protocol(url) -> str | None:
    """'s3' for 's3://bucket/key', None for a local path (or file://)."""
    m = _URL.match(str(url))
    return None if m is None or m.group(1).lower() == "file" else m.group(1).lower()


def is_remote(url) -> bool:
    return protocol(url) is not None


def parse_options(text: str | None) -> dict:
    """--storage-options JSON -> a dict (one line naming the problem otherwise)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options is not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--storage-options must be a JSON object of filesystem keyword arguments, got {text!r}")
    return options


def configure(text: str | None) -> None:
    """Make --storage-options the options of every filesystem this process and its workers open."""
    if text:
        parse_options(text)
        os.environ[ENV] = text
    else:
        os.environ.pop(ENV, None)


def options(proto: str) -> dict:
    """The keyword arguments a filesystem of `proto` is made with: --storage-options (a flat object applies to every
    protocol; {"s3": {...}, "gs": {...}} per protocol), and for S3 the endpoint from AWS_ENDPOINT_URL[_S3]."""
    given = parse_options(os.environ.get(ENV))
    if any(k in EXTRAS for k in given) and all(isinstance(v, dict) for v in given.values()):
        given = dict(given.get(proto, {}))
    else:
        given = dict(given)
    if proto in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client = dict(given.get("client_kwargs", {}))
        if endpoint and "endpoint_url" not in given and "endpoint_url" not in client:
            given["endpoint_url"] = endpoint
    return given


def filesystem(url):
    """(fsspec filesystem, path inside it) for a URL or a local path."""
    import fsspec

    proto = protocol(url) or "file"
    try:
        fs = fsspec.filesystem(proto, **(options(proto) if proto != "file" else {}))
    except ImportError as e:
        extra = EXTRAS.get(proto)
        hint = f'pip install "packprep[{extra}]"' if extra else f"install the fsspec implementation of {proto}://"
        raise ImportError(f"{url}: reading {proto}:// needs {e.name or 'its fsspec implementation'}: {hint}") from None
    except ValueError as e:  # fsspec: unknown protocol
        raise ValueError(f"{url}: {e}") from None
    return fs, fs._strip_protocol(str(url))


def join(base: str, name: str) -> str:
    return str(base).rstrip("/") + "/" + name


def url(fs, path: str) -> str:
    """A path inside `fs` back to a URL (`fs.unstrip_protocol`): 'corp/a.jsonl' -> 's3://corp/a.jsonl'."""
    return fs.unstrip_protocol(path)


def redacted(text: str | None) -> str | None:
    """--storage-options with secret-looking values replaced, for the manifest (it travels with the data)."""
    if not text:
        return text

    def scrub(v):
        if isinstance(v, dict):
            return {k: "***" if _SECRET.search(k) and not isinstance(v[k], dict) else scrub(v[k]) for k in v}
        return v

    return json.dumps(scrub(parse_options(text)))


def fingerprint_info(info: dict) -> list:
    """[size, version]: what identifies a remote object's content (ETag, else mtime, else a generation)."""
    version = next((info[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "generation")
                    if info.get(k) is not None), None)
    return [int(info.get("size") or 0), str(version) if version is not None else None]
