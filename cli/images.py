"""`vtorque images`: the image catalog and the store. Anyone may list and show; changing the catalog and
pulling an image into the store are root's (the catalog file is root's, pulling needs the broker)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click

from vtorque.shared import topology
from vtorque.shared.config import Config, ConfigError, ImageEntry, load_config, read_catalog_file


def _config() -> Config:
    try:
        return load_config()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _root_only(what: str) -> None:
    if os.geteuid() != 0:
        raise click.ClickException(f"{what}: only root may do this (users may `vtorque images list` and `show`)")


def _catalog_file(config: Config) -> str:
    """The catalog file images add/update/remove edit."""
    if not config.images.catalog_file:
        raise click.ClickException("the config names no [images] catalog_file to edit")
    return config.images.catalog_file


def _file_entries(config: Config) -> dict[str, ImageEntry]:
    if not config.images.catalog_file:
        return {}
    try:
        return read_catalog_file(config.images.catalog_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _store_state(config: Config, entry: ImageEntry) -> dict:
    from vtorque.shared.image_store import ImageStore

    store = ImageStore(config.images.store)
    path = store.path(entry.sha256)
    try:
        st = path.stat()
    except FileNotFoundError:
        return {"staged": False}
    except OSError:
        return {"staged": None}
    used = max(st.st_mtime, store.used_at(entry.sha256))
    try:
        leases = len(store.live_leases(entry.sha256))
    except OSError:
        leases = None
    meta = store.meta(entry.sha256)
    return {"staged": True, "path": str(path), "bytes": st.st_size, "disk_bytes": st.st_blocks * 512,
            "format": meta.get("format"), "converted_from": meta.get("converted_from"),
            "staged_at": meta.get("staged_at"), "last_used": used, "leases": leases}


def _progress_bar(label: str, total: int | None):
    return click.progressbar(length=max(total or 0, 1), label=label, file=sys.stderr, show_pos=False,
                             show_percent=True, show_eta=True, width=30)


@click.group()
def images() -> None:
    """The image catalog and the image store."""


@images.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
def list_images(as_json: bool) -> None:
    """The catalog's images, and whether each is in the store."""
    config = _config()
    mine = _file_entries(config)
    rows = []
    for name in sorted(config.images.catalog):
        entry = config.images.catalog[name]
        state = _store_state(config, entry)
        doc = {"name": name, "format": entry.format, "size": entry.size, "distro": entry.distro,
               "sha256": entry.sha256, "source": entry.source,
               "defined_in": "catalog_file" if name in mine else "config", **state}
        rows.append(doc)
    if as_json:
        for doc in rows:
            click.echo(json.dumps(doc))
        return
    if not rows:
        click.echo(f"no images (add one: vtorque images add NAME FILE; catalog file {config.images.catalog_file})")
        return
    table = [("NAME", "FORMAT", "SIZE", "DISTRO", "STORE", "LAST USED", "SHA256", "SOURCE")]
    for d in rows:
        store = {True: _mib(d.get("bytes")), False: "-", None: "?"}[d["staged"]]
        table.append((d["name"], d["format"], _mib(d["size"]), d["distro"] or "-", store,
                      _when(d.get("last_used")), d["sha256"][:12], d["source"]))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        # widths has no entry for the last column: it is not padded
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + str(row[-1]))


@images.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def show(name: str, as_json: bool) -> None:
    """One image: its catalog entry and its state in the store."""
    config = _config()
    entry = config.images.catalog.get(name)
    if entry is None:
        raise click.ClickException(
            f"no image {name!r} in the catalog; images: {', '.join(sorted(config.images.catalog)) or '(none)'}"
        )
    import msgspec

    doc = {"name": name, **msgspec.to_builtins(entry),
           "defined_in": config.images.catalog_file if name in _file_entries(config) else "vtorque.toml",
           "store": _store_state(config, entry)}
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    for key, value in doc.items():
        if key == "store":
            continue
        if value is not None and value is not False:
            click.echo(f"{key:14} {value}")
    store = doc["store"]
    if store["staged"]:
        click.echo(f"{'store':14} {store['path']} ({_mib(store['bytes'])}, {_mib(store['disk_bytes'])} on disk)")
        if store.get("converted_from"):
            click.echo(f"{'converted':14} from {store['converted_from']} to {store['format']}")
        click.echo(f"{'staged at':14} {_when(store.get('staged_at'))}")
        click.echo(f"{'last used':14} {_when(store.get('last_used'))}")
        click.echo(f"{'in use by':14} {store['leases']} guest overlay(s)")
    else:
        click.echo(f"{'store':14} {'not staged' if store['staged'] is False else 'cannot read the store'} "
                   f"({config.images.store})")


def _inspect(source: str, sha256: str | None, fmt: str | None):
    from vtorque.shared.image_catalog import CatalogError, inspect

    bar = None

    def progress(done: int, total: int | None) -> None:
        nonlocal bar
        if bar is None and total and total > 256 * 2**20 and sys.stderr.isatty():
            bar = _progress_bar("sha256", total).__enter__()
        if bar is not None:
            bar.update(done - bar.pos)

    try:
        return inspect(source, sha256=sha256, fmt=fmt, progress=progress)
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def _source_of(source: str) -> str:
    from vtorque.shared.image_fetch import is_url

    return source if is_url(source) else str(Path(source).resolve())


def _entry(facts, source: str, convert_to: str | None, **fields) -> ImageEntry:
    from vtorque.shared.image_catalog import make_entry

    if convert_to and convert_to != facts.format:
        fields.update(format=convert_to, source_format=facts.format)
    try:
        return make_entry(facts, source, **fields)
    except Exception as exc:  # noqa: BLE001 - msgspec names the bad field
        raise click.ClickException(f"bad catalog entry: {exc}") from exc


_entry_options = [
    click.option(
        "--distro", help="Guest flavour (debian, ubuntu, redhat, centos, osv); default: guessed from the names."
    ),
    click.option("--kernel", help="Kernel for direct boot (the image then needs no boot loader)."),
    click.option("--initrd", help="Initramfs for direct boot."),
    click.option("--cmdline", help="Kernel command line for direct boot."),
    click.option(
        "--convert-to",
        type=click.Choice(["qcow2", "raw"]),
        help="Store the image in this format (the stager converts it with qemu-img).",
    ),
    click.option("--compress", is_flag=True, default=None, help="Store it as a compressed qcow2."),
]


def _with_entry_options(f):
    for option in reversed(_entry_options):
        f = option(f)
    return f


@images.command()
@click.argument("name")
@click.argument("source")
@click.option("--sha256", help="The source's sha256, to skip reading all of it (URLs).")
@click.option("--format", "fmt", type=click.Choice(["qcow2", "raw"]), help="Default: what qemu-img says.")
@_with_entry_options
def add(name: str, source: str, sha256: str | None, fmt: str | None, distro, kernel, initrd, cmdline, convert_to,
        compress) -> None:
    """Add image NAME from SOURCE (a file or an http(s) URL): sha256, format and size are read from it."""
    from vtorque.shared.config import IMAGE_NAME
    from vtorque.shared.image_catalog import editing, guess_distro

    _root_only("vtorque images add")
    config = _config()
    if not IMAGE_NAME.match(name):
        raise click.ClickException(f"{name!r}: an image name is letters, digits, '.', '_', '-'")
    if name in config.images.catalog:
        raise click.ClickException(f"image {name} is already in the catalog: `vtorque images update {name}`")
    source = _source_of(source)
    facts = _inspect(source, sha256, fmt)
    distro = distro or guess_distro(name, Path(source).name, source)
    entry = _entry(facts, source, convert_to, distro=distro, kernel=kernel, initrd=initrd, cmdline=cmdline,
                   compress=compress)
    with editing(_catalog_file(config)) as entries:
        if name in entries:
            raise click.ClickException(f"image {name} was just added by someone else")
        entries[name] = entry
    click.echo(f"added {name}: {entry.format}, {_mib(facts.size)}, sha256 {entry.sha256[:12]}…, "
               f"distro {entry.distro or '(unknown)'} → {config.images.catalog_file}")


@images.command()
@click.argument("names", nargs=-1)
@click.option("--source", help="A new source for the (one) image.")
@_with_entry_options
def update(names: tuple[str, ...], source: str | None, distro, kernel, initrd, cmdline, convert_to,
           compress) -> None:
    """Read each image's source again (sha256, size, format) and apply the options; all images of the
    catalog file when no NAME is given. An image of vtorque.toml is updated into the catalog file."""
    import msgspec

    from vtorque.shared.image_catalog import editing

    _root_only("vtorque images update")
    config = _config()
    mine = _file_entries(config)
    names = names or tuple(sorted(mine))
    if not names:
        raise click.ClickException(f"no images in {config.images.catalog_file} to update; name one")
    if source and len(names) != 1:
        raise click.ClickException("--source needs exactly one image name")
    for name in names:
        if name not in config.images.catalog:
            raise click.ClickException(f"no image {name!r} in the catalog")
    updated = {}
    for name in names:
        old = mine.get(name) or config.images.catalog[name]
        new_source = _source_of(source) if source else old.source
        facts = _inspect(new_source, None, None)
        fields = {k: v for k, v in msgspec.to_builtins(old).items() if k not in ("source", "sha256", "size")}
        fields.update({k: v for k, v in dict(distro=distro, kernel=kernel, initrd=initrd, cmdline=cmdline,
                                             compress=compress).items() if v is not None})
        target = convert_to or (old.format if old.source_format else None)
        fields.pop("format", None)
        fields.pop("source_format", None)
        updated[name] = new = _entry(facts, new_source, target, **fields)
        if new == old:
            click.echo(f"{name}: unchanged")
        elif new.sha256 != old.sha256:
            click.echo(f"{name}: sha256 {old.sha256[:12]}… → {new.sha256[:12]}…, {_mib(facts.size)}")
        else:
            click.echo(f"{name}: updated")
    with editing(_catalog_file(config)) as entries:
        entries.update(updated)


@images.command()
@click.argument("name")
def remove(name: str) -> None:
    """Take image NAME out of the catalog file (its bytes leave the store by eviction)."""
    from vtorque.shared.image_catalog import editing

    _root_only("vtorque images remove")
    config = _config()
    with editing(_catalog_file(config)) as entries:
        if name not in entries:
            if name in config.images.catalog:
                raise click.ClickException(f"image {name} is defined in vtorque.toml, not in "
                                           f"{config.images.catalog_file}: remove it there")
            raise click.ClickException(f"no image {name!r} in the catalog")
        del entries[name]
    click.echo(f"removed {name} from {config.images.catalog_file}")
    _warm("sweep")  # this node's warm images of it go too (services/node_worker/warm.py)


def _warm(*args: str) -> None:
    """The node worker's warm images module, run as a program (the cli imports no service, and names one only in
    cli/main.py's table: tests/unit/test_import_rules.py)."""
    from vtorque.cli.main import SERVICE_PROGRAMS

    run = subprocess.run([sys.executable, "-m", SERVICE_PROGRAMS["warm-images"], *args], check=False)
    if run.returncode:
        raise click.exceptions.Exit(run.returncode)


@images.command()
@click.argument("name")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait for the stager.")
def pull(name: str, timeout: float) -> None:
    """Stage image NAME into the store now (through the stagers), with a progress bar."""
    from vtorque.shared import messages as m
    from vtorque.shared.bus import EventWaiter, Publisher

    _root_only("vtorque images pull")
    config = _config()
    entry = config.images.catalog.get(name)
    if entry is None:
        raise click.ClickException(f"no image {name!r} in the catalog")
    url = config.broker.connection_url()
    job_id = f"pull-{uuid.uuid4().hex[:12]}"
    try:
        waiter = EventWaiter(url, topology.bindings(topology.PULL_Q, digest=entry.sha256),
                             timeout=config.broker.connect_timeout,
                             prefix=topology.prefix(topology.PULL_Q))
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        raise click.ClickException(f"cannot reach the broker: {exc}") from exc
    publisher = Publisher(url)
    bar = None
    started = time.monotonic()
    try:
        publisher.publish(m.StageImage.new(job_id=job_id, deadline=timeout, image=name, digest=entry.sha256))
        deadline = time.monotonic() + timeout
        while True:
            event = waiter.next(deadline)
            if event is None:
                raise click.ClickException(f"{name}: not staged within {timeout:.0f}s (are the stagers running?)")
            if isinstance(event, m.ImageStagingProgress):
                # Any staging of this digest is ours to watch: one copy serves every request.
                if bar is None:
                    bar = _progress_bar(f"{name}", event.total or entry.size).__enter__()
                if event.total and bar.length != event.total:
                    bar.length = event.total
                bar.update(event.bytes - bar.pos)
            elif event.job_id != job_id:
                continue
            elif isinstance(event, m.ImageStaged):
                if bar is not None:
                    bar.update(bar.length - bar.pos)
                    bar.__exit__(None, None, None)
                    bar = None
                how = "already in the store" if event.cached else \
                    f"staged {_mib(event.bytes)} in {time.monotonic() - started:.1f}s"
                click.echo(f"{name}: {how}: {event.path}")
                return
            elif isinstance(event, (m.ImageStageFailed, m.ImageStageCancelled)):
                raise click.ClickException(f"{name}: {event.reason}")
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
        waiter.close()
        publisher.close()


@images.command("warm")
@click.argument("name", required=False)
@click.option("--vcpus", type=int, help="The guests' vCPUs (default: the site's [spec] default_vcpus).")
@click.option("--ram", help="The guests' RAM, as in a spec: 512M, 2G (default: [spec] default_ram).")
@click.option("--force", is_flag=True, help="Make it again even if a current one exists.")
@click.option("--list", "listing", is_flag=True, help="This node's warm images.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds the guest may take to boot.")
def warm_image(name: str | None, vcpus: int | None, ram: str | None, force: bool, listing: bool,
               timeout: float) -> None:
    """Make a warm image of NAME on this node: boot it once with no job identity in the given shape, save it.
    A job's guest of that image and shape is then restored from it instead of booted (docs/benchmarks.md);
    once there is one, the node worker makes the next when the image's digest or a job's shape changes, and it
    is removed with the image. Needs the image in this node's store (`vtorque images pull NAME`) and an image
    whose init takes its identity after a restore (the test guest's does, and the Debian cloud guest's agent)."""
    _root_only("vtorque images warm")
    if listing:
        _warm("list")
        return
    if not name:
        raise click.ClickException("name an image (or --list)")
    _warm("build", name, *(["--vcpus", str(vcpus)] if vcpus else []), *(["--ram", ram] if ram else []),
          *(["--force"] if force else []), "--timeout", str(timeout))
