"""Tests for the image modules of geodata.ingest: listing zips/folders (image_listing), duplicate ids,
safe names (archive_members), ImageStore (image_store), decoding (image_decode)."""

from __future__ import annotations

import os
import io
import logging
import multiprocessing as mp
import pickle
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from geodata.ingest.archive_members import UnsafeMemberError, is_safe_relative_name
from geodata.ingest.image_decode import ImageDecodeError
from geodata.ingest.image_listing import index_images, list_images, split_duplicate_ids
from geodata.ingest.image_store import ImageStore

SAMPLE_IMAGES = Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images"
SAMPLE_IDS = ("4065883540137904", "743171673023530", "827026111505364")


def jpeg_bytes(
    size: tuple[int, int] = (16, 8), color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    """A small real JPEG made by PIL."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def encode(image: Image.Image, fmt: str) -> bytes:
    """`image` encoded as `fmt` bytes."""
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    """A zip at `path` holding `members` (name -> bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_zip_members_listed_at_any_depth_without_extracting(tmp_path: Path) -> None:
    shard0 = {"train/00/1.jpg": jpeg_bytes(), "2.JPEG": jpeg_bytes(), "notes.txt": b"x"}
    write_zip(tmp_path / "images/train/00.zip", shard0)
    shard1 = {"a/b/c/3.jpg": jpeg_bytes(), "__MACOSX/a/._3.jpg": b"junk", "win\\4.jpg": jpeg_bytes()}
    write_zip(tmp_path / "images/train/01.zip", shard1)
    listing = list_images(tmp_path / "images/train", relative_to=tmp_path)
    assert list(listing.columns) == ["id", "container", "member", "size_bytes"]
    assert listing["id"].tolist() == ["1", "2", "3", "4"]
    assert listing["container"].tolist() == ["images/train/00.zip"] * 2 + ["images/train/01.zip"] * 2
    assert listing["member"].tolist() == ["train/00/1.jpg", "2.JPEG", "a/b/c/3.jpg", "win\\4.jpg"]
    assert listing["size_bytes"].tolist() == [len(jpeg_bytes())] * 4
    assert not (tmp_path / "images/train/train").exists()  # nothing extracted


def test_unzipped_folders_at_depth_two_and_store_opens_them(tmp_path: Path) -> None:
    deep = tmp_path / "images/train/00/ab"
    deep.mkdir(parents=True)
    for image_id in SAMPLE_IDS:
        shutil.copy(SAMPLE_IMAGES / f"{image_id}.jpg", deep / f"{image_id}.jpg")
    (tmp_path / "images/train/00/readme.md").write_text("not an image")
    listing = index_images(tmp_path / "images/train", relative_to=tmp_path)
    assert sorted(listing["id"]) == sorted(SAMPLE_IDS)
    assert set(listing["container"]) == {"images/train/00/ab"}
    store = ImageStore(tmp_path)
    row = listing.iloc[0]
    image = store.open(row.container, row.member)
    assert image.mode == "RGB" and image.height == 512
    assert store.read_bytes(row.container, row.member) == (deep / row.member).read_bytes()


def test_default_container_is_relative_to_images_dir(tmp_path: Path) -> None:
    write_zip(tmp_path / "00.zip", {"7.jpg": jpeg_bytes()})
    (tmp_path / "8.jpg").write_bytes(jpeg_bytes())
    listing = list_images(tmp_path)
    assert listing[["container", "member"]].values.tolist() == [["00.zip", "7.jpg"], [".", "8.jpg"]]
    assert ImageStore(tmp_path).open(".", "8.jpg").size == (16, 8)


@pytest.mark.parametrize(
    "bad_name", ["../evil.jpg", "a/../../evil.jpg", "/abs/evil.jpg", "..\\evil.jpg", "C:/evil.jpg"]
)
def test_unsafe_zip_member_refused_naming_zip_and_member(tmp_path: Path, bad_name: str) -> None:
    write_zip(tmp_path / "images/train/00.zip", {"1.jpg": jpeg_bytes(), bad_name: jpeg_bytes()})
    with pytest.raises(UnsafeMemberError, match=r"00\.zip.*member name") as err:
        list_images(tmp_path / "images/train")
    assert repr(bad_name) in str(err.value)


def test_store_refuses_escaping_names(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(UnsafeMemberError):
        store.read_bytes("images", "../../etc/passwd")
    with pytest.raises(UnsafeMemberError):
        store.read_bytes("/etc", "passwd")
    assert is_safe_relative_name("a/b.jpg") and not is_safe_relative_name("")


def test_duplicate_ids_keep_first_and_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_zip(tmp_path / "00.zip", {"5.jpg": jpeg_bytes(), "6.jpg": jpeg_bytes()})
    write_zip(tmp_path / "01.zip", {"x/5.jpg": jpeg_bytes((4, 4))})
    kept, dups = split_duplicate_ids(list_images(tmp_path))
    assert kept["id"].tolist() == ["5", "6"] and kept["container"].iloc[0] == "00.zip"
    assert dups[["id", "container", "member"]].values.tolist() == [["5", "01.zip", "x/5.jpg"]]
    with caplog.at_level(logging.WARNING, logger="geodata.ingest.image_listing"):
        index = index_images(tmp_path)
    assert index["id"].is_unique and len(index) == 2
    assert "1 duplicate image ids" in caplog.text and "01.zip:x/5.jpg" in caplog.text


def test_missing_folder_and_bad_zip_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")
    (tmp_path / "00.zip").write_bytes(b"not a zip")
    with pytest.raises(zipfile.BadZipFile, match=r"00\.zip"):
        list_images(tmp_path)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # 20x10 landscape: left half red, right half blue. Orientation 6 means "rotate 90
    # degrees clockwise to display": the shown image is 10x20 with red on top.
    raw = Image.new("RGB", (20, 10), (0, 0, 255))
    raw.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    raw.save(buf, "JPEG", exif=exif, quality=95)
    write_zip(tmp_path / "00.zip", {"1.jpg": buf.getvalue()})
    image = ImageStore(tmp_path).open("00.zip", "1.jpg")
    assert image.size == (10, 20)
    top, bottom = np.asarray(image)[2, 5], np.asarray(image)[17, 5]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def _transparent_palette() -> Image.Image:
    """A palette image whose only colour (black) is marked transparent."""
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    ("name", "make", "expected_rgb"),
    [
        ("gray.jpg", lambda: encode(Image.new("L", (8, 8), 128), "JPEG"), (128, 128, 128)),
        ("cmyk.jpg", lambda: encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), (255, 0, 0)),
        ("rgba.png", lambda: encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"), (255, 255, 255)),
        ("half.png", lambda: encode(Image.new("RGBA", (8, 8), (0, 0, 0, 255)), "PNG"), (0, 0, 0)),
        ("la.png", lambda: encode(Image.new("LA", (8, 8), (50, 255)), "PNG"), (50, 50, 50)),
        ("pal.png", lambda: encode(Image.new("RGB", (8, 8), (0, 200, 0)).convert("P"), "PNG"), (0, 200, 0)),
        ("trns.png", lambda: encode(_transparent_palette(), "PNG"), (255, 255, 255)),
        ("i16.png", lambda: encode(Image.new("I;16", (8, 8), 65535), "PNG"), (255, 255, 255)),
    ],
)
def test_any_mode_opens_as_rgb(
    tmp_path: Path, name: str, make: Callable[[], bytes], expected_rgb: tuple[int, int, int]
) -> None:
    (tmp_path / name).write_bytes(make())
    image = ImageStore(tmp_path).open(".", name)
    assert image.mode == "RGB" and image.size == (8, 8)
    np.testing.assert_allclose(np.asarray(image)[4, 4], expected_rgb, atol=6)


def test_truncated_jpeg_raises_decode_error_naming_member(tmp_path: Path) -> None:
    data = jpeg_bytes((64, 64))
    write_zip(tmp_path / "00.zip", {"d/9.jpg": data[: len(data) // 2], "d/10.jpg": b"\xff\xd8garbage"})
    store = ImageStore(tmp_path)
    with pytest.raises(ImageDecodeError, match=r"00\.zip:d/9\.jpg.*truncated"):
        store.open("00.zip", "d/9.jpg")
    with pytest.raises(ImageDecodeError, match=r"d/10\.jpg"):
        store.open("00.zip", "d/10.jpg")
    with pytest.raises(KeyError, match="no member"):
        store.open("00.zip", "d/11.jpg")


def test_decompression_bomb_refused_without_touching_pil_global(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    write_zip(tmp_path / "00.zip", {"1.jpg": jpeg_bytes((40, 40))})
    with pytest.raises(Image.DecompressionBombError, match="max_image_pixels=1000"):
        ImageStore(tmp_path, max_image_pixels=1000).open("00.zip", "1.jpg")
    assert ImageStore(tmp_path, max_image_pixels=1600).open("00.zip", "1.jpg").size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == before


_INHERITED: ImageStore | None = None


def _read_inherited(member: str) -> tuple[int, int, int]:
    """In a forked worker: read through the store inherited from the parent (not pickled)."""
    assert _INHERITED is not None
    parent_pid = _INHERITED._pid
    size = _INHERITED.open("images/train/00.zip", member).size
    n_bytes = len(_INHERITED.read_bytes("images/train/00.zip", member))
    return n_bytes, size[1], int(parent_pid != _INHERITED._pid)


def test_store_pickles_and_reopens_zips_per_process(tmp_path: Path) -> None:
    global _INHERITED
    members = {f"train/{i}.jpg": (SAMPLE_IMAGES / f"{i}.jpg").read_bytes() for i in SAMPLE_IDS}
    write_zip(tmp_path / "images/train/00.zip", members)
    store = ImageStore(tmp_path)
    first = store.open("images/train/00.zip", f"train/{SAMPLE_IDS[0]}.jpg")
    assert len(store._zips) == 1  # handle cached
    clone = pickle.loads(pickle.dumps(store))
    assert clone.root == store.root and clone._zips == {}
    again = clone.open("images/train/00.zip", f"train/{SAMPLE_IDS[0]}.jpg")
    assert again.tobytes() == first.tobytes()
    # Forked workers inherit the cached handle (and its file offset) but open their own.
    _INHERITED = store
    try:
        with mp.get_context("fork").Pool(2) as pool:
            out = pool.map(_read_inherited, list(members) * 3)
    finally:
        _INHERITED = None
    assert [n for n, _, _ in out] == [len(b) for b in members.values()] * 3
    assert all(height == 512 for _, height, _ in out)
    assert all(reopened for _, _, reopened in out[:1])
    store.close()
    assert store._zips == {}


def _zip_with_symlink(path: Path, link_name: str, target: str, regular: dict[str, bytes]) -> Path:
    """A zip holding `regular` files and one unix symlink member (mode S_IFLNK, data = target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in regular.items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo(link_name)
        info.create_system = 3
        info.external_attr = (0o120777 << 16)  # S_IFLNK | 0777
        zf.writestr(info, target)
    return path


def test_zip_symlink_member_listed_as_refused_and_never_read(tmp_path: Path) -> None:
    from geodata.ingest.image_listing import list_images_table

    _zip_with_symlink(tmp_path / "00.zip", "2.jpg", "/etc/passwd", {"1.jpg": jpeg_bytes()})
    table = list_images_table(tmp_path).to_pylist()
    assert [(r["id"], r["refused"] is None) for r in table] == [("1", True), ("2", False)]
    assert "symlink" in table[1]["refused"]
    assert list_images(tmp_path)["id"].tolist() == ["1"]  # the pandas listing holds readable images only
    with pytest.raises(UnsafeMemberError, match="symlink"):
        ImageStore(tmp_path).read_bytes("00.zip", "2.jpg")


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_tar_shard_listed_with_offsets_and_store_reads_by_offset(tmp_path: Path) -> None:
    from geodata.ingest.image_listing import list_images_table

    photos = {i: (SAMPLE_IMAGES / f"{i}.jpg").read_bytes() for i in SAMPLE_IDS}
    _tar(tmp_path / "images/train/00.tar", [(tarfile.TarInfo(f"x/{i}.jpg"), d) for i, d in photos.items()])
    table = list_images_table(tmp_path / "images/train", relative_to=tmp_path).to_pylist()
    assert [r["id"] for r in table] == list(SAMPLE_IDS)
    store = ImageStore(tmp_path)
    raw = (tmp_path / "images/train/00.tar").read_bytes()
    for r in table:
        assert raw[r["offset"] : r["offset"] + r["size_bytes"]] == photos[r["id"]]
        assert store.read_bytes(r["container"], r["member"], offset=r["offset"], size=r["size_bytes"]) == photos[r["id"]]
        assert store.read_bytes(r["container"], r["member"]) == photos[r["id"]]  # header index, built lazily
    assert store.open("images/train/00.tar", f"x/{SAMPLE_IDS[0]}.jpg").height == 512
    clone = pickle.loads(pickle.dumps(store))  # picklable: handles and the tar index stay behind
    assert clone._tar_fds == {} and clone._tar_index == {}
    with pytest.raises(KeyError, match="not 'x/9.jpg'"):
        store.read_bytes("images/train/00.tar", "x/9.jpg", offset=table[0]["offset"], size=1)
    store.close()


@pytest.mark.parametrize(
    ("kind", "expect"),
    [(tarfile.SYMTYPE, "symlink"), (tarfile.LNKTYPE, "hardlink"), (tarfile.CHRTYPE, "device"),
     (tarfile.FIFOTYPE, "device or fifo")],
)
def test_tar_link_and_device_members_refused(tmp_path: Path, kind: bytes, expect: str) -> None:
    from geodata.ingest.image_listing import list_images_table

    bad = tarfile.TarInfo("2.jpg")
    bad.type, bad.linkname = kind, "1.jpg"
    _tar(tmp_path / "00.tar", [(tarfile.TarInfo("1.jpg"), jpeg_bytes()), (bad, None)])
    table = list_images_table(tmp_path).to_pylist()
    assert table[0]["refused"] is None and expect in table[1]["refused"]
    with pytest.raises(UnsafeMemberError, match=expect):
        ImageStore(tmp_path).read_bytes("00.tar", "2.jpg")


@pytest.mark.parametrize("bad_name", ["../evil.jpg", "/abs/evil.jpg", "C:/evil.jpg", "a/../../evil.jpg"])
def test_tar_with_escaping_name_refused_whole(tmp_path: Path, bad_name: str) -> None:
    _tar(tmp_path / "00.tar", [(tarfile.TarInfo("1.jpg"), jpeg_bytes()), (tarfile.TarInfo(bad_name), jpeg_bytes())])
    with pytest.raises(UnsafeMemberError, match=r"00\.tar.*member name"):
        list_images(tmp_path)
    with pytest.raises(UnsafeMemberError):
        ImageStore(tmp_path).read_bytes("00.tar", "1.jpg")  # the lazy index walks every header
    assert not any(tmp_path.parent.glob("evil.jpg")) and not Path("/abs/evil.jpg").exists()


def test_image_store_keeps_a_bounded_number_of_zips_open(tmp_path, monkeypatch):
    """Reading from more shards than MAX_OPEN_ZIPS closes the least recently used; reads still work."""
    import geodata.ingest.image_store as images

    monkeypatch.setattr(images, "MAX_OPEN_ZIPS", 2)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    for i in range(4):
        with zipfile.ZipFile(tmp_path / f"{i:02d}.zip", "w") as zf:
            zf.writestr(f"{i}.jpg", buf.getvalue())
    store = images.ImageStore(tmp_path)
    for _ in range(2):
        for i in range(4):
            assert store.read_bytes(f"{i:02d}.zip", f"{i}.jpg") == buf.getvalue()
            assert len(store._zips) <= 2
    assert list(store._zips) == ["02.zip", "03.zip"]


# --- byte caps and special files (issue 12, items 3 and 4) ---------------------------------
MIB = 2**20


def test_zip_bomb_refused_by_its_declared_size_before_any_byte_is_inflated(
    tmp_path: Path, zip_bombs: dict[str, Path], traced_peak
) -> None:
    from geodata.capped_io import InputTooLargeError
    from geodata.ingest.image_listing import list_images_table

    shutil.copy(zip_bombs["declared"], tmp_path / "02.zip")
    (row,) = list_images_table(tmp_path).to_pylist()
    assert row["member"] == "2.jpg" and row["size_bytes"] > 300 * MIB
    assert "image declares 300.0 MiB" in row["refused"] and "over the 64 MiB image cap" in row["refused"]
    assert list_images(tmp_path).empty  # refused rows are not readable images
    with traced_peak() as peak, ImageStore(tmp_path) as store:
        with pytest.raises(InputTooLargeError, match=r"02\.zip: member '2\.jpg': image declares 300\.0 MiB"):
            store.open("02.zip", "2.jpg")
    assert peak[0] < 4 * MIB, peak


def test_zip_member_lying_about_its_size_is_never_inflated_past_it(
    tmp_path: Path, zip_bombs: dict[str, Path], traced_peak
) -> None:
    from geodata.ingest.image_listing import list_images_table

    shutil.copy(zip_bombs["lying"], tmp_path / "03.zip")
    (row,) = list_images_table(tmp_path).to_pylist()
    assert row["size_bytes"] == 100_000 and row["refused"] is None  # the lie is under the cap
    with traced_peak() as peak, ImageStore(tmp_path) as store:
        # at most the declared bytes are inflated; they are not the member's data (CRC mismatch)
        with pytest.raises(zipfile.BadZipFile, match="CRC"):
            store.read_bytes("03.zip", "3.jpg")
    assert peak[0] < 4 * MIB, peak


def test_capped_stream_read_refuses_more_than_declared() -> None:
    from geodata.capped_io import InputTooLargeError, read_stream_capped

    assert read_stream_capped(io.BytesIO(b"x" * 10), 10, 64, "s") == b"x" * 10
    with pytest.raises(InputTooLargeError, match="s: image holds more than the 10 bytes it declares"):
        read_stream_capped(io.BytesIO(b"x" * 11), 10, 64, "s")
    with pytest.raises(InputTooLargeError, match="s: image declares 65 bytes, over the 64 bytes image cap"):
        read_stream_capped(io.BytesIO(b"x" * 65), 65, 64, "s")


def test_tar_member_over_the_cap_listed_as_refused_and_never_read(tmp_path: Path, sparse_tar) -> None:
    from geodata.capped_io import InputTooLargeError
    from geodata.ingest.image_listing import list_images_table

    photo = jpeg_bytes()
    sparse_tar(tmp_path / "00.tar", [("1.jpg", photo), ("2.jpg", 2**31), ("3.jpg", photo)])
    rows = {r["id"]: r for r in list_images_table(tmp_path).to_pylist()}
    assert rows["1"]["refused"] is None and rows["3"]["refused"] is None
    assert rows["2"]["refused"] == (
        "image is 2 GiB (2,147,483,648 bytes), over the 64 MiB image cap; refused, not read"
    )
    with ImageStore(tmp_path) as store:
        assert store.read_bytes("00.tar", "3.jpg") == photo  # the hole was skipped, not read
        with pytest.raises(InputTooLargeError, match=r"00\.tar: member '2\.jpg': image declares 2 GiB"):
            store.read_bytes("00.tar", "2.jpg", offset=rows["2"]["offset"], size=rows["2"]["size_bytes"])
        with pytest.raises(InputTooLargeError, match="2 GiB"):
            store.read_bytes("00.tar", "2.jpg")  # through the lazy header index


def test_store_byte_cap_is_a_knob_kept_across_pickling(tmp_path: Path, sparse_tar) -> None:
    from geodata.capped_io import InputTooLargeError

    photo = jpeg_bytes((64, 64))
    write_zip(tmp_path / "00.zip", {"1.jpg": photo})
    sparse_tar(tmp_path / "00.tar", [("1.jpg", photo)])
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/1.jpg").write_bytes(photo)
    small = pickle.loads(pickle.dumps(ImageStore(tmp_path, max_image_bytes=len(photo) - 1)))
    assert small.max_image_bytes == len(photo) - 1 and "max_image_bytes" in repr(small)
    for container in ("00.zip", "00.tar", "dir"):
        with pytest.raises(InputTooLargeError, match=f"over the {len(photo) - 1} bytes image cap"):
            small.open(container, "1.jpg")
        assert ImageStore(tmp_path, max_image_bytes=len(photo)).open(container, "1.jpg").size == (64, 64)


def _special_files(folder: Path) -> dict[str, str]:
    """1.jpg a real photo, 2.jpg a fifo, 3.jpg a symlink to /dev/zero, 4.jpg a sparse 1.5 GB file;
    returns name -> the reason expected for it (None for the photo)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "1.jpg").write_bytes(jpeg_bytes())
    os.mkfifo(folder / "2.jpg")
    (folder / "3.jpg").symlink_to("/dev/zero")
    with open(folder / "4.jpg", "wb") as fh:
        fh.truncate(1_500_000_000)
    return {
        "1.jpg": None,
        "2.jpg": "not a regular file (fifo); refused, never read",
        "3.jpg": "not a regular file (character device); refused, never read",
        "4.jpg": "image is 1.4 GiB (1,500,000,000 bytes), over the 64 MiB image cap; refused, not read",
    }


@pytest.mark.timeout(60)
def test_folder_listing_refuses_fifos_devices_and_huge_files_without_opening_them(tmp_path: Path) -> None:
    from geodata.capped_io import InputTooLargeError, NotRegularFileError
    from geodata.ingest.image_listing import list_images_table

    expected = _special_files(tmp_path / "images" / "sub")
    rows = list_images_table(tmp_path / "images", relative_to=tmp_path).to_pylist()
    assert {r["member"]: r["refused"] for r in rows} == expected
    assert {r["container"] for r in rows} == {"images/sub"}
    store = ImageStore(tmp_path)
    assert store.open("images/sub", "1.jpg").size == (16, 8)
    for member, error in (("2.jpg", NotRegularFileError), ("3.jpg", NotRegularFileError), ("4.jpg", InputTooLargeError)):
        with pytest.raises(error) as err:
            store.read_bytes("images/sub", member)
        assert str(err.value) == f"{tmp_path / 'images/sub' / member}: {expected[member]}"


@pytest.mark.timeout(60)
def test_a_fifo_named_like_a_shard_is_skipped_not_opened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    os.mkfifo(tmp_path / "00.zip")
    write_zip(tmp_path / "01.zip", {"1.jpg": jpeg_bytes()})
    with caplog.at_level(logging.WARNING):
        assert list_images(tmp_path)["container"].tolist() == ["01.zip"]
    assert "00.zip: not a regular file" in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["2.jpg", "3.jpg", "4.jpg"])
def test_open_photo_reads_only_regular_files_under_the_cap(tmp_path: Path, name: str) -> None:
    from geodata.ingest.image_decode import open_photo

    expected = _special_files(tmp_path)
    assert open_photo(tmp_path / "1.jpg").size == (16, 8)
    with pytest.raises(OSError) as err:
        open_photo(tmp_path / name)
    assert str(err.value) == f"{tmp_path / name}: {expected[name]}"


@pytest.mark.timeout(60)
def test_photo_folders_list_special_files_as_errors(tmp_path: Path) -> None:
    from geodata.ingest.image_decode import expand_photo_paths

    expected = _special_files(tmp_path / "photos")
    os.mkfifo(tmp_path / "named.jpg")
    files, errors = expand_photo_paths([tmp_path / "photos", tmp_path / "named.jpg", tmp_path / "gone.jpg"])
    assert files == [tmp_path / "photos/1.jpg", tmp_path / "photos/4.jpg"]  # 4.jpg: refused when read
    assert errors == [
        (tmp_path / "photos/2.jpg", expected["2.jpg"]),
        (tmp_path / "photos/3.jpg", expected["3.jpg"]),
        (tmp_path / "named.jpg", expected["2.jpg"]),
        (tmp_path / "gone.jpg", "no such file or folder"),
    ]


def test_decode_image_refuses_bytes_over_the_cap() -> None:
    from geodata.capped_io import InputTooLargeError
    from geodata.ingest.image_decode import decode_image

    photo = jpeg_bytes()
    assert decode_image(photo, "row 0", max_image_bytes=len(photo)).size == (16, 8)
    with pytest.raises(InputTooLargeError, match=rf"^row 0: image is {len(photo) + 1} bytes, over the {len(photo)} bytes"):
        decode_image(photo + b"\0", "row 0", max_image_bytes=len(photo))


def test_undecodable_bytes_are_named_by_where_not_by_a_python_repr(tmp_path: Path) -> None:
    from geodata.ingest.image_index import decode_checker
    from geodata.ingest.image_decode import decode_image

    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"this is not a photo", "row 3")
    assert str(err.value).startswith("row 3: cannot decode image (UnidentifiedImageError: not a known image format)")
    assert err.value.reason == "UnidentifiedImageError: not a known image format"
    write_zip(tmp_path / "00.zip", {"1.jpg": b"this is not a photo"})
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "dir/2.jpg")
    check = decode_checker(ImageStore(tmp_path), 1)
    refs = pa.table({"container": ["00.zip", "dir"], "member": ["1.jpg", "2.jpg"], "offset": pa.array([None, None], pa.int64()),
                     "size": pa.array([None, None], pa.int64())})
    assert check(np.arange(2), refs) == [
        "00.zip:1.jpg: UnidentifiedImageError: not a known image format",
        "dir:2.jpg: not a regular file (fifo); refused, never read",
    ]


def test_decoding_reports_progress(tmp_path: Path, progress_lines) -> None:
    """Decoding every image (the slow part of ingesting millions of rows) says how far it is."""
    from geodata.ingest.image_index import decode_checker

    write_zip(tmp_path / "00.zip", {f"{i}.jpg": jpeg_bytes() for i in range(3)})
    refs = pa.table({"container": ["00.zip"] * 3, "member": [f"{i}.jpg" for i in range(3)],
                     "offset": pa.array([None] * 3, pa.int64()), "size": pa.array([None] * 3, pa.int64())})
    assert decode_checker(ImageStore(tmp_path), 2)(np.arange(3), refs) == [None] * 3
    lines = progress_lines()
    assert [x.split(", ")[0] for x in lines if "ETA" in x] == [f"decoding images: {n}/3 img ({100 * n / 3:.0f}%)"
                                                              for n in (1, 2, 3)]
    assert lines[-1].startswith("decoding images: 3/3 img in ")
