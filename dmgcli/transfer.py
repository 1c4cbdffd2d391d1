"""Network transfers: HTTP(S) with resume, retries, a progress deadline and a size cap, and
Google Drive through gdown.

- `download_url`: a progress bar, resume of a partial `<name>.part` file through an HTTP
  Range request, and a bounded number of retries. `timeout` bounds progress, not single
  reads: a transfer that brings fewer than MIN_PROGRESS bytes in `timeout` seconds fails
  (a server sending one byte a second would otherwise never time out). A transfer longer
  than `max_bytes` (a stream without Content-Length that never ends) is stopped; so is one
  that fills the disk. Both remove their `.part` and are not retried.
- `download_gdrive`: Google Drive files through the maintained `gdown` library (Drive's
  confirmation pages and cookies are its business, not ours).
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from .errors import DmgError, disk_full

NET_CHUNK = 1 << 16  # bytes per network read at most: what arrived before a cut-off is kept for the resume
MIN_PROGRESS = 16 << 10  # bytes that must arrive in each `timeout` seconds, or the transfer counts as stalled
MAX_DOWNLOAD = 64 * 10**9  # bytes: the most one download may take unless its caller knows better
DEAD_LINK_STATUS = (401, 403, 404, 410)  # retrying will not help


def parse_url(text: str):
    """urlparse, with a malformed URL (`http://[::1/x`: an unclosed IPv6 bracket, a bad port) as one line."""
    try:
        parts = urlparse(str(text))
        parts.port  # noqa: B018 - parsing the port is what validates it
    except ValueError as exc:
        raise DmgError(f"{text}: not a valid URL ({exc})") from None
    return parts


def is_url(text: str) -> bool:
    return str(text).lower().startswith(("http://", "https://")) and parse_url(text).scheme in ("http", "https")


def url_basename(url: str) -> str:
    """The file name a URL points at (`.../PACS.zip?dl=1` -> `PACS.zip`)."""
    return unquote(PurePosixPath(parse_url(url).path).name) or "download"


class _Incomplete(Exception):
    """The connection ended before the announced number of bytes arrived, or stalled."""


class _Final(Exception):
    """A failure retrying cannot help: a dead link, a malformed URL, a size cap, a full disk."""


def download_url(url: str, dest: Path, retries: int = 3, timeout: float = 60.0, hint: str = "",
                 backoff: float = 1.0, max_bytes: int | None = MAX_DOWNLOAD) -> Path:
    """Download `url` to `dest`, resuming `dest.part` and retrying up to `retries` times.

    Returns dest. A complete transfer is renamed from `<dest>.part` to dest, so a file at
    dest is always whole. Failure raises one DmgError line ending with `hint`. max_bytes:
    the most the file may take (None: no cap; a full disk still stops it).
    """
    import requests
    import urllib3

    parse_url(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    reason = ""
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout, max_bytes)
            os.replace(part, dest)
            return dest
        except _Final as exc:
            reason = str(exc)
            break
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                requests.exceptions.MissingSchema) as exc:
            raise DmgError(f"{url}: not a valid URL ({short_reason(exc)})") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, _Incomplete, OSError) as exc:
            if disk_full(exc):
                _remove(part)
                raise DmgError(f"disk full while downloading {url} to {dest.parent} (ENOSPC); free some space and "
                               f"run again; the partial download was removed") from None
            reason = short_reason(exc)
            if attempt < retries:
                time.sleep(backoff * 2 ** attempt)
    tries = "" if reason.startswith(("HTTP", "larger")) else f" after {retries + 1} tries"
    raise DmgError(f"could not download {url}{tries} ({reason}); {hint}".rstrip("; "))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


NETWORK_REASONS = (  # fragments of requests/urllib3 messages -> what they mean, in a few words
    ("Failed to resolve", "host not found: offline?"), ("Name or service not known", "host not found: offline?"),
    ("Connection refused", "connection refused"), ("timed out", "timed out"),
    ("Network is unreachable", "network unreachable: offline?"),
)


def short_reason(exc: BaseException) -> str:
    """A network error in a few words (requests' own messages run to several hundred characters)."""
    text = str(exc)
    if isinstance(exc, _Incomplete):
        return text
    for fragment, reason in NETWORK_REASONS:
        if fragment in text:
            return reason
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:200]}".rstrip(": ")


def _transfer(url: str, part: Path, timeout: float, max_bytes: int | None) -> None:
    """One attempt: continue `part` from its current size (Range) or start it afresh."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    # identity: a compressed transfer would not match Content-Length or byte ranges
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416:  # nothing after `have`: complete if the server's length says so
            total = _range_total(response.headers.get("Content-Range", ""))
            if total == have:
                return
            part.unlink()
            raise _Incomplete(f"server refused to resume at byte {have}")
        if response.status_code in DEAD_LINK_STATUS:
            raise _Final(f"HTTP {response.status_code}")
        response.raise_for_status()
        if response.status_code == 206 and _range_start(response.headers.get("Content-Range", "")) == have:
            mode = "ab"
        else:  # the server ignored the Range header: start over
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None and length.isdigit() else None
        if max_bytes is not None and total is not None and total > max_bytes:
            _remove(part)
            raise _Final(f"larger than the {max_bytes / 1e9:g} GB a download may take: {total / 1e9:.1f} GB")
        with open(part, mode) as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=part.name[:-5], leave=False) as bar:
            for chunk in _progressing(response.raw, timeout):
                if max_bytes is not None and fh.tell() + len(chunk) > max_bytes:
                    fh.close()
                    _remove(part)
                    raise _Final(f"larger than the {max_bytes / 1e9:g} GB a download may take (the server "
                                 f"announced no length); the partial download was removed")
                fh.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Incomplete(f"got {size} of {total} bytes")


def _progressing(raw, timeout: float):
    """The body's chunks as they arrive; _Incomplete when a `timeout`-second window brings fewer than
    MIN_PROGRESS bytes. read1 returns what one socket read brought (each read itself times out after
    `timeout`), so the clock is checked at least that often, however slowly the bytes trickle in."""
    read = getattr(raw, "read1", raw.read)  # urllib3 >= 2.3 has read1; read fills the whole chunk first
    window_start, window_bytes = time.monotonic(), 0
    while chunk := read(NET_CHUNK, decode_content=True):
        yield chunk
        window_bytes += len(chunk)
        now = time.monotonic()
        if window_bytes >= MIN_PROGRESS:
            window_start, window_bytes = now, 0
        elif now - window_start > timeout:
            raise _Incomplete(f"stalled: {window_bytes} bytes in {now - window_start:.0f} s (download.timeout)")


def _range_start(content_range: str) -> int | None:
    """`bytes 100-199/200` -> 100."""
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _range_total(content_range: str) -> int | None:
    """`bytes */200` or `bytes 100-199/200` -> 200."""
    try:
        return int(content_range.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


def host_resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def is_gdrive(text: str) -> bool:
    return is_url(text) and parse_url(text).netloc in ("drive.google.com", "docs.google.com")


def download_gdrive(source: str, dest: Path, retries: int = 3, timeout: float = 60.0, hint: str = "") -> Path:
    """Download a Google Drive file (an id or a Drive URL) with gdown, which resumes and retries itself."""
    import gdown

    dest.parent.mkdir(parents=True, exist_ok=True)
    where = {"url": source} if is_url(source) else {"id": source}
    # Offline (the host does not resolve), retrying cannot help and gdown's retry lines would
    # bury the one line below that says what to do: one quiet attempt instead.
    offline = not host_resolves(parse_url(source).netloc if is_url(source) else "drive.google.com")
    try:
        out = gdown.download(**where, output=str(dest), quiet=offline, resume=True, retries=0 if offline else retries,
                             timeout=timeout)
    except Exception as exc:  # gdown raises its own, requests' and OS errors alike
        if disk_full(exc):
            raise DmgError(f"disk full while downloading {dest.name} from Google Drive to {dest.parent} (ENOSPC); "
                           f"free some space and run again") from None
        raise DmgError(f"could not download {dest.name} from Google Drive ({source}: {short_reason(exc)}); "
                       f"{hint}".rstrip("; ")) from None
    if not out or not dest.exists():
        raise DmgError(f"could not download {dest.name} from Google Drive ({source}); {hint}".rstrip("; "))
    return dest
