"""Download steps every adapter shares: take a local copy or fetch an archive, unpack it
safely, check it against MANIFEST.json and move it into data/raw/<dataset>/.

Raw folders have one layout, whatever the source looked like:

  data/raw/<dataset>/images/<domain>/<class>/<file>   paths of the split lists are relative to images/
  data/raw/<dataset>/splits/...                       split lists
  data/raw/<dataset>/MANIFEST.json                    sha256 of every file above and of each archive
  data/raw/<dataset>/downloads/                       transfers in progress (`.part`); removed on success
"""
from __future__ import annotations

from pathlib import Path

from ..archives import replace_dir, safe_extract, safe_extract_tar
from ..errors import DmgError
from ..fetch import Manifest, copy_file, copy_tree, sha256_file, subtree
from ..params import DownloadParams
from ..transfer import MAX_DOWNLOAD, download_gdrive, download_url, is_gdrive, is_url, url_basename

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def say(message: str) -> None:
    print(message, flush=True)


def local_source(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DmgError(f"--from {source}: no such file or folder")
    return path


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith((".zip", *TAR_SUFFIXES))


# The most one archive of a dataset can expand to (PACS: 0.2 GB; DomainNet's largest domain, real: 6 GB);
# more means a wrong or malicious file (--allow-large overrides). Other datasets: the ratio check only.
# A download is capped likewise (an archive is no larger than what it holds), else at MAX_DOWNLOAD.
MAX_EXTRACTED = {"pacs": 5 * 10**9, "domainnet": 50 * 10**9}


def download_cap(dataset: str, allow_large: bool) -> int | None:
    """The most one download of `dataset` may take (None: no cap, --allow-large; a full disk still stops it)."""
    return None if allow_large else MAX_EXTRACTED.get(dataset, MAX_DOWNLOAD)


def unpack(local: Path, stage: Path, manifest: Manifest, name: str = "unpacked",
           allow_large: bool = False) -> tuple[Path, dict[str, str] | None]:
    """A zip or tar is checked against the manifest and extracted into the stage; a folder is used as is.

    Returns the folder and, for an extracted archive, its files' sha256 (None for a user's folder).
    An archive whose expansion is implausible for the dataset is refused unless `allow_large`.
    """
    if local.is_dir():
        return local, None
    manifest.check_source(local.name, local, str(local))
    unpacked = stage / name
    extract = safe_extract_tar if local.name.lower().endswith(TAR_SUFFIXES) else safe_extract
    return unpacked, extract(local, unpacked, MAX_EXTRACTED.get(manifest.dataset), allow_large)


def install_folder(root: Path, hashes: dict[str, str] | None, base: Path, stage: Path, manifest: Manifest,
                   prefix: str, origin: str) -> int:
    """Check the folder `root` against the manifest and move it to its place; returns its file count.

    `hashes` (paths relative to base) come from extraction, so the folder is already inside
    the stage and is renamed. A user's folder (hashes None) is copied, never moved or linked.
    """
    staged, hashes = stage_folder(root, hashes, base, stage, manifest, prefix, origin)
    replace_dir(staged, manifest.folder / prefix.rstrip("/"))
    return len(hashes)


def stage_folder(root: Path, hashes: dict[str, str] | None, base: Path, stage: Path, manifest: Manifest,
                 prefix: str, origin: str) -> tuple[Path, dict[str, str]]:
    """The folder `root` inside the stage (a user's folder copied there), checked against the manifest:
    the part of `install_folder` that writes, so that a full disk stops a download before it installs anything."""
    if hashes is None:
        copy = stage / ("copy-" + prefix.strip("/").replace("/", "-"))
        hashes, root = copy_tree(root, copy), copy
    else:
        hashes = subtree(hashes, root, base)
    if not hashes:
        raise DmgError(f"{origin}: no files found for {prefix}")
    manifest.check_files(prefix, hashes, origin)
    return root, hashes


def install_file(source: Path, manifest: Manifest, rel: str, origin: str) -> None:
    """Copy one file (a split list) to folder/rel, checked against the manifest first."""
    manifest.check_file(rel, sha256_file(source), origin)
    target = manifest.folder / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy_file(source, target) != manifest.files[rel]:
        raise DmgError(f"{source} changed while it was being copied")


def adopt_or_verify(manifest: Manifest, rel: str) -> bool:
    """True when folder/rel is present and matches the manifest (recording it if unrecorded,
    e.g. a list put there by hand); False when it is missing."""
    path = manifest.folder / rel
    if rel in manifest.files:
        return not manifest.verify(rel)
    if path.is_file():
        manifest.check_file(rel, sha256_file(path), str(path))
        return True
    return False


def discard_download(path: Path, out_dir: Path) -> None:
    """Delete an archive we downloaded ourselves once its contents are in place (a user's own
    file given with --from is never touched)."""
    if path.parent == out_dir / "downloads":
        path.unlink(missing_ok=True)
        if not any(path.parent.iterdir()):
            path.parent.rmdir()


def download_path(out_dir: Path, url: str, name: str) -> Path:
    """Where a download of `url` lands (Drive URLs carry no file name, so `name` is used)."""
    return out_dir / "downloads" / (name if is_gdrive(url) else url_basename(url))


def fetch_archive(url: str, dest: Path, retries: int, timeout: float, hint: str,
                  max_bytes: int | None = MAX_DOWNLOAD) -> Path:
    """A finished download at dest, or `url` (Google Drive through gdown) fetched there."""
    if dest.exists():  # a download that finished earlier, or a file put there by hand
        return dest
    if is_gdrive(url):
        return download_gdrive(url, dest, retries, timeout, hint)
    return download_url(url, dest, retries, timeout, hint, max_bytes=max_bytes)


def archive_or_folder(out_dir: Path, source: str | None, default_url: str, name: str, dataset: str,
                      params: DownloadParams) -> Path:
    """The zip, tar or folder to take a one-archive dataset from: --from, a finished download, or its URL."""
    if source and not is_url(source):
        return local_source(source)
    url = source or default_url
    dest = download_path(out_dir, url, name)
    hint = f"fetch {url} by hand and run `dmg download {dataset} --from PATH/{dest.name}` (or save it as {dest})"
    return fetch_archive(url, dest, params.retries, params.timeout, hint, download_cap(dataset, params.allow_large))
