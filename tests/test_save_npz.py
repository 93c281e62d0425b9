"""Tests for save_npz.py: PNG folder -> arr_0 round trip in sorted order, --num (default the
original's 50,000), the default output name {image_dir}.npz and what happens when sample_ddp.py
already wrote that file, no silent overwrite, atomic write, and one-line errors on bad folders."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import save_npz
from tinyfusion.errors import TinyFusionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "save_npz.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def pack(*args):
    """save_npz.py in this process: its stdout line, or the TinyFusionError it stops with."""
    save_npz.main(save_npz.parse_args([str(arg) for arg in args]))


def write_pngs(folder, count, size=(6, 5), seed=0):
    """Distinct random RGB images named 000000.png ..., written in shuffled order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, (count, size[1], size[0], 3), dtype=np.uint8)
    for index in rng.permutation(count):
        Image.fromarray(images[index]).save(folder / f"{index:06d}.png")
    return images


def test_round_trip_sorted_order_and_default_output(tmp_path):
    folder = tmp_path / "samples"
    images = write_pngs(folder, 12)
    (folder / "notes.txt").write_text("ignored")
    done = run_cli("--image_dir", str(folder) + "/", "--num", "12")  # trailing slash: still samples.npz
    assert done.returncode == 0, done.stderr
    out = tmp_path / "samples.npz"
    with np.load(out) as data:
        assert data.files == ["arr_0"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (12, 5, 6, 3)
        np.testing.assert_array_equal(data["arr_0"], images)
    assert sorted(os.listdir(tmp_path)) == ["samples", "samples.npz"]  # no temp files left


def test_the_default_count_is_the_originals_50000(tmp_path):
    folder = tmp_path / "samples"
    write_pngs(folder, 3)
    with pytest.raises(TinyFusionError, match="asked for 50000 images but .* holds only 3; lower --num"):
        pack("--image_dir", folder)


def sample_ddp_batch(folder, images):
    """What sample_ddp.py leaves for run folder `folder`: {folder}.npz (arr_0 + labels) and the
    folder with its settings (and, with --save-png, the PNGs)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text("{}")
    path = folder.parent / f"{folder.name}.npz"
    np.savez(path, arr_0=images, labels=np.arange(len(images)))
    return path, path.read_bytes()


def test_a_sample_ddp_batch_of_the_same_images_is_kept(tmp_path, capsys):
    folder = tmp_path / "DiT-D14-2-0000002-size-32-vae-ema-cfg-1.5-seed-0"
    images = write_pngs(folder, 4)  # sample_ddp.py --save-png
    batch, content = sample_ddp_batch(folder, images)
    pack("--image_dir", folder, "--num", 4)
    assert "already holds these 4 images (identical arr_0); kept it" in capsys.readouterr().out
    assert batch.read_bytes() == content  # labels and all


def test_a_sample_ddp_batch_without_pngs_leaves_nothing_to_pack(tmp_path, capsys):
    folder = tmp_path / "run"
    batch, content = sample_ddp_batch(folder, np.zeros((4, 5, 6, 3), np.uint8))  # sample_ddp.py without --save-png
    pack("--image_dir", folder, "--num", 4)
    out = capsys.readouterr().out
    assert "already holds 4 images" in out and "nothing to do" in out
    with pytest.raises(TinyFusionError, match=r"holds 4 images, not --num 5, .* pass --out"):  # not the count asked for
        pack("--image_dir", folder, "--num", 5)
    assert batch.read_bytes() == content


def test_an_existing_npz_of_other_images_is_refused_naming_out(tmp_path):
    folder = tmp_path / "run"
    images = write_pngs(folder, 4)
    for other in (images[::-1], images[:3], np.zeros_like(images)):  # order, count, pixels differ
        batch, content = sample_ddp_batch(folder, other)
        with pytest.raises(TinyFusionError) as error:
            pack("--image_dir", folder, "--num", 4)
        assert str(error.value).startswith(f"{batch} already exists and holds other images than the first 4 of")
        assert "pass --out" in str(error.value) and "\n" not in str(error.value)
        assert batch.read_bytes() == content
    pack("--image_dir", folder, "--num", 4, "--out", tmp_path / "packed.npz")
    with np.load(tmp_path / "packed.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], images)


def test_grayscale_images_become_rgb_by_repeating_the_channel(tmp_path):
    folder = tmp_path / "gray"
    folder.mkdir()
    gray = np.random.default_rng(0).integers(0, 256, (2, 5, 6), dtype=np.uint8)
    for index, image in enumerate(gray):
        Image.fromarray(image, mode="L").save(folder / f"{index:06d}.png")
    packed = save_npz.load_image_folder(str(folder))
    assert packed.shape == (2, 5, 6, 3) and packed.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(packed[..., channel], gray)


def test_num_takes_the_first_files_in_sorted_order(tmp_path):
    folder = tmp_path / "samples"
    images = write_pngs(folder, 5)
    Image.fromarray(images[0]).save(folder / "000005.jpeg", quality=100)  # JPEGs count too
    assert len(save_npz.list_image_files(str(folder))) == 6
    np.testing.assert_array_equal(save_npz.load_image_folder(str(folder), num=3), images[:3])
    # plain lexicographic order of the names: "b10" sorts before "b9"
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(images[1]).save(other / "b9.png")
    Image.fromarray(images[2]).save(other / "b10.png")
    np.testing.assert_array_equal(save_npz.load_image_folder(str(other)), images[[2, 1]])
    assert save_npz.npz_image_count(str(tmp_path / "absent.npz")) is None


def test_existing_output_is_never_overwritten_silently(tmp_path):
    folder = tmp_path / "samples"
    images = write_pngs(folder, 3)
    out = tmp_path / "custom.npz"
    out.write_bytes(b"precious")
    done = run_cli("--image_dir", str(folder), "--num", "3", "--out", str(out))
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]  # the images were read (to compare), then one error line
    assert "Traceback" not in done.stderr and "--overwrite" in message and message.startswith("error:")
    assert out.read_bytes() == b"precious"
    done = run_cli("--image_dir", str(folder), "--num", "3", "--out", str(out), "--overwrite")
    assert done.returncode == 0, done.stderr
    with np.load(out) as data:
        np.testing.assert_array_equal(data["arr_0"], images)


def one_line_error(folder, *extra):
    done = run_cli("--image_dir", str(folder), *extra)
    assert done.returncode != 0
    # one error line, no traceback (progress bars before it are fine)
    assert "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error:"), message
    assert not os.path.exists(save_npz.default_output(str(folder)))
    return message


def test_bad_folders_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no .png/.jpg/.jpeg images" in one_line_error(empty)
    assert "does not exist" in one_line_error(tmp_path / "absent")

    mixed = tmp_path / "mixed"
    write_pngs(mixed, 2, size=(6, 5))
    Image.fromarray(np.zeros((7, 6, 3), np.uint8)).save(mixed / "000009.png")
    assert "mixed image sizes" in one_line_error(mixed, "--num", "3")

    for mode, shape in (("RGBA", (5, 6, 4)), ("LA", (5, 6, 2))):
        folder = tmp_path / f"mode_{mode}"
        write_pngs(folder, 2)
        Image.fromarray(np.zeros(shape, np.uint8), mode=mode).save(folder / "000001.png")
        message = one_line_error(folder, "--num", "2")
        assert f"is a {mode} image, not RGB" in message and "000001.png" in message

    few = tmp_path / "few"
    write_pngs(few, 2)
    assert "only 2" in one_line_error(few, "--num", "3")


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "out.npz"

    def exploding_savez(path, **arrays):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", exploding_savez)
    folder = tmp_path / "samples"
    write_pngs(folder, 2)
    args = type("Args", (), {"image_dir": str(folder), "out": str(out), "num": None, "overwrite": False})
    with pytest.raises(KeyboardInterrupt):
        save_npz.main(args)
    assert sorted(os.listdir(tmp_path)) == ["samples"]
