"""Stage 1, download: put a dataset's raw files under data/raw/<dataset>/.

Real datasets land in one layout, whatever the source looked like:

  data/raw/<dataset>/images/<domain>/<class>/<file>   paths of the split lists are relative to images/
  data/raw/<dataset>/splits/...                       the split lists
  data/raw/<dataset>/MANIFEST.json                    sha256 of every file above and of each archive
  data/raw/<dataset>/downloads/                       transfers in progress (`.part`); removed on success

Each part (PACS: images, split lists; DomainNet: each domain, each list) is fetched only if
it is not already present and verified against MANIFEST.json, so a second run does nothing
and an interrupted run starts where it stopped.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from dmgcli.datasets import get_dataset, raw_dir
from dmgcli.errors import DmgError
from dmgcli.fetch import (Manifest, copy_file, copy_tree, download_gdrive, download_url, find_files, find_folder,
                          is_gdrive, is_url, replace_dir, safe_extract, sha256_file, staging, subtree, url_basename)
from dmgcli.params import DownloadParams


def download_digits(out_dir: Path, params: DownloadParams) -> Path:
    """The embedded dataset ships inside scikit-learn: copy its data file (no network)."""
    import sklearn.datasets
    from dmgcli.fileio import atomic_path

    source = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    target = out_dir / "digits.csv.gz"
    if target.exists() and target.stat().st_size == source.stat().st_size:
        return target
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


# --------------------------------------------------------------------------- shared steps

def say(message: str) -> None:
    print(message, flush=True)


def local_source(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DmgError(f"--from {source}: no such file or folder")
    return path


def unpack(local: Path, stage: Path, manifest: Manifest) -> tuple[Path, dict[str, str] | None]:
    """A zip is checked against the manifest and extracted into the stage; a folder is used as is.

    Returns the folder and, for an extracted zip, its files' sha256 (None for a user's folder).
    """
    if local.is_dir():
        return local, None
    manifest.check_source(local.name, local, str(local))
    unpacked = stage / "unpacked"
    return unpacked, safe_extract(local, unpacked)


def install_folder(root: Path, hashes: dict[str, str] | None, base: Path, stage: Path, manifest: Manifest,
                   prefix: str, origin: str) -> int:
    """Check the folder `root` against the manifest and move it to its place; returns its file count.

    `hashes` (paths relative to base) come from extraction, so the folder is already inside
    the stage and is renamed. A user's folder (hashes None) is copied, never moved or linked.
    """
    if hashes is None:
        copy = stage / ("copy-" + prefix.strip("/").replace("/", "-"))
        hashes, root = copy_tree(root, copy), copy
    else:
        hashes = subtree(hashes, root, base)
    if not hashes:
        raise DmgError(f"{origin}: no files found for {prefix}")
    manifest.check_files(prefix, hashes, origin)
    replace_dir(root, manifest.folder / prefix.rstrip("/"))
    return len(hashes)


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


# --------------------------------------------------------------------------- PACS

PACS_DRIVE_ID = "1m4X4fROCCXMO0lRLrr6Zz9Vb3974NWhE"  # Dassl's pacs.zip: images/ and splits/*_kfold.txt
PACS_ARCHIVE = "pacs.zip"
PACS_SPLITS = ("train", "crossval", "test")


def pacs_split_names() -> list[str]:
    return [f"{d}_{s}_kfold.txt" for d in get_dataset("pacs").domains for s in PACS_SPLITS]


def download_pacs(out_dir: Path, params: DownloadParams) -> Path:
    """PACS images (any copy whose tree holds the four domain folders) and the official kfold lists."""
    manifest = Manifest(out_dir, "pacs")
    names = pacs_split_names()
    if not manifest.verify("images/") and all(adopt_or_verify(manifest, f"splits/{n}") for n in names):
        manifest.save()
        say(f"pacs: {len(manifest.under('images/'))} images and {len(names)} split lists in {out_dir} "
            f"present and verified against {Manifest.NAME}; nothing to do")
        return out_dir
    with staging(out_dir, "fetch") as stage:
        local = pacs_archive(out_dir, params)
        tree, hashes = unpack(local, stage, manifest)
        domains = set(get_dataset("pacs").domains)
        root = find_folder(tree, domains)
        if root is None:
            raise DmgError(f"{local} holds no folder with the PACS domain folders {', '.join(sorted(domains))}")
        lists = find_pacs_splits(params.splits, tree, local, set(names), frozenset(domains))
        missing = [n for n in names if n not in lists]
        if missing:
            where = params.splits or f"{local} or next to it"
            raise DmgError(f"PACS split lists not found in {where}: {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {len(names)}); pass "
                           f"--splits FOLDER holding the official <domain>_{{train,crossval,test}}_kfold.txt lists")
        for name in names:  # checked before anything is put in place
            manifest.check_file(f"splits/{name}", sha256_file(lists[name]), str(lists[name]))
        count = install_folder(root, hashes, tree, stage, manifest, "images/", str(local))
        for name in names:
            install_file(lists[name], manifest, f"splits/{name}", str(lists[name]))
        manifest.save()
    discard_download(local, out_dir)
    say(f"pacs: {count} files in {out_dir / 'images'} and {len(names)} split lists in {out_dir / 'splits'}, "
        f"sha256 recorded in {manifest.path}")
    return out_dir


def find_pacs_splits(splits: str | None, tree: Path, local: Path, names: set[str],
                     domains: frozenset[str]) -> dict[str, Path]:
    """The kfold lists: in --splits if given; else inside the copy, or beside it (one level down)."""
    if splits:
        return find_files([Path(splits).expanduser()], names, skip=domains)
    beside = find_files([local.parent], names, max_depth=1, skip=domains)
    return {**beside, **find_files([tree], names, skip=domains)}


def pacs_archive(out_dir: Path, params: DownloadParams) -> Path:
    """The zip or folder to take PACS from: --from, a finished download, or Google Drive."""
    if params.source and not is_url(params.source):
        return local_source(params.source)
    source = params.source or f"https://drive.google.com/uc?id={PACS_DRIVE_ID}"
    dest = out_dir / "downloads" / (PACS_ARCHIVE if is_gdrive(source) else url_basename(source))
    if dest.exists():  # a download that finished earlier, or a file put there by hand
        return dest
    hint = f"fetch {source} by hand and run `dmg download pacs --from PATH/{dest.name}` (or save it as {dest})"
    if is_gdrive(source):
        return download_gdrive(source, dest, params.retries, params.timeout, hint)
    return download_url(source, dest, params.retries, params.timeout, hint)


# --------------------------------------------------------------------------- DomainNet

DOMAINNET_URL = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
DOMAINNET_ARCHIVES = {  # path of each domain's zip below DOMAINNET_URL (or a mirror with the same layout)
    "clipart": "groundtruth/clipart.zip", "infograph": "infograph.zip", "painting": "groundtruth/painting.zip",
    "quickdraw": "quickdraw.zip", "real": "real.zip", "sketch": "sketch.zip",
}
DOMAINNET_LISTS = "domainnet/txt/"  # official <domain>_{train,test}.txt below DOMAINNET_URL
TV_SPLITS = ("train", "val", "test")


def download_domainnet(out_dir: Path, params: DownloadParams) -> Path:
    """The six domain archives and the official lists (plus the reference tv_0.9 lists when
    --splits holds them), each fetched only if missing."""
    manifest = Manifest(out_dir, "domainnet")
    domains = get_dataset("domainnet").domains
    source = params.source
    folder = local_source(source) if source and not is_url(source) else None
    if folder is not None and not folder.is_dir():
        raise DmgError(f"--from {source}: for domainnet give the folder holding the domain zips (or the extracted "
                       f"domain folders) and lists, or a mirror URL")
    base = (source.rstrip("/") + "/") if source and is_url(source) else DOMAINNET_URL
    roots = [p for p in (Path(params.splits).expanduser() if params.splits else None, folder) if p is not None]
    official, tv = list_folders(roots, domains)
    fetched = 0
    for domain in domains:
        for split in ("train", "test"):
            fetched += fetch_official_list(f"{domain}_{split}.txt", official, folder, base, manifest, params)
        for split in TV_SPLITS:
            fetched += fetch_tv_list(f"{domain}_{split}.txt", tv, manifest)
    for domain in domains:
        fetched += fetch_domain(domain, folder, base, manifest, params)
    manifest.save()
    summary = f"{len(manifest.under('images/'))} images and {len(manifest.under('splits/'))} lists in {out_dir}"
    if fetched:
        say(f"domainnet: {summary}; {fetched} parts fetched, sha256 recorded in {manifest.path}")
    else:
        say(f"domainnet: {summary} present and verified against {Manifest.NAME}; nothing to do")
    return out_dir


def list_folders(roots: list[Path], domains: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """Folders (roots and their sub-folders, two levels down) holding DomainNet lists.

    A folder with `<domain>_val.txt` files holds tv_0.9 lists (whose `_train` lists are the
    90% part); any other folder with `<domain>_{train,test}.txt` holds official lists.
    """
    official, tv = [], []
    for root in roots:
        level = [root]
        for _ in range(3):
            following = []
            for folder in level:
                names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
                if any(f"{d}_val.txt" in names for d in domains):
                    tv.append(folder)
                elif any(f"{d}_{s}.txt" in names for d in domains for s in ("train", "test")):
                    official.append(folder)
                following += [folder / n for n in sorted(names) if n not in domains and (folder / n).is_dir()]
            level = following
    return official, tv


def fetch_official_list(name: str, official: list[Path], folder: Path | None, base: str, manifest: Manifest,
                        params: DownloadParams) -> int:
    """One official list: present, found in a local folder, or downloaded. Returns 1 if fetched."""
    rel = f"splits/official/{name}"
    if adopt_or_verify(manifest, rel):
        return 0
    found = find_files(official, {name}, max_depth=0)
    if name in found:
        install_file(found[name], manifest, rel, str(found[name]))
        return 1
    if folder is not None:  # --from a folder: use what it has, download nothing
        raise DmgError(f"DomainNet list {name} not found in {folder}; put it there, or pass --splits FOLDER")
    url = base + DOMAINNET_LISTS + name
    hint = (f"fetch it by hand into {manifest.folder / 'splits' / 'official'}/ or pass --splits FOLDER "
            f"holding the official lists")
    with staging(manifest.folder, "list") as stage:
        path = download_url(url, stage / name, params.retries, params.timeout, hint)
        manifest.check_source(DOMAINNET_LISTS + name, path, url)
        install_file(path, manifest, rel, url)
    return 1


def fetch_tv_list(name: str, tv: list[Path], manifest: Manifest) -> int:
    """One reference tv_0.9 list, when a --splits folder holds it (they are optional)."""
    rel = f"splits/tv_0.9/{name}"
    if adopt_or_verify(manifest, rel):
        return 0
    found = find_files(tv, {name}, max_depth=0)
    if name not in found:
        return 0
    install_file(found[name], manifest, rel, str(found[name]))
    return 1


def fetch_domain(domain: str, folder: Path | None, base: str, manifest: Manifest, params: DownloadParams) -> int:
    """One domain's images: present and verified, or taken from --from, or downloaded."""
    prefix = f"images/{domain}/"
    if not manifest.verify(prefix):
        return 0
    out_dir = manifest.folder
    with staging(out_dir, "fetch") as stage:
        if folder is not None:
            local = domain_source(folder, domain)
        else:
            local = out_dir / "downloads" / f"{domain}.zip"
            if not local.exists():
                url = base + DOMAINNET_ARCHIVES[domain]
                hint = (f"fetch it by hand and put it in {local.parent}/ or run `dmg download domainnet --from "
                        f"FOLDER` with FOLDER holding the six domain zips")
                local = download_url(url, local, params.retries, params.timeout, hint)
        tree, hashes = unpack(local, stage, manifest)
        root = tree / domain if hashes is not None else tree
        if not root.is_dir():
            raise DmgError(f"{local} holds no {domain}/ folder")
        count = install_folder(root, hashes, tree, stage, manifest, prefix, str(local))
        manifest.save()  # an interruption later keeps this domain
    discard_download(local, out_dir)
    say(f"domainnet: {domain}: {count} files in {out_dir / 'images' / domain}")
    return 1


def domain_source(folder: Path, domain: str) -> Path:
    """An extracted `<domain>/` folder or a `<domain>.zip` inside a --from folder."""
    if (folder / domain).is_dir():
        return folder / domain
    found = find_files([folder], {f"{domain}.zip"}, max_depth=2, skip=frozenset(get_dataset("domainnet").domains))
    if f"{domain}.zip" not in found:
        raise DmgError(f"--from {folder}: neither a {domain}/ folder nor {domain}.zip found there")
    return found[f"{domain}.zip"]


# --------------------------------------------------------------------------- entry point

DOWNLOADERS = {"digits": download_digits, "pacs": download_pacs, "domainnet": download_domainnet}


def download(dataset: str, data_dir: str | Path, params: DownloadParams) -> Path:
    """Fetch `dataset` into data_dir/raw/<dataset>; returns the folder."""
    info = get_dataset(dataset)
    out_dir = raw_dir(data_dir, info.name)
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        DOWNLOADERS[info.name](out_dir, params)
    except BaseException:
        remove_empty_folders(out_dir, created)  # a failed first try leaves no empty data/raw/<dataset>
        raise
    return out_dir


def remove_empty_folders(out_dir: Path, created: list[Path]) -> None:
    """Remove the empty folders under out_dir, then those of `created` left empty (deepest first);
    files (a resumable .part among them) stay."""
    for folder, _, _ in sorted(os.walk(out_dir), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()
